"""Anchors on the feature pyramid (pure TensorFlow, no Keras).

Paper (FPN §4.1): one anchor scale per level, areas 32², 64², 128², 256², 512² on
P2..P6, aspect ratios {1:2, 1:1, 2:1}: 3 anchors per location, 15 anchor types.

Choices, all arguments:

* Feature-map size of level ``l`` (stride ``2**l``) is ``ceil(image_size / 2**l)``.
  That is what Keras ``padding="same"`` stride-2 convolutions (and the Keras
  ResNet's explicit-zero-padding stem / stride-2 1x1 convs) produce, and what the
  FPN's P6 (max-pool kernel 1 stride 2 on P5) produces, so the anchors line up
  with the head outputs for any padded image size, odd sizes included.
* Anchor centres are at ``((y + offset) * stride, (x + offset) * stride)`` with
  ``offset = 0.5`` by default: the centre of the input-pixel block that feature
  cell ``(y, x)`` covers. (detectron2 defaults to offset 0.0, Model Garden and
  the original Detectron to ~0.5; the difference is half a stride and the box
  regression absorbs it.) torchvision also uses 0.0.
* ``round_cell_anchors=True`` rounds the corners of each cell's anchors (centred at
  0) to integers before they are shifted, half to even (torchvision's
  ``base_anchors.round()``); detectron2 and the default do not round.
* ``stride_from_padded_size=True`` takes the stride of each level and axis as
  ``padded_size // feature_map_size`` (integer division), as torchvision's
  ``AnchorGenerator`` does: an 800-pixel side has 13 P6 cells of stride 61. The
  default is the level's stride ``2**l`` (detectron2).
* Aspect ratio ``r`` is height / width: an anchor of size ``s`` and ratio ``r``
  has ``h = s * sqrt(r)``, ``w = s / sqrt(r)`` (area ``s**2``), no rounding.
* Order of the flattened anchors of a level: row-major over feature cells
  ``(y, x)``, then the ``A`` anchor types of a cell, with sizes outer and
  aspect ratios inner (``for size in sizes: for ratio in ratios``). A head
  that outputs ``[B, H, W, A]`` logits / ``[B, H, W, A*4]`` deltas matches it
  with a plain ``reshape`` to ``[B, H*W*A]`` / ``[B, H*W*A, 4]``.

Levels are named "P2".."P6" (ints 2..6 are accepted too); the stride of level
``l`` is ``2**l``. ``sizes`` may give several sizes per level, e.g. the
single-level ablation ``levels=("P4",), sizes={"P4": (32, 64, 128, 256, 512)}``
(15 anchor types on one level).
"""

import collections
import math
import numbers

import numpy as np
import tensorflow as tf

__all__ = [
    "DEFAULT_LEVELS",
    "DEFAULT_SIZES",
    "DEFAULT_ASPECT_RATIOS",
    "level_number",
    "level_stride",
    "feature_map_size",
    "normalize_anchor_config",
    "cell_anchors",
    "num_anchors_per_location",
    "generate_anchors",
    "concat_anchors",
]

DEFAULT_LEVELS = ("P2", "P3", "P4", "P5", "P6")
DEFAULT_SIZES = (32, 64, 128, 256, 512)
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)


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
    """``ceil(image_size / 2**level)`` for height and width.

    Args:
      image_size: ``(height, width)`` python ints, or an int/float tensor [2].
      level: "P2".."P6" or an int.
    Returns:
      ``(h, w)``: python ints when the image size is static, else int32 scalar
      tensors.
    """
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


def _as_tuple(x):
    if isinstance(x, numbers.Number):
        return (x,)
    return tuple(x)


def normalize_anchor_config(
    levels=DEFAULT_LEVELS, sizes=DEFAULT_SIZES, aspect_ratios=DEFAULT_ASPECT_RATIOS
):
    """Resolves the accepted spellings of sizes / ratios to per-level tuples.

    ``sizes``: a dict ``{level: size or sizes}``; or a flat sequence with one size
    per level; or a sequence (one entry per level) of sequences; or, when there is
    a single level, a flat sequence of all its sizes.
    ``aspect_ratios``: a flat sequence applied to every level, or a dict / a
    sequence of sequences per level.

    Returns:
      ``OrderedDict level -> (sizes tuple, ratios tuple)`` in ``levels`` order,
      keyed by the level names as given.
    """
    levels = tuple(levels)
    if isinstance(sizes, dict):
        per_level_sizes = [_as_tuple(sizes[l]) for l in levels]
    else:
        sizes = tuple(sizes)
        if all(isinstance(s, numbers.Number) for s in sizes):
            if len(sizes) == len(levels):
                per_level_sizes = [(s,) for s in sizes]
            elif len(levels) == 1:
                per_level_sizes = [sizes]
            else:
                raise ValueError(f"{len(sizes)} sizes for {len(levels)} levels {levels}")
        else:
            if len(sizes) != len(levels):
                raise ValueError(f"{len(sizes)} size lists for {len(levels)} levels")
            per_level_sizes = [_as_tuple(s) for s in sizes]
    if isinstance(aspect_ratios, dict):
        per_level_ratios = [_as_tuple(aspect_ratios[l]) for l in levels]
    else:
        aspect_ratios = tuple(aspect_ratios)
        if all(isinstance(r, numbers.Number) for r in aspect_ratios):
            per_level_ratios = [aspect_ratios] * len(levels)
        else:
            if len(aspect_ratios) != len(levels):
                raise ValueError(f"{len(aspect_ratios)} ratio lists for {len(levels)} levels")
            per_level_ratios = [_as_tuple(r) for r in aspect_ratios]
    return collections.OrderedDict(
        (l, (s, r)) for l, s, r in zip(levels, per_level_sizes, per_level_ratios)
    )


def cell_anchors(sizes, aspect_ratios):
    """The anchors of one feature cell, centred at (0, 0).

    Args:
      sizes: sequence of sizes (sqrt of the area, pixels).
      aspect_ratios: sequence of height / width ratios.
    Returns:
      float32 numpy array [len(sizes) * len(aspect_ratios), 4], yxyx, sizes outer.
    """
    out = []
    for size in _as_tuple(sizes):
        for ratio in _as_tuple(aspect_ratios):
            h = float(size) * math.sqrt(ratio)
            w = float(size) / math.sqrt(ratio)
            out.append([-0.5 * h, -0.5 * w, 0.5 * h, 0.5 * w])
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


def num_anchors_per_location(
    levels=DEFAULT_LEVELS, sizes=DEFAULT_SIZES, aspect_ratios=DEFAULT_ASPECT_RATIOS
):
    """``OrderedDict level -> A`` (anchor types per cell) for each level."""
    cfg = normalize_anchor_config(levels, sizes, aspect_ratios)
    return collections.OrderedDict((l, len(s) * len(r)) for l, (s, r) in cfg.items())


def generate_anchors(
    image_size,
    levels=DEFAULT_LEVELS,
    sizes=DEFAULT_SIZES,
    aspect_ratios=DEFAULT_ASPECT_RATIOS,
    offset=0.5,
    dtype=tf.float32,
    round_cell_anchors=False,
    stride_from_padded_size=False,
):
    """Anchors of every level for one (padded) image size.

    Args:
      image_size: ``(height, width)`` of the padded image the network sees:
        python ints (static shapes) or an int tensor [2].
      levels: level names, e.g. ("P2", ..., "P6").
      sizes / aspect_ratios: see :func:`normalize_anchor_config`.
      offset: anchor centre offset in cells (0.5: centre of the cell; 0.0 in
        torchvision and detectron2).
      dtype: float dtype of the result.
      round_cell_anchors: round each cell anchor's corners to integers (half to
        even) before shifting (torchvision).
      stride_from_padded_size: per-axis stride ``image_size // feature_map_size``
        (torchvision) instead of ``2**l``.
    Returns:
      ``OrderedDict level -> [H_l * W_l * A_l, 4]`` yxyx anchors in input pixels,
      ``H_l, W_l = ceil(image_size / 2**l)``.
    """
    cfg = normalize_anchor_config(levels, sizes, aspect_ratios)
    out = collections.OrderedDict()
    for level, (lsizes, lratios) in cfg.items():
        fh, fw = feature_map_size(image_size, level)
        if stride_from_padded_size:
            stride_y, stride_x = _strides_from_padded_size(image_size, fh, fw, dtype)
        else:
            stride_y = stride_x = float(level_stride(level))
        corners = cell_anchors(lsizes, lratios)
        if round_cell_anchors:
            corners = np.round(corners)  # half to even, as torch.round
        cell = tf.constant(corners, dtype=dtype)  # [A, 4]
        num_a = cell.shape[0]
        ys = (tf.cast(tf.range(fh), dtype) + offset) * stride_y  # [fh]
        xs = (tf.cast(tf.range(fw), dtype) + offset) * stride_x  # [fw]
        cy, cx = tf.meshgrid(ys, xs, indexing="ij")  # [fh, fw]
        centers = tf.stack([cy, cx, cy, cx], axis=-1)[:, :, None, :]  # [fh, fw, 1, 4]
        anchors = centers + cell[None, None, :, :]  # [fh, fw, A, 4]
        if isinstance(fh, int) and isinstance(fw, int):
            anchors = tf.reshape(anchors, [fh * fw * num_a, 4])
        else:
            anchors = tf.reshape(anchors, [-1, 4])
        out[level] = anchors
    return out


def _strides_from_padded_size(image_size, fh, fw, dtype):
    """``image_size // (fh, fw)`` per axis: python floats when static, else ``dtype`` scalars."""
    h, w = _height_width(image_size)
    out = []
    for v, n in ((h, fh), (w, fw)):
        sv, sn = _static_int(v), _static_int(n)
        if sv is not None and sn is not None:
            out.append(float(sv // sn))
        else:
            out.append(tf.cast(tf.cast(v, tf.int32) // tf.cast(n, tf.int32), dtype))
    return tuple(out)


def concat_anchors(anchors):
    """Concatenates per-level anchors in level order.

    Args:
      anchors: ``OrderedDict level -> [A_l, 4]`` (from :func:`generate_anchors`).
    Returns:
      ``(all_anchors [sum A_l, 4], counts)`` where ``counts`` is a list of the
      per-level ``A_l``: python ints when static, else int32 scalar tensors
      (e.g. for ``tf.split``).
    """
    tensors = list(anchors.values())
    counts = []
    for t in tensors:
        n = t.shape[0]
        counts.append(int(n) if n is not None else tf.shape(t)[0])
    return tf.concat(tensors, axis=0), counts
