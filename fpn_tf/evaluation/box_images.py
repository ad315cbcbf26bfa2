"""Eval images for TensorBoard: ground truth in green, detections above a threshold (and their
masks) in red, on the image the model saw (resized, padding cropped away)."""

from __future__ import annotations

import tensorflow as tf

from fpn_tf.ops import mask_ops

MASK_ALPHA = 0.4
GROUND_TRUTH_COLOR = (0.0, 255.0, 0.0)
DETECTION_COLOR = (255.0, 0.0, 0.0)


def draw_boxes(images, boxes, valid, color):
    """Draws ``boxes`` [B, N, 4] (yxyx pixels of ``images``) where ``valid`` [B, N] on float
    ``images`` [B, H, W, 3] (0..255); returns the same dtype and range."""
    hw = tf.cast(tf.shape(images)[1:3], tf.float32) - 1.0
    # draw_bounding_boxes puts coordinate c on pixel int(c * (size - 1)): + 0.5 rounds.
    normalised = (boxes + 0.5) / tf.concat([hw, hw], axis=0)
    # Invalid rows become empty boxes, which draw_bounding_boxes draws nowhere visible.
    normalised = tf.where(valid[..., None], normalised, tf.zeros_like(normalised))
    return tf.image.draw_bounding_boxes(images, normalised, tf.constant([color], tf.float32))


def detection_images(model, features, labels, score_threshold: float):
    """uint8 [B, H, W, 3]: the batch's images with ground truth (green) and the model's
    detections with score >= ``score_threshold`` (red). Boxes are drawn in the frame of the
    resized image; detections (returned in original-image pixels) are scaled back to it."""
    images = tf.cast(features["images"], tf.float32)
    image_info = tf.cast(features["image_info"], tf.float32)
    outputs = model({"images": images, "image_info": image_info}, training=False)
    scale = tf.concat([image_info[:, 2, :], image_info[:, 2, :]], axis=-1)[:, None, :]
    detections = outputs["detection_boxes"] * scale
    rows = tf.range(tf.shape(detections)[1])[None, :]
    shown = (rows < outputs["num_detections"][:, None]) & (
        outputs["detection_scores"] >= score_threshold
    )
    gt_valid = labels["gt_classes"] > 0
    if "detection_masks" in outputs:
        images = overlay_masks(images, outputs["detection_masks"], detections, shown)
    drawn = draw_boxes(
        images, tf.cast(labels["gt_boxes"], tf.float32), gt_valid, GROUND_TRUTH_COLOR
    )
    drawn = draw_boxes(drawn, detections, shown, DETECTION_COLOR)
    return tf.cast(tf.clip_by_value(tf.round(drawn), 0, 255), tf.uint8)


def overlay_masks(images, masks, boxes, shown, color=DETECTION_COLOR):
    """``images`` [B, H, W, 3] float with the union of the ``shown`` [B, N] box-relative
    ``masks`` [B, N, M, M] (over ``boxes`` [B, N, 4], pixels of the images) tinted ``color``."""
    size = tf.shape(images)[1:3]
    out = []
    for i in range(images.shape[0]):
        pasted = mask_ops.paste_masks(masks[i], boxes[i], size)  # [N, H, W]
        hit = tf.reduce_any((pasted >= 0.5) & shown[i][:, None, None], axis=0)[..., None]
        tinted = (1.0 - MASK_ALPHA) * images[i] + MASK_ALPHA * tf.constant(color, tf.float32)
        out.append(tf.where(hit, tinted, images[i]))
    return tf.stack(out)


def summary_images(model, dataset, num_images: int, score_threshold: float):
    """The first ``num_images`` images of ``dataset`` drawn by `detection_images`, each
    cropped to its resized (unpadded) size, as a list of uint8 [h, w, 3] arrays."""
    out = []
    for features, labels in dataset:
        drawn = detection_images(model, features, labels, score_threshold).numpy()
        sizes = features["image_info"].numpy()[:, 1, :]
        for image, (h, w) in zip(drawn, sizes):
            out.append(image[: int(round(h)), : int(round(w))])
            if len(out) == num_images:
                return out
    return out
