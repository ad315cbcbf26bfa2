r"""Equality + speed of the candidate ops in bench/variants.py against fpn_tf's current ones.

    python bench/check_variants.py --batch_size=2 --repeats=7 --output=/tmp/variants.jsonl

Random P2..P5 (800x1344 pyramid, 256 channels), RoIs like real ones (clipped to the image, some on
the border, all four levels), 10 real gt of 100 rows. Timings alternate current / candidate,
medians. Equality: max abs difference of outputs and of the gradients w.r.t. the features (RoI
align), exact equality of labels / targets / matched indices (RPN targets, same stateless seed),
exact equality (upsampling).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

flags.DEFINE_integer("batch_size", 2, "Images.")
flags.DEFINE_integer("repeats", 7, "Timed calls each (alternating).")
flags.DEFINE_list("checks", ["roi_align", "rpn_targets", "upsample"], "Which checks.")
flags.DEFINE_string("output", None, "Append JSON lines here.")
flags.DEFINE_enum("roi_align_variant", "fast", ["fast", "crop_and_resize"],
                  "fast: crop_and_resize forward + gather gradient; crop_and_resize: native "
                  "gradient too (racy on CPU).")
FLAGS = flags.FLAGS


def emit(rec):
    line = json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), **rec})
    print(line, flush=True)
    if FLAGS.output:
        with open(FLAGS.output, "a") as f:
            f.write(line + "\n")


def alternate(fns, repeats):
    import tensorflow as tf
    run = lambda f: tf.nest.map_structure(lambda t: t.numpy(), f())  # noqa: E731
    for f in fns.values():
        run(f)
    ts = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            t0 = time.perf_counter()
            run(fns[k])
            ts[k].append((time.perf_counter() - t0) * 1e3)
    return {k: round(statistics.median(v), 1) for k, v in ts.items()}


def random_rois(rng, b, r, h=800, w=1333):
    import numpy as np
    size = np.exp(rng.uniform(np.log(8), np.log(700), (b, r, 2)))
    cy, cx = rng.uniform(-50, h + 50, (b, r)), rng.uniform(-50, w + 50, (b, r))
    y0 = np.clip(cy - size[..., 0] / 2, 0, h)
    x0 = np.clip(cx - size[..., 1] / 2, 0, w)
    y1 = np.clip(cy + size[..., 0] / 2, 0, h)
    x1 = np.clip(cx + size[..., 1] / 2, 0, w)
    rois = np.stack([y0, x0, y1, x1], -1).astype(np.float32)
    rois[:, -8:] = 0.0  # padding rows, like generate_proposals' / sample_rois'
    return rois


def check_roi_align(b, repeats):
    import numpy as np
    import tensorflow as tf
    from bench import variants
    from fpn_tf.ops import roi_ops
    rng = np.random.default_rng(0)
    feats = {f"P{l}": tf.constant(rng.normal(size=(b, -(-800 // 2 ** l), 1344 // 2 ** l, 256))
                                  .astype(np.float32)) for l in range(2, 6)}
    for r in (512, 1000):
        rois = tf.constant(random_rois(rng, b, r))
        up = tf.constant(rng.normal(size=(b, r, 7, 7, 256)).astype(np.float32))

        def fwd(fn):
            return tf.function(lambda: fn(feats, rois))

        def fwd_bwd(fn):
            @tf.function
            def g():
                with tf.GradientTape() as tape:
                    tape.watch(feats)
                    out = fn(feats, rois)
                    s = tf.reduce_sum(out * up)
                return out, tape.gradient(s, feats)
            return g

        cur = roi_ops.multilevel_roi_align
        new = {"crop_and_resize": variants.multilevel_roi_align_crop_and_resize,
               "fast": variants.multilevel_roi_align_fast}[FLAGS.roi_align_variant]
        # Determinism of the candidate's gradient: two runs must agree exactly.
        g2 = fwd_bwd(new)
        det = max(float(tf.reduce_max(tf.abs(a - c))) for a, c in zip(
            tf.nest.flatten(g2()[1]), tf.nest.flatten(g2()[1])))
        out_c, grad_c = fwd_bwd(cur)()
        out_n, grad_n = fwd_bwd(new)()
        diff = float(tf.reduce_max(tf.abs(out_c - out_n)))
        gdiff = max(float(tf.reduce_max(tf.abs(grad_c[k] - grad_n[k]))) for k in feats)
        gscale = max(float(tf.reduce_max(tf.abs(grad_c[k]))) for k in feats)
        t_f = alternate({"current": fwd(cur), "candidate": fwd(new)}, repeats)
        t_b = alternate({"current": fwd_bwd(cur), "candidate": fwd_bwd(new)}, repeats)
        emit({"what": "variant", "name": "roi_align_" + FLAGS.roi_align_variant, "batch": b,
              "rois": r, "grad_run_to_run_max_abs_diff": det,
              "max_abs_diff_out": diff, "max_abs_out": float(tf.reduce_max(tf.abs(out_c))),
              "max_abs_diff_grad": gdiff, "max_abs_grad": gscale,
              "fwd_ms": t_f, "fwd_bwd_ms": t_b,
              "fwd_speedup": round(t_f["current"] / t_f["candidate"], 2),
              "fwd_bwd_speedup": round(t_b["current"] / t_b["candidate"], 2)})


def check_rpn_targets(b, repeats):
    import numpy as np
    import tensorflow as tf
    from bench import variants
    from bench.common import synthetic_batch
    from fpn_tf.ops import anchors as anchor_ops
    from fpn_tf.ops import target_assigner
    _, _, boxes, classes = synthetic_batch(b, (800, 1333), (800, 1344), 10, 100)
    # Real rows need not be first: move one padding row between real ones in image 0.
    boxes[0, [3, 50]] = boxes[0, [50, 3]]
    classes[0, [3, 50]] = classes[0, [50, 3]]
    levels = ("P2", "P3", "P4", "P5", "P6")
    anchors = anchor_ops.generate_anchors(
        (800, 1344), levels, {l: (s,) for l, s in zip(levels, (32, 64, 128, 256, 512))},
        (0.5, 1.0, 2.0))
    all_anchors, _ = anchor_ops.concat_anchors(anchors)
    gb, gc = tf.constant(boxes), tf.constant(classes)
    crowd = tf.zeros(classes.shape, tf.bool)
    seed = tf.constant([1, 2])
    cur = tf.function(lambda: target_assigner.assign_rpn_targets(
        all_anchors, gb, gc, crowd, seed=seed))
    new = tf.function(lambda: variants.assign_rpn_targets_compact(
        all_anchors, gb, gc, crowd, seed=seed))
    a, n = cur(), new()
    same = {f: bool(np.array_equal(getattr(a, f).numpy(), getattr(n, f).numpy()))
            for f in a._fields}
    t = alternate({"current": cur, "candidate": new}, repeats)
    emit({"what": "variant", "name": "rpn_targets_compact_gt", "batch": b,
          "anchors": int(all_anchors.shape[0]), "gt_rows": 100, "real_gt": 10,
          "identical": same, "num_positive": int(tf.reduce_sum(tf.cast(a.labels == 1, tf.int32))),
          "ms": t, "speedup": round(t["current"] / t["candidate"], 2)})


def check_upsample(b, repeats):
    import numpy as np
    import tensorflow as tf
    from bench import variants
    from fpn_tf.modeling import fpn
    rng = np.random.default_rng(0)
    pairs = [((b, 100, 168, 256), (b, 200, 336, 256)), ((b, 25, 42, 256), (b, 50, 84, 256)),
             ((b, 13, 21, 256), (b, 25, 42, 256))]
    for small, big in pairs:
        x = tf.constant(rng.normal(size=small).astype(np.float32))
        like = tf.zeros(big)
        cur = tf.function(lambda: fpn.upsample_nearest_to(x, like))
        new = tf.function(lambda: variants.upsample_nearest_to_broadcast(x, like))
        same = bool(np.array_equal(cur().numpy(), new().numpy()))
        t = alternate({"current": cur, "candidate": new}, repeats)
        emit({"what": "variant", "name": "upsample_broadcast", "from": small, "to": big,
              "identical": same, "ms": t, "speedup": round(t["current"] / t["candidate"], 2)})


def main(argv):
    del argv
    b = FLAGS.batch_size
    if "upsample" in FLAGS.checks:
        check_upsample(b, FLAGS.repeats)
    if "rpn_targets" in FLAGS.checks:
        check_rpn_targets(b, FLAGS.repeats)
    if "roi_align" in FLAGS.checks:
        check_roi_align(b, FLAGS.repeats)


if __name__ == "__main__":
    app.run(main)
