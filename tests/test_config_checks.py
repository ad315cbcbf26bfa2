"""Value checks declared with the config fields: every one fires, naming its key, in one line."""

import pytest

from fpn_tf.configs import ConfigError, ExperimentConfig
from fpn_tf.configs.base import Check, field, in_range, length

# One value per declared check that fails that check (and passes the ones before it). DataConfig
# keys are listed once, without their section, and tried under train_data and eval_data.
_MODEL_TRAIN_EVAL_RUNTIME = [
    ("model.num_classes", -1),
    ("model.init_checkpoint", " "),
    ("model.backbone.weights", " "),
    ("model.backbone.freeze_at", -1),
    ("model.backbone.freeze_at", 6),
    ("model.backbone.widths", [32, 64, 128]),
    ("model.backbone.widths", [32, 64, 0, 256]),
    ("model.backbone.blocks", [1, 1, 1, 1, 1]),
    ("model.backbone.blocks", [1, -1, 1, 1]),
    ("model.backbone.stem_width", 0),
    ("model.backbone.bn_epsilon", -1e-5),
    ("model.backbone.pixel_mean", [123.675, 116.28]),
    ("model.backbone.pixel_std", [58.395, 57.12, 57.375, 1.0]),
    ("model.backbone.pixel_std", [58.395, 0.0, 57.375]),
    ("model.fpn.num_channels", 0),
    ("model.fpn.min_level", 1),
    ("model.fpn.min_level", 6),
    ("model.fpn.max_level", 7),
    ("model.fpn.levels_used", []),
    ("model.fpn.levels_used", ["P2", "P3", "P2"]),
    ("model.anchor.sizes", []),
    ("model.anchor.sizes", [32, 64, 0, 256, 512]),
    ("model.anchor.aspect_ratios", []),
    ("model.anchor.aspect_ratios", [0.5, -1.0, 2.0]),
    ("model.anchor.offset", 1.0),
    ("model.anchor.offset", -0.1),
    ("model.rpn.head_channels", 0),
    ("model.rpn.positive_iou", 1.5),
    ("model.rpn.negative_iou", -0.1),
    ("model.rpn.batch_size_per_image", 0),
    ("model.rpn.positive_fraction", 0),
    ("model.rpn.positive_fraction", 1.01),
    ("model.rpn.pre_nms_top_k_train", 0),
    ("model.rpn.post_nms_top_k_train", -5),
    ("model.rpn.pre_nms_top_k_test", 0),
    ("model.rpn.post_nms_top_k_test", 0),
    ("model.rpn.nms_iou", 1.5),
    ("model.rpn.min_box_size", -1),
    ("model.rpn.smooth_l1_beta", -0.5),
    ("model.rpn.loss_weight", -1),
    ("model.roi_sampler.batch_size_per_image", 0),
    ("model.roi_sampler.positive_fraction", 1.5),
    ("model.roi_sampler.foreground_iou", 2),
    ("model.roi_aligner.canonical_size", 0),
    ("model.roi_aligner.output_size", 0),
    ("model.roi_aligner.sampling_ratio", -1),
    ("model.box_head.num_fc", 0),
    ("model.box_head.fc_dims", 0),
    ("model.box_head.box_weights", [10.0, 10.0, 5.0]),
    ("model.box_head.box_weights", [10.0, 10.0, 5.0, 0.0]),
    ("model.box_head.smooth_l1_beta", -1),
    ("model.box_head.loss_weight", -0.1),
    ("model.roi_aligner.level_epsilon", -1e-6),
    ("model.detection.score_threshold", -0.1),
    ("model.detection.nms_iou", 1.01),
    ("model.detection.max_detections", 0),
    ("model.detection.min_box_size", -0.01),
    ("model.mask_roi_aligner.output_size", 0),
    ("model.mask_roi_aligner.sampling_ratio", -1),
    ("model.mask_roi_aligner.canonical_size", 0),
    ("model.mask_roi_aligner.level_epsilon", -1e-6),
    ("model.mask_head.num_convs", -1),
    ("model.mask_head.conv_dims", 0),
    ("model.mask_head.loss_weight", -1.0),
    ("model.segment_proposals.hidden_dims", 0),
    ("model.segment_proposals.mask_size", 0),
    ("model.segment_proposals.window_sizes", []),
    ("model.segment_proposals.window_sizes", [5, 5]),
    ("model.segment_proposals.window_sizes", [5, 0]),
    ("model.segment_proposals.object_sizes", []),
    ("model.segment_proposals.object_sizes", [32.0, 0.0]),
    ("model.segment_proposals.mask_box_scale", 0),
    ("model.segment_proposals.center_tolerance", 0),
    ("model.segment_proposals.crowd_ioa_threshold", 1.5),
    ("model.segment_proposals.batch_size_per_image", 0),
    ("model.segment_proposals.positive_fraction", 0.0),
    ("model.segment_proposals.pre_nms_top_k", 0),
    ("model.segment_proposals.post_nms_top_k", 0),
    ("model.segment_proposals.nms_iou", 0),
    ("model.segment_proposals.nms_iou", 1.5),
    ("model.segment_proposals.objectness_loss_weight", -1.0),
    ("model.segment_proposals.mask_loss_weight", -1.0),
    ("train.total_steps", 0),
    ("train.learning_rate", -0.1),
    ("train.reference_batch_size", 0),
    ("train.momentum", 1.0),
    ("train.momentum", -0.1),
    ("train.weight_decay", -1e-4),
    ("train.warmup_steps", -1),
    ("train.warmup_factor", 1.5),
    ("train.decay_steps", [0, 60000]),
    ("train.decay_steps", [60000, 60000]),
    ("train.decay_factor", 0),
    ("train.decay_factor", 1.5),
    ("train.gradient_clip_norm", 0),
    ("train.checkpoint_every_steps", 0),
    ("train.max_checkpoints_to_keep", 0),
    ("train.log_every_steps", 0),
    ("train.summary_every_steps", 0),
    ("eval.steps", 0),
    ("eval.every_steps", 0),
    ("eval.summary_images", -1),
    ("eval.summary_score_threshold", 1.5),
    ("runtime.devices", []),
    ("runtime.num_logical_cpu_devices", -1),
]
_DATA = [
    ("resize.short_side", 0),
    ("resize.pad_multiple", 0),
    ("global_batch_size", 0),
    ("shuffle_buffer_size", -1),
    ("max_num_instances", 0),
    ("mask_crop_size", 0),
    ("synthetic.num_images", 0),
    ("synthetic.image_size", [15, 512]),
    ("synthetic.image_size", [512, 320]),
    ("synthetic.image_size", [320]),
    ("synthetic.max_objects", 0),
]
BAD = _MODEL_TRAIN_EVAL_RUNTIME + [
    (f"{section}.{key}", value) for section in ("train_data", "eval_data") for key, value in _DATA
]

# Values at the edge of what each check allows (and the null of Optional fields): accepted.
GOOD = [
    ("model.num_classes", 0),
    ("model.init_checkpoint", None),
    ("model.init_checkpoint", "models/coco_r50_fpn_torchvision"),
    ("model.backbone.weights", None),
    ("model.backbone.freeze_at", 0),
    ("model.backbone.freeze_at", 5),
    ("model.backbone.bn_epsilon", None),
    ("model.backbone.bn_epsilon", 1e-5),
    ("model.backbone.bn_epsilon", 0),  # frozen BatchNorm (the default): torchvision's COCO_V1
    ("model.backbone.pixel_mean", None),
    ("model.backbone.pixel_std", None),
    ("model.fpn.levels_used", None),
    ("model.fpn.levels_used", ["P2"]),
    ("model.anchor.offset", 0),
    ("model.anchor.offset", 0.999),
    ("model.rpn.head_channels", None),
    ("model.rpn.positive_iou", 1),
    ("model.rpn.negative_iou", 0),
    ("model.rpn.positive_fraction", 1),
    ("model.rpn.min_box_size", 0),
    ("model.rpn.smooth_l1_beta", 0),
    ("model.roi_aligner.sampling_ratio", 0),
    ("model.box_head.num_fc", 1),
    ("model.roi_aligner.level_epsilon", 0),
    ("model.detection.score_threshold", 0),
    ("model.detection.nms_iou", 1),
    ("model.detection.min_box_size", 0),
    ("model.mask_roi_aligner.sampling_ratio", 0),
    ("model.mask_head.num_convs", 0),
    ("model.mask_head.loss_weight", 0),
    ("train.momentum", 0),
    ("train.weight_decay", 0),
    ("train.warmup_steps", 0),
    ("train.warmup_factor", 0),
    ("train.warmup_factor", 1),
    ("train.decay_steps", []),
    ("train.decay_steps", [1]),
    ("train.decay_factor", 1),
    ("train.gradient_clip_norm", None),
    ("eval.steps", None),
    ("runtime.devices", None),
    ("runtime.num_logical_cpu_devices", 0),
    ("train_data.resize.pad_multiple", 1),
    ("train_data.shuffle_buffer_size", 0),
    ("train_data.shuffle_buffer_size", None),
    ("eval_data.synthetic.image_size", [16, 16]),
]


def _first_failing(key, value):
    """Index of the first declared check of `key` that rejects `value` (None: all accept it)."""
    checks = ExperimentConfig.declared_checks()[key]
    return next((i for i, check in enumerate(checks) if not check.test(value)), None)


@pytest.mark.parametrize("key, value", BAD, ids=[f"{k}={v!r}" for k, v in BAD])
def test_every_declared_check_fires_with_its_key(key, value):
    config = ExperimentConfig().override({key: value})  # types are fine: only the value is wrong
    with pytest.raises(ConfigError) as e:
        config.validate()
    coerced = config
    for part in key.split("."):
        coerced = getattr(coerced, part)
    message = str(e.value)
    assert e.value.key == key
    assert message.startswith(f"Config key '{key}' must be ") and message.endswith(
        f", got {coerced!r}."
    )
    assert "\n" not in message
    check = ExperimentConfig.declared_checks()[key][_first_failing(key, value)]
    assert check.requirement in message


def test_every_declared_check_has_a_failing_case():
    declared = {
        (key, i)
        for key, checks in ExperimentConfig.declared_checks().items()
        for i in range(len(checks))
    }
    covered = {(key, _first_failing(key, value)) for key, value in BAD}
    assert None not in {i for _, i in covered}, "a BAD value passes every check of its key"
    assert declared - covered == set(), "declared checks without a failing case in BAD"
    assert covered - declared == set()


@pytest.mark.parametrize("key, value", GOOD, ids=[f"{k}={v!r}" for k, v in GOOD])
def test_values_at_the_edges_pass(key, value):
    ExperimentConfig().override({key: value}).validate()


def test_declared_checks_name_every_leaf_with_a_rule():
    checks = ExperimentConfig.declared_checks()
    assert [c.requirement for c in checks["model.rpn.nms_iou"]] == ["in [0, 1]"]
    assert [c.requirement for c in checks["train.momentum"]] == ["in [0, 1)"]
    assert [c.requirement for c in checks["model.rpn.positive_fraction"]] == ["in (0, 1]"]
    assert "eval_data.global_batch_size" in checks and "train_data.synthetic.num_images" in checks
    assert "model.backbone.type" not in checks  # a Literal: its choices are checked with its type


def test_nullable_fields_say_or_null():
    with pytest.raises(ConfigError) as e:
        ExperimentConfig().override({"train.gradient_clip_norm": 0}).validate()
    assert (
        str(e.value) == "Config key 'train.gradient_clip_norm' must be positive or null, got 0.0."
    )
    with pytest.raises(ConfigError) as e:
        ExperimentConfig().override({"model.rpn.nms_iou": 1.5}).validate()
    assert str(e.value) == "Config key 'model.rpn.nms_iou' must be in [0, 1], got 1.5."


def test_bn_epsilon_zero_needs_frozen_batch_norm():
    """0 is torchvision's COCO_V1 epsilon (frozen BatchNorm); a BatchNorm that trains divides by
    its batch variance, so 0 is refused there, naming the key, in one line."""
    frozen = ExperimentConfig().override({"model.backbone.bn_epsilon": 0.0})
    frozen.validate()
    training = frozen.override({"model.backbone.freeze_bn": False})
    with pytest.raises(ConfigError) as e:
        training.validate()
    assert e.value.key == "model.backbone.bn_epsilon"
    assert str(e.value) == (
        "Config key 'model.backbone.bn_epsilon' must be positive when freeze_bn is false (a "
        "BatchNorm that trains divides by its batch variance, which can be 0); 0 is for frozen "
        "BatchNorm (torchvision's COCO_V1 weights), got 0.0."
    )
    frozen.override(
        {"model.backbone.freeze_bn": False, "model.backbone.bn_epsilon": 1e-5}
    ).validate()


def test_in_range_ends():
    closed, left_open, right_open, open_ = (in_range(0, 1, e) for e in ("[]", "(]", "[)", "()"))
    assert [closed.test(v) for v in (-0.01, 0, 1, 1.01)] == [False, True, True, False]
    assert [left_open.test(v) for v in (0, 0.5, 1)] == [False, True, True]
    assert [right_open.test(v) for v in (0, 0.5, 1)] == [True, True, False]
    assert [open_.test(v) for v in (0, 0.5, 1)] == [False, True, False]
    assert open_.requirement == "in (0, 1)"
    with pytest.raises(ValueError, match="ends"):
        in_range(0, 1, "[[")


def test_check_error_and_field_defaults():
    error = length(2).error("a.b", [1], nullable=True)
    assert isinstance(error, ConfigError) and error.key == "a.b"
    assert str(error) == "Config key 'a.b' must be a list of 2 entries or null, got [1]."
    # A requirement that already mentions null does not get "or null" twice.
    assert str(Check(bool, "null or a path").error("k", "", nullable=True)) == (
        "Config key 'k' must be null or a path, got ''."
    )
    # List defaults are copied per instance, not shared.
    a, b = ExperimentConfig(), ExperimentConfig()
    a.train.decay_steps.append(85000)
    assert b.train.decay_steps == [60000, 80000]
    assert field([1, 2]).default_factory() == [1, 2]
