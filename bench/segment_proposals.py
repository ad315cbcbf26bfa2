r"""Segment proposals: mask AR of the FPN segment-proposal head vs Mask R-CNN's masks (Table 6).

    python bench/segment_proposals.py --segment_model_dir=runs/seg \
        --mask_rcnn_model_dir=runs/mask_rcnn --config_file=configs/coco_r50_fpn_1x.yaml \
        --output=/tmp/segment_proposals.md

Both models run on the same evaluation data (the ``eval_data`` of ``--config_file``; default:
the segment model's params.yaml) and are scored by
`fpn_tf.evaluation.mask_recall.MaskProposalRecallEvaluator` (mask AR@10/100/1000, AR_s/m/l at
1000, COCOeval segm, class-agnostic). Seconds per image are measured over the model calls only
(after one warm-up batch; not the pasting and encoding). ``--single_heads`` adds the segment
head's "5x5 only" and "7x7 only" rows (the same weights, one head disabled at inference). The
paper's Table 6 rows are printed below ours, labelled as the paper's numbers (COCO, first 5k
val images; their AR columns are at 1000 proposals as we read the table; their times on a
GPU). A model directory holds params.yaml and checkpoints (`fpn_tf.serving.export`); errors are
one line.
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
flags.DEFINE_string("segment_model_dir", None, "The segment-proposal model's directory.")
flags.DEFINE_string("mask_rcnn_model_dir", None, "A Mask R-CNN model directory (optional).")
flags.DEFINE_string(
    "config_file", None, "Config whose eval_data is evaluated (default: the segment model's)."
)
flags.DEFINE_multi_string("params_override", None, "Overrides of the eval config.")
flags.DEFINE_integer("max_batches", None, "Evaluate this many batches only.")
flags.DEFINE_integer("top_k", 1000, "Proposals per image for Mask R-CNN.")
flags.DEFINE_bool("single_heads", False, "Also the segment head's 5x5-only and 7x7-only rows.")
flags.DEFINE_string("output", None, "Write the Markdown table here too.")

# The paper's Table 6 (FPN, CVPR 2017): AR, AR_s, AR_m, AR_l at 1000 proposals, and seconds per
# image, on the first 5k COCO val images.
PAPER_TABLE_6 = (
    ("DeepMask [27]", 37.1, 15.8, 50.1, 54.9, 0.49),
    ("SharpMask [28]", 39.8, 17.4, 53.1, 59.1, 0.77),
    ("FPN, single MLP [5x5]", 43.4, 32.5, 49.2, 53.7, 0.15),
    ("FPN, single MLP [7x7]", 43.5, 30.0, 49.6, 57.8, 0.19),
    ("FPN, dual MLP [5x5, 7x7]", 45.7, 31.9, 51.5, 60.8, 0.24),
    ("FPN, + 2x mask resolution", 46.7, 31.7, 53.1, 63.2, 0.25),
    ("FPN, + 2x train schedule", 48.1, 32.6, 54.2, 65.6, 0.25),
)
COLUMNS = ("mask_AR@10", "mask_AR@100", "mask_AR@1000", "mask_ARs@1000", "mask_ARm@1000",
           "mask_ARl@1000")  # fmt: skip


def load_segment_model(model_dir: str):
    """The segment-proposal model of a model directory, its latest checkpoint restored."""
    from fpn_tf.modeling.model_dir import load_model

    loaded = load_model(model_dir)
    return loaded.model, loaded.config


def evaluate(predict, dataset, groundtruth, max_batches=None):
    """(metrics, seconds per image) of ``predict(features) -> proposal dict``."""
    from fpn_tf.evaluation.mask_recall import MaskProposalRecallEvaluator

    ev = MaskProposalRecallEvaluator(groundtruth)
    seconds, images = 0.0, 0
    for i, (features, _) in enumerate(dataset):
        if max_batches is not None and i >= max_batches:
            break
        start = time.perf_counter()
        out = {k: v.numpy() for k, v in predict(features).items()}
        if i > 0:  # the first batch traces the function
            seconds += time.perf_counter() - start
            images += len(out["proposal_scores"])
        out["image_id"] = features["image_id"].numpy()
        ev.update_state(out)
    metrics = ev.evaluate()
    return metrics, (seconds / images if images else float("nan"))


def markdown_table(rows) -> str:
    head = "| model | AR@10 | AR@100 | AR@1000 | AR_s | AR_m | AR_l | s / image |"
    lines = [head, "|" + "---|" * 8]
    for name, metrics, spi in rows:
        values = " | ".join(  # -1: no ground truth in that size range
            f"{100 * metrics[c]:.1f}" if metrics[c] >= 0 else "n/a" for c in COLUMNS
        )
        lines.append(f"| {name} | {values} | {spi:.3f} |")
    lines += [
        "",
        "The paper's Table 6 (their numbers, COCO first 5k val images, AR at 1000 proposals, "
        "their GPU's times), for reference:",
        "",
        "| paper's model | AR | AR_s | AR_m | AR_l | s / image |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {a} | {s} | {m} | {la} | {t} |" for n, a, s, m, la, t in PAPER_TABLE_6]
    return "\n".join(lines) + "\n"


def run() -> str:
    import tensorflow as tf

    from fpn_tf.configs import load_config
    from fpn_tf.data import pipeline
    from fpn_tf.evaluation.coco_evaluator import load_coco_groundtruth
    from fpn_tf.evaluation.run import groundtruth_file
    from fpn_tf.modeling.segment_proposals import mask_rcnn_segment_proposals
    from fpn_tf.modeling.model_dir import load_model

    if not FLAGS.segment_model_dir and not FLAGS.mask_rcnn_model_dir:
        raise ValueError("give --segment_model_dir and/or --mask_rcnn_model_dir")
    config_file = FLAGS.config_file or os.path.join(
        FLAGS.segment_model_dir or FLAGS.mask_rcnn_model_dir, "params.yaml"
    )
    config = load_config(config_file, FLAGS.params_override)
    source = pipeline.source_from_config(config.eval_data)
    groundtruth = load_coco_groundtruth(groundtruth_file(source, None))

    def dataset():
        return pipeline.build_dataset(source, config.eval_data, training=False)

    def inputs(features):
        return {"images": features["images"], "image_info": features["image_info"]}

    rows = []
    if FLAGS.segment_model_dir:
        model, _ = load_segment_model(FLAGS.segment_model_dir)
        variants = [("FPN segment proposals (ours)", None)]
        if FLAGS.single_heads:
            variants += [(f"  {w}x{w} only", (w,)) for w in model.head.config.window_sizes]
        for name, sizes in variants:
            fn = tf.function(lambda f, sizes=sizes: model(inputs(f), window_sizes=sizes))
            metrics, spi = evaluate(fn, dataset(), groundtruth, FLAGS.max_batches)
            logging.info("%s: %s, %.3f s/image", name, metrics, spi)
            rows.append((name, metrics, spi))
    if FLAGS.mask_rcnn_model_dir:
        source_model = load_model(FLAGS.mask_rcnn_model_dir).model
        fn = tf.function(
            lambda f: mask_rcnn_segment_proposals(source_model, inputs(f), top_k=FLAGS.top_k)
        )
        metrics, spi = evaluate(fn, dataset(), groundtruth, FLAGS.max_batches)
        rows.append(("Mask R-CNN masks on RPN proposals (ours)", metrics, spi))
    table = markdown_table(rows)
    print(table)
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            f.write(table)
    return table


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    from fpn_tf.cli import user_errors
    from fpn_tf.modeling.model_dir import ModelDirError

    with user_errors():
        try:
            run()
        except (ModelDirError, ValueError) as e:
            logging.error("%s", e)
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
            sys.exit(2)


if __name__ == "__main__":
    app.run(main)
