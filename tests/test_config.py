"""Experiment configs: defaults, YAML files, params_override, errors, round trips."""

import glob
import json
import os

import pytest
import yaml

from fpn_tf.configs import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    FPNConfig,
    ResizeConfig,
    load_config,
    load_yaml,
    parse_params_override,
    save_config,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
R50 = os.path.join(REPO, "configs", "coco_r50_fpn_1x.yaml")
DEMO = os.path.join(REPO, "configs", "cpu_demo.yaml")


def test_there_are_config_files():
    names = {os.path.basename(f) for f in CONFIG_FILES}
    assert {"coco_r50_fpn_1x.yaml", "coco_r101_fpn_1x.yaml", "cpu_demo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_yaml_loads_and_validates(path):
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    config.validate()
    # And what a run writes back loads to the same config.
    assert ExperimentConfig.from_dict(yaml.safe_load(config.to_yaml())) == config


def test_defaults_are_the_papers_numbers():
    c = ExperimentConfig().validate()
    assert c.model.fpn.num_channels == 256
    assert (c.model.fpn.min_level, c.model.fpn.max_level) == (2, 6)
    assert c.model.anchor.sizes == [32, 64, 128, 256, 512]
    assert c.model.anchor.aspect_ratios == [0.5, 1, 2]
    assert (c.model.rpn.positive_iou, c.model.rpn.negative_iou) == (0.7, 0.3)
    assert (c.model.rpn.batch_size_per_image, c.model.rpn.positive_fraction) == (256, 0.5)
    assert (c.model.rpn.pre_nms_top_k_train, c.model.rpn.post_nms_top_k_test) == (2000, 1000)
    assert c.model.rpn.smooth_l1_beta == pytest.approx(1 / 9)
    sampler, aligner = c.model.roi_sampler, c.model.roi_aligner
    assert (sampler.batch_size_per_image, sampler.positive_fraction) == (512, 0.25)
    assert (aligner.canonical_size, aligner.canonical_level) == (224, 4)
    assert (aligner.min_level, aligner.max_level, aligner.output_size) == (2, 5, 7)
    assert c.model.box_head.fc_dims == 1024 and c.model.box_head.box_weights == [10, 10, 5, 5]
    assert c.model.detection.score_threshold == 0.05 and c.model.detection.max_detections == 100
    assert c.model.architecture == "faster_rcnn"  # Mask R-CNN (He et al. 2017) when "mask_rcnn"
    mask_aligner, mask = c.model.mask_roi_aligner, c.model.mask_head
    assert (mask_aligner.output_size, mask_aligner.sampling_ratio) == (14, 2)
    assert mask_aligner.to_dict() == dict(aligner.to_dict(), output_size=14)
    assert (mask.num_convs, mask.conv_dims) == (4, 256)
    assert not mask.class_agnostic and mask.loss_weight == 1.0
    data = c.train_data
    assert (data.resize.short_side, data.resize.max_long_side) == (800, 1333)
    assert (data.resize.pad_multiple, data.global_batch_size) == (32, 16)
    assert c.train_data.random_flip and not c.eval_data.random_flip
    train = c.train
    assert (train.optimizer, train.learning_rate) == ("sgd", 0.02)
    assert (train.momentum, train.weight_decay) == (0.9, 1e-4)
    assert (c.train.total_steps, c.train.decay_steps) == (90000, [60000, 80000])
    assert c.train.scaled_learning_rate(8) == pytest.approx(0.01)


def test_coco_yamls():
    r50 = load_config(R50, num_replicas=8)
    assert r50.model.backbone.type == "resnet50" and r50.model.backbone.weights == "imagenet"
    # "1e-4" in the YAML file.
    assert r50.train.weight_decay == 1e-4 and isinstance(r50.train.weight_decay, float)
    assert r50.train_data.annotation_file == "data/coco/annotations/instances_train2017.json"
    assert r50.eval_data.image_dir == "data/coco/val2017"
    assert r50.train.scaled_learning_rate(r50.train_data.global_batch_size) == pytest.approx(0.02)
    r101 = load_config(os.path.join(REPO, "configs", "coco_r101_fpn_1x.yaml"))
    assert r101.model.backbone.type == "resnet101"
    r101.model.backbone.type = "resnet50"
    assert r101 == r50  # only the backbone differs (the R-101 file builds on the R-50 one)


def test_cpu_demo_yaml():
    c = load_config(DEMO)
    assert c.model.backbone.type == "small_resnet" and c.model.fpn.num_channels == 128
    assert c.model.box_head.fc_dims == 256 and c.model.roi_sampler.batch_size_per_image == 128
    assert (c.model.rpn.post_nms_top_k_train, c.model.rpn.post_nms_top_k_test) == (1000, 500)
    data = c.train_data
    assert (data.resize.short_side, data.resize.max_long_side, data.global_batch_size) == (
        320,
        512,
        4,
    )
    assert c.train_data.source == "synthetic" and c.eval_data.source == "synthetic"
    assert (c.train.optimizer, c.train.learning_rate) == ("adamw", 1e-3)
    assert c.train.scaled_learning_rate(4) == 1e-3


# ---- overrides ------------------------------------------------------------------------------


def test_params_override_dotted_string_with_lists():
    c = load_config(
        R50,
        "train.learning_rate=0.01,model.fpn.num_channels=128,"
        "model.anchor.sizes=[16, 32, 64, 128, 256],"
        "model.fpn.levels_used=[P2],train.gradient_clip_norm=null,train_data.image_dir='a,b',"
        "train.weight_decay=5e-5",
    )
    assert c.train.learning_rate == 0.01 and c.model.fpn.num_channels == 128
    assert c.model.anchor.sizes == [16, 32, 64, 128, 256] and c.model.fpn.levels_used == ["P2"]
    assert c.train.gradient_clip_norm is None and c.train_data.image_dir == "a,b"
    assert c.train.weight_decay == 5e-5
    assert c.model.fpn.min_level == 2  # untouched siblings keep the file's values


def test_params_override_yaml_json_dict_and_list():
    yaml_text = "{train: {learning_rate: 0.005, decay_steps: [10, 20]}, model.rpn.nms_iou: 0.6}"
    c = load_config(R50, yaml_text)
    assert (c.train.learning_rate, c.train.decay_steps) == (0.005, [10, 20])
    assert c.model.rpn.nms_iou == 0.6
    c = load_config(R50, json.dumps({"train": {"total_steps": 7}, "eval.steps": 3}))
    assert (c.train.total_steps, c.eval.steps) == (7, 3)
    c = load_config(R50, {"model": {"fpn": {"num_channels": 64}}})
    assert c.model.fpn.num_channels == 64
    multi_line = "train:\n  total_steps: 11\n"
    c = load_config(R50, [multi_line, "train.total_steps=12,train.seed=3", {"train.seed": 4}])
    assert (c.train.total_steps, c.train.seed) == (12, 4)


def test_parse_params_override_merges_sections():
    assert parse_params_override(["a.b=1", "a.c=[1,2]", {"a": {"d": None}}]) == {
        "a": {"b": 1, "c": [1, 2], "d": None}
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_params_override("train.total_steps=1,oops")


def test_override_returns_new_config_and_int_widens_to_float():
    base = ExperimentConfig()
    c = base.override({"train.learning_rate": 1})
    assert c.train.learning_rate == 1.0 and isinstance(c.train.learning_rate, float)
    assert base.train.learning_rate == 0.02


# ---- errors ---------------------------------------------------------------------------------


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_unknown_key_names_key_and_nearest():
    with pytest.raises(ConfigError) as e:
        load_config(R50, "model.fpn.num_chanels=128")
    assert "model.fpn.num_chanels" in str(e.value) and "model.fpn.num_channels" in str(e.value)
    assert e.value.key == "model.fpn.num_chanels"
    # The right name in the wrong section.
    with pytest.raises(ConfigError, match=r"model\.learning_rate.*train\.learning_rate"):
        load_config(R50, "model.learning_rate=0.1")
    # A misspelt section: the full dotted key is named, and the corrected one suggested.
    with pytest.raises(ConfigError, match=r"modle\.fpn\.num_channels.*'model\.fpn\.num_channels'"):
        ExperimentConfig().override({"modle": {"fpn": {"num_channels": 1}}})


def test_unknown_key_in_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.learning_rat.*train\.learning_rate"):
        load_config(str(path))


def test_wrong_types():
    with pytest.raises(ConfigError) as e:
        load_config(R50, "train.total_steps=abc")
    message = str(e.value)
    assert "train.total_steps" in message and "int" in message and "'abc'" in message
    with pytest.raises(ConfigError, match=r"train\.total_steps.*int.*2\.5"):
        ExperimentConfig().override({"train": {"total_steps": 2.5}})
    with pytest.raises(ConfigError, match=r"model\.fpn\.use_top_down.*bool"):
        ExperimentConfig().override({"model.fpn.use_top_down": 1})
    with pytest.raises(ConfigError, match=r"train\.decay_steps\[1\].*int"):
        ExperimentConfig().override({"train.decay_steps": [1, "x"]})
    with pytest.raises(ConfigError, match=r"model\.anchor\.sizes.*list"):
        ExperimentConfig().override({"model.anchor.sizes": 32})
    with pytest.raises(ConfigError, match=r"'model\.fpn'.*mapping"):
        ExperimentConfig().override({"model.fpn": 3})
    with pytest.raises(
        ConfigError, match=r"model\.backbone\.type.*'resnet50'.*Did you mean 'resnet50'"
    ):
        ExperimentConfig().override({"model.backbone.type": "resnet5O"})
    with pytest.raises(ConfigError, match=r"runtime\.mixed_precision.*or null"):
        ExperimentConfig().override({"runtime.mixed_precision": "fp16"})
    with pytest.raises(ConfigError, match="num_channels"):
        FPNConfig(num_channels="256")


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.learning_rate=-0.1", "train.learning_rate"),
        ("train.learning_rate=0", "train.learning_rate"),
        ("model.fpn.min_level=5,model.fpn.max_level=4", "model.fpn.min_level"),
        ("model.rpn.positive_iou=1.5", "model.rpn.positive_iou"),
        ("model.rpn.negative_iou=-0.1", "model.rpn.negative_iou"),
        ("model.rpn.negative_iou=0.8", "model.rpn.negative_iou"),
        ("model.roi_sampler.foreground_iou=2", "model.roi_sampler.foreground_iou"),
        ("model.detection.nms_iou=1.01", "model.detection.nms_iou"),
        ("model.rpn.positive_fraction=0", "model.rpn.positive_fraction"),
        ("model.roi_sampler.positive_fraction=1.5", "model.roi_sampler.positive_fraction"),
        ("train_data.annotation_file=null", "train_data.annotation_file"),
        ("eval_data.source=tfrecord", "eval_data.file_pattern"),
        ("train_data.global_batch_size=0", "train_data.global_batch_size"),
        ("train.decay_steps=[80000,60000]", "train.decay_steps"),
        ("train.momentum=1.0", "train.momentum"),
        ("model.anchor.sizes=[32,64]", "model.anchor.sizes"),
        ("model.fpn.levels_used=[P7]", "model.fpn.levels_used[0]"),
        ("model.roi_aligner.max_level=7", "model.roi_aligner.max_level"),
        ("model.backbone.freeze_at=6", "model.backbone.freeze_at"),
        ("train_data.resize.max_long_side=100", "train_data.resize.max_long_side"),
        (
            "model.backbone.type=small_resnet,model.backbone.weights=imagenet",
            "model.backbone.weights",
        ),
        ("model.backbone.stride_in_1x1=false", "model.backbone.stride_in_1x1"),  # imagenet
        ("model.backbone.channel_order=rgb", "model.backbone.pixel_mean"),
        (
            "model.backbone.channel_order=bgr,model.backbone.pixel_mean=[103.53,116.28,123.675]",
            "model.backbone.pixel_std",
        ),
        (
            "model.backbone.pixel_mean=[1,2,3],model.backbone.pixel_std=[1,1,1]",
            "model.backbone.channel_order",
        ),
        ("runtime.strategy=one_device,runtime.devices=['/gpu:0','/gpu:1']", "runtime.devices"),
    ],
)
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(R50, override)
    assert e.value.key == key and key in str(e.value)


def test_torchvision_and_detectron2_backbone_settings():
    torchvision = load_config(
        R50,
        {
            "model.backbone": {
                "weights": None,
                "stride_in_1x1": False,
                "bn_epsilon": 1e-5,
                "channel_order": "rgb",
                "pixel_mean": [123.675, 116.28, 103.53],
                "pixel_std": [58.395, 57.12, 57.375],
                "pad_normalized_zero": True,
            },
            "train_data.resize.rounding": "floor",
            "eval_data.resize.rounding": "floor",
        },
    )
    b = torchvision.model.backbone
    assert (b.stride_in_1x1, b.bn_epsilon, b.channel_order) == (False, 1e-5, "rgb")
    assert b.pixel_std == [58.395, 57.12, 57.375] and b.pad_normalized_zero
    assert torchvision.eval_data.resize.rounding == "floor"
    assert ExperimentConfig.from_dict(torchvision.to_dict()).to_dict() == torchvision.to_dict()
    detectron2 = load_config(
        R50,
        "model.backbone.bn_epsilon=1e-5,model.backbone.channel_order=bgr,"
        "model.backbone.pixel_mean=[103.53,116.28,123.675],model.backbone.pixel_std=[1,1,1]",
    )
    assert detectron2.model.backbone.stride_in_1x1  # with imagenet weights
    # The defaults are today's behaviour.
    defaults = ExperimentConfig()
    b = defaults.model.backbone
    assert (b.stride_in_1x1, b.bn_epsilon, b.channel_order, b.pixel_mean, b.pixel_std) == (
        True,
        None,
        None,
        None,
        None,
    )
    assert not b.pad_normalized_zero and defaults.train_data.resize.rounding == "round"
    with pytest.raises(ConfigError, match="model.backbone.channel_order"):
        load_config(R50, "model.backbone.channel_order=grb")
    with pytest.raises(ConfigError, match="eval_data.resize.rounding"):
        load_config(R50, "eval_data.resize.rounding=ceil")
    with pytest.raises(ConfigError) as e:
        load_config(R50, "model.backbone.channel_order=rgb")
    assert str(e.value) == (
        "Config key 'model.backbone.pixel_mean' must be set too when "
        "model.backbone.channel_order is: channel_order, pixel_mean and pixel_std are given "
        "together (all three, or none for the backbone's own)."
    )


def test_batch_must_divide_by_replicas():
    c = load_config(R50)
    c.validate(num_replicas=8)
    with pytest.raises(ConfigError, match=r"train_data\.global_batch_size.*16.*3") as e:
        c.validate(num_replicas=3)
    assert e.value.key == "train_data.global_batch_size"
    with pytest.raises(ConfigError, match=r"eval_data\.global_batch_size"):
        load_config(R50, "eval_data.global_batch_size=12", num_replicas=8)
    with pytest.raises(ConfigError, match="replicas"):
        load_config(R50, "runtime.devices=[a,b,c]", num_replicas=None)


def test_validate_rechecks_assignments():
    c = ExperimentConfig()
    c.train.learning_rate = "fast"
    with pytest.raises(ConfigError, match=r"train\.learning_rate.*float"):
        c.validate()


def test_check_files(tmp_path):
    c = load_config(R50)
    with pytest.raises(ConfigError, match=r"train_data\.annotation_file.*does not exist"):
        c.validate(check_files=True)
    synthetic = load_config(DEMO)
    synthetic.validate(check_files=True)


def test_source_paths_only_needed_for_their_source():
    c = load_config(R50, "train_data.source=tfrecord,train_data.file_pattern='x/train-*'")
    assert c.train_data.file_pattern == "x/train-*"
    DataConfig(source="synthetic").validate_section()


# ---- round trips ----------------------------------------------------------------------------


def test_to_dict_from_dict_round_trip():
    c = load_config(DEMO, "model.fpn.levels_used=[P2,P3],runtime.mixed_precision=mixed_bfloat16")
    d = c.to_dict()
    assert isinstance(d["model"]["fpn"], dict) and d["model"]["fpn"]["levels_used"] == ["P2", "P3"]
    assert ExperimentConfig.from_dict(d) == c
    assert ExperimentConfig.from_dict(json.loads(json.dumps(d))) == c
    assert ExperimentConfig.from_dict({}) == ExperimentConfig()


def test_save_config_then_load(tmp_path):
    c = load_config(R50, "train.total_steps=123,model.fpn.single_scale_level=C4")
    path = save_config(c, str(tmp_path / "model_dir"))
    assert os.path.basename(path) == "params.yaml"
    assert load_config(path) == c
    assert load_yaml(path)["train"]["total_steps"] == 123


def test_base_chain_and_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\ntrain: {total_steps: 1}\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text(f"_base_: {R50}\ntrain: {{total_steps: 1}}\n")
    c = load_config(str(tmp_path / "c.yaml"))
    assert c.train.total_steps == 1 and c.model.backbone.weights == "imagenet"


def test_runtime_dtype_policy():
    assert ExperimentConfig().runtime.dtype_policy() is None
    c = ExperimentConfig().override({"runtime.mixed_precision": "float16"})
    assert c.runtime.dtype_policy() == "mixed_float16"


def test_old_roi_and_mask_keys_load_as_the_new_sections(tmp_path, caplog):
    """A params.yaml written before model.roi / model.mask were split (an older model
    directory) loads: each key lands in its section now (the Eq. 1 / RoIAlign ones in both
    aligners, which shared them), with one warning; the same holds for params_override."""
    old = {
        "model": {
            "architecture": "mask_rcnn",
            "roi": {
                "batch_size_per_image": 64,
                "aligned": False,
                "level_epsilon": 1e-6,
                "canonical_size": 112,
                "output_size": 5,
                "fc_dims": 32,
                "classifier_layout": "dataset_ids",
                "loss_weight": 2.0,
            },
            "mask": {"output_size": 10, "num_convs": 1, "loss_weight": 3.0},
            "detection": {"score_threshold": 0.3},
        }
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(old))
    with caplog.at_level("WARNING"):
        m = load_config(str(path), "model.roi.num_fc=3,model.mask.conv_dims=8").model
    assert sum("old keys" in r.getMessage() for r in caplog.records) == 2  # the file, the override
    assert m.roi_sampler.batch_size_per_image == 64
    for aligner in (m.roi_aligner, m.mask_roi_aligner):
        assert (aligner.aligned, aligner.level_epsilon, aligner.canonical_size) == (
            False,
            1e-6,
            112,
        )
    assert (m.roi_aligner.output_size, m.mask_roi_aligner.output_size) == (5, 10)
    assert (m.box_head.fc_dims, m.box_head.num_fc, m.box_head.loss_weight) == (32, 3, 2.0)
    assert m.box_head.classifier_layout == "dataset_ids"
    assert (m.mask_head.num_convs, m.mask_head.conv_dims, m.mask_head.loss_weight) == (1, 8, 3.0)
    assert m.detection.score_threshold == 0.3
    with pytest.raises(ConfigError, match="model.roi.nope"):
        load_config(None, "model.roi.nope=1")


def test_old_flat_resize_keys_load_as_the_resize_sections(tmp_path, caplog):
    """A params.yaml written before the resize settings became train_data.resize /
    eval_data.resize (short_side, max_long_side, pad_multiple, resize_rounding -> rounding,
    resize_method -> method) loads, with one warning; so do params_override's old keys, over a
    file's new ones."""
    old = {
        split: {
            "source": "synthetic",
            "short_side": 96,
            "max_long_side": 128,
            "pad_multiple": 16,
            "resize_rounding": "floor",
            "resize_method": "pil_bilinear",
            "global_batch_size": 2,
        }
        for split in ("train_data", "eval_data")
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(old))
    with caplog.at_level("WARNING"):
        c = load_config(str(path))
    assert sum("old keys" in r.getMessage() for r in caplog.records) == 1
    assert "eval_data.resize.rounding" in caplog.text
    for data in (c.train_data, c.eval_data):
        assert data.resize == ResizeConfig(96, 128, 16, rounding="floor", method="pil_bilinear")
        assert data.global_batch_size == 2
    c = load_config(DEMO, "eval_data.short_side=64,eval_data.resize_rounding=half_up")
    assert (c.eval_data.resize.short_side, c.eval_data.resize.max_long_side) == (64, 512)
    assert c.eval_data.resize.rounding == "half_up" and c.train_data.resize.short_side == 320
    # In a file that starts from another (_base_), its old keys win over the base's new ones.
    (tmp_path / "child.yaml").write_text(f"_base_: {DEMO}\neval_data: {{short_side: 256}}\n")
    assert load_config(str(tmp_path / "child.yaml")).eval_data.resize.short_side == 256
    with pytest.raises(ConfigError, match="eval_data.resize.nope"):
        load_config(None, "eval_data.resize.nope=1")
