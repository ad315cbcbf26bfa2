"""Tests of fpn_tf.ops.box_ops."""

import math

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.ops import box_ops


def test_area():
    boxes = tf.constant([[0, 0, 10, 20], [5, 5, 5, 9], [3, 3, 1, 1], [0, 0, 0, 0]], tf.float32)
    np.testing.assert_allclose(box_ops.area(boxes).numpy(), [200, 0, 0, 0])


def test_pairwise_iou_hand_cases():
    a = tf.constant([[[0, 0, 10, 10], [0, 0, 0, 0]]], tf.float32)  # [1, 2, 4]; second is padding
    b = tf.constant(
        [
            [
                [0, 0, 10, 10],  # identical
                [0, 5, 10, 15],  # half overlap: 50 / 150
                [20, 20, 30, 30],  # disjoint
                [2, 2, 4, 4],  # contained: 4 / 100
                [10, 10, 20, 20],  # touching corner
                [0, 0, 0, 0],
            ]
        ],
        tf.float32,
    )  # padding
    iou = box_ops.pairwise_iou(a, b).numpy()
    assert iou.shape == (1, 2, 6)
    np.testing.assert_allclose(iou[0, 0], [1.0, 1 / 3, 0.0, 0.04, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(iou[0, 1], np.zeros(6))  # padding: IoU 0, no NaN
    assert np.all(np.isfinite(iou))


def test_pairwise_iou_batched_and_broadcast():
    rng = np.random.default_rng(1)
    yx = rng.uniform(0, 50, (2, 3, 2))
    b1 = np.concatenate([yx, yx + rng.uniform(1, 30, (2, 3, 2))], -1).astype(np.float32)
    yx = rng.uniform(0, 50, (2, 5, 2))
    b2 = np.concatenate([yx, yx + rng.uniform(1, 30, (2, 5, 2))], -1).astype(np.float32)
    iou = box_ops.pairwise_iou(b1, b2).numpy()
    assert iou.shape == (2, 3, 5)
    for b in range(2):
        for i in range(3):
            for j in range(5):
                y1, x1 = np.maximum(b1[b, i, :2], b2[b, j, :2])
                y2, x2 = np.minimum(b1[b, i, 2:], b2[b, j, 2:])
                inter = max(y2 - y1, 0) * max(x2 - x1, 0)
                a1 = np.prod(b1[b, i, 2:] - b1[b, i, :2])
                a2 = np.prod(b2[b, j, 2:] - b2[b, j, :2])
                assert iou[b, i, j] == pytest.approx(inter / (a1 + a2 - inter), rel=1e-5, abs=1e-7)
    # Shared anchors [A, 4] against a batch of gt [B, M, 4] -> [B, A, M].
    shared = box_ops.pairwise_iou(b1[0], b2).numpy()
    assert shared.shape == (2, 3, 5)
    np.testing.assert_allclose(shared[0], iou[0], rtol=1e-6)


def test_pairwise_ioa():
    a = tf.constant([[0, 0, 10, 10]], tf.float32)
    b = tf.constant([[0, 0, 100, 100], [0, 5, 10, 15]], tf.float32)
    np.testing.assert_allclose(box_ops.pairwise_ioa(a, b).numpy(), [[1.0, 0.5]])


def test_clip_boxes_per_image_and_scalar():
    boxes = tf.constant([[[-5, -5, 50, 60]], [[-5, -5, 50, 60]]], tf.float32)
    out = box_ops.clip_boxes(boxes, tf.constant([[40, 30], [100, 100]], tf.float32)).numpy()
    np.testing.assert_allclose(out[0, 0], [0, 0, 40, 30])
    np.testing.assert_allclose(out[1, 0], [0, 0, 50, 60])
    np.testing.assert_allclose(box_ops.clip_boxes(boxes, 45.0).numpy()[1, 0], [0, 0, 45, 45])
    # Class-specific boxes [B, R, C, 4] with per-image sizes.
    boxes4 = tf.tile(boxes[:, :, None, :], [1, 1, 3, 1])
    out4 = box_ops.clip_boxes(boxes4, tf.constant([[40, 30], [100, 100]])).numpy()
    np.testing.assert_allclose(out4[0, 0, 2], [0, 0, 40, 30])


def test_encode_known_values():
    anchor = tf.constant([[0, 0, 10, 10]], tf.float32)
    box = tf.constant([[0, 0, 20, 20]], tf.float32)
    d = box_ops.encode_boxes(box, anchor, (1, 1, 1, 1)).numpy()[0]
    np.testing.assert_allclose(d, [0.5, 0.5, math.log(2), math.log(2)], rtol=1e-6)
    d10 = box_ops.encode_boxes(box, anchor, (10, 10, 5, 5)).numpy()[0]
    np.testing.assert_allclose(d10, [5.0, 5.0, 5 * math.log(2), 5 * math.log(2)], rtol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_round_trip(weights):
    rng = np.random.default_rng(0)
    yx = rng.uniform(-50, 500, (2, 40, 2))
    anchors = np.concatenate([yx, yx + rng.uniform(4, 300, (2, 40, 2))], -1).astype(np.float32)
    yx = rng.uniform(-50, 500, (2, 40, 2))
    boxes = np.concatenate([yx, yx + rng.uniform(1, 300, (2, 40, 2))], -1).astype(np.float32)
    deltas = box_ops.encode_boxes(boxes, anchors, weights)
    decoded = box_ops.decode_boxes(deltas, anchors, weights).numpy()
    np.testing.assert_allclose(decoded, boxes, atol=2e-3)


def test_decode_clamps_scale():
    anchor = tf.constant([[0, 0, 16, 16]], tf.float32)
    out = box_ops.decode_boxes(tf.constant([[0, 0, 100.0, 100.0]]), anchor, (1, 1, 1, 1)).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 1000.0, rtol=1e-4)
    np.testing.assert_allclose(out[0, 3] - out[0, 1], 1000.0, rtol=1e-4)
    # Class-specific deltas [B, R, C, 4] broadcast against RoIs [B, R, 1, 4].
    deltas = tf.zeros([2, 3, 5, 4])
    rois = tf.constant(np.tile([[[[1, 2, 30, 40]]]], [2, 3, 1, 1]), tf.float32)
    out = box_ops.decode_boxes(deltas, rois, (10, 10, 5, 5)).numpy()
    assert out.shape == (2, 3, 5, 4)
    np.testing.assert_allclose(out[1, 2, 4], [1, 2, 30, 40], atol=1e-5)


def test_centers():
    boxes = tf.constant([[[10, 20, 30, 60]]], tf.float32)
    c = box_ops.boxes_to_centers(boxes).numpy()
    np.testing.assert_allclose(c[0, 0], [20, 40, 20, 40])
    np.testing.assert_allclose(box_ops.centers_to_boxes(c).numpy(), boxes.numpy())


def test_valid_box_mask():
    boxes = tf.constant([[0, 0, 10, 10], [0, 0, 0, 10], [0, 0, 2, 2]], tf.float32)
    np.testing.assert_array_equal(box_ops.valid_box_mask(boxes).numpy(), [True, False, True])
    np.testing.assert_array_equal(box_ops.valid_box_mask(boxes, 3.0).numpy(), [True, False, False])


def test_box_ops_xla():
    @tf.function(jit_compile=True)
    def f(a, b, size):
        iou = box_ops.pairwise_iou(a, b)
        d = box_ops.encode_boxes(b, a, (10, 10, 5, 5))
        return iou, box_ops.clip_boxes(box_ops.decode_boxes(d, a, (10, 10, 5, 5)), size)

    a = tf.constant([[[0, 0, 10, 10], [5, 5, 20, 20]]], tf.float32)
    b = tf.constant([[[0, 0, 10, 12], [4, 4, 21, 19]]], tf.float32)
    iou, dec = f(a, b, tf.constant([[15.0, 15.0]]))
    np.testing.assert_allclose(iou.numpy(), box_ops.pairwise_iou(a, b).numpy(), rtol=1e-6)
    np.testing.assert_allclose(dec.numpy()[0, 1], [4, 4, 15, 15], atol=1e-4)
