"""Fine-tuning from another model's directory: model.init_checkpoint(_modules), the trainer's
start from it, `fpn_tf.training.init_checkpoint.load_init_checkpoint`, configs/finetune_from_coco.yaml.

The source is a model directory as the trainer (and the weight converter) writes it: params.yaml,
category_map.json and CheckpointManager files of tf.train.Checkpoint(model=..., optimizer=...),
with weights that no fresh initialisation gives (perturbed) and an optimizer at step 9.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from conftest import TINY_OVERRIDES  # noqa: E402
from fpn_tf.configs import ConfigError, load_config, save_config
from fpn_tf.data.category_map import CategoryMap
from data_testing import write_coco_json, write_image
from fpn_tf.modeling import model_dir as model_dir_lib
from fpn_tf.modeling.factory import build_model
from fpn_tf.training.init_checkpoint import (
    DETECTOR_PARTS,
    MASK_PARTS,
    PARTS,
    InitCheckpointError,
    _key,
    load_init_checkpoint,
    model_parts,
)
from fpn_tf.training.trainer import CheckpointError, Trainer

SOURCE_CATEGORIES = [
    {"id": 1, "name": "red"},
    {"id": 2, "name": "green"},
    {"id": 3, "name": "blue"},
]
OTHER_CATEGORIES = [{"id": 1, "name": "red"}, {"id": 5, "name": "yellow"}]  # 2 classes
COLOURS = {
    1: (220, 40, 40),
    2: (40, 200, 40),
    3: (40, 40, 220),
    4: (200, 200, 200),
    5: (230, 220, 30),
}
NOT_CLASS_LAYERS = ("backbone", "pyramid", "rpn", "box head fc layers")
BOX_PARTS = tuple(p for p in DETECTOR_PARTS if p not in MASK_PARTS)  # a Faster R-CNN's parts


def write_rectangles(root, categories, num_images=6, seed=0):
    """A tiny COCO set: filled rectangles of one colour per category on a noisy background."""
    rng = np.random.default_rng(seed)
    ids = [c["id"] for c in categories]
    images, annotations = [], []
    for n in range(num_images):
        h, w = 96, 128
        pixels = rng.integers(60, 120, (h, w, 3)).astype(np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            cat = int(rng.choice(ids))
            bw, bh = (int(v) for v in rng.integers(16, 48, 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            pixels[y : y + bh, x : x + bw] = COLOURS[cat]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": n + 1,
                    "category_id": cat,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
        write_image(os.path.join(root, "images", f"{n}.png"), pixels)
        images.append({"id": n + 1, "file_name": f"{n}.png", "height": h, "width": w})
    ann = write_coco_json(os.path.join(root, "instances.json"), images, annotations, categories)
    return ann, os.path.join(root, "images")


def make_config(data_root, categories, **overrides):
    ann, image_dir = write_rectangles(data_root, categories)
    o = dict(TINY_OVERRIDES)
    for split in ("train_data", "eval_data"):
        o.update(
            {
                f"{split}.source": "coco",
                f"{split}.annotation_file": ann,
                f"{split}.image_dir": image_dir,
            }
        )
    o.update(overrides)
    return load_config("configs/cpu_demo.yaml", o)


def values(model):
    """part -> {pairing key: value} (the keys load_init_checkpoint pairs weights by)."""
    return {
        part: {_key(v.path): v.numpy().copy() for v in weights}
        for part, weights in model_parts(model).items()
    }


def assert_part_equal(a, b, part):
    assert a[part].keys() == b[part].keys() and a[part], part
    for k in a[part]:
        np.testing.assert_array_equal(a[part][k], b[part][k], err_msg=f"{part}: {k}")


def assert_part_differs(a, b, part):
    """Every weight of the part differs from the source's (a fresh init never equals it)."""
    for k, value in a[part].items():
        other = b[part].get(k)
        assert (
            other is None or other.shape != value.shape or not np.array_equal(value, other)
        ), f"{part}: {k} equals the source's"


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """A 3-class source model dir with two checkpoints (ckpt-7, then ckpt-9 = the latest)."""
    root = tmp_path_factory.mktemp("source")
    cfg = make_config(str(root / "data"), SOURCE_CATEGORIES)
    keras.utils.set_random_seed(123)
    model = build_model(cfg.model, category_ids=[1, 2, 3])
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)
    path = str(root / "model")
    save_config(cfg, path)
    CategoryMap(SOURCE_CATEGORIES).to_json(os.path.join(path, "category_map.json"))
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=optimizer), path, max_to_keep=3
    )
    rng = np.random.default_rng(0)
    snapshots = {}
    for step in (7, 9):
        for v in model.weights:  # values no fresh initialisation gives, of a sane model
            scale = rng.uniform(0.9, 1.1, v.shape)
            value = v.numpy() * scale + rng.normal(0, 1e-3, v.shape)
            if "moving_variance" in v.path:
                value = np.abs(value)
            v.assign(value.astype(np.float32))
        for v in optimizer.variables:
            v.assign(tf.ones_like(v) * step)  # step 9 and non-zero momentum: never taken
        manager.save(checkpoint_number=step)
        snapshots[step] = values(model)
    return path, snapshots


# --- (a) other classes: everything but the class layers --------------------------------------
def test_other_classes_take_every_weight_but_the_class_layers(source_dir, tmp_path):
    path, snapshots = source_dir
    source = snapshots[9]  # the latest checkpoint of the directory
    cfg = make_config(str(tmp_path / "data"), OTHER_CATEGORIES, **{"model.init_checkpoint": path})
    trainer = Trainer(cfg, str(tmp_path / "run"))
    got = values(trainer.model)
    for part in NOT_CLASS_LAYERS:
        assert_part_equal(got, source, part)
    head = trainer.model.roi_heads.box_head
    assert tuple(head.classifier.kernel.shape) == (32, 3)  # 2 classes + background
    assert tuple(head.box_regressor.kernel.shape) == (32, 8)
    assert_part_differs(got, source, "class layers")
    # ... and are the fresh initialisation a run without init_checkpoint gets (same seed).
    keras.utils.set_random_seed(cfg.train.seed)
    fresh = values(build_model(cfg.model, category_ids=[1, 5]))
    assert_part_equal(got, fresh, "class layers")

    # The model only: the run starts at step 0 with a fresh optimizer.
    assert trainer.restored_from is None and trainer.step == 0
    assert all(not np.any(v.numpy()) for v in trainer.optimizer.variables)
    report = trainer.init_report
    assert report.source.endswith("ckpt-9")
    assert set(report.loaded) == set(NOT_CLASS_LAYERS)
    assert report.loaded["backbone"] == len(source["backbone"])
    assert "category ids 1, 2, 3" in report.reinitialised["class layers"]
    assert "category ids 1, 5" in report.reinitialised["class layers"]
    lines = report.lines()
    assert len(lines) == len(BOX_PARTS) and all("\n" not in line for line in lines)
    assert lines[-1].startswith("Init checkpoint: class layers: re-initialised")


def test_same_number_of_classes_with_other_ids_keeps_fresh_class_layers(source_dir, tmp_path):
    path, snapshots = source_dir
    cfg = make_config(str(tmp_path / "data"), SOURCE_CATEGORIES)
    model = build_model(cfg.model, category_ids=[1, 2, 4])  # the shapes fit, the classes not
    report = load_init_checkpoint(model, path)
    got = values(model)
    for part in NOT_CLASS_LAYERS:
        assert_part_equal(got, snapshots[9], part)
    assert "class layers" in report.reinitialised
    assert_part_differs(got, snapshots[9], "class layers")


def test_a_mask_rcnn_from_a_faster_rcnn_keeps_its_fresh_mask_branch(source_dir, tmp_path):
    path, snapshots = source_dir
    cfg = make_config(
        str(tmp_path / "data"), SOURCE_CATEGORIES, **{"model.architecture": "mask_rcnn"}
    )
    model = build_model(cfg.model, category_ids=[1, 2, 3])
    fresh = values(model)
    report = load_init_checkpoint(model, path)
    got = values(model)
    for part in BOX_PARTS:
        assert_part_equal(got, snapshots[9], part)
    for part in MASK_PARTS:
        assert report.reinitialised[part] == "the source has no mask branch"
        assert_part_equal(got, fresh, part)
    assert len(report.lines()) == len(DETECTOR_PARTS)


# --- (b) the same classes: every weight ----------------------------------------------------
def test_same_classes_take_the_class_layers_too(source_dir, tmp_path):
    path, snapshots = source_dir
    prefix = os.path.join(path, "ckpt-7")  # a checkpoint prefix, not the latest
    cfg = make_config(
        str(tmp_path / "data"), SOURCE_CATEGORIES, **{"model.init_checkpoint": prefix}
    )
    trainer = Trainer(cfg, str(tmp_path / "run"))
    got = values(trainer.model)
    for part in BOX_PARTS:
        assert_part_equal(got, snapshots[7], part)
    assert trainer.init_report.reinitialised == {}
    assert trainer.init_report.source == prefix
    assert trainer.step == 0


# --- (c) backbone only ------------------------------------------------------------------
def test_backbone_module_takes_only_the_backbone_even_into_another_detector(source_dir, tmp_path):
    path, snapshots = source_dir
    source = snapshots[9]
    cfg = make_config(
        str(tmp_path / "data"),
        SOURCE_CATEGORIES,  # the same classes: "all" would take every part
        **{
            "model.init_checkpoint": path,
            "model.init_checkpoint_modules": "backbone",
            "model.fpn.num_channels": 24,  # another pyramid and head: not taken
            "model.box_head.fc_dims": 48,
        },
    )
    trainer = Trainer(cfg, str(tmp_path / "run"))
    got = values(trainer.model)
    assert_part_equal(got, source, "backbone")
    for part in ("pyramid", "rpn", "box head fc layers", "class layers"):
        assert_part_differs(got, source, part)
    report = trainer.init_report
    assert set(report.loaded) == {"backbone"}
    assert all("'backbone'" in why for why in report.reinitialised.values())


# --- (d) training from the loaded model -----------------------------------------------------
def _losses(model_dir):
    out = {}
    for path in tf.io.gfile.glob(os.path.join(model_dir, "train", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "losses/total_loss":
                    out[event.step] = float(tf.make_ndarray(value.tensor))
    return [out[k] for k in sorted(out)]


@pytest.mark.slow
def test_training_from_the_loaded_model_starts_at_step_0_and_the_loss_falls(source_dir, tmp_path):
    path, _ = source_dir
    cfg = make_config(
        str(tmp_path / "data"),
        SOURCE_CATEGORIES,
        **{
            "model.init_checkpoint": path,
            "train.total_steps": 12,
            "train.checkpoint_every_steps": 100,
        },
    )
    model_dir = str(tmp_path / "run")
    trainer = Trainer(cfg, model_dir)
    log = trainer.train()
    assert log["step"] == 12 and np.isfinite(log["total_loss"])
    losses = _losses(model_dir)
    assert len(losses) == 12, losses  # steps 1..12: the source's step (9) was not taken
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


# --- (e) a resume wins ----------------------------------------------------------------------
def test_a_resume_ignores_init_checkpoint(source_dir, tmp_path):
    path, snapshots = source_dir
    model_dir = str(tmp_path / "run")
    cfg = make_config(str(tmp_path / "data"), SOURCE_CATEGORIES)
    first = Trainer(cfg, model_dir)  # a run of its own, without init_checkpoint
    first.optimizer.iterations.assign(3)
    first.save()
    own = values(first.model)

    resumed = Trainer(cfg.override({"model.init_checkpoint": path}), model_dir)
    assert resumed.restored_from.endswith("ckpt-3") and resumed.step == 3
    assert resumed.init_report is None
    got = values(resumed.model)
    for part in BOX_PARTS:
        assert_part_equal(got, own, part)
        assert_part_differs(got, snapshots[9], part)


# --- (f) another architecture: one line, nothing written ------------------------------------
def test_an_architecture_mismatch_is_one_line_naming_the_layer_and_both_shapes(
    source_dir, tmp_path
):
    path, _ = source_dir
    cfg = make_config(
        str(tmp_path / "data"),
        SOURCE_CATEGORIES,
        **{"model.init_checkpoint": path, "model.fpn.num_channels": 24},
    )
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, str(tmp_path / "run"))
    message = str(e.value)
    assert isinstance(e.value, InitCheckpointError) and e.value.key == "model.init_checkpoint"
    assert "\n" not in message
    assert "ckpt-9" in message
    assert (
        "pyramid weight 'feature_pyramid/lateral_P2/kernel' has shape (1, 1, 8, 16) in the source "
        "and (1, 1, 8, 24) in this model" in message
    ), message
    assert "model.fpn" in message

    # Nothing was written, not even the parts that fit (the backbone).
    model = build_model(cfg.model, category_ids=[1, 2, 3])
    before = values(model)
    with pytest.raises(InitCheckpointError):
        load_init_checkpoint(model, path)
    after = values(model)
    for part in BOX_PARTS:
        assert_part_equal(after, before, part)


def test_another_backbone_is_named_with_its_layer(source_dir, tmp_path):
    path, _ = source_dir
    cfg = make_config(
        str(tmp_path / "data"), SOURCE_CATEGORIES, **{"model.backbone.blocks": [1, 2, 1, 1]}
    )
    model = build_model(cfg.model, category_ids=[1, 2, 3])
    with pytest.raises(
        InitCheckpointError,
        match=r"backbone: this model has \d+ weights the source has not \(first: 'conv3_block2",
    ):
        load_init_checkpoint(model, path, modules="backbone")


# --- (g) folded and unfolded frozen BatchNorm pair up --------------------------------------------
def test_a_folded_backbone_initialises_an_unfolded_one(tmp_path):
    cfg = make_config(str(tmp_path / "data"), SOURCE_CATEGORIES)
    folded_cfg = cfg.model.override({"backbone": {"freeze_bn": True, "fold_frozen_bn": True}})
    keras.utils.set_random_seed(5)
    folded = build_model(folded_cfg, category_ids=[1, 2, 3])
    for v in folded.weights:
        v.assign(v.numpy() + 0.05)
    target = build_model(cfg.model, category_ids=[1, 2, 3])  # BatchNorm layers of their own
    assert any("_bn/" in v.path for v in target.fpn.weights)
    assert not any("_bn/" in v.path for v in folded.fpn.weights)
    load_init_checkpoint(target, folded, modules="backbone")
    assert_part_equal(values(target), values(folded), "backbone")
    # The same outputs: the backbone computes what the folded one computes.
    images = tf.random.uniform([1, 64, 64, 3], 0, 255, seed=1)
    for level, value in folded.fpn.layers[1](images).items():
        np.testing.assert_allclose(target.fpn.layers[1](images)[level], value, rtol=1e-4, atol=1e-4)


# --- config: the fields, the check, the example YAML ----------------------------------------------
def test_a_missing_init_checkpoint_is_one_line_naming_the_key(tmp_path):
    cfg = make_config(
        str(tmp_path / "data"),
        SOURCE_CATEGORIES,
        **{"model.init_checkpoint": str(tmp_path / "models" / "nowhere")},
    )
    with pytest.raises(ConfigError) as e:
        cfg.validate(check_files=True)
    assert e.value.key == "model.init_checkpoint" and "\n" not in str(e.value)
    assert str(e.value).startswith("Config key 'model.init_checkpoint' points to ")
    with pytest.raises(ConfigError, match="model.init_checkpoint"):
        Trainer(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # before any work
    # A directory without a model in it: the loader says what is missing, in one line.
    (tmp_path / "empty").mkdir()
    model = build_model(cfg.model, category_ids=[1, 2, 3])
    with pytest.raises(InitCheckpointError, match=r"params\.yaml not found") as e:
        load_init_checkpoint(model, str(tmp_path / "empty"))
    assert "\n" not in str(e.value)


def test_the_finetune_example_sets_only_finetuning_keys_over_an_architecture_config():
    with open("configs/finetune_from_coco.yaml") as f:
        own = yaml.safe_load(f)
    assert set(own["model"]) == {"init_checkpoint", "init_checkpoint_modules", "num_classes"}
    architecture = load_config("configs/coco_r50_fpn_1x.yaml")  # stands in for the converted one
    cfg = load_config(["configs/coco_r50_fpn_1x.yaml", "configs/finetune_from_coco.yaml"])
    assert cfg.model.init_checkpoint == "models/coco_r50_fpn_torchvision"
    assert cfg.model.init_checkpoint_modules == "all" and cfg.model.num_classes == 0
    expected_model = architecture.model.override(
        {"init_checkpoint": cfg.model.init_checkpoint, "num_classes": 0}
    )
    assert cfg.model == expected_model  # the architecture is the other file's
    assert cfg.train_data.source == "coco"
    assert cfg.train_data.annotation_file == "data/my_dataset/annotations/instances_train.json"
    assert cfg.train.total_steps < architecture.train.total_steps
    assert json.loads(json.dumps(cfg.to_dict()))  # a plain, saveable config


# --- a model directory holding the model only (what fpn_tf.convert_weights writes) ----------
def write_converted(cfg, model_dir, seed):
    """A model directory as the converter writes it (params.yaml, category_map.json, a
    model-only ckpt-0) with weights no fresh initialisation gives; returns the model."""
    keras.utils.set_random_seed(seed)
    model = build_model(cfg.model, category_ids=[1, 2, 3])
    for v in model.weights:
        v.assign(v.numpy() + np.float32(0.01))
    model_dir_lib.write_model_dir(model_dir, cfg, CategoryMap(SOURCE_CATEGORIES))
    model_dir_lib.save_model_checkpoint(model, model_dir, 0)
    return model


def test_a_model_only_checkpoint_restores_the_model_and_starts_the_optimizer_at_zero(tmp_path):
    cfg = make_config(str(tmp_path / "data"), SOURCE_CATEGORIES)
    model_dir = str(tmp_path / "converted")
    model = write_converted(cfg, model_dir, seed=7)
    trainer = Trainer(cfg, model_dir)
    assert trainer.restored_from == os.path.join(model_dir, "ckpt-0")
    assert trainer.step == 0
    for got, want in zip(trainer.model.weights, model.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=got.path)


def test_a_model_only_mask_rcnn_checkpoint_restores_the_mask_head_too(tmp_path):
    """A converted Mask R-CNN's ckpt-0 holds the model alone: every part is restored, the mask
    head included (a restore that bound only fpn, rpn and roi_heads left it fresh)."""
    cfg = make_config(
        str(tmp_path / "data"), SOURCE_CATEGORIES, **{"model.architecture": "mask_rcnn"}
    )
    model_dir = str(tmp_path / "converted")
    # The seed the trainer builds its model with: a head left unrestored would not show otherwise.
    model = write_converted(cfg, model_dir, seed=cfg.train.seed)
    trainer = Trainer(cfg, model_dir)
    assert trainer.restored_from == os.path.join(model_dir, "ckpt-0")
    got, want = values(trainer.model), values(model)
    for part in PARTS:
        if want.get(part):
            assert_part_equal(got, want, part)


def test_a_checkpoint_missing_a_part_of_the_model_is_not_restored(tmp_path, caplog):
    """A Faster R-CNN's weights into a Mask R-CNN run directory: the mask head has no values
    there, which the restore says (the run cannot resume from that checkpoint)."""
    cfg = make_config(str(tmp_path / "data"), SOURCE_CATEGORIES)
    model_dir = str(tmp_path / "converted")
    write_converted(cfg, model_dir, seed=0)
    mask_cfg = cfg.override({"model": {"architecture": "mask_rcnn"}})
    with pytest.raises(CheckpointError, match="none of the checkpoints") as e:
        Trainer(mask_cfg, model_dir)
    assert "\n" not in str(e.value)
    assert "holds no weights for this model's mask_heads" in caplog.text


# --- the switches that change what the weights compute ----------------------------------------
def test_a_source_made_with_other_switches_is_refused_naming_the_field(source_dir, tmp_path):
    path, snapshots = source_dir
    # The anchors give the RPN's and box head's outputs their meaning: refused with "all" ...
    cfg = make_config(str(tmp_path / "data"), SOURCE_CATEGORIES, **{"model.anchor.offset": 0.0})
    model = build_model(cfg.model, category_ids=[1, 2, 3])
    before = values(model)
    with pytest.raises(InitCheckpointError) as e:
        load_init_checkpoint(model, path, config=cfg.model)
    message = str(e.value)
    assert "\n" not in message and e.value.key == "model.init_checkpoint"
    assert "model.anchor.offset is 0.0 but the weights were made with 0.5" in message, message
    assert f"{path}/params.yaml" in message
    for part in BOX_PARTS:
        assert_part_equal(values(model), before, part)  # nothing written
    # ... and irrelevant to a backbone alone.
    report = load_init_checkpoint(model, path, modules="backbone", config=cfg.model)
    assert_part_equal(values(model), snapshots[9], "backbone")
    assert set(report.loaded) == {"backbone"}
    # The backbone's own switches always count: the same kernels under another epsilon.
    cfg = make_config(
        str(tmp_path / "data"), SOURCE_CATEGORIES, **{"model.backbone.bn_epsilon": 1e-3}
    )
    model = build_model(cfg.model, category_ids=[1, 2, 3])
    with pytest.raises(InitCheckpointError, match="model.backbone.bn_epsilon is 0.001 but the "):
        load_init_checkpoint(model, path, modules="backbone", config=cfg.model)
    # Through the trainer too (it passes its model config).
    cfg = make_config(
        str(tmp_path / "data"),
        SOURCE_CATEGORIES,
        **{"model.init_checkpoint": path, "model.roi_aligner.aligned": False},
    )
    with pytest.raises(
        InitCheckpointError, match="model.roi_aligner.aligned is False but the weights"
    ):
        Trainer(cfg, str(tmp_path / "run"))


def test_a_segment_proposal_model_takes_the_backbone_and_pyramid_of_a_detector(
    source_dir, tmp_path
):
    path, snapshots = source_dir
    cfg = make_config(
        str(tmp_path / "data"),
        SOURCE_CATEGORIES,
        **{"model.architecture": "segment_proposals", "model.segment_proposals.hidden_dims": 8},
    )
    model = build_model(cfg.model)
    fresh = values(model)
    report = load_init_checkpoint(model, path, config=cfg.model)
    got = values(model)
    assert set(report.loaded) == {"backbone", "pyramid"}
    for part in ("backbone", "pyramid"):
        assert_part_equal(got, snapshots[9], part)
    assert_part_equal(got, fresh, "segment head")
    assert "has no segment head" in report.reinitialised["segment head"]
    # Through the trainer, which fine-tunes it from there.
    cfg = cfg.override({"model": {"init_checkpoint": path}})
    trainer = Trainer(cfg, str(tmp_path / "run"))
    assert set(trainer.init_report.loaded) == {"backbone", "pyramid"}
