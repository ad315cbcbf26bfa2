"""detectron2 conversion, without detectron2 (it is not installable here).

A generated model-zoo ``.pkl`` with detectron2's key names, shapes and layout for
``faster_rcnn_R_50_FPN`` (written out below from detectron2's module structure, independently
of the converter), including the buffers the published files carry besides the weights
(``pixel_mean`` / ``pixel_std`` [3, 1, 1] and the anchor generator's five ``cell_anchors``
[3, 4], detectron2 v0.1), is converted with ``configs/coco_r50_fpn_detectron2.yaml``; then the
converted layers are checked against NumPy / tf.nn computations of detectron2's formulas on the
.pkl's own arrays (stem, RPN head, box head with its background-last classifier), every key is
consumed, and broken files (cell anchors or pixel statistics of another model, object arrays,
code) are refused with one line and nothing written. A generated ``mask_rcnn_R_50_FPN`` file
(``roi_heads.mask_head.*``) converts to a Mask R-CNN whose mask branch equals NumPy versions of
detectron2's ROIPooler (ROIAlignV2, 14x14, adaptive sampling), MaskRCNNConvUpsampleHead and
mask_rcnn_inference. The detectron2-mode ops (anchors at offset 0, BGR mean subtraction,
adaptive RoIAlign) are checked against NumPy references of detectron2's formulas.
"""

from __future__ import annotations

import math
import os
import pickle
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.configs import ConfigError
from fpn_tf.configs.loader import load_config
from fpn_tf.conversion import ConversionError, convert_checkpoint
from fpn_tf.conversion.convert import load_weights
from fpn_tf.conversion.layout import backbone_model
from fpn_tf.ops.postprocess import Detections
from fpn_tf.modeling.factory import build_model
from fpn_tf.modeling.model_dir import load_model
import watched

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "coco_r50_fpn_detectron2.yaml")
MASK_CONFIG = os.path.join(REPO, "configs", "coco_r50_fpn_mask_detectron2.yaml")
BGR_MEAN = [103.53, 116.28, 123.675]  # detectron2's MODEL.PIXEL_MEAN of the MSRA R-50 models
CELL_ANCHORS = "proposal_generator.anchor_generator.cell_anchors."
# The model-zoo files' buffers: kept by the converter's checks, not converted into weights.
ZOO_BUFFERS = ("pixel_mean", "pixel_std", CELL_ANCHORS)
STAGES = {2: (3, 64, 256), 3: (4, 128, 512), 4: (6, 256, 1024), 5: (3, 512, 2048)}


def detectron2_r50_fpn_arrays(
    seed: int = 0, num_classes: int = 80, mask: bool = False, zoo_buffers: bool = True
) -> dict:
    """Random arrays under every key of detectron2's R50-FPN Faster R-CNN state dict (with
    ``mask``: Mask R-CNN's), and with ``zoo_buffers`` the model-zoo files' non-weight buffers."""
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
    if mask:
        # MaskRCNNConvUpsampleHead: mask_fcn1..4 (3x3, bias, ReLU), deconv (ConvTranspose2d
        # weight [in, out, 2, 2], ReLU), predictor (1x1 to the 80 classes, no background).
        for i in range(1, 5):
            conv(f"roi_heads.mask_head.mask_fcn{i}", 256, 256, 3, bias=True)
        out["roi_heads.mask_head.deconv.weight"] = rng.normal(
            0, (2.0 / (256 * 4)) ** 0.5, (256, 256, 2, 2)
        ).astype(np.float32)
        out["roi_heads.mask_head.deconv.bias"] = rng.normal(0, 0.1, (256,)).astype(np.float32)
        conv("roi_heads.mask_head.predictor", num_classes, 256, 1, bias=True, std=0.5)
    if zoo_buffers:
        out.update(zoo_buffer_arrays())
    return out


def detectron2_cell_anchors(sizes=(32, 64, 128, 256, 512), ratios=(0.5, 1.0, 2.0)) -> list:
    """detectron2's DefaultAnchorGenerator.generate_cell_anchors per level (one size each):
    w = sqrt(size^2 / ratio), h = ratio * w in Python floats, [-w/2, -h/2, w/2, h/2], then a
    float32 tensor (no rounding)."""
    levels = []
    for size in sizes:
        cells = []
        for ratio in ratios:
            w = math.sqrt(size**2.0 / ratio)
            h = ratio * w
            cells.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        levels.append(np.array(cells, dtype=np.float32))
    return levels


def zoo_buffer_arrays(mean=BGR_MEAN, std=(1.0, 1.0, 1.0), cell_anchors=None) -> dict:
    """The non-weight entries of a model-zoo file as it holds them: GeneralizedRCNN's
    ``pixel_mean`` / ``pixel_std`` buffers (``tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1)``,
    float32 [3, 1, 1], BGR) and the anchor generator's ``cell_anchors.{i}`` (float32 [3, 4])."""
    out = {
        "pixel_mean": np.array(mean, np.float32).reshape(3, 1, 1),
        "pixel_std": np.array(std, np.float32).reshape(3, 1, 1),
    }
    for i, cells in enumerate(detectron2_cell_anchors() if cell_anchors is None else cell_anchors):
        out[f"{CELL_ANCHORS}{i}"] = cells
    return out


def _weight_values(arrays) -> int:
    return sum(a.size for k, a in arrays.items() if not k.startswith(ZOO_BUFFERS))


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
    return arrays, report, load_model(report.output_dir).model


def test_every_key_is_consumed_and_the_directory_is_a_model_dir(converted):
    arrays, report, model = converted
    assert sum(k.startswith(ZOO_BUFFERS) for k in arrays) == 7  # pixel_mean/std, 5 cell anchors
    assert report.num_arrays == len(arrays)
    assert report.num_values == _weight_values(arrays) + sum(
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
    # A mask-head key makes it a Mask R-CNN, whose other mask keys are then missing.
    partial_mask = dict(
        arrays, **{"roi_heads.mask_head.predictor.weight": np.zeros((80, 256, 1, 1))}
    )
    _expect_refused(tmp_path, partial_mask, r"missing keys roi_heads\.mask_head\.deconv\.bias")
    extra = dict(arrays, **{"roi_heads.keypoint_head.conv_fcn1.weight": np.zeros((512, 256, 3, 3))})
    _expect_refused(tmp_path, extra, r"unexpected keys roi_heads\.keypoint_head")
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
    done = watched.run(
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
    from fpn_tf.modeling.backbones import build_backbone

    backbone_cfg = load_config(CONFIG).model.backbone
    backbone = build_backbone(backbone_cfg)
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


def _refused_before_assigning(model, arrays, match) -> str:
    """`load_weights` of ``arrays`` into the converted ``model`` fails with one line matching
    ``match`` and leaves every weight as it was (the checks run before anything is assigned;
    `_expect_refused` shows that the command then writes nothing)."""
    before = [v.numpy() for v in model.weights]
    with pytest.raises(ConversionError, match=match) as err:
        load_weights(model, "detectron2", "model_final_x.pkl", load_config(CONFIG), arrays)
    assert "\n" not in str(err.value)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.weights))
    return str(err.value)


def test_zoo_buffers_are_checked_and_other_anchors_or_means_refused(converted):
    """The cell anchors and pixel statistics of the published files are compared with the
    config's: another model's (other sizes, ratios, rounding, levels, RGB means) is refused
    with one line naming the key and both values, before any weight is assigned."""
    _, _, model = converted
    arrays = detectron2_r50_fpn_arrays()
    # Other sizes: detectron2 with ANCHOR_GENERATOR.SIZES [[64], ..., [1024]].
    bigger = dict(
        arrays,
        **zoo_buffer_arrays(cell_anchors=detectron2_cell_anchors(sizes=(64, 128, 256, 512, 1024))),
    )
    message = _refused_before_assigning(model, bigger, r"its P2 anchors \(.*cell_anchors\.0")
    assert "sizes [64.0, 64.0, 64.0]" in message and "sizes [32.0, 32.0, 32.0]" in message
    # Other aspect ratios (0.25, 1, 4): P2 already differs.
    flat = dict(
        arrays, **zoo_buffer_arrays(cell_anchors=detectron2_cell_anchors(ratios=(0.25, 1.0, 4.0)))
    )
    message = _refused_before_assigning(model, flat, r"its P2 anchors")
    assert "aspect ratios [0.25, 1.0, 4.0]" in message and "[0.5, 1.0, 2.0]" in message
    # Only P6's size differs (sizes 32..256 and 1024).
    last = dict(
        arrays,
        **zoo_buffer_arrays(cell_anchors=detectron2_cell_anchors(sizes=(32, 64, 128, 256, 1024))),
    )
    _refused_before_assigning(model, last, r"its P6 anchors \(.*cell_anchors\.4")
    # Rounded corners (torchvision's base_anchors.round(), or Detectron's quantised anchors).
    rounded = dict(
        arrays, **zoo_buffer_arrays(cell_anchors=[np.round(c) for c in detectron2_cell_anchors()])
    )
    _refused_before_assigning(model, rounded, r"its P2 anchors .* apart\)$")
    # Four levels (no P6) for the config's five.
    four = {k: v for k, v in arrays.items() if k != f"{CELL_ANCHORS}4"}
    _refused_before_assigning(model, four, r"cell anchors for 4 levels .* the config's RPN 5")
    # RGB means (a model trained on RGB input) and another std.
    rgb = dict(arrays, pixel_mean=np.array(BGR_MEAN[::-1], np.float32).reshape(3, 1, 1))
    _refused_before_assigning(model, rgb, r"its pixel_mean \[123\.675, 116\.28, 103\.53\] \(BGR\)")
    std = dict(arrays, pixel_std=np.array([57.375, 57.12, 58.395], np.float32).reshape(3, 1, 1))
    _refused_before_assigning(model, std, r"its pixel_std .* pixel_std \[1\.0, 1\.0, 1\.0\]")
    # A file without these buffers (as today's detectron2 writes) converts: nothing to check.
    plain = detectron2_r50_fpn_arrays(zoo_buffers=False)
    assert load_weights(model, "detectron2", "model_final_x.pkl", load_config(CONFIG), plain)[
        0
    ] == (len(arrays) - 7)


def test_the_config_with_other_anchors_refuses_the_zoo_file(tmp_path):
    """The same check from the config's side: the zoo file's anchors against a config with
    torchvision's rounded cell anchors. The converter refuses that config before reading the
    file (it is not detectron2's reference config); the file's own check refuses it too."""
    path = _write_pkl(tmp_path / "model_final_generated.pkl", detectron2_r50_fpn_arrays())
    config = load_config(CONFIG, {"model.anchor.round_cell_anchors": True})
    with pytest.raises(ConfigError, match=r"^model.anchor.round_cell_anchors is True but the "):
        convert_checkpoint(
            "detectron2", path, str(tmp_path / "out"), config, export_saved_model=False
        )
    assert not (tmp_path / "out").exists()
    config.model.backbone.weights = None
    model = build_model(config.model, category_ids=list(range(1, 81)))
    with pytest.raises(ConversionError, match=r"round_cell_anchors True, corners up to") as err:
        load_weights(model, "detectron2", path, config)
    assert "\n" not in str(err.value)


def _expect_command_refuses(tmp_path, pkl_path, expected):
    done = watched.run(
        [
            sys.executable,
            "-m",
            "fpn_tf.convert_weights",
            "--source=detectron2",
            f"--checkpoint={pkl_path}",
            f"--output_dir={tmp_path / 'out'}",
            "--nosaved_model",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    return errors[0]


class _PlantedCode:
    """An object whose unpickling would run os.mkdir(path): a file that carries code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_object_arrays_are_refused_with_one_line_and_no_code_runs(tmp_path):
    """NumPy object arrays (dtype=object, e.g. strings a pickle carries) are not weights: one
    line naming the key and dtype (exit 2 from the command), nothing written; an object array
    whose element would run code is refused by the unpickler before anything runs."""
    arrays = detectron2_r50_fpn_arrays()
    names = dict(arrays, **{"roi_heads.box_head.fc2.bias": np.array(["a", "b"], dtype=object)})
    _expect_refused(
        tmp_path, names, r"key 'roi_heads\.box_head\.fc2\.bias' holds a NumPy array of dtype=object"
    )
    # Strings (dtype <U1) likewise; a float64 array converts (as float32).
    strings = dict(arrays, **{"roi_heads.box_head.fc2.bias": np.array(["a", "b"])})
    _expect_refused(tmp_path, strings, r"dtype=<U1 \(2,\), not numbers")
    # The command: one line, exit 2, nothing written.
    pkl = _write_pkl(tmp_path / "model_final_objects.pkl", names)
    _expect_command_refuses(tmp_path, pkl, "holds a NumPy array of dtype=object")
    # An object array holding an object that would run os.mkdir when unpickled.
    marker = tmp_path / "code_ran"
    planted = dict(arrays, **{"pixel_mean": np.array([_PlantedCode(str(marker))], dtype=object)})
    _expect_refused(tmp_path, planted, r"refusing to load posix\.mkdir")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model_final_a54504.pkl", "model_final_f10217.pkl"])
def test_mask_rcnn_zoo_names_check_their_md5_prefix(tmp_path, name):
    path = _write_pkl(tmp_path / name, {"pixel_mean": np.zeros((3, 1, 1), np.float32)})
    prefix = name[len("model_final_") : -len(".pkl")]
    with pytest.raises(
        ConversionError, match=rf"MD5 [0-9a-f]+\.\.\. does not start with the {prefix}"
    ):
        convert_checkpoint(
            "detectron2", path, str(tmp_path / "out"), load_config(CONFIG), export_saved_model=False
        )
    assert not (tmp_path / "out").exists()


# --- Mask R-CNN ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_mask(tmp_path_factory):
    """A generated mask_rcnn_R_50_FPN zoo file converted with the DEFAULT detectron2 config (the
    architecture comes from the file's keys), as `python -m fpn_tf.convert_weights` does."""
    tmp = tmp_path_factory.mktemp("detectron2_mask")
    arrays = detectron2_r50_fpn_arrays(seed=5, mask=True)
    pkl = _write_pkl(tmp / "model_final_generated_mask.pkl", arrays)
    report = convert_checkpoint(
        "detectron2", pkl, str(tmp / "converted"), load_config(CONFIG), export_saved_model=False
    )
    return arrays, report, load_model(report.output_dir).model


def test_mask_rcnn_file_converts_with_every_key_used(converted_mask):
    arrays, report, model = converted_mask
    assert sum(k.startswith("roi_heads.mask_head.") for k in arrays) == 12
    assert report.num_arrays == len(arrays)
    head = model.roi_heads.mask_head
    assert head.num_outputs == 81  # our channel k = class k, channel 0 unused
    assert report.num_values == _weight_values(arrays) + 257 + sum(
        # our backbone convs' zero biases; our mask predictor's channel 0 (256 + 1, zeros)
        layer.bias.shape[0]
        for layer in backbone_model(model).layers
        if layer.name.endswith("_conv") and getattr(layer, "use_bias", False)
    )
    np.testing.assert_array_equal(head.predictor.kernel.numpy()[..., 0], 0.0)
    np.testing.assert_array_equal(head.predictor.bias.numpy()[0], 0.0)
    # params.yaml: the Mask R-CNN config written out (architecture from the keys; detectron2's
    # ROI_MASK_HEAD: ROIAlignV2 14x14 with adaptive sampling, 4 convs of 256, class-specific).
    written = load_config(os.path.join(report.output_dir, "params.yaml")).model
    assert written.architecture == "mask_rcnn"
    assert written == load_config(MASK_CONFIG).model
    pooler = model.roi_heads.mask_pooler
    aligner = pooler.config
    assert (aligner.output_size, aligner.sampling_ratio, aligner.aligned) == (14, 0, True)
    assert (aligner.canonical_size, aligner.canonical_level) == (224.0, 4)
    assert list(pooler.levels) == ["P2", "P3", "P4", "P5"]


def _detectron2_roi_align_v2(f, box_xyxy, stride, pooled):
    """detectron2's ROIAlignV2 (ROIAlign aligned=True, sampling_ratio 0) on one box, from its
    formula: f [H, W, C]; the box in input pixels; returns [pooled, pooled, C]."""
    height, width = f.shape[:2]
    x0, y0, x1, y1 = (v / stride - 0.5 for v in box_xyxy)
    bin_h, bin_w = (y1 - y0) / pooled, (x1 - x0) / pooled
    grid_h, grid_w = math.ceil((y1 - y0) / pooled), math.ceil((x1 - x0) / pooled)

    def sample(y, x):
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return np.zeros(f.shape[-1])
        y, x = max(y, 0.0), max(x, 0.0)
        yl, xl = int(y), int(x)
        yh, xh = min(yl + 1, height - 1), min(xl + 1, width - 1)
        if yl >= height - 1:
            yl = yh = height - 1
            y = float(yl)
        if xl >= width - 1:
            xl = xh = width - 1
            x = float(xl)
        ly, lx = y - yl, x - xl
        return (
            (1 - ly) * (1 - lx) * f[yl, xl]
            + (1 - ly) * lx * f[yl, xh]
            + ly * (1 - lx) * f[yh, xl]
            + ly * lx * f[yh, xh]
        )

    out = np.zeros((pooled, pooled, f.shape[-1]))
    for i in range(pooled):
        for j in range(pooled):
            points = [
                sample(
                    y0 + i * bin_h + (a + 0.5) * bin_h / grid_h,
                    x0 + j * bin_w + (b + 0.5) * bin_w / grid_w,
                )
                for a in range(grid_h)
                for b in range(grid_w)
            ]
            out[i, j] = np.mean(points, axis=0)
    return out


def _detectron2_mask_branch(arrays, pyramid, boxes_xyxy, classes0):
    """detectron2's mask branch at inference, in NumPy: ROIPooler (Eq. 1 with its 1e-8 on
    P2..P5, canonical 224 / level 4; ROIAlignV2 14x14), MaskRCNNConvUpsampleHead (mask_fcn1..4
    3x3 + ReLU, deconv 2x2/2 + ReLU, 1x1 predictor) and mask_rcnn_inference (sigmoid of the
    predicted class's channel, classes 0..79): [R, 28, 28]."""
    p = "roi_heads.mask_head."
    out = []
    for box, cls in zip(boxes_xyxy, classes0):
        size = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
        level = int(np.clip(math.floor(4 + math.log2(size / 224 + 1e-8)), 2, 5))
        x = _detectron2_roi_align_v2(pyramid[f"P{level}"], box, 2**level, 14)
        for i in range(1, 5):
            w, b = arrays[f"{p}mask_fcn{i}.weight"], arrays[f"{p}mask_fcn{i}.bias"]
            padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
            windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(0, 1))
            x = np.maximum(np.einsum("ijckl,ockl->ijo", windows, w) + b, 0)
        # ConvTranspose2d 2x2 stride 2: out[2i + a, 2j + b, o] = sum_c x[i, j, c] W[c, o, a, b].
        w, b = arrays[f"{p}deconv.weight"], arrays[f"{p}deconv.bias"]
        up = np.einsum("ijc,coab->iajbo", x, w).reshape(28, 28, -1) + b
        up = np.maximum(up, 0)
        logits = np.einsum("ijc,oc->oij", up, arrays[f"{p}predictor.weight"][:, :, 0, 0])
        logits += arrays[f"{p}predictor.bias"][:, None, None]  # [80, 28, 28]
        out.append(1.0 / (1.0 + np.exp(-logits[cls])))
    return np.stack(out)


def test_mask_branch_equals_detectron2_formulas(converted_mask):
    """Our RoIHeads.predict_masks (Eq. 1, RoIAlign, head, the class's channel, sigmoid) on boxes of
    four levels and classes 1, 80 and in between equals detectron2's mask branch in NumPy on the
    file's own arrays to 1e-4."""
    arrays, _, model = converted_mask
    rng = np.random.default_rng(6)
    image = (480, 544)
    pyramid = {
        f"P{k}": rng.normal(0, 1, (image[0] // 2**k, image[1] // 2**k, 256)).astype(np.float32)
        for k in range(2, 7)
    }
    # xyxy in input pixels: sqrt(area) 40 (P2), 120 (P3), 270 (P4), 489 (P5), a 1:3 box (P2).
    boxes = np.array(
        [
            [10.3, 20.7, 50.3, 60.7],
            [100.2, 50.1, 220.2, 170.1],
            [200.5, 80.5, 470.5, 350.5],
            [15.0, 10.0, 535.0, 470.0],
            [300.0, 30.0, 360.0, 210.0],
        ],
        np.float64,
    )
    classes = np.array([1, 80, 17, 45, 2], np.int32)  # ours 1..80; detectron2's 0..79
    expected = _detectron2_mask_branch(arrays, pyramid, boxes, classes - 1)
    detections = Detections(
        tf.constant(boxes[None, :, [1, 0, 3, 2]], tf.float32),
        tf.zeros([1, len(boxes)]),
        tf.constant(classes[None]),
        tf.constant([len(boxes)], tf.int32),
    )
    features = {level: tf.constant(f[None]) for level, f in pyramid.items()}
    ours = model.roi_heads.predict_masks(features, detections)[0].numpy()
    assert ours.shape == expected.shape == (5, 28, 28)
    assert expected.min() < 0.1 and expected.max() > 0.9  # not saturated: the values matter
    error = float(np.max(np.abs(ours - expected)))
    print(f"mask branch vs detectron2's formulas: max abs probability error {error:.1e}")
    assert error < 1e-4
