r"""Exports a trained model as a SavedModel (the signatures of docs/serving.md).

    python -m fpn_tf.export --model_dir=runs/cpu_demo --export_dir=exports/cpu_demo/1

rebuilds the model from ``<model_dir>/params.yaml`` (or ``--config_file``, with
``--params_override`` on top, as the trainer takes them), restores the latest checkpoint in
``model_dir`` (or ``--checkpoint``), reads ``<model_dir>/category_map.json`` and writes the
SavedModel with the ``serving_default``, ``image_bytes`` and ``tf_example`` signatures; images are
resized by the config's ``eval_data`` rule (short_side, max_long_side, pad_multiple,
resize_rounding).
Errors (a missing file, a checkpoint of another model, a bad config key) are one line.
"""

from __future__ import annotations

import os
import sys
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
        "'model.detection.score_threshold=0.3,eval_data.short_side=640'.",
    )
    flags.DEFINE_string(
        "checkpoint", None, "A checkpoint path to export instead of the latest " "in model_dir."
    )
    flags.mark_flags_as_required(["model_dir", "export_dir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from fpn_tf import cli  # pylint: disable=g-import-not-at-top

    with cli.quiet_tensorflow():
        _export()


def _export() -> None:
    from fpn_tf.configs import ConfigError  # pylint: disable=g-import-not-at-top
    from fpn_tf.data.errors import DataError  # pylint: disable=g-import-not-at-top
    from fpn_tf.modeling import model_dir  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving import export as export_lib  # pylint: disable=g-import-not-at-top

    start = time.time()
    try:
        source = model_dir.load_model(
            FLAGS.model_dir,
            config_file=FLAGS.config_file,
            params_override=FLAGS.params_override,
            checkpoint=FLAGS.checkpoint,
        )
        export_lib.export_saved_model(
            source.model, FLAGS.export_dir, source.category_map, **source.preprocessing
        )
    except (export_lib.ExportError, model_dir.ModelDirError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    logging.info(
        "Done in %.1f s: %s (checkpoint %s)",
        time.time() - start,
        FLAGS.export_dir,
        source.checkpoint,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
