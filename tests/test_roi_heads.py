"""fpn_tf.modeling.roi_heads: the box head, and the RoIHeads layer on its own (RoI sampling,
Eq. 1 + RoIAlign, losses equal to the functional path, detections, serialisation)."""

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.configs.experiment import DetectionConfig, RoIConfig
from fpn_tf.modeling.losses import fast_rcnn_losses
from fpn_tf.modeling.roi_heads import FastRCNNBoxHead, RoIHeads
from fpn_tf.ops import roi_ops, target_assigner
from fpn_tf.ops.postprocess import Proposals


def test_box_head_shapes():
    head = FastRCNNBoxHead(num_classes=3, fc_dims=32, num_fc=2)
    logits, deltas = head(tf.zeros((2, 7, 7, 7, 8)))
    assert logits.shape == (2, 7, 4) and deltas.shape == (2, 7, 3, 4)


def _heads(num_classes=3, **overrides):
    settings = {
        **RoIConfig().to_dict(),
        **DetectionConfig().to_dict(),
        "fc_dims": 32,
        "batch_size_per_image": 16,
        **overrides,
    }
    return RoIHeads(num_classes=num_classes, **settings)


def _features(rng, levels=(2, 3, 4, 5, 6), channels=4, image=256):
    return {
        f"P{l}": tf.constant(
            rng.normal(size=(1, image // 2**l, image // 2**l, channels)), tf.float32
        )
        for l in levels
    }


def _proposals(boxes):
    boxes = tf.constant([boxes], tf.float32)
    rows = tf.shape(boxes)[:2]
    return Proposals(boxes, tf.fill(rows, 0.9), tf.ones(rows, tf.bool))


LABELS = {
    "gt_boxes": tf.constant([[[20.0, 30.0, 120.0, 150.0], [150, 140, 250, 250]]]),
    "gt_classes": tf.constant([[2, 3]], tf.int32),
    "gt_is_crowd": tf.zeros((1, 2), tf.bool),
}
PROPOSALS = [
    [22.0, 28.0, 118.0, 155.0],
    [0, 0, 40, 40],
    [140, 150, 240, 255],
    [60, 60, 200, 200],
    [5, 100, 60, 250],
]
HW = tf.constant([[256.0, 256.0]])


def test_losses_equal_the_functional_path_times_the_weight():
    rng = np.random.default_rng(0)
    heads = _heads(loss_weight=0.5)
    features = _features(rng)
    tf.random.set_seed(1)
    detections, losses = heads(features, _proposals(PROPOSALS), HW, labels=LABELS, training=True)
    assert detections is None and heads.levels == ["P2", "P3", "P4", "P5"]
    tf.random.set_seed(1)
    targets = target_assigner.sample_rois(
        tf.constant([PROPOSALS]),
        LABELS["gt_boxes"],
        LABELS["gt_classes"],
        LABELS["gt_is_crowd"],
        tf.ones((1, 5), tf.bool),
        num_samples=16,
        foreground_fraction=0.25,
        foreground_iou=0.5,
        box_weights=(10.0, 10.0, 5.0, 5.0),
    )
    pooled = roi_ops.multilevel_roi_align(
        {f"P{l}": features[f"P{l}"] for l in range(2, 6)},
        targets.rois,
        output_size=7,
        sampling_ratio=2,
        training=True,
    )
    logits, deltas = heads.box_head(pooled)
    cls, box = fast_rcnn_losses(
        targets.class_targets, targets.box_targets, logits, deltas, 1.0, valid=targets.valid_mask
    )
    np.testing.assert_allclose(losses["fast_rcnn_class_loss"], 0.5 * cls, rtol=1e-6)
    np.testing.assert_allclose(losses["fast_rcnn_box_loss"], 0.5 * box, rtol=1e-6)
    assert float(box) > 0.0 and int(tf.reduce_sum(tf.cast(targets.foreground_mask, tf.int32))) > 0


def test_eq1_is_clamped_to_the_levels_the_features_hold():
    rng = np.random.default_rng(1)
    heads = _heads()
    features = _features(rng, levels=(4,))
    heads.build({k: v.shape for k, v in features.items()})
    assert heads.levels == ["P4"]
    rois = tf.constant([PROPOSALS])
    np.testing.assert_allclose(
        heads.pool(features, rois),
        roi_ops.multilevel_roi_align(features, rois, min_level=4, max_level=4, impl="gather"),
        atol=1e-4,
    )


def test_detections_are_the_proposals_of_the_planted_class():
    """Box head planted to say "class 2, no offset" for every RoI: the detections are the
    (non-overlapping) proposals with class 2."""
    rng = np.random.default_rng(2)
    heads = _heads(score_threshold=0.5)
    features = _features(rng)
    heads(features, _proposals(PROPOSALS[:3]), HW)
    head = heads.box_head
    for layer in head.fcs + [head.classifier, head.box_regressor]:
        layer.kernel.assign(tf.zeros_like(layer.kernel))
        layer.bias.assign(tf.zeros_like(layer.bias))
    head.classifier.bias.assign([0.0, 0.0, 8.0, 0.0])
    detections, losses = heads(features, _proposals(PROPOSALS[:3]), HW)
    assert losses == {} and int(detections.num_detections[0]) == 3
    assert detections.boxes.shape == (1, 100, 4)
    np.testing.assert_array_equal(detections.classes[0, :3], [2, 2, 2])
    got = sorted(map(tuple, np.round(detections.boxes[0, :3].numpy(), 3)))
    want = sorted(tuple(np.minimum(b, 256.0)) for b in PROPOSALS[:3])
    np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("align_impl", ["gather", "auto"])
def test_adaptive_sampling_runs_in_training_and_inference(align_impl):
    rng = np.random.default_rng(3)
    heads = _heads(sampling_ratio=0, align_impl=align_impl)
    features = _features(rng)
    _, losses = heads(features, _proposals(PROPOSALS), HW, labels=LABELS, training=True)
    assert all(np.isfinite(float(v)) for v in losses.values())
    detections, _ = heads(features, _proposals(PROPOSALS), HW)
    assert detections.boxes.shape == (1, 100, 4)


def test_get_config_round_trip_gives_the_same_detections():
    rng = np.random.default_rng(4)
    heads = _heads(nms_impl="padded", sampling_ratio=3, name="roi_heads")
    features = _features(rng)
    a, _ = heads(features, _proposals(PROPOSALS), HW)
    config = heads.get_config()
    assert config["nms_impl"] == "padded" and config["sampling_ratio"] == 3
    assert config["box_weights"] == [10.0, 10.0, 5.0, 5.0]
    clone = RoIHeads.from_config(config)
    assert clone.get_config() == config
    clone(features, _proposals(PROPOSALS), HW)
    clone.set_weights(heads.get_weights())
    b, _ = clone(features, _proposals(PROPOSALS), HW)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-5)
    assert [v.path for v in clone.weights] == [v.path for v in heads.weights]
