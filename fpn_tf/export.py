r"""Exports a trained model as a SavedModel and/or ONNX and LiteRT files.

    python -m fpn_tf.export --model_dir=runs/cpu_demo --export_dir=exports/cpu_demo/1 \
      [--format=saved_model,onnx,litert] [--litert_quantization=none,float16,dynamic_int8]

rebuilds the model from ``<model_dir>/params.yaml`` (or ``--config_file``/``--params_override``),
restores the latest checkpoint and writes the formats asked for (docs/serving.md). Errors are one
line, exit code 2, before anything is written.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string(
        "model_dir",
        None,
        "The training run's directory (params.yaml, " "category_map.json, checkpoints).",
    )
    flags.DEFINE_string(
        "export_dir",
        None,
        "Where the SavedModel goes, e.g. exports/fpn/1 "
        "(TF Serving wants a numbered version directory).",
    )
    flags.DEFINE_multi_string(
        "config_file",
        None,
        "Config YAML file(s) instead of " "<model_dir>/params.yaml (applied in order).",
    )
    flags.DEFINE_multi_string(
        "params_override",
        None,
        "Overrides on top of the config, e.g. "
        "'model.detection.score_threshold=0.3,eval_data.resize.short_side=640'.",
    )
    flags.DEFINE_string(
        "checkpoint", None, "A checkpoint path to export instead of the latest " "in model_dir."
    )
    flags.DEFINE_multi_string(
        "format",
        ["saved_model"],
        "What to write: saved_model, onnx, litert (repeat the flag or give a comma list).",
    )
    flags.DEFINE_multi_string(
        "litert_quantization",
        ["none"],
        "LiteRT variants: none (float32), float16 (float16 weights), dynamic_int8 "
        "(dynamic-range int8); repeat or a comma list.",
    )
    flags.mark_flags_as_required(["model_dir", "export_dir"])


FORMATS = ("saved_model", "onnx", "litert")


def _split(values) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def main(argv) -> None:
    from fpn_tf import cli  # pylint: disable=g-import-not-at-top

    cli.run_main(argv, _export)


def _export() -> None:
    from fpn_tf.modeling import model_dir  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving import export as export_lib  # pylint: disable=g-import-not-at-top

    from fpn_tf import cli  # pylint: disable=g-import-not-at-top

    formats = list(dict.fromkeys(_split(FLAGS.format)))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        cli.fail(f"--format: {unknown or 'nothing'} not in {list(FORMATS)}")
    quantizations = list(dict.fromkeys(_split(FLAGS.litert_quantization)))
    start = time.time()
    source = model_dir.load_model(
        FLAGS.model_dir,
        config_file=FLAGS.config_file,
        params_override=FLAGS.params_override,
        checkpoint=FLAGS.checkpoint,
    )
    if formats == ["saved_model"]:
        export_lib.export_saved_model(
            source.model, FLAGS.export_dir, source.category_map, source.config.eval_data.resize
        )
        written = [FLAGS.export_dir]
    else:
        written = _export_formats(source, formats, quantizations)
    logging.info(
        "Done in %.1f s: %s (checkpoint %s)",
        time.time() - start,
        ", ".join(written),
        source.checkpoint,
    )


def _export_formats(source, formats, quantizations) -> list[str]:
    """ONNX / LiteRT files (and the SavedModel in ``saved_model/``) under --export_dir."""
    from fpn_tf.serving import export as export_lib  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving import portable  # pylint: disable=g-import-not-at-top

    resize = source.config.eval_data.resize
    # a model that is no detector fails here, before anything is written
    portable.prepare_export(source.model, source.category_map, resize)
    if "litert" in formats:
        from fpn_tf.serving.litert_export import QUANTIZATIONS  # pylint: disable=g-import-not-at-top

        bad = [q for q in quantizations if q not in QUANTIZATIONS]
        if bad or not quantizations:
            raise export_lib.ExportError(
                f"--litert_quantization: {bad or 'nothing'} not in {list(QUANTIZATIONS)}"
            )
    written = []
    if "onnx" in formats:
        from fpn_tf.serving.onnx_export import export_onnx  # pylint: disable=g-import-not-at-top

        path = os.path.join(FLAGS.export_dir, "model.onnx")
        written.append(export_onnx(source.model, path, source.category_map, resize))
    if "litert" in formats:
        from fpn_tf.serving.litert_export import export_litert  # pylint: disable=g-import-not-at-top

        for quantization in quantizations:
            name = "model.tflite" if quantization == "none" else f"model_{quantization}.tflite"
            written.append(
                export_litert(
                    source.model,
                    os.path.join(FLAGS.export_dir, name),
                    source.category_map,
                    resize,
                    quantization=quantization,
                )
            )
    if "saved_model" in formats:
        path = os.path.join(FLAGS.export_dir, "saved_model")
        written.append(
            export_lib.export_saved_model(source.model, path, source.category_map, resize)
        )
    return written


if __name__ == "__main__":
    define_flags()
    from fpn_tf.errors import parse_flags  # pylint: disable=g-import-not-at-top

    app.run(main, flags_parser=parse_flags)
