"""WarmupStepDecay: exact values at the schedule's corners."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.configs import ExperimentConfig, load_config
from fpn_tf.training.lr_schedule import WarmupStepDecay, build_lr_schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = dict(
    learning_rate=0.02,
    warmup_steps=1000,
    warmup_factor=0.001,
    decay_steps=[60000, 80000],
    decay_factor=0.1,
)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.02 * 0.001),  # warm-up starts at factor * lr
        (500, 0.02 * (0.001 + 0.999 * 0.5)),  # linear half way: 0.010010
        (999, 0.02 * (0.001 + 0.999 * 0.999)),
        (1000, 0.02),  # after warm-up
        (59999, 0.02),
        (60000, 0.002),  # first decay applies at its step
        (79999, 0.002),
        (80000, 0.0002),  # second decay
        (90000, 0.0002),
    ],
)
def test_paper_schedule_values(step, expected):
    schedule = WarmupStepDecay(**PAPER)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)


def test_works_in_tf_function_and_with_optimizer_iterations():
    schedule = WarmupStepDecay(**PAPER)
    fn = tf.function(lambda s: schedule(s))
    assert float(fn(tf.constant(60000, tf.int64))) == pytest.approx(0.002, rel=1e-6)
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=0.9)
    assert float(optimizer.learning_rate) == pytest.approx(0.02 * 0.001, rel=1e-6)


def test_no_warmup_no_decay():
    schedule = WarmupStepDecay(0.1)
    assert [float(schedule(s)) for s in (0, 10, 10**6)] == pytest.approx([0.1, 0.1, 0.1])


def test_get_config_round_trip():
    schedule = WarmupStepDecay(**PAPER)
    config = schedule.get_config()
    assert config["decay_steps"] == [60000, 80000]
    clone = WarmupStepDecay.from_config(config)
    steps = np.array([0, 500, 1000, 60000, 80000])
    np.testing.assert_allclose(
        [float(clone(s)) for s in steps], [float(schedule(s)) for s in steps]
    )
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule)
    )
    assert isinstance(restored, WarmupStepDecay) and restored.get_config() == config


def test_invalid_arguments():
    with pytest.raises(ValueError):
        WarmupStepDecay(-1.0)
    with pytest.raises(ValueError):
        WarmupStepDecay(0.1, decay_steps=[10, 5])


def test_build_from_config_applies_linear_scaling():
    c = ExperimentConfig()
    schedule = build_lr_schedule(c.train, global_batch_size=8)  # half of the reference batch
    assert float(schedule(1000)) == pytest.approx(0.01, rel=1e-6)
    assert float(schedule(0)) == pytest.approx(0.01 * 0.001, rel=1e-6)
    demo = load_config(os.path.join(REPO, "configs", "cpu_demo.yaml"))
    schedule = build_lr_schedule(demo.train, demo.train_data.global_batch_size)
    assert float(schedule(demo.train.warmup_steps)) == pytest.approx(1e-3, rel=1e-6)
    assert float(schedule(400)) == pytest.approx(1e-4, rel=1e-6)
