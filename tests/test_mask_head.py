"""The mask branch: the Mask R-CNN head (shapes, channel layouts, initialisation), RoIHeads' mask
loss against NumPy on planted logits, the targets of known geometry through the branch,
inference masks, a tiny MaskRCNN that learns its masks, mixed precision, and the box-only
detector unchanged."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import make_roi_heads
from fpn_tf.configs.experiment import ExperimentConfig
from fpn_tf.modeling import MaskRCNN, RoIHeads
from fpn_tf.modeling.factory import build_model
from fpn_tf.modeling.faster_rcnn import LOSS_NAMES, MASK_LOSS_NAMES, FasterRCNN
from fpn_tf.modeling.mask_head import MaskRCNNHead
from fpn_tf.ops import mask_ops
from fpn_tf.ops.postprocess import Detections
from fpn_tf.ops.target_assigner import RoiTargets
from layer_test import run_layer_test
from test_detector import CATEGORY_IDS, fixed_batch, tiny_fpn, tiny_roi_heads, tiny_rpn

ROWS = [0, 5, 9, 11]  # torchvision-style rows of background and classes 1..3


def _mask_heads(num_classes=3, classifier_rows=None, name=None, **overrides):
    """RoI heads with a mask branch whose sampler keeps F = 6 foreground rows (8 * 0.75)."""
    layout = "contiguous" if classifier_rows is None else "dataset_ids"
    return make_roi_heads(
        num_classes,
        mask={"conv_dims": 16, "num_convs": 2, **overrides},
        classifier_rows=classifier_rows,
        name=name,
        batch_size_per_image=8,
        positive_fraction=0.75,
        fc_dims=16,
        classifier_layout=layout,
    )


def _features(seed=0, channels=8, image=128):
    rng = np.random.default_rng(seed)
    return {
        f"P{l}": tf.constant(
            rng.normal(size=(1, image // 2**l, image // 2**l, channels)), tf.float32
        )
        for l in range(2, 7)
    }


def _plant(heads, logits):
    """Make ``heads.mask_head`` return ``logits`` [B, R, 28, 28, K] whatever it is given."""
    planted = tf.constant(logits, tf.float32)
    heads.mask_head.call = lambda x: tf.cast(planted, x.dtype)


# ------------------------------------------------------------------------------------ the head


@pytest.mark.parametrize(
    "kwargs, k, channels",
    [
        ({}, 4, [0, 1, 2, 3]),
        ({"class_agnostic": True}, 1, [0, 0, 0, 0]),
        ({"classifier_rows": ROWS}, 12, ROWS),
    ],
    ids=["contiguous", "class_agnostic", "classifier_rows"],
)
def test_head_shapes_channel_layouts_and_config_round_trip(kwargs, k, channels):
    head = MaskRCNNHead(num_classes=3, conv_dims=16, num_convs=4, name="mask_head", **kwargs)
    x = tf.random.normal((2, 3, 14, 14, 8), seed=1)
    out = head(x)
    assert out.shape == (2, 3, 28, 28, k) and head.num_outputs == k
    assert head.class_channels(tf.constant([0, 1, 2, 3])).numpy().tolist() == channels
    assert [c.name for c in head.convs] == [f"mask_conv{i}" for i in range(1, 5)]
    # Each RoI is processed on its own: RoI (1, 2) alone gives the same logits.
    np.testing.assert_allclose(head(x[1:2, 2:3]), out[1:2, 2:3], rtol=1e-5, atol=1e-6)
    run_layer_test(MaskRCNNHead, layer=head, input_data=x, atol=0)


def test_head_initialisation_is_detectron2s():
    head = MaskRCNNHead(num_classes=3, conv_dims=64, num_convs=4)
    head.build((None, None, 14, 14, 16))  # 16 input channels: conv1's fan_in != fan_out
    for layer in head.convs + [head.deconv]:
        kernel, bias = (w.numpy() for w in layer.weights)
        # He normal, fan_out = out_channels * kh * kw (torch's fan_out, also for the deconv's
        # [in, out, kh, kw] weight: in * kh * kw; in = out = 64 here).
        fan_out = 64 * kernel.shape[0] * kernel.shape[1]
        assert kernel.std() == pytest.approx(np.sqrt(2.0 / fan_out), rel=0.06), layer.name
        assert np.abs(kernel).max() > 2.5 * np.sqrt(2.0 / fan_out)  # untruncated
        assert not bias.any()
    kernel, bias = (w.numpy() for w in head.predictor.weights)
    assert kernel.shape == (1, 1, 64, 4)
    assert kernel.std() == pytest.approx(0.001, rel=0.25) and not bias.any()


# ------------------------------------------------------------------------------------ the loss

# One image 128x128, three objects (full masks drawn, then cropped as the data pipeline does).
GT_BOXES = np.array([[[32.0, 32.0, 64.0, 64.0], [70, 10, 120, 60], [0, 0, 0, 0]]], np.float32)
GT_CLASSES = np.array([[2, 3, -1]], np.int32)


def _gt_masks():
    full = np.zeros((3, 128, 128), np.uint8)
    full[0, 32:64, 32:64] = 1  # a square filling its box
    yy, xx = np.mgrid[:128, :128] + 0.5
    full[1] = (yy - 95) ** 2 + (xx - 35) ** 2 <= 25**2  # a disc in its box
    crops = mask_ops.crop_masks(full, GT_BOXES[0], 112).numpy()
    crops[2] = 0.0  # padding row
    return {
        "gt_masks": tf.constant(crops[None]),
        "gt_boxes": tf.constant(GT_BOXES),
        "gt_classes": tf.constant(GT_CLASSES),
    }


# Sampler-ordered rows: 3 foreground, 2 background, then padding, F = 6 of 8 pooled.
ROIS = np.array(
    [
        [
            [32, 32, 72, 72],  # fg, object 0 (class 2), extends past the object bottom-right
            [24, 24, 64, 64],  # fg, object 0, extends past it top-left
            [68, 12, 118, 62],  # fg, object 1 (class 3)
            [0, 0, 20, 20],  # background
            [90, 90, 120, 125],  # background
            [0, 0, 0, 0],  # padding
            [30, 30, 66, 66],  # beyond F: never pooled (the sampler puts no foreground here)
            [0, 0, 0, 0],
        ]
    ],
    np.float32,
)
FG = np.array([[1, 1, 1, 0, 0, 0, 0, 0]], bool)


def _roi_targets(foreground=FG):
    valid = np.array([[1, 1, 1, 1, 1, 0, 0, 0]], bool)
    matched = np.where(foreground, [[0, 0, 1, -1, -1, -1, -1, -1]], -1).astype(np.int32)
    classes = np.where(foreground, [[2, 2, 3, 0, 0, 0, 0, 0]], np.where(valid, 0, -1))
    return RoiTargets(
        tf.constant(ROIS),
        tf.constant(classes, tf.int32),
        tf.zeros((1, 8, 4)),
        tf.constant(foreground),
        tf.constant(valid),
        tf.constant(matched),
    )


def _expected_square_target(roi, obj=(32, 32, 64, 64), m=28):
    """Target of an RoI over the square object (NumPy): 1 where the bin centre is inside it."""
    y = roi[0] + (np.arange(m) + 0.5) * (roi[2] - roi[0]) / m
    x = roi[1] + (np.arange(m) + 0.5) * (roi[3] - roi[1]) / m
    iy = (y >= obj[0]) & (y <= obj[2])
    ix = (x >= obj[1]) & (x <= obj[3])
    return (iy[:, None] & ix[None, :]).astype(np.float32)


def _np_bce(targets, logits):
    return np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))


def test_square_rois_over_a_square_mask_give_the_expected_targets():
    heads = _mask_heads()
    rois, classes, fg, targets = heads.mask_targets(_roi_targets(), _gt_masks())
    assert targets.shape == (1, 6, 28, 28) and rois.shape == (1, 6, 4)
    t = targets.numpy()[0]
    # RoI 0 = [32, 72): bin centres 32 + (j + 0.5) * 40 / 28 < 64 for j <= 21.
    want = np.zeros((28, 28), np.float32)
    want[:22, :22] = 1.0
    np.testing.assert_array_equal(t[0], want)
    np.testing.assert_array_equal(t[0], _expected_square_target(ROIS[0, 0]))
    # RoI 1 = [24, 64): ones from j = 6 (24 + 6.5 * 40 / 28 >= 32) to the end.
    np.testing.assert_array_equal(t[1], _expected_square_target(ROIS[0, 1]))
    assert t[1, 6:, 6:].all() and not t[1, :6].any() and not t[1, :, :6].any()
    # The disc: about its area's share of the RoI, inside the RoI (pi 25^2 / 50^2 = 0.785).
    assert 0.70 < t[2].mean() < 0.80 and t[2, 14, 14] == 1 and t[2, 0, 0] == 0
    # Background and padding rows: all zero.
    assert not t[3:].any()
    assert classes.numpy().tolist() == [[2, 2, 3, 0, 0, -1]]


def test_loss_equals_numpy_bce_of_the_gt_class_channel_over_foreground_pixels():
    heads = _mask_heads(loss_weight=0.7)
    features, labels, roi_targets = _features(), _gt_masks(), _roi_targets()
    _, _, _, targets = heads.mask_targets(roi_targets, labels)
    t = targets.numpy()[0]  # [6, 28, 28]
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(1, 6, 28, 28, 4)).astype(np.float32)
    _plant(heads, logits)

    def loss():
        out = heads.mask_loss(features, roi_targets, labels)["mask_loss"]
        assert out.dtype == tf.float32 and out.shape == ()
        return float(out)

    gt_channel = [2, 2, 3]  # contiguous classes of the three foreground rows
    want = np.mean([_np_bce(t[r], logits[0, r, :, :, c]) for r, c in enumerate(gt_channel)])
    assert loss() == pytest.approx(0.7 * want, rel=1e-5)

    # Logits agreeing with the target (sigmoid -> 0 / 1): ~0; inverted: 30 per pixel.
    perfect = logits.copy()
    for r, c in enumerate(gt_channel):
        perfect[0, r, :, :, c] = np.where(t[r] > 0.5, 30.0, -30.0)
    _plant(heads, perfect)
    assert loss() == pytest.approx(0.7 * 9.4e-14, abs=1e-12)
    inverted = perfect.copy()
    for r, c in enumerate(gt_channel):
        inverted[0, r, :, :, c] *= -1.0
    _plant(heads, inverted)
    assert loss() == pytest.approx(0.7 * 30.0, rel=1e-6)

    # Only the ground-truth class's channel counts: the other channels (and the unused 0) of
    # the foreground rows, and every channel of the background and padding rows, do not.
    other = logits.copy()
    for r in range(6):
        for c in range(4):
            if r >= 3 or c != gt_channel[r]:
                other[0, r, :, :, c] = rng.normal(scale=10.0, size=(28, 28))
    _plant(heads, other)
    assert loss() == pytest.approx(0.7 * want, rel=1e-5)


def test_classifier_rows_and_class_agnostic_losses_read_their_channel():
    features, labels, roi_targets = _features(), _gt_masks(), _roi_targets()
    rng = np.random.default_rng(1)
    for overrides, k, channel in (
        ({"classifier_rows": ROWS}, 12, {2: 9, 3: 11}),
        ({"class_agnostic": True}, 1, {2: 0, 3: 0}),
    ):
        heads = _mask_heads(**overrides)
        _, _, _, targets = heads.mask_targets(roi_targets, labels)
        t = targets.numpy()[0]
        logits = rng.normal(scale=3.0, size=(1, 6, 28, 28, k)).astype(np.float32)
        _plant(heads, logits)
        got = heads.mask_loss(features, roi_targets, labels)["mask_loss"]
        rows = [(0, 2), (1, 2), (2, 3)]
        want = np.mean([_np_bce(t[r], logits[0, r, :, :, channel[c]]) for r, c in rows])
        assert float(got) == pytest.approx(want, rel=1e-5), overrides


def test_no_foreground_gives_a_finite_zero_loss_and_gradient():
    heads = _mask_heads()
    features, labels = _features(), _gt_masks()
    roi_targets = _roi_targets(foreground=np.zeros((1, 8), bool))
    with tf.GradientTape() as tape:
        loss = heads.mask_loss(features, roi_targets, labels)["mask_loss"]
    grads = tape.gradient(loss, heads.mask_head.trainable_variables)
    assert float(loss) == 0.0 and np.isfinite(float(loss))
    assert all(np.isfinite(g.numpy()).all() and not g.numpy().any() for g in grads)


def test_the_real_head_trains_on_the_targets():
    """Without planting: the loss starts at ~log 2 (predictor ~N(0, 0.001)) and its gradient
    reaches every weight of the head."""
    heads = _mask_heads()
    features, labels, roi_targets = _features(), _gt_masks(), _roi_targets()
    with tf.GradientTape() as tape:
        loss = heads.mask_loss(features, roi_targets, labels)["mask_loss"]
    assert float(loss) == pytest.approx(np.log(2.0), abs=0.01)
    grads = tape.gradient(loss, heads.mask_head.trainable_variables)
    assert len(grads) == 2 * (2 + 2) and all(np.abs(g.numpy()).sum() > 0 for g in grads)


# ------------------------------------------------------------------------------- inference


def test_predict_is_the_sigmoid_of_each_detections_class_channel():
    features = _features()
    boxes = np.zeros((1, 5, 4), np.float32)
    boxes[0, :3] = [[10, 10, 50, 60], [60, 60, 120, 100], [5, 70, 40, 125]]
    detections = Detections(
        tf.constant(boxes),
        tf.constant([[0.9, 0.8, 0.7, 0.0, 0.0]]),
        tf.constant([[3, 1, 2, 0, 0]], tf.int32),
        tf.constant([3], tf.int32),
    )
    rng = np.random.default_rng(2)
    for overrides, k, channels in (
        ({}, 4, [3, 1, 2]),
        ({"classifier_rows": ROWS}, 12, [11, 5, 9]),
        ({"class_agnostic": True}, 1, [0, 0, 0]),
    ):
        heads = _mask_heads(**overrides)
        heads.build({k_: v.shape for k_, v in features.items()})
        logits = rng.normal(scale=2.0, size=(1, 5, 28, 28, k)).astype(np.float32)
        _plant(heads, logits)
        masks = heads.predict_masks(features, detections).numpy()
        assert masks.shape == (1, 5, 28, 28) and masks.dtype == np.float32
        for r, c in enumerate(channels):
            want = 1.0 / (1.0 + np.exp(-logits[0, r, :, :, c]))
            np.testing.assert_allclose(masks[0, r], want, rtol=1e-5, err_msg=str(overrides))
        assert not masks[0, 3:].any()


def test_mask_branch_config_round_trip():
    heads = _mask_heads(classifier_rows=ROWS, sampling_ratio=0, name="roi_heads")
    features = _features()
    detections = Detections(
        tf.constant([[[10.0, 10.0, 50.0, 60.0]]]),
        tf.constant([[0.9]]),
        tf.constant([[2]]),
        tf.constant([1]),
    )

    def predict(layer, features):
        if not layer.built:
            layer.build({k: v.shape for k, v in features.items()})
        return layer.predict_masks(features, detections)

    run_layer_test(RoIHeads, layer=heads, input_data=features, call=predict, atol=0)
    config = heads.get_config()
    assert config["classifier_rows"] == ROWS and config["mask_roi_aligner"]["output_size"] == 14
    assert config["mask_roi_aligner"]["sampling_ratio"] == 0
    assert config["mask_head"] == {
        "num_convs": 2,
        "conv_dims": 16,
        "class_agnostic": False,
        "loss_weight": 1.0,
    }


# ---------------------------------------------------------------------------- the detector

DISCS = [  # per image: (centre y, centre x, radius, contiguous class)
    [(40, 40, 22, 1), (90, 95, 18, 2)],
    [(35, 90, 20, 3), (92, 36, 24, 1)],
]
COLORS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255)}


def disc_batch(size=128):
    """Two images of coloured discs on grey with their boxes, classes and box-relative masks."""
    images = np.full((2, size, size, 3), 40, np.float32)
    boxes = np.zeros((2, 3, 4), np.float32)
    classes = -np.ones((2, 3), np.int32)
    masks = np.zeros((2, 3, 112, 112), np.float32)
    yy, xx = np.mgrid[:size, :size] + 0.5
    for i, discs in enumerate(DISCS):
        full = np.zeros((3, size, size), np.uint8)
        for j, (cy, cx, r, c) in enumerate(discs):
            full[j] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            images[i][full[j] > 0] = COLORS[c]
            boxes[i, j] = (cy - r, cx - r, cy + r, cx + r)
            classes[i, j] = c
        masks[i] = mask_ops.crop_masks(full, boxes[i], 112).numpy()
        masks[i, len(discs) :] = 0.0
    info = np.array([[size, size], [size, size], [1, 1], [0, 0]], np.float32)
    features = {"images": images, "image_info": np.tile(info, (2, 1, 1))}
    labels = {
        "gt_boxes": boxes,
        "gt_classes": classes,
        "gt_is_crowd": np.zeros((2, 3), bool),
        "gt_masks": masks,
    }
    return features, labels


def tiny_mask_model(size=128):
    heads = tiny_roi_heads(mask={"conv_dims": 32, "num_convs": 4}, name="roi_heads")
    return MaskRCNN(tiny_fpn(size), tiny_rpn(), heads, category_ids=CATEGORY_IDS)


@pytest.mark.slow
def test_a_tiny_mask_rcnn_learns_its_masks():
    keras.utils.set_random_seed(0)
    model = tiny_mask_model()
    assert model.loss_names == MASK_LOSS_NAMES
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    features, labels = disc_batch()
    data = tf.data.Dataset.from_tensors((features, labels)).repeat()
    history = model.fit(data, steps_per_epoch=10, epochs=4, verbose=0).history
    mask = np.array(history["mask_loss"])
    assert set(MASK_LOSS_NAMES) <= set(history)
    assert np.isfinite(mask).all()
    assert mask[0] > 0.5, mask  # ~log 2 at the start
    assert mask[-1] < 0.6 * mask[0], mask
    # total_loss is the sum of the five.
    logs = model.compute_losses(features, labels, training=False)
    parts = sum(float(logs[k]) for k in MASK_LOSS_NAMES if k != "total_loss")
    assert float(logs["total_loss"]) == pytest.approx(parts, rel=1e-5)


def test_call_returns_box_relative_masks_with_zeros_beyond_num_detections():
    keras.utils.set_random_seed(1)
    model = tiny_mask_model()
    features, _ = disc_batch()
    out = model.predict(features, verbose=0)
    assert out["detection_masks"].shape == (2, 100, 28, 28)
    # Untrained, every class scores ~1/4 > 0.05: 100 detections. Raise the threshold to the
    # median score of image 0 so that rows beyond num_detections exist.
    model.roi_heads.detection_config.score_threshold = float(np.median(out["detection_scores"][0]))
    out = {k: v.numpy() for k, v in model(features).items()}  # eager: the new threshold
    masks, n = out["detection_masks"], out["num_detections"]
    assert masks.shape == (2, 100, 28, 28) and masks.dtype == np.float32
    assert out["detection_boxes"].shape == (2, 100, 4)
    assert 0 < n[0] < 100 and n.min() > 0, n
    for i in range(2):
        live = masks[i, : n[i]]
        # Untrained logits are ~0: probabilities ~0.5, strictly inside (0, 1).
        assert ((live > 0.0) & (live < 1.0)).all() and abs(live.mean() - 0.5) < 0.05
        assert not masks[i, n[i] :].any()


@pytest.mark.slow
def test_mixed_float16_losses_and_outputs_are_finite_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(2)
        model = tiny_mask_model()
        assert model.roi_heads.mask_head.predictor.compute_dtype == "float16"
        features, labels = disc_batch()
        losses = tf.function(lambda f, l: model.compute_losses(f, l, training=True))(
            features, labels
        )
        out = tf.function(lambda f: model(f, training=False))(features)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for name in MASK_LOSS_NAMES:
        assert losses[name].dtype == tf.float32 and np.isfinite(float(losses[name])), name
    assert float(losses["mask_loss"]) == pytest.approx(np.log(2.0), abs=0.02)
    masks = out["detection_masks"]
    assert masks.dtype == tf.float32 and masks.shape == (2, 100, 28, 28)
    assert np.isfinite(masks.numpy()).all()


def test_config_builds_mask_rcnn_and_round_trips():
    cfg = ExperimentConfig().model.override(
        {
            "architecture": "mask_rcnn",
            "num_classes": 3,
            "backbone.type": "small_resnet",
            "backbone.weights": None,
            "fpn.num_channels": 32,
            "box_head.fc_dims": 64,
            "box_head.classifier_layout": "dataset_ids",
            "mask_roi_aligner.output_size": 7,
            "mask_roi_aligner.sampling_ratio": 0,
            "mask_head.conv_dims": 16,
            "mask_head.num_convs": 3,
            "mask_head.loss_weight": 0.5,
            "mask_roi_aligner.canonical_size": 112.0,
            "mask_roi_aligner.canonical_level": 3,
            "mask_roi_aligner.max_level": 4,
            "mask_roi_aligner.aligned": False,
            "mask_roi_aligner.level_epsilon": 1e-6,
            "mask_roi_aligner.align_impl": "gather",
        }
    )
    model = build_model(cfg, category_ids=CATEGORY_IDS, input_shape=(64, 64, 3))
    heads = model.roi_heads
    assert isinstance(model, MaskRCNN) and model.loss_names == MASK_LOSS_NAMES
    # Every model.mask_roi_aligner and model.mask_head field reaches the layer's config.
    config = heads.get_config()
    assert config["mask_roi_aligner"] == cfg.mask_roi_aligner.to_dict()
    assert config["mask_head"] == cfg.mask_head.to_dict()
    assert heads.classifier_rows == [0] + CATEGORY_IDS and heads.mask_size == 14
    assert heads.mask_head.num_outputs == 12 and heads.mask_pooler.levels == ["P2", "P3", "P4"]
    assert heads.box_pooler.levels == ["P2", "P3", "P4", "P5"]  # the box branch's own
    out = model(tf.zeros((1, 64, 64, 3)))
    assert out["detection_masks"].shape == (1, 100, 14, 14)
    cfg = cfg.override({"mask_head.class_agnostic": True})
    assert build_model(cfg, CATEGORY_IDS, (64, 64, 3)).roi_heads.mask_head.num_outputs == 1
    clone = MaskRCNN.from_config(model.get_config())
    assert clone.roi_heads.get_config() == heads.get_config()
    assert clone.loss_names == MASK_LOSS_NAMES
    with pytest.raises(ValueError, match="with a mask branch"):
        MaskRCNN(model.fpn, model.rpn, make_roi_heads(3))


def test_the_box_only_detector_has_no_mask_key_and_its_four_losses():
    cfg = ExperimentConfig().model.override(
        {
            "num_classes": 3,
            "backbone.type": "small_resnet",
            "backbone.weights": None,
            "fpn.num_channels": 32,
            "box_head.fc_dims": 64,
        }
    )
    assert cfg.architecture == "faster_rcnn"
    model = build_model(cfg, input_shape=(64, 64, 3))
    assert type(model) is FasterRCNN and model.loss_names == LOSS_NAMES
    assert model.roi_heads.mask_head is None and not hasattr(model, "mask_heads")
    assert not any("mask" in v.path for v in model.weights)
    assert FasterRCNN.from_config(model.get_config()).roi_heads.mask_head is None
    features, labels = fixed_batch(64)
    losses = model.compute_losses(features, labels, training=True)
    assert sorted(losses) == sorted(LOSS_NAMES)
    assert "detection_masks" not in model(features)
