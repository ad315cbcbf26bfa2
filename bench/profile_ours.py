r"""Per-stage timing of our R50-FPN Faster R-CNN (inference and one training step).

    python bench/profile_ours.py --batch_size=1 --image_size=800,1333 --repeats=5 \
        --output=/tmp/profile.jsonl

Each stage is its own ``tf.function`` fed with the previous stages' (precomputed) outputs, so the
stage times add up to roughly, not exactly, the whole step (no cross-stage overlap, a little
dispatch per call). Forward stages: backbone, pyramid (FPN top-down + lateral + output convs),
RPN head, anchors, RPN target assignment, RPN losses, proposals (per-level top-k, decode, NMS),
RoI sampling, multi-level RoIAlign, box head, Fast R-CNN losses, detection post-processing.
Backward stages: RoIAlign (gradient w.r.t. P2..P5), box head, backbone+pyramid (gradient of a
random projection of P2..P6). Also the whole inference call, the whole forward of the losses and
the whole train step (so "backward + apply" = step - forward). Stage lines are JSON, sorted by
time at the end into a summary line.

``--fpn_tf_root=DIR`` imports fpn_tf from DIR (e.g. a checkout of another commit) to profile it.
``--trace`` also traces one inference call and one train step with tf.profiler (TensorBoard's
profile plugin opens them) and prints the top op types and ops of each by thread time.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import types

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

flags.DEFINE_integer("batch_size", 1, "Images per batch.")
flags.DEFINE_list("image_size", ["800", "1333"], "Resized height,width (padded to 32).")
flags.DEFINE_integer("repeats", 5, "Timed calls per stage (median).")
flags.DEFINE_integer("warmup", 1, "Untimed calls per stage.")
flags.DEFINE_list("stages", ["all"], "Stage names to run, or 'all'.")
flags.DEFINE_string("output", None, "Append JSON lines here.")
flags.DEFINE_bool(
    "trace",
    False,
    "Also trace one inference call and one train step with "
    "tf.profiler into --trace_dir/{inference,train_step} and print their top ops.",
)
flags.DEFINE_integer("top_ops", 15, "How many op types / single ops --trace prints.")
flags.DEFINE_string("fpn_tf_root", None, "Import fpn_tf from this directory instead.")
flags.DEFINE_string("trace_dir", "/tmp/fpn_tf_profile", "Where --trace writes.")
FLAGS = flags.FLAGS

from bench.common import emit_json_line  # noqa: E402  pylint: disable=wrong-import-position


def emit(rec):
    emit_json_line(rec, FLAGS.output)


def top_ops(trace_dir, n):
    """The ``n`` op types and single ops with the most time in a tf.profiler trace.

    Read from the trace's XSpace: every TensorFlow op event ("name:type") on the executor
    threads. The times are thread time summed over threads: ops that run concurrently (2 inter-op
    threads here) each count in full, and an op waiting for pool threads counts its wait.
    """
    import collections
    import glob

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as f:
        space.ParseFromString(f.read())
    by_type, by_op, count = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name or name.startswith("ExecutorState"):
                    continue  # executor bookkeeping, not an op
                ms = event.duration_ps / 1e9
                by_type[name.rsplit(":", 1)[1]] += ms
                count[name.rsplit(":", 1)[1]] += 1
                by_op[name] += ms
    total = sum(by_type.values())
    types = [
        (t, round(ms, 1), round(100 * ms / total, 1), count[t]) for t, ms in by_type.most_common(n)
    ]
    ops = [(op, round(ms, 1)) for op, ms in by_op.most_common(n)]
    return types, ops


def timeit(fn, repeats, warmup):
    import tensorflow as tf

    for _ in range(warmup):
        tf.nest.map_structure(lambda x: x.numpy() if hasattr(x, "numpy") else x, fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tf.nest.map_structure(lambda x: x.numpy() if hasattr(x, "numpy") else x, fn())
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), ts


def main(argv):
    del argv
    if FLAGS.fpn_tf_root:
        sys.path.insert(0, os.path.abspath(FLAGS.fpn_tf_root))
    import keras
    import tensorflow as tf
    from bench.common import NUM_FG_CLASSES, OUR_PAD, padded, synthetic_batch
    from fpn_tf.configs.experiment import ExperimentConfig
    from fpn_tf.modeling.factory import build_model
    from fpn_tf.modeling.losses import fast_rcnn_losses, rpn_losses
    from fpn_tf.ops import anchors as anchor_ops
    from fpn_tf.ops import postprocess, target_assigner

    resized = [int(s) for s in FLAGS.image_size]
    hw = padded(resized, OUR_PAD)
    keras.utils.set_random_seed(0)
    model = build_model(
        ExperimentConfig().model,
        category_ids=list(range(1, NUM_FG_CLASSES + 1)),
        input_shape=tuple(hw) + (3,),
    )
    b = FLAGS.batch_size
    images, info, boxes, classes = synthetic_batch(b, resized, hw, 10, 100)
    features = {"images": tf.constant(images), "image_info": tf.constant(info)}
    labels = {
        "gt_boxes": tf.constant(boxes),
        "gt_classes": tf.constant(classes),
        "gt_is_crowd": tf.zeros(classes.shape, tf.bool),
    }
    gt_boxes, gt_classes, crowd = labels["gt_boxes"], labels["gt_classes"], labels["gt_is_crowd"]
    valid_hw = tf.constant(info[:, 1, :])
    fpn = model.fpn
    backbone = [l for l in fpn.layers if isinstance(l, keras.Model)][0]
    pyramid_layer = fpn.get_layer("feature_pyramid")
    rp, heads = model.rpn.config, model.roi_heads
    # The RoI settings by field name (each config section of the RoI heads).
    rr = types.SimpleNamespace(
        **heads.sampler_config.to_dict(),
        **heads.box_pooler.config.to_dict(),
        **heads.box_config.to_dict(),
    )
    want = set(FLAGS.stages)
    results = []

    def stage(name, fn, kind="forward"):
        if "all" not in want and name not in want:
            return None
        med, ts = timeit(fn, FLAGS.repeats, FLAGS.warmup)
        rec = {
            "what": "profile",
            "stage": name,
            "kind": kind,
            "batch": b,
            "input": hw,
            "ms_median": round(med, 1),
            "ms_all": [round(t, 1) for t in ts],
        }
        results.append(rec)
        emit(rec)
        return med

    # ---- forward pieces, each fed with precomputed inputs -------------------------------
    x = features["images"]
    c_maps = tf.function(lambda: backbone(x, training=False))()
    c_in = {k: v for k, v in c_maps.items() if int(k[1:]) >= 2}
    pyr = tf.function(lambda: fpn(x, training=False))()
    stage("backbone", tf.function(lambda: backbone(x, training=False)))
    stage("pyramid", tf.function(lambda: pyramid_layer(c_in)))
    rpn_fn = tf.function(lambda: model.rpn.head_outputs(pyr))
    logits, deltas = rpn_fn()
    stage("rpn_head", rpn_fn)
    anchors = model.rpn.anchors(tuple(hw))
    all_anchors, _ = anchor_ops.concat_anchors(anchors)
    stage(
        "anchors", tf.function(lambda: anchor_ops.concat_anchors(model.rpn.anchors(tuple(hw)))[0])
    )
    assign = tf.function(
        lambda: target_assigner.assign_rpn_targets(
            all_anchors,
            gt_boxes,
            gt_classes,
            crowd,
            positive_iou=rp.positive_iou,
            negative_iou=rp.negative_iou,
            num_samples=rp.batch_size_per_image,
            positive_fraction=rp.positive_fraction,
            positive_iou_inclusive=rp.positive_iou_inclusive,
        )
    )
    rpn_t = assign()
    stage("rpn_target_assignment", assign, "train")
    cat_logits = tf.concat([logits[l] for l in model.rpn.levels], axis=1)
    cat_deltas = tf.concat([deltas[l] for l in model.rpn.levels], axis=1)
    stage(
        "rpn_losses",
        tf.function(
            lambda: rpn_losses(
                rpn_t.labels,
                rpn_t.box_targets,
                cat_logits,
                cat_deltas,
                rp.batch_size_per_image,
                rp.smooth_l1_beta,
            )
        ),
        "train",
    )
    prop_train = tf.function(lambda: model.rpn.proposals(logits, deltas, anchors, valid_hw, True))
    prop_test = tf.function(lambda: model.rpn.proposals(logits, deltas, anchors, valid_hw, False))
    proposals_tr = prop_train()
    proposals_te = prop_test()
    stage("proposals_train_2000", prop_train, "train")
    stage("proposals_test_1000", prop_test, "inference")
    sample = tf.function(
        lambda: target_assigner.sample_rois(
            proposals_tr.boxes,
            gt_boxes,
            gt_classes,
            crowd,
            proposals_tr.valid,
            num_samples=rr.batch_size_per_image,
            foreground_fraction=rr.positive_fraction,
            foreground_iou=rr.foreground_iou,
            box_weights=tuple(rr.box_weights),
        )
    )
    roi_t = sample()
    stage("sample_rois", sample, "train")
    feats = {lvl: pyr[lvl] for lvl in heads.box_pooler.levels}
    # The model's own box pooler (Eq. 1 + RoIAlign with every setting of model.roi_aligner).
    align_tr = tf.function(lambda: heads.box_pooler(feats, roi_t.rois, training=True))
    align_te = tf.function(lambda: heads.box_pooler(feats, proposals_te.boxes, training=False))
    pooled_tr = align_tr()
    pooled_te = align_te()
    stage("roi_align_train_512", align_tr, "train")
    stage("roi_align_test_1000", align_te, "inference")
    head_tr = tf.function(lambda: model.roi_heads.box_head(pooled_tr, training=True))
    head_te = tf.function(lambda: model.roi_heads.box_head(pooled_te, training=False))
    cls_tr, box_tr = head_tr()
    cls_te, box_te = head_te()
    stage("box_head_train_512", head_tr, "train")
    stage("box_head_test_1000", head_te, "inference")
    stage(
        "fast_rcnn_losses",
        tf.function(
            lambda: fast_rcnn_losses(
                roi_t.class_targets,
                roi_t.box_targets,
                cls_tr,
                box_tr,
                rr.smooth_l1_beta,
                valid=roi_t.valid_mask,
            )
        ),
        "train",
    )
    d = model.roi_heads.detection_config
    stage(
        "postprocess_detections",
        tf.function(
            lambda: postprocess.postprocess_detections(
                tf.nn.softmax(cls_te, axis=-1),
                box_te,
                proposals_te.boxes,
                valid_hw,
                box_weights=tuple(rr.box_weights),
                score_threshold=d.score_threshold,
                nms_iou=d.nms_iou,
                max_detections=d.max_detections,
                nms_impl=d.nms_impl,
                min_box_size=d.min_box_size,
            )
        ),
        "inference",
    )

    # ---- backward pieces ----------------------------------------------------------------
    proj = {k: tf.random.normal(tf.shape(v), seed=1) for k, v in pyr.items()}

    @tf.function
    def align_bwd():
        with tf.GradientTape() as tape:
            tape.watch(feats)
            out = heads.box_pooler(feats, roi_t.rois, training=True)
            s = tf.reduce_sum(out * tf.random.normal(tf.shape(out), seed=2))
        return tape.gradient(s, feats)

    stage("roi_align_train_512_fwd_bwd", align_bwd, "train_backward")

    @tf.function
    def head_bwd():
        with tf.GradientTape() as tape:
            tape.watch(pooled_tr)
            c, bx = model.roi_heads.box_head(pooled_tr, training=True)
            s = tf.reduce_sum(c) + tf.reduce_sum(bx)
        return tape.gradient(s, [pooled_tr] + model.roi_heads.box_head.trainable_variables)

    stage("box_head_train_512_fwd_bwd", head_bwd, "train_backward")

    @tf.function
    def fpn_bwd():
        with tf.GradientTape() as tape:
            p = fpn(x, training=True)
            s = tf.add_n([tf.reduce_sum(p[k] * proj[k]) for k in p])
        return tape.gradient(s, fpn.trainable_variables)

    stage("backbone_pyramid_fwd_bwd", fpn_bwd, "train_backward")
    stage("backbone_pyramid_fwd_train", tf.function(lambda: fpn(x, training=True)), "train")

    # ---- whole steps --------------------------------------------------------------------
    opt = keras.optimizers.SGD(1e-5, momentum=0.9)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            losses = model.compute_losses(features, labels, training=True)
        grads = tape.gradient(losses["total_loss"], model.trainable_variables)
        opt.apply(grads, model.trainable_variables)
        return losses["total_loss"]

    stage("whole_inference", tf.function(lambda: model(features, training=False)), "total")
    stage(
        "whole_forward_losses",
        tf.function(lambda: model.compute_losses(features, labels, training=True)),
        "total",
    )
    stage("whole_train_step", step, "total")
    if FLAGS.trace:
        infer = tf.function(lambda: model(features, training=False))
        for name, fn in (("inference", infer), ("train_step", step)):
            fn()
            trace_dir = os.path.join(FLAGS.trace_dir, name)
            tf.profiler.experimental.start(trace_dir)
            fn()
            tf.profiler.experimental.stop()
            by_type, by_op = top_ops(trace_dir, FLAGS.top_ops)
            emit(
                {
                    "what": "top_ops",
                    "call": name,
                    "batch": b,
                    "input": hw,
                    "dir": trace_dir,
                    "by_type_ms": by_type,
                    "by_op_ms": by_op,
                }
            )
    top = sorted(results, key=lambda r: -r["ms_median"])
    emit(
        {
            "what": "profile_summary",
            "batch": b,
            "input": hw,
            "by_time": [(r["stage"], r["ms_median"]) for r in top],
        }
    )


if __name__ == "__main__":
    app.run(main)
