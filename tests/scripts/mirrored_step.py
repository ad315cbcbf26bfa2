"""One training step on 4 logical CPU devices (MirroredStrategy, per-replica batch 1) against one
device (batch 4) from the same weights and the same global batch. Prints JSON with the losses and
the largest relative weight difference. Run by tests/test_distributed.py in its own process
(logical devices must be set up before TensorFlow starts)."""

import json
import os
import sys

import numpy as np
import tensorflow as tf

from fpn_tf.training.strategy import split_cpu

split_cpu(4)

from fpn_tf.configs.loader import load_config  # noqa: E402
from fpn_tf.training.trainer import Trainer  # noqa: E402

sys.path.insert(0, "tests")
from conftest import TINY_OVERRIDES  # noqa: E402


def make_config(tmp, strategy):
    overrides = dict(TINY_OVERRIDES)
    overrides.update(
        {
            "train_data.synthetic.output_dir": f"{tmp}/synthetic",
            "eval_data.synthetic.output_dir": f"{tmp}/synthetic",
            "train_data.global_batch_size": 4,
            "eval_data.global_batch_size": 4,
            "train_data.padding_mode": "square",
            "train_data.random_flip": False,
            "model.backbone.sync_batch_norm": True,
            # Exhaustive sampling: every labelled anchor and every RoI candidate is used, so the
            # random sample cannot differ between the two runs.
            "model.rpn.batch_size_per_image": 100000,
            "model.roi_sampler.batch_size_per_image": 160,
            "model.roi_sampler.positive_fraction": 1.0,
            "train.optimizer": "sgd",
            "train.learning_rate": 0.01,
            # A decay large enough that applying it once per replica (4x) moves the update by far
            # more than the tolerance of the test.
            "train.weight_decay": 0.05,
            "train.scale_lr_with_batch": False,
            "train.warmup_steps": 0,
            "runtime.strategy": strategy,
        }
    )
    return load_config("configs/cpu_demo.yaml", overrides)


def main(tmp):
    single = Trainer(make_config(tmp, "one_device"), f"{tmp}/single")
    mirrored = Trainer(make_config(tmp, "mirrored"), f"{tmp}/mirrored")
    assert mirrored.num_replicas == 4, mirrored.num_replicas
    mirrored.model.set_weights(single.model.get_weights())
    initial = [w.copy() for w in single.model.get_weights()]
    features, labels = next(
        iter(single._dataset(single.train_source, single.cfg.train_data, True, seed=0))
    )
    assert features["images"].shape[0] == 4

    # The same global batch through model.fit: whole on one device, split 4 ways by Keras.
    dataset = tf.data.Dataset.from_tensors((features, labels))
    single_losses = single.model.fit(dataset, epochs=1, verbose=0).history
    mirrored_losses = mirrored.model.fit(dataset, epochs=1, verbose=0).history

    max_rel, worst = 0.0, None
    for va, vb in zip(single.model.weights, mirrored.model.weights):
        a, b = va.numpy(), vb.numpy()
        rel = float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
        if rel > max_rel:
            max_rel, worst = rel, va.path
    a_all = single.model.get_weights()
    b_all = mirrored.model.get_weights()
    allclose = all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(a_all, b_all))
    upd_a = np.concatenate([(a - i).ravel() for a, i in zip(a_all, initial)])
    upd_b = np.concatenate([(b - i).ravel() for b, i in zip(b_all, initial)])
    update_rel = float(np.linalg.norm(upd_a - upd_b) / np.linalg.norm(upd_a))
    if os.environ.get("DEBUG_MIRRORED"):
        for v, a, b, i in zip(single.model.weights, a_all, b_all, initial):
            print(v.path, float(np.abs(a - i).max()), float(np.abs(b - i).max()), file=sys.stderr)
    moved = max(
        float(np.max(np.abs(v.numpy() - w)))
        for v, w in zip(single.model.trainable_weights, mirrored.model.trainable_weights)
    )
    print(
        json.dumps(
            {
                "replicas": mirrored.num_replicas,
                "single": {k: float(np.mean(v[-1])) for k, v in single_losses.items()},
                "mirrored": {k: float(np.mean(v[-1])) for k, v in mirrored_losses.items()},
                "max_relative_weight_diff": max_rel,
                "worst_weight": worst,
                "weights_allclose_rtol1e-4_atol1e-5": allclose,
                "update_relative_diff": update_rel,
                "max_abs_trainable_diff": moved,
                "steps": [single.step, mirrored.step],
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    # Skip interpreter teardown: TF's multi-device iterator can abort while being destroyed.
    os._exit(0)
