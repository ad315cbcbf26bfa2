"""Smoke tests of bench/: the helpers, the Model Garden settings, and that the candidate ops in
bench/variants.py give what fpn_tf's current ops give (small inputs, seconds)."""

import numpy as np
import pytest
import tensorflow as tf

from bench import common, variants
from fpn_tf.modeling import fpn
from fpn_tf.ops import anchors as anchor_ops
from fpn_tf.ops import roi_ops, target_assigner


def test_padding_and_synthetic_batch():
    assert common.padded([800, 1333], 32) == [800, 1344]
    assert common.padded([800, 1333], 64) == [832, 1344]
    images, info, boxes, classes = common.synthetic_batch(2, (100, 130), (128, 160), 3, 8)
    assert images.shape == (2, 128, 160, 3) and info.shape == (2, 4, 2)
    assert (classes[:, :3] > 0).all() and (classes[:, 3:] == -1).all()
    assert (boxes[:, :3, 2] <= 100).all() and (boxes[:, :3, 3] <= 130).all()


def test_model_garden_config_matches_ours():
    pytest.importorskip("official.vision.configs.maskrcnn")
    from bench.compare_model_garden import model_garden_config
    m = model_garden_config([800, 1333], [832, 1344]).task.model
    assert m.input_size == [832, 1344, 3] and m.num_classes == 91 and not m.include_mask
    assert (m.roi_generator.num_proposals, m.roi_generator.test_num_proposals) == (2000, 1000)
    assert m.roi_sampler.num_sampled_rois == 512 and m.roi_aligner.crop_size == 7
    assert (m.detection_head.num_convs, m.detection_head.num_fcs,
            m.detection_head.fc_dims) == (0, 2, 1024)


def test_upsample_broadcast_is_identical():
    x = tf.random.normal([2, 5, 7, 3])
    for like in (tf.zeros([2, 10, 14, 3]), tf.zeros([2, 9, 13, 3])):
        np.testing.assert_array_equal(variants.upsample_nearest_to_broadcast(x, like),
                                      fpn.upsample_nearest_to(x, like))


def test_compact_rpn_targets_are_identical():
    rng = np.random.default_rng(0)
    boxes = np.zeros((2, 12, 4), np.float32)
    classes = -np.ones((2, 12), np.int32)
    for b, rows in enumerate([(0, 1, 5), (2,)]):  # real rows not contiguous
        for r in rows:
            y, x = rng.uniform(0, 80, 2)
            boxes[b, r] = (y, x, y + rng.uniform(10, 40), x + rng.uniform(10, 40))
            classes[b, r] = 1
    levels = ("P3", "P4")
    anchors, _ = anchor_ops.concat_anchors(anchor_ops.generate_anchors(
        (128, 128), levels, {"P3": (32,), "P4": (64,)}, (0.5, 1.0, 2.0)))
    seed = tf.constant([3, 4])
    a = target_assigner.assign_rpn_targets(anchors, boxes, classes, None, seed=seed)
    n = variants.assign_rpn_targets_compact(anchors, boxes, classes, None, seed=seed)
    for f in a._fields:
        np.testing.assert_array_equal(getattr(a, f), getattr(n, f), err_msg=f)


def test_fast_roi_align_matches_values_and_gradients():
    rng = np.random.default_rng(1)
    feats = {f"P{l}": tf.constant(rng.normal(size=(2, 128 // 2 ** l, 160 // 2 ** l, 4))
                                  .astype(np.float32)) for l in range(2, 6)}
    size = np.exp(rng.uniform(np.log(4), np.log(150), (2, 20, 2)))
    cy, cx = rng.uniform(-10, 138, (2, 20)), rng.uniform(-10, 170, (2, 20))
    rois = np.stack([np.clip(cy - size[..., 0] / 2, 0, 128), np.clip(cx - size[..., 1] / 2, 0, 160),
                     np.clip(cy + size[..., 0] / 2, 0, 128), np.clip(cx + size[..., 1] / 2, 0, 160)],
                    -1).astype(np.float32)
    rois[:, -2:] = 0.0
    up = tf.constant(rng.normal(size=(2, 20, 7, 7, 4)).astype(np.float32))

    def run(fn):
        with tf.GradientTape() as tape:
            tape.watch(feats)
            out = fn(feats, rois)
            s = tf.reduce_sum(out * up)
        return out, tape.gradient(s, feats)

    ref, ref_grad = run(roi_ops.multilevel_roi_align)
    for fn in (variants.multilevel_roi_align_fast,
               variants.multilevel_roi_align_crop_and_resize):
        out, grad = run(fn)
        np.testing.assert_allclose(out, ref, atol=1e-4)
    out, grad = run(variants.multilevel_roi_align_fast)
    for k in feats:
        np.testing.assert_array_equal(grad[k], ref_grad[k])
