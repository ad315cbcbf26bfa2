"""Per-image transforms (pure TF): flip, resize (paper §5.1), pad, pad ground truth.

:func:`resized_size` is the one resize rule for the pipeline and the serving graph, by a
``ResizeConfig``'s ``rounding``: ``"round"`` (Model Garden's ``resize_and_crop_image_v2``: half
to even in float32), ``"floor"`` (torchvision's ``GeneralizedRCNNTransform``, float64) or
``"half_up"`` (detectron2's ``ResizeShortestEdge``, float64); boxes are scaled by the per-axis
``resized / original``, so they stay exact on the resized grid. Its ``method`` resamples with
``tf.image.resize`` bilinear (torchvision's) or bit-exact PIL bilinear on uint8 (detectron2's,
:func:`pil_bilinear_resize`); the output is float32 RGB in 0..255 either way.

Padding is zeros at the bottom/right, so boxes need no offset. The flip happens before the
resize (both commute with it). Instance masks are cropped box-relative ``S x S`` from the
full-size masks in the original frame, so no full-resolution mask is resized, flipped or batched.
"""

from __future__ import annotations

import math
import sys

import tensorflow as tf

from fpn_tf.configs.experiment import ResizeConfig
from fpn_tf.ops import mask_ops

__all__ = [
    "ceil_to_multiple",
    "ceil_to_multiple_tf",
    "fixed_padded_size",
    "crop_instance_masks",
    "horizontal_flip",
    "pad_groundtruth",
    "padded_size_tf",
    "pil_bilinear_resize",
    "preprocess_example",
    "resize_and_pad",
    "resize_image",
    "resized_size",
]

# PIL's fixed point for 8-bit images (libImaging/Resample.c): 32 - 8 - 2 fraction bits.
_PIL_PRECISION_BITS = 22


def ceil_to_multiple(x: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= x (python ints)."""
    return int(math.ceil(x / multiple) * multiple)


def ceil_to_multiple_tf(size: tf.Tensor, multiple: int) -> tf.Tensor:
    """float32 ``size`` rounded up to a multiple of ``multiple``: a resized image's padded size."""
    m = float(multiple)
    return tf.math.ceil(size / m) * m


def resized_size(image_size, resize: ResizeConfig) -> tf.Tensor:
    """float32 [..., 2] resized (h, w) of images of (h, w) ``image_size`` [..., 2]."""
    short_side, max_long_side = resize.short_side, resize.max_long_side
    if resize.rounding == "half_up":
        return _half_up_resized_size(image_size, short_side, max_long_side)
    if resize.rounding == "floor":
        size64 = tf.cast(image_size, tf.float64)
        scale = tf.minimum(
            float(short_side) / tf.reduce_min(size64, axis=-1, keepdims=True),
            float(max_long_side) / tf.reduce_max(size64, axis=-1, keepdims=True),
        )
        return tf.cast(tf.math.floor(size64 * scale), tf.float32)
    size = tf.cast(image_size, tf.float32)
    shortest = tf.reduce_min(size, axis=-1, keepdims=True)
    longest = tf.reduce_max(size, axis=-1, keepdims=True)
    by_short = tf.math.round(size * (short_side / shortest))
    by_long = tf.math.round(size * (max_long_side / longest))
    too_long = tf.reduce_max(by_short, axis=-1, keepdims=True) > max_long_side
    return tf.where(too_long, by_long, by_short)


def _half_up_resized_size(image_size, short_side: int, max_long_side: int) -> tf.Tensor:
    """detectron2's ``ResizeShortestEdge.get_output_shape``, op for op in float64 (same ties)."""
    size = tf.cast(image_size, tf.float64)
    h, w = size[..., :1], size[..., 1:]
    short = tf.constant(short_side, tf.float64)
    scale = short / tf.minimum(h, w)
    portrait_or_square = h >= w  # detectron2: `if h < w` gives the height `short` exactly
    new_h = tf.where(portrait_or_square, scale * h, short)
    new_w = tf.where(portrait_or_square, short, scale * w)
    longer = tf.maximum(new_h, new_w)
    max_long = tf.constant(max_long_side, tf.float64)
    cap = max_long / longer
    too_long = longer > max_long
    new_h = tf.where(too_long, new_h * cap, new_h)
    new_w = tf.where(too_long, new_w * cap, new_w)
    return tf.cast(tf.math.floor(tf.concat([new_h, new_w], axis=-1) + 0.5), tf.float32)


def fixed_padded_size(padding_mode: str, resize: ResizeConfig) -> list[tuple[int, int]]:
    """The image shapes a run sees in ``padding_mode`` ([] for "batch"): "orientation"
    [ceil(short), ceil(long)] or its transpose, "square" [ceil(long)] * 2."""
    s = ceil_to_multiple(resize.short_side, resize.pad_multiple)
    l = ceil_to_multiple(resize.max_long_side, resize.pad_multiple)
    shapes = {"orientation": [(s, l), (l, s)], "square": [(l, l)], "batch": []}
    return shapes[padding_mode]


def padded_size_tf(image_size: tf.Tensor, padding_mode: str, resize: ResizeConfig) -> tf.Tensor:
    """int32 [2] padded (h, w) for an image of ``image_size`` (before resize)."""
    if padding_mode == "batch":
        padded = ceil_to_multiple_tf(resized_size(image_size, resize), resize.pad_multiple)
        return tf.cast(padded, tf.int32)
    shapes = fixed_padded_size(padding_mode, resize)
    if padding_mode == "square":
        return tf.constant(shapes[0], tf.int32)
    landscape = image_size[0] <= image_size[1]
    return tf.where(landscape, tf.constant(shapes[0], tf.int32), tf.constant(shapes[1], tf.int32))


def _pil_bilinear_coefficients(in_size: tf.Tensor, out_size: tf.Tensor):
    """PIL's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` (bilinear), the same float64 ops
    in the same order, so the integer weights are PIL's. Returns (taps, weights) int32
    [out, K]: clamped input indices and fixed-point weights (0 beyond each pixel's taps)."""
    scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    filterscale = tf.maximum(scale, 1.0)
    support = filterscale  # the bilinear (triangle) filter's support is 1
    ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    inv_filterscale = 1.0 / filterscale
    center = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
    # C's (int) truncates towards zero, as tf.cast does.
    first = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)
    count = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size) - first
    x = tf.range(ksize)[None, :]
    position = tf.cast(x + first[:, None], tf.float64)
    weights = tf.maximum(1.0 - tf.abs((position - center[:, None] + 0.5) * inv_filterscale), 0.0)
    weights = tf.where(x < count[:, None], weights, 0.0)
    total = tf.foldl(lambda acc, w: acc + w, tf.transpose(weights), tf.zeros_like(center))
    weights = tf.where(total[:, None] != 0.0, weights / total[:, None], weights)
    fixed = tf.cast(0.5 + weights * float(1 << _PIL_PRECISION_BITS), tf.int32)
    taps = tf.minimum(x + first[:, None], in_size - 1)
    return taps, fixed


def _pil_bilinear_pass(image: tf.Tensor, out_size: tf.Tensor, axis: int) -> tf.Tensor:
    """One of PIL's 8-bit passes along ``axis`` (0: rows, 1: columns) of int32 [H, W, C] 0..255
    (int32 is exact: the sum is below 256 * 2**22)."""
    taps, fixed = _pil_bilinear_coefficients(tf.shape(image)[axis], out_size)
    shape = tf.tensor_scatter_nd_update(tf.shape(image), [[axis]], [out_size])
    start = tf.fill(shape, tf.constant(1 << (_PIL_PRECISION_BITS - 1), tf.int32))
    broadcast = [-1, 1, 1] if axis == 0 else [1, -1, 1]

    def add_tap(acc, tap):
        index, weight = tap
        return acc + tf.gather(image, index, axis=axis) * tf.reshape(weight, broadcast)

    # One tap at a time: memory of one output image, whatever the reduction factor.
    acc = tf.foldl(add_tap, (tf.transpose(taps), tf.transpose(fixed)), initializer=start)
    return tf.clip_by_value(tf.bitwise.right_shift(acc, _PIL_PRECISION_BITS), 0, 255)


def pil_bilinear_resize(image: tf.Tensor, size) -> tf.Tensor:
    """uint8 [h, w, C]: ``PIL.Image.fromarray(image).resize((w, h), Image.BILINEAR)``, bit-exact.

    detectron2's resize. One fixed-point pass per axis, the first rounded to uint8, in Pillow
    13's order (the pinned version). ``image`` [H, W, C] uint8 (other dtypes are rounded and
    clipped to 0..255); ``size`` int [2] (h, w).
    """
    image = tf.convert_to_tensor(image)
    if image.dtype == tf.uint8:
        values = tf.cast(image, tf.int32)
    else:
        values = tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0, 255), tf.int32)
    size = tf.cast(size, tf.int32)
    in_size = tf.shape(values)[:2]
    # Pillow 13: rows first when the height shrinks by over twice as many pixels as the width.
    vertical_first = (size[0] < in_size[0]) & (in_size[0] - size[0] > 2 * (in_size[1] - size[1]))
    out = tf.cond(
        vertical_first,
        lambda: _pil_bilinear_pass(_pil_bilinear_pass(values, size[0], 0), size[1], 1),
        lambda: _pil_bilinear_pass(_pil_bilinear_pass(values, size[1], 1), size[0], 0),
    )
    out = tf.ensure_shape(out, [None, None, image.shape[-1]])
    return tf.cast(out, tf.uint8)


def resize_image(image: tf.Tensor, size, method: str) -> tf.Tensor:
    """float32 [h, w, C] ``image`` ([H, W, C]) resized to ``size`` (h, w) by ``method``
    ("bilinear" or "pil_bilinear", a ``ResizeConfig``'s)."""
    size = tf.cast(size, tf.int32)
    if method == "pil_bilinear":
        return tf.cast(pil_bilinear_resize(image, size), tf.float32)
    if method != "bilinear":
        raise ValueError(f"method must be 'bilinear' or 'pil_bilinear', got {method!r}")
    return tf.cast(tf.image.resize(image, size, method=tf.image.ResizeMethod.BILINEAR), tf.float32)


def horizontal_flip(image: tf.Tensor, boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Mirrors an [H, W, C] image and its [n, 4] pixel boxes left-right."""
    from official.vision.ops import preprocess_ops  # pylint: disable=g-import-not-at-top

    width = tf.cast(tf.shape(image)[1], boxes.dtype)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, num=4, axis=-1)
    boxes = tf.stack([ymin, width - xmax, ymax, width - xmin], axis=-1)
    return preprocess_ops.horizontal_flip_image(image), boxes


def resize_and_pad(
    image: tf.Tensor, boxes: tf.Tensor, resize: ResizeConfig, padded_size: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Resizes [H, W, 3] ``image``, pads it to ``padded_size`` (h, w) and scales its [n, 4]
    yxyx pixel ``boxes``. Returns (image float32 [Hp, Wp, 3], image_info float32 [4, 2] =
    [original hw, resized hw, scale yx, offset 0], boxes float32 [n, 4] in resized pixels).
    """
    size = tf.cast(tf.shape(image)[:2], tf.float32)
    resized = resized_size(size, resize)
    scale = resized / size
    out = resize_image(image, resized, resize.method)
    out = tf.image.pad_to_bounding_box(out, 0, 0, padded_size[0], padded_size[1])
    image_info = tf.stack([size, resized, scale, tf.zeros([2], tf.float32)])
    boxes = tf.cast(boxes, tf.float32) * tf.tile(scale, [2])
    boxes = tf.clip_by_value(boxes, 0.0, tf.tile(resized, [2]))
    return out, image_info, boxes


def pad_groundtruth(
    boxes: tf.Tensor,
    classes: tf.Tensor,
    is_crowd: tf.Tensor,
    max_num_instances: int,
    image_id: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Pads (box 0, class -1, crowd False) or truncates ground truth to ``max_num_instances``
    rows; truncation prints a warning naming the image."""
    n = tf.shape(classes)[0]

    def _warn():
        tf.print(
            "WARNING: fpn_tf.data: image id",
            -1 if image_id is None else image_id,
            "has",
            n,
            "instances; keeping the first",
            max_num_instances,
            "(raise max_num_instances to keep all)",
            output_stream=sys.stderr,
        )
        return tf.constant(0)

    warned = tf.cond(n > max_num_instances, _warn, lambda: tf.constant(0))
    with tf.control_dependencies([warned]):
        k = tf.minimum(n, max_num_instances)
    pad = max_num_instances - k
    boxes = tf.pad(tf.cast(boxes[:k], tf.float32), [[0, pad], [0, 0]])
    classes = tf.pad(tf.cast(classes[:k], tf.int32), [[0, pad]], constant_values=-1)
    is_crowd = tf.pad(tf.cast(is_crowd[:k], tf.bool), [[0, pad]], constant_values=False)
    return (
        tf.ensure_shape(boxes, [max_num_instances, 4]),
        tf.ensure_shape(classes, [max_num_instances]),
        tf.ensure_shape(is_crowd, [max_num_instances]),
    )


def crop_instance_masks(
    masks: tf.Tensor,
    boxes: tf.Tensor,
    flip: bool | tf.Tensor,
    mask_crop_size: int,
    max_num_instances: int,
) -> tf.Tensor:
    """float32 [N, S, S] box-relative masks of the first N = ``max_num_instances`` objects
    (zero rows beyond n), cropped from [n, H, W] 0/1 ``masks`` of the decoded image with their
    [n, 4] pixel ``boxes`` there; columns reversed if ``flip``. S = ``mask_crop_size``."""
    k = tf.minimum(tf.shape(masks)[0], max_num_instances)
    crops = mask_ops.crop_masks(masks[:k], tf.cast(boxes[:k], tf.float32), mask_crop_size)
    if isinstance(flip, tf.Tensor):
        crops = tf.cond(flip, lambda: crops[..., ::-1], lambda: crops)
    elif flip:
        crops = crops[..., ::-1]
    crops = tf.pad(crops, [[0, max_num_instances - k], [0, 0], [0, 0]])
    return tf.ensure_shape(crops, [max_num_instances, mask_crop_size, mask_crop_size])


def preprocess_example(
    example: dict[str, tf.Tensor],
    resize: ResizeConfig,
    *,
    flip: bool | tf.Tensor,
    padding_mode: str,
    max_num_instances: int,
    mask_crop_size: int | None = None,
) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
    """A reader's per-image dict -> (features {"images", "image_info", "image_id"}, labels
    {"gt_boxes" [N, 4], "gt_classes" [N], "gt_is_crowd" [N], "gt_masks" [N, S, S] when
    ``mask_crop_size`` S is given}), N = ``max_num_instances``."""
    image = example["image"]
    boxes = tf.cast(example["gt_boxes"], tf.float32)
    masks = None
    if mask_crop_size is not None:
        masks = crop_instance_masks(
            example["gt_masks"], boxes, flip, mask_crop_size, max_num_instances
        )
    if isinstance(flip, tf.Tensor):
        image, boxes = tf.cond(flip, lambda: horizontal_flip(image, boxes), lambda: (image, boxes))
    elif flip:
        image, boxes = horizontal_flip(image, boxes)
    padded = padded_size_tf(tf.shape(image)[:2], padding_mode, resize)
    image, image_info, boxes = resize_and_pad(image, boxes, resize, padded)
    image_id = tf.cast(example["image_id"], tf.int64)
    boxes, classes, is_crowd = pad_groundtruth(
        boxes, example["gt_classes"], example["gt_is_crowd"], max_num_instances, image_id=image_id
    )
    features = {"images": image, "image_info": image_info, "image_id": image_id}
    labels = {"gt_boxes": boxes, "gt_classes": classes, "gt_is_crowd": is_crowd}
    if masks is not None:
        labels["gt_masks"] = masks
    return features, labels
