"""detectron2's ``{faster,mask}_rcnn_R_{50,101}_FPN`` state dict -> our detector's weights.

Its classifier has the background LAST (ours first): the rows are rotated. Its mask predictor has
80 channels, no background: their channel k - 1 is our channel k, our channel 0 gets zeros.
Buffers that are not weights are checked (and count as used): ``pixel_mean`` / ``pixel_std``
(BGR, 0..255) must be the config's normalisation, and the ``cell_anchors.{i}`` of older files
(level i's anchors centred at 0, xyxy, unrounded) the config's anchors to 1e-3 px.
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
# Room for float rounding; another size, ratio or integer rounding moves a corner >= 0.1 px.
CELL_ANCHOR_TOLERANCE = 1e-3


def architecture(arrays: Mapping) -> str:
    return "mask_rcnn" if any(k.startswith(MASK_PREFIX) for k in arrays) else "faster_rcnn"


def what(model) -> str:
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
    b = backbone_cfg
    order, mean, std = pixel_normalization(b.type, b.channel_order, b.pixel_mean, b.pixel_std)
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
    stem = "backbone.bottom_up.stem.conv1."
    layout.add_resnet(
        out, model, backbone_cfg.type, stem=lambda: (stem + "weight", stem + "norm."),
        block=_block_keys,
    )  # fmt: skip
    rpn = "proposal_generator.rpn_head."
    layout.add_pyramid_and_rpn(
        out, model, lateral=lambda level: f"backbone.fpn_lateral{level}.",
        output=lambda level: f"backbone.fpn_output{level}.", rpn_conv=rpn + "conv.",
        rpn_logits=rpn + "objectness_logits.", rpn_deltas=rpn + "anchor_deltas.",
    )  # fmt: skip
    layout.add_box_head(out, model, ["roi_heads.box_head.fc1.", "roi_heads.box_head.fc2."])
    box_head = model.roi_heads.box_head
    num_classes = model.num_classes
    if getattr(model.roi_heads, "classifier_rows", None):
        raise ConversionError(
            "detectron2's classifier has one row per class: set "
            "model.box_head.classifier_layout: contiguous"
        )
    predictor = "roi_heads.box_predictor."
    rows = [num_classes] + list(range(num_classes))  # background last -> first
    layout.add_dense(out, box_head.classifier, predictor + "cls_score.", rows=rows)
    rows = layout.delta_rows(num_classes)
    layout.add_dense(out, box_head.box_regressor, predictor + "bbox_pred.", rows=rows)
    head = model.roi_heads.mask_head
    if head is not None:
        rows = None if head.class_agnostic else [None] + list(range(num_classes))
        layout.add_mask_head(
            out, model, [f"{MASK_PREFIX}mask_fcn{i + 1}." for i in range(head.num_convs)],
            f"{MASK_PREFIX}deconv.", f"{MASK_PREFIX}predictor.", predictor_rows=rows,
        )  # fmt: skip
    return out
