"""FPN Eq. 1 level assignment and multi-level RoIAlign (pure TensorFlow).

"gather" impl: all levels' maps flattened into one ``[B * T, C]`` table (``T = sum_l H_l *
W_l``); the four bilinear neighbours of every sample become row indices, so every RoI is read
by one ``tf.gather`` and weighted by one batched matmul (``K = 4 * sampling_ratio**2`` rows per
bin). Static shapes (XLA); the transient gather holds ``B * R * output_size**2 * K * C`` values.

Sampling as detectron2's ``ROIAlignV2`` (``aligned=True``): image point ``p`` maps to ``p /
stride - 0.5``; each bin averages a ``sampling_ratio``² grid of bilinear samples.
``aligned=False`` is torchvision's legacy form (no shift, RoI at least one cell).
``sampling_ratio=0`` is adaptive (``ceil(roi_size / output_size)`` per axis, capped at
``MAX_ADAPTIVE_SAMPLING_RATIO`` for static shapes; always the gather). Samples beyond ``[-1, H]`` count
as 0 in the average; others are clamped to ``[0, H - 1]`` (detectron2's bilinear_interpolate).
"""

import tensorflow as tf

from fpn_tf.ops import anchors as anchor_lib
from fpn_tf.ops import box_ops
from fpn_tf.ops.xla_utils import in_xla_context

__all__ = ["MAX_ADAPTIVE_SAMPLING_RATIO", "assign_levels", "multilevel_roi_align"]

# sampling_ratio=0 takes ceil(roi_size / output_size) samples per bin, at most this many (static
# shapes).
MAX_ADAPTIVE_SAMPLING_RATIO = 4


def assign_levels(boxes, *, min_level, max_level, canonical_size, canonical_level, level_epsilon):
    """FPN Eq. 1: int32 ``k = floor(canonical_level + log2(sqrt(w * h) / canonical_size) +
    level_epsilon)`` in [min_level, max_level] (the arguments are `RoIAlignerConfig`'s fields).

    ``level_epsilon == 0`` compares areas with thresholds, exact at the powers of two (224x224
    -> 4); ``level_epsilon > 0`` is torchvision's float32 LevelMapper (eps 1e-6). Zero-area
    boxes get ``min_level``.
    """
    a = box_ops.area(tf.cast(boxes, tf.float32))
    if level_epsilon > 0:
        ratio = tf.sqrt(tf.maximum(a, 1e-30)) / float(canonical_size)
        k = tf.floor(
            float(canonical_level) + tf.math.log(ratio) / tf.math.log(2.0) + float(level_epsilon)
        )
        k = tf.clip_by_value(k, float(min_level), float(max_level))
        return tf.where(a > 0.0, tf.cast(k, tf.int32), tf.constant(min_level, tf.int32))
    level = tf.fill(tf.shape(a), tf.constant(min_level, tf.int32))
    for l in range(min_level + 1, max_level + 1):
        threshold = float(canonical_size) * 2.0 ** (l - canonical_level)
        level += tf.cast(a >= threshold * threshold, tf.int32)
    return level


def _axis_sample(coords, size, size_f):
    """detectron2's bilinear_interpolate along one axis of ``size`` cells: (low, high) int32
    indices and their weights (0 outside)."""
    inside = tf.logical_and(coords >= -1.0, coords <= size_f)
    c = tf.maximum(coords, 0.0)
    low = tf.cast(tf.floor(c), tf.int32)
    at_end = low >= size - 1
    low = tf.where(at_end, size - 1, low)
    high = tf.where(at_end, size - 1, low + 1)
    c = tf.where(at_end, tf.cast(low, c.dtype), c)
    frac = c - tf.cast(low, c.dtype)
    inside_f = tf.cast(inside, c.dtype)
    return low, high, (1.0 - frac) * inside_f, frac * inside_f


def _roi_in_cells(rois, stride, aligned):
    """RoI ``(y0, x0, height, width)`` in feature cells."""
    shift = 0.5 if aligned else 0.0
    ymin, xmin, ymax, xmax = tf.unstack(rois, num=4, axis=-1)
    y0 = ymin / stride - shift
    x0 = xmin / stride - shift
    height = ymax / stride - shift - y0
    width = xmax / stride - shift - x0
    if not aligned:
        height = tf.maximum(height, 1.0)
        width = tf.maximum(width, 1.0)
    return y0, x0, height, width


def _level_features(features, min_level, max_level):
    by_number = {}
    for name, value in features.items():
        by_number[anchor_lib.level_number(name)] = value
    out = []
    for l in range(min_level, max_level + 1):
        if l not in by_number:
            raise ValueError(f"multilevel_roi_align needs level {l}; got {sorted(features)}")
        out.append((l, tf.convert_to_tensor(by_number[l])))
    return out


def multilevel_roi_align(
    features,
    rois,
    *,
    output_size,
    sampling_ratio,
    aligned,
    min_level,
    max_level,
    canonical_size,
    canonical_level,
    level_epsilon,
    align_impl,
    training=None,
    roi_levels=None,
    max_sampling_ratio=MAX_ADAPTIVE_SAMPLING_RATIO,
):
    """RoIAlign of ``rois`` [B, R, 4] (pixels) from their Eq. 1 levels of ``features``
    ``{"P2": [B, H2, W2, C], ...}`` (stride ``2**l``; extra levels ignored) -> [B, R, S, S, C].

    The settings are `RoIAlignerConfig`'s fields. ``align_impl``: "gather" (module doc);
    "crop_and_resize" (one ``crop_and_resize`` per level on the map padded by one replicated
    pixel, then an average pool: the same samples, a faster CPU forward; its gradient is
    "gather"'s recomputed, as TF's CPU CropAndResizeGradImage loses concurrent updates); "auto":
    "gather" when ``training`` or under XLA. ``roi_levels`` int32 [B, R] overrides Eq. 1. No
    gradient flows to ``rois``.
    """
    if sampling_ratio < 0 or (sampling_ratio == 0 and max_sampling_ratio < 1):
        raise ValueError(
            f"sampling_ratio must be >= 1, or 0 (adaptive) with max_sampling_ratio "
            f">= 1; got {sampling_ratio} and {max_sampling_ratio}"
        )
    rois = tf.stop_gradient(tf.cast(tf.convert_to_tensor(rois), tf.float32))
    if roi_levels is None:
        roi_levels = assign_levels(
            rois,
            min_level=min_level,
            max_level=max_level,
            canonical_size=canonical_size,
            canonical_level=canonical_level,
            level_epsilon=level_epsilon,
        )
    roi_levels = tf.stop_gradient(roi_levels)
    kwargs = dict(
        roi_levels=roi_levels,
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        min_level=min_level,
    )
    gather_kwargs = dict(kwargs, max_level=max_level, max_sampling_ratio=max_sampling_ratio)
    impl = align_impl
    if impl == "auto":
        impl = "gather" if (training or in_xla_context()) else "crop_and_resize"
    if impl not in ("gather", "crop_and_resize"):
        raise ValueError(f"unknown RoIAlign align_impl {impl!r}")
    if impl == "gather" or sampling_ratio == 0:
        return _roi_align_gather(features, rois, **gather_kwargs)
    levels = _level_features(features, min_level, max_level)
    names = [f"P{l}" for l, _ in levels]
    maps = [f for _, f in levels]

    @tf.custom_gradient
    def run(*maps):
        out = _roi_align_crop_and_resize(list(zip([l for l, _ in levels], maps)), rois, **kwargs)

        def grad(dy):
            with tf.GradientTape() as tape:
                tape.watch(maps)
                ref = _roi_align_gather(dict(zip(names, maps)), rois, **gather_kwargs)
            return tape.gradient(ref, list(maps), output_gradients=dy)

        return out, grad

    return run(*maps)


def _roi_align_crop_and_resize(
    levels, rois, roi_levels, output_size, sampling_ratio, aligned, min_level
):
    """Forward of align_impl="crop_and_resize"; ``levels`` is [(level, map)] from min to max."""
    dtype = levels[0][1].dtype
    channels = levels[0][1].shape[-1]
    batch = tf.shape(rois)[0]
    num_rois = rois.shape[1] if rois.shape[1] is not None else tf.shape(rois)[1]
    lvl = tf.reshape(
        tf.clip_by_value(tf.cast(roi_levels, tf.int32) - min_level, 0, len(levels) - 1), [-1]
    )
    box_index = tf.reshape(
        tf.broadcast_to(tf.range(batch, dtype=tf.int32)[:, None], tf.shape(rois)[:2]), [-1]
    )
    part_rois = tf.dynamic_partition(tf.reshape(rois, [-1, 4]), lvl, len(levels))
    part_index = tf.dynamic_partition(box_index, lvl, len(levels))
    part_pos = tf.dynamic_partition(tf.range(tf.shape(lvl)[0], dtype=tf.int32), lvl, len(levels))
    crop = output_size * sampling_ratio
    pooled = []
    for (level, f), r, bi in zip(levels, part_rois, part_index):
        stride = float(2**level)
        # One replicated pixel around the map: reads in [-1, 0) and (H-1, H] give the edge
        # (detectron2's clamp); beyond, the extrapolation value 0.
        fp = tf.cast(f, tf.float32)
        fp = tf.concat([fp[:, :1], fp, fp[:, -1:]], axis=1)
        fp = tf.concat([fp[:, :, :1], fp, fp[:, :, -1:]], axis=2)
        hp = tf.cast(tf.shape(fp)[1] - 1, tf.float32)
        wp = tf.cast(tf.shape(fp)[2] - 1, tf.float32)
        y0, x0, rh, rw = _roi_in_cells(r, stride, aligned)
        # First and last of the crop x crop sub-cell centres, +1 for the padding.
        boxes = tf.stack(
            [
                (y0 + 0.5 * rh / crop + 1.0) / hp,
                (x0 + 0.5 * rw / crop + 1.0) / wp,
                (y0 + (crop - 0.5) * rh / crop + 1.0) / hp,
                (x0 + (crop - 0.5) * rw / crop + 1.0) / wp,
            ],
            axis=-1,
        )
        c = tf.image.crop_and_resize(
            fp, boxes, bi, [crop, crop], method="bilinear", extrapolation_value=0.0
        )
        if sampling_ratio > 1:
            c = tf.nn.avg_pool2d(c, sampling_ratio, sampling_ratio, "VALID")
        pooled.append(c)
    out = tf.dynamic_stitch(part_pos, pooled)
    return tf.cast(_unflatten(out, batch, num_rois, output_size, channels), dtype)


def _roi_align_gather(
    features,
    rois,
    roi_levels,
    output_size,
    sampling_ratio,
    aligned,
    min_level,
    max_level,
    max_sampling_ratio,
):
    """align_impl="gather" (the module docstring)."""
    levels = _level_features(features, min_level, max_level)
    dtype = levels[0][1].dtype
    channels = levels[0][1].shape[-1]
    rois = tf.cast(tf.convert_to_tensor(rois), tf.float32)

    batch = tf.shape(rois)[0]
    flat, heights, widths, offsets = [], [], [], []
    total = 0
    for _, f in levels:
        shp = tf.shape(f)
        h = f.shape[1] if f.shape[1] is not None else shp[1]
        w = f.shape[2] if f.shape[2] is not None else shp[2]
        heights.append(h)
        widths.append(w)
        offsets.append(total)
        flat.append(tf.reshape(f, [shp[0], h * w, -1 if channels is None else channels]))
        total = total + h * w
    table = tf.concat(flat, axis=1)  # [B, T, C]
    table = tf.reshape(table, [-1, tf.shape(table)[-1] if channels is None else channels])
    heights = tf.stack([tf.cast(h, tf.int32) for h in heights])
    widths = tf.stack([tf.cast(w, tf.int32) for w in widths])
    offsets = tf.stack([tf.cast(o, tf.int32) for o in offsets])
    strides = tf.constant([float(2**l) for l, _ in levels], tf.float32)

    lvl = tf.clip_by_value(tf.cast(roi_levels, tf.int32) - min_level, 0, len(levels) - 1)
    stride = tf.gather(strides, lvl)  # [B, R]
    height = tf.gather(heights, lvl)[..., None, None]  # [B, R, 1, 1]
    width = tf.gather(widths, lvl)[..., None, None]
    offset = tf.gather(offsets, lvl)  # [B, R]

    y0, x0, roi_h, roi_w = _roi_in_cells(rois, stride, aligned)
    adaptive = sampling_ratio == 0
    if adaptive:
        sampling_ratio = int(max_sampling_ratio)
    bins = tf.range(output_size, dtype=tf.float32)[:, None]
    steps = tf.range(sampling_ratio, dtype=tf.float32)[None, :] + 0.5
    if adaptive:
        # Per RoI and axis: n = ceil(size / output_size) samples per bin, capped; samples past
        # n get weight 0 and the bin's mean divides by n_y * n_x (at least 1, as detectron2).
        n_y = tf.clip_by_value(tf.math.ceil(roi_h / output_size), 0.0, float(sampling_ratio))
        n_x = tf.clip_by_value(tf.math.ceil(roi_w / output_size), 0.0, float(sampling_ratio))
        grid_y = bins + steps / tf.maximum(n_y, 1.0)[..., None, None]  # [B, R, out, sr]
        grid_x = bins + steps / tf.maximum(n_x, 1.0)[..., None, None]
        used_y = tf.cast(steps < n_y[..., None, None], tf.float32)  # [B, R, 1, sr]
        used_x = tf.cast(steps < n_x[..., None, None], tf.float32)
        count = tf.reshape(tf.maximum(n_y * n_x, 1.0), [-1, 1, 1, 1, 1])  # [B * R, 1, 1, 1, 1]
    else:
        # Sample positions inside the RoI in units of bins: [out, sr].
        grid_y = grid_x = bins + steps / sampling_ratio
        count = float(sampling_ratio * sampling_ratio)
    bin_h = (roi_h / output_size)[..., None, None]
    bin_w = (roi_w / output_size)[..., None, None]
    ys = y0[..., None, None] + grid_y * bin_h  # [B, R, out, sr]
    xs = x0[..., None, None] + grid_x * bin_w

    y_lo, y_hi, wy_lo, wy_hi = _axis_sample(ys, height, tf.cast(height, tf.float32))
    x_lo, x_hi, wx_lo, wx_hi = _axis_sample(xs, width, tf.cast(width, tf.float32))
    if adaptive:
        wy_lo, wy_hi = wy_lo * used_y, wy_hi * used_y
        wx_lo, wx_hi = wx_lo * used_x, wx_hi * used_x
    y_idx = tf.stack([y_lo, y_hi], axis=-1)  # [B, R, out, sr, 2]
    x_idx = tf.stack([x_lo, x_hi], axis=-1)
    wy = tf.stack([wy_lo, wy_hi], axis=-1)
    wx = tf.stack([wx_lo, wx_hi], axis=-1)

    # Row index of every (bin_y i, bin_x j, sample a, corner cy, sample d, corner cx), the
    # B * R RoIs flattened into one axis and (a, cy), (d, cx) into one each, so that no tensor
    # has more than 5 dimensions (LiteRT's builtin slices and matmuls stop at 5):
    # [BR, i, 1, (a, cy), 1] * W + [BR, 1, j, 1, (d, cx)] -> [BR, out, out, K].
    s = sampling_ratio * 2
    k = s * s
    num_rois = rois.shape[1] if rois.shape[1] is not None else tf.shape(rois)[1]
    base = tf.reshape(tf.range(batch, dtype=tf.int32)[:, None] * total + offset, [-1, 1, 1, 1, 1])
    row = tf.reshape(y_idx * width[..., None], [-1, output_size, 1, s, 1])
    col = tf.reshape(x_idx, [-1, 1, output_size, 1, s])
    index = tf.reshape(base + row + col, [-1, k])  # [BR * out * out, K]
    weight = tf.reshape(wy, [-1, output_size, 1, s, 1]) * tf.reshape(wx, [-1, 1, output_size, 1, s])
    weight = tf.cast(tf.reshape(weight / count, [-1, 1, k]), dtype)  # [BR * out * out, 1, K]
    values = tf.gather(table, index)  # [BR * out * out, K, C]
    pooled = tf.linalg.matmul(weight, values)  # [BR * out * out, 1, C]
    return _unflatten(pooled, batch, num_rois, output_size, channels)


def _unflatten(pooled, batch, num_rois, output_size, channels):
    """[B * R * S * S, ..., C] -> [B, R, S, S, C]."""
    c = channels if channels is not None else tf.shape(pooled)[-1]
    return tf.reshape(pooled, [batch, num_rois, output_size, output_size, c])
