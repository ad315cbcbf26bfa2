"""Box utilities (pure TensorFlow).

A box is ``[ymin, xmin, ymax, xmax]`` float32 in absolute pixels of the resized, unpadded image;
height is ``ymax - ymin`` (continuous coordinates, no ``+1``). Padding rows are all-zero boxes:
zero area, IoU 0 with everything. Functions take any leading dims ``[..., 4]``, keep static
shapes and compile under XLA.
"""

import math

import tensorflow as tf

__all__ = [
    "BBOX_XFORM_CLIP",
    "area",
    "pairwise_intersection",
    "pairwise_iou",
    "pairwise_ioa",
    "clip_boxes",
    "encode_boxes",
    "decode_boxes",
    "boxes_to_centers",
    "centers_to_boxes",
    "valid_box_mask",
]

# detectron2's clamp: exp() of a predicted dh/dw never grows a box more than 1000/16 times.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def area(boxes):
    """float [...]; zero for empty or inverted boxes."""
    ymin, xmin, ymax, xmax = tf.unstack(tf.convert_to_tensor(boxes), num=4, axis=-1)
    return tf.maximum(ymax - ymin, 0.0) * tf.maximum(xmax - xmin, 0.0)


def pairwise_intersection(boxes1, boxes2):
    """[..., N, 4] x [..., M, 4] -> [..., N, M] intersection areas (leading dims broadcast)."""
    boxes1 = tf.convert_to_tensor(boxes1)
    boxes2 = tf.convert_to_tensor(boxes2, dtype=boxes1.dtype)
    y1a, x1a, y2a, x2a = tf.unstack(boxes1[..., :, None, :], num=4, axis=-1)
    y1b, x1b, y2b, x2b = tf.unstack(boxes2[..., None, :, :], num=4, axis=-1)
    ih = tf.maximum(tf.minimum(y2a, y2b) - tf.maximum(y1a, y1b), 0.0)
    iw = tf.maximum(tf.minimum(x2a, x2b) - tf.maximum(x1a, x1b), 0.0)
    return ih * iw


def pairwise_iou(boxes1, boxes2, intersection=None):
    """[..., N, 4] x [..., M, 4] -> IoU [..., N, M]; 0 (never NaN) for zero-area boxes.
    ``intersection``: their `pairwise_intersection`, when the caller has it already."""
    boxes1 = tf.convert_to_tensor(boxes1)
    boxes2 = tf.convert_to_tensor(boxes2, dtype=boxes1.dtype)
    inter = pairwise_intersection(boxes1, boxes2) if intersection is None else intersection
    union = area(boxes1)[..., :, None] + area(boxes2)[..., None, :] - inter
    return tf.math.divide_no_nan(inter, tf.maximum(union, 0.0))


def pairwise_ioa(boxes1, boxes2):
    """Intersection over the area of ``boxes1`` [..., N, M] (e.g. anchor inside a crowd box)."""
    boxes1 = tf.convert_to_tensor(boxes1)
    inter = pairwise_intersection(boxes1, boxes2)
    return tf.math.divide_no_nan(inter, area(boxes1)[..., :, None])


def clip_boxes(boxes, image_shape):
    """Clips boxes to ``[0, height] x [0, width]``.

    ``image_shape``: a scalar (square), a [2] ``(height, width)``, or per image [B, 2] with
    boxes [B, ..., 4].
    """
    boxes = tf.convert_to_tensor(boxes)
    image_shape = tf.cast(tf.convert_to_tensor(image_shape), boxes.dtype)
    if image_shape.shape.rank == 0:
        height = width = image_shape
    else:
        height, width = image_shape[..., 0], image_shape[..., 1]
        for _ in range(max(boxes.shape.rank - 1 - height.shape.rank, 0)):
            height, width = height[..., None], width[..., None]
    ymin, xmin, ymax, xmax = tf.unstack(boxes, num=4, axis=-1)
    ymin = tf.minimum(tf.maximum(ymin, 0.0), height)
    ymax = tf.minimum(tf.maximum(ymax, 0.0), height)
    xmin = tf.minimum(tf.maximum(xmin, 0.0), width)
    xmax = tf.minimum(tf.maximum(xmax, 0.0), width)
    return tf.stack([ymin, xmin, ymax, xmax], axis=-1)


def boxes_to_centers(boxes):
    """``[ymin, xmin, ymax, xmax]`` -> ``[yc, xc, h, w]``."""
    ymin, xmin, ymax, xmax = tf.unstack(tf.convert_to_tensor(boxes), num=4, axis=-1)
    h, w = ymax - ymin, xmax - xmin
    return tf.stack([ymin + 0.5 * h, xmin + 0.5 * w, h, w], axis=-1)


def centers_to_boxes(centers):
    """``[yc, xc, h, w]`` -> ``[ymin, xmin, ymax, xmax]``."""
    yc, xc, h, w = tf.unstack(tf.convert_to_tensor(centers), num=4, axis=-1)
    return tf.stack([yc - 0.5 * h, xc - 0.5 * w, yc + 0.5 * h, xc + 0.5 * w], axis=-1)


def encode_boxes(boxes, anchors, weights):
    """R-CNN deltas ``[dy, dx, dh, dw]`` that map ``anchors`` onto ``boxes``.

    ``dy = wy * (yc - yc_a) / h_a``, ``dh = wh * log(h / h_a)`` (likewise x, w); ``weights``
    ``(wy, wx, wh, ww)``: (10, 10, 5, 5) for Fast R-CNN, (1, 1, 1, 1) for the RPN. Zero-size
    target boxes (padding) give finite deltas; mask them in the loss.
    """
    boxes = tf.convert_to_tensor(boxes)
    anchors = tf.convert_to_tensor(anchors, dtype=boxes.dtype)
    wy, wx, wh, ww = [float(w) for w in weights]
    yc, xc, h, w = tf.unstack(boxes_to_centers(boxes), num=4, axis=-1)
    yca, xca, ha, wa = tf.unstack(boxes_to_centers(anchors), num=4, axis=-1)
    eps = 1e-8
    ha = tf.maximum(ha, eps)
    wa = tf.maximum(wa, eps)
    dy = wy * (yc - yca) / ha
    dx = wx * (xc - xca) / wa
    dh = wh * tf.math.log(tf.maximum(h, eps) / ha)
    dw = ww * tf.math.log(tf.maximum(w, eps) / wa)
    return tf.stack([dy, dx, dh, dw], axis=-1)


def decode_boxes(deltas, anchors, weights):
    """Inverse of :func:`encode_boxes` (not clipped to the image); ``dh, dw`` are clamped at
    ``BBOX_XFORM_CLIP`` before ``exp``. ``anchors`` broadcast (e.g. [B, R, 1, 4] against
    class-specific deltas [B, R, C, 4])."""
    deltas = tf.convert_to_tensor(deltas)
    anchors = tf.cast(tf.convert_to_tensor(anchors), deltas.dtype)
    wy, wx, wh, ww = [float(w) for w in weights]
    yca, xca, ha, wa = tf.unstack(boxes_to_centers(anchors), num=4, axis=-1)
    dy, dx, dh, dw = tf.unstack(deltas, num=4, axis=-1)
    dh = tf.minimum(dh / wh, BBOX_XFORM_CLIP)
    dw = tf.minimum(dw / ww, BBOX_XFORM_CLIP)
    yc = dy / wy * ha + yca
    xc = dx / wx * wa + xca
    return centers_to_boxes(tf.stack([yc, xc, tf.exp(dh) * ha, tf.exp(dw) * wa], axis=-1))


def valid_box_mask(boxes, min_size=0.0):
    """bool [...]: height and width both strictly greater than ``min_size`` pixels."""
    ymin, xmin, ymax, xmax = tf.unstack(tf.convert_to_tensor(boxes), num=4, axis=-1)
    return tf.logical_and(ymax - ymin > min_size, xmax - xmin > min_size)
