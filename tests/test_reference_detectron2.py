"""detectron2 conversion, without detectron2 (it is not installable here).

A generated model-zoo ``.pkl`` with detectron2's key names, shapes and layout for
``faster_rcnn_R_50_FPN`` (written out below from detectron2's module structure, independently
of the converter) is converted with ``configs/coco_r50_fpn_detectron2.yaml``; then the converted
layers are checked against NumPy / tf.nn computations of detectron2's formulas on the .pkl's own
arrays (stem, RPN head, box head with its background-last classifier), every key is consumed,
and broken files are refused with one line and nothing written. The detectron2-mode ops
(anchors at offset 0, BGR mean subtraction, adaptive RoIAlign) are checked against NumPy
references of detectron2's formulas.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.configs.loader import load_config
from fpn_tf.conversion import ConversionError, convert_checkpoint
from fpn_tf.conversion.layout import backbone_model
from fpn_tf.serving.export import load_model_for_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "coco_r50_fpn_detectron2.yaml")
STAGES = {2: (3, 64, 256), 3: (4, 128, 512), 4: (6, 256, 1024), 5: (3, 512, 2048)}


def detectron2_r50_fpn_arrays(seed: int = 0, num_classes: int = 80) -> dict:
    """Random arrays under every key of detectron2's R50-FPN Faster R-CNN state dict."""
    rng = np.random.default_rng(seed)
    out = {}

    def conv(key, cout, cin, k, bias=False, std=None):
        std = std or (2.0 / (cin * k * k)) ** 0.5
        out[key + ".weight"] = rng.normal(0, std, (cout, cin, k, k)).astype(np.float32)
        if bias:
            out[key + ".bias"] = rng.normal(0, 0.1, (cout,)).astype(np.float32)

    def norm(key, c):
        out[key + ".weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        out[key + ".bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        out[key + ".running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        out[key + ".running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)

    conv("backbone.bottom_up.stem.conv1", 64, 3, 7, std=0.01)
    norm("backbone.bottom_up.stem.conv1.norm", 64)
    cin = 64
    for stage, (blocks, mid, cout) in STAGES.items():
        for b in range(blocks):
            p = f"backbone.bottom_up.res{stage}.{b}"
            if b == 0:
                conv(p + ".shortcut", cout, cin, 1)
                norm(p + ".shortcut.norm", cout)
            conv(p + ".conv1", mid, cin if b == 0 else cout, 1)
            norm(p + ".conv1.norm", mid)
            conv(p + ".conv2", mid, mid, 3)
            norm(p + ".conv2.norm", mid)
            conv(p + ".conv3", cout, mid, 1)
            norm(p + ".conv3.norm", cout)
        cin = cout
    for level, c in zip(range(2, 6), (256, 512, 1024, 2048)):
        conv(f"backbone.fpn_lateral{level}", 256, c, 1, bias=True)
        conv(f"backbone.fpn_output{level}", 256, 256, 3, bias=True)
    conv("proposal_generator.rpn_head.conv", 256, 256, 3, bias=True, std=0.01)
    conv("proposal_generator.rpn_head.objectness_logits", 3, 256, 1, bias=True, std=0.01)
    conv("proposal_generator.rpn_head.anchor_deltas", 12, 256, 1, bias=True, std=0.01)

    def linear(key, cout, cin, std):
        out[key + ".weight"] = rng.normal(0, std, (cout, cin)).astype(np.float32)
        out[key + ".bias"] = rng.normal(0, 0.1, (cout,)).astype(np.float32)

    linear("roi_heads.box_head.fc1", 1024, 256 * 7 * 7, 0.01)
    linear("roi_heads.box_head.fc2", 1024, 1024, 0.03)
    linear("roi_heads.box_predictor.cls_score", num_classes + 1, 1024, 0.1)
    linear("roi_heads.box_predictor.bbox_pred", 4 * num_classes, 1024, 0.01)
    return out


def _write_pkl(path, arrays):
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, f)
    return str(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("detectron2")
    arrays = detectron2_r50_fpn_arrays()
    pkl = _write_pkl(tmp / "model_final_generated.pkl", arrays)
    config = load_config(CONFIG)
    report = convert_checkpoint(
        "detectron2", pkl, str(tmp / "converted"), config, export_saved_model=False
    )
    return arrays, report, load_model_for_export(report.output_dir).model


def test_every_key_is_consumed_and_the_directory_is_a_model_dir(converted):
    arrays, report, model = converted
    assert report.num_arrays == len(arrays)
    assert report.num_values == sum(a.size for a in arrays.values()) + sum(
        # our convs carry a bias (zero) that detectron2's convs do not have
        layer.bias.shape[0]
        for layer in backbone_model(model).layers
        if layer.name.endswith("_conv") and getattr(layer, "use_bias", False)
    )
    names = sorted(os.listdir(report.output_dir))
    assert {"params.yaml", "category_map.json", "checkpoint", "conversion.json"} <= set(names)
    assert model.category_ids[:3] == [1, 2, 3] and model.category_ids[-1] == 90


def _conv_nchw(x_nhwc, weight, bias=None, stride=1, padding=0):
    """detectron2's Conv2d (torch semantics: symmetric zero padding) with tf.nn on NHWC."""
    x = tf.pad(x_nhwc, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    y = tf.nn.conv2d(x, np.transpose(weight, (2, 3, 1, 0)), stride, "VALID")
    return y if bias is None else y + bias


def test_stem_equals_detectron2_formula(converted):
    arrays, _, model = converted
    rng = np.random.default_rng(1)
    rgb = rng.uniform(0, 255, (1, 64, 96, 3)).astype(np.float32)
    # detectron2: BGR 0..255 minus PIXEL_MEAN (std 1), conv1 7x7/2 pad 3, FrozenBN (eps 1e-5).
    bgr = rgb[..., ::-1] - np.array([103.53, 116.28, 123.675], np.float32)
    y = _conv_nchw(bgr, arrays["backbone.bottom_up.stem.conv1.weight"], stride=2, padding=3)
    p = "backbone.bottom_up.stem.conv1.norm."
    scale = arrays[p + "weight"] / np.sqrt(arrays[p + "running_var"] + 1e-5)
    y = tf.nn.relu(y * scale + arrays[p + "bias"] - arrays[p + "running_mean"] * scale)
    backbone = backbone_model(model)
    stem = keras.Model(backbone.input, backbone.get_layer("conv1_relu").output)
    ours = stem(rgb).numpy()
    np.testing.assert_allclose(ours, y.numpy(), rtol=1e-4, atol=1e-4 * np.abs(y).max())


def test_rpn_head_equals_detectron2_formula(converted):
    arrays, _, model = converted
    x = np.random.default_rng(2).normal(0, 1, (1, 10, 12, 256)).astype(np.float32)
    p = "proposal_generator.rpn_head."
    t = tf.nn.relu(_conv_nchw(x, arrays[p + "conv.weight"], arrays[p + "conv.bias"], padding=1))
    logits = _conv_nchw(
        t, arrays[p + "objectness_logits.weight"], arrays[p + "objectness_logits.bias"]
    )
    deltas = _conv_nchw(t, arrays[p + "anchor_deltas.weight"], arrays[p + "anchor_deltas.bias"])
    # detectron2: [N, A*4, H, W] -> view(N, A, 4, H, W) -> [N, H*W*A, 4] as (dx, dy, dw, dh).
    deltas = tf.reshape(deltas, [1, 10 * 12 * 3, 4]).numpy()[..., [1, 0, 3, 2]]
    ours_logits, ours_deltas = model.rpn.head_outputs({level: x for level in model.rpn.levels})
    level = model.rpn.levels[0]
    np.testing.assert_allclose(ours_logits[level].numpy(), tf.reshape(logits, [1, -1]), atol=1e-5)
    np.testing.assert_allclose(ours_deltas[level].numpy(), deltas, atol=1e-5)


def test_box_head_equals_detectron2_formula_background_last(converted):
    arrays, _, model = converted
    features = np.random.default_rng(3).normal(0, 1, (1, 5, 7, 7, 256)).astype(np.float32)
    # detectron2 flattens [R, C, 7, 7] (channels first).
    flat = np.transpose(features[0], (0, 3, 1, 2)).reshape(5, -1)
    h = np.maximum(
        flat @ arrays["roi_heads.box_head.fc1.weight"].T + arrays["roi_heads.box_head.fc1.bias"], 0
    )
    h = np.maximum(
        h @ arrays["roi_heads.box_head.fc2.weight"].T + arrays["roi_heads.box_head.fc2.bias"], 0
    )
    p = "roi_heads.box_predictor."
    logits = h @ arrays[p + "cls_score.weight"].T + arrays[p + "cls_score.bias"]
    probs = tf.nn.softmax(logits).numpy()  # column 80 = background
    deltas = (h @ arrays[p + "bbox_pred.weight"].T + arrays[p + "bbox_pred.bias"]).reshape(5, 80, 4)
    ours_logits, ours_deltas = model.roi_heads.box_head(features)
    ours_probs = tf.nn.softmax(ours_logits[0]).numpy()
    np.testing.assert_allclose(ours_probs[:, 0], probs[:, 80], atol=1e-5)
    np.testing.assert_allclose(ours_probs[:, 1:], probs[:, :80], atol=1e-5)
    np.testing.assert_allclose(ours_deltas[0].numpy(), deltas[..., [1, 0, 3, 2]], atol=1e-4)


def _expect_refused(tmp_path, arrays_or_bytes, match):
    path = tmp_path / "model_final_broken.pkl"
    if isinstance(arrays_or_bytes, bytes):
        path.write_bytes(arrays_or_bytes)
    else:
        _write_pkl(path, arrays_or_bytes)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=match) as err:
        convert_checkpoint(
            "detectron2", str(path), str(out), load_config(CONFIG), export_saved_model=False
        )
    assert "\n" not in str(err.value)
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    return str(err.value)


def test_broken_or_foreign_files_are_refused_with_one_line_and_nothing_written(tmp_path):
    arrays = detectron2_r50_fpn_arrays()
    good = pickle.dumps({"model": arrays})
    _expect_refused(tmp_path, good[: len(good) // 3], "truncated or corrupt")
    missing = dict(arrays)
    del missing["roi_heads.box_head.fc2.bias"]
    _expect_refused(tmp_path, missing, r"missing keys roi_heads\.box_head\.fc2\.bias")
    extra = dict(arrays, **{"roi_heads.mask_head.predictor.weight": np.zeros((80, 256, 1, 1))})
    _expect_refused(tmp_path, extra, r"unexpected keys roi_heads\.mask_head")
    # A ResNet-101 file for the ResNet-50 config: its extra res4 blocks are left over.
    deeper = dict(arrays)
    for b in range(6, 23):
        for name, shape in (("conv1", (256, 1024, 1, 1)), ("conv2", (256, 256, 3, 3))):
            deeper[f"backbone.bottom_up.res4.{b}.{name}.weight"] = np.zeros(shape, np.float32)
    _expect_refused(tmp_path, deeper, r"unexpected keys backbone\.bottom_up\.res4\.(1\d|2\d|6)")
    narrow = dict(arrays)
    narrow["backbone.fpn_output3.weight"] = np.zeros((128, 256, 3, 3), np.float32)
    _expect_refused(
        tmp_path, narrow, r"does not fit.*backbone\.fpn_output3\.weight \(3, 3, 256, 128\)"
    )
    # A pickle that asks for code instead of arrays.
    _expect_refused(tmp_path, pickle.dumps({"model": os.system}), "refusing to load")


def test_command_answers_a_bad_file_with_one_line(tmp_path):
    bad = tmp_path / "model_final_bad.pkl"
    bad.write_bytes(b"not a pickle")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fpn_tf.convert_weights",
            "--source=detectron2",
            f"--checkpoint={bad}",
            f"--output_dir={tmp_path / 'out'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not a readable detectron2 .pkl" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_anchors_at_offset_zero_equal_detectron2_formula():
    from fpn_tf.ops.anchors import generate_anchors

    # detectron2 DefaultAnchorGenerator: cell anchors [-w/2, -h/2, w/2, h/2] with
    # w = sqrt(size^2 / ratio), h = ratio * w; shifts = arange(0, W * stride, stride) + 0.
    size, ratios, stride, (fh, fw) = 64.0, (0.5, 1.0, 2.0), 8, (5, 7)
    cells = []
    for r in ratios:
        w = np.sqrt(size * size / r)
        h = r * w
        cells.append([-w / 2, -h / 2, w / 2, h / 2])
    sx, sy = np.meshgrid(np.arange(fw) * stride, np.arange(fh) * stride)
    shifts = np.stack([sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel()], 1)
    expected_xyxy = (shifts[:, None, :] + np.array(cells)[None]).reshape(-1, 4)
    ours = generate_anchors(
        (fh * stride, fw * stride), ("P3",), {"P3": (size,)}, ratios, offset=0.0
    )
    np.testing.assert_allclose(ours["P3"].numpy()[:, [1, 0, 3, 2]], expected_xyxy, atol=1e-4)


def test_bgr_mean_subtraction_of_the_detectron2_config():
    from fpn_tf.modeling.factory import build_backbone_from_config

    backbone_cfg = load_config(CONFIG).model.backbone
    backbone = build_backbone_from_config(backbone_cfg)
    rgb = np.random.default_rng(4).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    norm = [layer for layer in backbone.layers if type(layer).__name__ == "PixelNormalization"]
    assert len(norm) == 1
    expected = rgb[..., ::-1] - np.array([103.53, 116.28, 123.675], np.float32)
    np.testing.assert_allclose(norm[0](rgb).numpy(), expected, atol=1e-4)


def test_a_file_whose_name_promises_another_digest_is_refused(tmp_path):
    # detectron2's model-zoo names carry the file's MD5 prefix: a damaged download fails first.
    path = _write_pkl(tmp_path / "model_final_abcdef.pkl", detectron2_r50_fpn_arrays())
    with pytest.raises(
        ConversionError, match=r"MD5 [0-9a-f]+\.\.\. does not start with the abcdef"
    ):
        convert_checkpoint(
            "detectron2", path, str(tmp_path / "out"), load_config(CONFIG), export_saved_model=False
        )
    assert not (tmp_path / "out").exists()
