r"""CPU latency of one detector in each runtime: SavedModel, ONNX Runtime, LiteRT float32 /
float16 / dynamic int8, batch 1, medians.

    python bench/export_runtimes.py --config=configs/cpu_demo.yaml --height=320 --width=512
    python bench/export_runtimes.py --config=configs/coco_r50_fpn_1x.yaml --height=800 \
        --width=1333 --rounds=2 --calls=3 --warmup=1 --workdir=/tmp/r50_exports

The model is built from the config with random weights (``--model_dir`` for a trained one):
latency, not accuracy. Every format is exported to ``--workdir`` (files already there are
reused). Each runtime then runs in a subprocess of its own (five R-50 runtimes in one process do
not fit in 16 GB): per round, one subprocess per format, in an order rotated every round, each
loading its file, making ``--warmup`` untimed and ``--calls`` timed calls on the same random
image. Threads: TensorFlow intra-op, ONNX Runtime intra-op and LiteRT ``num_threads`` (XNNPACK)
all ``--threads``. LiteRT's input is resized in NumPy (`fpn_tf.portable_client`), inside the
timed call as for ONNX Runtime and the SavedModel, whose graphs resize. Prints one JSON line per
format (median / min seconds, file size, CPU) and a Markdown table.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import emit_json_line  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/cpu_demo.yaml", "Config YAML (its eval_data.resize).")
flags.DEFINE_string("model_dir", None, "A trained model_dir instead of random weights.")
flags.DEFINE_integer("height", 320, "Image height.")
flags.DEFINE_integer("width", 512, "Image width.")
flags.DEFINE_integer("threads", 2, "Threads of every runtime.")
flags.DEFINE_integer("warmup", 2, "Untimed calls per subprocess.")
flags.DEFINE_integer("calls", 5, "Timed calls per subprocess.")
flags.DEFINE_integer("rounds", 2, "Subprocesses per format (alternated).")
flags.DEFINE_list(
    "formats",
    ["saved_model", "onnx", "litert_none", "litert_float16", "litert_dynamic_int8"],
    "Which runtimes.",
)
flags.DEFINE_string("workdir", None, "Where the exports go (default: a new temporary directory).")
flags.DEFINE_string("worker", None, "Internal: time FORMAT=PATH in this process.")
flags.DEFINE_string("output", None, "Append the JSON lines to this file.")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _paths(workdir):
    names = {"saved_model": "sm", "onnx": "m.onnx"}
    return {f: os.path.join(workdir, names.get(f, f"m_{f[7:]}.tflite")) for f in FLAGS.formats}


def _export(paths) -> None:
    from fpn_tf.configs import load_config  # pylint: disable=g-import-not-at-top
    from fpn_tf.data import synthetic  # pylint: disable=g-import-not-at-top
    from fpn_tf.data.category_map import CategoryMap  # pylint: disable=g-import-not-at-top
    from fpn_tf.modeling.factory import build_model  # pylint: disable=g-import-not-at-top
    from fpn_tf.modeling.model_dir import load_model  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving import export_saved_model  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving.litert_export import export_litert  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving.onnx_export import export_onnx  # pylint: disable=g-import-not-at-top

    todo = {f: p for f, p in paths.items() if not os.path.exists(p)}
    if not todo:
        return
    if FLAGS.model_dir:
        source = load_model(FLAGS.model_dir)
        model, category_map, config = source.model, source.category_map, source.config
    else:
        config = load_config(FLAGS.config)
        config.model.backbone.weights = None
        n = config.model.num_classes  # 0: the demo's generated categories
        ids = [{"id": i, "name": f"c{i}"} for i in range(1, n + 1)]
        category_map = CategoryMap(ids if n else synthetic.CATEGORIES)
        model = build_model(config.model, category_ids=list(category_map.dataset_ids))
    resize = config.eval_data.resize
    for fmt, path in todo.items():
        start = time.time()
        if fmt == "saved_model":
            export_saved_model(model, path, category_map, resize)
        elif fmt == "onnx":
            export_onnx(model, path, category_map, resize)
        else:
            export_litert(model, path, category_map, resize, quantization=fmt[len("litert_") :])
        print(f"exported {fmt} in {time.time() - start:.0f} s", flush=True)


def _worker(fmt: str, path: str) -> None:
    import numpy as np  # pylint: disable=g-import-not-at-top

    image = np.random.default_rng(0).integers(0, 255, (FLAGS.height, FLAGS.width, 3), np.uint8)
    if fmt == "saved_model":
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        fn = tf.saved_model.load(path).signatures["serving_default"]

        def run():
            return fn(images=tf.constant(image[None]))["num_detections"].numpy()

    else:
        from fpn_tf import portable_client  # pylint: disable=g-import-not-at-top

        detector = portable_client.load_detector(path, num_threads=FLAGS.threads)

        def run():
            return detector(image)["num_detections"]

    for _ in range(FLAGS.warmup):
        run()
    times = []
    for _ in range(FLAGS.calls):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print("TIMES " + json.dumps(times), flush=True)


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main(argv):
    del argv
    if FLAGS.worker:
        fmt, path = FLAGS.worker.split("=", 1)
        return _worker(fmt, path)
    import tempfile  # pylint: disable=g-import-not-at-top

    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="fpn_tf_bench_export_")
    os.makedirs(workdir, exist_ok=True)
    paths = _paths(workdir)
    _export(paths)
    args = [f"--{k}={getattr(FLAGS, k)}" for k in ("height", "width", "threads", "warmup", "calls")]
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    times = {fmt: [] for fmt in paths}
    order = list(paths)
    for r in range(FLAGS.rounds):
        for fmt in order[r % len(order) :] + order[: r % len(order)]:
            done = subprocess.run(
                [sys.executable, __file__, f"--worker={fmt}={paths[fmt]}", *args],
                capture_output=True,
                text=True,
                env=env,
            )
            lines = [l for l in done.stdout.splitlines() if l.startswith("TIMES ")]
            if done.returncode or not lines:
                raise RuntimeError(f"{fmt} failed: {done.stderr[-2000:]}")
            times[fmt] += json.loads(lines[-1][6:])
            print(f"round {r} {fmt}: {[round(t * 1e3) for t in times[fmt]]} ms", flush=True)
    cpu = _cpu_model()
    base = statistics.median(times["saved_model"]) if "saved_model" in times else None
    rows = []
    for fmt, ts in times.items():
        record = emit_json_line(
            {
                "bench": "export_runtimes",
                "format": fmt,
                "config": FLAGS.model_dir or FLAGS.config,
                "image": [FLAGS.height, FLAGS.width],
                "threads": FLAGS.threads,
                "median_s": statistics.median(ts),
                "min_s": min(ts),
                "calls": len(ts),
                "file_mb": _size(paths[fmt]) / 1e6,
                "cpu": cpu,
                "load_average": os.getloadavg()[0],
            },
            FLAGS.output,
        )
        ratio = f"{base / record['median_s']:.2f}x" if base else "-"
        rows.append(
            f"| {fmt} | {record['median_s'] * 1e3:.0f} | {record['min_s'] * 1e3:.0f} | "
            f"{ratio} | {record['file_mb']:.1f} |"
        )
    print(f"\n{cpu}, {FLAGS.height}x{FLAGS.width}, batch 1, {FLAGS.threads} threads")
    print("| format | median ms | min ms | speed vs SavedModel | file MB |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    app.run(main)
