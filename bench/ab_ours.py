r"""Two variants of our R50-FPN Faster R-CNN, same weights, timed alternately in one process.

    python bench/ab_ours.py --a=before --b=current --modes=inference,train --batch_size=1 \
        --repeats=7 --warmup=1 --output=/tmp/ab.jsonl

A variant is a named config override (`VARIANTS`), a switch the library has, e.g.
``model.backbone.fold_frozen_bn=false``. Both models get the same weights (B's are copied from
A's; a folded BatchNorm's vectors from the unfolded layer, and back), then:

* equality: A's and B's pyramid (P2..P6), RPN logits and deltas, and box-head outputs on the same
  RoIs (A's proposals) for the same batch, as max abs differences next to the max abs values.
  (Final detections are not compared: with random weights the scores are near-ties, and float
  rounding reorders them);
* speed: after ``--warmup`` calls each, ``--repeats`` calls alternating A/B (order flipped each
  repeat) per mode; medians and ``ratio`` = B / A as JSON lines.

The speed optimisations that have a config switch, and their variants: ``unfolded_bn`` (frozen
BatchNorm as separate layers), ``roi_gather`` (RoIAlign by one gather + matmul),
``rpn_dense_backward`` (TensorFlow's dense gradient of the RPN head instead of the one over the
sampled positions; the forward is the same, the gradients' equality is tests/test_ops_rpn_head.py);
``before`` = all three.
(The other two, RPN targets over the real gt columns only and broadcast upsampling, give
bit-identical results -- tests/test_ops_targets.py, tests/test_fpn.py -- and have no switch.)
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app
from absl import flags
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# --image_size, --repeats, --warmup, --output, --mixed_precision, --jit_compile, --num_gt, ...
# are compare_model_garden's flags (its `Ours` builds both variants).
from bench import compare_model_garden  # noqa: E402  pylint: disable=wrong-import-position

flags.DEFINE_string("a", "before", "Variant A (the reference).")
flags.DEFINE_string("b", "current", "Variant B.")
flags.DEFINE_list("modes", ["inference", "train"], "inference and/or train.")
flags.DEFINE_integer("batch_size", 1, "Images per call.")
FLAGS = flags.FLAGS

_BN_VECTORS = ("gamma", "beta", "moving_mean", "moving_variance")


# name -> params_override of our model config
VARIANTS = {
    "current": None,
    "unfolded_bn": "model.backbone.fold_frozen_bn=false",
    "roi_gather": "model.roi_aligner.align_impl=gather",
    "rpn_dense_backward": "model.rpn.head_sparse_backward=false",
    "before": "model.backbone.fold_frozen_bn=false,model.roi_aligner.align_impl=gather,"
    "model.rpn.head_sparse_backward=false",
}


def _counterpart(path, by_path):
    """The source variable for ``path`` when one model folds BatchNorm and the other does not."""
    head, _, name = path.rpartition("/")
    if name in _BN_VECTORS:
        for a, b in (("_conv", "_bn"), ("_bn", "_conv")):
            if head.endswith(a):
                other = head[: -len(a)] + b + "/" + name
                if other in by_path:
                    return by_path[other]
    return None


def copy_weights(src, dst):
    """Assigns every weight of ``dst`` from ``src`` (same path, or the folded counterpart)."""
    by_path = {v.path: v for v in src.weights}
    for v in dst.weights:
        source = by_path.get(v.path)
        if source is None:
            source = _counterpart(v.path, by_path)
        if source is None or tuple(source.shape) != tuple(v.shape):
            raise ValueError(f"no weight for {v.path} {tuple(v.shape)} in model A")
        v.assign(source)


def stage_outputs(model, features, rois=None):
    """Pyramid P2..P6, RPN logits and deltas, and the box head's outputs on ``rois`` (default:
    the model's own test-time proposals), as NumPy arrays; plus the RoIs used."""
    import tensorflow as tf
    from fpn_tf.modeling.image_io import split_inputs

    images, _, valid_hw = split_inputs(features)
    pyramid = model.fpn(images, training=False)
    logits, deltas = model.rpn.head_outputs(pyramid, training=False)
    if rois is None:
        rois, _ = model.rpn(pyramid, valid_hw, training=False)
        rois = rois.boxes
    class_logits, box_deltas = model.roi_heads.box_outputs(pyramid, rois, training=False)
    out = {k: v.numpy() for k, v in pyramid.items()}
    out["rpn_logits"] = tf.concat(list(logits.values()), axis=1).numpy()
    out["rpn_deltas"] = tf.concat(list(deltas.values()), axis=1).numpy()
    out["box_class_logits"] = class_logits.numpy()
    out["box_deltas"] = box_deltas.numpy()
    return out, rois


def main(argv):
    del argv
    import numpy as np

    Ours = compare_model_garden.Ours
    for name in (FLAGS.a, FLAGS.b):
        if name not in VARIANTS:
            raise app.UsageError(f"unknown variant {name!r}; known: {sorted(VARIANTS)}")
    resized = [int(s) for s in FLAGS.image_size]
    built, runners, stages, rois = {}, {}, {}, None
    for name in (FLAGS.a, FLAGS.b):
        logging.info("building %s (params_override %s)", name, VARIANTS[name])
        built[name] = Ours(resized, VARIANTS[name])
    copy_weights(built[FLAGS.a].model, built[FLAGS.b].model)  # before any training step
    for name in (FLAGS.a, FLAGS.b):
        features, _ = built[name].batch(FLAGS.batch_size)
        stages[name], rois = stage_outputs(built[name].model, features, rois)
        runners[name] = {m: built[name].runner(m, FLAGS.batch_size) for m in FLAGS.modes}
        for m in FLAGS.modes:
            runners[name][m]()  # traces

    out_a, out_b = stages[FLAGS.a], stages[FLAGS.b]
    compare_model_garden.emit(
        {
            "what": "equality",
            "a": FLAGS.a,
            "b": FLAGS.b,
            "batch": FLAGS.batch_size,
            "max_abs_diff": {k: float(np.abs(out_a[k] - out_b[k]).max()) for k in out_a},
            "max_abs_value": {k: float(np.abs(out_a[k]).max()) for k in out_a},
        }
    )

    for mode in FLAGS.modes:
        for name in (FLAGS.a, FLAGS.b):
            for _ in range(FLAGS.warmup):
                runners[name][mode]()
        times = {FLAGS.a: [], FLAGS.b: []}
        for i in range(FLAGS.repeats):
            order = (FLAGS.a, FLAGS.b) if i % 2 == 0 else (FLAGS.b, FLAGS.a)
            for name in order:
                start = time.perf_counter()
                runners[name][mode]()
                times[name].append(round((time.perf_counter() - start) * 1000, 1))
            logging.info("%s repeat %d/%d done", mode, i + 1, FLAGS.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        compare_model_garden.emit(
            {
                "what": mode,
                "batch": FLAGS.batch_size,
                "a": FLAGS.a,
                "b": FLAGS.b,
                "a_ms_median": med[FLAGS.a],
                "b_ms_median": med[FLAGS.b],
                "ratio": round(med[FLAGS.b] / med[FLAGS.a], 3),
                "a_ms_all": times[FLAGS.a],
                "b_ms_all": times[FLAGS.b],
            }
        )


if __name__ == "__main__":
    app.run(main)
