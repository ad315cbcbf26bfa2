r"""Training images/s of the real trainer (``python -m fpn_tf.train``), per batch size and option.

    python bench/train_throughput.py --batch_sizes=2,8 --variants=fp32,fp16,xla,fp16_xla \
        --strategy=mirrored --total_steps=40 --log_every_steps=10 --output=/tmp/train.jsonl

Each variant is one ``python -m fpn_tf.train --mode=train --export=false`` subprocess on the
paper's config (``configs/coco_r50_fpn_1x.yaml``: R50-FPN, 2000 proposals, 512 RoIs/image, SGD)
with random backbone weights and a generated COCO-format set of ``--num_images`` images whose
sides are drawn from ``--image_size`` (default 800-1333 px, then resized like COCO: shorter side
800, longer <= 1333). The set is generated once and shared by all variants. Its 4 categories make
the box head's last layers 5-way instead of COCO's 81-way (a fraction of a percent of the FLOPs).

The trainer logs its images/s every ``--log_every_steps`` steps; the first window holds the
tf.function trace (and XLA compile, cuDNN autotuning), so the reported ``images_per_s`` is the
median of the later windows, and ``first_window_s`` how long the first took. Variants:
``fp32``, ``fp16`` (mixed_float16 with loss scaling), ``bf16`` (mixed_bfloat16), and any of them
with ``_xla`` (``--jit_compile``). One JSON line per (batch size, variant) on stdout and in
``--output``; a failed run gives a line with ``error`` (its last log line) and the full log in
``--run_logs``.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import emit_json_line  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined on run, not on import: tests import the parsing helpers beside other benches
    that define flags of the same names."""
    flags.DEFINE_list("batch_sizes", ["2", "8"], "Global batch sizes.")
    flags.DEFINE_list(
        "variants",
        ["fp32", "fp16", "xla", "fp16_xla"],
        "fp32 | fp16 | bf16, each optionally with _xla; 'xla' = fp32 with XLA.",
    )
    flags.DEFINE_enum("strategy", "mirrored", ["one_device", "mirrored"], "Distribution strategy.")
    flags.DEFINE_string(
        "config_file",
        os.path.join(ROOT, "configs", "coco_r50_fpn_1x.yaml"),
        "Experiment config (the paper's by default).",
    )
    flags.DEFINE_integer("total_steps", 40, "Steps per variant (the first log window is warm-up).")
    flags.DEFINE_integer("log_every_steps", 10, "Steps per images/s window.")
    flags.DEFINE_integer("num_images", 64, "Images in the generated training set.")
    flags.DEFINE_list("image_size", ["800", "1333"], "Generated image sides: [min, max] pixels.")
    flags.DEFINE_integer("short_side", 800, "Resize: shorter side.")
    flags.DEFINE_integer("max_long_side", 1333, "Resize: longest side cap.")
    flags.DEFINE_integer("timeout_s", 900, "Per-variant time limit.")
    flags.DEFINE_string("workdir", None, "Generated data and model dirs (default: a temp folder).")
    flags.DEFINE_string("run_logs", None, "Keep each variant's full log here.")
    flags.DEFINE_string("output", None, "Append the JSON lines to this file.")
    flags.DEFINE_string(
        "from_logs",
        None,
        "Run nothing: summarize the train_b<N>_<variant>.log "
        "files a --run_logs folder holds (e.g. copied back from a GPU machine).",
    )


PRECISION = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
WINDOW_RE = re.compile(r"step (\d+)/(\d+) .* ([0-9.]+) img/s")
# TF 2.20: "... device:GPU:0 with 140829 MB memory:  -> device: 0, name: NVIDIA H200, pci ..."
# (older: "... MB memory) -> physical GPU (device: 0, name: ...").
DEVICE_RE = re.compile(
    r"device:GPU:\d+ with (\d+) MB memory\)?:?\s*-> (?:physical GPU \()?"
    r"device: \d+, name: ([^,]+)"
)


def parse_variant(name: str) -> tuple[str, bool]:
    """'fp16_xla' -> ('float16', True); 'xla' -> ('float32', True)."""
    parts = name.split("_")
    xla = "xla" in parts
    rest = [p for p in parts if p != "xla"] or ["fp32"]
    if len(rest) != 1 or rest[0] not in PRECISION:
        raise ValueError(
            f"--variants: unknown variant {name!r}; use fp32, fp16, bf16, "
            "each optionally with _xla"
        )
    return PRECISION[rest[0]], xla


def parse_log(text: str) -> dict:
    """images/s windows (step, rate), and the GPU name if TF logged one."""
    windows = [(int(m.group(1)), float(m.group(3))) for m in WINDOW_RE.finditer(text)]
    out = {"windows": windows}
    gpu = DEVICE_RE.search(text)
    if gpu:
        out["gpu"] = gpu.group(2).strip()
    return out


def summarize(windows: list[tuple[int, float]], batch: int, log_every: int) -> dict:
    """Median images/s over the windows that end at step >= 2 * log_every.

    The window ending at step log_every holds the trace (XLA compile, cuDNN autotuning). With
    float16 the loss scale first overflows a few times; those batches do not move the step, so
    the first counted window holds them too. Both are left out of the median."""
    steady = [rate for step, rate in windows if step >= 2 * log_every]
    if not steady:
        return {"error": f"no images/s window past step {2 * log_every} (got {windows})"}
    # How long the trace took, when the first logged window holds it (not after overflows).
    first = windows[0][1] if windows[0][0] == log_every else 0.0
    return {
        "images_per_s": round(statistics.median(steady), 3),
        "steady_windows": [round(r, 3) for r in steady],
        "first_window_s": round(log_every * batch / first, 1) if first > 0 else None,
    }


def data_override(workdir: str, batch: int) -> dict:
    lo, hi = (int(v) for v in FLAGS.image_size)
    return {
        "model": {"num_classes": 0, "backbone": {"weights": None}},
        "train_data": {
            "source": "synthetic",
            "annotation_file": None,
            "image_dir": None,
            "resize": {"short_side": FLAGS.short_side, "max_long_side": FLAGS.max_long_side},
            "global_batch_size": batch,
            "synthetic": {
                "num_images": FLAGS.num_images,
                "image_size": [lo, hi],
                "seed": 0,
                "output_dir": os.path.join(workdir, "data"),
            },
        },
        # Not read in --mode=train, but validated: point it at a small generated split.
        "eval_data": {
            "source": "synthetic",
            "annotation_file": None,
            "image_dir": None,
            "synthetic": {
                "num_images": 2,
                "image_size": [lo, hi],
                "seed": 1,
                "output_dir": os.path.join(workdir, "data"),
            },
        },
        "train": {
            "total_steps": FLAGS.total_steps,
            "log_every_steps": FLAGS.log_every_steps,
            "summary_every_steps": FLAGS.total_steps,
            "checkpoint_every_steps": FLAGS.total_steps,
        },
    }


def record_from_log(
    text: str, rc, batch: int, variant: str, *, strategy: str, log_every: int, wall_s=None
) -> dict:
    """One JSON record from a variant's log (rc: its exit status; 0 = it finished)."""
    precision, xla = parse_variant(variant)
    parsed = parse_log(text)
    record = {
        "what": "train_throughput",
        "batch": batch,
        "variant": variant,
        "mixed_precision": precision,
        "jit_compile": xla,
        "strategy": strategy,
        "gpu": parsed.get("gpu", "none"),
        "wall_s": wall_s,
    }
    if rc != 0:
        lines = [l for l in text.strip().splitlines() if l.strip()]
        record["error"] = f"exit {rc}: {lines[-1][:300] if lines else 'no output'}"
    if rc == 0 or parsed["windows"]:
        record.update(summarize(parsed["windows"], batch, log_every))
    return record


LOG_NAME_RE = re.compile(r"train_b(\d+)_(\w+)\.log$")


def records_from_logs(folder: str, *, strategy: str, log_every: int) -> list[dict]:
    """Records from the train_b<N>_<variant>.log files of a --run_logs folder."""
    out = []
    for name in sorted(os.listdir(folder)):
        m = LOG_NAME_RE.match(name)
        if m:
            with open(os.path.join(folder, name)) as f:
                text = f.read()
            rc = 0 if "Trained " in text else "unfinished"
            out.append(
                {
                    **record_from_log(
                        text,
                        rc,
                        int(m.group(1)),
                        m.group(2),
                        strategy=strategy,
                        log_every=log_every,
                    ),
                    "from_log": name,
                }
            )
    return out


def _decoded(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def run_variant(workdir: str, batch: int, variant: str) -> dict:
    precision, xla = parse_variant(variant)
    model_dir = os.path.join(workdir, f"b{batch}_{variant}")
    cmd = [
        sys.executable,
        "-m",
        "fpn_tf.train",
        f"--config_file={FLAGS.config_file}",
        f"--params_override={json.dumps(data_override(workdir, batch))}",
        f"--model_dir={model_dir}",
        "--mode=train",
        "--export=false",
        f"--strategy={FLAGS.strategy}",
        f"--mixed_precision={precision}",
        f"--jit_compile={str(xla).lower()}",
    ]
    logging.info("b%d %s: %s", batch, variant, " ".join(cmd[1:4]) + " ...")
    start = time.time()
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    )
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=FLAGS.timeout_s
        )
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = _decoded(e.stdout) + _decoded(e.stderr), "timeout"
    if FLAGS.run_logs:
        os.makedirs(FLAGS.run_logs, exist_ok=True)
        with open(os.path.join(FLAGS.run_logs, f"train_b{batch}_{variant}.log"), "w") as f:
            f.write(text)
    return record_from_log(
        text,
        rc,
        batch,
        variant,
        strategy=FLAGS.strategy,
        log_every=FLAGS.log_every_steps,
        wall_s=round(time.time() - start, 1),
    )


def emit(record: dict) -> None:
    emit_json_line(record, FLAGS.output)


def main(argv):
    del argv
    try:
        batches = [int(b) for b in FLAGS.batch_sizes]
        for v in FLAGS.variants:
            parse_variant(v)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if FLAGS.total_steps < 2 * FLAGS.log_every_steps:
        raise app.UsageError(
            f"--total_steps={FLAGS.total_steps} gives fewer than two images/s "
            f"windows of --log_every_steps={FLAGS.log_every_steps}"
        )
    if FLAGS.from_logs:
        records = records_from_logs(
            FLAGS.from_logs, strategy=FLAGS.strategy, log_every=FLAGS.log_every_steps
        )
        if not records:
            raise app.UsageError(
                f"--from_logs={FLAGS.from_logs}: no train_b<N>_<variant>.log " "files there"
            )
        for record in records:
            emit(record)
        return
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="fpn_train_bench_")
    logging.info("workdir %s", workdir)
    for batch in batches:
        for variant in FLAGS.variants:
            emit(run_variant(workdir, batch, variant))


if __name__ == "__main__":
    define_flags()
    app.run(main)
