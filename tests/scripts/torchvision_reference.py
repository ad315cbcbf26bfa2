"""torchvision's ``maskrcnn_resnet50_fpn`` outputs, stage by stage, for the equality test.

    python tests/scripts/torchvision_reference.py OUT_DIR

Runs in its own process, with PyTorch alone: importing torchvision after TensorFlow crashes
(torchvision's ops pull in triton, whose native library segfaults next to TensorFlow's; seen
with torch 2.14.1 / TF 2.20), and the test process has TensorFlow loaded. Writes
``OUT_DIR/maskrcnn_resnet50_fpn_random.pth`` (the Mask R-CNN state dict to convert),
``OUT_DIR/fasterrcnn_resnet50_fpn_random.pth`` (the same weights without the mask head's keys:
a ``fasterrcnn_resnet50_fpn`` state dict, checked here to load strictly into one) and
``OUT_DIR/reference.npz``: the uint8 images and, per pair of images (one padded batch), the
resized sizes, C2..C5, P2..P6, the RPN head's outputs in our layout (NHWC, flattened as our
anchors, deltas as (dy, dx, dh, dw)), the proposals (xyxy), the box head's probabilities and
deltas on those proposals, and per image the final detections (one image per batch, as
``model([image])``): boxes (xyxy) in the original image and in the resized one, scores, labels,
the box-relative 28x28 mask probabilities of each detection's label (``mask_roi_pool``,
``mask_head``, ``mask_predictor`` on the final boxes in the resized frame, sigmoid) and
torchvision's pasted masks in the original image, ``masks >= 0.5`` as ``np.packbits`` of the
flattened [N, H, W] bools.

The weights are random, made confident and spread as trained weights are: BatchNorm statistics
of these images with a random affine part, RPN objectness logits of std 2 and deltas of std 0.1,
class logits of std 3 with COCO's 10 unused ids held at -30 (after training on COCO they are
never a positive) and a background bias that leaves at least 80 candidates per image above the 0.05
threshold, box deltas of std 0.1. The mask head is planted so masks are smooth regions that vary
across the box (as trained masks are, not per-pixel noise, and not all 0.5): each 3x3 conv is
mostly a 3x3 box filter mixing channels plus a third of its random kernel (so the kernel's
orientation still matters), the deconv's four taps share a common part plus a thirtieth of their
own random part (more makes a 28x28 checkerboard; this still changes the masks by ~0.1 when the
deconv is flipped), and the logits get std 3 with a per-class bias at the median logit, so about
half of the pixels are above 0.5 (the script checks: mean within-box std > 0.15, fraction above
0.5 in (0.2, 0.8); measured 0.180 and 0.493).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn
from torchvision.models.detection.roi_heads import maskrcnn_inference

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
MASK_PREFIXES = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")
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
    tv = maskrcnn_resnet50_fpn(
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
    plant_mask_head(tv, image_list, features)
    return tv


def _mask_probabilities(tv, features, boxes, image_sizes, labels):
    """The box-relative [N, 28, 28] mask probabilities of each box's label, as roi_heads does."""
    pooled = tv.roi_heads.mask_roi_pool(features, boxes, image_sizes)
    logits = tv.roi_heads.mask_predictor(tv.roi_heads.mask_head(pooled))
    return torch.cat(maskrcnn_inference(logits, labels))[:, 0], logits


@torch.no_grad()
def plant_mask_head(tv, image_list, features):
    rng = torch.Generator().manual_seed(1)
    for block in tv.roi_heads.mask_head:
        conv = block[0]
        out_c, in_c = conv.weight.shape[:2]
        mixing = torch.randn(out_c, in_c, 1, 1, generator=rng) * (2.0 / in_c) ** 0.5 / 3.0
        conv.weight.copy_(mixing.expand(-1, -1, 3, 3) + conv.weight / 3.0)
        conv.bias.normal_(0.0, 0.05, generator=rng)
    deconv = tv.roi_heads.mask_predictor.conv5_mask
    mean = deconv.weight.mean(dim=(2, 3), keepdim=True)
    deconv.weight.copy_(2.0 * mean + (deconv.weight - mean) / 30.0)
    # Scale on the final detections of the calibration images (where masks are predicted).
    detections, _ = tv.roi_heads(features, tv.rpn(image_list, features)[0], image_list.image_sizes)
    boxes = [d["boxes"] for d in detections]
    logits_layer = tv.roi_heads.mask_predictor.mask_fcn_logits
    _, logits = _mask_probabilities(
        tv, features, boxes, image_list.image_sizes, [d["labels"] for d in detections]
    )
    logits_layer.weight *= 3.0 / logits.std()
    logits_layer.bias.zero_()
    _, logits = _mask_probabilities(
        tv, features, boxes, image_list.image_sizes, [d["labels"] for d in detections]
    )
    logits_layer.bias.copy_(-logits.transpose(0, 1).reshape(logits.shape[1], -1).median(1).values)


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
    spread = []
    for i, image in enumerate(images):
        # GeneralizedRCNN.forward step by step, to keep the resized-frame boxes and 28x28 masks.
        image_list, _ = tv.transform([to_torch(image)])
        features = tv.backbone(image_list.tensors)
        proposals, _ = tv.rpn(image_list, features)
        detections, _ = tv.roi_heads(features, proposals, image_list.image_sizes)
        resized = detections[0]
        probs, _ = _mask_probabilities(
            tv, features, [resized["boxes"]], image_list.image_sizes, [resized["labels"]]
        )
        assert torch.equal(probs, resized["masks"][:, 0])  # what roi_heads computed
        out[f"detections_{i}_resized_boxes"] = resized["boxes"].numpy()
        out[f"detections_{i}_mask_probs"] = probs.numpy()
        final = tv.transform.postprocess(detections, image_list.image_sizes, [image.shape[:2]])[0]
        out[f"detections_{i}_boxes"] = final["boxes"].numpy()
        out[f"detections_{i}_scores"] = final["scores"].numpy()
        out[f"detections_{i}_labels"] = final["labels"].numpy()
        binary = final["masks"][:, 0].numpy() >= 0.5
        out[f"detections_{i}_masks"] = np.packbits(binary.reshape(-1))
        p = probs.numpy()
        spread.append((p.std(axis=(1, 2)).mean(), (p >= 0.5).mean(), binary.mean()))
    within_std, above_half, _ = np.mean(spread, axis=0)
    print(
        f"mask probabilities: mean within-box std {within_std:.3f}, "
        f"fraction >= 0.5 {above_half:.3f}"
    )
    assert within_std > 0.15 and 0.2 < above_half < 0.8, spread  # masks vary across the box
    return out


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    images = make_images()
    tv = make_model(images)
    state = tv.state_dict()
    torch.save(state, os.path.join(out_dir, "maskrcnn_resnet50_fpn_random.pth"))
    boxes_only = {k: v for k, v in state.items() if not k.startswith(MASK_PREFIXES)}
    fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).load_state_dict(
        boxes_only  # strict: exactly a Faster R-CNN's keys
    )
    torch.save(boxes_only, os.path.join(out_dir, "fasterrcnn_resnet50_fpn_random.pth"))
    np.savez(os.path.join(out_dir, "reference.npz"), **reference_outputs(tv, images))
    print(f"torch {torch.__version__}; wrote {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])
