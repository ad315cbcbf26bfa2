"""Our detector equals torchvision's ``fasterrcnn_resnet50_fpn`` under the same weights.

torchvision makes the weights (random, with BatchNorm statistics calibrated on the test images
and a planted RPN / classifier scale so scores are confident and spread, as trained weights are),
``python -m fpn_tf.convert_weights --source=torchvision`` converts its state dict with
``configs/coco_r50_fpn_torchvision.yaml``, and the two models see the same 8 uint8 images of
different sizes and aspect ratios (short side 320, long side <= 512, to keep the test fast; the
rule is the same at 800 / 1333). Stage by stage: C2..C5 and P2..P6 (relative error), RPN
objectness and deltas, proposals, box-head outputs on torchvision's own proposals, and the final
detections of our SavedModel against torchvision's, matched one to one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

torch = pytest.importorskip("torch", reason="needs the [torch] extra (pip install -e '.[torch]')")
torchvision = pytest.importorskip("torchvision", reason="needs the [torch] extra")

from torchvision.models.detection import fasterrcnn_resnet50_fpn  # noqa: E402

from fpn_tf.conversion.layout import backbone_model  # noqa: E402
from fpn_tf.modeling.faster_rcnn import split_inputs  # noqa: E402
from fpn_tf.serving import detection as serving  # noqa: E402
from fpn_tf.serving.export import load_model_for_export  # noqa: E402

SHORT_SIDE, MAX_LONG_SIDE = 320, 512
# (height, width): landscape, portrait, square, 1:3 and 4:3, odd sizes; some hit the long-side cap.
IMAGE_SIZES = [
    (240, 320),
    (320, 240),
    (300, 500),
    (480, 360),
    (200, 600),
    (333, 257),
    (512, 512),
    (150, 401),
]
COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images():
    """Smooth random uint8 images (low-frequency noise upsampled, plus a little pixel noise)."""
    rng = np.random.default_rng(0)
    out = []
    for h, w in IMAGE_SIZES:
        coarse = rng.uniform(0, 255, size=(1, 12, 12, 3)).astype(np.float32)
        smooth = tf.image.resize(coarse, (h, w), method="bicubic")[0].numpy()
        noisy = smooth + rng.normal(0, 8, size=smooth.shape)
        out.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return out


def _to_torch(image: np.ndarray):
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0


@torch.no_grad()
def _make_reference(images):
    """torchvision's detector with weights whose outputs are confident and spread."""
    torch.manual_seed(0)
    tv = fasterrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=91,
        min_size=SHORT_SIDE,
        max_size=MAX_LONG_SIDE,
    )
    # BatchNorm statistics of these images (as a trained backbone's are of its data), then a
    # random affine part: the frozen BatchNorm conversion is exercised with non-trivial values.
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    tv.train()
    image_list, _ = tv.transform([_to_torch(i) for i in images])
    tv.backbone.body(image_list.tensors)
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.7, 1.3)
            m.bias.normal_(0.0, 0.1)
    tv.eval()
    features = list(tv.backbone(image_list.tensors).values())
    # RPN: objectness logits of std 2 and deltas of std 0.1 on these images.
    logits, deltas = tv.rpn.head(features)
    head = tv.rpn.head
    head.cls_logits.weight *= 2.0 / torch.cat([x.flatten() for x in logits]).std()
    head.bbox_pred.weight *= 0.1 / torch.cat([x.flatten() for x in deltas]).std()
    # Classifier: logits of std 3 over the used classes; COCO's 10 unused ids never win, as after
    # training on COCO (where they are never a positive).
    proposals, _ = tv.rpn(image_list, tv.backbone(image_list.tensors))
    feats = tv.backbone(image_list.tensors)
    pooled = tv.roi_heads.box_roi_pool(feats, proposals, image_list.image_sizes)
    hidden = tv.roi_heads.box_head(pooled)
    predictor = tv.roi_heads.box_predictor
    class_logits = predictor.cls_score(hidden)
    predictor.cls_score.weight *= 3.0 / class_logits.std()
    predictor.cls_score.bias[list(COCO_UNUSED_IDS)] = -30.0
    predictor.bbox_pred.weight *= 0.1 / predictor.bbox_pred(hidden).std()
    return tv


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    images = _images()
    tv = _make_reference(images)
    tmp = tmp_path_factory.mktemp("torchvision")
    checkpoint = str(tmp / "fasterrcnn_resnet50_fpn_random.pth")
    torch.save(tv.state_dict(), checkpoint)
    model_dir = str(tmp / "converted")
    override = (
        f"eval_data.short_side={SHORT_SIDE},eval_data.max_long_side={MAX_LONG_SIDE},"
        f"train_data.short_side={SHORT_SIDE},train_data.max_long_side={MAX_LONG_SIDE}"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fpn_tf.convert_weights",
            "--source=torchvision",
            f"--checkpoint={checkpoint}",
            f"--output_dir={model_dir}",
            f"--params_override={override}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ours = load_model_for_export(model_dir)
    return images, tv, ours, model_dir


def _relative(ours, theirs) -> float:
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-12))


def _pairs(images):
    return [images[i : i + 2] for i in range(0, len(images), 2)]


def _our_inputs(ours, batch):
    """Our preprocessing of a batch of uint8 images (the serving path) -> model inputs."""
    sizes = np.array([i.shape[:2] for i in batch], np.int32)
    dense = np.zeros((len(batch), *sizes.max(axis=0), 3), np.uint8)
    for k, image in enumerate(batch):
        dense[k, : image.shape[0], : image.shape[1]] = image
    prep = ours.preprocessing
    images, image_info = serving.preprocess_images(tf.constant(dense), tf.constant(sizes), **prep)
    images, image_info, valid_hw = split_inputs({"images": images, "image_info": image_info})
    return ours.model.fill_padding(images, image_info, valid_hw), valid_hw


@torch.no_grad()
def test_backbone_pyramid_and_rpn_head_equal_torchvision(models):
    images, tv, ours, _ = models
    model = ours.model
    worst = {}
    for batch in _pairs(images):
        image_list, _ = tv.transform([_to_torch(i) for i in batch])
        x, valid_hw = _our_inputs(ours, batch)
        assert tuple(x.shape[1:3]) == tuple(image_list.tensors.shape[-2:])
        np.testing.assert_array_equal(valid_hw.numpy(), np.array(image_list.image_sizes))
        c_theirs = tv.backbone.body(image_list.tensors)
        c_ours = backbone_model(model)(x)
        for k, level in enumerate(("C2", "C3", "C4", "C5")):
            theirs = c_theirs[str(k)].permute(0, 2, 3, 1).numpy()
            worst[level] = max(worst.get(level, 0), _relative(c_ours[level].numpy(), theirs))
        p_theirs = list(tv.backbone(image_list.tensors).values())
        p_ours = model.fpn(x)
        for k, level in enumerate(("P2", "P3", "P4", "P5", "P6")):
            theirs = p_theirs[k].permute(0, 2, 3, 1).numpy()
            worst[level] = max(worst.get(level, 0), _relative(p_ours[level].numpy(), theirs))
        logits_theirs, deltas_theirs = tv.rpn.head(p_theirs)
        logits_ours, deltas_ours = model.rpn.head_outputs(p_ours)
        for k, level in enumerate(("P2", "P3", "P4", "P5", "P6")):
            n, a, h, w = logits_theirs[k].shape
            theirs = logits_theirs[k].permute(0, 2, 3, 1).reshape(n, -1).numpy()
            worst["objectness"] = max(
                worst.get("objectness", 0), _relative(logits_ours[level].numpy(), theirs)
            )
            theirs = deltas_theirs[k].view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
            theirs = theirs[..., [1, 0, 3, 2]].numpy()  # (dx, dy, dw, dh) -> (dy, dx, dh, dw)
            worst["deltas"] = max(
                worst.get("deltas", 0), _relative(deltas_ours[level].numpy(), theirs)
            )
    print("relative errors:", {k: f"{v:.1e}" for k, v in worst.items()})
    for key, value in worst.items():
        assert value < 1e-4, (key, worst)


def _iou_xyxy(a, b):
    """IoU matrix of [N, 4] and [M, 4] xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


@torch.no_grad()
def test_proposals_and_box_head_equal_torchvision(models):
    images, tv, ours, _ = models
    model = ours.model
    matched_fractions, prob_errors, delta_errors = [], [], []
    rows = model.roi_heads.classifier_rows
    ids = np.array(model.category_ids)
    for batch in _pairs(images):
        image_list, _ = tv.transform([_to_torch(i) for i in batch])
        features = tv.backbone(image_list.tensors)
        proposals_theirs, _ = tv.rpn(image_list, features)
        x, valid_hw = _our_inputs(ours, batch)
        pyramid = model.fpn(x)
        proposals_ours, _ = model.rpn(pyramid, valid_hw)
        for k in range(len(batch)):
            theirs = proposals_theirs[k].numpy()
            assert len(theirs) == 1000
            valid = proposals_ours.valid[k].numpy()
            mine = proposals_ours.boxes[k].numpy()[valid][:, [1, 0, 3, 2]]
            best = _iou_xyxy(theirs, mine).max(axis=1)
            matched_fractions.append(float(np.mean(best > 0.99)))
            # Box head on torchvision's own proposals: same RoIs into both.
            pooled = tv.roi_heads.box_roi_pool(
                features, [proposals_theirs[k]], [image_list.image_sizes[k]]
            )
            class_logits, box_regression = tv.roi_heads.box_predictor(tv.roi_heads.box_head(pooled))
            probs_theirs = torch.softmax(class_logits, -1).numpy()
            rois = tf.constant(theirs[None][..., [1, 0, 3, 2]])
            one = {level: f[k : k + 1] for level, f in pyramid.items()}
            logits_ours, deltas_ours = model.roi_heads.box_outputs(one, rois)
            probs_ours = tf.nn.softmax(logits_ours[0], axis=-1).numpy()
            assert probs_ours.shape == probs_theirs.shape == (1000, 91)
            prob_errors.append(float(np.max(np.abs(probs_ours - probs_theirs))))
            theirs_deltas = box_regression.reshape(1000, 91, 4).numpy()[:, ids][..., [1, 0, 3, 2]]
            delta_errors.append(_relative(deltas_ours[0].numpy(), theirs_deltas))
    assert rows == [0] + list(ids)
    print(
        f"proposals matched at IoU > 0.99: min {min(matched_fractions):.4f}; box-head "
        f"probabilities max abs error {max(prob_errors):.1e}, deltas relative {max(delta_errors):.1e}"
    )
    assert min(matched_fractions) >= 0.99, matched_fractions
    assert max(prob_errors) < 1e-4, prob_errors
    assert max(delta_errors) < 1e-4, delta_errors


@torch.no_grad()
def test_saved_model_detections_equal_torchvision(models):
    images, tv, _, model_dir = models
    served = tf.saved_model.load(os.path.join(model_dir, "saved_model"))
    infer = served.signatures["serving_default"]
    counts, spreads = [], []
    for image in images:
        theirs = tv([_to_torch(image)])[0]
        boxes_t = theirs["boxes"].numpy()
        scores_t = theirs["scores"].numpy()
        labels_t = theirs["labels"].numpy()
        out = infer(images=tf.constant(image[None]))
        n = int(out["num_detections"][0])
        h, w = image.shape[:2]
        boxes_o = out["detection_boxes"][0, :n].numpy() * np.array([h, w, h, w])
        boxes_o = boxes_o[:, [1, 0, 3, 2]]
        scores_o = out["detection_scores"][0, :n].numpy()
        labels_o = out["detection_classes"][0, :n].numpy().astype(int)
        assert n == len(scores_t), (n, len(scores_t))
        assert n >= 20
        counts.append(n)
        spreads.append((float(scores_t.min()), float(scores_t.max())))
        iou = _iou_xyxy(boxes_t, boxes_o)
        same_class = labels_t[:, None] == labels_o[None, :]
        close_score = np.abs(scores_t[:, None] - scores_o[None, :]) < 1e-4
        candidates = (iou > 0.99) & same_class & close_score
        # One to one: every torchvision detection has its own match among ours.
        taken = set()
        for i in np.argsort(-scores_t):
            options = [j for j in np.nonzero(candidates[i])[0] if j not in taken]
            assert options, (i, boxes_t[i], scores_t[i], labels_t[i])
            taken.add(options[0])
    print(f"detections per image {counts}, score ranges {spreads}")
    lows, highs = zip(*spreads)
    assert min(lows) < 0.1 and max(highs) > 0.9  # confident and spread over [0.05, 1]
