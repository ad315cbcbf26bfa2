"""Training targets: RPN anchor labels and the Fast R-CNN RoI sampler (pure TF, batched, XLA).

Sampling takes the ``top_k`` of uniform random keys (stateless and reproducible when a ``seed``
[2] is passed). Ground truth: ``gt_boxes [B, N, 4]`` yxyx pixels, ``gt_classes [B, N]`` 1..C and
-1 for padding, ``gt_is_crowd [B, N]``. Crowd boxes are never matched; a would-be negative /
background candidate with more than ``crowd_ioa_threshold`` of its own area inside a crowd box is
ignored (Detectron's rule: crowd regions dwarf the anchors inside, so IoU would be small).
"""

import collections

import tensorflow as tf

from fpn_tf.ops import box_ops
from fpn_tf.ops.xla_utils import in_xla_context

__all__ = [
    "RpnTargets",
    "RoiTargets",
    "assign_rpn_targets",
    "sample_rois",
    "sample_balanced",
]

RpnTargets = collections.namedtuple("RpnTargets", ["labels", "box_targets", "matched_gt_indices"])
RpnTargets.__doc__ = """labels int32 [B, A]: 1 sampled positive, 0 sampled negative, -1 else;
box_targets float32 [B, A, 4] and matched_gt_indices int32 [B, A] for every positive anchor
(sampled or not), zeros / -1 elsewhere."""

RoiTargets = collections.namedtuple(
    "RoiTargets",
    ["rois", "class_targets", "box_targets", "foreground_mask", "valid_mask", "matched_gt_indices"],
)
RoiTargets.__doc__ = """Fast R-CNN training RoIs, S = num_samples per image: rois float32
[B, S, 4] (gradient stopped; foreground, then background, then zero padding rows);
class_targets int32 [B, S] (1..C, 0 background, -1 padding); box_targets [B, S, 4] (foreground
only); foreground_mask, valid_mask (sampled) bool [B, S]; matched_gt_indices (-1 unless
foreground)."""


def _random_uniform(shape, seed):
    if seed is None:
        return tf.random.uniform(shape, dtype=tf.float32)
    return tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)


def _static_or_dynamic(x, axis):
    s = x.shape[axis]
    return s if s is not None else tf.shape(x)[axis]


def sample_balanced(candidates, num_to_take, max_take, random_keys):
    """bool [B, M]: ``num_to_take[b]`` (int or [B]) of each row's ``True`` candidates, those of
    the highest ``random_keys``; ``max_take`` (python int) bounds ``num_to_take``."""
    m = _static_or_dynamic(candidates, 1)
    k = min(max_take, m) if isinstance(m, int) else tf.minimum(max_take, m)
    keys = tf.where(candidates, random_keys, -1.0)
    top_keys, top_idx = tf.math.top_k(keys, k=k, sorted=True)  # [B, k]
    num_to_take = tf.convert_to_tensor(num_to_take, tf.int32)
    if num_to_take.shape.rank == 0:
        num_to_take = tf.fill([tf.shape(candidates)[0]], num_to_take)
    take = tf.logical_and(
        tf.range(k, dtype=tf.int32)[None, :] < num_to_take[:, None], top_keys >= 0.0
    )
    batch = tf.shape(candidates)[0]
    batch_idx = tf.broadcast_to(tf.range(batch, dtype=tf.int32)[:, None], tf.shape(top_idx))
    scatter_idx = tf.stack([batch_idx, top_idx], axis=-1)  # [B, k, 2]
    picked = tf.tensor_scatter_nd_update(
        tf.zeros(tf.shape(candidates), tf.int32), scatter_idx, tf.cast(take, tf.int32)
    )
    return picked > 0


def _prepare_gt(gt_boxes, gt_classes, gt_is_crowd):
    gt_boxes = tf.convert_to_tensor(gt_boxes, tf.float32)
    gt_classes = tf.convert_to_tensor(gt_classes)
    if gt_is_crowd is None:
        gt_is_crowd = tf.zeros(tf.shape(gt_classes), tf.bool)
    gt_is_crowd = tf.cast(gt_is_crowd, tf.bool)
    if gt_boxes.shape[1] == 0:
        # No gt rows at all: add one padding row so that argmax / gathers are defined.
        gt_boxes = tf.zeros([tf.shape(gt_boxes)[0], 1, 4], tf.float32)
        gt_classes = -tf.ones([tf.shape(gt_classes)[0], 1], gt_classes.dtype)
        gt_is_crowd = tf.zeros([tf.shape(gt_classes)[0], 1], tf.bool)
    valid = gt_classes > 0
    crowd = tf.logical_and(valid, gt_is_crowd)
    matchable = tf.logical_and(valid, tf.logical_not(gt_is_crowd))
    return gt_boxes, gt_classes, crowd, matchable


def _sample_pair(positive, negative, num_samples, fraction, seed):
    """Samples at most ``num_samples * fraction`` positives, then negatives up to
    ``num_samples``; returns (positive sampled, negative sampled, keys)."""
    m = _static_or_dynamic(positive, 1)
    keys = _random_uniform(tf.stack([tf.shape(positive)[0], tf.cast(m, tf.int32)]), seed)
    max_pos = int(num_samples * fraction)
    pos_sampled = sample_balanced(positive, max_pos, max_pos, keys)
    num_pos = tf.reduce_sum(tf.cast(pos_sampled, tf.int32), axis=1)
    return pos_sampled, sample_balanced(negative, num_samples - num_pos, num_samples, keys), keys


def _iou_and_crowd_ioa(boxes, gt_boxes, crowd, crowd_ioa_threshold):
    """IoU [B, M, N] and a bool [B, M]: the box lies (> threshold) inside a crowd box."""
    inter = box_ops.pairwise_intersection(boxes, gt_boxes)  # [B, M, N]
    iou = box_ops.pairwise_iou(boxes, gt_boxes, intersection=inter)

    def crowd_test():
        # inter / box_area > t  <=>  inter > t * box_area (box_area >= 0).
        box_area = box_ops.area(boxes)[..., :, None]
        inside = tf.logical_and(inter > crowd_ioa_threshold * box_area, inter > 0.0)
        return tf.reduce_any(tf.logical_and(inside, crowd[:, None, :]), axis=-1)

    def no_crowd():
        return tf.zeros(tf.shape(iou)[:-1], tf.bool)

    # Most batches have no crowd box: skip the extra [B, M, N] pass then.
    in_crowd = tf.cond(tf.reduce_any(crowd), crowd_test, no_crowd)
    return iou, in_crowd


def assign_rpn_targets(
    anchors,
    gt_boxes,
    gt_classes,
    gt_is_crowd=None,
    *,
    positive_iou,
    negative_iou,
    num_samples,
    positive_fraction,
    positive_iou_inclusive,
    crowd_ioa_threshold=0.7,
    box_weights=(1.0, 1.0, 1.0, 1.0),
    seed=None,
):
    """:class:`RpnTargets` of ``anchors`` [A, 4] or [B, A, 4] (FPN §4.1, Faster R-CNN §3.1.2).

    Positive if max IoU > ``positive_iou`` (``>=`` with ``positive_iou_inclusive``, as the
    torchvision / detectron2 Matcher) or the anchor ties a gt's highest IoU (> 0); negative if
    max IoU < ``negative_iou``; else ignored. Border-crossing anchors are kept. ``num_samples``
    per image are sampled, at most ``num_samples * positive_fraction`` positive.
    """
    settings = dict(
        positive_iou=positive_iou,
        negative_iou=negative_iou,
        crowd_ioa_threshold=crowd_ioa_threshold,
        num_samples=num_samples,
        positive_fraction=positive_fraction,
        box_weights=box_weights,
        seed=seed,
        positive_iou_inclusive=positive_iou_inclusive,
    )
    if in_xla_context() or tf.convert_to_tensor(gt_boxes).shape[1] == 0:
        return _assign_rpn_targets(anchors, gt_boxes, gt_classes, gt_is_crowd, **settings)
    # Outside XLA the [B, A, N] IoU runs only over the most real gt rows of any image.
    gt_classes = tf.convert_to_tensor(gt_classes)
    if gt_is_crowd is None:
        gt_is_crowd = tf.zeros(tf.shape(gt_classes), tf.bool)
    real = tf.cast(gt_classes > 0, tf.int32)
    n = tf.maximum(tf.reduce_max(tf.reduce_sum(real, axis=1)), 1)
    order = tf.argsort(-real, axis=1, stable=True)[:, :n]  # real rows first, in order
    gt = [tf.convert_to_tensor(gt_boxes, tf.float32), gt_classes, tf.cast(gt_is_crowd, tf.bool)]
    out = _assign_rpn_targets(anchors, *[tf.gather(t, order, batch_dims=1) for t in gt], **settings)
    matched = tf.where(
        out.matched_gt_indices >= 0,
        tf.gather(order, tf.maximum(out.matched_gt_indices, 0), batch_dims=1),
        -1,
    )
    return RpnTargets(out.labels, out.box_targets, matched)


def _assign_rpn_targets(
    anchors,
    gt_boxes,
    gt_classes,
    gt_is_crowd,
    *,
    positive_iou,
    negative_iou,
    crowd_ioa_threshold,
    num_samples,
    positive_fraction,
    box_weights,
    seed,
    positive_iou_inclusive,
):
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    gt_boxes, _, crowd, matchable = _prepare_gt(gt_boxes, gt_classes, gt_is_crowd)

    # IoU [B, A, N] (anchors [A, 4] broadcast against the batch).
    iou, in_crowd = _iou_and_crowd_ioa(anchors, gt_boxes, crowd, crowd_ioa_threshold)
    iou = tf.where(matchable[:, None, :], iou, -1.0)
    max_iou = tf.reduce_max(iou, axis=-1)  # [B, A]; -1 when the image has no gt
    matched = tf.argmax(iou, axis=-1, output_type=tf.int32)  # [B, A]

    if positive_iou_inclusive:
        positive = max_iou >= positive_iou
    else:
        positive = max_iou > positive_iou
    # Each gt's highest-IoU anchors are positive too (low-quality matches).
    gt_best = tf.reduce_max(iou, axis=1, keepdims=True)  # [B, 1, N]
    is_best = tf.logical_and(tf.equal(iou, gt_best), gt_best > 0.0)
    is_best = tf.logical_and(is_best, matchable[:, None, :])
    positive = tf.logical_or(positive, tf.reduce_any(is_best, axis=-1))
    negative = tf.logical_and(max_iou < negative_iou, tf.logical_not(positive))
    negative = tf.logical_and(negative, tf.logical_not(in_crowd))

    pos_sampled, neg_sampled, _ = _sample_pair(
        positive, negative, num_samples, positive_fraction, seed
    )
    labels = tf.cast(tf.where(pos_sampled, 1, tf.where(neg_sampled, 0, -1)), tf.int32)

    matched_boxes = tf.gather(gt_boxes, matched, batch_dims=1)  # [B, A, 4]
    targets = box_ops.encode_boxes(matched_boxes, anchors, box_weights)
    targets = tf.where(positive[..., None], targets, 0.0)
    matched = tf.where(positive, matched, -1)
    return RpnTargets(labels, targets, matched)


def sample_rois(
    proposals,
    gt_boxes,
    gt_classes,
    gt_is_crowd=None,
    proposal_valid=None,
    *,
    num_samples,
    foreground_fraction,
    foreground_iou,
    box_weights,
    background_iou_high=0.5,
    crowd_ioa_threshold=0.7,
    seed=None,
):
    """:class:`RoiTargets` of ``proposals`` [B, K, 4] (FPN §4.2, Fast R-CNN §2.3).

    The real non-crowd gt boxes join the candidates; foreground: max IoU >= ``foreground_iou``,
    background: < ``background_iou_high`` (every valid candidate without gt). At most
    ``num_samples * foreground_fraction`` foreground, background fills up to ``num_samples``,
    then padding rows. No gradient flows through the proposals (approximate joint training);
    zero-area or not ``proposal_valid`` proposals are never sampled.
    """

    proposals = tf.stop_gradient(tf.convert_to_tensor(proposals, tf.float32))
    gt_boxes, gt_classes, crowd, matchable = _prepare_gt(gt_boxes, gt_classes, gt_is_crowd)
    gt_classes = tf.cast(gt_classes, tf.int32)

    valid = box_ops.valid_box_mask(proposals)
    if proposal_valid is not None:
        valid = tf.logical_and(valid, tf.cast(proposal_valid, tf.bool))
    candidates = tf.concat([proposals, gt_boxes], axis=1)
    valid = tf.concat([valid, matchable], axis=1)

    iou, in_crowd = _iou_and_crowd_ioa(candidates, gt_boxes, crowd, crowd_ioa_threshold)
    iou = tf.where(matchable[:, None, :], iou, -1.0)
    max_iou = tf.maximum(tf.reduce_max(iou, axis=-1), 0.0)  # no gt -> IoU 0
    matched = tf.argmax(iou, axis=-1, output_type=tf.int32)  # [B, M]

    foreground = tf.logical_and(valid, max_iou >= foreground_iou)
    background = tf.logical_and(valid, tf.logical_not(foreground))
    background = tf.logical_and(background, max_iou < background_iou_high)
    background = tf.logical_and(background, tf.logical_not(in_crowd))

    num_cand = _static_or_dynamic(candidates, 1)
    fg_sampled, bg_sampled, keys = _sample_pair(
        foreground, background, num_samples, foreground_fraction, seed
    )

    # Foreground first, then background, then unsampled (padding) rows.
    # Keys: foreground in [4, 5), background in [2, 3), the rest 0.
    order_key = tf.where(fg_sampled, 4.0 + keys, tf.where(bg_sampled, 2.0 + keys, 0.0))
    k = (
        min(num_samples, num_cand)
        if isinstance(num_cand, int)
        else tf.minimum(num_samples, num_cand)
    )
    top_key, idx = tf.math.top_k(order_key, k=k, sorted=True)  # [B, k]
    pad = num_samples - k
    if not isinstance(pad, int) or pad > 0:
        top_key = tf.pad(top_key, [[0, 0], [0, pad]])
        idx = tf.pad(idx, [[0, 0], [0, pad]])
    sampled = top_key > 1.0  # [B, S]
    fg = top_key > 3.5

    rois = tf.gather(candidates, idx, batch_dims=1)
    rois = tf.where(sampled[..., None], rois, 0.0)
    matched = tf.gather(matched, idx, batch_dims=1)
    classes = tf.gather(gt_classes, matched, batch_dims=1)
    classes = tf.where(fg, classes, tf.where(sampled, 0, -1))
    matched_boxes = tf.gather(gt_boxes, matched, batch_dims=1)
    box_targets = box_ops.encode_boxes(matched_boxes, rois, box_weights)
    box_targets = tf.where(fg[..., None], box_targets, 0.0)
    matched = tf.where(fg, matched, -1)
    if isinstance(num_samples, int):
        shape = [None, num_samples]
        rois.set_shape(shape + [4])
        box_targets.set_shape(shape + [4])
        for t in (classes, fg, sampled, matched):
            t.set_shape(shape)
    return RoiTargets(rois, classes, box_targets, fg, sampled, matched)
