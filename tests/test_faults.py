"""Faults: SIGKILL and resume, SIGTERM saves, a damaged checkpoint, bad data and bad config at
the command line. Each fault class of WORKSPACE.md's table has its test here or is named there."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY_OVERRIDES, copy_run  # noqa: E402
from fpn_tf.training.trainer import Trainer
import watched


def _overrides(tmp_path, **extra):
    o = dict(TINY_OVERRIDES)
    o["train_data.synthetic.output_dir"] = str(tmp_path / "synthetic")
    o["eval_data.synthetic.output_dir"] = str(tmp_path / "synthetic")
    o.update(extra)
    return json.dumps(o)


def _start(model_dir, overrides, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    log = open(os.path.join(os.path.dirname(model_dir), os.path.basename(model_dir) + ".log"), "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fpn_tf.train",
            f"--model_dir={model_dir}",
            "--mode=train",
            "--noexport",
            f"--params_override={overrides}",
            "--alsologtostderr",
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    return proc, log.name


def _ckpt_step(model_dir):
    latest = tf.train.latest_checkpoint(model_dir)
    return int(latest.rsplit("-", 1)[1]) if latest else None


def _checkpoint_values(path):
    reader = tf.train.load_checkpoint(path)
    # Each variable is stored once, under the first object path that reaches it (the model's
    # trainable weights under the optimizer's), so compare against every stored tensor.
    return [
        reader.get_tensor(k)
        for k in reader.get_variable_to_shape_map()
        if k.endswith("VARIABLE_VALUE")
    ]


@pytest.mark.slow
def test_sigkill_mid_run_resumes_from_the_last_checkpoint(tmp_path, tiny_config):
    model_dir = str(tmp_path / "killed")
    overrides = _overrides(
        tmp_path, **{"train.total_steps": 1000, "train.checkpoint_every_steps": 2}
    )
    proc, log = _start(model_dir, overrides)
    try:
        reached = watched.wait_until(
            lambda: (_ckpt_step(model_dir) or 0) >= 4, [proc], watch=[log, model_dir]
        )
        assert reached, open(log).read()
    finally:
        proc.send_signal(signal.SIGKILL)
        watched.wait([proc])
    assert proc.returncode == -signal.SIGKILL
    killed_at = _ckpt_step(model_dir)
    checkpoint = tf.train.latest_checkpoint(model_dir)

    # The restarted run resumes: same step, weights equal to the checkpoint's.
    tiny_config.train.total_steps = killed_at + 2
    resumed = Trainer(tiny_config, model_dir)
    assert resumed.restored_from == checkpoint and resumed.step == killed_at
    saved = _checkpoint_values(checkpoint)
    for v in resumed.model.weights:
        value = v.numpy()
        assert any(s.shape == value.shape and np.array_equal(s, value) for s in saved), v.path
    log2 = resumed.train()
    assert log2["step"] == killed_at + 2 and np.isfinite(log2["total_loss"])


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path):
    model_dir = str(tmp_path / "terminated")
    overrides = _overrides(
        tmp_path, **{"train.total_steps": 1000, "train.checkpoint_every_steps": 500}
    )
    proc, log = _start(model_dir, overrides)
    try:
        reached = watched.wait_until(
            lambda: "step 3/1000" in open(log).read(), [proc], watch=[log, model_dir]
        )
        assert reached, open(log).read()
        proc.send_signal(signal.SIGTERM)
        watched.wait([proc], watch=[log, model_dir])
    finally:
        if proc.poll() is None:
            proc.kill()
    text = open(log).read()
    assert proc.returncode == 0, text
    assert "SIGTERM received" in text and "Stopped by SIGTERM" in text
    step = _ckpt_step(model_dir)
    assert step is not None and step >= 3  # no periodic checkpoint before step 500


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_config, tiny_runs, tmp_path):
    model_dir = copy_run(tiny_runs[4], tmp_path / "damaged")  # checkpoints at 2 and 4
    data_files = tf.io.gfile.glob(os.path.join(model_dir, "ckpt-4.data-*"))
    with open(data_files[0], "r+b") as f:  # a write cut short
        f.truncate(16)
    resumed = Trainer(tiny_config, model_dir)
    assert resumed.restored_from.endswith("ckpt-2") and resumed.step == 2


def test_half_written_checkpoint_is_never_the_latest(tiny_config, tiny_runs, tmp_path):
    model_dir = copy_run(tiny_runs[2], tmp_path / "half")  # trained 2 steps: ckpt-2
    # A process killed while writing ckpt-4 leaves its files but not the updated index.
    for name in ("ckpt-4.index", "ckpt-4.data-00000-of-00001"):
        with open(os.path.join(model_dir, name), "wb") as f:
            f.write(b"\x00partial")
    resumed = Trainer(tiny_config, model_dir)
    assert resumed.restored_from.endswith("ckpt-2") and resumed.step == 2


def _run_train(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return watched.run(
        [sys.executable, "-m", "fpn_tf.train", "--mode=train", "--noexport", *args], env=env
    )


def _one_error_line(result):
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.slow
def test_malformed_annotation_json_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "instances.json"
    bad.write_text('{"images": [')
    (tmp_path / "images").mkdir()
    overrides = json.dumps(
        {
            "train_data.source": "coco",
            "train_data.annotation_file": str(bad),
            "train_data.image_dir": str(tmp_path / "images"),
            "eval_data.source": "coco",
            "eval_data.annotation_file": str(bad),
            "eval_data.image_dir": str(tmp_path / "images"),
        }
    )
    result = _run_train(f"--model_dir={tmp_path / 'run'}", f"--params_override={overrides}")
    assert result.returncode == 2
    assert str(bad) in _one_error_line(result)


@pytest.mark.slow
def test_missing_data_path_is_rejected_with_the_key(tmp_path):
    overrides = json.dumps(
        {
            "train_data.source": "coco",
            "train_data.annotation_file": str(tmp_path / "nope.json"),
            "train_data.image_dir": str(tmp_path),
        }
    )
    result = _run_train(f"--model_dir={tmp_path / 'run'}", f"--params_override={overrides}")
    assert result.returncode == 2
    assert "train_data.annotation_file" in _one_error_line(result)


@pytest.mark.slow
def test_batch_not_divisible_by_replicas_is_rejected_with_the_key(tmp_path):
    overrides = _overrides(
        tmp_path,
        **{
            "train_data.global_batch_size": 3,
            "runtime.strategy": "mirrored",
            "runtime.num_logical_cpu_devices": 2,
        },
    )
    result = _run_train(f"--model_dir={tmp_path / 'run'}", f"--params_override={overrides}")
    assert result.returncode == 2
    assert "train_data.global_batch_size" in _one_error_line(result)
