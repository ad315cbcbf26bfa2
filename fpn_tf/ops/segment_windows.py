"""Segment-proposal windows on the pyramid (paper §6, Appendix A): geometry and targets (pure TF).

* Scale groups: a head (MLP) on level ``P_l`` handles objects of scale ``s = object_size *
  2**(l - 2)`` (an object's scale: the longer side of its box). Paper: the 5x5 MLP takes
  {32..512} px on P2..P6, the 7x7 MLP the half octaves (``object_size`` 32√2). One (head, level)
  pair is a *scale group*.
* A window at cell ``(i, j)`` of ``P_l`` is centred at ``((i + 0.5) * 2**l, (j + 0.5) * 2**l)``
  and predicts a ``mask_size`` x ``mask_size`` mask over the square *mask box* of side
  ``mask_box_scale * s`` there (paper: 1.25 s).
* Each non-crowd object goes to the group whose ``s`` is nearest its longer side in log space;
  objects outside the range are clamped to the smallest / largest group (ours).
* Its positives are that group's windows centred within the tolerance of its box centre on both
  axes (paper: ±1 cell; ``center_tolerance_unit`` "object_size" gives a fraction of ``s``); a
  window claimed by several objects goes to the nearest centre (ours). Other windows are
  negative, except would-be negatives whose mask box lies more than ``crowd_ioa_threshold``
  inside a crowd box and windows centred outside the valid image, which are ignored (ours).
* ``num_samples`` windows are sampled per image, at most ``num_samples * positive_fraction``
  positive (paper: 128, 1 : 3); negatives fill the rest.

Window order everywhere (geometry, head outputs, targets): group by group (heads as given, then
levels), cells row-major inside a group.
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np
import tensorflow as tf

from fpn_tf.ops import box_ops, target_assigner
from fpn_tf.ops.anchors import level_number, level_stride

__all__ = [
    "Windows",
    "window_geometry",
    "assign_segment_targets",
    "SegmentTargets",
]

Windows = collections.namedtuple(
    "Windows",
    ["centers", "mask_boxes", "canonical_sizes", "strides", "group_ids", "group_sizes", "groups"],
)
Windows.__doc__ = """All windows of all scale groups, R in total, in the module's order.

centers: float32 [R, 2] (y, x) pixels; mask_boxes: float32 [R, 4] yxyx pixels (not clipped: a
  mask is relative to its whole box); canonical_sizes: float32 [R] (s, the object scale of the
  window's group); strides: float32 [R] (2**l, one cell of the window's level); group_ids: int32
  [R], index into ``groups``; group_sizes: the number of windows of each group (Python ints when
  the maps' sizes are static); groups: tuple of (window_size, level name, s) per group.
"""

SegmentTargets = collections.namedtuple("SegmentTargets", ["labels", "matched_gt_indices"])
SegmentTargets.__doc__ = """labels: int32 [B, R]: 1 sampled positive, 0 sampled negative, -1 not
sampled / ignored. matched_gt_indices: int32 [B, R]: the gt row of every positive window
(sampled or not), -1 elsewhere."""

CENTER_TOLERANCE_UNITS = ("cells", "object_size")


def group_object_size(object_size: float, level) -> float:
    """The object scale s of a head whose scale on P2 is ``object_size``, on ``level``."""
    return float(object_size) * 2.0 ** (level_number(level) - 2)


def window_geometry(
    map_sizes,
    window_sizes: Sequence[int],
    mask_box_scale: float,
    object_sizes: Sequence[float],
) -> Windows:
    """The windows of every (head, level) group; ``map_sizes`` ``{level: (height, width)}`` (ints
    give a constant geometry), ``object_sizes`` each head's scale on P2 (paper: 32, 32√2)."""
    if len(object_sizes) != len(window_sizes):
        raise ValueError(
            f"one object size per window size: got object_sizes {list(object_sizes)} for "
            f"window_sizes {list(window_sizes)}"
        )
    levels = sorted(map_sizes, key=level_number)
    centers, boxes, sizes, strides, ids, counts, groups = [], [], [], [], [], [], []
    static = all(isinstance(v, int) for hw in map_sizes.values() for v in hw)
    for w, object_size in zip(window_sizes, object_sizes):
        for level in levels:
            stride = float(level_stride(level))
            s = group_object_size(object_size, level)
            h, wd = map_sizes[level]
            if static:
                yy, xx = np.meshgrid(np.arange(h), np.arange(wd), indexing="ij")
                c = (np.stack([yy.ravel(), xx.ravel()], -1).astype(np.float32) + 0.5) * stride
                n = int(h) * int(wd)
                ones = np.ones([n], np.float32)
            else:
                yy, xx = tf.meshgrid(tf.range(h), tf.range(wd), indexing="ij")
                yx = tf.stack([tf.reshape(yy, [-1]), tf.reshape(xx, [-1])], -1)
                c = (tf.cast(yx, tf.float32) + 0.5) * stride
                n = tf.shape(c)[0]
                ones = tf.ones([n], tf.float32)
            half = 0.5 * mask_box_scale * s
            centers.append(c)
            boxes.append((np.concatenate if static else tf.concat)([c - half, c + half], -1))
            sizes.append(s * ones)
            strides.append(stride * ones)
            ids.append(len(groups) * (np.ones([n], np.int32) if static else tf.ones([n], tf.int32)))
            counts.append(n)
            groups.append((int(w), level, s))
    cat = (lambda xs: np.concatenate(xs, 0)) if static else (lambda xs: tf.concat(xs, 0))
    as_tf = tf.constant if static else tf.convert_to_tensor
    return Windows(
        as_tf(cat(centers)),
        as_tf(cat(boxes)),
        as_tf(cat(sizes)),
        as_tf(cat(strides)),
        as_tf(cat(ids)),
        tuple(counts),
        tuple(groups),
    )


def assign_segment_targets(
    windows: Windows,
    gt_boxes,
    gt_classes,
    gt_is_crowd=None,
    image_valid_hw=None,
    *,
    center_tolerance: float,
    center_tolerance_unit: str = "cells",
    crowd_ioa_threshold: float,
    num_samples: int,
    positive_fraction: float,
    seed=None,
) -> SegmentTargets:
    """Window labels and matches (module doc); ``image_valid_hw`` float [B, 2] or None (all
    valid); ``seed`` None (stateful) or an int tensor [2] (stateless)."""
    gt_boxes = tf.convert_to_tensor(gt_boxes, tf.float32)
    gt_classes = tf.convert_to_tensor(gt_classes)
    if gt_is_crowd is None:
        gt_is_crowd = tf.zeros(tf.shape(gt_classes), tf.bool)
    gt_is_crowd = tf.cast(gt_is_crowd, tf.bool)
    real = gt_classes > 0
    objects = tf.logical_and(real, tf.logical_not(gt_is_crowd))  # [B, N]
    crowd = tf.logical_and(real, gt_is_crowd)

    # The scale group of each object: nearest object scale in log space, clamped to the range.
    group_sizes = tf.constant([g[2] for g in windows.groups], tf.float32)  # [S]
    extent = gt_boxes[..., 2:] - gt_boxes[..., :2]
    longer = tf.maximum(tf.reduce_max(extent, -1), 1e-3)  # [B, N]
    gap = tf.abs(tf.math.log(longer)[..., None] - tf.math.log(group_sizes))  # [B, N, S]
    gt_group = tf.argmin(gap, axis=-1, output_type=tf.int32)  # [B, N]
    gt_center = 0.5 * (gt_boxes[..., :2] + gt_boxes[..., 2:])  # [B, N, 2]

    # [B, R, N]: window r is a candidate positive of object n.
    diff = tf.abs(windows.centers[None, :, None, :] - gt_center[:, None, :, :])  # [B, R, N, 2]
    if center_tolerance_unit not in CENTER_TOLERANCE_UNITS:
        raise ValueError(
            f"center_tolerance_unit must be one of {CENTER_TOLERANCE_UNITS}, "
            f"got {center_tolerance_unit!r}"
        )
    unit = windows.strides if center_tolerance_unit == "cells" else windows.canonical_sizes
    tol = center_tolerance * unit[None, :, None, None]
    close = tf.reduce_all(diff <= tol, axis=-1)
    same_group = tf.equal(windows.group_ids[None, :, None], gt_group[:, None, :])
    claim = close & same_group & objects[:, None, :]
    dist = tf.where(claim, tf.reduce_sum(tf.square(diff), -1), np.inf)  # [B, R, N]
    has = tf.reduce_any(claim, axis=-1)  # [B, R]
    matched = tf.where(has, tf.argmin(dist, axis=-1, output_type=tf.int32), -1)

    # Ignored: would-be negatives mostly inside a crowd box, windows centred in the padding.
    ioa = box_ops.pairwise_ioa(windows.mask_boxes[None], gt_boxes)  # [B, R, N]
    in_crowd = tf.reduce_any((ioa > crowd_ioa_threshold) & crowd[:, None, :], axis=-1)
    ignore = tf.logical_and(tf.logical_not(has), in_crowd)
    if image_valid_hw is not None:
        hw = tf.cast(image_valid_hw, tf.float32)[:, None, :]
        inside = tf.reduce_all(windows.centers[None] < hw, axis=-1)
        ignore = tf.logical_or(ignore, tf.logical_not(inside))
        has = tf.logical_and(has, inside)
        matched = tf.where(has, matched, -1)
    negative = tf.logical_and(tf.logical_not(has), tf.logical_not(ignore))

    max_pos = int(num_samples * positive_fraction)
    batch = tf.shape(gt_boxes)[0]
    r = tf.shape(windows.centers)[0]
    if seed is None:
        keys = tf.random.uniform(tf.stack([2, batch, r]), dtype=tf.float32)
    else:
        keys = tf.random.stateless_uniform(tf.stack([2, batch, r]), seed=seed, dtype=tf.float32)
    pos = target_assigner.sample_balanced(has, max_pos, max_pos, keys[0])
    num_pos = tf.reduce_sum(tf.cast(pos, tf.int32), axis=1)
    neg = target_assigner.sample_balanced(negative, num_samples - num_pos, num_samples, keys[1])
    labels = tf.where(pos, 1, tf.where(neg, 0, -1))
    return SegmentTargets(tf.cast(labels, tf.int32), matched)
