r"""CPU latency of one detector in each runtime: SavedModel, ONNX Runtime, LiteRT float32 /
float16 / dynamic int8, batch 1, one process, calls alternated (round robin), medians.

    python bench/export_runtimes.py --config=configs/cpu_demo.yaml --height=320 --width=512
    python bench/export_runtimes.py --config=configs/coco_r50_fpn_1x.yaml --height=800 --width=1333

The model is built from the config with random weights (``--model_dir`` for a trained one):
latency, not accuracy. Every file is exported to a temporary directory; the LiteRT input size is
the image size (no letterbox). Threads: TensorFlow intra-op ``--threads``, ONNX Runtime
intra-op ``--threads``, LiteRT ``num_threads=--threads`` (XNNPACK). Prints one JSON line per
format (median / min seconds, file size) and a Markdown table.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import emit_json_line  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/cpu_demo.yaml", "Config YAML (its eval_data resize rule).")
flags.DEFINE_string("model_dir", None, "A trained model_dir instead of random weights.")
flags.DEFINE_integer("height", 320, "Image height.")
flags.DEFINE_integer("width", 512, "Image width.")
flags.DEFINE_integer("threads", 2, "Threads of every runtime.")
flags.DEFINE_integer("warmup", 2, "Untimed calls per format.")
flags.DEFINE_integer("rounds", 10, "Timed rounds (one call per format each).")
flags.DEFINE_list(
    "formats",
    ["saved_model", "onnx", "litert_none", "litert_float16", "litert_dynamic_int8"],
    "Which runtimes.",
)
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


def main(argv):
    del argv
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from fpn_tf import portable_client  # pylint: disable=g-import-not-at-top
    from fpn_tf.configs import load_config  # pylint: disable=g-import-not-at-top
    from fpn_tf.data.category_map import CategoryMap  # pylint: disable=g-import-not-at-top
    from fpn_tf.modeling.factory import build_model  # pylint: disable=g-import-not-at-top
    from fpn_tf.modeling.model_dir import load_model  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving import export_saved_model  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving.litert_export import export_litert  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving.onnx_export import export_onnx  # pylint: disable=g-import-not-at-top

    if FLAGS.model_dir:
        source = load_model(FLAGS.model_dir)
        model, category_map, config = source.model, source.category_map, source.config
    else:
        config = load_config(FLAGS.config)
        config.model.backbone.weights = None
        from fpn_tf.data import synthetic  # pylint: disable=g-import-not-at-top

        n = config.model.num_classes  # 0: the demo's generated categories
        category_map = CategoryMap(
            [{"id": i, "name": f"c{i}"} for i in range(1, n + 1)] if n else synthetic.CATEGORIES
        )
        model = build_model(config.model, category_ids=list(category_map.dataset_ids))
    d = config.eval_data
    rule = dict(
        short_side=d.short_side,
        max_long_side=d.max_long_side,
        pad_multiple=d.pad_multiple,
        resize_rounding=d.resize_rounding,
    )
    image = np.random.default_rng(0).integers(0, 255, (FLAGS.height, FLAGS.width, 3), np.uint8)
    tmp = tempfile.mkdtemp(prefix="fpn_tf_bench_export_")
    runners, sizes, export_s = {}, {}, {}
    for fmt in FLAGS.formats:
        start = time.time()
        if fmt == "saved_model":
            path = export_saved_model(model, os.path.join(tmp, "sm"), category_map, **rule)
            fn = tf.saved_model.load(path).signatures["serving_default"]
            runners[fmt] = lambda fn=fn: fn(images=tf.constant(image[None]))["num_detections"]
            sizes[fmt] = sum(
                os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs
            )
        elif fmt == "onnx":
            path = export_onnx(model, os.path.join(tmp, "m.onnx"), category_map, **rule)
            det = portable_client.OnnxDetector(path, num_threads=FLAGS.threads)
            runners[fmt] = lambda det=det: det(image)["num_detections"]
            sizes[fmt] = os.path.getsize(path)
        elif fmt.startswith("litert_"):
            q = fmt[len("litert_") :]
            path = export_litert(
                model,
                os.path.join(tmp, f"m_{q}.tflite"),
                category_map,
                **rule,
                image_size=(FLAGS.height, FLAGS.width),
                quantization=q,
            )
            det = portable_client.LiteRTDetector(path, num_threads=FLAGS.threads)
            runners[fmt] = lambda det=det: det(image)["num_detections"]
            sizes[fmt] = os.path.getsize(path)
        else:
            raise app.UsageError(f"unknown format {fmt}")
        export_s[fmt] = time.time() - start
        print(f"exported {fmt} in {export_s[fmt]:.1f} s ({sizes[fmt] / 1e6:.1f} MB)", flush=True)
    for _ in range(FLAGS.warmup):
        for run in runners.values():
            run()
    times = {fmt: [] for fmt in runners}
    for _ in range(FLAGS.rounds):
        for fmt, run in runners.items():
            start = time.perf_counter()
            run()
            times[fmt].append(time.perf_counter() - start)
    cpu = _cpu_model()
    base = statistics.median(times["saved_model"]) if "saved_model" in times else None
    rows = []
    for fmt, ts in times.items():
        record = {
            "bench": "export_runtimes",
            "format": fmt,
            "config": FLAGS.config if not FLAGS.model_dir else FLAGS.model_dir,
            "image": [FLAGS.height, FLAGS.width],
            "threads": FLAGS.threads,
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "rounds": len(ts),
            "file_mb": sizes[fmt] / 1e6,
            "cpu": cpu,
        }
        record = emit_json_line(record, FLAGS.output)
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
