"""tf.distribute on a CPU-only machine: MirroredStrategy over 4 logical CPU devices matches one
device; MultiWorkerMirroredStrategy with two local worker processes on loopback trains to
identical weights, the chief alone writes checkpoints and both workers resume from them."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from fpn_tf.data import synthetic
import watched

pytestmark = pytest.mark.slow  # subprocesses that each build and train the detector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# oneDNN's CPU kernels crash under concurrent replicas (fpn_tf.cli.configure_tensorflow_environment
# does the same for the command line).
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT, TF_ENABLE_ONEDNN_OPTS="0")


def test_mirrored_four_logical_devices_match_one_device(tmp_path):
    result = watched.run(
        [sys.executable, "tests/scripts/mirrored_step.py", str(tmp_path)], cwd=ROOT, env=ENV
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 4 and report["steps"] == [1, 1]
    for name, value in report["single"].items():
        assert report["mirrored"][name] == pytest.approx(value, rel=1e-4, abs=1e-7), name
    assert report["weights_allclose_rtol1e-4_atol1e-5"], report
    # Tight enough that a weight decay applied per replica (4x, as before the fix) fails.
    assert report["update_relative_diff"] < 1e-3, report


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _run_workers(data_dir, model_dir, out_dir, steps):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs, logs, files = [], [], []
    for index in range(2):
        env = dict(
            ENV,
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        )
        logs.append(os.path.join(out_dir, f"worker_{index}.log"))
        files.append(open(logs[-1], "w"))
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "tests/scripts/multiworker_worker.py",
                    data_dir,
                    model_dir,
                    out_dir,
                    str(steps),
                ],
                cwd=ROOT,
                env=env,
                stdout=files[-1],
                stderr=subprocess.STDOUT,
            )
        )
    # Either worker's output, checkpoints or CPU time is progress (one may wait on the other).
    watched.wait(procs, watch=logs + [model_dir])
    for f in files:
        f.close()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, open(log).read()[-3000:]
    reports = [json.load(open(os.path.join(out_dir, f"worker_{i}.json"))) for i in range(2)]
    weights = [np.load(os.path.join(out_dir, f"worker_{i}.npz")) for i in range(2)]
    return reports, weights


def test_two_workers_on_loopback_train_identical_weights_and_resume(tmp_path):
    data_dir = str(tmp_path / "synthetic")
    synthetic.generate_split(data_dir, "train", 8, seed=0, image_size=(96, 160))
    synthetic.generate_split(
        data_dir, "val", 4, seed=1, image_size=(96, 160), first_image_id=10_000_000
    )
    model_dir = str(tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    reports, weights = _run_workers(data_dir, model_dir, str(out), steps=3)
    assert [r["chief"] for r in reports] == [True, False]
    assert all(r["replicas"] == 2 and r["end_step"] == 3 for r in reports)
    for a, b in zip(weights[0].values(), weights[1].values()):
        np.testing.assert_array_equal(a, b)
    # Only the chief's checkpoints are in model_dir; no worker scratch is left.
    names = sorted(os.listdir(model_dir))
    assert "checkpoint" in names and any(n.startswith("ckpt-3") for n in names)
    assert not [n for n in names if n.startswith(".worker_")]

    # Both workers resume from the chief's checkpoint and go on.
    reports, weights = _run_workers(data_dir, model_dir, str(out), steps=5)
    assert all(r["start_step"] == 3 and r["end_step"] == 5 for r in reports)
    for a, b in zip(weights[0].values(), weights[1].values()):
        np.testing.assert_array_equal(a, b)
