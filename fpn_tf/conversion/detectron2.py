"""detectron2's ``faster_rcnn_R_{50,101}_FPN`` / ``mask_rcnn_R_{50,101}_FPN`` state dict -> our
detector's weights.

Key names of detectron2's model zoo (``backbone.bottom_up.res2.0.conv1.weight``, its FrozenBN as
``.norm.*``, ``backbone.fpn_lateral2``, ``proposal_generator.rpn_head.*``,
``roi_heads.box_head.fc1``, ``roi_heads.box_predictor.*``). Its classifier has 81 rows with the
background LAST; ours has it first, so the rows are rotated (the softmax is unchanged). Its 80
classes are COCO's categories in id order, as ours.

A state dict with ``roi_heads.mask_head.*`` keys is a Mask R-CNN (`architecture`):
``MaskRCNNConvUpsampleHead``'s 3x3 convs ``mask_fcn{1..4}`` (bias, ReLU), the 2x2 stride-2
``deconv`` (``ConvTranspose2d``, ReLU) and the 1x1 ``predictor`` of 80 class-specific masks, one
per contiguous class 0..79 and no background channel. Ours has C + 1 channels, channel k for
class k (1..C) and channel 0 unused (`fpn_tf.modeling.mask_head.MaskRCNNHead`): their channel
k - 1 becomes our channel k and channel 0 gets zeros.

Buffers of the model-zoo files that are not weights are checked, not converted (they are still
"used", so a file of another architecture is still refused by its left-over keys):

* ``pixel_mean`` / ``pixel_std`` ([3, 1, 1], BGR, 0..255 units): must equal the config's
  ``model.backbone`` normalisation (``channel_order: bgr`` and its ``pixel_mean`` /
  ``pixel_std``), else the first conv would see other numbers than it was trained on.
* ``proposal_generator.anchor_generator.cell_anchors.{i}`` (older files, detectron2 v0.1: a
  persistent buffer then; detectron2's own checkpointer drops them today): level i's anchors
  centred at 0, ``[x0, y0, x1, y1]`` per (size, ratio), sizes outer, as float32 of
  ``w = sqrt(size**2 / ratio), h = ratio * w`` (no rounding). They must equal the anchors the
  config generates on the RPN's levels (``model.anchor``: sizes, aspect_ratios,
  round_cell_anchors) to 1e-3 pixels, else the RPN's deltas would be decoded from other boxes.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fpn_tf.conversion import layout
from fpn_tf.conversion.checkpoint_reader import ConversionError, StateDict
from fpn_tf.modeling.backbones import pixel_normalization
from fpn_tf.ops import anchors as anchor_ops

WHAT = "detectron2 Faster R-CNN R-FPN"
WHAT_MASK = "detectron2 Mask R-CNN R-FPN"
MASK_PREFIX = "roi_heads.mask_head."
CELL_ANCHORS_PREFIX = "proposal_generator.anchor_generator.cell_anchors."
# Cell anchors agree with the config's to this many pixels: ours (h = s sqrt(r), w = s / sqrt(r))
# and detectron2's (w = sqrt(s^2 / r), h = r w) are equal in float32 for sizes 32..512 and ratios
# 0.5, 1, 2 (max difference 0.0); the tolerance leaves room for float rounding of other values,
# while another size, ratio or integer rounding moves a corner by 0.1 px or more.
CELL_ANCHOR_TOLERANCE = 1e-3


def architecture(arrays: Mapping) -> str:
    """``"mask_rcnn"`` when the state dict has any mask-head key, else ``"faster_rcnn"``."""
    return "mask_rcnn" if any(k.startswith(MASK_PREFIX) for k in arrays) else "faster_rcnn"


def what(model) -> str:
    """The checkpoint ``model`` takes (for messages)."""
    return WHAT if model.roi_heads.mask_head is None else WHAT_MASK


def _block_keys(stage: int, index: int, conv: int):
    prefix = f"backbone.bottom_up.res{stage}.{index}."
    name = "shortcut" if conv == 0 else f"conv{conv}"
    return prefix + f"{name}.weight", prefix + f"{name}.norm."


def _values(array: np.ndarray) -> list:
    return [round(float(v), 4) for v in np.asarray(array).reshape(-1)]


def _check_pixel_statistics(state: StateDict, backbone_cfg) -> None:
    """The file's ``pixel_mean`` / ``pixel_std`` (BGR) against the config's normalisation."""
    if "pixel_mean" not in state and "pixel_std" not in state:
        return
    order, mean, std = pixel_normalization(
        backbone_cfg.type,
        backbone_cfg.channel_order,
        backbone_cfg.pixel_mean,
        backbone_cfg.pixel_std,
    )
    for key, expected in (("pixel_mean", mean), ("pixel_std", std)):
        if key not in state:
            continue
        value = state.take(key)
        if value.size != 3:
            raise ConversionError(
                f"{state.path}: its {key} has shape {tuple(value.shape)}, not 3 values "
                f"(detectron2's [3, 1, 1])"
            )
        if order != "bgr" or not np.allclose(value.reshape(-1), expected, rtol=0, atol=1e-3):
            raise ConversionError(
                f"{state.path}: its {key} {_values(value)} (BGR) is not the config's "
                f"model.backbone normalisation (channel_order {order}, {key} {list(expected)})"
            )


def _describe(corners_xyxy: np.ndarray) -> str:
    w = corners_xyxy[:, 2] - corners_xyxy[:, 0]
    h = corners_xyxy[:, 3] - corners_xyxy[:, 1]
    sizes = [round(float(s), 2) for s in np.sqrt(np.abs(w * h))]
    ratios = [round(float(r), 3) for r in h / np.where(w == 0, np.nan, w)]
    return f"sizes {sizes}, aspect ratios {ratios}"


def _check_cell_anchors(state: StateDict, rpn) -> None:
    """The file's ``cell_anchors.{i}`` against the anchors of the RPN's level i (module doc)."""
    indices = sorted(
        int(k[len(CELL_ANCHORS_PREFIX) :])
        for k in state.arrays
        if k.startswith(CELL_ANCHORS_PREFIX) and k[len(CELL_ANCHORS_PREFIX) :].isdigit()
    )
    if not indices:
        return  # a file written by today's detectron2 has none
    levels = list(rpn.levels)
    if indices != list(range(len(levels))):
        raise ConversionError(
            f"{state.path}: its anchor generator has cell anchors for {len(indices)} levels "
            f"({CELL_ANCHORS_PREFIX}{{{','.join(map(str, indices))}}}), the config's RPN "
            f"{len(levels)} ({', '.join(levels)}: model.anchor.sizes)"
        )
    for index, level in zip(indices, levels):
        key = f"{CELL_ANCHORS_PREFIX}{index}"
        theirs = state.take(key)
        ours = anchor_ops.cell_anchors(rpn.anchor_sizes[level], rpn.aspect_ratios)
        if rpn.anchor_config.round_cell_anchors:
            ours = np.round(ours)
        ours = ours[:, [1, 0, 3, 2]]  # yxyx -> detectron2's xyxy
        if theirs.shape != ours.shape or not np.allclose(
            theirs, ours, rtol=0, atol=CELL_ANCHOR_TOLERANCE
        ):
            shown = _describe(theirs) if theirs.ndim == 2 and theirs.shape[1] == 4 else "?"
            differ = (
                f", corners up to {np.max(np.abs(theirs - ours)):.3g} px apart"
                if theirs.shape == ours.shape
                else ""
            )
            raise ConversionError(
                f"{state.path}: its {level} anchors ({key}, shape {tuple(theirs.shape)}: "
                f"{shown}) are not the config's ({_describe(ours)}; model.anchor sizes, "
                f"aspect_ratios, round_cell_anchors {rpn.anchor_config.round_cell_anchors}{differ})"
            )


def assignments(model, state: StateDict, backbone_cfg) -> layout.Assignments:
    """Every weight of ``model`` from ``state``, with its layout change (not yet assigned)."""
    _check_pixel_statistics(state, backbone_cfg)
    _check_cell_anchors(state, model.rpn)
    out = layout.Assignments(state)
    layout.add_resnet(
        out,
        model,
        backbone_cfg.type,
        stem=lambda: (
            "backbone.bottom_up.stem.conv1.weight",
            "backbone.bottom_up.stem.conv1.norm.",
        ),
        block=_block_keys,
    )
    layout.add_pyramid_and_rpn(
        out,
        model,
        lateral=lambda level: f"backbone.fpn_lateral{level}.",
        output=lambda level: f"backbone.fpn_output{level}.",
        rpn_conv="proposal_generator.rpn_head.conv.",
        rpn_logits="proposal_generator.rpn_head.objectness_logits.",
        rpn_deltas="proposal_generator.rpn_head.anchor_deltas.",
    )
    layout.add_box_head(out, model, ["roi_heads.box_head.fc1.", "roi_heads.box_head.fc2."])
    box_head = model.roi_heads.box_head
    num_classes = model.num_classes
    if getattr(model.roi_heads, "classifier_rows", None):
        raise ConversionError(
            "detectron2's classifier has one row per class: set "
            "model.box_head.classifier_layout: contiguous"
        )
    layout.add_dense(
        out,
        box_head.classifier,
        "roi_heads.box_predictor.cls_score.",
        rows=[num_classes] + list(range(num_classes)),
    )
    layout.add_dense(
        out,
        box_head.box_regressor,
        "roi_heads.box_predictor.bbox_pred.",
        rows=layout.delta_rows(num_classes),
    )
    head = model.roi_heads.mask_head
    if head is not None:
        # Our channel k is class k (1..C), theirs k - 1; our unused channel 0 gets zeros.
        # A class-agnostic head has one channel on both sides.
        rows = None if head.class_agnostic else [None] + list(range(num_classes))
        layout.add_mask_head(
            out,
            model,
            # model.mask_head.num_convs convs: a file with more or fewer has keys left over or
            # missing
            [f"{MASK_PREFIX}mask_fcn{i + 1}." for i in range(head.num_convs)],
            deconv_prefix=f"{MASK_PREFIX}deconv.",
            predictor_prefix=f"{MASK_PREFIX}predictor.",
            predictor_rows=rows,
        )
    return out
