r"""Runs an exported model (SavedModel, ``.onnx`` or ``.tflite``) on image files.

    python -m fpn_tf.predict --saved_model=exports/fpn/1 --image=a.jpg --output_dir=predictions

writes ``<output_dir>/<name>_detections.png`` (boxes, class names, scores drawn) and
``<name>_detections.json`` per image. Bad inputs end the run with one line (exit code 2).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string(
        "saved_model",
        None,
        "The exported SavedModel directory, or an exported .onnx / .tflite file.",
    )
    flags.DEFINE_multi_string("image", None, "An image file (repeat the flag for more).")
    flags.DEFINE_string("output_dir", None, "Where the drawn PNGs and the JSON files go.")
    flags.DEFINE_float(
        "min_score",
        0.3,
        "Detections with a lower score are left out.",
        lower_bound=0.0,
        upper_bound=1.0,
    )
    flags.DEFINE_enum(
        "signature",
        "auto",
        ["auto", "image_bytes", "serving_default"],
        "Which signature runs the images: auto = image_bytes for JPEG/PNG/GIF/BMP "
        "files, serving_default (pixels decoded here) otherwise.",
    )
    flags.mark_flags_as_required(["saved_model", "image", "output_dir"])


def _output_stems(paths):
    """One output name per input: its file name without extension, made unique."""
    stems, seen = [], {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def predict(
    saved_model: str, images, output_dir: str, min_score: float = 0.3, signature: str = "auto"
) -> list[dict]:
    """Runs the model on ``images`` and writes the PNG + JSON files; returns the JSON dicts."""
    from fpn_tf.serving import inference  # pylint: disable=g-import-not-at-top

    # Every input is checked before the (slow) model load.
    decoded = [inference.read_image(path) for path in images]
    if os.fspath(saved_model).lower().endswith((".onnx", ".tflite")):
        from fpn_tf.serving.portable_inference import PortableDetector  # pylint: disable=g-import-not-at-top

        detector = PortableDetector(saved_model)
    else:
        detector = inference.SavedModelDetector(saved_model, signature=signature)
    logging.info(
        "Loaded %s in %.1f s (signatures: %s; %d class names)",
        saved_model,
        detector.load_seconds,
        ", ".join(sorted(detector.signatures)),
        len(detector.class_names),
    )
    os.makedirs(output_dir, exist_ok=True)
    results = []
    for path, stem, (data, image) in zip(images, _output_stems(images), decoded):
        result = detector.detect(data, image, path)
        kept = result.filter(min_score)
        png = os.path.join(output_dir, f"{stem}_detections.png")
        inference.draw_detections(image, kept.detections).save(png)
        record = dict(
            kept.to_json(),
            min_score=min_score,
            num_detections_below_min_score=len(result.detections) - len(kept.detections),
            drawn=png,
        )
        json_path = os.path.join(output_dir, f"{stem}_detections.json")
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        logging.info(
            "%s (%dx%d, %s): %d detection(s) with score >= %.2f of %d, %.2f s -> %s, " "%s",
            path,
            image.width,
            image.height,
            result.signature,
            len(kept.detections),
            min_score,
            len(result.detections),
            result.seconds,
            png,
            json_path,
        )
        for d in kept.detections:
            logging.info(
                "  %s (id %d) %.3f at y0=%.0f x0=%.0f y1=%.0f x1=%.0f",
                d.class_name,
                d.class_id,
                d.score,
                *d.box_pixels,
            )
        results.append(record)
    return results


def main(argv) -> None:
    from fpn_tf import cli  # pylint: disable=g-import-not-at-top

    cli.run_main(
        argv,
        predict,
        FLAGS.saved_model,
        FLAGS.image,
        FLAGS.output_dir,
        FLAGS.min_score,
        FLAGS.signature,
    )


if __name__ == "__main__":
    define_flags()
    from fpn_tf.errors import parse_flags  # pylint: disable=g-import-not-at-top

    app.run(main, flags_parser=parse_flags)
