"""One ``fit`` step of `MultiLossModel.train_step` on the weight-decay hand case: ``w = 1``, a
loss whose gradient is zero, lr 1, momentum 0, weight decay 0.1; must give ``w = 1 - lr * wd``.

Usage: ``weight_decay_step.py NUM_DEVICES POLICY`` (one device, or MirroredStrategy over
NUM_DEVICES logical CPUs; POLICY float32 or mixed_float16). Runs SGD (coupled L2) and AdamW
(decoupled) and prints JSON ``{optimizer: {"w": [...], "bias": [...], "steps": n}}``. Run by tests/test_objective.py
in its own process (logical devices must be set up before TensorFlow starts).
"""

import json
import os
import sys

import keras
import tensorflow as tf

from fpn_tf.training.strategy import split_cpu

split_cpu(4)

from fpn_tf.configs.experiment import TrainConfig  # noqa: E402
from fpn_tf.modeling.multi_loss_model import MultiLossModel  # noqa: E402
from fpn_tf.training.optimizers import build_optimizer  # noqa: E402

LR, WD = 1.0, 0.1


class HandCase(MultiLossModel):
    """One decayed weight ``w`` and one excluded ``bias``; the loss does not depend on them."""

    def __init__(self):
        super().__init__(loss_names=("total_loss",))
        self.w = self.add_weight(name="w", shape=(3,), initializer="ones")
        self.bias = self.add_weight(name="bias", shape=(3,), initializer="ones")

    def compute_losses(self, features, labels, training=True):
        x = tf.cast(features["x"], tf.float32)
        zero = 0.0 * (tf.reduce_sum(self.w) + tf.reduce_sum(self.bias))
        return {"total_loss": zero + tf.reduce_mean(x)}

    def call(self, inputs, training=False):
        return inputs


def run_case(strategy, optimizer_name, policy):
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        train_cfg = TrainConfig(
            optimizer=optimizer_name,
            learning_rate=LR,
            momentum=0.0,
            weight_decay=WD,
            scale_lr_with_batch=False,
            warmup_steps=0,
            decay_steps=[1000],
        )
        with strategy.scope():
            model = HandCase()
            optimizer = build_optimizer(train_cfg, 4, mixed_float16=policy == "mixed_float16")
            model.compile(optimizer=optimizer, jit_compile=False)
        data = tf.data.Dataset.from_tensors(({"x": tf.zeros([4, 1])}, {"y": tf.zeros([4, 1])}))
        model.fit(data.repeat(), steps_per_epoch=1, epochs=1, verbose=0, shuffle=False)
        return {
            "w": model.w.numpy().tolist(),
            "bias": model.bias.numpy().tolist(),
            "steps": int(optimizer.iterations.numpy()),
            "replicas": strategy.num_replicas_in_sync,
        }
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def main(num_devices: int, policy: str):
    devices = [f"/cpu:{i}" for i in range(num_devices)]
    # One strategy per process: collectives of strategies over other device counts would clash.
    strategy = (
        tf.distribute.MirroredStrategy(devices)
        if num_devices > 1
        else tf.distribute.OneDeviceStrategy(devices[0])
    )
    print(json.dumps({name: run_case(strategy, name, policy) for name in ("sgd", "adamw")}))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
    sys.stdout.flush()
    os._exit(0)
