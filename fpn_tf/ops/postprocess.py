"""RPN proposals and Fast R-CNN detection post-processing, batched with static shapes (pure TF).

Settings are explicit arguments; their defaults live in the config. ``batched_nms`` impls keep
the same boxes up to exact IoU ties: ``"padded"`` (``non_max_suppression_padded`` on the whole
batch, what accelerators prefer; suppresses at ``IoU >= threshold``) and ``"per_image"``
(``map_fn`` of NonMaxSuppressionV4, faster on CPU; ``IoU > threshold``). All compile under XLA
except ``postprocess_detections(nms_impl="combined")``.
"""

import collections

import tensorflow as tf

from fpn_tf.ops import box_ops

__all__ = [
    "Proposals",
    "Detections",
    "batched_nms",
    "generate_proposals",
    "postprocess_detections",
]

Proposals = collections.namedtuple("Proposals", ["boxes", "scores", "valid"])
Proposals.__doc__ = """RPN proposals: boxes float32 [B, K, 4] yxyx pixels, best first, padding
zero; scores float32 [B, K] objectness probabilities (0 for padding); valid bool [B, K]."""

Detections = collections.namedtuple("Detections", ["boxes", "scores", "classes", "num_detections"])
Detections.__doc__ = """boxes float32 [B, D, 4] yxyx pixels; scores float32 [B, D]; classes
int32 [B, D] (contiguous 1..C); num_detections int32 [B]. Rows >= num_detections are zero."""

NEG_INF = float("-inf")


def _static_dim(x, axis):
    d = x.shape[axis]
    return d if d is not None else tf.shape(x)[axis]


def batched_nms(boxes, scores, max_output_size, iou_threshold, *, impl, valid=None):
    """Class-agnostic greedy NMS per image of [B, N, 4] boxes and [B, N] scores.

    Returns ``(indices int32 [B, K], valid bool [B, K])`` in decreasing score order; rows past
    the number kept have index 0 and valid False. Boxes not ``valid`` are never selected.
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    scores = tf.convert_to_tensor(scores, tf.float32)
    if valid is None:
        valid = tf.math.is_finite(scores)
    valid = tf.logical_and(tf.cast(valid, tf.bool), tf.math.is_finite(scores))
    valid = tf.logical_and(valid, box_ops.area(boxes) > 0.0)
    k = int(max_output_size)
    if impl == "padded":
        # The padded kernel skips all-zero boxes: invalid ones are zeroed and sorted last, valid
        # ones shifted to positive coordinates (IoU is translation invariant).
        shift = tf.reduce_min(tf.where(valid[..., None], boxes, 0.0), axis=[1, 2], keepdims=True)
        shifted = boxes - tf.minimum(shift, 0.0) + 1.0
        shifted = tf.where(valid[..., None], shifted, 0.0)
        lowest = tf.reduce_min(tf.where(valid, scores, 0.0), axis=1, keepdims=True)
        ranked = tf.where(valid, scores, lowest - 1.0)
        idx, num = tf.image.non_max_suppression_padded(
            shifted,
            ranked,
            k,
            iou_threshold=iou_threshold,
            pad_to_max_output_size=True,
            canonicalized_coordinates=True,
        )
        idx = tf.reshape(idx, [-1, k])
    elif impl == "per_image":
        # XLA's NonMaxSuppressionV3 needs max_output_size <= the number of boxes.
        n_boxes = _static_dim(boxes, 1)
        k_run = min(k, n_boxes) if isinstance(n_boxes, int) else tf.minimum(k, n_boxes)

        def one(args):
            b, s, v = args
            s = tf.where(v, s, NEG_INF)
            # -inf scores never pass score_threshold. V4 (V3 padded to k_run, count returned)
            # maps one to one onto LiteRT's builtin, which has no dynamic-size output.
            sel, n = tf.raw_ops.NonMaxSuppressionV4(
                boxes=b,
                scores=s,
                max_output_size=k_run,
                iou_threshold=iou_threshold,
                score_threshold=NEG_INF,
                pad_to_max_output_size=True,
            )
            return tf.pad(sel, [[0, k - tf.shape(sel)[0]]]), n

        idx, num = tf.map_fn(
            one,
            (boxes, scores, valid),
            fn_output_signature=(tf.TensorSpec([k], tf.int32), tf.TensorSpec([], tf.int32)),
        )
    else:
        raise ValueError(f"unknown NMS impl {impl!r}")
    keep = tf.range(k, dtype=tf.int32)[None, :] < tf.reshape(num, [-1, 1])
    # A box that is invalid can only come out of the kernels as padding; be safe.
    keep = tf.logical_and(keep, tf.gather(valid, idx, batch_dims=1))
    idx = tf.where(keep, idx, 0)
    return idx, keep


def _as_level_list(x, names):
    if isinstance(x, dict):
        return [x[n] for n in names]
    return list(x)


def generate_proposals(
    objectness,
    box_deltas,
    anchors,
    image_shape,
    *,
    pre_nms_top_k,
    post_nms_top_k,
    nms_iou,
    min_size,
    nms_impl,
    nms_per_level,
    box_weights=(1.0, 1.0, 1.0, 1.0),
):
    """RPN outputs -> :class:`Proposals` with ``K = post_nms_top_k`` (FPN §4.1).

    Per level: the top ``pre_nms_top_k`` anchors by objectness, decoded, clipped to the valid
    ``image_shape`` ([B, 2], [2] or scalar); boxes with a side <= ``min_size`` dropped. Then one
    NMS over all levels, or with ``nms_per_level`` (detectron2, torchvision) one per level and
    the best ``K`` survivors. ``objectness`` [B, A_l] logits and ``box_deltas`` [B, A_l, 4] are
    dicts by level (or lists) flattened as ``anchors`` (``OrderedDict level -> [A_l, 4]``).
    """
    names = list(anchors.keys()) if isinstance(anchors, dict) else None
    anchor_list = _as_level_list(anchors, names) if names else list(anchors)
    if names is None:
        names = list(range(len(anchor_list)))
    logit_list = _as_level_list(objectness, names)
    delta_list = _as_level_list(box_deltas, names)

    all_boxes, all_scores, all_valid = [], [], []
    for logits, deltas, anc in zip(logit_list, delta_list, anchor_list):
        logits = tf.cast(logits, tf.float32)
        deltas = tf.cast(deltas, tf.float32)
        anc = tf.cast(anc, tf.float32)
        num = _static_dim(logits, 1)
        k = min(pre_nms_top_k, num) if isinstance(num, int) else tf.minimum(pre_nms_top_k, num)
        top_logits, top_idx = tf.math.top_k(logits, k=k, sorted=False)  # [B, k]
        top_deltas = tf.gather(deltas, top_idx, batch_dims=1)  # [B, k, 4]
        if anc.shape.rank == 2:
            top_anchors = tf.gather(anc, top_idx)
        else:
            top_anchors = tf.gather(anc, top_idx, batch_dims=1)
        boxes = box_ops.decode_boxes(top_deltas, top_anchors, box_weights)
        boxes = box_ops.clip_boxes(boxes, image_shape)
        ok = box_ops.valid_box_mask(boxes, min_size)
        ok = tf.logical_and(ok, tf.math.is_finite(top_logits))
        ok = tf.logical_and(ok, tf.reduce_all(tf.math.is_finite(boxes), axis=-1))
        all_boxes.append(tf.where(ok[..., None], boxes, 0.0))
        all_scores.append(tf.where(ok, top_logits, NEG_INF))
        all_valid.append(ok)
    if nms_per_level:
        return _nms_per_level(all_boxes, all_scores, all_valid, post_nms_top_k, nms_iou, nms_impl)
    boxes = tf.concat(all_boxes, axis=1)
    scores = tf.concat(all_scores, axis=1)
    valid = tf.concat(all_valid, axis=1)

    idx, keep = batched_nms(boxes, scores, post_nms_top_k, nms_iou, valid=valid, impl=nms_impl)
    out_boxes = tf.where(keep[..., None], tf.gather(boxes, idx, batch_dims=1), 0.0)
    out_scores = tf.where(keep, tf.sigmoid(tf.gather(scores, idx, batch_dims=1)), 0.0)
    return Proposals(out_boxes, out_scores, keep)


def _nms_per_level(level_boxes, level_scores, level_valid, post_nms_top_k, nms_iou, nms_impl):
    """generate_proposals(nms_per_level=True): NMS on each level's candidates, then the
    ``post_nms_top_k`` best survivors of all levels (ties: lower level first)."""
    k = int(post_nms_top_k)
    kept_boxes, kept_scores = [], []
    for boxes, scores, valid in zip(level_boxes, level_scores, level_valid):
        n = _static_dim(scores, 1)
        k_level = min(k, n) if isinstance(n, int) else k
        idx, keep = batched_nms(boxes, scores, k_level, nms_iou, valid=valid, impl=nms_impl)
        kept_boxes.append(tf.gather(boxes, idx, batch_dims=1))
        kept_scores.append(tf.where(keep, tf.gather(scores, idx, batch_dims=1), NEG_INF))
    boxes = tf.concat(kept_boxes, axis=1)
    scores = tf.concat(kept_scores, axis=1)
    total = _static_dim(scores, 1)
    k_top = min(k, total) if isinstance(total, int) else k  # a dynamic level gives k rows
    top_scores, top_idx = tf.math.top_k(scores, k=k_top, sorted=True)
    top_boxes = tf.gather(boxes, top_idx, batch_dims=1)
    if k_top < k:
        top_scores = tf.pad(top_scores, [[0, 0], [0, k - k_top]], constant_values=NEG_INF)
        top_boxes = tf.pad(top_boxes, [[0, 0], [0, k - k_top], [0, 0]])
    keep = tf.math.is_finite(top_scores)
    out_boxes = tf.where(keep[..., None], top_boxes, 0.0)
    out_scores = tf.where(keep, tf.sigmoid(top_scores), 0.0)
    return Proposals(out_boxes, out_scores, keep)


def postprocess_detections(
    class_probs,
    box_deltas,
    rois,
    image_shape,
    *,
    score_threshold,
    nms_iou,
    max_detections,
    box_weights,
    nms_impl,
    min_box_size,
    pre_nms_top_k=5000,
):
    """Fast R-CNN outputs -> :class:`Detections` (FPN §4.2 inference).

    Class-specific boxes are decoded and clipped; each (RoI, class) with probability >
    ``score_threshold`` (and, if ``min_box_size > 0``, both sides >= it) is a candidate; NMS per
    class; the ``max_detections`` best kept. ``nms_impl="combined"`` is
    ``combined_non_max_suppression`` (no XLA kernel); "padded" / "per_image" run one
    :func:`batched_nms` over the ``pre_nms_top_k`` best candidates with boxes offset per class
    (detectron2's trick): the same unless more than ``pre_nms_top_k`` candidates pass.

    ``class_probs`` [B, R, C + 1] (column 0 background); ``box_deltas`` [B, R, C, 4] (also
    [B, R, C + 1, 4] or flattened); ``rois`` [B, R, 4] pixels, zero-area rows give nothing.
    """
    class_probs = tf.cast(class_probs, tf.float32)
    box_deltas = tf.cast(box_deltas, tf.float32)
    rois = tf.cast(rois, tf.float32)
    num_classes = class_probs.shape[-1] - 1
    if box_deltas.shape.rank == 3:
        box_deltas = tf.reshape(box_deltas, tf.concat([tf.shape(box_deltas)[:2], [-1, 4]], axis=0))
        box_deltas.set_shape(rois.shape[:2].concatenate([None, 4]))
    if box_deltas.shape[2] == num_classes + 1:
        box_deltas = box_deltas[:, :, 1:, :]
    box_deltas = tf.ensure_shape(box_deltas, [None, None, num_classes, 4])

    boxes = box_ops.decode_boxes(box_deltas, rois[:, :, None, :], box_weights)  # [B,R,C,4]
    boxes = box_ops.clip_boxes(boxes, image_shape)
    scores = class_probs[:, :, 1:]  # [B, R, C]
    ok = tf.reduce_all(tf.math.is_finite(boxes), axis=-1)
    ok = tf.logical_and(ok, tf.math.is_finite(scores))
    # Zero-area RoIs are padding (e.g. the zero rows of generate_proposals).
    ok = tf.logical_and(ok, (box_ops.area(rois) > 0.0)[:, :, None])
    if min_box_size > 0:
        ymin, xmin, ymax, xmax = tf.unstack(boxes, num=4, axis=-1)
        big = tf.logical_and(ymax - ymin >= min_box_size, xmax - xmin >= min_box_size)
        ok = tf.logical_and(ok, big)
    scores = tf.where(ok, scores, 0.0)
    boxes = tf.where(ok[..., None], boxes, 0.0)
    d = int(max_detections)

    if nms_impl == "combined":
        nmsed_boxes, nmsed_scores, nmsed_classes, num = tf.image.combined_non_max_suppression(
            boxes,
            scores,
            max_output_size_per_class=d,
            max_total_size=d,
            iou_threshold=nms_iou,
            score_threshold=score_threshold,
            pad_per_class=False,
            clip_boxes=False,
        )
        num = tf.cast(num, tf.int32)
        keep = tf.range(d, dtype=tf.int32)[None, :] < num[:, None]
        classes = tf.where(keep, tf.cast(nmsed_classes, tf.int32) + 1, 0)
        out_boxes = tf.where(keep[..., None], nmsed_boxes, 0.0)
        out_scores = tf.where(keep, nmsed_scores, 0.0)
        return Detections(out_boxes, out_scores, classes, num)

    # Class-offset trick + one class-agnostic NMS.
    batch = tf.shape(scores)[0]
    flat_scores = tf.reshape(scores, [batch, -1])  # [B, R*C], index = r * C + c
    flat_boxes = tf.reshape(boxes, [batch, -1, 4])
    total = _static_dim(flat_scores, 1)
    k = min(pre_nms_top_k, total) if isinstance(total, int) else tf.minimum(pre_nms_top_k, total)
    top_scores, top_idx = tf.math.top_k(flat_scores, k=k, sorted=True)
    top_boxes = tf.gather(flat_boxes, top_idx, batch_dims=1)
    top_classes = top_idx % num_classes  # 0-based
    cand_valid = top_scores > score_threshold
    extent = tf.reduce_max(tf.abs(top_boxes)) + 1.0
    offset_boxes = top_boxes + (tf.cast(top_classes, tf.float32) * extent)[..., None]
    idx, keep = batched_nms(offset_boxes, top_scores, d, nms_iou, valid=cand_valid, impl=nms_impl)
    out_boxes = tf.where(keep[..., None], tf.gather(top_boxes, idx, batch_dims=1), 0.0)
    out_scores = tf.where(keep, tf.gather(top_scores, idx, batch_dims=1), 0.0)
    classes = tf.where(keep, tf.gather(top_classes, idx, batch_dims=1) + 1, 0)
    num = tf.reduce_sum(tf.cast(keep, tf.int32), axis=1)
    return Detections(out_boxes, out_scores, tf.cast(classes, tf.int32), num)
