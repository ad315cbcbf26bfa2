"""The training objective is one thing: weight decay applied once per step on one device, over
2 and 4 replicas and under mixed_float16; ``model.fit`` and the training command make the same
update; the same seed gives the same initial weights."""

import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.data import pipeline
from fpn_tf.modeling.factory import build_model
from fpn_tf.training.optimizers import NO_DECAY_NAMES, build_optimizer
from fpn_tf.training.trainer import Trainer
import watched

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT, TF_ENABLE_ONEDNN_OPTS="0")


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_devices,policy",
    [(1, "float32"), (2, "float32"), (4, "float32"), (1, "mixed_float16"), (2, "mixed_float16")],
)
def test_weight_decay_hand_case_gives_one_minus_lr_times_wd(num_devices, policy):
    """w = 1, a loss with zero gradient, lr 1, momentum 0, wd 0.1: one step gives w = 0.9 for
    SGD's coupled L2 and AdamW's decoupled decay alike (before the fix: 0.8 on 2 replicas,
    0.99999696 under mixed_float16); the excluded bias keeps 1."""
    result = watched.run(
        [sys.executable, "tests/scripts/weight_decay_step.py", str(num_devices), policy],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for optimizer in ("sgd", "adamw"):
        case = report[optimizer]
        assert case["replicas"] == num_devices and case["steps"] == 1, case
        np.testing.assert_allclose(
            case["w"], np.float32(1.0 - 1.0 * 0.1), rtol=0, atol=1e-7, err_msg=optimizer
        )
        np.testing.assert_array_equal(case["bias"], 1.0, err_msg=optimizer)


def test_decay_excludes_exactly_batch_norm_and_biases_of_the_detector(tiny_config):
    """The exclusion matches each variable's own name, inside the optimizer's update too (where
    Keras hands it the backend tf.Variable, named ``.../bias:0``)."""
    model = build_model(tiny_config.model, category_ids=[1, 2, 3, 4])
    optimizer = build_optimizer(tiny_config.train, 4)
    optimizer.build(model.trainable_variables)
    kinds = set()
    for v in model.trainable_variables:
        expected = v.path.split("/")[-1] not in NO_DECAY_NAMES
        kinds.add(expected)
        assert optimizer._use_weight_decay(v) == expected, v.path
        assert optimizer._use_weight_decay(v.value) == expected, v.value.name
    assert kinds == {True, False}


def _first_batch(trainer):
    ds = pipeline.build_dataset(
        trainer.train_source, trainer.cfg.train_data, True, seed=trainer.cfg.train.seed
    )
    return next(iter(ds))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fit_and_the_training_command_make_the_same_update(tiny_config, tmp_path, optimizer):
    """One detector step through a user's ``model.fit`` and through `Trainer.train` (what
    ``python -m fpn_tf.train`` runs): same seed, same batch -> the same updated weights."""
    cfg = tiny_config
    cfg.train.optimizer = optimizer
    cfg.train.weight_decay = 0.05  # large, so a decay applied differently shows
    cfg.train.warmup_steps = 0
    # Exhaustive sampling: every labelled anchor and RoI candidate is used, so the two runs
    # cannot differ by their random samples (stateful random ops seed by graph position).
    cfg.model.rpn.batch_size_per_image = 100000
    cfg.model.roi_sampler.batch_size_per_image = 160
    cfg.model.roi_sampler.positive_fraction = 1.0
    trainer = Trainer(cfg, str(tmp_path / "command"))
    initial = [w.copy() for w in trainer.model.get_weights()]
    trainer.train(total_steps=1)

    keras.utils.set_random_seed(cfg.train.seed)
    model = build_model(cfg.model, category_ids=list(trainer.category_map.dataset_ids))
    for a, b in zip(initial, model.get_weights()):
        np.testing.assert_array_equal(a, b)  # the same seed built the same weights
    model.compile(
        optimizer=build_optimizer(cfg.train, cfg.train_data.global_batch_size), jit_compile=False
    )
    features, labels = _first_batch(trainer)
    model.fit(tf.data.Dataset.from_tensors((features, labels)), epochs=1, verbose=0)

    moved = 0
    for v, a, w0 in zip(trainer.model.weights, model.get_weights(), initial):
        b = v.numpy()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=v.path)
        moved += int(not np.array_equal(b, w0))
    assert moved > 10  # the step changed the weights


def test_same_seed_same_initial_weights_other_seed_other_weights(tiny_config, tmp_path):
    first = Trainer(tiny_config, str(tmp_path / "a")).model.get_weights()
    second = Trainer(tiny_config, str(tmp_path / "b")).model.get_weights()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    tiny_config.train.seed = 1
    other = Trainer(tiny_config, str(tmp_path / "c")).model.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(first, other) if a.std() > 0)
