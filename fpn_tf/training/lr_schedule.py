"""Learning-rate schedule of the paper / detectron2: linear warm-up, then step decay.

    lr(step) = learning_rate * warmup(step) * decay_factor ** (number of decay_steps <= step)
    warmup(step) = warmup_factor + (1 - warmup_factor) * min(step / warmup_steps, 1)

Steps are optimizer updates from 0; step 60000 already uses the decayed LR (detectron2's
MultiStepLR).
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from fpn_tf.configs.experiment import TrainConfig

__all__ = ["WarmupStepDecay", "build_lr_schedule"]


@keras.saving.register_keras_serializable(package="fpn_tf")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from warmup_factor * learning_rate, then ×decay_factor at each decay step."""

    def __init__(
        self,
        learning_rate: float,
        warmup_steps: int = 0,
        warmup_factor: float = 0.001,
        decay_steps: Sequence[int] = (),
        decay_factor: float = 0.1,
        name: str = "WarmupStepDecay",
    ):
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
        if not 0.0 <= warmup_factor <= 1.0:
            raise ValueError(f"warmup_factor must be in [0, 1], got {warmup_factor}.")
        decay_steps = [int(s) for s in decay_steps]
        if any(b <= a for a, b in zip(decay_steps, decay_steps[1:])):
            raise ValueError(f"decay_steps must be strictly increasing, got {decay_steps}.")
        self.learning_rate = float(learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.decay_steps = decay_steps
        self.decay_factor = float(decay_factor)
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        lr = ops.convert_to_tensor(self.learning_rate, "float32")
        if self.warmup_steps > 0:
            alpha = ops.minimum(step / float(self.warmup_steps), 1.0)
            lr = lr * (self.warmup_factor * (1.0 - alpha) + alpha)
        if self.decay_steps:
            num_decays = ops.sum(
                ops.cast(
                    ops.greater_equal(step, ops.convert_to_tensor(self.decay_steps, "float32")),
                    "float32",
                )
            )
            lr = lr * ops.power(ops.convert_to_tensor(self.decay_factor, "float32"), num_decays)
        return lr

    def get_config(self):
        keys = ("learning_rate", "warmup_steps", "warmup_factor", "decay_factor", "name")
        return {**{k: getattr(self, k) for k in keys}, "decay_steps": list(self.decay_steps)}


def build_lr_schedule(train: TrainConfig, global_batch_size: int) -> WarmupStepDecay:
    """The schedule of a TrainConfig, with the linear scaling rule applied."""
    return WarmupStepDecay(
        learning_rate=train.scaled_learning_rate(global_batch_size),
        warmup_steps=train.warmup_steps,
        warmup_factor=train.warmup_factor,
        decay_steps=train.decay_steps,
        decay_factor=train.decay_factor,
    )
