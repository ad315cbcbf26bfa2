r"""Held-out AP of a trained model after export: SavedModel, ONNX Runtime, LiteRT float32 /
float16 / dynamic int8, all scored by the project's `COCOEvaluator` on the run's eval split.

    python bench/export_ap.py --model_dir=runs/cpu_demo

Every held-out image (``eval_data.annotation_file`` / ``image_dir`` of the run's params.yaml) is
decoded with PIL and run through each format at batch 1 (LiteRT's input resized by
`fpn_tf.portable_client`). Prints one JSON line per format (AP, AP50, mask AP for a Mask R-CNN)
and a Markdown table. `format_ap` is what tests/test_export_runtimes.py calls.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import emit_json_line  # noqa: E402  pylint: disable=wrong-import-position

FORMATS = ("saved_model", "onnx", "litert_none", "litert_float16", "litert_dynamic_int8")


def format_ap(source, formats=FORMATS, max_images=None, num_threads=2, workdir=None):
    """``{format: (metrics, seconds_per_image)}`` of a `fpn_tf.load_model` result on its config's
    eval split; ``metrics`` are `COCOEvaluator.evaluate`'s (``AP``, ``AP50``, ``mask_AP``, ...)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from fpn_tf import portable_client  # pylint: disable=g-import-not-at-top
    from fpn_tf.evaluation.coco_evaluator import COCOEvaluator  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving import export_saved_model  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving.litert_export import export_litert  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving.onnx_export import export_onnx  # pylint: disable=g-import-not-at-top

    d = source.config.eval_data
    resize = d.resize
    tmp = workdir or tempfile.mkdtemp(prefix="fpn_tf_export_ap_")
    model, cmap = source.model, source.category_map
    runners = {}
    for fmt in formats:
        if fmt == "saved_model":
            sm = tf.saved_model.load(
                export_saved_model(model, os.path.join(tmp, "sm"), cmap, resize)
            )
            signature = sm.signatures["serving_default"]
            runners[fmt] = lambda image, s=signature: {
                k: v.numpy() for k, v in s(images=tf.constant(image[None])).items()
            }
        elif fmt == "onnx":
            path = export_onnx(model, os.path.join(tmp, "m.onnx"), cmap, resize)
            runners[fmt] = portable_client.OnnxDetector(path, num_threads=num_threads)
        elif fmt.startswith("litert_"):
            q = fmt[len("litert_") :]
            path = os.path.join(tmp, f"m_{q}.tflite")
            export_litert(model, path, cmap, resize, quantization=q)
            runners[fmt] = portable_client.LiteRTDetector(path, num_threads=num_threads)
        else:
            raise ValueError(f"unknown format {fmt}")
    with open(d.annotation_file, encoding="utf-8") as f:
        images = json.load(f)["images"][:max_images]
    evaluators = {fmt: COCOEvaluator(d.annotation_file) for fmt in runners}
    seconds = {fmt: 0.0 for fmt in runners}
    for entry in images:
        pixels = np.asarray(
            Image.open(os.path.join(d.image_dir, entry["file_name"])).convert("RGB")
        )
        h, w = pixels.shape[:2]
        for fmt, run in runners.items():
            start = time.time()
            out = run(pixels)
            seconds[fmt] += time.time() - start
            pred = {
                "image_id": np.array([entry["id"]]),
                "detection_boxes": np.asarray(out["detection_boxes"]) * np.array([h, w, h, w]),
                "detection_scores": np.asarray(out["detection_scores"]),
                "detection_classes": np.asarray(out["detection_classes"]),
                "num_detections": np.asarray(out["num_detections"]),
            }
            if "detection_masks" in out:
                pred["detection_masks"] = np.asarray(out["detection_masks"])
                pred["original_size"] = np.array([[h, w]])
            evaluators[fmt].update_state(pred)
    n = max(1, len(images))
    return {fmt: (ev.evaluate(), seconds[fmt] / n) for fmt, ev in evaluators.items()}


def main(argv):
    del argv
    from fpn_tf.modeling.model_dir import load_model  # pylint: disable=g-import-not-at-top

    results = format_ap(load_model(FLAGS.model_dir), FLAGS.formats, FLAGS.max_images)
    rows, base = [], None
    for fmt, (metrics, seconds) in results.items():
        record = emit_json_line(
            {
                "bench": "export_ap",
                "format": fmt,
                "model_dir": FLAGS.model_dir,
                "AP": metrics["AP"],
                "AP50": metrics["AP50"],
                "mask_AP": metrics.get("mask_AP"),
                "seconds_per_image": seconds,
            },
            FLAGS.output,
        )
        base = record["AP"] if base is None else base
        mask = "-" if record["mask_AP"] is None else f"{record['mask_AP']:.5f}"
        rows.append(
            f"| {fmt} | {record['AP']:.5f} | {record['AP'] - base:+.5f} | {record['AP50']:.4f} "
            f"| {mask} | {seconds:.3f} |"
        )
    print(f"\nheld-out images of {FLAGS.model_dir}")
    print("| format | box AP | vs first row | AP50 | mask AP | s / image |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    flags.DEFINE_string("model_dir", None, "The trained run's directory.")
    flags.DEFINE_list("formats", list(FORMATS), "Which formats.")
    flags.DEFINE_integer("max_images", None, "Score only the first N held-out images.")
    flags.DEFINE_string("output", None, "Append the JSON lines to this file.")
    flags.mark_flag_as_required("model_dir")
    app.run(main)
