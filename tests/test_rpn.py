"""fpn_tf.modeling.rpn: the RPN head (one set of weights for every level) and the
RegionProposalNetwork layer on its own (anchors, targets, proposals, losses, serialisation)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.configs.experiment import AnchorConfig, ModelConfig, RPNConfig
from fpn_tf.modeling.losses import rpn_losses
from fpn_tf.modeling.rpn import RegionProposalNetwork, RPNHead
from fpn_tf.ops import anchors as anchor_ops
from fpn_tf.ops import box_ops, postprocess, target_assigner


def _pyramid(rng, channels=16):
    return {
        "P2": tf.constant(rng.normal(size=(2, 12, 10, channels)), tf.float32),
        "P3": tf.constant(rng.normal(size=(2, 6, 5, channels)), tf.float32),
    }


def test_rpn_head_applies_the_same_convs_on_every_level_in_values_and_gradients():
    rng = np.random.default_rng(0)
    features = _pyramid(rng)
    head = RPNHead(num_anchors=3, channels=8)
    head(features)
    for layer in (head.objectness, head.box_deltas):  # non-zero biases, larger kernels
        layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype("float32"))
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    assert len(head.weights) == 6  # one set of weights for all levels
    with tf.GradientTape(persistent=True) as tape:
        logits, deltas = head(features)
        ref_logits, ref_deltas = {}, {}
        for level, x in features.items():
            hidden = head.conv(x)
            ref_logits[level], ref_deltas[level] = head.objectness(hidden), head.box_deltas(hidden)
        loss = tf.add_n(
            [tf.reduce_sum(logits[l] ** 2) + tf.reduce_sum(deltas[l] ** 2) for l in features]
        )
        ref_loss = tf.add_n(
            [
                tf.reduce_sum(ref_logits[l] ** 2) + tf.reduce_sum(ref_deltas[l] ** 2)
                for l in features
            ]
        )
    for level, x in features.items():
        assert logits[level].shape == x.shape[:3] + (3,)
        assert deltas[level].shape == x.shape[:3] + (12,)
        np.testing.assert_allclose(logits[level], ref_logits[level], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(deltas[level], ref_deltas[level], rtol=1e-5, atol=1e-5)
    assert float(tf.reduce_max(tf.abs(deltas["P2"]))) > 1.0
    for grad, ref in zip(tape.gradient(loss, head.weights), tape.gradient(ref_loss, head.weights)):
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-4)


def test_rpn_head_config_round_trip_and_functional_use():
    head = RPNHead(num_anchors=5, channels=12, name="rpn")
    clone = RPNHead.from_config(head.get_config())
    assert (clone.num_anchors, clone.channels, clone.name) == (5, 12, "rpn")
    x = keras.Input((None, None, 16))
    logits, deltas = clone({"P4": x})
    model = keras.Model(x, [logits["P4"], deltas["P4"]])
    a, b = model(np.zeros((1, 4, 4, 16), "float32"))
    assert a.shape == (1, 4, 4, 5) and b.shape == (1, 4, 4, 20)


# ------------------------------------------------------------------ RegionProposalNetwork

SIZES = {"P3": (32.0,), "P4": (64.0,)}
IMAGE = 64  # P3: 8x8 cells, P4: 4x4


def _rpn(anchor_config=None, name=None, **overrides):
    """An RPN on P3 / P4 (anchor sizes 32 / 64) with ``model.rpn`` fields ``overrides``."""
    anchor_config = anchor_config or AnchorConfig(sizes=[32.0, 64.0])
    return RegionProposalNetwork(RPNConfig(**overrides), anchor_config, list(SIZES), name=name)


def _features(rng=None, channels=4, batch=1):
    make = (lambda s: rng.normal(size=s)) if rng is not None else np.zeros
    return {
        "P3": tf.constant(make((batch, 8, 8, channels)), tf.float32),
        "P4": tf.constant(make((batch, 4, 4, channels)), tf.float32),
    }


def _valid_hw(batch=1):
    return tf.constant([[IMAGE, IMAGE]] * batch, tf.float32)


def _labels(boxes):
    n = len(boxes)
    return {
        "gt_boxes": tf.constant([boxes], tf.float32),
        "gt_classes": tf.ones((1, n), tf.int32),
        "gt_is_crowd": tf.zeros((1, n), tf.bool),
    }


def _plant_head(rpn, channels):
    """Head = identity at the centre tap, objectness of anchor type 1 (ratio 1) = channel 0,
    no box deltas: the scores are the planted feature."""
    head = rpn.head
    kernel = np.zeros(head.conv.kernel.shape, np.float32)
    kernel[1, 1] = np.eye(channels, head.channels)
    head.conv.kernel.assign(kernel)
    head.conv.bias.assign(np.zeros(head.conv.bias.shape, np.float32))
    obj = np.zeros(head.objectness.kernel.shape, np.float32)
    obj[0, 0, 0, 1] = 1.0
    head.objectness.kernel.assign(obj)
    head.objectness.bias.assign(np.full(head.objectness.bias.shape, -3.0, np.float32))
    for w in (head.box_deltas.kernel, head.box_deltas.bias):
        w.assign(np.zeros(w.shape, np.float32))


def test_rpn_alone_shapes_and_static_anchor_count():
    rpn = _rpn(pre_nms_top_k_test=50, post_nms_top_k_test=20)
    proposals, losses = rpn(_features(np.random.default_rng(0), batch=2), _valid_hw(2))
    assert losses == {} and rpn.head.channels == 4 and rpn.num_anchors == 3
    assert proposals.boxes.shape == (2, 20, 4) and proposals.scores.shape == (2, 20)
    assert proposals.valid.dtype == tf.bool
    anchors = rpn.anchors((IMAGE, IMAGE))
    assert [a.shape[0] for a in anchors.values()] == [8 * 8 * 3, 4 * 4 * 3]
    # Proposals lie inside the valid image.
    assert float(tf.reduce_min(proposals.boxes)) >= 0.0
    assert float(tf.reduce_max(proposals.boxes)) <= IMAGE


def test_planted_ground_truth_gives_positive_anchors_at_its_place():
    rpn = _rpn()
    rpn(_features(), _valid_hw())
    anchors = rpn.anchors((IMAGE, IMAGE))
    all_anchors, _ = anchor_ops.concat_anchors(anchors)
    # The P3 anchor of cell (y=2, x=5), ratio 1 (type 1): centre (20, 44), side 32.
    index = (2 * 8 + 5) * 3 + 1
    gt = [4.0, 28.0, 36.0, 60.0]
    np.testing.assert_allclose(all_anchors[index], gt)
    targets = rpn.assign_targets(anchors, _labels([gt]))
    labels = targets.labels.numpy()[0]
    iou = box_ops.pairwise_iou(all_anchors, tf.constant([gt])).numpy()[:, 0]
    assert labels[index] == 1
    np.testing.assert_allclose(targets.box_targets[0, index], 0.0, atol=1e-6)
    positives = np.flatnonzero(labels == 1)
    assert (iou[positives] > 0.7).all()  # only near the planted box
    assert set(np.flatnonzero(iou > 0.7)) == set(positives)  # every such anchor (< 128 of them)
    assert (iou[labels == 0] < 0.3).all()
    assert (labels == 0).sum() == (iou < 0.3).sum()  # 240 anchors < 256: every negative taken


def test_proposals_contain_the_planted_high_scoring_anchor():
    rpn = _rpn(pre_nms_top_k_test=50, post_nms_top_k_test=10)
    features = _features()
    rpn(features, _valid_hw())
    _plant_head(rpn, 4)
    planted = features["P4"].numpy()
    planted[0, 1, 2, 0] = 8.0  # P4 cell (1, 2): centre (24, 40), ratio-1 anchor side 64
    features["P4"] = tf.constant(planted)
    proposals, _ = rpn(features, _valid_hw())
    # Anchor (-8, 8, 56, 72) clipped to the 64x64 image.
    np.testing.assert_allclose(proposals.boxes[0, 0], [0.0, 8.0, 56.0, 64.0], atol=1e-4)
    np.testing.assert_allclose(proposals.scores[0, 0], 1 / (1 + np.exp(-5.0)), rtol=1e-5)
    assert float(proposals.scores[0, 1]) < 0.5
    # With the ground truth the train top-k applies: post_nms_top_k_train (2000) rows.
    train_proposals, losses = rpn(features, _valid_hw(), labels=_labels([[0, 8, 56, 64]]))
    assert train_proposals.boxes.shape[1] == 2000 and proposals.boxes.shape[1] == 10
    np.testing.assert_allclose(train_proposals.boxes[0, 0], [0.0, 8.0, 56.0, 64.0], atol=1e-4)
    assert set(losses) == {"rpn_objectness_loss", "rpn_box_loss"}


def test_rpn_losses_equal_the_functional_path_times_the_weight():
    rng = np.random.default_rng(1)
    rpn = _rpn(loss_weight=2.0)
    features = _features(rng)
    labels = _labels([[4.0, 28.0, 36.0, 60.0], [10.0, 5.0, 60.0, 30.0]])
    tf.random.set_seed(3)
    _, losses = rpn(features, _valid_hw(), labels=labels)
    tf.random.set_seed(3)
    logits, deltas = rpn.head(features)
    all_anchors, _ = anchor_ops.concat_anchors(rpn.anchors((IMAGE, IMAGE)))
    targets = target_assigner.assign_rpn_targets(
        all_anchors,
        labels["gt_boxes"],
        labels["gt_classes"],
        labels["gt_is_crowd"],
        positive_iou=0.7,
        negative_iou=0.3,
        num_samples=256,
        positive_fraction=0.5,
        positive_iou_inclusive=False,
    )
    objectness, box = rpn_losses(
        targets.labels,
        targets.box_targets,
        tf.concat([tf.reshape(logits[l], [1, -1]) for l in ("P3", "P4")], 1),
        tf.concat([tf.reshape(deltas[l], [1, -1, 4]) for l in ("P3", "P4")], 1),
        256,
        1.0 / 9,
    )
    np.testing.assert_allclose(losses["rpn_objectness_loss"], 2.0 * objectness, rtol=1e-6)
    np.testing.assert_allclose(losses["rpn_box_loss"], 2.0 * box, rtol=1e-6)
    assert float(box) > 0.0


def test_rpn_get_config_round_trip_gives_the_same_proposals():
    rng = np.random.default_rng(2)
    rpn = _rpn(head_channels=6, nms_impl="padded", pre_nms_top_k_test=40, name="rpn")
    features = _features(rng)
    a, _ = rpn(features, _valid_hw())
    config = rpn.get_config()
    assert config["config"]["nms_impl"] == "padded" and config["config"]["head_channels"] == 6
    assert config["anchor_config"]["sizes"] == [32.0, 64.0] and config["levels"] == ["P3", "P4"]
    assert rpn.anchor_sizes == SIZES
    clone = RegionProposalNetwork.from_config(config)
    assert clone.get_config() == config
    clone(features, _valid_hw())
    clone.set_weights(rpn.get_weights())
    b, _ = clone(features, _valid_hw())
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-5)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    assert [v.path for v in clone.weights] == [v.path for v in rpn.weights]


# ------------------------------------------------------------------ torchvision / detectron2 switches


def test_anchor_switches_reach_the_anchors_the_rpn_proposes_from():
    """model.anchor offset 0, round_cell_anchors and stride_from_padded_size (torchvision): a P3
    map of 7x8 cells means a 56x64 padded image, whose 4x4 P4 cells have stride 56 // 4 = 14."""
    switches = dict(offset=0.0, round_cell_anchors=True, stride_from_padded_size=True)
    anchor_config = AnchorConfig(sizes=[32.0, 64.0], **switches)
    rpn = _rpn(anchor_config, pre_nms_top_k_test=50, post_nms_top_k_test=10)
    features = {
        "P3": tf.zeros((1, 7, 8, 4), tf.float32),
        "P4": tf.zeros((1, 4, 4, 4), tf.float32),
    }
    rpn(features, tf.constant([[56.0, 64.0]]))
    ref = anchor_ops.generate_anchors(
        (56, 64),
        ("P3", "P4"),
        SIZES,
        (0.5, 1.0, 2.0),
        offset=0.0,
        round_cell_anchors=True,
        stride_from_padded_size=True,
    )
    for level, a in rpn.anchors((56, 64)).items():
        np.testing.assert_array_equal(a.numpy(), ref[level].numpy())
    # P3 cell (0, 0), ratio 0.5: the rounded cell anchor (y -11..11, x -23..23).
    np.testing.assert_array_equal(rpn.anchors((56, 64))["P3"][0], [-11, -23, 11, 23])
    _plant_head(rpn, 4)
    planted = features["P4"].numpy()
    planted[0, 1, 2, 0] = 8.0  # P4 cell (1, 2): centre (1 * 14, 2 * 16), side 64
    features["P4"] = tf.constant(planted)
    proposals, _ = rpn(features, tf.constant([[56.0, 64.0]]))
    # Anchor (-18, 0, 46, 64), clipped to the 56x64 image.
    np.testing.assert_allclose(proposals.boxes[0, 0], [0.0, 0.0, 46.0, 64.0], atol=1e-4)
    config = rpn.get_config()
    assert {k: config["anchor_config"][k] for k in switches} == switches
    assert RegionProposalNetwork.from_config(config).get_config() == config


def test_positive_iou_inclusive_reaches_the_anchor_labels():
    gt = [4.0, 28.0, 36.0, 60.0]  # the P3 anchor of cell (2, 5), ratio 1
    probe = _rpn()
    probe(_features(), _valid_hw())
    all_anchors, _ = anchor_ops.concat_anchors(probe.anchors((IMAGE, IMAGE)))
    iou = box_ops.pairwise_iou(all_anchors, tf.constant([gt])).numpy()[:, 0]
    threshold = float(np.sort(np.unique(iou))[-2])  # the best IoU below the gt's own anchor
    at_threshold = np.flatnonzero(iou == np.float32(threshold))
    assert 0.3 < threshold < 1.0 and len(at_threshold) >= 1
    for inclusive in (False, True):
        rpn = _rpn(positive_iou=threshold, positive_iou_inclusive=inclusive)
        rpn(_features(), _valid_hw())
        labels = rpn.assign_targets(rpn.anchors((IMAGE, IMAGE)), _labels([gt])).labels.numpy()[0]
        assert (labels[at_threshold] == (1 if inclusive else -1)).all(), inclusive
        assert rpn.get_config()["config"]["positive_iou_inclusive"] is inclusive


def test_nms_per_level_reaches_the_proposals():
    rng = np.random.default_rng(4)
    features = _features(rng)
    outputs, weights = {}, None
    for per_level in (False, True):
        # One anchor size on both levels: P3 and P4 anchors overlap (IoU 0.62 at 4 px apart).
        rpn = _rpn(
            AnchorConfig(sizes=[32.0, 32.0]),
            nms_per_level=per_level,
            nms_iou=0.5,
            pre_nms_top_k_test=60,
            post_nms_top_k_test=80,
        )
        rpn(features, _valid_hw())
        if per_level:
            rpn.set_weights(weights)
        weights = rpn.get_weights()
        outputs[per_level], _ = rpn(features, _valid_hw())
        logits, deltas = rpn.head_outputs(features)
        ref = postprocess.generate_proposals(
            logits,
            deltas,
            rpn.anchors((IMAGE, IMAGE)),
            _valid_hw(),
            pre_nms_top_k=60,
            post_nms_top_k=80,
            nms_iou=0.5,
            min_size=0.0,
            nms_impl="per_image",
            nms_per_level=per_level,
        )
        np.testing.assert_array_equal(outputs[per_level].boxes.numpy(), ref.boxes.numpy())
        assert rpn.get_config()["config"]["nms_per_level"] is per_level
    # Boxes of P3 and P4 suppress each other only in the global NMS: more survive per level.
    assert outputs[True].valid.numpy().sum() > outputs[False].valid.numpy().sum()


def test_the_rpn_takes_its_settings_from_the_config_sections():
    cfg = ModelConfig().override(
        {
            "anchor.offset": 0.0,
            "anchor.round_cell_anchors": True,
            "anchor.stride_from_padded_size": True,
            "rpn.nms_per_level": True,
            "rpn.positive_iou_inclusive": True,
        }
    )
    levels = ["P2", "P3", "P4", "P5", "P6"]
    rpn = RegionProposalNetwork(cfg.rpn, cfg.anchor, levels)
    assert rpn.anchor_config == cfg.anchor and rpn.config == cfg.rpn
    assert rpn.anchor_sizes == {"P2": (32.0,), "P3": (64.0,), "P4": (128.0,), "P5": (256.0,),
                                "P6": (512.0,)}  # fmt: skip
    cfg.rpn.nms_per_level = False  # the layer holds its own copy
    assert rpn.config.nms_per_level and rpn.config.positive_iou_inclusive
    assert rpn.anchor_config.offset == 0.0 and rpn.anchor_config.round_cell_anchors
    assert rpn.anchor_config.stride_from_padded_size
    default = RegionProposalNetwork(ModelConfig().rpn, ModelConfig().anchor, levels)
    assert (default.anchor_config.offset, default.anchor_config.round_cell_anchors) == (0.5, False)
    assert not default.anchor_config.stride_from_padded_size
    assert not default.config.nms_per_level and not default.config.positive_iou_inclusive
    # One level takes every size (the single-level ablations); other counts are refused.
    assert RegionProposalNetwork(cfg.rpn, cfg.anchor, ["P4"]).anchor_sizes == {
        "P4": (32.0, 64.0, 128.0, 256.0, 512.0)
    }
    with pytest.raises(ValueError, match="model.anchor.sizes has 5 entries"):
        RegionProposalNetwork(cfg.rpn, cfg.anchor, ["P3", "P4"])
    with pytest.raises(ValueError, match="negative_iou"):
        RegionProposalNetwork(RPNConfig(negative_iou=0.8), cfg.anchor, levels)
    # The portable export switches nms_impl for a while: a copy, the config stays.
    rpn.nms_impl = "padded"
    assert rpn.config.nms_impl == "padded" and cfg.rpn.nms_impl == "per_image"
