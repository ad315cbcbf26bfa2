"""Per-image transforms (pure TF): flip, resize (paper §5.1), pad, pad ground truth.

:func:`resized_size` is the one resize rule for the pipeline and the serving graph. Its
``resize_rounding`` is ``"round"`` (Model Garden's ``resize_and_crop_image_v2``: half to even in
float32), ``"floor"`` (torchvision's ``GeneralizedRCNNTransform``, float64) or ``"half_up"``
(detectron2's ``ResizeShortestEdge``, float64); boxes are scaled by the per-axis
``resized / original``, so they stay exact on the resized grid. ``resize_method`` resamples with
``tf.image.resize`` bilinear (torchvision's) or bit-exact PIL bilinear on uint8 (detectron2's,
:func:`pil_bilinear_resize`); the output is float32 RGB in 0..255 either way.

Padding is zeros at the bottom/right, so boxes need no offset. The flip happens before the
resize (both commute with it). Instance masks are cropped box-relative ``S x S`` from the
full-size masks in the original frame, so no full-resolution mask is resized, flipped or batched.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import tensorflow as tf

from fpn_tf.ops import mask_ops

__all__ = [
    "PADDING_MODES",
    "RESIZE_METHODS",
    "RESIZE_ROUNDINGS",
    "ResizeRule",
    "ceil_to_multiple",
    "compute_resized_size",
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

# "orientation": [ceil(short), ceil(long)] or its transpose (2 shapes); "square": [ceil(long)]*2
# (1 shape); "batch": multiples of pad_multiple, each batch to its largest.
PADDING_MODES = ("orientation", "square", "batch")
RESIZE_ROUNDINGS = ("round", "floor", "half_up")
RESIZE_METHODS = ("bilinear", "pil_bilinear")
# PIL's fixed point for 8-bit images (libImaging/Resample.c): 32 - 8 - 2 fraction bits.
_PIL_PRECISION_BITS = 22


def ceil_to_multiple(x: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= x (python ints)."""
    return int(math.ceil(x / multiple) * multiple)


@dataclasses.dataclass(frozen=True)
class ResizeRule:
    """A model's eval/serving resize and padding: the config's ``eval_data`` fields."""

    short_side: int
    max_long_side: int
    pad_multiple: int = 1
    resize_rounding: str = "round"
    resize_method: str = "bilinear"

    def __post_init__(self):
        if self.short_side <= 0 or self.max_long_side < self.short_side or self.pad_multiple < 1:
            raise ValueError(
                "need 0 < short_side <= max_long_side and pad_multiple >= 1, got "
                f"{self.short_side}, {self.max_long_side}, {self.pad_multiple}"
            )
        _check_rounding(self.resize_rounding)
        _check_method(self.resize_method)

    @classmethod
    def from_config(cls, config) -> "ResizeRule":
        """The rule of an `ExperimentConfig` (its ``eval_data``) or of a data config."""
        d = getattr(config, "eval_data", config)
        fields = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: getattr(d, name) for name in fields})

    @classmethod
    def of(cls, *args, **fields) -> "ResizeRule":
        """A rule from one argument (a rule, a dict of its fields, a config) or from the fields."""
        if len(args) == 1 and not fields and not isinstance(args[0], (int, float)):
            value = args[0]
            if isinstance(value, cls):
                return value
            return cls(**value) if isinstance(value, dict) else cls.from_config(value)
        return cls(*args, **fields)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_rounding(resize_rounding: str) -> None:
    if resize_rounding not in RESIZE_ROUNDINGS:
        raise ValueError(
            f"resize_rounding must be one of {RESIZE_ROUNDINGS}, got {resize_rounding!r}"
        )


def _check_method(resize_method: str) -> None:
    if resize_method not in RESIZE_METHODS:
        raise ValueError(f"resize_method must be one of {RESIZE_METHODS}, got {resize_method!r}")


def resized_size(
    image_size, short_side: int, max_long_side: int, resize_rounding: str = "round"
) -> tf.Tensor:
    """float32 [..., 2] resized (h, w) of images of (h, w) ``image_size`` [..., 2]."""
    _check_rounding(resize_rounding)
    if resize_rounding == "half_up":
        return _half_up_resized_size(image_size, short_side, max_long_side)
    size = tf.cast(image_size, tf.float32)
    shortest = tf.reduce_min(size, axis=-1, keepdims=True)
    longest = tf.reduce_max(size, axis=-1, keepdims=True)
    if resize_rounding == "floor":
        size64 = tf.cast(image_size, tf.float64)
        scale = tf.minimum(
            float(short_side) / tf.reduce_min(size64, axis=-1, keepdims=True),
            float(max_long_side) / tf.reduce_max(size64, axis=-1, keepdims=True),
        )
        return tf.cast(tf.math.floor(size64 * scale), tf.float32)
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


def compute_resized_size(
    height: int, width: int, short_side: int, max_long_side: int, resize_rounding: str = "round"
) -> tuple[int, int]:
    """:func:`resized_size` of one image, as Python ints."""
    h, w = resized_size(
        tf.constant([height, width]), short_side, max_long_side, resize_rounding
    ).numpy()
    return int(h), int(w)


def fixed_padded_size(
    padding_mode: str, short_side: int, max_long_side: int, pad_multiple: int
) -> list[tuple[int, int]]:
    """The image shapes a run sees in ``padding_mode`` ([] for "batch")."""
    s = ceil_to_multiple(short_side, pad_multiple)
    l = ceil_to_multiple(max_long_side, pad_multiple)
    if padding_mode == "orientation":
        return [(s, l), (l, s)]
    if padding_mode == "square":
        return [(l, l)]
    if padding_mode == "batch":
        return []
    raise ValueError(f"padding_mode must be one of {PADDING_MODES}, " f"got {padding_mode!r}")


def padded_size_tf(
    image_size: tf.Tensor,
    padding_mode: str,
    short_side: int,
    max_long_side: int,
    pad_multiple: int,
    resize_rounding: str = "round",
) -> tf.Tensor:
    """int32 [2] padded (h, w) for an image of ``image_size`` (before resize)."""
    if padding_mode == "batch":
        resized = resized_size(image_size, short_side, max_long_side, resize_rounding)
        m = float(pad_multiple)
        return tf.cast(tf.math.ceil(resized / m) * m, tf.int32)
    shapes = fixed_padded_size(padding_mode, short_side, max_long_side, pad_multiple)
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


def resize_image(image: tf.Tensor, size, resize_method: str = "bilinear") -> tf.Tensor:
    """float32 [h, w, C] ``image`` ([H, W, C]) resized to ``size`` (h, w) by ``resize_method``."""
    _check_method(resize_method)
    size = tf.cast(size, tf.int32)
    if resize_method == "pil_bilinear":
        return tf.cast(pil_bilinear_resize(image, size), tf.float32)
    out = tf.image.resize(image, size, method=tf.image.ResizeMethod.BILINEAR)
    return tf.cast(out, tf.float32)


def horizontal_flip(image: tf.Tensor, boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Mirrors an [H, W, C] image and its [n, 4] pixel boxes left-right."""
    from official.vision.ops import preprocess_ops  # pylint: disable=g-import-not-at-top

    width = tf.cast(tf.shape(image)[1], boxes.dtype)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, num=4, axis=-1)
    boxes = tf.stack([ymin, width - xmax, ymax, width - xmin], axis=-1)
    return preprocess_ops.horizontal_flip_image(image), boxes


def resize_and_pad(
    image: tf.Tensor,
    boxes: tf.Tensor,
    *,
    short_side: int,
    max_long_side: int,
    padded_size: tf.Tensor,
    resize_rounding: str = "round",
    resize_method: str = "bilinear",
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Resizes [H, W, 3] ``image``, pads it to ``padded_size`` (h, w) and scales its [n, 4]
    yxyx pixel ``boxes``. Returns (image float32 [Hp, Wp, 3], image_info float32 [4, 2] =
    [original hw, resized hw, scale yx, offset 0], boxes float32 [n, 4] in resized pixels).
    """
    size = tf.cast(tf.shape(image)[:2], tf.float32)
    resized = resized_size(size, short_side, max_long_side, resize_rounding)
    scale = resized / size
    out = resize_image(image, resized, resize_method)
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
    *,
    flip: bool | tf.Tensor = False,
    short_side: int = 800,
    max_long_side: int = 1333,
    pad_multiple: int = 32,
    padding_mode: str = "orientation",
    max_num_instances: int = 100,
    resize_rounding: str = "round",
    resize_method: str = "bilinear",
    include_masks: bool = False,
    mask_crop_size: int = 112,
) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
    """A reader's per-image dict -> (features {"images", "image_info", "image_id"}, labels
    {"gt_boxes" [N, 4], "gt_classes" [N], "gt_is_crowd" [N], "gt_masks" [N, S, S] with
    ``include_masks``}), N = ``max_num_instances``."""
    image = example["image"]
    boxes = tf.cast(example["gt_boxes"], tf.float32)
    masks = None
    if include_masks:
        masks = crop_instance_masks(
            example["gt_masks"], boxes, flip, mask_crop_size, max_num_instances
        )
    if isinstance(flip, tf.Tensor):
        image, boxes = tf.cond(flip, lambda: horizontal_flip(image, boxes), lambda: (image, boxes))
    elif flip:
        image, boxes = horizontal_flip(image, boxes)
    padded = padded_size_tf(
        tf.shape(image)[:2], padding_mode, short_side, max_long_side, pad_multiple, resize_rounding
    )
    image, image_info, boxes = resize_and_pad(
        image,
        boxes,
        short_side=short_side,
        max_long_side=max_long_side,
        padded_size=padded,
        resize_rounding=resize_rounding,
        resize_method=resize_method,
    )
    image_id = tf.cast(example["image_id"], tf.int64)
    boxes, classes, is_crowd = pad_groundtruth(
        boxes, example["gt_classes"], example["gt_is_crowd"], max_num_instances, image_id=image_id
    )
    features = {"images": image, "image_info": image_info, "image_id": image_id}
    labels = {"gt_boxes": boxes, "gt_classes": classes, "gt_is_crowd": is_crowd}
    if masks is not None:
        labels["gt_masks"] = masks
    return features, labels
