"""Segment-proposal windows on the pyramid (paper §6): their geometry and training targets.

Pure TensorFlow, batched over images, no loops over images. The paper says only that "a small
5x5 MLP [is] applied on each pyramid level to predict 14x14 masks and object scores in a fully
convolutional fashion", plus a 7x7 MLP for the half octaves, trained "following DeepMask". The
geometry below is our choice where the paper's text is brief (it follows DeepMask's numbers):

* A window of size ``w`` (the MLP's input, 5 or 7 cells) on level ``l`` (stride ``2**l``) at cell
  ``(i, j)`` has the canonical object size ``s = w * 2**l`` (P2..P6: 20..320 px for 5x5, 28..448
  for 7x7: the two heads interleave in half octaves) and its centre at
  ``((i + 0.5) * 2**l, (j + 0.5) * 2**l)``.
* Its mask is predicted over the square *mask box* of side ``mask_box_scale * s`` (1.75:
  DeepMask's 128-px object in a 224-px input patch) centred at the window's centre.
* Each non-crowd object goes to the one (level, head) *scale group* whose ``s`` is nearest its
  longer side in log scale. Objects outside the range (longer side < 20 or > 448 px with both
  heads) are *clamped* to the smallest / largest group rather than dropped: they then still
  train the objectness of the windows that are their best match (an 8-px object is best found
  by the 20-px windows), which is what recall needs; their mask targets are small (or cropped)
  but correct in the mask box's frame.
* The windows of that group whose centre is within ``center_tolerance * s`` (0.22: DeepMask's
  +-16 px at 224) of the object box's centre on *both* axes (inclusive) are positives for it; a
  window claimed by several objects goes to the one whose centre is nearest (Euclidean; ties to
  the lower gt row). Every other window is negative, except that a would-be negative whose mask
  box lies more than ``crowd_ioa_threshold`` inside a crowd box (intersection over mask-box
  area, the RPN's rule) is ignored, and windows whose centre lies outside the image's valid
  (unpadded) region are ignored (they never become proposals either).

Window order everywhere (geometry, head outputs, targets): scale group by group, a group being
one (head, level) pair in the order heads (as given) then levels, cells row-major inside a group.
"""

from __future__ import annotations

import collections
import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from fpn_tf.ops import box_ops, target_assigner
from fpn_tf.ops.anchors import level_number, level_stride

__all__ = ["Windows", "window_geometry", "assign_segment_targets", "SegmentTargets"]

Windows = collections.namedtuple(
    "Windows", ["centers", "mask_boxes", "canonical_sizes", "group_ids", "group_sizes", "groups"]
)
Windows.__doc__ = """All windows of all scale groups, R in total, in the module's order.

centers: float32 [R, 2] (y, x) pixels; mask_boxes: float32 [R, 4] yxyx pixels (not clipped: a
  mask is relative to its whole box); canonical_sizes: float32 [R] (s); group_ids: int32 [R],
  index into ``groups``; group_sizes: the number of windows of each group (Python ints when the
  maps' sizes are static); groups: tuple of (window_size, level name, s) per group.
"""

SegmentTargets = collections.namedtuple("SegmentTargets", ["labels", "matched_gt_indices"])
SegmentTargets.__doc__ = """labels: int32 [B, R]: 1 sampled positive, 0 sampled negative, -1 not
sampled / ignored. matched_gt_indices: int32 [B, R]: the gt row of every positive window
(sampled or not), -1 elsewhere."""


def window_geometry(
    map_sizes,
    window_sizes: Sequence[int],
    mask_box_scale: float,
) -> Windows:
    """The windows of every (head, level) group.

    Args:
      map_sizes: ``{level: (height, width)}`` of each pyramid level's feature map (Python ints:
        the geometry is a NumPy constant; or int tensors).
      window_sizes: the heads' window sizes (e.g. (5, 7)).
      mask_box_scale: mask-box side over s.
    """
    levels = sorted(map_sizes, key=level_number)
    centers, boxes, sizes, ids, counts, groups = [], [], [], [], [], []
    static = all(isinstance(v, int) for hw in map_sizes.values() for v in hw)
    xp = np if static else tf
    for w in window_sizes:
        for level in levels:
            stride = float(level_stride(level))
            s = float(w) * stride
            h, wd = map_sizes[level]
            if static:
                yy, xx = np.meshgrid(np.arange(h), np.arange(wd), indexing="ij")
                c = (np.stack([yy.ravel(), xx.ravel()], -1).astype(np.float32) + 0.5) * stride
                n = int(h) * int(wd)
            else:
                yy, xx = tf.meshgrid(tf.range(h), tf.range(wd), indexing="ij")
                c = (
                    tf.cast(tf.stack([tf.reshape(yy, [-1]), tf.reshape(xx, [-1])], -1), tf.float32)
                    + 0.5
                ) * stride
                n = tf.shape(c)[0]
            half = 0.5 * mask_box_scale * s
            centers.append(c)
            boxes.append(
                xp.concat([c - half, c + half], -1)
                if not static
                else np.concatenate([c - half, c + half], -1)
            )
            sizes.append(s * (np.ones([n], np.float32) if static else tf.ones([n], tf.float32)))
            ids.append(len(groups) * (np.ones([n], np.int32) if static else tf.ones([n], tf.int32)))
            counts.append(n)
            groups.append((int(w), level, s))
    cat = (lambda xs: np.concatenate(xs, 0)) if static else (lambda xs: tf.concat(xs, 0))
    as_tf = tf.constant if static else tf.convert_to_tensor
    return Windows(
        as_tf(cat(centers)),
        as_tf(cat(boxes)),
        as_tf(cat(sizes)),
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
    crowd_ioa_threshold: float,
    num_samples: int,
    positive_fraction: float,
    seed=None,
) -> SegmentTargets:
    """Window labels (module doc), then ``num_samples`` sampled per image, at most
    ``num_samples * positive_fraction`` positive (`target_assigner.sample_balanced`).

    Args:
      windows: `window_geometry`'s output (R windows).
      gt_boxes: float [B, N, 4]; gt_classes: int [B, N] (<= 0 = padding); gt_is_crowd: bool
        [B, N] or None; image_valid_hw: float [B, 2] or None (all valid).
      seed: None (stateful RNG) or an int tensor [2] (stateless).
    """
    gt_boxes = tf.convert_to_tensor(gt_boxes, tf.float32)
    gt_classes = tf.convert_to_tensor(gt_classes)
    if gt_is_crowd is None:
        gt_is_crowd = tf.zeros(tf.shape(gt_classes), tf.bool)
    gt_is_crowd = tf.cast(gt_is_crowd, tf.bool)
    real = gt_classes > 0
    objects = tf.logical_and(real, tf.logical_not(gt_is_crowd))  # [B, N]
    crowd = tf.logical_and(real, gt_is_crowd)

    # The scale group of each object: nearest canonical size in log scale, clamped to the range.
    group_sizes = tf.constant([g[2] for g in windows.groups], tf.float32)  # [S]
    extent = gt_boxes[..., 2:] - gt_boxes[..., :2]
    longer = tf.maximum(tf.reduce_max(extent, -1), 1e-3)  # [B, N]
    gap = tf.abs(tf.math.log(longer)[..., None] - tf.math.log(group_sizes))  # [B, N, S]
    gt_group = tf.argmin(gap, axis=-1, output_type=tf.int32)  # [B, N]
    gt_center = 0.5 * (gt_boxes[..., :2] + gt_boxes[..., 2:])  # [B, N, 2]

    # [B, R, N]: window r is a candidate positive of object n.
    diff = tf.abs(windows.centers[None, :, None, :] - gt_center[:, None, :, :])  # [B, R, N, 2]
    tol = center_tolerance * windows.canonical_sizes[None, :, None, None]
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


def scale_group_of(longer_side: float, groups) -> int:
    """The group index an object of this longer side goes to (NumPy twin of the rule, for
    tests and documentation)."""
    logs = [abs(math.log(max(longer_side, 1e-3)) - math.log(g[2])) for g in groups]
    return int(np.argmin(logs))
