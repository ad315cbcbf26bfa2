"""The training loop: checkpoints, resume (step and optimizer state), NaN handling, the CLI."""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.training.trainer import NonFiniteLossError, Trainer
import watched


def _weights(trainer):
    return [v.numpy().copy() for v in trainer.model.weights]


def test_trains_writes_checkpoints_and_resumes_where_it_stopped(tiny_config, tmp_path):
    model_dir = str(tmp_path / "run")
    first = Trainer(tiny_config, model_dir)
    assert first.restored_from is None and first.step == 0
    log = first.train(total_steps=4)
    assert log["step"] == 4 and np.isfinite(log["total_loss"])
    assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-4")
    assert os.path.exists(os.path.join(model_dir, "params.yaml"))
    assert os.path.exists(os.path.join(model_dir, "category_map.json"))
    assert tf.io.gfile.glob(os.path.join(model_dir, "train", "events.out.tfevents.*"))
    weights = _weights(first)
    slots = [v.numpy().copy() for v in first.optimizer.variables]

    second = Trainer(tiny_config, model_dir)  # a new process would do the same
    assert second.restored_from.endswith("ckpt-4") and second.step == 4
    for a, b in zip(weights, _weights(second)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(slots, [v.numpy() for v in second.optimizer.variables]):
        np.testing.assert_array_equal(a, b)  # momentum/Adam moments and the step count
    log2 = second.train(total_steps=6)
    assert log2["step"] == 6
    assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-6")
    assert np.isfinite(log2["total_loss"])


def test_non_finite_loss_stops_without_saving_it(tiny_config, tmp_path):
    model_dir = str(tmp_path / "nan")
    trainer = Trainer(tiny_config, model_dir)
    trainer.train(total_steps=2)
    # Poison a weight: every later loss is NaN.
    kernel = trainer.model.roi_heads.box_head.classifier.kernel
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*ckpt-2"):
        trainer.train(total_steps=4)
    assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-2")


def test_non_finite_loss_is_skipped_when_configured(tiny_config, tmp_path):
    """on_nan=skip: a batch with a NaN loss applies no update and does not count as a step;
    training goes on to total_steps with the next batches."""
    tiny_config.train.on_nan = "skip"
    trainer = Trainer(tiny_config, str(tmp_path / "skip"))
    calls = tf.Variable(0)
    compute_losses = trainer.model.compute_losses

    def second_call_is_nan(features, labels, training=True):
        losses = dict(compute_losses(features, labels, training=training))
        calls.assign_add(1)
        poison = tf.where(tf.equal(calls, 2), float("nan"), 0.0)
        losses["total_loss"] = losses["total_loss"] + poison
        return losses

    trainer.model.compute_losses = second_call_is_nan
    log = trainer.train(total_steps=3)
    assert int(calls.numpy()) == 4  # 4 batches for 3 steps
    assert log["step"] == 3 and log["skipped_steps"] == 1
    assert np.isfinite(log["total_loss"])


@pytest.mark.slow
def test_non_finite_weights_stop_a_skipping_run_instead_of_spinning(
    tiny_config, tmp_path, monkeypatch
):
    from fpn_tf.training import callbacks

    monkeypatch.setattr(callbacks, "MAX_CONSECUTIVE_NONFINITE", 3)
    tiny_config.train.on_nan = "skip"
    trainer = Trainer(tiny_config, str(tmp_path / "skip"))
    trainer.train(total_steps=1)
    kernel = trainer.model.roi_heads.box_head.classifier.kernel
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    before = trainer.model.roi_heads.box_head.fcs[0].kernel.numpy().copy()
    with pytest.raises(NonFiniteLossError, match=r"step 2 .*3 non-finite batches in a row"):
        trainer.train(total_steps=4)
    np.testing.assert_array_equal(before, trainer.model.roi_heads.box_head.fcs[0].kernel.numpy())
    assert trainer.step == 1  # the updates (and the step counter) were skipped


@pytest.mark.slow
def test_float16_loss_scale_skips_are_counted_not_logged_or_saved_as_steps(tiny_config, tmp_path):
    """A float16 step whose scaled gradients overflow is skipped by LossScaleOptimizer without
    moving the step counter; the loop must not log or checkpoint that step again."""
    import logging

    import keras
    from absl import logging as absl_logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    tiny_config.runtime.mixed_precision = "float16"
    tiny_config.train.log_every_steps = 1
    tiny_config.train.checkpoint_every_steps = 1
    model_dir = str(tmp_path / "fp16")
    collect, absl_logger = Collect(), absl_logging.get_absl_logger()
    verbosity = absl_logging.get_verbosity()
    absl_logger.addHandler(collect)
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        trainer = Trainer(tiny_config, model_dir)
        if not trainer.optimizer.built:
            trainer.optimizer.build(trainer.model.trainable_variables)
        scale = [v for v in trainer.optimizer.variables if v.path.endswith("dynamic_scale")]
        assert len(scale) == 1
        scale[0].assign(2.0**40)  # float16 gradients overflow until the scale has halved enough
        log = trainer.train(total_steps=2)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
        absl_logger.removeHandler(collect)
        absl_logging.set_verbosity(verbosity)
    assert log["step"] == 2 and log["loss_scale_skipped"] >= 1
    assert float(scale[0].numpy()) < 2.0**40
    steps = [m.split()[1] for m in collect.messages if m.startswith("step ")]
    assert steps == ["1/2", "2/2"]
    saved = sorted(
        os.path.basename(p) for p in tf.io.gfile.glob(os.path.join(model_dir, "ckpt-*.index"))
    )
    assert saved == ["ckpt-1.index", "ckpt-2.index"]
    assert any("batches skipped by the float16 loss scale" in m for m in collect.messages)


def _run_cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return watched.run([sys.executable, "-m", "fpn_tf.train", *args], env=env)


def test_cli_rejects_an_unknown_config_key_in_one_line(tmp_path):
    result = _run_cli(f"--model_dir={tmp_path}", "--params_override=train.learning_rat=0.1")
    assert result.returncode == 2
    error_lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(error_lines) == 1 and "train.learning_rat" in error_lines[0]
    assert "learning_rate" in error_lines[0]  # the suggestion
    assert "Traceback" not in result.stderr


def test_cli_rejects_impossible_values_before_any_work(tmp_path):
    result = _run_cli(f"--model_dir={tmp_path / 'x'}", "--params_override=train.learning_rate=-1")
    assert result.returncode == 2 and "train.learning_rate" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "x")


def _eval_events(model_dir):
    """{tag: [steps]} of the eval summaries."""
    tags = {}
    for path in tf.io.gfile.glob(os.path.join(model_dir, "eval", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


@pytest.mark.slow
def test_periodic_evaluation_and_tensorboard_images_of_held_out_detections(tiny_config, tmp_path):
    """train_and_eval evaluates every eval.every_steps on the way; each evaluation writes its
    metrics and eval.summary_images drawn images to TensorBoard."""
    import json

    tiny_config.eval.summary_images = 3
    tiny_config.eval.summary_score_threshold = 0.0
    model_dir = str(tmp_path / "eval")
    trainer = Trainer(tiny_config, model_dir)
    trainer.train(total_steps=4, evaluate_every_steps=2)
    assert json.load(open(os.path.join(model_dir, "eval", "metrics.json")))["step"] == 2
    trainer.evaluate()
    assert json.load(open(os.path.join(model_dir, "eval", "metrics.json")))["step"] == 4
    tags = _eval_events(model_dir)
    assert sorted(tags["metrics/AP"]) == [2, 4]
    assert {t for t in tags if t.startswith("detections/")} == {
        "detections/0",
        "detections/1",
        "detections/2",
    }
    assert sorted(tags["detections/0"]) == [2, 4]
