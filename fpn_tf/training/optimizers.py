"""Optimizer and weight decay from a ``train`` config.

SGD (the paper): momentum 0.9 and *coupled* L2 weight decay, ``grad += wd * w`` before momentum,
as Caffe/Detectron/detectron2 do. Keras' ``SGD(weight_decay=...)`` is decoupled (``w -= lr*wd*w``
after the update), which with momentum 0.9 is about 10x weaker than the paper's 1e-4 means, so the
trainer adds the L2 term to the gradients itself (`add_l2_to_gradients`).
AdamW (the CPU demo): Keras' decoupled ``weight_decay``.
With ``weight_decay_excludes_bn_and_bias`` neither decays BatchNorm's gamma/beta nor biases
(detectron2's default is to decay them with the same 1e-4; excluding them is the common modern
choice, keeps the small-backbone BatchNorm from being pulled to zero, and costs nothing).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.training.lr_schedule import build_lr_schedule

NO_DECAY_NAMES = ("bias", "gamma", "beta")


def decays(variable, excludes_bn_and_bias: bool) -> bool:
    """Whether weight decay applies to ``variable``."""
    if not excludes_bn_and_bias:
        return True
    return variable.path.split("/")[-1] not in NO_DECAY_NAMES


def build_optimizer(train_cfg, global_batch_size: int, mixed_float16: bool = False):
    """SGD with momentum or AdamW with the warm-up + step-decay schedule of the config."""
    schedule = build_lr_schedule(train_cfg, global_batch_size)
    clip = train_cfg.gradient_clip_norm
    if train_cfg.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(schedule, momentum=train_cfg.momentum,
                                         global_clipnorm=clip)
    elif train_cfg.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=train_cfg.weight_decay,
                                           global_clipnorm=clip)
        if train_cfg.weight_decay_excludes_bn_and_bias:
            optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY_NAMES))
    else:  # validated by the config; kept for direct callers.
        raise ValueError(f"train.optimizer must be sgd or adamw, got {train_cfg.optimizer!r}")
    if mixed_float16:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def add_l2_to_gradients(grads, variables, train_cfg):
    """Coupled L2 weight decay for SGD (no-op for AdamW, whose decay is decoupled)."""
    if train_cfg.optimizer != "sgd" or not train_cfg.weight_decay:
        return grads
    wd = float(train_cfg.weight_decay)
    out = []
    for g, v in zip(grads, variables):
        if g is not None and decays(v, train_cfg.weight_decay_excludes_bn_and_bias):
            g = g + tf.cast(wd, g.dtype) * tf.cast(v.value, g.dtype)
        out.append(g)
    return out


def current_learning_rate(optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = inner.learning_rate
    if callable(lr) and not isinstance(lr, tf.Variable):
        lr = lr(inner.iterations)
    return float(keras.ops.convert_to_numpy(lr))
