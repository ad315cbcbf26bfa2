"""bench/train_throughput.py: variant names, the trainer's log parsed into images/s."""

import pytest

from bench import train_throughput as tt

LOG = """\
2026-11-26 05:01:02.1: I external/local_xla/xla/stream_executor/cuda/cuda_executor.cc] ...
I1126 05:01:03 gpu_device.cc:2020] Created device /job:localhost/replica:0/task:0/device:GPU:0 with 138000 MB memory) -> physical GPU (device: 0, name: NVIDIA H200, pci bus id: 0000:00:05.0, compute capability: 9.0)
I1126 05:02:00 trainer.py:292] step 10/30  loss 5.1 (rpn obj 0.6 box 0.1 | frcnn cls 4.2 box 0.1)  lr 1e-05  1.50 img/s  eta 0:00:20
I1126 05:02:10 trainer.py:292] step 20/30  loss 3.1 (rpn obj 0.5 box 0.1 | frcnn cls 2.2 box 0.1)  lr 2e-05  20.00 img/s  eta 0:00:01
I1126 05:02:11 trainer.py:292] step 30/30  loss 2.1 (rpn obj 0.4 box 0.1 | frcnn cls 1.2 box 0.1)  lr 3e-05  22.00 img/s  eta 0:00:00
"""


def test_parse_variant():
    assert tt.parse_variant("fp32") == ("float32", False)
    assert tt.parse_variant("xla") == ("float32", True)
    assert tt.parse_variant("fp16_xla") == ("float16", True)
    assert tt.parse_variant("bf16") == ("bfloat16", False)
    with pytest.raises(ValueError, match="unknown variant 'fp8'"):
        tt.parse_variant("fp8")
    with pytest.raises(ValueError, match="unknown variant"):
        tt.parse_variant("fp16_bf16")


def test_log_parsed_into_windows_gpu_and_steady_rate():
    parsed = tt.parse_log(LOG)
    assert parsed["windows"] == [(10, 1.5), (20, 20.0), (30, 22.0)]
    assert parsed["gpu"] == "NVIDIA H200"
    summary = tt.summarize(parsed["windows"], batch=2, log_every=10)
    # The first window (trace) is left out of the median; it took 10 steps * 2 images / 1.5.
    assert summary["images_per_s"] == pytest.approx(21.0)
    assert summary["steady_windows"] == [20.0, 22.0]
    assert summary["first_window_s"] == pytest.approx(13.3)


def test_one_window_is_an_error_not_a_rate():
    assert "error" in tt.summarize([(10, 3.0)], batch=2, log_every=10)
    assert "gpu" not in tt.parse_log("no device lines here")
