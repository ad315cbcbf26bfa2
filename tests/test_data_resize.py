"""The resize methods against the libraries they reproduce.

* ``resize.method="pil_bilinear"`` (detectron2's ``ResizeTransform``: ``PIL.Image.resize(...,
  Image.BILINEAR)`` on the uint8 image) equals Pillow bit for bit on a grid of sizes and scale
  factors, shrinking (anti-aliased) and enlarging, per axis; in the pipeline and in a saved
  serving graph too. Our own ``tf.image.resize`` bilinear is far from it when shrinking.
* ``resize.rounding="half_up"`` gives detectron2's ``ResizeShortestEdge`` sizes.
* ``resize.method="bilinear"`` equals torch's ``F.interpolate(bilinear, align_corners=False)``
  as torchvision's ``GeneralizedRCNNTransform`` calls it, on float images (torch in its own
  process, as in test_reference_torchvision.py).
"""

import importlib.util
import json
import os
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from fpn_tf.configs import ConfigError, ResizeConfig, load_config
from fpn_tf.data import transforms
from data_testing import resized_hw
from fpn_tf.data.pipeline import CocoSource, build_dataset, load_source
from data_testing import write_tiny_coco
from fpn_tf.serving import ImageTensorModule, export_saved_model, preprocess_images
from tests.test_export import CATEGORY_MAP, assert_contract, assert_same_detections, tiny_model
import watched

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (height, width) of the inputs: odd, square, 1:2, portrait, tall (Pillow 13 resamples its
# rows first when shrinking it).
SIZES = [(37, 53), (64, 64), (61, 120), (129, 75), (150, 41)]
# Scale factors per axis (y, x): shrink 0.3..0.9 (PIL's filter then spans 1/f pixels per side),
# enlarge 1.1..2.5, mixed, one axis unchanged, and a 0.1 shrink (21 taps).
FACTORS = [
    (0.3, 0.3),
    (0.45, 0.5),
    (0.63, 0.63),
    (0.75, 0.9),
    (0.9, 0.75),
    (1.1, 1.1),
    (1.37, 1.5),
    (2.0, 2.0),
    (2.5, 2.3),
    (0.5, 1.5),
    (2.5, 0.3),
    (1.0, 0.7),
    (0.1, 0.13),
]


def natural_image(h, w, seed):
    """A uint8 image with smooth regions, edges and noise (bicubic-upsampled random blocks plus
    +-30 noise), so neighbouring pixels differ as in photographs."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(blocks).resize((w, h), Image.BICUBIC), np.int32)
    return np.clip(smooth + rng.integers(-30, 31, smooth.shape), 0, 255).astype(np.uint8)


def pil_resize(image, size):
    """What detectron2's ResizeTransform.apply_image does with a uint8 [h, w, 3] image."""
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


_tf_pil_resize = tf.function(
    transforms.pil_bilinear_resize,
    input_signature=[tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([2], tf.int32)],
)


def _grid():
    for i, (h, w) in enumerate(SIZES):
        for fy, fx in FACTORS:
            size = (max(1, int(h * fy + 0.5)), max(1, int(w * fx + 0.5)))
            yield natural_image(h, w, seed=i), size


def test_pil_bilinear_equals_pillow_on_a_grid_of_sizes_and_factors():
    """Every pixel of every case equal (Pillow 13; measured 0 of 1.1 M values differ), where
    tf.image.resize bilinear (ours) is up to ~90 grey levels off when shrinking and up to 1 off
    (it is not rounded) when enlarging."""
    old_shrink, old_enlarge, cases = [], [], 0
    for image, size in _grid():
        want = pil_resize(image, size)
        got = _tf_pil_resize(image, tf.constant(size, tf.int32)).numpy()
        assert got.dtype == np.uint8 and got.shape == want.shape == (*size, 3)
        np.testing.assert_array_equal(got, want, err_msg=f"{image.shape} -> {size}")
        old = np.abs(tf.image.resize(image, size).numpy() - want).max()
        shrinking = size[0] < image.shape[0] and size[1] < image.shape[1]
        (old_shrink if shrinking else old_enlarge).append(old)
        cases += 1
    assert cases == len(SIZES) * len(FACTORS)
    # What the test would see of the old resize: far when shrinking, never exact.
    assert min(old_shrink) > 10, old_shrink
    assert min(old_enlarge) > 0.3, old_enlarge


def test_pil_bilinear_is_not_tf_antialias_rounded():
    """tf.image.resize(antialias=True) uses the same scaled triangle, but in float with no
    intermediate rounding: rounded to uint8 it is within 1 grey level of PIL and not equal."""
    image = natural_image(61, 120, seed=0)
    size = (27, 54)
    want = pil_resize(image, size).astype(np.int32)
    aa = tf.image.resize(image, size, antialias=True).numpy()
    rounded = np.floor(np.clip(aa, 0, 255) + 0.5).astype(np.int32)
    assert np.abs(rounded - want).max() == 1
    assert 0.02 < np.mean(rounded != want) < 0.5
    np.testing.assert_array_equal(_tf_pil_resize(image, size).numpy(), want)


def test_pil_bilinear_edge_cases():
    """Unchanged size is the identity (PIL returns a copy); 1x1 outputs; float input is taken
    as its rounded uint8 values; the method name is checked."""
    image = natural_image(37, 53, seed=1)
    np.testing.assert_array_equal(_tf_pil_resize(image, (37, 53)).numpy(), image)
    for size in ((1, 1), (1, 53), (37, 1), (200, 1)):
        np.testing.assert_array_equal(_tf_pil_resize(image, size).numpy(), pil_resize(image, size))
    as_float = transforms.pil_bilinear_resize(tf.constant(image, tf.float32) + 0.3, (20, 30))
    np.testing.assert_array_equal(as_float.numpy(), pil_resize(image, (20, 30)))
    with pytest.raises(ValueError, match="method must be 'bilinear' or 'pil_bilinear'"):
        transforms.resize_image(image, (20, 30), "bicubic")


def test_pil_bilinear_commutes_with_the_flip():
    """The pipeline flips before resizing, detectron2 after: the same pixels (PIL's own
    resize commutes with the flip exactly too)."""
    for image, size in list(_grid())[::3]:
        flipped_then_resized = _tf_pil_resize(image[:, ::-1].copy(), size).numpy()
        np.testing.assert_array_equal(flipped_then_resized, pil_resize(image, size)[:, ::-1])


# --- detectron2's sizes ---------------------------------------------------------------------


def detectron2_output_shape(h, w, short_edge_length, max_size):
    """ResizeShortestEdge.get_output_shape's arithmetic (detectron2 v0.1..main), in Python
    floats: the shorter side gets the length exactly, the longer one scaled; both scaled down
    if the longer (unrounded) exceeds max_size; int(x + 0.5)."""
    scale = short_edge_length / min(h, w)
    new_h, new_w = (short_edge_length, scale * w) if h < w else (scale * h, short_edge_length)
    if max(new_h, new_w) > max_size:
        cap = max_size / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return int(new_h + 0.5), int(new_w + 0.5)


@pytest.mark.parametrize(
    "hw,short_long,half_up,rounded",
    [
        ((480, 640), (800, 1333), (800, 1067), (800, 1067)),  # the common case: no difference
        ((19, 86), (800, 1333), (295, 1333), (294, 1333)),  # 294.5: half up vs half to even
        ((22, 800), (600, 1000), (27, 1000), (28, 1000)),  # 27.4999.. in float64, 27.5 in float32
        ((300, 1000), (800, 1333), (400, 1333), (400, 1333)),
        ((64, 64), (320, 512), (320, 320), (320, 320)),
    ],
)
def test_half_up_sizes_are_detectron2s(hw, short_long, half_up, rounded):
    assert detectron2_output_shape(*hw, *short_long) == half_up
    short, long = short_long
    half_up_rule = ResizeConfig(short_side=short, max_long_side=long, rounding="half_up")
    assert resized_hw(*hw, half_up_rule) == half_up
    round_rule = ResizeConfig(short_side=short, max_long_side=long, rounding="round")
    assert resized_hw(*hw, round_rule) == rounded


def test_half_up_matches_detectron2_arithmetic_on_a_grid():
    """Every (h, w) on a 16..1400 grid at the configs' and the reference tests' sizes."""
    sizes = [(h, w) for h in range(16, 1401, 3) for w in range(16, 1401, 29)]
    for short_side, long_side in ((800, 1333), (320, 512), (600, 1000), (32, 64)):
        rule = ResizeConfig(short_side=short_side, max_long_side=long_side, rounding="half_up")
        got = transforms.resized_size(tf.constant(sizes), rule)
        want = [detectron2_output_shape(h, w, short_side, long_side) for h, w in sizes]
        np.testing.assert_array_equal(got.numpy(), want)
        rule.rounding = "round"
        rounded = transforms.resized_size(tf.constant(sizes), rule)
        assert (rounded.numpy() != np.array(want)).any(axis=1).sum() > 0  # "round" is not it


# --- the pipeline, the configs and the serving graph ----------------------------------------


def test_preprocess_example_resizes_with_pil():
    """480x640 at 320/512 (a 2/3 shrink, the reference tests' sizes): PIL's pixels, boxes
    scaled, zero padding."""
    image = natural_image(480, 640, seed=2)
    example = {
        "image": tf.constant(image),
        "image_id": tf.constant(1, tf.int64),
        "gt_boxes": tf.constant([[48.0, 64.0, 144.0, 192.0]]),
        "gt_classes": tf.constant([1]),
        "gt_is_crowd": tf.constant([False]),
    }
    kwargs = dict(flip=False, padding_mode="orientation", max_num_instances=1)
    pil = ResizeConfig(short_side=320, max_long_side=512, rounding="half_up", method="pil_bilinear")
    features, labels = transforms.preprocess_example(example, pil, **kwargs)
    assert features["images"].dtype == tf.float32 and features["images"].shape == (320, 512, 3)
    np.testing.assert_array_equal(features["image_info"][1], [320, 427])
    np.testing.assert_array_equal(features["images"][:, :427], pil_resize(image, (320, 427)))
    assert np.all(features["images"][:, 427:].numpy() == 0)
    np.testing.assert_allclose(labels["gt_boxes"][0], [32, 64 * 427 / 640, 96, 192 * 427 / 640])
    ours = ResizeConfig(short_side=320, max_long_side=512)
    ours = transforms.preprocess_example(example, ours, **kwargs)[0]["images"][:, :427].numpy()
    assert np.abs(ours - pil_resize(image, (320, 427))).max() > 10


def test_pipeline_takes_resize_method_from_the_config(tmp_path):
    ann, image_dir = write_tiny_coco(tmp_path)
    source = load_source(CocoSource(ann, image_dir))
    config = load_config(
        os.path.join(REPO, "configs", "coco_r50_fpn_detectron2.yaml"),
        {
            "eval_data.annotation_file": ann,
            "eval_data.image_dir": image_dir,
            "eval_data.resize.short_side": 16,
            "eval_data.resize.max_long_side": 32,
            "eval_data.global_batch_size": 1,
        },
    )
    assert (config.eval_data.resize.method, config.eval_data.resize.rounding) == (
        "pil_bilinear",
        "half_up",
    )
    assert config.train_data.resize.method == "pil_bilinear"
    got = {}
    for features, _ in build_dataset(source, config.eval_data, training=False):
        got[int(features["image_id"][0])] = features
    for image_id, name in ((10, "a.png"), (13, "d.png")):  # the RGB ones: 24x32, 20x30
        image = np.asarray(Image.open(os.path.join(image_dir, name)).convert("RGB"))
        h, w = (int(v) for v in got[image_id]["image_info"][0, 1])
        assert (h, w) == detectron2_output_shape(*image.shape[:2], 16, 32)
        np.testing.assert_array_equal(got[image_id]["images"][0, :h, :w], pil_resize(image, (h, w)))
    config.eval_data.resize.method = "area"
    with pytest.raises(ValueError, match="resize.method"):
        build_dataset(source, config.eval_data, training=False)
    with pytest.raises(ConfigError, match="eval_data.resize.method"):
        load_config(
            os.path.join(REPO, "configs", "coco_r50_fpn_1x.yaml"), "eval_data.resize.method=area"
        )
    assert (
        load_config(os.path.join(REPO, "configs", "coco_r50_fpn_1x.yaml")).eval_data.resize.method
        == "bilinear"
    )


class _Preprocess(tf.Module):
    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.uint8),
            tf.TensorSpec([None, 2], tf.int32),
        ]
    )
    def __call__(self, images, sizes):
        resize = ResizeConfig(
            short_side=320, max_long_side=512, rounding="half_up", method="pil_bilinear"
        )
        return preprocess_images(images, sizes, resize)


def test_saved_serving_preprocessing_resizes_with_pil(tmp_path):
    """The serving preprocessing saved and loaded as a SavedModel: a padded batch of two
    images, each resized to detectron2's size with PIL's pixels."""
    tf.saved_model.save(_Preprocess(), str(tmp_path / "pre"))
    loaded = tf.saved_model.load(str(tmp_path / "pre"))
    a, b = natural_image(480, 640, seed=3), natural_image(333, 257, seed=4)
    batch = np.zeros((2, 480, 640, 3), np.uint8)
    batch[0], batch[1, :333, :257] = a, b
    images, info = loaded(tf.constant(batch), tf.constant([[480, 640], [333, 257]], tf.int32))
    assert images.shape == (2, 416, 448, 3)  # 320x427 and 415x320, to multiples of 32
    for i, image in enumerate((a, b)):
        h, w = detectron2_output_shape(*image.shape[:2], 320, 512)
        np.testing.assert_array_equal(info[i, 1], [h, w])
        np.testing.assert_array_equal(images[i, :h, :w], pil_resize(image, (h, w)))
        assert np.all(images[i, h:].numpy() == 0) and np.all(images[i, :, w:].numpy() == 0)


def test_export_saves_the_resize_method(tmp_path, monkeypatch):
    """eval_data.resize.method travels into the SavedModel (as test_export's floor test:
    serving_default traced, the save itself skipped): its detections are the Keras model's on
    images that Pillow resized, and serving_config.json names the method."""
    from fpn_tf.serving import export as export_lib

    saved = {}

    def save(root, export_dir, signatures):
        saved.update(root=root, signatures=signatures)
        with open(root.serving_config_file.asset_path.numpy().decode()) as f:
            saved["serving_config"] = json.load(f)

    monkeypatch.setattr(export_lib.tf.saved_model, "save", save)
    monkeypatch.setattr(export_lib, "_MODULES", (ImageTensorModule,))
    model = tiny_model()
    short, long, multiple = 64, 96, 32
    resize = ResizeConfig(short, long, multiple, rounding="half_up", method="pil_bilinear")
    export_saved_model(model, str(tmp_path / "pil"), CATEGORY_MAP, resize)
    assert saved["serving_config"]["resize"]["method"] == "pil_bilinear"
    assert saved["root"].serving_default.resize.method == "pil_bilinear"
    images = [natural_image(150, 200, seed=5), natural_image(150, 200, seed=6)]  # shrink to 64x85
    out = assert_contract(
        saved["signatures"]["serving_default"](images=tf.constant(np.stack(images))), 2
    )
    h, w = detectron2_output_shape(150, 200, short, long)
    batch = np.zeros((2, 64, 96, 3), np.float32)
    for i, image in enumerate(images):
        batch[i, :h, :w] = pil_resize(image, (h, w))
    info = np.array([[[150, 200], [h, w], [h / 150, w / 200], [0, 0]]] * 2, np.float32)
    ref = model({"images": tf.constant(batch), "image_info": tf.constant(info)}, training=False)
    scale = np.array([150, 200, 150, 200], np.float32)
    ref = {
        "detection_boxes": ref["detection_boxes"].numpy() / scale,
        "detection_scores": ref["detection_scores"].numpy(),
        "detection_classes": ref["detection_classes"].numpy().astype(np.float32),
        "num_detections": ref["num_detections"].numpy().astype(np.float32),
    }
    assert_same_detections(out, ref)
    resize.method = "nearest"  # past the construction's checks: the module's are the config's
    with pytest.raises(ValueError, match="resize.method"):
        ImageTensorModule(model, resize)


# --- torchvision ----------------------------------------------------------------------------

TORCH_SCRIPT = r"""
import sys
import numpy as np
import torch
import torch.nn.functional as F

data = dict(np.load(sys.argv[1]))
out = {}
for key, image in data.items():
    if not key.startswith("image_"):
        continue
    i = key.split("_")[1]
    scale = float(data["scale_" + i])
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    # GeneralizedRCNNTransform._resize_image_and_masks, eager mode
    y = F.interpolate(x, size=None, scale_factor=scale, mode="bilinear",
                      recompute_scale_factor=True, align_corners=False)[0]
    out["resized_" + i] = y.permute(1, 2, 0).numpy()
np.savez(sys.argv[2], **out)
"""


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_bilinear_equals_torch_interpolate_as_torchvision_calls_it(tmp_path):
    """torchvision resizes the normalised float image with F.interpolate(scale_factor=s,
    recompute_scale_factor=True, bilinear, align_corners=False): the output size is
    floor(size * s) ("floor" rounding) and the sampling positions (dst + 0.5) * in / out - 0.5,
    as tf.image.resize's half-pixel bilinear. Same float images (0..255 and normalised),
    shrinking and enlarging: max abs difference below 0.01 grey levels (measured 2.5e-3 on
    0..255, at 800x1066 where source coordinates reach 1000 and float32 rounds them to 6e-5
    pixels; no anti-aliasing on either side)."""
    cases = []
    for (h, w), (short, long) in [
        ((480, 640), (800, 1333)),
        ((300, 500), (320, 512)),
        ((512, 512), (320, 512)),
        ((333, 257), (320, 512)),
        ((150, 401), (320, 512)),
        ((61, 120), (20, 40)),
    ]:
        image = natural_image(h, w, seed=len(cases)).astype(np.float32)
        cases.append((image, min(short / min(h, w), long / max(h, w)), (short, long)))
        normalised = (image / 255.0 - 0.45) / 0.225  # torchvision resizes after normalising
        cases.append((normalised.astype(np.float32), cases[-1][1], (short, long)))
    arrays = {}
    for i, (image, scale, _) in enumerate(cases):
        arrays[f"image_{i}"], arrays[f"scale_{i}"] = image, np.float64(scale)
    np.savez(tmp_path / "in.npz", **arrays)
    done = watched.run(
        [sys.executable, "-c", TORCH_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    torch_out = np.load(tmp_path / "out.npz")
    for i, (image, _, (short, long)) in enumerate(cases):
        want = torch_out[f"resized_{i}"]
        floor = ResizeConfig(short_side=short, max_long_side=long, rounding="floor")
        size = resized_hw(*image.shape[:2], floor)
        assert want.shape[:2] == size
        got = transforms.resize_image(image, size, "bilinear").numpy()
        per_grey_level = 1.0 if i % 2 == 0 else 1.0 / (255.0 * 0.225)
        assert np.abs(got - want).max() / per_grey_level < 0.01, i
        if i % 2 == 0 and size[0] < image.shape[0]:  # PIL would differ a lot here
            assert np.abs(got - pil_resize(image.astype(np.uint8), size)).max() > 10
