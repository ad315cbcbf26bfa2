"""ONNX and builtins-only LiteRT exports (`fpn_tf.serving.onnx_export`, `.litert_export`) give the
SavedModel's detections.

A tiny Faster R-CNN and a tiny Mask R-CNN (test_export.py's: small_resnet, d=32, 64-96 px images,
random weights with the classifier scaled so that scores spread over (0, 1) and a 0.5 score
threshold; the mask predictor scaled too, so that masks are confident) are exported once per
module to a SavedModel, an ONNX file and a LiteRT file. On 9 images of different sizes and aspect
ratios plus one with no detection, every SavedModel detection must be matched one to one by a
detection of the other runtime on the same image: same class, box IoU > 0.99, score within 1e-4
(float32), masks pasted on the image with IoU > 0.99.
"""

import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("tf2onnx", reason="the [export] extra is not installed (tf2onnx)")
pytest.importorskip("onnxruntime", reason="the [export] extra is not installed (onnxruntime)")
pytest.importorskip("ai_edge_litert", reason="the [export] extra is not installed (ai-edge-litert)")

from fpn_tf import portable_client  # noqa: E402
from fpn_tf.configs import ExperimentConfig, ResizeConfig, save_config  # noqa: E402
from data_testing import pattern  # noqa: E402
from fpn_tf.data import transforms  # noqa: E402
from fpn_tf.modeling.factory import build_model  # noqa: E402
from fpn_tf.ops import mask_ops  # noqa: E402
from fpn_tf.serving import ExportError, export_saved_model  # noqa: E402
from fpn_tf.serving.litert_export import export_litert, non_builtin_ops  # noqa: E402
from fpn_tf.serving.onnx_export import export_onnx  # noqa: E402
from test_export import CATEGORY_MAP, CONFIG, RESIZE  # noqa: E402
import watched  # noqa: E402

# (height, width): landscape, portrait, square, extreme ratios.
SIZES = [
    (64, 96),
    (70, 90),
    (101, 63),
    (50, 50),
    (40, 120),
    (120, 45),
    (81, 77),
    (96, 64),
    (33, 47),
]


def _config(architecture):
    cfg = json.loads(json.dumps(CONFIG))
    cfg["model"]["architecture"] = architecture
    if architecture == "mask_rcnn":
        cfg["model"]["mask_head"] = {"num_convs": 1, "conv_dims": 16}
    return ExperimentConfig.from_dict(cfg)


# Added to the background logit: with it some of the images give no detection at all (the
# SavedModel's counts per image: faster_rcnn 7 7 6 0 3 12 4 5 0 18, mask_rcnn 1 4 1 0 0 7 5 13 0 9).
BACKGROUND_BIAS = {"faster_rcnn": 8.0, "mask_rcnn": 10.0}


def _model(architecture, seed=0):
    keras.utils.set_random_seed(seed)
    model = build_model(_config(architecture).model, category_ids=list(CATEGORY_MAP.dataset_ids))
    classifier = model.roi_heads.box_head.classifier
    classifier.kernel.assign(classifier.kernel * 30.0)
    bias = classifier.bias.numpy()
    bias[0] += BACKGROUND_BIAS.get(architecture, 0.0)
    classifier.bias.assign(bias)
    if model.roi_heads.mask_head is not None:
        predictor = model.roi_heads.mask_head.predictor
        predictor.kernel.assign(predictor.kernel * 30.0)
    return model


def _images():
    images = [pattern(h, w, seed=i + 1) for i, (h, w) in enumerate(SIZES)]
    images.append(np.zeros((60, 80, 3), np.uint8))  # a black image
    return images


@pytest.fixture(scope="module", params=["faster_rcnn", "mask_rcnn"])
def exported(request, tmp_path_factory):
    """(architecture, SavedModel signature, ONNX detector, LiteRT detector, paths)."""
    model = _model(request.param)
    root = tmp_path_factory.mktemp(request.param)
    saved = export_saved_model(model, str(root / "saved_model"), CATEGORY_MAP, RESIZE)
    onnx_path = export_onnx(model, str(root / "model.onnx"), CATEGORY_MAP, RESIZE)
    litert_path = export_litert(model, str(root / "model.tflite"), CATEGORY_MAP, RESIZE)
    signature = tf.saved_model.load(saved).signatures["serving_default"]
    return (
        request.param,
        signature,
        portable_client.load_detector(onnx_path),
        portable_client.load_detector(litert_path),
        {"saved_model": saved, "onnx": onnx_path, "litert": litert_path},
    )


def _saved_model(signature, image):
    out = signature(images=tf.constant(image[None]))
    return {k: v.numpy() for k, v in out.items()}


def _iou(a, b):
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else float(np.allclose(a, b))


def match_detections(ref, out, index, image_size, score_tol=1e-4):
    """Matches every detection of ``ref`` (image ``index``) one to one with one of ``out``: same
    class, box IoU > 0.99, |score difference| <= score_tol; with masks, pasted mask IoU > 0.99.
    Returns the number matched; fails on any unmatched detection or count difference."""
    n_ref, n_out = int(ref["num_detections"][index]), int(out["num_detections"][index])
    assert n_ref == n_out, f"image {index}: {n_ref} detections in the SavedModel, {n_out} here"
    h, w = image_size
    scale = np.array([h, w, h, w], np.float32)
    ref_boxes = ref["detection_boxes"][index, :n_ref] * scale
    out_boxes = out["detection_boxes"][index, :n_out] * scale
    masks = "detection_masks" in ref
    if masks:
        assert "detection_masks" in out
        ref_masks = mask_ops.paste_masks(ref["detection_masks"][index, :n_ref], ref_boxes, (h, w))
        out_masks = mask_ops.paste_masks(out["detection_masks"][index, :n_out], out_boxes, (h, w))
        ref_masks, out_masks = ref_masks.numpy() >= 0.5, out_masks.numpy() >= 0.5
    used = set()
    for i in range(n_ref):
        found = None
        for j in range(n_out):
            if (
                j in used
                or out["detection_classes"][index, j] != ref["detection_classes"][index, i]
            ):
                continue
            if (
                abs(out["detection_scores"][index, j] - ref["detection_scores"][index, i])
                > score_tol
            ):
                continue
            if _iou(ref_boxes[i], out_boxes[j]) <= 0.99:
                continue
            if masks:
                inter = np.logical_and(ref_masks[i], out_masks[j]).sum()
                union = np.logical_or(ref_masks[i], out_masks[j]).sum()
                if union and inter / union <= 0.99:
                    continue
            found = j
            break
        assert found is not None, (
            f"image {index}: SavedModel detection {i} (class "
            f"{ref['detection_classes'][index, i]}, score {ref['detection_scores'][index, i]:.5f}, "
            f"box {ref_boxes[i]}) has no match"
        )
        used.add(found)
    return n_ref


@pytest.mark.slow
def test_onnx_and_litert_detections_equal_the_saved_models(exported):
    architecture, signature, onnx_detector, litert_detector, _ = exported
    counts = {"saved_model": 0, "onnx": 0, "litert": 0}
    empty = 0
    images = _images()
    for image in images:
        ref = _saved_model(signature, image)
        counts["saved_model"] += int(ref["num_detections"][0])
        onnx_out = onnx_detector(image)
        counts["onnx"] += match_detections(ref, onnx_out, 0, image.shape[:2])
        litert_out = litert_detector(image)
        counts["litert"] += match_detections(ref, litert_out, 0, image.shape[:2])
        for out in (onnx_out, litert_out):
            assert out["detection_boxes"].shape == (1, 100, 4)
            if ref["num_detections"][0] == 0:  # an image with no detection: zero rows
                empty += 1
                assert not out["detection_boxes"].any() and not out["detection_scores"].any()
                assert not out["detection_classes"].any()
    print(
        f"{architecture}: detections matched over {len(images)} images: {counts} "
        f"({empty} image inputs with no detection)"
    )
    assert counts["saved_model"] >= 30, counts  # enough detections to compare
    assert counts["onnx"] == counts["litert"] == counts["saved_model"], counts
    assert empty >= 2


@pytest.mark.slow
def test_onnx_takes_a_batch_of_several_images(exported):
    _, signature, onnx_detector, _, _ = exported
    images = np.stack([pattern(70, 90, seed=s) for s in (3, 4, 5)])
    ref = {k: v.numpy() for k, v in signature(images=tf.constant(images)).items()}
    out = onnx_detector(images)
    assert out["detection_boxes"].shape == (3, 100, 4)
    for i in range(3):
        assert match_detections(ref, out, i, (70, 90)) > 0


@pytest.mark.parametrize("rounding", ["round", "floor", "half_up"])
def test_litert_client_resizes_as_the_saved_model(rounding):
    """The client's NumPy resize rule and bilinear resampling are TensorFlow's."""
    rng = np.random.default_rng(0)
    # (41, 82) and (7, 602): float32 "round" arithmetic (TensorFlow's) differs from float64's.
    extra = [(19, 86), (22, 800), (480, 640), (41, 82), (7, 602)]
    sizes = [(h, w) for h, w in rng.integers(1, 2000, (300, 2))] + extra
    for short, long in ((800, 1333), (600, 1000), (64, 96)):
        rule = ResizeConfig(short_side=short, max_long_side=long, rounding=rounding)
        want = transforms.resized_size(tf.constant(sizes), rule).numpy()
        got = [portable_client.resized_size(h, w, short, long, rounding) for h, w in sizes]
        np.testing.assert_array_equal(np.array(got), want)
    for (h, w), size in (
        ((70, 90), (64, 82)),
        ((101, 63), (96, 60)),
        ((33, 47), (64, 91)),
        ((40, 120), (32, 96)),
        ((64, 96), (64, 96)),
    ):
        image = pattern(h, w, seed=h)
        want = tf.image.resize(tf.cast(image, tf.float32), size).numpy()
        np.testing.assert_allclose(portable_client.resize_bilinear(image, size), want, atol=2e-4)


def test_a_serving_config_without_its_resize_section_is_refused(tmp_path):
    model = tmp_path / "model.tflite"
    flat = {"short_side": 800, "max_long_side": 1333, "pad_multiple": 32, "num_detections": 100}
    (tmp_path / "model.serving_config.json").write_text(json.dumps(flat))
    with pytest.raises(ValueError, match=r"model.serving_config.json has no 'resize' section"):
        portable_client.read_serving_config(model)
    (tmp_path / "model.serving_config.json").write_text(json.dumps({"resize": RESIZE.to_dict()}))
    assert portable_client.read_serving_config(model)["resize"] == RESIZE.to_dict()


@pytest.mark.slow
def test_litert_file_has_builtin_ops_only_and_runs_without_tensorflow(exported):
    architecture, _, _, litert_detector, paths = exported
    with open(paths["litert"], "rb") as f:
        content = f.read()
    assert non_builtin_ops(content) == []
    script = (
        "import json, sys\n"
        "import numpy as np\n"
        "from fpn_tf import portable_client\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "from data_testing import pattern\n"
        "from ai_edge_litert.interpreter import Interpreter\n"
        f"it = Interpreter(model_path={paths['litert']!r})\n"
        "it.allocate_tensors()\n"
        f"d = portable_client.load_detector({paths['litert']!r})\n"
        "inputs = portable_client.resize_for_litert(pattern(70, 90, seed=1), d.config)\n"
        "it.get_signature_runner()(**inputs)  # resizes, allocates and invokes\n"
        "out = d(pattern(70, 90, seed=1))\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "print(json.dumps({k: np.asarray(v).tolist() for k, v in out.items()}))\n"
    )
    done = watched.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = {k: np.array(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    here = litert_detector(pattern(70, 90, seed=1))
    assert int(fresh["num_detections"][0]) > 0
    assert match_detections(here, fresh, 0, (70, 90), score_tol=1e-6) > 0


@pytest.mark.slow
def test_sidecars_hold_the_label_map_and_serving_config(exported):
    _, _, onnx_detector, litert_detector, paths = exported
    for detector in (onnx_detector, litert_detector):
        assert detector.class_names == dict(zip(CATEGORY_MAP.dataset_ids, CATEGORY_MAP.names))
        assert os.path.exists(portable_client.sidecar_path(detector.path, ".label_map.pbtxt"))
    for detector in (onnx_detector, litert_detector):
        assert detector.config["resize"] == RESIZE.to_dict()
    assert not [p for p in os.listdir(os.path.dirname(paths["onnx"])) if p.endswith(".partial")]


@pytest.mark.slow
def test_quantized_litert_variants_convert_and_run(tmp_path):
    model = _model("faster_rcnn")
    image = pattern(64, 96, seed=1)
    counts = {}
    for quantization in ("float16", "dynamic_int8"):
        path = export_litert(
            model,
            str(tmp_path / f"{quantization}.tflite"),
            CATEGORY_MAP,
            RESIZE,
            quantization=quantization,
        )
        with open(path, "rb") as f:
            assert non_builtin_ops(f.read()) == []
        out = portable_client.load_detector(path)(image)
        assert out["detection_boxes"].shape == (1, 100, 4)
        counts[quantization] = int(out["num_detections"][0])
    print(f"quantized LiteRT detections on one image: {counts}")


def test_segment_proposals_cannot_be_exported_and_nothing_is_written(tmp_path):
    cfg = json.loads(json.dumps(CONFIG))
    cfg["model"]["architecture"] = "segment_proposals"
    model = build_model(ExperimentConfig.from_dict(cfg).model)
    for fmt, export in (("onnx", export_onnx), ("tflite", export_litert)):
        with pytest.raises(ExportError, match="only detectors"):
            export(model, str(tmp_path / f"m.{fmt}"), CATEGORY_MAP, RESIZE)
    assert os.listdir(tmp_path) == []


def test_detectron2s_pil_resize_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    """`resize.method: pil_bilinear` (detectron2's configs) has no portable equivalent: refused
    with the override that exports anyway, rather than silently resized another way."""
    model = _model("faster_rcnn")
    pil = ResizeConfig(RESIZE.short_side, RESIZE.max_long_side, method="pil_bilinear")
    match = "eval_data.resize.method 'pil_bilinear' is not exported"
    for fmt, export in (("onnx", export_onnx), ("tflite", export_litert)):
        with pytest.raises(ExportError, match=match) as e:
            export(model, str(tmp_path / f"m.{fmt}"), CATEGORY_MAP, pil)
        assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    model = _model("faster_rcnn", seed=7)
    save_config(_config("faster_rcnn"), path)
    CATEGORY_MAP.to_json(os.path.join(path, "category_map.json"))
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model), path, max_to_keep=1).save()
    return path


@pytest.mark.slow
def test_export_command_writes_onnx_and_refuses_segment_proposals(model_dir, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = tmp_path / "out"
    done = watched.run(
        [
            sys.executable,
            "-m",
            "fpn_tf.export",
            f"--model_dir={model_dir}",
            f"--export_dir={out}",
            "--format=onnx",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(
        ["model.onnx"]
        + [f"model{s}" for s in (".category_map.json", ".label_map.pbtxt", ".serving_config.json")]
    ), os.listdir(out)
    image = pattern(70, 90, seed=2)
    a = portable_client.load_detector(out / "model.onnx")(image)
    assert int(a["num_detections"][0]) > 0

    bad = tmp_path / "seg"
    bad.mkdir()
    cfg = json.loads(json.dumps(CONFIG))
    cfg["model"]["architecture"] = "segment_proposals"
    save_config(ExperimentConfig.from_dict(cfg), str(bad))
    CATEGORY_MAP.to_json(str(bad / "category_map.json"))
    seg = build_model(ExperimentConfig.from_dict(cfg).model)
    tf.train.CheckpointManager(tf.train.Checkpoint(model=seg), str(bad), max_to_keep=1).save()
    failed = watched.run(
        [
            sys.executable,
            "-m",
            "fpn_tf.export",
            f"--model_dir={bad}",
            f"--export_dir={tmp_path / 'seg_out'}",
            "--format=onnx",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "only detectors" in failed.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "seg_out") or not os.listdir(tmp_path / "seg_out")


@pytest.mark.slow
def test_predict_gives_the_same_detections_from_each_format(exported, tmp_path):
    from data_testing import write_image
    from fpn_tf.predict import predict

    architecture, _, _, _, paths = exported
    image = str(tmp_path / "a.png")
    write_image(image, pattern(70, 90, seed=3))
    records = {
        fmt: predict(path, [image], str(tmp_path / fmt), min_score=0.3)[0]
        for fmt, path in paths.items()
    }
    ref = records["saved_model"]["detections"]
    assert ref, "no detections to compare"
    for fmt in ("onnx", "litert"):
        got = records[fmt]["detections"]
        assert len(got) == len(ref), fmt
        for a, b in zip(ref, got):
            assert a["class_id"] == b["class_id"] and abs(a["score"] - b["score"]) < 1e-4
            np.testing.assert_allclose(a["box_normalized"], b["box_normalized"], atol=1e-4)
            if architecture == "mask_rcnn":
                from pycocotools import mask as mask_utils

                ma, mb = (mask_utils.decode(dict(d["segmentation"])) for d in (a, b))
                assert np.logical_and(ma, mb).sum() > 0.99 * np.logical_or(ma, mb).sum()
        assert os.path.exists(records[fmt]["drawn"])


@pytest.fixture(scope="module")
def trained_mask_rcnn(tmp_path_factory):
    """A tiny Mask R-CNN trained on generated shapes (64 training, 16 held-out images)."""
    from conftest import TINY_OVERRIDES
    from fpn_tf.configs.loader import load_config
    from fpn_tf.training.trainer import Trainer

    root = tmp_path_factory.mktemp("trained")
    overrides = dict(TINY_OVERRIDES)
    for split, n in (("train_data", 64), ("eval_data", 16)):
        overrides.update(
            {
                f"{split}.synthetic.output_dir": str(root / "shapes"),
                f"{split}.synthetic.num_images": n,
                f"{split}.synthetic.image_size": [64, 96],
                f"{split}.synthetic.max_objects": 3,
                f"{split}.resize.short_side": 64,
                f"{split}.resize.max_long_side": 96,
            }
        )
    overrides.update(
        {
            "model.anchor.sizes": [16, 32, 64, 128, 256],
            "model.mask.num_convs": 1,
            "model.mask.conv_dims": 16,
            "train_data.mask_crop_size": 28,
            "train_data.global_batch_size": 4,
            "train.total_steps": TRAIN_STEPS,
            "train.warmup_steps": 10,
            "train.learning_rate": 6e-3,
            "train.decay_steps": [10000],
            "train.checkpoint_every_steps": TRAIN_STEPS,
            "train.log_every_steps": 100,
            "train.summary_every_steps": TRAIN_STEPS,
        }
    )
    Trainer(load_config("configs/cpu_demo_mask.yaml", overrides), str(root / "run")).train()
    return str(root / "run")


TRAIN_STEPS = 300


@pytest.mark.slow
def test_held_out_ap_after_export_equals_the_saved_models(trained_mask_rcnn):
    """Box and mask AP of the held-out split (the project's COCOEvaluator), each format at
    batch 1: ONNX Runtime and LiteRT float32 within 0.002 of the SavedModel; the quantized
    LiteRT variants' differences are printed, not asserted."""
    from bench.export_ap import FORMATS, format_ap
    from fpn_tf.modeling.model_dir import load_model

    results = format_ap(load_model(trained_mask_rcnn), FORMATS)
    base = results["saved_model"][0]
    lines = []
    for fmt, (metrics, _) in results.items():
        lines.append(
            f"{fmt}: box AP {metrics['AP']:.5f} ({metrics['AP'] - base['AP']:+.5f}), mask AP "
            f"{metrics['mask_AP']:.5f} ({metrics['mask_AP'] - base['mask_AP']:+.5f})"
        )
    print("held-out AP after export:\n" + "\n".join(lines))
    assert base["AP"] > 0.05 and base["mask_AP"] > 0.05, lines  # a model that detects
    for fmt in ("onnx", "litert_none"):
        for key in ("AP", "mask_AP"):
            assert abs(results[fmt][0][key] - base[key]) <= 0.002, (fmt, key, lines)
