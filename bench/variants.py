"""Candidate faster implementations of fpn_tf ops, measured by bench/check_variants.py.

These are proposals (bench/ owns no library code): each mirrors the function it would replace,
and bench/README.md gives the diff that puts it into fpn_tf/.

* ``multilevel_roi_align_crop_and_resize``: Eq. 1 levels -> ``tf.dynamic_partition`` of the RoIs
  by level -> per level one native ``tf.image.crop_and_resize`` at (out*sr)x(out*sr) on the map
  padded by one replicated pixel -> 2x2 average pool -> ``tf.dynamic_stitch`` back in order.
  Same sampling points and the same out-of-map rule as ``multilevel_roi_align`` (detectron2
  ``aligned=True``): a sample in [-1, 0) or (H-1, H] reads the edge row, which the replicated
  padding gives; below -1 / above H crop_and_resize's extrapolation value 0 is detectron2's 0.
  No [B, R, 49, 16, C] temporary; the backward pass is the native CropAndResizeGradImage.
  Dynamic per-level RoI counts: not for ``jit_compile=True`` (keep the gather version there).
* ``assign_rpn_targets_compact``: the same RPN targets with the gt rows compacted to the largest
  number of real gt rows in the batch before the [B, A, N] IoU (padding rows cost as much as
  real ones; COCO averages ~7 objects per image against max_num_instances = 100). Dynamic N:
  not for ``jit_compile=True``.
* ``upsample_nearest_to_broadcast``: x2 nearest upsampling by broadcast + reshape instead of two
  ``tf.repeat`` calls.
"""

from __future__ import annotations

import tensorflow as tf

from fpn_tf.ops import roi_ops, target_assigner
from fpn_tf.ops.roi_ops import _level_features, assign_levels


def multilevel_roi_align_crop_and_resize(features, rois, output_size=7, sampling_ratio=2,
                                         aligned=True, min_level=2, max_level=5,
                                         canonical_size=224.0, canonical_level=4,
                                         roi_levels=None):
    if sampling_ratio < 1:
        raise ValueError("sampling_ratio must be >= 1 (adaptive sampling is not supported)")
    levels = _level_features(features, min_level, max_level)
    dtype = levels[0][1].dtype
    channels = levels[0][1].shape[-1]
    rois = tf.cast(tf.convert_to_tensor(rois), tf.float32)
    batch = tf.shape(rois)[0]
    num_rois = rois.shape[1] if rois.shape[1] is not None else tf.shape(rois)[1]
    if roi_levels is None:
        roi_levels = assign_levels(rois, min_level, max_level, canonical_size, canonical_level)
    lvl = tf.clip_by_value(tf.cast(roi_levels, tf.int32) - min_level, 0, len(levels) - 1)
    flat_rois = tf.reshape(rois, [-1, 4])
    flat_lvl = tf.reshape(lvl, [-1])
    box_index = tf.reshape(
        tf.broadcast_to(tf.range(batch, dtype=tf.int32)[:, None], tf.shape(lvl)), [-1])
    positions = tf.range(tf.shape(flat_lvl)[0], dtype=tf.int32)
    n_lvl = len(levels)
    part_rois = tf.dynamic_partition(flat_rois, flat_lvl, n_lvl)
    part_index = tf.dynamic_partition(box_index, flat_lvl, n_lvl)
    part_pos = tf.dynamic_partition(positions, flat_lvl, n_lvl)
    crop = output_size * sampling_ratio
    shift = 0.5 if aligned else 0.0
    pooled = []
    for (level, f), r, bi in zip(levels, part_rois, part_index):
        stride = float(2 ** level)
        f32 = tf.cast(f, tf.float32)
        # One replicated pixel around the map: bilinear reads in [-1, 0) and (H-1, H] then
        # give the edge value (detectron2's clamp); beyond that crop_and_resize gives 0.
        fp = tf.pad(f32, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
        hp = tf.cast(tf.shape(fp)[1] - 1, tf.float32)
        wp = tf.cast(tf.shape(fp)[2] - 1, tf.float32)
        ymin, xmin, ymax, xmax = tf.unstack(r, num=4, axis=-1)
        y0 = ymin / stride - shift
        x0 = xmin / stride - shift
        rh = ymax / stride - shift - y0
        rw = xmax / stride - shift - x0
        if not aligned:
            rh = tf.maximum(rh, 1.0)
            rw = tf.maximum(rw, 1.0)
        # First and last of the crop x crop sampling points (sub-cell centres), +1 for the pad.
        y_first = y0 + 0.5 * rh / crop + 1.0
        x_first = x0 + 0.5 * rw / crop + 1.0
        y_last = y0 + (crop - 0.5) * rh / crop + 1.0
        x_last = x0 + (crop - 0.5) * rw / crop + 1.0
        boxes = tf.stack([y_first / hp, x_first / wp, y_last / hp, x_last / wp], axis=-1)
        c = tf.image.crop_and_resize(fp, boxes, bi, [crop, crop], method="bilinear",
                                     extrapolation_value=0.0)
        if sampling_ratio > 1:
            c = tf.nn.avg_pool2d(c, sampling_ratio, sampling_ratio, "VALID")
        pooled.append(c)
    out = tf.dynamic_stitch(part_pos, pooled)
    out = tf.reshape(out, [batch, num_rois, output_size, output_size,
                           channels if channels is not None else tf.shape(out)[-1]])
    return tf.cast(out, dtype)


def multilevel_roi_align_fast(features, rois, output_size=7, sampling_ratio=2, aligned=True,
                              min_level=2, max_level=5, canonical_size=224.0, canonical_level=4,
                              roi_levels=None):
    """crop_and_resize forward; the gradient is the gather implementation's (race-free).

    TF's CPU ``CropAndResizeGradImage`` shards the boxes over threads and adds into the image
    gradient without synchronisation ("Sharding introduces nondeterminism", crop_and_resize_op.cc):
    with overlapping RoIs updates are lost (measured: max abs error 0.32 on gradients of ~70, a
    different answer every run). So the backward pass recomputes ``roi_ops.multilevel_roi_align``
    under a tape and returns its exact (deterministic) vector-Jacobian product.
    """
    kwargs = dict(output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned,
                  min_level=min_level, max_level=max_level, canonical_size=canonical_size,
                  canonical_level=canonical_level)
    names = sorted(features, key=lambda k: int(str(k)[1:]))
    names = [n for n in names if min_level <= int(str(n)[1:]) <= max_level]
    rois = tf.stop_gradient(tf.cast(rois, tf.float32))
    levels_in = None if roi_levels is None else tf.stop_gradient(roi_levels)

    @tf.custom_gradient
    def run(*maps):
        feats = dict(zip(names, maps))
        out = multilevel_roi_align_crop_and_resize(feats, rois, roi_levels=levels_in, **kwargs)

        def grad(dy):
            with tf.GradientTape() as tape:
                tape.watch(maps)
                ref = roi_ops.multilevel_roi_align(dict(zip(names, maps)), rois,
                                                   roi_levels=levels_in, **kwargs)
            return tape.gradient(ref, list(maps), output_gradients=dy)

        return out, grad

    return run(*[features[n] for n in names])


def assign_rpn_targets_compact(anchors, gt_boxes, gt_classes, gt_is_crowd=None, **kwargs):
    gt_boxes = tf.convert_to_tensor(gt_boxes, tf.float32)
    gt_classes = tf.convert_to_tensor(gt_classes)
    if gt_is_crowd is None:
        gt_is_crowd = tf.zeros(tf.shape(gt_classes), tf.bool)
    real = tf.cast(gt_classes > 0, tf.int32)
    n = tf.maximum(tf.reduce_max(tf.reduce_sum(real, axis=1)), 1)
    # Real rows first, each group in its original order (stable), then keep n columns.
    order = tf.argsort(-real, axis=1, stable=True)[:, :n]
    out = target_assigner.assign_rpn_targets(
        anchors, tf.gather(gt_boxes, order, batch_dims=1),
        tf.gather(gt_classes, order, batch_dims=1),
        tf.gather(tf.cast(gt_is_crowd, tf.bool), order, batch_dims=1), **kwargs)
    matched = tf.where(out.matched_gt_indices >= 0,
                       tf.gather(order, tf.maximum(out.matched_gt_indices, 0), batch_dims=1),
                       -1)
    return target_assigner.RpnTargets(out.labels, out.box_targets, matched)


def upsample_nearest_to_broadcast(x, like):
    shape = tf.shape(x)
    dims = [x.shape[i] if x.shape[i] is not None else shape[i] for i in range(4)]
    up = tf.broadcast_to(x[:, :, None, :, None, :],
                         [dims[0], dims[1], 2, dims[2], 2, dims[3]])
    up = tf.reshape(up, [dims[0], dims[1] * 2, dims[2] * 2, dims[3]])
    size = tf.shape(like)
    return up[:, : size[1], : size[2], :]


__all__ = ["multilevel_roi_align_crop_and_resize", "multilevel_roi_align_fast", "assign_rpn_targets_compact",
           "upsample_nearest_to_broadcast", "roi_ops"]
