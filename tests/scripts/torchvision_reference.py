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

The model is built as ``maskrcnn_resnet50_fpn(weights=COCO_V1)`` builds it (`build_as_coco_v1`,
without the download): ``FrozenBatchNorm2d`` in the ResNet (the builder's ``norm_layer`` when
weights are given) with ``overwrite_eps(model, 0.0)``, what torchvision runs the published COCO_V1
files with; the state dicts are laid out as the published files (FrozenBatchNorm keys: no
``num_batches_tracked``). In every FrozenBatchNorm2d of the ResNet (stem and layer1..layer4)
every 16th channel has a running variance of 1e-6..1e-4 (`plant_small_variances`), the kind of
channel where the epsilon matters (eps 1e-5 scales it by sqrt(v / (v + 1e-5)): 0.30 at 1e-6,
0.95 at 1e-4); its conv and running mean are rescaled with it, so eps-0 outputs do not change
(checked on C2..C5 of a 128x128 crop of the first image, cheap: the rescaling is exact algebra).
``eps_relative_change`` in the npz: per C2..C5 of that crop, max |out(eps 1e-5) - out(eps 0)| /
max |out(eps 0)| (must be > 1e-2).

The weights are random, made confident and spread as trained weights are: FrozenBatchNorm
statistics of these images (each layer's input mean and variance, layer after layer, as a
BatchNorm's training pass computes them) with a random affine part, RPN objectness logits of std 2 and deltas of std 0.1,
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

import inspect
import os
import sys

import numpy as np
from PIL import Image
import torch
from torchvision.models import resnet50
from torchvision.models.detection import (
    FasterRCNN,
    MaskRCNN,
    fasterrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn,
)
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.ops.misc import FrozenBatchNorm2d

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
PLANT_EVERY = 16  # every 16th channel of each FrozenBatchNorm2d gets a small running variance
PLANT_LOG10_VARIANCE = (-6.0, -4.0)


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


def build_as_coco_v1(detector, **kwargs):
    """``maskrcnn_resnet50_fpn`` / ``fasterrcnn_resnet50_fpn`` (``detector``: MaskRCNN or
    FasterRCNN) as the builder makes it for ``weights=COCO_V1``, without the download: weights
    given -> ResNet-50 with ``norm_layer=FrozenBatchNorm2d``, 3 trainable backbone layers, 91
    classes; after loading COCO_V1 the builder calls ``overwrite_eps(model, 0.0)``, done here."""
    for builder in (fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn):  # the installed builders
        source = inspect.getsource(builder)
        assert "FrozenBatchNorm2d if is_trained else" in source, builder
        assert "overwrite_eps(model, 0.0)" in source, builder
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
    model = detector(backbone, num_classes=91, **kwargs)
    overwrite_eps(model, 0.0)
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(norms) == 53 and {m.eps for m in norms} == {0.0}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    return model


@torch.no_grad()
def calibrate_frozen_batch_norms(body, tensors):
    """Each FrozenBatchNorm2d of ``body`` gets the per-channel mean and variance of its input on
    ``tensors``, layer after layer in one forward pass (a forward pre-hook sets them before the
    layer runs, with its affine part the identity): the running statistics a BatchNorm2d's
    training pass with ``momentum=None`` would keep. Then a random affine part."""
    norms = [m for m in body.modules() if isinstance(m, FrozenBatchNorm2d)]

    def set_statistics(module, inputs):
        module.running_mean.copy_(inputs[0].mean(dim=(0, 2, 3)))
        module.running_var.copy_(inputs[0].var(dim=(0, 2, 3)))

    handles = [m.register_forward_pre_hook(set_statistics) for m in norms]
    try:
        body(tensors)
    finally:
        for handle in handles:
            handle.remove()
    for m in norms:
        m.weight.uniform_(0.7, 1.3)
        m.bias.normal_(0.0, 0.1)


@torch.no_grad()
def plant_small_variances(body, generator):
    """In every FrozenBatchNorm2d of the ResNet, every ``PLANT_EVERY``-th channel (from a random
    offset) gets the running variance 10**U(-6, -4); the conv before it (no bias) and the running
    mean are scaled by s = sqrt(v_new / v), so (x s - m s) / sqrt(v s^2) is the eps-0 output as
    before. Returns the smallest running variance per stage (stem, layer1..layer4)."""
    modules = dict(body.named_modules())
    smallest = {}
    for name, norm in modules.items():
        if not isinstance(norm, FrozenBatchNorm2d):
            continue
        if name.endswith("downsample.1"):
            conv = modules[name[: -len("1")] + "0"]
        else:  # bn1 -> conv1, layer1.0.bn2 -> layer1.0.conv2
            conv = modules[name.replace(".bn", ".conv") if "." in name else "conv1"]
        assert conv.bias is None and conv.out_channels == norm.running_var.numel(), name
        offset = int(torch.randint(PLANT_EVERY, (1,), generator=generator))
        channels = torch.arange(offset, conv.out_channels, PLANT_EVERY)
        low, high = PLANT_LOG10_VARIANCE
        target = 10.0 ** (low + (high - low) * torch.rand(len(channels), generator=generator))
        scale = (target / norm.running_var[channels]).sqrt()
        conv.weight[channels] *= scale.view(-1, 1, 1, 1)
        norm.running_mean[channels] *= scale
        norm.running_var[channels] = target
        stage = name.split(".")[0] if name.startswith("layer") else "stem"
        smallest[stage] = min(smallest.get(stage, 1.0), float(norm.running_var.min()))
    return smallest


def _relative_changes(outputs, reference):
    return [
        float((outputs[k] - reference[k]).abs().max() / reference[k].abs().max())
        for k in ("0", "1", "2", "3")
    ]


@torch.no_grad()
def make_model(images):
    torch.manual_seed(0)
    tv = build_as_coco_v1(MaskRCNN, min_size=SHORT_SIDE, max_size=MAX_LONG_SIDE)
    tv.eval()
    image_list, _ = tv.transform([to_torch(i) for i in images])
    calibrate_frozen_batch_norms(tv.backbone.body, image_list.tensors)
    crop = image_list.tensors[:1, :, :128, :128]  # the first image's corner (a few % of a pass)
    before = tv.backbone.body(crop)
    smallest = plant_small_variances(tv.backbone.body, torch.Generator().manual_seed(2))
    after = tv.backbone.body(crop)
    unchanged = _relative_changes(after, before)
    overwrite_eps(tv, 1e-5)
    eps_change = _relative_changes(tv.backbone.body(crop), after)
    overwrite_eps(tv, 0.0)
    print(
        f"smallest running variance per stage {smallest}; C2..C5 relative change by the plant "
        f"(eps 0) {unchanged}, by eps 1e-5 instead of 0 {eps_change}"
    )
    assert max(unchanged) < 1e-4 and min(eps_change) > 1e-2
    assert len(smallest) == 5 and all(1e-6 <= v <= 1e-4 for v in smallest.values()), smallest
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
    return tv, np.array(eps_change)


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
    tv, eps_change = make_model(images)
    state = tv.state_dict()
    assert not any(k.endswith("num_batches_tracked") for k in state)  # as the published files
    torch.save(state, os.path.join(out_dir, "maskrcnn_resnet50_fpn_random.pth"))
    boxes_only = {k: v for k, v in state.items() if not k.startswith(MASK_PREFIXES)}
    build_as_coco_v1(FasterRCNN).load_state_dict(boxes_only)  # strict: a Faster R-CNN's keys
    torch.save(boxes_only, os.path.join(out_dir, "fasterrcnn_resnet50_fpn_random.pth"))
    outputs = reference_outputs(tv, images)
    np.savez(os.path.join(out_dir, "reference.npz"), eps_relative_change=eps_change, **outputs)
    print(f"torch {torch.__version__}; wrote {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])
