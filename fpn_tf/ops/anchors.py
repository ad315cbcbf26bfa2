"""Anchors on the feature pyramid (FPN §4.1; pure TensorFlow).

* Level ``l`` ("P2".."P6" or an int) has stride ``2**l`` and ``ceil(image_size / 2**l)`` cells
  per axis, as Keras "same"-padded stride-2 layers, so anchors line up with the head outputs.
* Centres at ``((y + offset) * stride, (x + offset) * stride)``: ``offset`` 0.5 is Model
  Garden's, 0.0 detectron2's and torchvision's. ``round_cell_anchors`` rounds the cell's corners
  half to even before shifting and ``stride_from_padded_size`` uses ``padded_size //
  feature_map_size`` per axis (both torchvision).
* Aspect ratio ``r`` is height / width: ``h = s * sqrt(r)``, ``w = s / sqrt(r)`` (area s²).
* A level's anchors are row-major over cells ``(y, x)``, then sizes outer, ratios inner, so a
  head's ``[B, H, W, A]`` output matches after a plain reshape to ``[B, H*W*A]``.
"""

import collections
import math
import numbers

import numpy as np
import tensorflow as tf

__all__ = [
    "level_number",
    "level_stride",
    "feature_map_size",
    "cell_anchors",
    "num_anchors_per_location",
    "generate_anchors",
    "concat_anchors",
]


def level_number(level):
    """``"P4"`` (or ``"C4"`` or ``4``) -> ``4``."""
    if isinstance(level, numbers.Integral):
        return int(level)
    return int(str(level).lstrip("PpCc"))


def level_stride(level):
    """Stride in input pixels of a level: ``2**l``."""
    return 2 ** level_number(level)


def _static_int(x):
    """Python int if ``x`` is a python number or a tensor with a static value."""
    if isinstance(x, numbers.Number):
        return int(x)
    value = tf.get_static_value(x)
    return None if value is None else int(value)


def feature_map_size(image_size, level):
    """``ceil(image_size / 2**level)`` per axis of ``(height, width)`` (ints or a tensor [2]):
    python ints when static, else int32 scalars."""
    stride = level_stride(level)
    h, w = _height_width(image_size)
    out = []
    for v in (h, w):
        sv = _static_int(v)
        if sv is not None:
            out.append(-(-sv // stride))
        else:
            v = tf.cast(v, tf.int32)
            out.append((v + stride - 1) // stride)
    return tuple(out)


def _height_width(image_size):
    """``(height, width)`` of a python pair or of an int/float tensor [2]."""
    if isinstance(image_size, (tuple, list)):
        return tuple(image_size)
    image_size = tf.convert_to_tensor(image_size)
    return image_size[0], image_size[1]


def _per_level(levels, sizes, aspect_ratios):
    """``[(level, sizes tuple, ratios tuple)]`` of ``sizes`` ``{level: sizes}`` (an entry for
    every level) and ``aspect_ratios`` shared by all levels."""
    missing = [l for l in levels if l not in sizes]
    if missing:
        raise ValueError(f"no anchor sizes for levels {missing} (sizes: {dict(sizes)})")
    return [(l, tuple(sizes[l]), tuple(aspect_ratios)) for l in levels]


def cell_anchors(sizes, aspect_ratios):
    """One cell's anchors centred at (0, 0): float32 numpy [len(sizes) * len(ratios), 4] yxyx,
    sizes (sqrt of the area, pixels) outer, height / width ratios inner."""
    out = []
    for size in sizes:
        for ratio in aspect_ratios:
            h = float(size) * math.sqrt(ratio)
            w = float(size) / math.sqrt(ratio)
            out.append([-0.5 * h, -0.5 * w, 0.5 * h, 0.5 * w])
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


def num_anchors_per_location(levels, sizes, aspect_ratios):
    """``OrderedDict level -> A`` (anchors per cell) of each level."""
    return collections.OrderedDict(
        (l, len(s) * len(r)) for l, s, r in _per_level(levels, sizes, aspect_ratios)
    )


def generate_anchors(
    image_size,
    levels,
    sizes,
    aspect_ratios,
    *,
    offset,
    round_cell_anchors=False,
    stride_from_padded_size=False,
):
    """``OrderedDict level -> float32 [H_l * W_l * A_l, 4]`` yxyx anchors in input pixels.

    ``image_size``: the padded ``(height, width)``; ``sizes``: ``{level: sizes}``, several per
    level give several anchors per cell; ``aspect_ratios`` are shared by every level.
    """
    out = collections.OrderedDict()
    for level, lsizes, lratios in _per_level(levels, sizes, aspect_ratios):
        fh, fw = feature_map_size(image_size, level)
        if stride_from_padded_size:
            stride_y, stride_x = _strides_from_padded_size(image_size, fh, fw)
        else:
            stride_y = stride_x = float(level_stride(level))
        corners = cell_anchors(lsizes, lratios)
        if round_cell_anchors:
            corners = np.round(corners)  # half to even, as torch.round
        cell = tf.constant(corners, dtype=tf.float32)  # [A, 4]
        ys = (tf.cast(tf.range(fh), tf.float32) + offset) * stride_y  # [fh]
        xs = (tf.cast(tf.range(fw), tf.float32) + offset) * stride_x  # [fw]
        cy, cx = tf.meshgrid(ys, xs, indexing="ij")  # [fh, fw]
        centers = tf.stack([cy, cx, cy, cx], axis=-1)[:, :, None, :]  # [fh, fw, 1, 4]
        anchors = centers + cell[None, None, :, :]  # [fh, fw, A, 4]
        static = isinstance(fh, int) and isinstance(fw, int)
        out[level] = tf.reshape(anchors, [fh * fw * cell.shape[0] if static else -1, 4])
    return out


def _strides_from_padded_size(image_size, fh, fw):
    """``image_size // (fh, fw)`` per axis: python floats when static, else float32 scalars."""
    h, w = _height_width(image_size)
    out = []
    for v, n in ((h, fh), (w, fw)):
        sv, sn = _static_int(v), _static_int(n)
        if sv is not None and sn is not None:
            out.append(float(sv // sn))
        else:
            out.append(tf.cast(tf.cast(v, tf.int32) // tf.cast(n, tf.int32), tf.float32))
    return tuple(out)


def concat_anchors(anchors):
    """``(anchors [sum A_l, 4], counts)`` in level order; ``counts`` are python ints when
    static, else int32 scalars (for ``tf.split``)."""
    tensors = list(anchors.values())
    counts = [int(t.shape[0]) if t.shape[0] is not None else tf.shape(t)[0] for t in tensors]
    return tf.concat(tensors, axis=0), counts
