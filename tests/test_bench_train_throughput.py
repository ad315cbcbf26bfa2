"""bench/train_throughput.py: variant names, the trainer's log parsed into images/s."""

import pytest

from bench import train_throughput as tt

# Lines as TF 2.20 and the trainer print them (from a run on an H200).
GPU_LINE = (
    "I0000 00:00:1795668872.686675     706 gpu_device.cc:2020] Created device "
    "/job:localhost/replica:0/task:0/device:GPU:0 with 140829 MB memory:  -> device: 0, "
    "name: NVIDIA H200, pci bus id: 0000:00:06.0, compute capability: 9.0"
)
OLD_GPU_LINE = (
    "Created device /job:localhost/replica:0/task:0/device:GPU:0 with 30000 MB "
    "memory) -> physical GPU (device: 0, name: Tesla V100-SXM2-32GB, pci bus id: 0)"
)


def step_line(step, rate):
    return (
        f"I1126 04:56:45.762190 139913433462080 trainer.py:292] step {step}/30  loss 2.1389 "
        f"(rpn obj 0.5687 box 0.4012 | frcnn cls 1.1552 box 0.0137)  lr 2.75e-05  "
        f"{rate:.2f} img/s  eta 0:00:02"
    )


FP32_LOG = "\n".join(
    [
        GPU_LINE,
        step_line(10, 1.5),
        step_line(20, 20.0),
        step_line(30, 22.0),
        "I1126 trainer.py:313] Trained 30 steps in 0:00:30 (1.97 img/s)",
    ]
)
# float16: the loss scale overflows first; those batches leave the step at 0 (logged by the
# trainer before it learnt to skip them) and land in the window that ends at step 10.
FP16_LOG = "\n".join(
    [
        step_line(0, 0.10),
        step_line(0, 2.93),
        step_line(10, 15.04),
        step_line(20, 27.81),
        step_line(30, 27.22),
    ]
)


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
    parsed = tt.parse_log(FP32_LOG)
    assert parsed["windows"] == [(10, 1.5), (20, 20.0), (30, 22.0)]
    assert parsed["gpu"] == "NVIDIA H200"
    assert tt.parse_log(OLD_GPU_LINE)["gpu"] == "Tesla V100-SXM2-32GB"
    summary = tt.summarize(parsed["windows"], batch=2, log_every=10)
    # The first window (trace) is left out of the median; it took 10 steps * 2 images / 1.5.
    assert summary["images_per_s"] == pytest.approx(21.0)
    assert summary["steady_windows"] == [20.0, 22.0]
    assert summary["first_window_s"] == pytest.approx(13.3)


def test_float16_overflow_windows_are_left_out():
    summary = tt.summarize(tt.parse_log(FP16_LOG)["windows"], batch=2, log_every=10)
    assert summary["steady_windows"] == [27.81, 27.22]
    assert summary["images_per_s"] == pytest.approx(27.515)
    assert summary["first_window_s"] is None  # the trace is in the step-0 windows


def test_too_few_windows_is_an_error_not_a_rate():
    assert "error" in tt.summarize([(10, 3.0)], batch=2, log_every=10)
    assert "gpu" not in tt.parse_log("no device lines here")


def test_records_from_a_folder_of_logs(tmp_path):
    (tmp_path / "train_b2_fp32.log").write_text(FP32_LOG)
    (tmp_path / "train_b8_fp16_xla.log").write_text("killed while compiling")
    (tmp_path / "notes.txt").write_text("not a log")
    records = tt.records_from_logs(str(tmp_path), strategy="mirrored", log_every=10)
    assert [(r["batch"], r["variant"]) for r in records] == [(2, "fp32"), (8, "fp16_xla")]
    assert records[0]["images_per_s"] == pytest.approx(21.0) and "error" not in records[0]
    assert records[0]["gpu"] == "NVIDIA H200" and records[0]["strategy"] == "mirrored"
    assert records[1]["error"].startswith("exit unfinished") and "images_per_s" not in records[1]
    assert records[1]["mixed_precision"] == "float16" and records[1]["jit_compile"] is True
