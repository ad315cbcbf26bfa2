"""Instance masks in box-relative form: cropping, training targets and pasting (pure TensorFlow).

Mask R-CNN predicts each mask on an ``M x M`` grid over its box (the TF Object Detection API's
``detection_masks`` form). One sampling convention serves every step, so a mask cropped, turned
into a target or pasted back lands on the same pixels:

  A box-relative mask ``m`` of size ``M`` over the box ``[y0, x0, y1, x1]`` (pixels, continuous:
  pixel ``p`` covers ``[p, p + 1)``, its value sits at its centre ``p + 0.5``) holds at ``m[i, j]``
  the value at the image point ``(y0 + (i + 0.5) (y1 - y0) / M, x0 + (j + 0.5) (x1 - x0) / M)``,
  bilinearly interpolated between pixel centres.

(RoIAlign with ``aligned=True`` and one sample per bin, computed with ``tf.image.crop_and_resize``,
whose box corners address the first and last sample in index space ``index / (size - 1)``.)

Values are 0 outside the source's box (a mask is 0 outside its own box). Between the outermost
samples and the box's edge, crops and targets hold the edge value (a mask that fills its box
stays full up to the edges), while :func:`paste_masks` falls off linearly to 0 over that half
mask pixel, as detectron2's and torchvision's pastes do (zero padding around the mask).
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["crop_masks", "mask_targets", "paste_masks"]


def _resample(source, source_indices, frames, boxes, out_size, border: str):
    """Samples ``source`` [K, h, w] (sample (k, l) of source ``q`` at the point ``frames[q]_start +
    ((k, l) + 0.5) * frame_extent / (h, w)``) at the ``out_size`` bin centres of ``boxes``.

    ``source_indices`` [R], ``frames`` / ``boxes`` [R, 4]: output r reads source
    ``source_indices[r]`` laid over ``frames[r]``. ``border``: ``"edge"`` = inside the frame the
    outermost half sample holds the edge value and outside the frame is 0 (a crop of a mask
    that fills its box stays full up to the box's edges); ``"zeros"`` = a one-sample zero
    border, so values fall off linearly to 0 over the half sample beyond the outermost ones.
    Returns float32 [R, out_h, out_w].
    """
    source = tf.cast(source, tf.float32)
    boxes = tf.cast(boxes, tf.float32)
    frames = tf.cast(frames, tf.float32)
    size = tf.cast(tf.shape(source)[1:3], tf.float32)
    mode = "SYMMETRIC" if border == "edge" else "CONSTANT"
    padded = tf.pad(source, [[0, 0], [1, 1], [1, 1]], mode=mode)[..., None]
    f_start, f_end = frames[:, :2], frames[:, 2:]
    cell = tf.maximum(f_end - f_start, 1e-6) / size
    out_hw = tf.cast(out_size, tf.float32) * tf.ones([2])
    step = (boxes[:, 2:] - boxes[:, :2]) / out_hw
    first = boxes[:, :2] + 0.5 * step  # first and last sample points, image coordinates
    last = boxes[:, 2:] - 0.5 * step
    # Image point -> index in the padded source (sample k at index k + 1), then
    # crop_and_resize's normalisation index / (size - 1).
    denom = size + 1.0  # (size + 2) - 1

    def to_norm(p):
        return ((p - f_start) / cell + 0.5) / denom

    crop = tf.concat([to_norm(first), to_norm(last)], axis=-1)
    out_ints = tf.cast(out_hw, tf.int32)
    out = tf.image.crop_and_resize(
        padded, crop, source_indices, out_ints, method="bilinear", extrapolation_value=0.0
    )[..., 0]
    if border == "edge":
        rows = first[:, 0:1] + tf.range(out_hw[0])[None] * step[:, 0:1]  # [R, out_h]
        cols = first[:, 1:2] + tf.range(out_hw[1])[None] * step[:, 1:2]
        in_rows = (rows >= f_start[:, 0:1]) & (rows <= f_end[:, 0:1])
        in_cols = (cols >= f_start[:, 1:2]) & (cols <= f_end[:, 1:2])
        inside = in_rows[:, :, None] & in_cols[:, None, :]
        out = tf.where(inside, out, 0.0)
    return out


def crop_masks(masks, boxes, output_size: int):
    """[N, H, W] masks of one image (any numeric dtype) and their [N, 4] yxyx pixel boxes ->
    float32 [N, S, S] box-relative masks, not binarised (the pipeline's per-instance crops)."""
    masks = tf.convert_to_tensor(masks)
    n = tf.shape(masks)[0]
    image = tf.concat([tf.zeros([2]), tf.cast(tf.shape(masks)[1:3], tf.float32)], axis=0)
    frames = tf.tile(image[None], [n, 1])
    return _resample(masks, tf.range(n), frames, boxes, output_size, border="edge")


def mask_targets(gt_masks, gt_boxes, rois, matched_gt_indices, output_size: int):
    """float32 0/1 [B, R, M, M]: each RoI's matched mask re-sampled over the RoI, ``>= 0.5``.

    ``gt_masks`` [B, N, S, S] are box-relative over ``gt_boxes`` [B, N, 4]; ``rois`` [B, R, 4]
    (pixels); ``matched_gt_indices`` int [B, R], rows < 0 (background, padding) get zeros.
    """
    gt_masks = tf.cast(gt_masks, tf.float32)
    b, n = tf.shape(gt_masks)[0], tf.shape(gt_masks)[1]
    s = tf.shape(gt_masks)[2]
    r = tf.shape(rois)[1]
    matched = tf.cast(matched_gt_indices, tf.int32)
    valid = matched >= 0
    safe = tf.maximum(matched, 0)
    frames = tf.gather(tf.cast(gt_boxes, tf.float32), safe, batch_dims=1)  # [B, R, 4]
    out = _resample(
        tf.reshape(gt_masks, tf.stack([b * n, s, s])),
        tf.reshape(safe + tf.range(b)[:, None] * n, [-1]),
        tf.reshape(frames, [-1, 4]),
        tf.reshape(tf.cast(rois, tf.float32), [-1, 4]),
        output_size,
        border="edge",
    )
    out = tf.reshape(out, tf.stack([b, r, output_size, output_size]))
    binary = tf.cast(out >= 0.5, tf.float32)
    return tf.where(valid[..., None, None], binary, 0.0)


def paste_masks(masks, boxes, image_size):
    """Inverse of :func:`crop_masks`: [N, M, M] masks over [N, 4] boxes -> float32 [N, H, W]
    on the ``image_size`` pixels, 0 outside the box; threshold it for a binary mask."""
    masks = tf.convert_to_tensor(masks)
    n = tf.shape(masks)[0]
    size = tf.cast(tf.convert_to_tensor(image_size), tf.int32)
    # One output sample per image pixel: the "box" sampled is the whole image.
    image = tf.concat([tf.zeros([2]), tf.cast(size, tf.float32)], axis=0)
    return _resample(masks, tf.range(n), boxes, tf.tile(image[None], [n, 1]), size, border="zeros")
