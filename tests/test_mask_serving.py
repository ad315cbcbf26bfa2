"""The SavedModel of a Mask R-CNN (docs/serving.md): ``detection_masks`` [B, 100, 28, 28] in all
three signatures, readable and runnable by saved_model_cli, and the masks of a trained model lie on
the objects.

One tiny Mask R-CNN is trained through the trainer (so the masks go through the data path:
COCO RLE segmentations -> box-relative ``gt_masks`` -> targets) on two 96 x 128 images, each with
a disc and a right triangle, until it fits them (a few hundred steps of seconds), then exported once.
"""

import io
import os
import sys

import numpy as np
from PIL import Image, ImageDraw
import pytest
from pycocotools import mask as mask_utils
import tensorflow as tf

from conftest import TINY_OVERRIDES  # noqa: E402
from fpn_tf.configs import load_config
from data_testing import write_coco_json, write_image
from fpn_tf.ops import mask_ops
from fpn_tf.serving.detection import MASK_OUTPUT_KEY
from fpn_tf.training.trainer import Trainer
import watched

pytestmark = pytest.mark.slow  # trains a tiny Mask R-CNN for 250 steps

H, W = 96, 128
BIN = os.path.dirname(sys.executable)
SIGNATURES = {
    "serving_default": "images",
    "image_bytes": "image_bytes",
    "tf_example": "serialized_example",
}


def _objects(seed):
    """(pixels, [(category, mask)]): a red disc and a blue triangle on a grey noise background."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(90, 140, (H, W, 3)).astype(np.uint8)
    disc = Image.new("L", (W, H), 0)
    cx, cy = (30, 40) if seed == 0 else (95, 55)
    ImageDraw.Draw(disc).ellipse((cx - 22, cy - 22, cx + 22, cy + 22), fill=1)
    tri = Image.new("L", (W, H), 0)
    x0, y0 = (65, 20) if seed == 0 else (10, 15)
    # A right triangle: no mirror symmetry, so a flipped or transposed mask would not fit it.
    ImageDraw.Draw(tri).polygon([(x0, y0), (x0 + 50, y0 + 50), (x0, y0 + 50)], fill=1)
    masks = [(1, np.asarray(disc, np.uint8)), (2, np.asarray(tri, np.uint8))]
    for (category, mask), colour in zip(masks, ((220, 40, 40), (40, 60, 220))):
        pixels[mask > 0] = colour
    return pixels, masks


def _annotation(ann_id, image_id, category, mask):
    ys, xs = np.nonzero(mask)
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()
    x, y = int(xs.min()), int(ys.min())
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "bbox": [x, y, int(xs.max()) + 1 - x, int(ys.max()) + 1 - y],
        "area": int(mask.sum()),
        "iscrowd": 0,
        "segmentation": rle,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mask_serving")
    images, annotations, truth = [], [], {}
    for n in range(2):
        pixels, masks = _objects(n)
        write_image(str(root / "images" / f"{n}.png"), pixels)
        images.append({"id": n + 1, "file_name": f"{n}.png", "height": H, "width": W})
        for category, mask in masks:
            annotations.append(_annotation(len(annotations) + 1, n + 1, category, mask))
        truth[n] = (pixels, masks)
    categories = [{"id": 1, "name": "disc"}, {"id": 2, "name": "triangle"}]
    ann = write_coco_json(str(root / "instances.json"), images, annotations, categories)
    overrides = dict(TINY_OVERRIDES)
    for split in ("train_data", "eval_data"):
        overrides.update(
            {
                f"{split}.source": "coco",
                f"{split}.annotation_file": ann,
                f"{split}.image_dir": str(root / "images"),
                f"{split}.resize.short_side": H,
                f"{split}.resize.max_long_side": W,
            }
        )
    overrides.update(
        {
            "model.mask_head.num_convs": 2,
            "model.mask_head.conv_dims": 16,
            "model.anchor.sizes": [16, 32, 64, 128, 256],
            "model.roi_aligner.canonical_size": 112,
            "model.mask_roi_aligner.canonical_size": 112,
            "train_data.mask_crop_size": 28,
            "train_data.random_flip": False,
            "train.total_steps": 250,
            "train.warmup_steps": 10,
            "train.learning_rate": 3e-3,
            "train.checkpoint_every_steps": 250,
            "train.log_every_steps": 50,
            "train.summary_every_steps": 250,
        }
    )
    cfg = load_config("configs/cpu_demo_mask.yaml", overrides)
    trainer = Trainer(cfg, str(root / "run"))
    trainer.train()
    export_dir = trainer.export(str(root / "saved_model"))
    return export_dir, tf.saved_model.load(export_dir), truth


def _png(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _example(pixels):
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_png(pixels)])),
        "image/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"png"])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _run_all_signatures(loaded, pixels):
    return {
        "serving_default": loaded.signatures["serving_default"](images=tf.constant(pixels[None])),
        "image_bytes": loaded.signatures["image_bytes"](image_bytes=tf.constant([_png(pixels)])),
        "tf_example": loaded.signatures["tf_example"](
            serialized_example=tf.constant([_example(pixels)])
        ),
    }


def _pasted(out, index):
    """bool [N, H, W]: the served masks of image ``index`` pasted over the served boxes."""
    n = int(out["num_detections"][index])
    boxes = out["detection_boxes"][index, :n].numpy() * np.array([H, W, H, W], np.float32)
    masks = out[MASK_OUTPUT_KEY][index, :n].numpy()
    return mask_ops.paste_masks(masks, boxes, (H, W)).numpy() >= 0.5, n


def test_every_signature_serves_detection_masks(trained):
    _, loaded, truth = trained
    pixels, _ = truth[0]
    outs = _run_all_signatures(loaded, pixels)
    for name, out in outs.items():
        masks = out[MASK_OUTPUT_KEY].numpy()
        assert masks.shape == (1, 100, 28, 28) and masks.dtype == np.float32, name
        n = int(out["num_detections"][0])
        assert 0 < n < 100, name
        assert masks.min() >= 0.0 and masks.max() <= 1.0
        np.testing.assert_array_equal(masks[0, n:], 0.0)  # zeros beyond num_detections
        assert masks[0, :n].max() > 0.9 and masks[0, :n].min() < 0.1  # not a constant 0.5
    # PNG is lossless: the three inputs are the same pixels, so the same masks.
    for name in ("image_bytes", "tf_example"):
        np.testing.assert_allclose(
            outs[name][MASK_OUTPUT_KEY].numpy(),
            outs["serving_default"][MASK_OUTPUT_KEY].numpy(),
            atol=1e-5,
        )


def test_masks_of_the_trained_model_lie_on_the_objects(trained):
    _, loaded, truth = trained
    for index in (0, 1):
        pixels, objects = truth[index]
        out = loaded.signatures["serving_default"](images=tf.constant(pixels[None]))
        pasted, n = _pasted(out, 0)
        classes = out["detection_classes"][0, :n].numpy()
        scores = out["detection_scores"][0, :n].numpy()
        for category, mask in objects:
            # The best-scored detection of the object's class: its mask covers the object.
            rows = np.nonzero((classes == category) & (scores >= 0.5))[0]
            assert len(rows), (index, category, classes, scores)
            best = pasted[rows[0]]
            iou = (best & (mask > 0)).sum() / (best | (mask > 0)).sum()
            assert iou > 0.7, (index, category, iou)
            # ... and it is the object's shape, not its box: the disc's mask leaves the box
            # corners out, the triangle's the top-right half.
            ys, xs = np.nonzero(mask)
            box = np.zeros_like(best)
            box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
            assert (best & (mask > 0)).sum() / best.sum() > (mask > 0).sum() / box.sum()


def test_saved_model_cli_shows_and_runs_the_masks(trained, tmp_path):
    export_dir, _, truth = trained
    cli = os.path.join(BIN, "saved_model_cli")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    shown = watched.run(
        [cli, "show", "--dir", export_dir, "--all"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    for name in SIGNATURES:
        block = shown.stdout.split(f"signature_def['{name}']:")[1].split("signature_def[")[0]
        assert "outputs['detection_masks']" in block, name
    assert "shape: (-1, 100, 28, 28)" in shown.stdout
    np.save(tmp_path / "batch.npy", truth[0][0][None])
    ran = watched.run(
        [
            cli,
            "run",
            "--dir",
            export_dir,
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"images={tmp_path / 'batch.npy'}",
            "--outdir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    masks = np.load(tmp_path / "out" / "detection_masks.npy")
    num = np.load(tmp_path / "out" / "num_detections.npy")
    assert masks.shape == (1, 100, 28, 28) and num[0] > 0
