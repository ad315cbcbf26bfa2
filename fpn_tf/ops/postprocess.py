"""RPN proposal generation and Fast R-CNN detection post-processing (pure TF).

Both are batched over images with static output shapes. Every setting is an explicit argument;
the defaults live in the config (``RpnConfig``, ``RoIConfig``).

``batched_nms`` has two implementations that keep the same boxes:

* ``"padded"``: ``tf.image.non_max_suppression_padded`` on the whole batch (one batched op,
  what accelerators prefer); suppresses at ``IoU >= threshold``.
* ``"per_image"``: ``tf.map_fn`` over the images of the greedy kernel (NonMaxSuppressionV4),
  padded to a static size; faster on CPU; suppresses at ``IoU > threshold``.

They differ only on exact IoU ties. Everything here compiles with ``jit_compile=True`` except
``postprocess_detections(nms_impl="combined")`` (``CombinedNonMaxSuppression`` has no XLA
kernel).
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
Proposals.__doc__ = """RPN proposals, K = post_nms_top_k.

boxes: float32 [B, K, 4] yxyx pixels, highest score first; padding rows are zero.
scores: float32 [B, K] objectness probabilities (sigmoid of the logit); 0 for padding.
valid: bool [B, K].
"""

Detections = collections.namedtuple("Detections", ["boxes", "scores", "classes", "num_detections"])
Detections.__doc__ = """Final detections, D = max_detections.

boxes: float32 [B, D, 4] yxyx pixels; scores float32 [B, D]; classes int32 [B, D]
(contiguous 1..C); num_detections int32 [B]. Rows >= num_detections are zero.
"""

NEG_INF = float("-inf")


def _static_dim(x, axis):
    d = x.shape[axis]
    return d if d is not None else tf.shape(x)[axis]


def batched_nms(boxes, scores, max_output_size, iou_threshold, *, impl, valid=None):
    """Class-agnostic greedy NMS on every image of a batch.

    Args:
      boxes: float32 [B, N, 4] yxyx with ymin <= ymax, xmin <= xmax.
      scores: float32 [B, N] (any real values).
      max_output_size: python int K.
      iou_threshold: float.
      valid: optional bool [B, N]; invalid boxes are never selected.
      impl: "padded" or "per_image" (see the module docstring).
    Returns:
      ``(indices int32 [B, K], valid bool [B, K])``: indices into N in decreasing
      score order; rows past the number kept have index 0 and valid False.
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    scores = tf.convert_to_tensor(scores, tf.float32)
    if valid is None:
        valid = tf.math.is_finite(scores)
    valid = tf.logical_and(tf.cast(valid, tf.bool), tf.math.is_finite(scores))
    valid = tf.logical_and(valid, box_ops.area(boxes) > 0.0)
    k = int(max_output_size)
    if impl == "padded":
        # The padded kernel treats an all-zero (all <= 0) box as "not selected":
        # invalid boxes are zeroed and sorted last. Valid boxes are shifted to
        # positive coordinates (IoU is translation invariant) so that none of
        # them can look empty.
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
            # The kernel only considers scores > score_threshold: -inf never passes.
            # NonMaxSuppressionV4 = V3 (tf.image.non_max_suppression) with a static output
            # padded to k_run and the count returned: same boxes, and an op that converters
            # outside TensorFlow map one to one (LiteRT's builtin NON_MAX_SUPPRESSION_V4 has no
            # dynamic-size output, so V3's length would be lost there).
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
    """RPN outputs -> proposals (FPN §4.1 "Proposals").

    Per level: the top ``pre_nms_top_k`` anchors by objectness, decoded (dw/dh clamped at
    log(1000/16)), clipped to the image's valid area; boxes with a side <= ``min_size`` are
    dropped. Then one NMS at ``nms_iou`` over all levels keeps the top ``post_nms_top_k`` per
    image; with ``nms_per_level`` (detectron2, torchvision) each level's candidates get their
    own NMS and the ``post_nms_top_k`` best survivors of all levels are kept.

    Args:
      objectness: dict level -> float [B, A_l] logits (or a list in level order).
      box_deltas: dict level -> float [B, A_l, 4] (or a list).
      anchors: ``OrderedDict level -> [A_l, 4]`` (``anchors.generate_anchors``),
        in the same level order and flattening as the head outputs.
      image_shape: [B, 2] (or [2] / scalar) valid (unpadded) ``(height, width)``.
      pre_nms_top_k, post_nms_top_k: python ints.
      nms_iou: the NMS IoU threshold.
      min_size: minimum box side in pixels.
      nms_impl: "padded" or "per_image".
      nms_per_level: one NMS per level (True) or over all levels (False).
      box_weights: the RPN box coder weights.
    Returns:
      :class:`Proposals` ``(boxes [B, K, 4], scores [B, K], valid [B, K])``,
      ``K = post_nms_top_k``.
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
    """Fast R-CNN outputs -> final detections (FPN §4.2 inference).

    Class-specific boxes are decoded and clipped; every (RoI, class) pair with probability >
    ``score_threshold`` is a candidate (with ``min_box_size > 0`` only if both sides of its box
    are >= it, torchvision's ``remove_small_boxes``); NMS at ``nms_iou`` runs per class; the
    ``max_detections`` best of all classes are kept.

    ``nms_impl``: "combined" is ``tf.image.combined_non_max_suppression``, which does exactly
    that (no XLA kernel); "padded" / "per_image" (XLA-compatible) run one class-agnostic
    :func:`batched_nms` over the ``pre_nms_top_k`` best candidates with each class's boxes
    offset so that classes never overlap (detectron2's trick): the same detections unless more
    than ``pre_nms_top_k`` candidates pass the threshold.

    Args:
      class_probs: float [B, R, C + 1] softmax probabilities, column 0 background.
      box_deltas: float [B, R, C, 4] class-specific deltas (also accepted:
        [B, R, C + 1, 4] with a background column, or [B, R, 4 * C] / [B, R, 4 * (C + 1)]).
      rois: float [B, R, 4] yxyx pixels; zero-area RoIs (the padding rows of
        :func:`generate_proposals`) give no detection.
      image_shape: [B, 2] (or [2] / scalar) valid ``(height, width)``.
      score_threshold, nms_iou, max_detections: the candidates' score floor, the NMS IoU
        threshold, detections kept per image.
      box_weights: the box coder weights of the deltas.
      nms_impl: "combined", "padded" or "per_image".
      pre_nms_top_k: candidate cap of the "padded" / "per_image" paths.
      min_box_size: boxes with a side < this are no candidates; 0 = no filter.
    Returns:
      :class:`Detections`.
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
