"""Box-relative masks: hand cases of crop, Mask R-CNN targets and paste, and their round trips."""

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.ops import mask_ops


def _square_image_mask(height, width, box):
    mask = np.zeros((height, width), np.uint8)
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = 1
    return mask


def _disc(height, width, cy, cx, r):
    yy, xx = np.mgrid[0:height, 0:width]
    return (((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2) <= r * r).astype(np.uint8)


def _iou(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return (a & b).sum() / max((a | b).sum(), 1)


def test_square_roi_over_known_mask_gives_expected_target():
    # A 100x100 square object; the RoI is twice as large and centred on it, so the object covers
    # the RoI's central bins: bin i's centre 50 + (i + 0.5) * 200 / 28 is inside [100, 200] for
    # i = 7..20.
    full = _square_image_mask(480, 640, (100, 100, 200, 200))
    gt_box = np.array([[100, 100, 200, 200]], np.float32)
    gt_masks = mask_ops.crop_masks(full[None], gt_box, 112).numpy()
    # Bilinear: the outermost samples (0.45 px inside the box) read 95 % of the edge pixel.
    np.testing.assert_array_equal(gt_masks[0, 1:-1, 1:-1], 1.0)
    assert gt_masks.min() > 0.85  # a corner: 0.946 ** 2
    rois = np.array([[[50, 50, 250, 250], [100, 100, 200, 200], [0, 0, 40, 40]]], np.float32)
    matched = np.array([[0, 0, -1]], np.int32)
    targets = mask_ops.mask_targets(gt_masks[None], gt_box[None], rois, matched, 28).numpy()
    expected = np.zeros((28, 28), np.float32)
    expected[7:21, 7:21] = 1.0
    np.testing.assert_array_equal(targets[0, 0], expected)
    np.testing.assert_array_equal(targets[0, 1], np.ones((28, 28)))  # the RoI is the object box
    np.testing.assert_array_equal(targets[0, 2], np.zeros((28, 28)))  # unmatched: zeros


def test_roi_covering_half_of_the_object_gets_half_a_target():
    full = _square_image_mask(48, 64, (10, 20, 30, 44))
    box = np.array([[10, 20, 30, 44]], np.float32)
    crop = mask_ops.crop_masks(full[None], box, 8)
    # RoI x from 8 to 32: the object (x 20..44) fills its right half.
    roi = np.array([[[10, 8, 30, 32]]], np.float32)
    target = mask_ops.mask_targets(crop[None], box[None], roi, np.array([[0]]), 28).numpy()[0, 0]
    np.testing.assert_array_equal(target[:, :14], 0.0)
    np.testing.assert_array_equal(target[:, 14:], 1.0)


def test_paste_into_480x640_gives_expected_pixels():
    # Box 56 x 56 px: each of the 28 mask cells is 2 x 2 px.
    box = np.array([[100, 200, 156, 256]], np.float32)
    ones = np.ones((1, 28, 28), np.float32)
    pasted = mask_ops.paste_masks(ones, box, (480, 640)).numpy()[0]
    assert pasted.shape == (480, 640)
    np.testing.assert_array_equal(pasted >= 0.5, _square_image_mask(480, 640, (100, 200, 156, 256)))
    # The edge pixels' centres lie a quarter cell outside the outermost samples: linear fall-off
    # to 0 over the half cell beyond them (0.75, then 0.25 one pixel further out).
    np.testing.assert_allclose(pasted[100, 230], 0.75, atol=1e-5)
    np.testing.assert_allclose(pasted[99, 230], 0.25, atol=1e-5)
    np.testing.assert_allclose(pasted[128, 255], 0.75, atol=1e-5)
    np.testing.assert_allclose(pasted[100, 200], 0.75 * 0.75, atol=1e-5)
    assert pasted[:99].max() == 0.0 and pasted[157:].max() == 0.0
    # The left half of the mask: columns 0..13 -> 14 cells x 2 px = x 200..227.
    half = np.zeros((1, 28, 28), np.float32)
    half[:, :, :14] = 1.0
    pasted = mask_ops.paste_masks(half, box, (480, 640)).numpy()[0] >= 0.5
    np.testing.assert_array_equal(pasted, _square_image_mask(480, 640, (100, 200, 156, 228)))


def test_crop_then_paste_round_trip():
    full = _disc(480, 640, cy=203.0, cx=311.0, r=61.0)
    ys, xs = np.nonzero(full)
    box = np.array([[ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]], np.float32)
    for size in (28, 112):
        crop = mask_ops.crop_masks(full[None], box, size)
        back = mask_ops.paste_masks(crop, box, (480, 640)).numpy()[0] >= 0.5
        assert _iou(back, full) > (0.96 if size == 28 else 0.99), size


def test_paste_then_crop_round_trip():
    rng = np.random.default_rng(0)
    mask = np.zeros((28, 28), np.float32)
    mask[4:22, 6:25] = 1.0
    mask[10:14, 10:30] = 0.0
    for _ in range(3):
        y0, x0 = rng.uniform(0, 200, 2)
        h, w = rng.uniform(40, 200, 2)
        box = np.array([[y0, x0, y0 + h, x0 + w]], np.float32)
        pasted = mask_ops.paste_masks(mask[None], box, (480, 640))
        back = mask_ops.crop_masks(pasted, box, 28).numpy()[0] >= 0.5
        assert _iou(back, mask) > 0.95


def test_flip_of_image_is_flip_of_crop():
    full = _disc(64, 96, cy=30.0, cx=21.0, r=14.0)
    full[20:30, 5:15] = 1
    ys, xs = np.nonzero(full)
    box = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float32)
    flipped_box = np.array([box[0], 96 - box[3], box[2], 96 - box[1]], np.float32)
    crop = mask_ops.crop_masks(full[None], box[None], 32).numpy()[0]
    crop_of_flipped = mask_ops.crop_masks(full[None, :, ::-1], flipped_box[None], 32).numpy()[0]
    np.testing.assert_allclose(crop_of_flipped, crop[:, ::-1], atol=1e-5)


def test_inside_tf_function_with_unknown_shapes():
    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None, None], tf.float32),
            tf.TensorSpec([None, None, 4], tf.float32),
            tf.TensorSpec([None, None, 4], tf.float32),
            tf.TensorSpec([None, None], tf.int32),
        ]
    )
    def targets(gt_masks, gt_boxes, rois, matched):
        return mask_ops.mask_targets(gt_masks, gt_boxes, rois, matched, 28)

    gt = np.ones((2, 3, 16, 16), np.float32)
    boxes = np.tile(np.array([[[0, 0, 10, 10]]], np.float32), (2, 3, 1))
    out = targets(gt, boxes, boxes[:, :2], np.array([[0, -1], [2, 1]], np.int32)).numpy()
    assert out.shape == (2, 2, 28, 28)
    np.testing.assert_array_equal(out.reshape(4, -1).mean(axis=1), [1.0, 0.0, 1.0, 1.0])


@pytest.mark.parametrize("bad_dtype", [np.uint8, np.bool_])
def test_crop_accepts_integer_and_bool_masks(bad_dtype):
    full = _square_image_mask(20, 20, (5, 5, 15, 15)).astype(bad_dtype)
    crop = mask_ops.crop_masks(full[None], np.array([[5, 5, 15, 15]], np.float32), 4).numpy()
    np.testing.assert_array_equal(crop, np.ones((1, 4, 4)))
