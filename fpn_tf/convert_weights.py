"""``python -m fpn_tf.convert_weights``: a published COCO checkpoint -> an fpn_tf model directory.

The architecture comes from ``configs/coco_r50_fpn_<source>.yaml`` (or ``--config_file``), Faster
or Mask R-CNN from the file itself. Nothing is downloaded (README lists the files and their
checksums); a wrong or truncated file is one line, and nothing is written.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_enum("source", None, ["torchvision", "detectron2"], "Who published the file.")
    flags.DEFINE_string(
        "checkpoint",
        None,
        "The published file: torchvision's .pth (needs torch) or detectron2's .pkl.",
    )
    flags.DEFINE_string("output_dir", None, "The model directory to write (must not exist).")
    flags.DEFINE_multi_string(
        "config_file", None, "Architecture config(s) instead of configs/coco_r50_fpn_<source>.yaml."
    )
    flags.DEFINE_multi_string(
        "params_override", None, "Overrides on top of the config, as the trainer takes them."
    )
    flags.DEFINE_bool(
        "saved_model", True, "Also export <output_dir>/saved_model (a minute or two)."
    )
    flags.mark_flags_as_required(["source", "checkpoint", "output_dir"])


def main(argv) -> None:
    from fpn_tf import cli  # pylint: disable=g-import-not-at-top

    cli.run_main(argv, _convert)


def _convert() -> None:
    # pylint: disable=g-import-not-at-top
    from fpn_tf.configs import load_config
    from fpn_tf.conversion import convert_checkpoint
    from fpn_tf.conversion.convert import reference_config_file
    from fpn_tf.errors import UserError

    config_files = FLAGS.config_file or [reference_config_file(FLAGS.source)]
    for path in config_files:
        if not os.path.isfile(path):
            raise UserError(f"config file {path} not found: give --config_file")
    config = load_config(config_files, FLAGS.params_override)
    report = convert_checkpoint(
        FLAGS.source, FLAGS.checkpoint, FLAGS.output_dir, config,
        export_saved_model=FLAGS.saved_model,
    )  # fmt: skip
    logging.info(
        "Done in %.1f s: %s (%d arrays from %s)",
        report.seconds, report.output_dir, report.num_arrays, report.checkpoint,
    )  # fmt: skip
    print(report.output_dir, file=sys.stdout)


if __name__ == "__main__":
    define_flags()
    from fpn_tf.errors import parse_flags  # pylint: disable=g-import-not-at-top

    app.run(main, flags_parser=parse_flags)
