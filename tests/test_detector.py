"""FasterRCNN: it learns (a fixed batch is over-fitted and then detected), shapes stay static,
it serialises, it builds from a config, and ResNet-50 at 800x1333 trains a step on CPU."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import make_roi_heads
from fpn_tf.configs.experiment import AnchorConfig, ExperimentConfig, RPNConfig
from fpn_tf.modeling.backbones import build_backbone
from fpn_tf.modeling.factory import build_model
from layer_test import run_layer_test
from fpn_tf.modeling.faster_rcnn import LOSS_NAMES, FasterRCNN
from fpn_tf.modeling import image_io
from fpn_tf.modeling.fpn import build_fpn_model
from fpn_tf.modeling.rpn import RegionProposalNetwork
from fpn_tf.ops import box_ops

CATEGORY_IDS = [5, 9, 11]  # non-contiguous dataset ids of classes 1, 2, 3
COLORS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255)}
OBJECTS = [  # per image: (ymin, xmin, ymax, xmax, contiguous class)
    [(10, 10, 50, 60, 1), (70, 60, 110, 120, 2)],
    [(20, 70, 84, 110, 3), (80, 10, 100, 30, 1), (30, 20, 50, 40, 2)],
]


def fixed_batch(size=128):
    images = np.full((2, size, size, 3), 40, np.float32)
    boxes = np.zeros((2, 4, 4), np.float32)
    classes = -np.ones((2, 4), np.int32)
    for i, objects in enumerate(OBJECTS):
        for j, (y0, x0, y1, x1, c) in enumerate(objects):
            images[i, y0:y1, x0:x1] = COLORS[c]
            boxes[i, j] = (y0, x0, y1, x1)
            classes[i, j] = c
    info = np.array([[size, size], [size, size], [1, 1], [0, 0]], np.float32)
    features = {
        "images": images,
        "image_info": np.tile(info, (2, 1, 1)),
        "image_id": np.array([1, 2], np.int64),
    }
    labels = {"gt_boxes": boxes, "gt_classes": classes, "gt_is_crowd": np.zeros((2, 4), bool)}
    return features, labels


def tiny_rpn(levels=("P2", "P3", "P4", "P5", "P6"), sizes=(16, 32, 64, 128, 256), **overrides):
    """The paper's RPN settings (the config's defaults) with small top-k's, on P2..P6."""
    settings = {
        "pre_nms_top_k_train": 500,
        "post_nms_top_k_train": 200,
        "pre_nms_top_k_test": 300,
        "post_nms_top_k_test": 100,
        **overrides,
    }
    return RegionProposalNetwork(
        RPNConfig(**settings), AnchorConfig(sizes=list(sizes)), list(levels)
    )


def tiny_roi_heads(num_classes=3, mask=None, **overrides):
    settings = {"fc_dims": 128, "batch_size_per_image": 64, **overrides}
    return make_roi_heads(num_classes, mask=mask, **settings)


def tiny_fpn(size=128, num_channels=32, widths=(16, 32, 64, 64), stem_width=16):
    """A small_resnet pyramid trained from scratch (nothing frozen), on size x size images."""
    backbone = build_backbone(
        type="small_resnet", freeze_at=0, freeze_bn=False, widths=widths, stem_width=stem_width
    )
    return build_fpn_model(backbone, num_channels=num_channels, input_shape=(size, size, 3))


def tiny_model(size=128):
    return FasterRCNN(tiny_fpn(size), tiny_rpn(), tiny_roi_heads(), category_ids=CATEGORY_IDS)


@pytest.mark.slow
def test_overfits_a_fixed_batch_and_then_detects_its_boxes():
    keras.utils.set_random_seed(0)
    model = tiny_model()
    # Cosine decay to 0 over the 150 steps: the end of the run is settled, so the assertions do
    # not depend on where a constant-rate run happens to oscillate (any change to the graph --
    # op seeds, summation order -- moves that).
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=150)
    model.compile(optimizer=keras.optimizers.Adam(schedule))
    features, labels = fixed_batch()
    data = tf.data.Dataset.from_tensors((features, labels)).repeat()
    history = model.fit(data, steps_per_epoch=10, epochs=15, verbose=0).history
    total = np.array(history["total_loss"])
    for name in (
        "rpn_objectness_loss",
        "rpn_box_loss",
        "fast_rcnn_class_loss",
        "fast_rcnn_box_loss",
    ):
        assert np.isfinite(history[name]).all() and name in history
    # Falls steadily: no block of three epochs is more than 5 % above the one before (the last
    # blocks are flat once the batch is fitted), the second half is far below the first, and the
    # end is < 25 % of the start.
    blocks = total.reshape(5, 3).mean(axis=1)
    assert (blocks[1:] <= 1.05 * blocks[:-1]).all(), total
    assert blocks[-1] < 0.5 * blocks[1] < 0.5 * blocks[0], total
    assert total[-1] < 0.25 * total[0], total

    out = model.predict(features, verbose=0)
    for i, objects in enumerate(OBJECTS):
        n = int(out["num_detections"][i])
        boxes = out["detection_boxes"][i][:n]
        classes = out["detection_classes"][i][:n]
        scores = out["detection_scores"][i][:n]
        for y0, x0, y1, x1, c in objects:
            iou = box_ops.pairwise_iou(
                tf.constant([[y0, x0, y1, x1]], tf.float32), tf.constant(boxes, tf.float32)
            ).numpy()[0]
            hit = (iou > 0.5) & (classes == CATEGORY_IDS[c - 1]) & (scores > 0.5)
            assert hit.any(), (i, (y0, x0, y1, x1, c), boxes, classes, scores)


def test_outputs_and_training_tensors_have_static_shapes():
    model = tiny_model()
    features, labels = fixed_batch()
    spec = {
        "images": tf.TensorSpec([2, 128, 128, 3], tf.float32),
        "image_info": tf.TensorSpec([2, 4, 2], tf.float32),
    }
    concrete = tf.function(lambda x: model(x)).get_concrete_function(spec)
    shapes = {k: v.shape.as_list() for k, v in concrete.structured_outputs.items()}
    assert shapes["detection_boxes"] == [2, 100, 4]
    assert shapes["detection_scores"] == [2, 100]
    assert shapes["detection_classes"] == [2, 100]
    assert shapes["num_detections"] == [2]
    assert shapes["proposal_boxes"] == [2, 100, 4]
    label_spec = {
        "gt_boxes": tf.TensorSpec([2, 4, 4], tf.float32),
        "gt_classes": tf.TensorSpec([2, 4], tf.int32),
        "gt_is_crowd": tf.TensorSpec([2, 4], tf.bool),
    }
    losses = (
        tf.function(lambda f, l: model.compute_losses(f, l))
        .get_concrete_function(spec, label_spec)
        .structured_outputs
    )
    assert all(v.shape.as_list() == [] for v in losses.values())


@pytest.mark.slow
def test_train_step_compiles_with_xla():
    keras.utils.set_random_seed(1)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=True)
    features, labels = fixed_batch()
    history = model.fit(
        tf.data.Dataset.from_tensors((features, labels)).repeat(),
        steps_per_epoch=2,
        epochs=1,
        verbose=0,
    ).history
    assert np.isfinite(history["total_loss"][0])


def test_get_config_round_trip_gives_identical_detections():
    features, _ = fixed_batch()
    keep = ("proposal_boxes", "detection_classes")
    run_layer_test(
        FasterRCNN,
        layer=tiny_model(),
        input_data=features,
        call=lambda model, x: {k: v for k, v in model(x).items() if k in keep},
        atol=1e-4,
        check_config=False,  # the same model, its backbone and pyramid serialised once built
        check_checkpoint=False,  # test_checkpoint_tracking.py
    )
    model = tiny_model()
    assert FasterRCNN.from_config(model.get_config()).category_ids == CATEGORY_IDS


def test_boxes_map_back_to_the_original_image_with_image_info():
    model = tiny_model()
    features, _ = fixed_batch()
    scaled = dict(features)
    info = features["image_info"].copy()
    info[:, 0, :] = 64.0
    info[:, 2, :] = 2.0  # the model input is the original upscaled x2
    scaled["image_info"] = info
    a = model(features)
    b = model(scaled)
    np.testing.assert_allclose(b["detection_boxes"] * 2.0, a["detection_boxes"], atol=1e-3)


def test_rejects_inconsistent_arguments():
    fpn = build_fpn_model(
        build_backbone(type="small_resnet", widths=[8, 8, 8, 8], stem_width=8), num_channels=8
    )
    with pytest.raises(ValueError, match="anchor sizes for levels .'P7'. that the pyramid"):
        FasterRCNN(fpn, tiny_rpn(["P2", "P7"], [32, 64]), tiny_roi_heads(2))
    with pytest.raises(ValueError, match="model.anchor.sizes has 2 entries"):
        tiny_rpn(sizes=[32, 64])
    with pytest.raises(ValueError, match="model.anchor.sizes has 3 entries"):
        tiny_rpn(["P2", "P3"], [32, 64, 128])
    with pytest.raises(ValueError, match="category ids"):
        FasterRCNN(fpn, tiny_rpn(), tiny_roi_heads(2), category_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="no pyramid level in min_level..max_level"):
        FasterRCNN(fpn, tiny_rpn(), tiny_roi_heads(2, min_level=7, max_level=8, canonical_level=7))
    with pytest.raises(ValueError, match="without a mask branch"):
        FasterRCNN(fpn, tiny_rpn(), tiny_roi_heads(2, mask={}))


def test_builds_from_the_cpu_demo_config():
    from fpn_tf.configs.loader import load_config

    cfg = load_config("configs/cpu_demo.yaml")
    model = build_model(cfg.model, category_ids=[1, 3, 7, 9])
    assert model.num_classes == 4 and model.rpn.head.channels == 128
    assert model.rpn.anchor_sizes == {
        "P2": (16.0,),
        "P3": (32.0,),
        "P4": (64.0,),
        "P5": (128.0,),
        "P6": (256.0,),
    }
    assert model.roi_heads.box_head.fc_dims == 256
    assert model.roi_heads.sampler_config.batch_size_per_image == 128
    out = model(
        {
            "images": tf.zeros((1, 320, 480, 3)),
            "image_info": tf.constant([[[320, 480], [320, 480], [1, 1], [0, 0]]], tf.float32),
        }
    )
    assert out["detection_boxes"].shape == (1, 100, 4)


def test_every_setting_of_the_model_sections_reaches_its_layer():
    """Each field of model.rpn and of the RoI sections reaches its layer and is kept in its
    get_config (nms_impl included)."""
    cfg = ExperimentConfig.from_dict(
        {
            "model": {
                "backbone": {"type": "small_resnet"},
                "fpn": {"num_channels": 16},
                "anchor": {"offset": 0.0, "round_cell_anchors": True},
                "rpn": {
                    "nms_impl": "padded",
                    "nms_iou": 0.6,
                    "pre_nms_top_k_test": 77,
                    "nms_per_level": True,
                    "positive_iou_inclusive": True,
                },
                "roi_sampler": {"batch_size_per_image": 32, "foreground_iou": 0.6},
                "roi_aligner": {
                    "sampling_ratio": 0,
                    "align_impl": "gather",
                    "aligned": False,
                    "level_epsilon": 1e-6,
                },
                "box_head": {"classifier_layout": "dataset_ids", "smooth_l1_beta": 0.5},
                "detection": {"nms_impl": "combined", "max_detections": 33, "min_box_size": 0.01},
            }
        }
    )
    model = build_model(cfg.model, category_ids=[3, 7])
    rpn_config, roi_config = model.rpn.get_config(), model.roi_heads.get_config()
    assert rpn_config["anchor_config"] == cfg.model.anchor.to_dict()
    assert rpn_config["anchor_config"]["offset"] == 0.0
    assert rpn_config["anchor_config"]["round_cell_anchors"] is True
    assert rpn_config["anchor_config"]["stride_from_padded_size"] is False
    # The dataset's ids place the classifier rows: background, 3, 7 (8 rows).
    assert roi_config["classifier_rows"] == [0, 3, 7]
    assert model.roi_heads.box_head.classifier.units == 8
    for name, value in cfg.model.rpn.to_dict().items():
        assert rpn_config["config"][name] == value, name
    for name in ("roi_sampler", "roi_aligner", "box_head", "detection"):
        assert roi_config[name] == getattr(cfg.model, name).to_dict(), name
    assert roi_config["mask_roi_aligner"] is None and roi_config["mask_head"] is None
    mask_cfg = cfg.model.override(
        {
            "architecture": "mask_rcnn",
            "mask_roi_aligner.canonical_level": 3,
            "mask_head.num_convs": 1,
        }
    )
    mask_config = build_model(mask_cfg, category_ids=[3, 7]).roi_heads.get_config()
    for name in ("roi_sampler", "roi_aligner", "box_head", "detection", "mask_roi_aligner"):
        assert mask_config[name] == getattr(mask_cfg, name).to_dict(), name
    assert mask_config["mask_head"] == mask_cfg.mask_head.to_dict()
    assert model.rpn.nms_impl == "padded" and model.roi_heads.nms_impl == "combined"
    out = model(tf.zeros((1, 64, 96, 3)))  # adaptive RoIAlign runs end to end
    assert out["detection_boxes"].shape == (1, 33, 4)


@pytest.mark.slow
def test_resnet50_fpn_at_800x1333_runs_one_training_step_on_cpu():
    cfg = ExperimentConfig()
    model = build_model(cfg.model, category_ids=list(range(1, 81)), input_shape=(800, 1344, 3))
    model.compile(optimizer=keras.optimizers.SGD(0.001, momentum=0.9))
    rng = np.random.default_rng(0)
    features = {
        "images": rng.uniform(0, 255, (1, 800, 1344, 3)).astype(np.float32),
        "image_info": np.array([[[480, 800], [800, 1333], [800 / 480] * 2, [0, 0]]], np.float32),
    }
    labels = {
        "gt_boxes": np.array(
            [[[100, 200, 400, 600], [500, 700, 560, 780]] + [[0] * 4] * 8], np.float32
        ),
        "gt_classes": np.array([[3, 17] + [-1] * 8], np.int32),
        "gt_is_crowd": np.zeros((1, 10), bool),
    }
    before = model.roi_heads.box_head.classifier.kernel.numpy().copy()
    logs = model.train_on_batch(features, labels, return_dict=True)
    assert set(logs) >= {
        "rpn_objectness_loss",
        "rpn_box_loss",
        "fast_rcnn_class_loss",
        "fast_rcnn_box_loss",
        "total_loss",
    }
    assert all(np.isfinite(v) for v in logs.values())
    assert not np.allclose(before, model.roi_heads.box_head.classifier.kernel.numpy())


def _pad_model():
    """A tiny detector with a BGR normalisation whose mean differs per channel (detectron2's
    R-50 convention) and pad_normalized_zero: its pad_value is that mean in RGB order."""
    cfg = ExperimentConfig.from_dict(
        {
            "model": {
                "backbone": {
                    "type": "small_resnet",
                    "weights": None,
                    "widths": [8, 16, 16, 16],
                    "stem_width": 8,
                    "channel_order": "bgr",
                    "pixel_mean": [103.53, 116.28, 123.675],
                    "pixel_std": [57.375, 57.12, 58.395],
                    "pad_normalized_zero": True,
                },
                "fpn": {"num_channels": 16},
                "anchor": {"sizes": [16, 32, 64, 128, 256]},
                "rpn": {"pre_nms_top_k_test": 200, "post_nms_top_k_test": 50},
                "box_head": {"fc_dims": 32},
                "roi_sampler": {"batch_size_per_image": 32},
                "detection": {"score_threshold": 0.0},
            }
        }
    ).validate()
    keras.utils.set_random_seed(0)
    return build_model(cfg.model, category_ids=CATEGORY_IDS)


def _padded_batch(fill):
    """Two 64x96 images whose valid regions are 40x70 and 64x50 (originals half the size, so
    image_info rows 0 and 1 differ), the rest ``fill`` (RGB)."""
    rng = np.random.default_rng(0)
    images = np.empty((2, 64, 96, 3), np.float32)
    images[:] = np.asarray(fill, np.float32)
    valid = [(40, 70), (64, 50)]
    for i, (h, w) in enumerate(valid):
        images[i, :h, :w] = rng.uniform(0, 255, (h, w, 3))
    info = np.array(
        [[[h / 2, w / 2], [h, w], [2, 2], [0, 0]] for h, w in valid], np.float32
    )  # original, resized, scale, offset
    return {"images": images, "image_info": info}, valid


def test_pad_value_makes_the_padding_zero_after_normalisation():
    model = _pad_model()
    mean_rgb = (123.675, 116.28, 103.53)
    assert model.pad_value == mean_rgb
    features, valid = _padded_batch(fill=0.0)
    images = features["images"]
    filled = image_io.prepare_inputs(features, model.pad_value)[0].numpy()
    backbone = next(l for l in model.fpn.layers if isinstance(l, keras.Model))
    norm = next(l for l in backbone.layers if l.name == "pixel_normalize")
    normalised = keras.Model(backbone.input, norm.output)(filled).numpy()  # what conv1 sees
    bgr_mean = np.array([103.53, 116.28, 123.675], np.float32)
    bgr_std = np.array([57.375, 57.12, 58.395], np.float32)
    for i, (h, w) in enumerate(valid):
        inside = np.zeros((64, 96), bool)
        inside[:h, :w] = True
        np.testing.assert_array_equal(normalised[i][~inside], 0.0)  # exactly zero
        np.testing.assert_array_equal(filled[i][inside], images[i][inside])
        np.testing.assert_allclose(
            normalised[i][inside],
            (images[i][inside][:, ::-1] - bgr_mean) / bgr_std,
            rtol=1e-5,
            atol=1e-5,
        )
    # Without image_info the whole image is valid: nothing changes.
    np.testing.assert_array_equal(image_io.prepare_inputs(images, model.pad_value)[0], images)
    # The kwarg travels with the model's config; a wrong length is refused.
    assert FasterRCNN.from_config(model.get_config()).pad_value == mean_rgb
    with pytest.raises(ValueError, match="pad_value"):
        FasterRCNN(
            model.fpn, model.rpn, model.roi_heads, category_ids=CATEGORY_IDS, pad_value=(1.0, 2.0)
        )


def test_pad_value_detections_and_losses_equal_mean_padded_inputs():
    """The detector with pad_value on a zero-padded batch == the same layers without it on the
    batch padded with the mean (i.e. zeros after normalisation), in call and compute_losses."""
    model = _pad_model()
    plain = FasterRCNN(model.fpn, model.rpn, model.roi_heads, category_ids=CATEGORY_IDS)
    assert plain.pad_value is None
    zero_padded, _ = _padded_batch(fill=0.0)
    mean_padded, _ = _padded_batch(fill=model.pad_value)
    out, ref = model(zero_padded), plain(mean_padded)
    assert int(np.sum(ref["num_detections"])) > 0
    for key in ("proposal_boxes", "proposal_scores", "detection_boxes", "detection_scores"):
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-4, err_msg=key)
    np.testing.assert_array_equal(out["detection_classes"], ref["detection_classes"])
    # The padding matters: the model without pad_value on the zero padding sees other pixels.
    other = plain(zero_padded)
    assert not np.allclose(other["proposal_scores"], ref["proposal_scores"], atol=1e-4)

    _, labels = fixed_batch(64)
    losses = {}
    for detector, features in ((model, zero_padded), (plain, mean_padded), (plain, zero_padded)):
        keras.utils.set_random_seed(1)  # the same anchor and RoI samples
        losses[len(losses)] = detector.compute_losses(features, labels, training=False)
    for name in LOSS_NAMES:
        np.testing.assert_allclose(losses[0][name], losses[1][name], rtol=1e-5, err_msg=name)
    assert not np.allclose(losses[2]["total_loss"], losses[1]["total_loss"], rtol=1e-5)
