"""Tests of fpn_tf.ops.roi_ops: Eq. 1 level assignment and multi-level RoIAlign."""

import math

import numpy as np
import pytest
import tensorflow as tf

from roi_testing import eq1_levels, roi_align


def _square(side, y=0.0, x=0.0):
    return [y, x, y + side, x + side]


def test_eq1_levels():
    boxes = tf.constant(
        [
            _square(224),
            _square(112),
            _square(10),
            _square(2000),
            _square(448),
            [0, 0, 0, 0],
            [5, 5, 5, 50],
            _square(223.9),
            [0, 0, 112, 448],
            [10, 10, 0, 0],
        ],
        tf.float32,
    )
    np.testing.assert_array_equal(eq1_levels(boxes).numpy(), [4, 3, 2, 5, 5, 2, 2, 3, 4, 2])
    # Arguments: a different clamp and canonical size.
    np.testing.assert_array_equal(
        eq1_levels(boxes[:5], min_level=3, max_level=6).numpy(), [4, 3, 3, 6, 5]
    )
    np.testing.assert_array_equal(eq1_levels(boxes[:2], canonical_size=112.0).numpy(), [5, 4])


def test_eq1_matches_log_formula_on_random_sizes():
    rng = np.random.default_rng(0)
    hw = rng.uniform(1, 1500, (500, 2))
    boxes = np.concatenate([np.zeros_like(hw), hw], -1).astype(np.float32)
    got = eq1_levels(boxes).numpy()
    area = (boxes[:, 2] - boxes[:, 0]).astype(np.float64) * (boxes[:, 3] - boxes[:, 1])
    ref = np.clip(np.floor(4 + np.log2(np.sqrt(area) / 224)), 2, 5)
    np.testing.assert_array_equal(got, ref)


def test_eq1_with_epsilon_is_torchvisions_level_mapper():
    """level_epsilon > 0: torchvision's LevelMapper, floor(4 + log2(sqrt(area) / 224) + eps) in
    float32; 0: the exact thresholds. Just under 448x448 the two differ."""
    boxes = tf.constant(
        [
            [0, 0, 448, 447.9999],  # area just under 448^2: 5 with eps (float32 log2), 4 exact
            _square(448),
            _square(224),
            _square(112),
            _square(10),
            _square(2000),
            [0, 0, 0, 0],
            [10, 10, 0, 0],
        ],
        tf.float32,
    )
    exact = eq1_levels(boxes).numpy()
    tv = eq1_levels(boxes, level_epsilon=1e-6).numpy()
    np.testing.assert_array_equal(exact, [4, 5, 4, 3, 2, 5, 2, 2])
    np.testing.assert_array_equal(tv, [5, 5, 4, 3, 2, 5, 2, 2])
    # Random sizes: the float32 formula, computed as torchvision does.
    rng = np.random.default_rng(0)
    hw = rng.uniform(1, 1500, (500, 2)).astype(np.float32)
    rand = np.concatenate([np.zeros_like(hw), hw], -1)
    s = np.sqrt(hw[:, 0] * hw[:, 1])
    ref = np.clip(np.floor(np.float32(4) + np.log2(s / np.float32(224)) + np.float32(1e-6)), 2, 5)
    np.testing.assert_array_equal(eq1_levels(rand, level_epsilon=1e-6).numpy(), ref)
    # Other clamp / canonical size.
    np.testing.assert_array_equal(
        eq1_levels(
            boxes[1:6], min_level=3, max_level=6, canonical_size=112.0, level_epsilon=1e-6
        ).numpy(),
        [6, 5, 4, 3, 6],
    )


def _torchvision_roi_align(f, roi_xyxy, spatial_scale, pooled, sampling_ratio, aligned):
    """torchvision.ops.roi_align's CPU kernel (roi_align_kernel.cpp) on one RoI, written from its
    formula: f [H, W, C], roi_xyxy in input pixels; returns [pooled, pooled, C]."""
    height, width = f.shape[:2]
    offset = 0.5 if aligned else 0.0
    roi_start_w = roi_xyxy[0] * spatial_scale - offset
    roi_start_h = roi_xyxy[1] * spatial_scale - offset
    roi_end_w = roi_xyxy[2] * spatial_scale - offset
    roi_end_h = roi_xyxy[3] * spatial_scale - offset
    roi_width = roi_end_w - roi_start_w
    roi_height = roi_end_h - roi_start_h
    if not aligned:  # force malformed RoIs to be 1x1
        roi_width = max(roi_width, 1.0)
        roi_height = max(roi_height, 1.0)
    bin_size_h = roi_height / pooled
    bin_size_w = roi_width / pooled
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_height / pooled)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_width / pooled)
    count = max(grid_h * grid_w, 1)

    def bilinear_interpolate(y, x):
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return np.zeros(f.shape[-1])  # empty
        if y <= 0:
            y = 0.0
        if x <= 0:
            x = 0.0
        y_low, x_low = int(y), int(x)
        if y_low >= height - 1:
            y_high = y_low = height - 1
            y = float(y_low)
        else:
            y_high = y_low + 1
        if x_low >= width - 1:
            x_high = x_low = width - 1
            x = float(x_low)
        else:
            x_high = x_low + 1
        ly, lx = y - y_low, x - x_low
        hy, hx = 1.0 - ly, 1.0 - lx
        return (
            hy * hx * f[y_low, x_low]
            + hy * lx * f[y_low, x_high]
            + ly * hx * f[y_high, x_low]
            + ly * lx * f[y_high, x_high]
        )

    out = np.zeros((pooled, pooled, f.shape[-1]))
    for ph in range(pooled):
        for pw in range(pooled):
            total = 0.0
            for iy in range(grid_h):
                y = roi_start_h + ph * bin_size_h + (iy + 0.5) * bin_size_h / grid_h
                for ix in range(grid_w):
                    x = roi_start_w + pw * bin_size_w + (ix + 0.5) * bin_size_w / grid_w
                    total = total + bilinear_interpolate(y, x)
            out[ph, pw] = total / count
    return out


@pytest.mark.parametrize("impl", ["gather", "crop_and_resize"])
def test_roi_align_unaligned_matches_torchvisions_multiscale_roi_align(impl):
    """aligned=False + level_epsilon=1e-6 is torchvision's MultiScaleRoIAlign (LevelMapper with
    eps 1e-6, then roi_align(aligned=False, sampling_ratio=2) with spatial scale 1 / 2**l)."""
    rng = np.random.default_rng(5)
    img_h, img_w, c = 160, 224, 3
    feats = {
        f"P{l}": rng.normal(size=(1, math.ceil(img_h / 2**l), math.ceil(img_w / 2**l), c)).astype(
            np.float32
        )
        for l in range(2, 6)
    }
    r = 20
    side = np.exp(rng.uniform(np.log(2), np.log(500), (1, r, 2)))
    yx = rng.uniform(-60, 200, (1, r, 2))
    rois = np.concatenate([yx, yx + side], -1).astype(np.float32)
    rois[0, 0] = [30, 40, 31.5, 42]  # under one P2 cell: widened to 1x1 cells
    rois[0, 1] = [150, 200, 150, 200]  # zero size: 1x1 cell at (37.5, 50) of P2
    rois[0, 2] = [-40, -40, 407.9999, 408]  # just under 448^2 (scaled): P5 only with eps
    rois[0, 3] = [100, 150, 170, 240]  # partly outside the map
    rois[0, 4] = [0, 0, 0.5, 0.5]
    got = roi_align(
        {k: tf.constant(v) for k, v in feats.items()},
        tf.constant(rois),
        output_size=7,
        sampling_ratio=2,
        aligned=False,
        level_epsilon=1e-6,
        align_impl=impl,
    ).numpy()
    hw = rois[0, :, 2:] - rois[0, :, :2]
    s = np.sqrt(hw[:, 0] * hw[:, 1])
    with np.errstate(divide="ignore"):
        levels = np.clip(np.floor(4 + np.log2(s / np.float32(224)) + np.float32(1e-6)), 2, 5)
    assert levels[2] == 5 and sorted(set(levels.astype(int))) == [2, 3, 4, 5]
    for k in range(r):
        level = int(levels[k])
        y0, x0, y1, x1 = rois[0, k].astype(np.float64)
        ref = _torchvision_roi_align(
            feats[f"P{level}"][0].astype(np.float64), (x0, y0, x1, y1), 2.0**-level, 7, 2, False
        )
        np.testing.assert_allclose(got[0, k], ref, rtol=1e-4, atol=1e-4, err_msg=str(k))
    # The half-pixel shift and the 1-cell minimum matter: aligned=True differs.
    shifted = roi_align(
        {k: tf.constant(v) for k, v in feats.items()},
        tf.constant(rois[:, :2]),
        aligned=True,
        level_epsilon=1e-6,
        align_impl=impl,
    ).numpy()
    assert np.abs(shifted - got[:, :2]).max() > 0.1


# ------------------------------------------------------------------ NumPy reference


def _bilinear(f, y, x):
    h, w = f.shape[:2]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(f.shape[-1])
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_lo, x_lo = int(y), int(x)
    if y_lo >= h - 1:
        y_hi = y_lo = h - 1
        y = float(y_lo)
    else:
        y_hi = y_lo + 1
    if x_lo >= w - 1:
        x_hi = x_lo = w - 1
        x = float(x_lo)
    else:
        x_hi = x_lo + 1
    ly, lx = y - y_lo, x - x_lo
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * f[y_lo, x_lo]
        + hy * lx * f[y_lo, x_hi]
        + ly * hx * f[y_hi, x_lo]
        + ly * lx * f[y_hi, x_hi]
    )


def _np_roi_align(f, roi, stride, out, sr, aligned, cap=None):
    """detectron2's ROIAlign on one RoI; ``sr=0``: ceil(size / out) samples per bin and axis
    (at most ``cap``, the bound of the static-shape version)."""
    off = 0.5 if aligned else 0.0
    y0, x0, y1, x1 = [c / stride - off for c in roi]
    rh, rw = y1 - y0, x1 - x0
    if not aligned:
        rh, rw = max(rh, 1.0), max(rw, 1.0)
    bh, bw = rh / out, rw / out
    sy = sr if sr > 0 else min(max(math.ceil(rh / out), 0), cap)
    sx = sr if sr > 0 else min(max(math.ceil(rw / out), 0), cap)
    res = np.zeros((out, out, f.shape[-1]))
    for i in range(out):
        for j in range(out):
            acc = 0.0
            for a in range(sy):
                for b in range(sx):
                    y = y0 + i * bh + (a + 0.5) * bh / sy
                    x = x0 + j * bw + (b + 0.5) * bw / sx
                    acc = acc + _bilinear(f, y, x)
            res[i, j] = acc / max(sy * sx, 1)
    return res


def _np_multilevel(features, rois, out, sr, aligned, cap=None):
    bsz, r = rois.shape[:2]
    c = next(iter(features.values())).shape[-1]
    res = np.zeros((bsz, r, out, out, c))
    for b in range(bsz):
        for k in range(r):
            y0, x0, y1, x1 = rois[b, k].astype(np.float64)
            area = max(y1 - y0, 0) * max(x1 - x0, 0)
            lvl = 2 if area <= 0 else int(np.clip(np.floor(4 + np.log2(np.sqrt(area) / 224)), 2, 5))
            res[b, k] = _np_roi_align(
                features[f"P{lvl}"][b].astype(np.float64),
                rois[b, k],
                2.0**lvl,
                out,
                sr,
                aligned,
                cap,
            )
    return res


# ------------------------------------------------------------------ tests


def test_roi_align_linear_ramp_two_levels():
    # f_l(y, x, c) = a_c * y + b_c * x + d_l (y, x in the level's pixel index units):
    # bilinear sampling is exact for it and the average of a bin's symmetric samples
    # is the value at the bin centre, so the expected output is closed-form.
    img_h, img_w = 256, 320
    a = np.array([1.0, -2.0, 0.5], np.float32)
    b = np.array([3.0, 1.0, -1.0], np.float32)
    feats = {}
    for l in range(2, 6):
        h, w = img_h // 2**l, img_w // 2**l
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        feats[f"P{l}"] = (yy[..., None] * a + xx[..., None] * b + 100.0 * l)[None].astype(
            np.float32
        )
    rois = np.array(
        [
            [
                [40.0, 60.0, 152.0, 172.0],  # 112 x 112 -> P3 (stride 8)
                [16.0, 48.0, 240.0, 272.0],
            ]
        ],  # 224 x 224 -> P4 (stride 16)
        np.float32,
    )
    out = roi_align(
        {k: tf.constant(v) for k, v in feats.items()},
        tf.constant(rois),
        output_size=7,
        sampling_ratio=2,
    )
    assert out.shape == (1, 2, 7, 7, 3)
    for k, (lvl, stride) in enumerate([(3, 8.0), (4, 16.0)]):
        y0, x0, y1, x1 = rois[0, k] / stride - 0.5
        centres_y = y0 + (np.arange(7) + 0.5) * (y1 - y0) / 7
        centres_x = x0 + (np.arange(7) + 0.5) * (x1 - x0) / 7
        expected = centres_y[:, None, None] * a + centres_x[None, :, None] * b + 100.0 * lvl
        np.testing.assert_allclose(out.numpy()[0, k], expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_matches_numpy_reference(aligned):
    rng = np.random.default_rng(0)
    img_h, img_w, c, bsz = 200, 264, 3, 2
    feats = {
        f"P{l}": rng.normal(size=(bsz, math.ceil(img_h / 2**l), math.ceil(img_w / 2**l), c)).astype(
            np.float32
        )
        for l in range(2, 7)
    }
    # Sizes spanning all levels, some partly or wholly outside the image, degenerate ones.
    r = 24
    side = np.exp(rng.uniform(np.log(4), np.log(700), (bsz, r, 2)))
    yx = rng.uniform(-80, 260, (bsz, r, 2))
    rois = np.concatenate([yx, yx + side], -1).astype(np.float32)
    rois[0, 0] = [10, 10, 10, 10]  # zero size
    rois[1, 0] = [-300, -300, -290, -280]  # far outside: all zeros
    got = roi_align(
        {k: tf.constant(v) for k, v in feats.items()},
        tf.constant(rois),
        output_size=5,
        sampling_ratio=2,
        aligned=aligned,
    ).numpy()
    ref = _np_multilevel(feats, rois, 5, 2, aligned)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    if aligned:
        np.testing.assert_array_equal(got[1, 0], 0.0)
    # Other sampling ratio / output size on one image.
    got3 = roi_align(
        {k: tf.constant(v[:1]) for k, v in feats.items()},
        tf.constant(rois[:1, :6]),
        output_size=3,
        sampling_ratio=3,
        aligned=aligned,
    ).numpy()
    np.testing.assert_allclose(
        got3,
        _np_multilevel({k: v[:1] for k, v in feats.items()}, rois[:1, :6], 3, 3, aligned),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("impl", ["gather", "crop_and_resize"])
def test_adaptive_sampling_matches_numpy_reference(impl):
    """sampling_ratio=0: ceil(size / output_size) samples per bin along each axis, per RoI (1 to
    6 here), capped at max_sampling_ratio; crop_and_resize falls back to the gather."""
    rng = np.random.default_rng(2)
    img_h, img_w, c = 192, 256, 3
    feats = {
        f"P{l}": rng.normal(size=(1, math.ceil(img_h / 2**l), math.ceil(img_w / 2**l), c)).astype(
            np.float32
        )
        for l in range(2, 6)
    }
    side = np.exp(rng.uniform(np.log(4), np.log(400), (1, 20, 2)))
    yx = rng.uniform(-40, 180, (1, 20, 2))
    rois = np.concatenate([yx, yx + side], -1).astype(np.float32)
    rois[0, 0] = [20, 20, 20, 20]  # zero size: no sample, zeros
    rois[0, 1] = [0, 0, 24, 250]  # long and thin, P2: counts 2 and 21 (capped)
    rois[0, 2] = [-100, -100, 400, 500]  # clamped to P5: counts 6 and 7 (capped at 4)
    rois[0, 3] = [10, 10, 34, 34]  # 6 cells of P2 / 3 bins: 2 samples per axis
    tensors = {k: tf.constant(v) for k, v in feats.items()}
    for cap in (4, 16):
        got = roi_align(
            tensors,
            tf.constant(rois),
            output_size=3,
            sampling_ratio=0,
            align_impl=impl,
            max_sampling_ratio=cap,
        ).numpy()
        ref = _np_multilevel(feats, rois, 3, 0, True, cap)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[0, 0], 0.0)
    # The counts differ per RoI: a fixed ratio gives other values for some RoIs.
    fixed = _np_multilevel(feats, rois, 3, 2, True)
    assert np.abs(fixed - ref).max() > 1e-2
    np.testing.assert_allclose(fixed[0, 3], ref[0, 3], atol=1e-9)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(tensors, tf.constant(rois), sampling_ratio=-1)


def test_roi_align_gradient_and_dtype():
    rng = np.random.default_rng(1)
    feats = {
        f"P{l}": tf.Variable(rng.normal(size=(1, 64 // 2**l, 64 // 2**l, 2)), dtype=tf.float32)
        for l in range(2, 6)
    }
    rois = tf.constant([[[4, 4, 40, 40], [0, 0, 60, 60]]], tf.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(roi_align(feats, rois, output_size=2))
    grads = tape.gradient(loss, list(feats.values()))
    assert grads[0] is not None and float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(grads[0])))) > 0
    # The bilinear weights of a sample inside the map sum to 1, so the gradient of the
    # sum of all outputs sums to R * out * out * C.
    total = sum(float(tf.reduce_sum(tf.convert_to_tensor(g))) for g in grads if g is not None)
    assert total == pytest.approx(2 * 2 * 2 * 2, rel=1e-5)
    half = roi_align({k: tf.cast(v, tf.bfloat16) for k, v in feats.items()}, rois, output_size=2)
    assert half.dtype == tf.bfloat16


def test_roi_align_xla():
    rng = np.random.default_rng(2)
    feats = {
        f"P{l}": tf.constant(rng.normal(size=(2, 128 // 2**l, 96 // 2**l, 4)), tf.float32)
        for l in range(2, 7)
    }
    yx = rng.uniform(0, 90, (2, 10, 2))
    rois = tf.constant(np.concatenate([yx, yx + rng.uniform(4, 120, (2, 10, 2))], -1), tf.float32)
    f = tf.function(roi_align, jit_compile=True)
    np.testing.assert_allclose(
        f(feats, rois).numpy(),
        roi_align(feats, rois).numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_roi_align_crop_and_resize_equals_gather_in_values_and_gradients():
    """align_impl="crop_and_resize" (the default outside XLA) against "gather": same samples
    and border rule (RoIs partly outside the map, empty padding RoIs), values equal up to float
    rounding, and the gradient is exactly the gather's."""
    rng = np.random.default_rng(1)
    feats = {
        f"P{l}": tf.constant(rng.normal(size=(2, 128 // 2**l, 160 // 2**l, 4)).astype(np.float32))
        for l in range(2, 6)
    }
    size = np.exp(rng.uniform(np.log(4), np.log(150), (2, 20, 2)))
    cy, cx = rng.uniform(-10, 138, (2, 20)), rng.uniform(-10, 170, (2, 20))
    rois = np.stack(
        [
            np.clip(cy - size[..., 0] / 2, 0, 128),
            np.clip(cx - size[..., 1] / 2, 0, 160),
            np.clip(cy + size[..., 0] / 2, 0, 128),
            np.clip(cx + size[..., 1] / 2, 0, 160),
        ],
        -1,
    ).astype(np.float32)
    rois[:, -2:] = 0.0
    upstream = tf.constant(rng.normal(size=(2, 20, 7, 7, 4)).astype(np.float32))

    def run(impl):
        with tf.GradientTape() as tape:
            tape.watch(feats)
            out = roi_align(feats, rois, align_impl=impl)
            loss = tf.reduce_sum(out * upstream)
        return out.numpy(), tape.gradient(loss, feats)

    ref, ref_grad = run("gather")
    out, grad = run("crop_and_resize")
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(out, ref, atol=1e-4)
    np.testing.assert_array_equal(run("auto")[0], out)
    # "auto" in training is the gather (static shapes; crop_and_resize's backward is its anyway).
    trained = roi_align(feats, rois, align_impl="auto", training=True).numpy()
    np.testing.assert_array_equal(trained, ref)
    for level in feats:
        np.testing.assert_array_equal(grad[level].numpy(), ref_grad[level].numpy(), err_msg=level)
    with pytest.raises(ValueError, match="unknown RoIAlign align_impl"):
        roi_align(feats, rois, align_impl="crop")


@pytest.mark.parametrize("impl", ["gather", "crop_and_resize"])
def test_roi_align_has_no_gradient_with_respect_to_the_boxes(impl):
    feats = {f"P{l}": tf.ones((1, 64 // 2**l, 64 // 2**l, 2)) * float(l) for l in range(2, 6)}
    rois = tf.constant([[[3.0, 5.0, 40.0, 50.0]]])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(rois)
        tape.watch(feats)
        loss = tf.reduce_sum(roi_align(feats, rois, align_impl=impl))
    assert tape.gradient(loss, rois) is None
    assert float(tf.reduce_sum(tape.gradient(loss, feats["P2"]))) > 0


def test_default_sampling_cap_is_reached_by_elongated_rois_inside_the_level_range():
    """The module docstring's reach of the adaptive-sampling cap (4): with output 7, RoIs that
    Eq. 1 puts inside a level's range span 14 to 28 cells there, so a square one needs at most 4
    samples per axis and equals detectron2's uncapped sampling, while a 1:2 one of sqrt(area)
    above 20 cells already needs 5 and does not (measured on final detections against
    detectron2 itself: README, "Start from COCO")."""
    rng = np.random.default_rng(3)
    feats = {
        f"P{l}": rng.normal(size=(1, 512 // 2**l, 512 // 2**l, 4)).astype(np.float32)
        for l in range(2, 6)
    }
    square = [40.0, 40.0, 256.0, 256.0]  # 216 px = 27 cells of P3: 4 samples per axis
    wide = [40.0, 40.0, 176.0, 312.0]  # 136 x 272 px: sqrt(area) 24 cells of P3, 34 wide: 5
    rois = np.array([[square, wide]], np.float32)
    assert eq1_levels(tf.constant(rois)).numpy().tolist() == [[3, 3]]  # not clamped
    ours = roi_align(
        {k: tf.constant(v) for k, v in feats.items()},
        tf.constant(rois),
        output_size=7,
        sampling_ratio=0,
    ).numpy()
    uncapped = _np_multilevel(feats, rois, 7, 0, True, cap=10**6)
    np.testing.assert_allclose(ours[0, 0], uncapped[0, 0], rtol=1e-4, atol=1e-4)
    assert np.abs(ours[0, 1] - uncapped[0, 1]).max() > 1e-2
    np.testing.assert_allclose(
        ours[0, 1], _np_multilevel(feats, rois, 7, 0, True, cap=4)[0, 1], rtol=1e-4, atol=1e-4
    )
