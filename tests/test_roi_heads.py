"""fpn_tf.modeling.roi_heads: the box head, and the RoIHeads layer on its own (RoI sampling,
Eq. 1 + RoIAlign, losses equal to the functional path, detections, serialisation)."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_roi_heads
from fpn_tf.configs.experiment import ModelConfig
from fpn_tf.modeling.factory import build_roi_heads
from fpn_tf.modeling.losses import fast_rcnn_losses
from fpn_tf.modeling.roi_heads import FastRCNNBoxHead, RoIHeads
from fpn_tf.ops import target_assigner
from fpn_tf.ops.postprocess import Proposals
from layer_test import run_layer_test
from roi_testing import roi_align


def test_box_head_shapes():
    head = FastRCNNBoxHead(num_classes=3, fc_dims=32, num_fc=2)
    logits, deltas = head(tf.zeros((2, 7, 7, 7, 8)))
    assert logits.shape == (2, 7, 4) and deltas.shape == (2, 7, 3, 4)


def _heads(num_classes=3, **overrides):
    return make_roi_heads(num_classes, **{"fc_dims": 32, "batch_size_per_image": 16, **overrides})


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
    sampled, losses = heads(features, _proposals(PROPOSALS), HW, labels=LABELS, training=True)
    assert heads.box_pooler.levels == ["P2", "P3", "P4", "P5"]
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
    pooled = roi_align(
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
    # Training returns the sampled RoIs and their targets (the mask branch's input): the same
    # sample as the functional path's under the same seed.
    assert isinstance(sampled, target_assigner.RoiTargets)
    assert heads.max_foreground_per_image == 4
    for got, want in zip(sampled, targets):
        np.testing.assert_array_equal(got, want)


def test_eq1_is_clamped_to_the_levels_the_features_hold():
    rng = np.random.default_rng(1)
    heads = _heads()
    features = _features(rng, levels=(4,))
    heads.build({k: v.shape for k, v in features.items()})
    assert heads.box_pooler.levels == ["P4"]
    rois = tf.constant([PROPOSALS])
    np.testing.assert_allclose(
        heads.box_pooler(features, rois),
        roi_align(features, rois, min_level=4, max_level=4, align_impl="gather"),
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
    detections, masks = heads(features, _proposals(PROPOSALS[:3]), HW)
    assert masks is None and int(detections.num_detections[0]) == 3
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
    # Same config, variable paths and detections from a clone given the weights; every
    # variable checkpointed.
    run_layer_test(
        RoIHeads,
        layer=heads,
        input_data=features,
        call=lambda layer, x: layer(x, _proposals(PROPOSALS), HW)[0],
    )
    config = heads.get_config()
    assert config["detection"]["nms_impl"] == "padded"
    assert config["roi_aligner"]["sampling_ratio"] == 3
    assert config["box_head"]["box_weights"] == [10.0, 10.0, 5.0, 5.0]


# ------------------------------------------------------------------ torchvision / detectron2 switches

ROWS = [0, 5, 9, 11]  # background, then the dataset ids of classes 1..3 (rows 1-4, 6-8, 10 unused)


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_dataset_ids_layout_probabilities_are_the_softmax_over_all_rows_gathered():
    rng = np.random.default_rng(5)
    heads = _heads(classifier_layout="dataset_ids", classifier_rows=ROWS, score_threshold=0.2)
    features = _features(rng)
    heads(features, _proposals(PROPOSALS[:3]), HW)
    head = heads.box_head
    assert head.classifier.units == 12 and head.box_regressor.units == 4 * 3
    logits = tf.constant(rng.normal(size=(1, 3, 12)) * 2, tf.float32)
    np.testing.assert_allclose(
        heads.class_probabilities(logits), _np_softmax(logits.numpy())[..., ROWS], rtol=1e-5
    )
    # Planted: every RoI says row 9 (class 2) and, as much, the unused row 3: class 2's score is
    # e^6 / (2 e^6 + 10), not renormalised over the dataset's rows.
    for layer in head.fcs + [head.classifier, head.box_regressor]:
        layer.kernel.assign(tf.zeros_like(layer.kernel))
        layer.bias.assign(tf.zeros_like(layer.bias))
    bias = np.zeros(12, np.float32)
    bias[[3, 9]] = 6.0
    head.classifier.bias.assign(bias)
    detections, _ = heads(features, _proposals(PROPOSALS[:3]), HW)
    assert int(detections.num_detections[0]) == 3
    np.testing.assert_array_equal(detections.classes[0, :3], [2, 2, 2])
    np.testing.assert_allclose(
        detections.scores[0, :3], np.exp(6) / (2 * np.exp(6) + 10), rtol=1e-5
    )
    # Config round trip keeps the rows.
    config = heads.get_config()
    assert config["classifier_rows"] == ROWS
    assert config["box_head"]["classifier_layout"] == "dataset_ids"
    clone = RoIHeads.from_config(config)
    clone(features, _proposals(PROPOSALS[:3]), HW)
    assert clone.box_head.classifier.units == 12
    with pytest.raises(ValueError, match="needs classifier_rows"):
        _heads(classifier_layout="dataset_ids")
    with pytest.raises(ValueError, match="must be None"):
        _heads(classifier_rows=ROWS)
    with pytest.raises(ValueError, match="distinct ids"):
        _heads(classifier_layout="dataset_ids", classifier_rows=[0, 5, 9])


def test_dataset_ids_layout_loss_is_the_cross_entropy_over_all_rows():
    rng = np.random.default_rng(6)
    heads = _heads(classifier_layout="dataset_ids", classifier_rows=ROWS)
    features = _features(rng)
    heads(features, _proposals(PROPOSALS), HW)
    head = heads.box_head
    head.classifier.kernel.assign(rng.normal(size=head.classifier.kernel.shape) * 0.3)
    head.classifier.bias.assign(rng.normal(size=(12,)).astype(np.float32))
    tf.random.set_seed(1)
    _, losses = heads(features, _proposals(PROPOSALS), HW, labels=LABELS, training=True)
    tf.random.set_seed(1)
    targets = heads.sample(_proposals(PROPOSALS), LABELS)
    logits, deltas = heads.box_outputs(features, targets.rois, training=True)
    assert logits.shape == (1, 16, 12)
    t = targets.class_targets.numpy()[0]
    valid = targets.valid_mask.numpy()[0]
    assert set(t[valid]) >= {0, 2, 3}
    log_p = np.log(_np_softmax(logits.numpy()[0].astype(np.float64)))
    ce = -log_p[np.arange(16), np.asarray(ROWS)[np.maximum(t, 0)]]
    np.testing.assert_allclose(losses["fast_rcnn_class_loss"], (ce * valid).sum() / 16, rtol=1e-5)
    # The box loss is the contiguous classes' one (4C outputs, class k at index k - 1).
    _, box = fast_rcnn_losses(
        targets.class_targets, targets.box_targets, logits, deltas, 1.0, valid=targets.valid_mask
    )
    np.testing.assert_allclose(losses["fast_rcnn_box_loss"], box, rtol=1e-6)


@pytest.mark.parametrize("align_impl", ["gather", "crop_and_resize"])
def test_aligned_and_level_epsilon_reach_roi_align(align_impl):
    rng = np.random.default_rng(7)
    heads = _heads(aligned=False, level_epsilon=1e-6, align_impl=align_impl)
    features = _features(rng)
    heads.build({k: v.shape for k, v in features.items()})
    rois = tf.constant([PROPOSALS + [[0, 0, 447.9999, 448]]])  # P5 only with the epsilon
    levels = {f"P{l}": features[f"P{l}"] for l in range(2, 6)}
    want = roi_align(levels, rois, aligned=False, level_epsilon=1e-6, align_impl=align_impl)
    np.testing.assert_allclose(heads.box_pooler(features, rois), want, atol=1e-5)
    for other in (dict(aligned=True, level_epsilon=1e-6), dict(aligned=False)):
        different = roi_align(levels, rois, align_impl=align_impl, **other)
        assert np.abs(different - want).max() > 0.1, other
    config = heads.get_config()
    assert config["roi_aligner"]["aligned"] is False
    assert config["roi_aligner"]["level_epsilon"] == 1e-6


def test_min_box_size_reaches_the_detections():
    rng = np.random.default_rng(8)
    thin = [PROPOSALS[0], [100.0, 100.0, 200.0, 100.005]]  # 0.005 wide
    features = _features(rng)
    counts = {}
    for min_box_size in (0.0, 1e-2):
        heads = _heads(score_threshold=0.5, min_box_size=min_box_size)
        heads(features, _proposals(thin), HW)
        head = heads.box_head
        for layer in head.fcs + [head.classifier, head.box_regressor]:
            layer.kernel.assign(tf.zeros_like(layer.kernel))
            layer.bias.assign(tf.zeros_like(layer.bias))
        head.classifier.bias.assign([0.0, 8.0, 0.0, 0.0])
        detections, _ = heads(features, _proposals(thin), HW)
        counts[min_box_size] = int(detections.num_detections[0])
        assert heads.get_config()["detection"]["min_box_size"] == min_box_size
    assert counts == {0.0: 2, 1e-2: 1}


def test_build_roi_heads_sets_the_rows_from_the_layout_and_the_category_ids():
    dataset_ids = ModelConfig().override({"box_head.classifier_layout": "dataset_ids"})
    heads = build_roi_heads(dataset_ids, 3, [5, 9, 11])
    assert heads.classifier_rows == ROWS and heads.box_head.num_logits == 12
    assert build_roi_heads(dataset_ids, 3).classifier_rows == [0, 1, 2, 3]
    contiguous = build_roi_heads(ModelConfig(), 3, [5, 9, 11])
    assert contiguous.classifier_rows is None and contiguous.box_head.classifier.units == 4
    switches = ModelConfig().override(
        {
            "roi_aligner.aligned": False,
            "roi_aligner.level_epsilon": 1e-6,
            "detection.min_box_size": 0.01,
        }
    )
    heads = build_roi_heads(switches, 3)
    aligner = heads.box_pooler.config
    assert (aligner.aligned, aligner.level_epsilon) == (False, 1e-6)
    assert heads.detection_config.min_box_size == 0.01


def test_pooler_is_one_config_section_and_round_trips():
    """MultiLevelRoIAlign holds a copy of its RoIAlignerConfig (changing the layer never changes
    the caller's config), pools as the op with those settings, and serialises as the section."""
    from fpn_tf.configs.experiment import RoIAlignerConfig
    from fpn_tf.modeling.poolers import MultiLevelRoIAlign

    rng = np.random.default_rng(9)
    section = RoIAlignerConfig(output_size=5, aligned=False, level_epsilon=1e-6, max_level=4)
    pooler = MultiLevelRoIAlign(section, name="pooler")
    features = _features(rng)
    rois = tf.constant([PROPOSALS])
    got = pooler(features, rois)
    assert pooler.levels == ["P2", "P3", "P4"] and got.shape == (1, 5, 5, 5, 4)
    want = roi_align(
        {f"P{l}": features[f"P{l}"] for l in range(2, 5)},
        rois,
        output_size=5,
        max_level=4,
        aligned=False,
        level_epsilon=1e-6,
    )
    np.testing.assert_allclose(got, want, atol=1e-4)
    pooler.config.align_impl = "gather"
    assert section.align_impl == "auto"
    clone = MultiLevelRoIAlign.from_config(pooler.get_config())
    assert clone.config == pooler.config and clone.get_config() == pooler.get_config()


def test_align_impl_and_nms_impl_switch_both_branches():
    """What the portable export sets on roi_heads reaches the box and the mask pooler."""
    heads = make_roi_heads(mask={}, align_impl="crop_and_resize", nms_impl="padded")
    heads.align_impl, heads.nms_impl = "gather", "per_image"
    assert heads.box_pooler.config.align_impl == heads.mask_pooler.config.align_impl == "gather"
    assert heads.detection_config.nms_impl == "per_image"
