"""`python -m fpn_tf.predict`: draws the SavedModel's detections on the images and writes them
as JSON; a missing image, a file that is not an image and a missing SavedModel are one-line
errors. Uses a tiny exported model (see test_export.py)."""

import json
import os
import re
import sys

import numpy as np
from PIL import Image
import pytest

from fpn_tf import predict
from data_testing import pattern, write_image
from fpn_tf.serving.inference import Detection, PredictError, SavedModelDetector, draw_detections

sys.path.insert(0, os.path.dirname(__file__))
from test_export import CATEGORY_MAP  # noqa: E402
import watched  # noqa: E402

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


@pytest.fixture(scope="module")
def saved_model(tiny_export):
    return tiny_export[1]  # conftest.py: test_export.py's tiny detector, exported once


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return {
        "jpeg": write_image(root / "a.jpg", pattern(60, 80, seed=1)),
        "png": write_image(root / "b.png", pattern(90, 50, seed=2)),
        "gray_png": write_image(root / "sub" / "b.png", pattern(50, 70, seed=3)[..., 0]),
        "text": str(_write(root / "notes.jpg", b"not an image at all")),
    }


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.slow
def test_predict_command_draws_boxes_and_writes_json(saved_model, images, tmp_path):
    out = tmp_path / "out"
    done = watched.run(
        [
            sys.executable,
            "-m",
            "fpn_tf.predict",
            f"--saved_model={saved_model}",
            f"--image={images['jpeg']}",
            f"--image={images['png']}",
            f"--image={images['gray_png']}",
            f"--output_dir={out}",
            "--min_score=0.6",
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Loaded" in done.stderr and "detection(s) with score >= 0.60" in done.stderr
    # Only what concerns the user: no TensorFlow cost-model or CUDA start-up noise.
    assert "CropAndResize" not in done.stderr and "PredictCost" not in done.stderr
    if not os.path.exists("/dev/nvidiactl"):
        assert "cuInit" not in done.stderr
    assert sorted(os.listdir(out)) == [
        "a_detections.json",
        "a_detections.png",
        "b_2_detections.json",
        "b_2_detections.png",
        "b_detections.json",
        "b_detections.png",
    ]
    for stem, source in (("a", images["jpeg"]), ("b", images["png"]), ("b_2", images["gray_png"])):
        with open(out / f"{stem}_detections.json") as f:
            record = json.load(f)
        source_image = Image.open(source)
        drawn = Image.open(out / f"{stem}_detections.png")
        assert drawn.format == "PNG" and drawn.mode == "RGB"
        assert drawn.size == source_image.size == (record["width"], record["height"])
        assert record["image"] == source and record["signature"] == "image_bytes"
        assert record["min_score"] == 0.6
        detections = record["detections"]
        assert 0 < len(detections) == record["num_detections"]
        for d in detections:
            assert d["score"] >= 0.6
            assert d["class_id"] in CATEGORY_MAP.dataset_ids
            assert d["class_name"] == CATEGORY_MAP.dataset_id_to_name()[d["class_id"]]
            hw = [record["height"], record["width"]] * 2
            np.testing.assert_allclose(
                d["box_pixels"], np.array(d["box_normalized"]) * hw, atol=0.02
            )
        # Pixels change on the drawn box outline (its top-left corner), the rest is the image.
        before = np.asarray(source_image.convert("RGB"), np.int32)
        after = np.asarray(drawn, np.int32)
        changed = np.abs(after - before).sum(-1) > 0
        assert changed.any()
        # Some pixel within 2 px of the top-left corner of every box was drawn over.
        for d in detections:
            ty, tx = (min(int(v), s - 1) for v, s in zip(d["box_pixels"][:2], before.shape[:2]))
            assert changed[max(ty - 2, 0) : ty + 3, max(tx - 2, 0) : tx + 3].any(), d
        if stem == "b":  # a PNG: exact pixels survive where nothing was drawn
            assert not changed.all()


def test_predict_errors_are_one_line(saved_model, images, tmp_path):
    cases = {
        str(tmp_path / "missing.jpg"): "image file not found",
        images["text"]: "not an image (PIL cannot identify its format)",
    }
    for path, message in cases.items():
        with pytest.raises(PredictError, match="^" + re.escape(f"{path}: {message}") + "$"):
            predict.predict(saved_model, [images["png"], path], str(tmp_path / "o"))
    with pytest.raises(PredictError, match=r"nowhere: not a SavedModel \(no such directory\)"):
        predict.predict(str(tmp_path / "nowhere"), [images["png"]], str(tmp_path / "o"))
    with pytest.raises(PredictError, match=r"not a SavedModel \(no saved_model.pb in it\)"):
        predict.predict(str(tmp_path), [images["png"]], str(tmp_path / "o"))

    # The command prints the message alone: no traceback.
    done = watched.run(
        [
            sys.executable,
            "-m",
            "fpn_tf.predict",
            f"--saved_model={saved_model}",
            f"--image={images['png']}",
            f"--image={tmp_path / 'missing.jpg'}",
            f"--output_dir={tmp_path / 'o'}",
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    # (TensorFlow's own C++ log lines, e.g. about a missing CUDA driver, may come before it.)
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'missing.jpg'}: image file not found"
    )
    assert not (tmp_path / "o").exists()


def test_detector_uses_serving_default_for_formats_tf_does_not_decode(saved_model, tmp_path):
    path = str(tmp_path / "c.tiff")
    Image.fromarray(pattern(60, 80, seed=1)).save(path, format="TIFF")
    detector = SavedModelDetector(saved_model)
    result = detector.detect_file(path)
    assert result.signature == "serving_default"
    same = detector.detect_file(write_image(tmp_path / "c.png", pattern(60, 80, seed=1)))
    assert same.signature == "image_bytes"
    assert [d.class_id for d in result.detections] == [d.class_id for d in same.detections]
    np.testing.assert_allclose(
        [d.score for d in result.detections], [d.score for d in same.detections], atol=1e-5
    )


def test_draw_detections_draws_box_and_label():
    image = Image.fromarray(np.full((60, 80, 3), 128, np.uint8))
    d = Detection(
        box=(0.5, 0.25, 0.9, 0.75),
        box_pixels=(30.0, 20.0, 54.0, 60.0),
        class_id=3,
        class_name="square",
        score=0.87,
    )
    out = np.asarray(draw_detections(image, [d]), np.int32)
    changed = np.abs(out - 128).sum(-1) > 0
    assert changed[30:55, 20].all() and changed[54, 20:61].all()  # left and bottom edges
    assert not changed[40:50, 30:50].any()  # inside stays
    assert changed[:30, 20:60].any()  # the label above the box


def test_draw_detections_overlays_the_mask_and_json_has_its_rle():
    from pycocotools import mask as mask_utils

    from fpn_tf.serving.inference import ImageDetections

    image = Image.fromarray(np.full((60, 80, 3), 128, np.uint8))
    left_half = np.zeros((28, 28), np.float32)
    left_half[:, :14] = 1.0  # the box's left half: x 20..39 of the box x 20..60
    d = Detection(
        box=(0.5, 0.25, 0.9, 0.75),
        box_pixels=(30.0, 20.0, 54.0, 60.0),
        class_id=3,
        class_name="square",
        score=0.87,
        mask=left_half,
    )
    out = np.asarray(draw_detections(image, [d]), np.int32)
    changed = np.abs(out - 128).sum(-1) > 0
    assert changed[35:50, 25:38].all()  # the mask's pixels are tinted
    assert not changed[35:50, 42:58].any()  # the box's right half is not
    result = ImageDetections(None, image, [d], "serving_default", 0.0).to_json()
    rle = result["detections"][0]["segmentation"]
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    expected = np.zeros((60, 80), np.uint8)
    expected[30:54, 20:40] = 1
    np.testing.assert_array_equal(decoded, expected)


_QUIET_PROBE = r"""
import os, sys
from fpn_tf import cli
with cli.quiet_tensorflow():
    import tensorflow as tf
    tf.constant(1.0).numpy()  # TensorFlow's devices start here (cuInit on a CUDA build)
    os.write(2, b'W0 op_level_cost_estimator.cc:699] Error in PredictCost() for the op: op: '
                b'"CropAndResize" attr {}\n')
    print("ours: a warning", file=sys.stderr)
    os.write(2, b"E0 some_op.cc:1] another TensorFlow error\n")
print("after the block", file=sys.stderr)
"""


@pytest.mark.slow
@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="a machine with an NVIDIA device")
def test_quiet_tensorflow_drops_only_the_noise():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = watched.run(
        [sys.executable, "-c", _QUIET_PROBE],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cuInit" not in done.stderr and "CropAndResize" not in done.stderr
    assert "ours: a warning\n" in done.stderr and "another TensorFlow error" in done.stderr
    assert done.stderr.endswith("after the block\n")
    # The filter is what hides them: off, the noise is there.
    loud = watched.run(
        [sys.executable, "-c", _QUIET_PROBE],
        capture_output=True,
        text=True,
        env=dict(env, FPN_TF_SHOW_ALL_LOGS="1"),
    )
    assert "CropAndResize" in loud.stderr
