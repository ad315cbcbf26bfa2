"""Optimizer and weight decay from a ``train`` config.

SGD uses *coupled* L2 decay, ``grad += wd * w`` before momentum, as Caffe/detectron2 (Keras'
``SGD(weight_decay=)`` is decoupled, ~10x weaker at momentum 0.9), added in the per-variable
update where the gradient is summed over replicas and unscaled: once per step for any replica
count and precision. AdamW uses Keras' decoupled ``weight_decay``.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.training.lr_schedule import build_lr_schedule

NO_DECAY_NAMES = ("bias", "gamma", "beta")
# Keras matches these with re.search on the name of the variable it holds: the Keras variable's
# own name (`bias`) or, inside the TensorFlow backend's update, the tf.Variable's (`.../bias:0`).
NO_DECAY_PATTERNS = tuple(rf"(^|/){name}(:\d+)?$" for name in NO_DECAY_NAMES)


@keras.saving.register_keras_serializable(package="fpn_tf")
class SGDWithL2(keras.optimizers.SGD):
    """SGD with ``g <- g + l2 * w`` before momentum; ``exclude_from_weight_decay`` applies."""

    def __init__(self, learning_rate=0.01, momentum=0.0, l2: float = 0.0, name="sgd_l2", **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=momentum, name=name, **kwargs)
        self.l2 = float(l2)

    def update_step(self, gradient, variable, learning_rate):
        if self.l2 and self._use_weight_decay(variable):
            if isinstance(gradient, tf.IndexedSlices):
                gradient = tf.convert_to_tensor(gradient)
            gradient += tf.cast(self.l2, gradient.dtype) * tf.cast(variable, gradient.dtype)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "l2": self.l2}


def build_optimizer(train_cfg, global_batch_size: int, mixed_float16: bool = False):
    schedule = build_lr_schedule(train_cfg, global_batch_size)
    clip = train_cfg.gradient_clip_norm
    if train_cfg.optimizer == "sgd":
        optimizer = SGDWithL2(
            schedule, momentum=train_cfg.momentum, l2=train_cfg.weight_decay, global_clipnorm=clip
        )
    elif train_cfg.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(
            schedule, weight_decay=train_cfg.weight_decay, global_clipnorm=clip
        )
    else:
        raise ValueError(f"train.optimizer must be sgd or adamw, got {train_cfg.optimizer!r}")
    if train_cfg.weight_decay_excludes_bn_and_bias:
        optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY_PATTERNS))
    if mixed_float16:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def current_learning_rate(optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = inner.learning_rate
    if callable(lr) and not isinstance(lr, tf.Variable):
        lr = lr(inner.iterations)
    return float(keras.ops.convert_to_numpy(lr))
