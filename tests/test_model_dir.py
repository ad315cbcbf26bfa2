"""A model directory as the converter writes it (`fpn_tf.modeling.model_dir`): evaluated by
``python -m fpn_tf.train --mode=eval`` with its own config, categories and every weight, from
another working directory that nothing is written to; the converter's check of the switches
that change what the weights compute.

The directory holds a tiny Mask R-CNN written the converter's way (params.yaml,
category_map.json, a model-only ``ckpt-0`` and the SavedModel), with weights no fresh
initialisation gives, so a mask head that is not restored shows in the masks.
"""

import json
import os
import sys

import keras
import numpy as np
from pycocotools import mask as mask_utils
import pytest
import tensorflow as tf
import yaml

from conftest import TINY_OVERRIDES  # noqa: E402
from fpn_tf.configs import ConfigError, load_config
from fpn_tf.conversion.convert import check_reference_switches
from fpn_tf.data import synthetic
from fpn_tf.data.category_map import CategoryMap
from fpn_tf.modeling import model_dir
from fpn_tf.modeling.factory import build_model
from fpn_tf.ops import mask_ops
from fpn_tf.serving import export_saved_model
import watched

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = CategoryMap(synthetic.CATEGORIES)  # ids 1, 3, 7, 9


def _run(module, *flags, cwd):
    """``python -m module flags...`` in ``cwd`` with this checkout's fpn_tf."""
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
    )
    return watched.run([sys.executable, "-m", module, *flags], cwd=cwd, env=env)


def _one_line_error(ran) -> str:
    """The one ``error:`` line of a command that failed with exit 2, and no traceback."""
    assert ran.returncode == 2, ran.stderr[-2000:]
    error = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in ran.stderr, ran.stderr[-2000:]
    return error[0]


@pytest.fixture(scope="module")
def converted_mask_rcnn(tmp_path_factory):
    """(model directory, the held-out images' annotation file): a directory laid out as
    ``fpn_tf.convert_weights`` writes it; its config's training data does not exist."""
    root = tmp_path_factory.mktemp("converted")
    data = synthetic.generate_split(
        str(root / "data"), "val", 6, seed=3, image_size=(96, 160), first_image_id=100
    )
    overrides = {k: v for k, v in TINY_OVERRIDES.items() if not k.startswith("train.")}
    overrides.update(
        {
            "model.mask_head.num_convs": 1,
            "model.mask_head.conv_dims": 16,
            "model.detection.score_threshold": 0.2,
            "train_data.source": "coco",
            "train_data.annotation_file": str(root / "no_training_data.json"),
            "train_data.image_dir": str(root / "no_training_images"),
            "eval_data.source": "coco",
            "eval_data.annotation_file": os.path.abspath(data["annotation_file"]),
            "eval_data.image_dir": os.path.abspath(data["image_dir"]),
        }
    )
    cfg = load_config(os.path.join(REPO, "configs", "cpu_demo_mask.yaml"), overrides)
    keras.utils.set_random_seed(11)
    model = build_model(cfg.model, category_ids=list(CATEGORIES.dataset_ids))
    rng = np.random.default_rng(0)
    for v in model.weights:  # values no fresh initialisation gives
        value = v.numpy() * rng.uniform(0.8, 1.2, v.shape) + rng.normal(0, 0.02, v.shape)
        if "moving_variance" in v.path:
            value = np.abs(value) + 0.5
        v.assign(value.astype(np.float32))
    directory = str(root / "model")
    model_dir.write_model_dir(directory, cfg, CATEGORIES)
    model_dir.save_model_checkpoint(model, directory, 0)
    export_saved_model(
        model,
        os.path.join(directory, "saved_model"),
        CATEGORIES,
        cfg.eval_data.resize,
    )
    return directory, data["annotation_file"]


def _saved_model_detections(saved_model_dir, annotation_file):
    """{image id: [(category id, [x, y, w, h], score, binary mask)]} of the SavedModel."""
    served = tf.saved_model.load(saved_model_dir).signatures["image_bytes"]
    with open(annotation_file) as f:
        images = json.load(f)["images"]
    image_dir = os.path.join(os.path.dirname(os.path.dirname(annotation_file)), "val")
    out = {}
    for image in images:
        with open(os.path.join(image_dir, image["file_name"]), "rb") as f:
            result = served(image_bytes=tf.constant([f.read()]))
        h, w = image["height"], image["width"]
        n = int(result["num_detections"][0])
        boxes = result["detection_boxes"][0, :n].numpy() * [h, w, h, w]
        pasted = mask_ops.paste_masks(result["detection_masks"][0, :n], boxes, (h, w)).numpy()
        out[image["id"]] = [
            (
                int(result["detection_classes"][0, i]),
                [boxes[i, 1], boxes[i, 0], boxes[i, 3] - boxes[i, 1], boxes[i, 2] - boxes[i, 0]],
                float(result["detection_scores"][0, i]),
                pasted[i] >= 0.5,
            )
            for i in range(n)
        ]
    return out


def _iou_xywh(a, b):
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    return inter / max(a[2] * a[3] + b[2] * b[3] - inter, 1e-9)


@pytest.mark.slow
def test_eval_of_a_converted_mask_rcnn_uses_its_directory_and_every_weight(
    converted_mask_rcnn, tmp_path
):
    directory, annotation_file = converted_mask_rcnn
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = sorted(os.listdir(directory))
    ran = _run("fpn_tf.train", "--mode=eval", f"--model_dir={directory}", cwd=elsewhere)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "Traceback" not in ran.stderr
    assert os.listdir(elsewhere) == []  # nothing written outside the model directory
    assert sorted(os.listdir(directory)) == sorted(before + ["eval"])  # params.yaml untouched
    metrics = json.load(open(os.path.join(directory, "eval", "metrics.json")))
    assert "mask_AP" in metrics and metrics["num_images"] == 6

    # The evaluated detections and masks are the SavedModel's, one to one.
    with open(os.path.join(directory, "eval", "detections.json")) as f:
        evaluated = json.load(f)
    served = _saved_model_detections(os.path.join(directory, "saved_model"), annotation_file)
    num_served = sum(len(v) for v in served.values())
    assert num_served >= 20 and len(evaluated) == num_served
    matched, mask_ious = 0, []
    for image_id, detections in served.items():
        candidates = [d for d in evaluated if d["image_id"] == image_id]
        for category, box, score, mask in detections:
            best = max(
                (d for d in candidates if d["category_id"] == category),
                key=lambda d: _iou_xywh(d["bbox"], box),
                default=None,
            )
            if best is None or _iou_xywh(best["bbox"], box) < 0.99:
                continue
            if abs(best["score"] - score) > 1e-4:
                continue
            matched += 1
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            if mask.any() or mask_utils.area(best["segmentation"]):
                mask_ious.append(float(mask_utils.iou([best["segmentation"]], [rle], [0])[0, 0]))
    print(f"{matched} of {num_served} SavedModel detections matched; {len(mask_ious)} non-empty "
          f"masks, IoU min {min(mask_ious):.4f} median {np.median(mask_ious):.4f}")  # fmt: skip
    assert len(mask_ious) >= 0.5 * num_served  # masks that show a head that is not restored
    assert matched >= 0.99 * num_served
    assert np.median(mask_ious) > 0.99 and np.mean(np.array(mask_ious) > 0.95) >= 0.99


def test_eval_of_a_directory_without_a_checkpoint_is_one_line(tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    cfg = load_config(os.path.join(REPO, "configs", "cpu_demo.yaml"))
    model_dir.write_model_dir(str(directory), cfg, CATEGORIES)
    error = _one_line_error(
        _run("fpn_tf.train", "--mode=eval", f"--model_dir={directory}", cwd=tmp_path)
    )
    # The demo config's synthetic data is not generated by an evaluation: it says so instead.
    assert "an evaluation does not generate data" in error, error
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_a_model_directory_with_the_old_flat_resize_keys_reads_as_the_resize_section(tmp_path):
    """An older directory's params.yaml (eval_data.short_side, resize_rounding, ...) gives the
    export's eval_data.resize."""
    cfg = load_config(os.path.join(REPO, "configs", "cpu_demo.yaml")).to_dict()
    for split in ("train_data", "eval_data"):
        resize = cfg[split].pop("resize")
        cfg[split].update(short_side=resize["short_side"], max_long_side=resize["max_long_side"])
        cfg[split].update(resize_rounding="floor", resize_method="pil_bilinear")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg))
    resize = model_dir.read_config(str(tmp_path)).eval_data.resize
    assert (resize.short_side, resize.max_long_side, resize.pad_multiple) == (320, 512, 32)
    assert (resize.rounding, resize.method) == ("floor", "pil_bilinear")


# --- the converter refuses a config whose weight switches are not the source's -------------------
def test_the_reference_configs_pass_and_other_switches_are_named():
    for source in ("torchvision", "detectron2"):
        check_reference_switches(source, load_config(f"configs/coco_r50_fpn_{source}.yaml"))
    check_reference_switches(
        "torchvision", load_config("configs/coco_r50_fpn_mask_torchvision.yaml")
    )
    with pytest.raises(ConfigError) as e:
        check_reference_switches("torchvision", load_config("configs/coco_r50_fpn_mask_1x.yaml"))
    message = str(e.value)
    assert "\n" not in message and e.value.key == "--config_file"
    assert message.startswith("model.backbone.stride_in_1x1 is True but the weights were made ")
    assert "with False (torchvision's reference config coco_r50_fpn_torchvision.yaml)" in message
    # Each switch on its own is caught, e.g. RoIAlign's half-pixel shift and the anchors.
    tv = "configs/coco_r50_fpn_torchvision.yaml"
    for override, field in (
        ("model.roi_aligner.aligned=true", "model.roi_aligner.aligned"),
        ("model.anchor.offset=0.5", "model.anchor.offset"),
        ("model.backbone.pixel_std=[1.0,1.0,1.0]", "model.backbone.pixel_std"),
    ):
        with pytest.raises(ConfigError, match=f"^{field} is "):
            check_reference_switches("torchvision", load_config(tv, override))


def test_convert_weights_with_a_mismatched_config_is_one_line_and_writes_nothing(tmp_path):
    checkpoint = tmp_path / "model_final.pkl"
    checkpoint.write_bytes(b"not read: the config is checked first")
    output_dir = tmp_path / "out"
    error = _one_line_error(
        _run(
            "fpn_tf.convert_weights",
            "--source=detectron2",
            f"--checkpoint={checkpoint}",
            f"--output_dir={output_dir}",
            f"--config_file={os.path.join(REPO, 'configs', 'coco_r50_fpn_torchvision.yaml')}",
            cwd=tmp_path,
        )
    )
    assert "model.backbone.stride_in_1x1 is False but the weights were made with True" in error
    assert "detectron2's reference config" in error
    assert not output_dir.exists() and not (tmp_path / "out.partial").exists()
