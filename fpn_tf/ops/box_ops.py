"""Box utilities (pure TensorFlow, no Keras).

Conventions (see WORKSPACE.md): a box is ``[ymin, xmin, ymax, xmax]`` float32 in
absolute pixels of the (resized, unpadded) image. Height is ``ymax - ymin`` and
width is ``xmax - xmin`` (continuous coordinates, no ``+1`` as in detectron2 /
torchvision / Model Garden). Padded rows are all-zero boxes, which have zero
area and therefore IoU 0 with everything.

Every function accepts arbitrary leading (batch) dimensions ``[..., 4]`` unless
the docstring says otherwise, keeps static shapes, and works inside
``tf.function(jit_compile=True)``.
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

# Same clamp as detectron2's Box2BoxTransform: exp() of a predicted dw/dh never
# makes a box more than 1000/16 times larger than its anchor / RoI.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def area(boxes):
    """Area of boxes.

    Args:
      boxes: float [..., 4].
    Returns:
      float [...]; zero for empty or inverted boxes.
    """
    boxes = tf.convert_to_tensor(boxes)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, num=4, axis=-1)
    return tf.maximum(ymax - ymin, 0.0) * tf.maximum(xmax - xmin, 0.0)


def pairwise_intersection(boxes1, boxes2):
    """Intersection areas of every pair.

    Args:
      boxes1: float [..., N, 4].
      boxes2: float [..., M, 4]; leading dims broadcast against ``boxes1``'s
        (so ``[B,N,4]`` x ``[M,4]`` works, e.g. anchors shared by a batch).
    Returns:
      float [..., N, M].
    """
    boxes1 = tf.convert_to_tensor(boxes1)
    boxes2 = tf.convert_to_tensor(boxes2, dtype=boxes1.dtype)
    y1a, x1a, y2a, x2a = tf.unstack(boxes1[..., :, None, :], num=4, axis=-1)
    y1b, x1b, y2b, x2b = tf.unstack(boxes2[..., None, :, :], num=4, axis=-1)
    ih = tf.maximum(tf.minimum(y2a, y2b) - tf.maximum(y1a, y1b), 0.0)
    iw = tf.maximum(tf.minimum(x2a, x2b) - tf.maximum(x1a, x1b), 0.0)
    return ih * iw


def pairwise_iou(boxes1, boxes2):
    """Intersection over union of every pair, batched.

    Safe for padding: a pair where either box has zero area gets IoU 0 (never
    NaN), because its intersection is 0 and the union is guarded.

    Args:
      boxes1: float [..., N, 4] (e.g. [B, N, 4]).
      boxes2: float [..., M, 4] (e.g. [B, M, 4]); leading dims broadcast.
    Returns:
      float [..., N, M] in [0, 1].
    """
    boxes1 = tf.convert_to_tensor(boxes1)
    boxes2 = tf.convert_to_tensor(boxes2, dtype=boxes1.dtype)
    inter = pairwise_intersection(boxes1, boxes2)
    union = area(boxes1)[..., :, None] + area(boxes2)[..., None, :] - inter
    return tf.math.divide_no_nan(inter, tf.maximum(union, 0.0))


def pairwise_ioa(boxes1, boxes2):
    """Intersection over the area of ``boxes1`` (e.g. anchor inside a crowd box).

    Args:
      boxes1: float [..., N, 4]; the denominator is their area.
      boxes2: float [..., M, 4]; leading dims broadcast.
    Returns:
      float [..., N, M]; 0 where ``boxes1`` has zero area.
    """
    boxes1 = tf.convert_to_tensor(boxes1)
    inter = pairwise_intersection(boxes1, boxes2)
    return tf.math.divide_no_nan(inter, area(boxes1)[..., :, None])


def _expand_image_shape(image_shape, boxes):
    """Returns (height, width) tensors that broadcast against boxes[..., 0].

    ``image_shape`` may be a scalar (square images), a [2] vector (height,
    width) shared by all boxes, or a [B, 2] tensor (one size per image, boxes
    [B, ..., 4]).
    """
    image_shape = tf.cast(tf.convert_to_tensor(image_shape), boxes.dtype)
    if image_shape.shape.rank == 0:
        return image_shape, image_shape
    height = image_shape[..., 0]
    width = image_shape[..., 1]
    # [B] -> [B, 1, ..., 1] so that it broadcasts against boxes[..., 0].
    extra = boxes.shape.rank - 1 - height.shape.rank
    for _ in range(max(extra, 0)):
        height = height[..., None]
        width = width[..., None]
    return height, width


def clip_boxes(boxes, image_shape):
    """Clips boxes to ``[0, height] x [0, width]``.

    Args:
      boxes: float [B, ..., 4] (or any [..., 4] when ``image_shape`` is shared).
      image_shape: the valid (unpadded) image size: a scalar, a [2]
        ``(height, width)`` or a per-image [B, 2] tensor.
    Returns:
      float, same shape as ``boxes``.
    """
    boxes = tf.convert_to_tensor(boxes)
    height, width = _expand_image_shape(image_shape, boxes)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, num=4, axis=-1)
    ymin = tf.minimum(tf.maximum(ymin, 0.0), height)
    ymax = tf.minimum(tf.maximum(ymax, 0.0), height)
    xmin = tf.minimum(tf.maximum(xmin, 0.0), width)
    xmax = tf.minimum(tf.maximum(xmax, 0.0), width)
    return tf.stack([ymin, xmin, ymax, xmax], axis=-1)


def boxes_to_centers(boxes):
    """``[ymin, xmin, ymax, xmax]`` -> ``[yc, xc, h, w]``; shape [..., 4]."""
    boxes = tf.convert_to_tensor(boxes)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, num=4, axis=-1)
    h = ymax - ymin
    w = xmax - xmin
    return tf.stack([ymin + 0.5 * h, xmin + 0.5 * w, h, w], axis=-1)


def centers_to_boxes(centers):
    """``[yc, xc, h, w]`` -> ``[ymin, xmin, ymax, xmax]``; shape [..., 4]."""
    centers = tf.convert_to_tensor(centers)
    yc, xc, h, w = tf.unstack(centers, num=4, axis=-1)
    return tf.stack([yc - 0.5 * h, xc - 0.5 * w, yc + 0.5 * h, xc + 0.5 * w], axis=-1)


def encode_boxes(boxes, anchors, weights):
    """Regression targets that map ``anchors`` onto ``boxes`` (R-CNN deltas).

    ``dy = wy * (yc - yc_a) / h_a``, ``dx = wx * (xc - xc_a) / w_a``,
    ``dh = wh * log(h / h_a)``, ``dw = ww * log(w / w_a)``.
    The delta order is ``[dy, dx, dh, dw]`` (the box order), weights are
    ``(wy, wx, wh, ww)``: (10, 10, 5, 5) for Fast R-CNN, (1, 1, 1, 1) for the RPN.

    Anchors must have positive size. A target box of zero size (padding) gives
    finite deltas (its size is floored at a tiny epsilon); mask them in the loss.

    Args:
      boxes: float [..., 4] target boxes.
      anchors: float [..., 4] reference boxes, broadcastable against ``boxes``.
      weights: 4 floats.
    Returns:
      float [..., 4] deltas.
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
    """Inverse of :func:`encode_boxes`: applies deltas to anchors.

    ``dh / wh`` and ``dw / ww`` are clamped at ``BBOX_XFORM_CLIP`` (log(1000/16),
    as detectron2) before ``exp`` so that no prediction overflows.

    Args:
      deltas: float [..., 4] ``[dy, dx, dh, dw]``.
      anchors: float [..., 4], broadcastable against ``deltas`` (e.g. [B,R,1,4]
        for class-specific deltas [B,R,C,4]).
      weights: the 4 weights used for encoding.
    Returns:
      float boxes [..., 4] (not clipped to the image).
    """
    deltas = tf.convert_to_tensor(deltas)
    anchors = tf.cast(tf.convert_to_tensor(anchors), deltas.dtype)
    wy, wx, wh, ww = [float(w) for w in weights]
    yca, xca, ha, wa = tf.unstack(boxes_to_centers(anchors), num=4, axis=-1)
    dy, dx, dh, dw = tf.unstack(deltas, num=4, axis=-1)
    dy = dy / wy
    dx = dx / wx
    dh = dh / wh
    dw = dw / ww
    dh = tf.minimum(dh, BBOX_XFORM_CLIP)
    dw = tf.minimum(dw, BBOX_XFORM_CLIP)
    yc = dy * ha + yca
    xc = dx * wa + xca
    h = tf.exp(dh) * ha
    w = tf.exp(dw) * wa
    return centers_to_boxes(tf.stack([yc, xc, h, w], axis=-1))


def valid_box_mask(boxes, min_size=0.0):
    """True where both height and width are strictly greater than ``min_size``.

    Args:
      boxes: float [..., 4].
      min_size: python float or scalar tensor (pixels).
    Returns:
      bool [...].
    """
    boxes = tf.convert_to_tensor(boxes)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, num=4, axis=-1)
    return tf.logical_and(ymax - ymin > min_size, xmax - xmin > min_size)
