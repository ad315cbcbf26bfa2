"""torchvision's ``fasterrcnn_resnet50_fpn`` outputs, stage by stage, for the equality test.

    python tests/scripts/torchvision_reference.py OUT_DIR

Runs in its own process, with PyTorch alone: importing torchvision after TensorFlow crashes
(torchvision's ops pull in triton, whose native library segfaults next to TensorFlow's; seen
with torch 2.14.1 / TF 2.20), and the test process has TensorFlow loaded. Writes
``OUT_DIR/fasterrcnn_resnet50_fpn_random.pth`` (the state dict to convert) and
``OUT_DIR/reference.npz``: the uint8 images and, per pair of images (one padded batch), the
resized sizes, C2..C5, P2..P6, the RPN head's outputs in our layout (NHWC, flattened as our
anchors, deltas as (dy, dx, dh, dw)), the proposals (xyxy), the box head's probabilities and
deltas on those proposals, and per image the final detections.

The weights are random, made confident and spread as trained weights are: BatchNorm statistics
of these images with a random affine part, RPN objectness logits of std 2 and deltas of std 0.1,
class logits of std 3 with COCO's 10 unused ids held at -30 (after training on COCO they are
never a positive) and a background bias that leaves at least 80 candidates per image above the 0.05
threshold, box deltas of std 0.1.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn

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
YXYX = [1, 0, 3, 2]  # xyxy <-> yxyx, and (dx, dy, dw, dh) -> (dy, dx, dh, dw)


def make_images():
    """Smooth random uint8 images (low-frequency noise upsampled, plus a little pixel noise)."""
    rng = np.random.default_rng(0)
    out = []
    for h, w in IMAGE_SIZES:
        coarse = rng.uniform(0, 255, size=(12, 12, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
        out.append(np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8))
    return out


def to_torch(image):
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0


def nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def make_model(images):
    torch.manual_seed(0)
    tv = fasterrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=91,
        min_size=SHORT_SIDE,
        max_size=MAX_LONG_SIDE,
    )
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
    tv.train()
    image_list, _ = tv.transform([to_torch(i) for i in images])
    tv.backbone.body(image_list.tensors)
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.7, 1.3)
            m.bias.normal_(0.0, 0.1)
    tv.eval()
    features = tv.backbone(image_list.tensors)
    logits, deltas = tv.rpn.head(list(features.values()))
    head = tv.rpn.head
    head.cls_logits.weight *= 2.0 / torch.cat([x.flatten() for x in logits]).std()
    head.bbox_pred.weight *= 0.1 / torch.cat([x.flatten() for x in deltas]).std()
    proposals, _ = tv.rpn(image_list, features)
    pooled = tv.roi_heads.box_roi_pool(features, proposals, image_list.image_sizes)
    hidden = tv.roi_heads.box_head(pooled)
    predictor = tv.roi_heads.box_predictor
    predictor.cls_score.weight *= 3.0 / predictor.cls_score(hidden).std()
    predictor.cls_score.bias[list(COCO_UNUSED_IDS)] = -30.0
    # Background bias such that every image has at least 80 (RoI, class) pairs above 0.05 (the
    # detection threshold): after NMS the detections then spread from ~0.05 to ~1.
    logits = predictor.cls_score(hidden).numpy().astype(np.float64)
    splits = np.cumsum([len(p) for p in proposals])[:-1]
    low, high = 0.0, 40.0
    for _ in range(40):
        bias = (low + high) / 2
        shifted = logits.copy()
        shifted[:, 0] += bias
        probs = np.exp(shifted - shifted.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        fewest = min(part.sum() for part in np.split(probs[:, 1:] > 0.05, splits))
        low, high = (bias, high) if fewest > 80 else (low, bias)
    predictor.cls_score.bias[0] += bias
    predictor.bbox_pred.weight *= 0.1 / predictor.bbox_pred(hidden).std()
    return tv


@torch.no_grad()
def reference_outputs(tv, images):
    out = {f"image_{i}": image for i, image in enumerate(images)}
    for b in range(0, len(images), 2):
        batch = [to_torch(i) for i in images[b : b + 2]]
        image_list, _ = tv.transform(batch)
        out[f"pair{b}_sizes"] = np.array(image_list.image_sizes)
        out[f"pair{b}_padded"] = np.array(image_list.tensors.shape[-2:])
        body = tv.backbone.body(image_list.tensors)
        for k, level in enumerate(("C2", "C3", "C4", "C5")):
            out[f"pair{b}_{level}"] = nhwc(body[str(k)])
        features = tv.backbone(image_list.tensors)
        pyramid = list(features.values())
        levels = ("P2", "P3", "P4", "P5", "P6")
        for level, p in zip(levels, pyramid):
            out[f"pair{b}_{level}"] = nhwc(p)
        logits, deltas = tv.rpn.head(pyramid)
        for level, lo, de in zip(levels, logits, deltas):
            n, a, h, w = lo.shape
            out[f"pair{b}_objectness_{level}"] = nhwc(lo).reshape(n, -1)
            d = de.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
            out[f"pair{b}_deltas_{level}"] = d[..., YXYX].numpy()
        proposals, _ = tv.rpn(image_list, features)
        for k, boxes in enumerate(proposals):
            out[f"pair{b}_proposals_{k}"] = boxes.numpy()
            one = {name: f[k : k + 1] for name, f in features.items()}
            pooled = tv.roi_heads.box_roi_pool(one, [boxes], [image_list.image_sizes[k]])
            class_logits, box_regression = tv.roi_heads.box_predictor(tv.roi_heads.box_head(pooled))
            out[f"pair{b}_probs_{k}"] = torch.softmax(class_logits, -1).numpy()
            out[f"pair{b}_box_deltas_{k}"] = box_regression.reshape(len(boxes), 91, 4).numpy()
    for i, image in enumerate(images):
        detections = tv([to_torch(image)])[0]
        out[f"detections_{i}_boxes"] = detections["boxes"].numpy()
        out[f"detections_{i}_scores"] = detections["scores"].numpy()
        out[f"detections_{i}_labels"] = detections["labels"].numpy()
    return out


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    images = make_images()
    tv = make_model(images)
    torch.save(tv.state_dict(), os.path.join(out_dir, "fasterrcnn_resnet50_fpn_random.pth"))
    np.savez(os.path.join(out_dir, "reference.npz"), **reference_outputs(tv, images))
    print(f"torch {torch.__version__}; wrote {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])
