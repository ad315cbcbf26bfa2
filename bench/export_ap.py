r"""Held-out AP of a trained model after export: SavedModel, ONNX Runtime, LiteRT float32 /
float16 / dynamic int8, all scored by the project's `COCOEvaluator` on the run's eval split.

    python bench/export_ap.py --model_dir=runs/cpu_demo

Every held-out image (``eval_data.annotation_file`` / ``image_dir`` of the run's params.yaml) is
decoded with PIL and run through each format at batch 1. LiteRT gets the image letterboxed into
its fixed input (``eval_data.short_side`` x ``max_long_side``); ``saved_model_letterboxed``
scores the SavedModel on those same letterboxed inputs, the like-for-like reference of LiteRT.
Prints one JSON line per format (AP, AP50, mask AP for a Mask R-CNN) and a Markdown table.
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

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "The trained run's directory.")
flags.DEFINE_list(
    "formats",
    [
        "saved_model",
        "onnx",
        "saved_model_letterboxed",
        "litert_none",
        "litert_float16",
        "litert_dynamic_int8",
    ],
    "Which formats.",
)
flags.DEFINE_integer("max_images", None, "Score only the first N held-out images.")
flags.DEFINE_string("output", None, "Append the JSON lines to this file.")
flags.mark_flag_as_required("model_dir")


def main(argv):
    del argv
    import numpy as np  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from fpn_tf import portable_client  # pylint: disable=g-import-not-at-top
    from fpn_tf.evaluation.coco_evaluator import COCOEvaluator  # pylint: disable=g-import-not-at-top
    from fpn_tf.modeling.model_dir import load_model  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving import export_saved_model  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving.litert_export import export_litert  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving.onnx_export import export_onnx  # pylint: disable=g-import-not-at-top

    source = load_model(FLAGS.model_dir)
    d = source.config.eval_data
    rule = dict(
        short_side=d.short_side,
        max_long_side=d.max_long_side,
        pad_multiple=d.pad_multiple,
        resize_rounding=d.resize_rounding,
    )
    size = (d.short_side, d.max_long_side)
    tmp = tempfile.mkdtemp(prefix="fpn_tf_export_ap_")
    sm = tf.saved_model.load(
        export_saved_model(source.model, os.path.join(tmp, "sm"), source.category_map, **rule)
    ).signatures["serving_default"]

    def saved_model(image):
        return {k: v.numpy() for k, v in sm(images=tf.constant(image[None])).items()}

    def saved_model_letterboxed(image):
        canvas, scale = portable_client.letterbox(image, size)
        out = saved_model(canvas)
        out["detection_boxes"] = portable_client.unletterbox_boxes(
            out["detection_boxes"], image.shape[:2], size, scale
        )
        return out

    runners = {}
    for fmt in FLAGS.formats:
        if fmt == "saved_model":
            runners[fmt] = saved_model
        elif fmt == "saved_model_letterboxed":
            runners[fmt] = saved_model_letterboxed
        elif fmt == "onnx":
            path = export_onnx(
                source.model, os.path.join(tmp, "m.onnx"), source.category_map, **rule
            )
            runners[fmt] = portable_client.OnnxDetector(path, num_threads=2)
        elif fmt.startswith("litert_"):
            q = fmt[len("litert_") :]
            path = export_litert(
                source.model,
                os.path.join(tmp, f"m_{q}.tflite"),
                source.category_map,
                **rule,
                quantization=q,
            )
            runners[fmt] = portable_client.LiteRTDetector(path, num_threads=2)
        else:
            raise app.UsageError(f"unknown format {fmt}")
    with open(d.annotation_file, encoding="utf-8") as f:
        images = json.load(f)["images"]
    if FLAGS.max_images:
        images = images[: FLAGS.max_images]
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
    rows = []
    base = None
    for fmt, ev in evaluators.items():
        metrics = ev.evaluate()
        record = {
            "bench": "export_ap",
            "format": fmt,
            "model_dir": FLAGS.model_dir,
            "num_images": len(images),
            "AP": metrics["AP"],
            "AP50": metrics["AP50"],
            "mask_AP": metrics.get("mask_AP"),
            "seconds_per_image": seconds[fmt] / max(1, len(images)),
        }
        record = emit_json_line(record, FLAGS.output)
        base = base if base is not None else record["AP"]
        mask = "-" if record["mask_AP"] is None else f"{record['mask_AP']:.4f}"
        rows.append(
            f"| {fmt} | {record['AP']:.4f} | {record['AP'] - base:+.4f} | {record['AP50']:.4f} "
            f"| {mask} |"
        )
    print(f"\n{len(images)} held-out images of {FLAGS.model_dir}")
    print("| format | box AP | vs first row | AP50 | mask AP |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    app.run(main)
