"""``python -m fpn_tf.ablations``: the paper's Table 1/2 ablations in miniature, one command.

Trains and evaluates every row of ``configs/ablations/`` (only the pyramid differs) and writes
the table (Markdown and JSON). Resumable: a finished row is read back from its
``ablation_result.json``, an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

from fpn_tf import cli
from fpn_tf.errors import UserError, parse_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS_DIR = os.path.join(ROOT, "configs", "ablations")
ROWS = {
    "a_single_scale_c4": "(a) single scale, C4",
    "b_bottom_up": "(b) bottom-up pyramid, no top-down",
    "c_no_lateral": "(c) top-down, no lateral 1x1",
    "d_p2_only": "(d) top-down + lateral, P2 only",
    "e_fpn": "(e) FPN (top-down + lateral, P2-P6)",
}
COLUMNS = "AR@100 AR@1000 ARs@1000 ARm@1000 ARl@1000 AP AP50 APs APm APl sec_per_step".split()

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "runs/ablations", "One model_dir per row, plus the tables.")
flags.DEFINE_list("rows", list(ROWS), f"Rows to run, from {list(ROWS)}.")
flags.DEFINE_string("params_override", None, "Applied to every row (e.g. a shorter schedule).")


def run_row(row: str, output_dir: str, params_override=None) -> dict:
    from fpn_tf.configs.loader import load_config

    result_path = os.path.join(output_dir, row, "ablation_result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
        logging.info("Row %s already done: %s", row, result_path)
        return result
    cfg = load_config(os.path.join(ABLATIONS_DIR, f"{row}.yaml"), params_override)
    cli.configure_tensorflow_environment(cfg.runtime.strategy)
    from fpn_tf.training.trainer import Trainer  # TensorFlow from here on

    trainer = Trainer(cfg, os.path.join(output_dir, row))
    start_step = trainer.step
    log = trainer.train()
    metrics = trainer.evaluate()
    steps = trainer.step - start_step
    result = {k: metrics.get(k) for k in COLUMNS if k in metrics}
    result.update(
        row=row,
        name=ROWS[row],
        steps=trainer.step,
        sec_per_step=(log.get("seconds", 0.0) / steps) if steps else None,
        pyramid_levels=sorted(trainer.model.fpn.output),
        anchors_per_location=trainer.model.rpn.num_anchors,
    )
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def markdown_table(results) -> str:
    def cell(c, v):
        return "n/a" if v is None else f"{v:.2f}" if c == "sec_per_step" else f"{100 * v:.1f}"

    lines = ["| row | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for r in results:
        lines.append(f"| {r['name']} | " + " | ".join(cell(c, r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv):
    cli.run_main(argv, _main)


def _main():
    unknown = [r for r in FLAGS.rows if r not in ROWS]
    if unknown:
        raise UserError(f"--rows: unknown rows {unknown}; known: {list(ROWS)}")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    start = time.time()
    results = []
    for i, row in enumerate(FLAGS.rows):
        logging.info("=== ablation %d/%d: %s ===", i + 1, len(FLAGS.rows), ROWS[row])
        results.append(run_row(row, FLAGS.output_dir, FLAGS.params_override))
    table = markdown_table(results)
    elapsed = time.time() - start
    with open(os.path.join(FLAGS.output_dir, "ablations.md"), "w") as f:
        f.write(table + f"\n\nAP/AR in %. This invocation took {elapsed / 60:.1f} min.\n")
    with open(os.path.join(FLAGS.output_dir, "ablations.json"), "w") as f:
        json.dump({"rows": results, "minutes": elapsed / 60}, f, indent=2)
    print(table)
    print(
        f"\n{len(results)} rows in {elapsed / 60:.1f} min; tables in {FLAGS.output_dir}/"
        "ablations.{md,json}",
        flush=True,
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
