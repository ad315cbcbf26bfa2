"""The SavedModel contract (docs/serving.md): the three signatures give the Keras model's detections
in normalised input-image coordinates with the dataset's ids, saved_model_cli reads and runs it,
bad inputs fail with messages that say what was expected, and `python -m fpn_tf.export`
rebuilds a trained model from its model_dir.

One tiny FPN Faster R-CNN (small_resnet, d=32, 64-96 px images) is exported once per module.
Untrained, its classifier gives every class ~0.2: its weights are scaled up so that scores spread
over (0, 1) (no near-ties for NMS to order differently), and with a 0.5 score threshold each
image gets some detections but fewer than 100, so the padding rows are exercised too.
"""

import dataclasses
import io
import json
import os
import sys

import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from fpn_tf.configs import ExperimentConfig, ResizeConfig, save_config
from fpn_tf.data import synthetic, transforms
from fpn_tf.data.category_map import CategoryMap
from data_testing import pattern
from fpn_tf.modeling.factory import build_model
from fpn_tf.modeling.model_dir import ModelDirError, load_model
import fpn_tf
from fpn_tf.serving import (
    ExportError,
    ImageTensorModule,
    export_saved_model,
    preprocess_images,
    read_category_map,
)
import watched
from data_testing import resized_hw

SHORT, LONG, MULTIPLE = 64, 96, 32
RESIZE = ResizeConfig(SHORT, LONG, MULTIPLE)
CATEGORY_MAP = CategoryMap(synthetic.CATEGORIES)  # ids 1, 3, 7, 9
BIN = os.path.dirname(sys.executable)
CONFIG = {
    "model": {
        "backbone": {
            "type": "small_resnet",
            "weights": None,
            "freeze_at": 0,
            "freeze_bn": False,
            "widths": [16, 32, 64, 64],
            "stem_width": 16,
        },
        "fpn": {"num_channels": 32},
        "anchor": {"sizes": [16, 32, 64, 128, 256]},
        "rpn": {"pre_nms_top_k_test": 300, "post_nms_top_k_test": 100},
        "box_head": {"fc_dims": 128},
        "roi_aligner": {"canonical_size": 112},
        "mask_roi_aligner": {"canonical_size": 112},
        "detection": {"score_threshold": 0.5},
    },
    "eval_data": {"resize": {"short_side": SHORT, "max_long_side": LONG, "pad_multiple": MULTIPLE}},
}


def tiny_config():
    return ExperimentConfig.from_dict(CONFIG)


def tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = build_model(tiny_config().model, category_ids=list(CATEGORY_MAP.dataset_ids))
    classifier = model.roi_heads.box_head.classifier
    classifier.kernel.assign(classifier.kernel * 30.0)
    return model


@pytest.fixture(scope="module")
def exported(tiny_export):
    model, export_dir = tiny_export  # conftest.py: shared with test_predict.py
    return model, export_dir, tf.saved_model.load(export_dir)


def resize(**fields):
    """RESIZE with ``fields`` changed."""
    return dataclasses.replace(RESIZE, **fields)


def common_padded_size(images, rounding="round"):
    sizes = [resized_hw(im.shape[0], im.shape[1], resize(rounding=rounding)) for im in images]
    return (
        transforms.ceil_to_multiple(max(s[0] for s in sizes), MULTIPLE),
        transforms.ceil_to_multiple(max(s[1] for s in sizes), MULTIPLE),
    )


def keras_reference(model, images, padded_size=None, rounding="round"):
    """The Keras model on uint8 images [h, w, 3] resized by the eval rule and padded together
    (to ``padded_size``, default: the largest resized size rounded up to MULTIPLE); boxes divided
    by each image's size. Independent of fpn_tf.serving: the numpy resize rule of transforms."""
    padded_size = padded_size or common_padded_size(images, rounding)
    batch, infos = [], []
    for im in images:
        x, info, _ = transforms.resize_and_pad(
            tf.constant(im),
            tf.zeros([0, 4]),
            resize(rounding=rounding),
            tf.constant(padded_size, tf.int32),
        )
        batch.append(x)
        infos.append(info)
    out = model({"images": tf.stack(batch), "image_info": tf.stack(infos)}, training=False)
    hw = np.array([[im.shape[0], im.shape[1]] * 2 for im in images], np.float32)
    return {
        "detection_boxes": out["detection_boxes"].numpy() / hw[:, None, :],
        "detection_scores": out["detection_scores"].numpy(),
        "detection_classes": out["detection_classes"].numpy().astype(np.float32),
        "num_detections": out["num_detections"].numpy().astype(np.float32),
    }


def assert_contract(out, batch):
    """Shapes, dtypes, value ranges and zero padding of one signature's outputs."""
    out = {k: v.numpy() if hasattr(v, "numpy") else v for k, v in out.items()}
    assert sorted(out) == [
        "detection_boxes",
        "detection_classes",
        "detection_scores",
        "num_detections",
    ]
    assert out["detection_boxes"].shape == (batch, 100, 4)
    assert out["detection_scores"].shape == (batch, 100)
    assert out["detection_classes"].shape == (batch, 100)
    assert out["num_detections"].shape == (batch,)
    for v in out.values():
        assert v.dtype == np.float32
    for i in range(batch):
        n = int(out["num_detections"][i])
        assert out["num_detections"][i] == n
        assert (out["detection_boxes"][i, n:] == 0).all()
        assert (out["detection_scores"][i, n:] == 0).all()
        assert (out["detection_classes"][i, n:] == 0).all()
        boxes = out["detection_boxes"][i, :n]
        assert ((boxes >= 0) & (boxes <= 1)).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert set(out["detection_classes"][i, :n].astype(int)) <= set(CATEGORY_MAP.dataset_ids)
        assert (np.diff(out["detection_scores"][i, :n]) <= 0).all()
    return out


def assert_same_detections(out, ref):
    out = {k: np.asarray(v) for k, v in out.items()}
    np.testing.assert_array_equal(out["num_detections"], ref["num_detections"])
    assert (out["num_detections"] > 0).all(), "no detections: the comparison would be empty"
    for i, n in enumerate(out["num_detections"].astype(int)):
        np.testing.assert_array_equal(
            out["detection_classes"][i, :n], ref["detection_classes"][i, :n]
        )
        np.testing.assert_allclose(
            out["detection_scores"][i, :n], ref["detection_scores"][i, :n], atol=1e-5
        )
        np.testing.assert_allclose(
            out["detection_boxes"][i, :n], ref["detection_boxes"][i, :n], atol=1e-5
        )


def encode(pixels, fmt):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# --- the resize rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "h,w,short,long",
    [
        (480, 640, 800, 1333),
        (100, 1000, 800, 1333),
        (333, 500, 800, 1333),
        (70, 90, 64, 96),
        (101, 63, 64, 96),
        (50, 50, 64, 96),
    ],
)
def test_preprocessing_uses_the_eval_transforms_resize_rule(h, w, short, long):
    images = tf.zeros([2, h + 5, w + 3, 3], tf.uint8)
    sizes = tf.constant([[h, w], [h, w]], tf.int32)
    rule = ResizeConfig(short, long, 32)
    x, info = preprocess_images(images, sizes, rule)
    rh, rw = resized_hw(h, w, rule)
    np.testing.assert_array_equal(info[0, 1].numpy(), [rh, rw])
    np.testing.assert_array_equal(info[0, 0].numpy(), [h, w])
    assert tuple(x.shape[1:3]) == (
        transforms.ceil_to_multiple(rh, 32),
        transforms.ceil_to_multiple(rw, 32),
    )


@pytest.mark.parametrize("h,w", [(480, 640), (45, 70), (300, 1000)])
def test_preprocessing_takes_the_resize_rounding(h, w):
    images = tf.zeros([1, h, w, 3], tf.uint8)
    sizes = tf.constant([[h, w]], tf.int32)
    for short, long in ((800, 1333), (SHORT, LONG)):
        floor_rule = ResizeConfig(short, long, 32, rounding="floor")
        round_rule = ResizeConfig(short, long, 32, rounding="round")
        floor = resized_hw(h, w, floor_rule)
        rounded = resized_hw(h, w, round_rule)
        _, info = preprocess_images(images, sizes, floor_rule)
        np.testing.assert_array_equal(info[0, 1].numpy(), floor)
        _, info = preprocess_images(images, sizes, round_rule)
        np.testing.assert_array_equal(info[0, 1].numpy(), rounded)
    assert resized_hw(45, 70, resize(rounding="floor")) == (61, 96)
    assert resized_hw(45, 70, resize(rounding="round")) == (62, 96)
    bad = resize()
    bad.rounding = "ceil"  # past the construction's checks: the module's are the config's
    with pytest.raises(ValueError, match="resize.rounding"):
        ImageTensorModule(tiny_model(), bad)
    with pytest.raises(ValueError, match="resize.max_long_side"):
        ImageTensorModule(tiny_model(), resize(max_long_side=SHORT - 1))


def test_saved_model_with_floor_rounding(tmp_path, monkeypatch):
    """eval_data.resize.rounding=floor travels into the SavedModel: the serving_default function
    it saves equals the Keras model on images resized by floor (45x70 -> 61x96, where round gives
    62x96), and serving_config.json says floor. (The save itself is skipped: the module's
    `exported` SavedModel covers writing and loading; this keeps the test to one trace.)"""
    from fpn_tf.serving import export as export_lib

    saved = {}

    def save(root, export_dir, signatures):
        saved.update(root=root, signatures=signatures)
        config = root.serving_config_file.asset_path.numpy().decode()
        with open(config) as f:
            saved["serving_config"] = json.load(f)

    monkeypatch.setattr(export_lib.tf.saved_model, "save", save)
    monkeypatch.setattr(export_lib, "_MODULES", (ImageTensorModule,))
    model = tiny_model()
    export_saved_model(model, str(tmp_path / "floor"), CATEGORY_MAP, resize(rounding="floor"))
    assert saved["serving_config"]["resize"] == {**RESIZE.to_dict(), "rounding": "floor"}
    assert saved["root"].serving_default.resize.rounding == "floor"
    images = [pattern(45, 70, seed=3), pattern(45, 70, seed=4)]
    out = saved["signatures"]["serving_default"](images=tf.constant(np.stack(images)))
    out = assert_contract(out, 2)
    assert_same_detections(out, keras_reference(model, images, rounding="floor"))
    rounded = keras_reference(model, images)
    assert not np.allclose(out["detection_scores"], rounded["detection_scores"], atol=1e-5)


def test_outputs_are_padded_or_cut_to_100_rows():
    module = ImageTensorModule(tiny_model(), RESIZE)
    sizes = tf.constant([[50, 100], [80, 40]])
    for rows, counts in ((3, [2, 0]), (120, [120, 7])):
        boxes = np.tile(np.array([10.0, 20.0, 40.0, 60.0], np.float32), (2, rows, 1))
        out = module.format_outputs(
            {
                "detection_boxes": boxes,
                "detection_scores": np.full((2, rows), 0.9, np.float32),
                "detection_classes": np.full((2, rows), 7, np.int32),
                "num_detections": np.array(counts, np.int32),
            },
            sizes,
        )
        out = assert_contract(out, 2)
        expected = [min(c, 100) for c in counts]
        np.testing.assert_array_equal(out["num_detections"], expected)
        # Pixels / input size (the second image's box overflows it: clipped to 1).
        np.testing.assert_allclose(out["detection_boxes"][0, 0], [0.2, 0.2, 0.8, 0.6])
        assert out["detection_classes"][0, 0] == 7.0
        if expected[1]:
            np.testing.assert_allclose(out["detection_boxes"][1, 0], [0.125, 0.5, 0.5, 1.0])


# --- serving_default ------------------------------------------------------------------------


@pytest.mark.parametrize("batch,height,width", [(1, 70, 90), (3, 101, 63)])
def test_serving_default_equals_the_keras_model(exported, batch, height, width):
    model, _, loaded = exported
    images = np.stack([pattern(height, width, seed=i) for i in range(batch)])
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    out = assert_contract(out, batch)
    assert_same_detections(out, keras_reference(model, list(images)))
    assert (out["num_detections"] < 100).any(), "no padding rows were exercised"


def test_wrong_inputs_to_serving_default_name_the_expected_input(exported):
    _, _, loaded = exported
    signature = loaded.signatures["serving_default"]
    bad_shapes = {
        "rank 3": np.zeros((40, 48, 3), np.uint8),
        "4 channels": np.zeros((1, 40, 48, 4), np.uint8),
    }
    # The signature (what TF Serving and saved_model_cli call) checks the dtype itself; the
    # graph checks rank and channels and names the input and the expected shape.
    for what, bad in bad_shapes.items():
        with pytest.raises(
            tf.errors.InvalidArgumentError,
            match=r"input `images` must be uint8 \[batch, height, width, 3\]",
        ):
            signature(images=tf.constant(bad))
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a uint8 tensor"):
        signature(images=tf.zeros((1, 40, 48, 3), tf.float32))
    # The restored module's function (loaded.serving_default) checks everything in Python.
    for bad in list(bad_shapes.values()) + [np.zeros((1, 40, 48, 3), np.float32)]:
        with pytest.raises(
            ValueError,
            match=r"(?s)TensorSpec\(shape=\(None, None, None, 3\), "
            r"dtype=tf.uint8, name='images'\)",
        ):
            loaded.serving_default(tf.constant(bad))


# --- image_bytes and tf_example ---------------------------------------------------------------


def test_image_bytes_with_a_jpeg_and_a_png_of_different_sizes(exported):
    model, _, loaded = exported
    jpeg, png = encode(pattern(60, 80, seed=5), "JPEG"), encode(pattern(90, 50, seed=6), "PNG")
    out = loaded.signatures["image_bytes"](image_bytes=tf.constant([jpeg, png]))
    out = assert_contract(out, 2)
    decoded = [tf.io.decode_image(b, channels=3).numpy() for b in (jpeg, png)]
    assert [d.shape for d in decoded] == [(60, 80, 3), (90, 50, 3)]
    # Resized to 64x85 (padded alone: 64x96) and 96x53 (96x64): the batch is padded to 96x96.
    # Each image alone through the Keras model, padded the same.
    padded = common_padded_size(decoded)
    assert padded == (96, 96)
    for i, image in enumerate(decoded):
        ref = keras_reference(model, [image], padded_size=padded)
        assert_same_detections({k: v[i : i + 1] for k, v in out.items()}, ref)


def test_image_bytes_that_are_not_an_image_fail_cleanly(exported):
    _, _, loaded = exported
    good = encode(pattern(40, 40), "PNG")
    not_an_image = r"image_bytes: element\] \[1\] \[is not an encoded JPEG or PNG image"
    cases = {
        b"hello, I am not an image": not_an_image,
        b"": not_an_image,
        good[:12]: "Invalid PNG",
        encode(pattern(40, 40), "JPEG")[:200]: "Invalid JPEG data",
    }
    for bad, message in cases.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            loaded.signatures["image_bytes"](image_bytes=tf.constant([good, bad]))

    def example(features):
        return tf.train.Example(
            features=tf.train.Features(
                feature={
                    k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
                    for k, v in features.items()
                }
            )
        ).SerializeToString()

    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"image/encoded of serialized_example: element\] \[0\] \[is not",
    ):
        loaded.signatures["tf_example"](
            serialized_example=tf.constant([example({"image/encoded": b"junk"})])
        )
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="image/encoded .* is required but could not be found"
    ):
        loaded.signatures["tf_example"](
            serialized_example=tf.constant([example({"image/format": b"jpeg"})])
        )
    # Still serves afterwards.
    assert loaded.signatures["image_bytes"](image_bytes=tf.constant([good]))[
        "num_detections"
    ].shape == (1,)


def test_tf_example_on_records_made_by_the_converter(exported, tmp_path):
    from fpn_tf.data.convert_coco import convert_coco_to_tfrecords

    model, _, loaded = exported
    split = synthetic.generate_split(
        str(tmp_path / "shapes"),
        "val",
        4,
        image_size=(40, 90),
        seed=3,
        max_object_size=30,
        empty_fraction=0.0,
    )
    result = convert_coco_to_tfrecords(
        split["annotation_file"],
        split["image_dir"],
        str(tmp_path / "records" / "val"),
        num_shards=1,
    )
    records = [r.numpy() for r in tf.data.TFRecordDataset(result.shard_files)]
    assert len(records) == 4
    encoded = [
        tf.io.parse_single_example(r, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})[
            "image/encoded"
        ]
        for r in records
    ]
    assert {bytes(e.numpy()[:4]) for e in encoded} == {b"\xff\xd8\xff\xe0", b"\x89PNG"}
    out = loaded.signatures["tf_example"](serialized_example=tf.constant(records))
    out = assert_contract(out, 4)
    images = [tf.io.decode_image(e, channels=3).numpy() for e in encoded]
    assert len({im.shape for im in images}) > 1
    assert_same_detections(out, keras_reference(model, images))
    # The same bytes through image_bytes give the same detections.
    same = loaded.signatures["image_bytes"](image_bytes=tf.stack(encoded))
    for key in out:
        np.testing.assert_array_equal(out[key], same[key].numpy())


# --- assets and tools ---------------------------------------------------------------------------


def test_category_map_and_label_map_travel_as_assets(exported):
    _, export_dir, loaded = exported
    assert read_category_map(export_dir) == CATEGORY_MAP
    assert read_category_map(loaded) == CATEGORY_MAP
    path = loaded.category_map_file.asset_path.numpy().decode()
    assert os.path.dirname(path) == os.path.join(export_dir, "assets")
    with open(os.path.join(export_dir, "assets", "label_map.pbtxt")) as f:
        text = f.read()
    assert text.count("item {") == 4
    assert 'id: 7\n  name: "triangle"\n  display_name: "triangle"' in text
    assert sorted(os.listdir(os.path.join(export_dir, "assets"))) == [
        "category_map.json",
        "label_map.pbtxt",
        "serving_config.json",
    ]


@pytest.mark.slow
def test_saved_model_cli_shows_and_runs_it(exported, tmp_path):
    _, export_dir, _ = exported
    cli = os.path.join(BIN, "saved_model_cli")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    shown = watched.run(
        [cli, "show", "--dir", export_dir, "--all"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    text = shown.stdout
    for name, input_name in (
        ("serving_default", "images"),
        ("image_bytes", "image_bytes"),
        ("tf_example", "serialized_example"),
    ):
        block = text.split(f"signature_def['{name}']:")[1].split("signature_def[")[0]
        assert f"inputs['{input_name}']" in block
        for output in (
            "detection_boxes",
            "detection_scores",
            "detection_classes",
            "num_detections",
        ):
            assert f"outputs['{output}']" in block
    assert "shape: (-1, -1, -1, 3)" in text and "dtype: DT_UINT8" in text
    assert "shape: (-1, 100, 4)" in text

    # --input_exprs takes Python literals (numpy calls are refused without --safe=false).
    images = [pattern(40, 56, seed=s).tolist() for s in (1, 2)]
    out_dir = tmp_path / "cli_out"
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
            "--input_exprs",
            f"images={images}",
            "--outdir",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    boxes = np.load(out_dir / "detection_boxes.npy")
    num = np.load(out_dir / "num_detections.npy")
    assert boxes.shape == (2, 100, 4) and num.shape == (2,) and (num > 0).all()


# --- rebuilding a trained model from its model_dir ---------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """What the trainer leaves: params.yaml, category_map.json, CheckpointManager checkpoints of
    tf.train.Checkpoint(model=..., optimizer=...)."""
    path = str(tmp_path_factory.mktemp("run"))
    model = tiny_model(seed=7)
    optimizer = keras.optimizers.AdamW(1e-3)
    optimizer.build(model.trainable_variables)
    save_config(tiny_config(), path)
    CATEGORY_MAP.to_json(os.path.join(path, "category_map.json"))
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=optimizer), path, max_to_keep=2
    )
    manager.save()
    return path, model


def test_load_model_restores_the_latest_checkpoint(model_dir):
    path, trained = model_dir
    source = fpn_tf.load_model(path)
    assert source.category_map == CATEGORY_MAP
    assert source.category_names == list(CATEGORY_MAP.names)
    assert source.config.eval_data.resize == ResizeConfig(
        short_side=SHORT,
        max_long_side=LONG,
        pad_multiple=MULTIPLE,
        rounding="round",
        method="bilinear",
    )
    floor = load_model(path, params_override="eval_data.resize.rounding=floor")
    assert floor.config.eval_data.resize.rounding == "floor"
    pil = load_model(path, params_override="eval_data.resize.method=pil_bilinear")
    assert pil.config.eval_data.resize.method == "pil_bilinear"
    assert source.checkpoint.endswith("ckpt-1")
    assert len(source.model.variables) == len(trained.variables)
    for a, b in zip(source.model.variables, trained.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_load_model_says_what_is_missing_or_wrong(model_dir, tmp_path):
    path, _ = model_dir
    with pytest.raises(ModelDirError, match="model directory not found"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelDirError, match="params.yaml not found"):
        load_model(str(tmp_path))
    save_config(tiny_config(), str(tmp_path))
    with pytest.raises(ModelDirError, match="category_map.json not found"):
        load_model(str(tmp_path))
    CATEGORY_MAP.to_json(str(tmp_path / "category_map.json"))
    with pytest.raises(ModelDirError, match="no checkpoint found"):
        load_model(str(tmp_path))
    with pytest.raises(ModelDirError, match="does not hold every weight of this model.*fc3"):
        load_model(path, params_override="model.box_head.num_fc=3")
    with pytest.raises(ModelDirError, match="does not hold every weight of this model"):
        load_model(path, params_override="model.fpn.num_channels=16")
    with pytest.raises(ModelDirError, match="holds no weights for this model's mask_heads"):
        load_model(path, params_override="model.architecture=mask_rcnn")


def test_export_refuses_a_category_map_of_another_model(tmp_path):
    model = tiny_model()
    other = CategoryMap([{"id": i, "name": f"c{i}"} for i in (1, 2, 3, 4)])
    with pytest.raises(ExportError, match="does not belong to this model"):
        export_saved_model(model, str(tmp_path / "x"), other, RESIZE)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty and not a SavedModel"):
        export_saved_model(model, str(tmp_path / "busy"), CATEGORY_MAP, RESIZE)
    assert os.listdir(tmp_path / "busy") == ["notes.txt"]


@pytest.mark.slow
def test_export_command_writes_the_trained_models_savedmodel(model_dir, tmp_path):
    path, trained = model_dir
    export_dir = str(tmp_path / "exported" / "1")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = watched.run(
        [
            sys.executable,
            "-m",
            "fpn_tf.export",
            f"--model_dir={path}",
            f"--export_dir={export_dir}",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Exported a SavedModel" in done.stderr
    loaded = tf.saved_model.load(export_dir)
    assert sorted(loaded.signatures) == ["image_bytes", "serving_default", "tf_example"]
    images = np.stack([pattern(66, 80, seed=9)])
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    assert_same_detections(assert_contract(out, 1), keras_reference(trained, list(images)))
    assert read_category_map(export_dir) == CATEGORY_MAP

    failed = watched.run(
        [
            sys.executable,
            "-m",
            "fpn_tf.export",
            f"--model_dir={tmp_path / 'nowhere'}",
            f"--export_dir={export_dir}",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'nowhere'}: model directory not found"
    )
