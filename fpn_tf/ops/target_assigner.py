"""Training targets: RPN anchor labels and the Fast R-CNN RoI sampler.

Pure TensorFlow, batched over images, static output shapes, usable under
``tf.function(jit_compile=True)``. Sampling gives every candidate a uniform random key and takes
the ``tf.math.top_k``: stateful ``tf.random.uniform``, or ``tf.random.stateless_uniform`` when a
``seed`` [2] is passed (reproducible).

Ground truth (WORKSPACE.md): ``gt_boxes [B, N, 4]`` yxyx pixels, ``gt_classes [B, N]`` 1..C for
objects and -1 for padding rows, ``gt_is_crowd [B, N]`` bool.

Crowd boxes are never matched (no positive / foreground, no regression target). A candidate that
would be negative / background is ignored (-1, never sampled) when more than
``crowd_ioa_threshold`` of its own area lies inside a crowd box (intersection over the
candidate's area, the original Detectron's rule: crowd regions are much larger than the anchors
inside them, so their IoU would be small).

The RPN assignment's cost is the dense [B, A, N] IoU: keep ``max_num_instances`` tight.
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
RpnTargets.__doc__ = """RPN targets.

labels: int32 [B, A]: 1 sampled positive, 0 sampled negative, -1 not sampled / ignored.
box_targets: float32 [B, A, 4] deltas (weights (1,1,1,1) by default) of the matched gt
  w.r.t. the anchor, for every positive anchor (sampled or not); zeros elsewhere.
matched_gt_indices: int32 [B, A] index into the gt rows for every positive anchor
  (sampled or not), -1 elsewhere.
"""

RoiTargets = collections.namedtuple(
    "RoiTargets",
    ["rois", "class_targets", "box_targets", "foreground_mask", "valid_mask", "matched_gt_indices"],
)
RoiTargets.__doc__ = """Fast R-CNN training RoIs, S = num_samples per image.

rois: float32 [B, S, 4] sampled RoIs (gradient stopped), foreground rows first,
  then background rows, then (only when there were not enough candidates) zero rows.
class_targets: int32 [B, S]: gt class 1..C for foreground, 0 for background,
  -1 for padding rows (valid_mask False; give them zero loss weight).
box_targets: float32 [B, S, 4] deltas (weights (10,10,5,5)) of the matched gt w.r.t.
  the RoI for foreground rows; zeros elsewhere.
foreground_mask: bool [B, S].
valid_mask: bool [B, S]: the row is a sampled RoI (foreground or background).
matched_gt_indices: int32 [B, S]: gt row of foreground RoIs, -1 elsewhere.
"""


def _random_uniform(shape, seed):
    if seed is None:
        return tf.random.uniform(shape, dtype=tf.float32)
    return tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)


def _static_or_dynamic(x, axis):
    s = x.shape[axis]
    return s if s is not None else tf.shape(x)[axis]


def sample_balanced(candidates, num_to_take, max_take, random_keys):
    """Picks ``num_to_take[b]`` random ``True`` entries of each row (at most all).

    Args:
      candidates: bool [B, M].
      num_to_take: int32 [B] or python int, how many to pick per row.
      max_take: python int, an upper bound of ``num_to_take`` (the static
        ``top_k`` size; it is reduced to ``M`` when ``M`` is smaller).
      random_keys: float32 [B, M] in [0, 1): the random priorities.
    Returns:
      bool [B, M], the picked entries (a subset of ``candidates``).
    """
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


def _iou_and_crowd_ioa(boxes, gt_boxes, crowd, crowd_ioa_threshold):
    """IoU [B, M, N] and a bool [B, M]: the box lies (> threshold) inside a crowd box."""
    inter = box_ops.pairwise_intersection(boxes, gt_boxes)  # [B, M, N]
    box_area = box_ops.area(boxes)[..., :, None]
    union = box_area + box_ops.area(gt_boxes)[..., None, :] - inter
    iou = tf.math.divide_no_nan(inter, tf.maximum(union, 0.0))

    def crowd_test():
        # inter / box_area > t  <=>  inter > t * box_area (box_area >= 0).
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
    """RPN anchor labels and regression targets (FPN §4.1 / Faster R-CNN §3.1.2).

    Over the non-crowd real gt of the image: positive (1) if max IoU > ``positive_iou`` (the
    paper's "higher than"; ``>=`` with ``positive_iou_inclusive``, as torchvision's and
    detectron2's Matcher) or the anchor ties a gt's highest IoU (when that is > 0); negative (0)
    if max IoU < ``negative_iou``; ignored (-1) otherwise, and negatives more than
    ``crowd_ioa_threshold`` inside a crowd box. Border-crossing anchors are kept. Then
    ``num_samples`` per image are sampled, at most ``num_samples * positive_fraction``
    positive; anchors not sampled get -1.

    Args:
      anchors: float [A, 4] (shared by the batch) or [B, A, 4].
      gt_boxes: float [B, N, 4].
      gt_classes: int [B, N]; rows with class <= 0 are padding.
      gt_is_crowd: bool [B, N] or None.
      positive_iou, negative_iou, positive_iou_inclusive: the labelling above.
      num_samples, positive_fraction: the per-image sample.
      crowd_ioa_threshold: see the module docstring.
      box_weights: box coder weights.
      seed: None (stateful RNG) or an int tensor [2] for stateless sampling.
    Returns:
      :class:`RpnTargets` ``(labels int32 [B, A], box_targets float32 [B, A, 4],
      matched_gt_indices int32 [B, A])``.
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
    # Outside XLA the [B, A, N] IoU runs only over the first n columns, n = the most real gt
    # rows of any image (padding rows cost as much as real ones; the outputs are the same).
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
    batch = tf.shape(gt_boxes)[0]

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

    num_anchors = _static_or_dynamic(iou, 1)
    keys = _random_uniform(tf.stack([batch, tf.cast(num_anchors, tf.int32)]), seed)
    max_pos = int(num_samples * positive_fraction)
    pos_sampled = sample_balanced(positive, max_pos, max_pos, keys)
    num_pos = tf.reduce_sum(tf.cast(pos_sampled, tf.int32), axis=1)
    neg_sampled = sample_balanced(negative, num_samples - num_pos, num_samples, keys)
    labels = tf.where(pos_sampled, 1, tf.where(neg_sampled, 0, -1))
    labels = tf.cast(labels, tf.int32)

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
    """Fast R-CNN RoI sampling (FPN §4.2 / Fast R-CNN §2.3).

    The real non-crowd gt boxes are appended to the proposals; every candidate is
    matched to the gt of highest IoU; foreground: IoU >= ``foreground_iou``;
    background: IoU < ``background_iou_high`` (an image
    without gt: every valid candidate is background). Crowd gt are never matched
    and never appended; background candidates more than ``crowd_ioa_threshold``
    inside a crowd box are dropped. Per image at most ``num_samples *
    foreground_fraction`` random foreground RoIs are taken and background RoIs
    fill the sample up to ``num_samples``. If there are not enough candidates
    the rest of the ``num_samples`` rows are padding (``valid_mask`` False).

    The proposals are wrapped in ``tf.stop_gradient`` (no gradient through the
    proposal coordinates, as in Faster R-CNN's approximate joint training).

    Args:
      proposals: float [B, K, 4].
      gt_boxes: float [B, N, 4]; gt_classes: int [B, N] (<= 0: padding);
      gt_is_crowd: bool [B, N] or None.
      proposal_valid: bool [B, K] or None; zero-area proposals are always invalid.
      num_samples, foreground_fraction: the per-image sample (paper: 512, 0.25).
      foreground_iou, background_iou_high: the IoU thresholds (paper: 0.5, 0.5).
      crowd_ioa_threshold: see the module docstring.
      box_weights: the box coder weights.
      seed: None or an int tensor [2] for stateless sampling.
    Returns:
      :class:`RoiTargets`, every field with leading dims [B, num_samples].
    """

    proposals = tf.stop_gradient(tf.convert_to_tensor(proposals, tf.float32))
    gt_boxes, gt_classes, crowd, matchable = _prepare_gt(gt_boxes, gt_classes, gt_is_crowd)
    gt_classes = tf.cast(gt_classes, tf.int32)
    batch = tf.shape(proposals)[0]

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
    keys = _random_uniform(tf.stack([batch, tf.cast(num_cand, tf.int32)]), seed)
    max_fg = int(num_samples * foreground_fraction)
    fg_sampled = sample_balanced(foreground, max_fg, max_fg, keys)
    num_fg = tf.reduce_sum(tf.cast(fg_sampled, tf.int32), axis=1)
    bg_sampled = sample_balanced(background, num_samples - num_fg, num_samples, keys)

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
