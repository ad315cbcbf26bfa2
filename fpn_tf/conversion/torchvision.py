"""torchvision's ``{faster,mask}rcnn_resnet50_fpn`` state dict -> our detector's weights.

Older key spellings (the published 2019 COCO files) are renamed first, as torchvision's loader
does. The classifier and mask predictor have torchvision's 91-row COCO layout (row = category
id): ``classifier_layout: dataset_ids`` keeps every row; ``contiguous`` takes the background and
the 80 used rows (its softmax then lacks the unused rows: scores differ slightly). torchvision
runs these files with FrozenBatchNorm eps 0 (pytorch/vision#2933): its reference config sets
``model.backbone.bn_epsilon: 0``.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from fpn_tf.conversion import layout
from fpn_tf.conversion.checkpoint_reader import ConversionError, StateDict

WHAT = "torchvision Faster R-CNN ResNet-FPN"
WHAT_MASK = "torchvision Mask R-CNN ResNet-FPN"
MASK_PREFIXES = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")
_LEGACY_MASK_CONV = re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$")


def architecture(arrays: Mapping) -> str:
    return "mask_rcnn" if any(k.startswith(MASK_PREFIXES) for k in arrays) else "faster_rcnn"


def what(model) -> str:
    return WHAT if model.roi_heads.mask_head is None else WHAT_MASK


def _rename_legacy_keys(state: StateDict) -> None:
    for i in range(4):
        for blocks in ("inner_blocks", "layer_blocks"):
            for p in ("weight", "bias"):
                state.rename(f"backbone.fpn.{blocks}.{i}.{p}", f"backbone.fpn.{blocks}.{i}.0.{p}")
    for p in ("weight", "bias"):
        state.rename(f"rpn.head.conv.{p}", f"rpn.head.conv.0.0.{p}")
    for key in list(state.arrays):
        match = _LEGACY_MASK_CONV.match(key)
        if match:  # MaskRCNNHeads before version 2: mask_fcn{i+1} -> {i}.0
            number, p = int(match.group(1)), match.group(2)
            state.rename(key, f"roi_heads.mask_head.{number - 1}.0.{p}")


def _block_keys(stage: int, index: int, conv: int):
    prefix = f"backbone.body.layer{stage - 1}.{index}."
    if conv == 0:
        return prefix + "downsample.0.weight", prefix + "downsample.1."
    return prefix + f"conv{conv}.weight", prefix + f"bn{conv}."


def assignments(model, state: StateDict, backbone_type: str) -> layout.Assignments:
    """Every weight of ``model`` from ``state``, with its layout change (not yet assigned)."""
    _rename_legacy_keys(state)
    out = layout.Assignments(state)
    layout.add_resnet(
        out, model, backbone_type, block=_block_keys,
        stem=lambda: ("backbone.body.conv1.weight", "backbone.body.bn1."),
    )  # fmt: skip
    layout.add_pyramid_and_rpn(
        out, model, lateral=lambda level: f"backbone.fpn.inner_blocks.{level - 2}.0.",
        output=lambda level: f"backbone.fpn.layer_blocks.{level - 2}.0.",
        rpn_conv="rpn.head.conv.0.0.", rpn_logits="rpn.head.cls_logits.",
        rpn_deltas="rpn.head.bbox_pred.",
    )  # fmt: skip
    layout.add_box_head(out, model, ["roi_heads.box_head.fc6.", "roi_heads.box_head.fc7."])
    box_head = model.roi_heads.box_head
    ids = list(model.category_ids)
    if model.roi_heads.classifier_rows is not None:
        # dataset_ids layout: our row r is category id r, exactly torchvision's rows.
        layout.add_dense(out, box_head.classifier, "roi_heads.box_predictor.cls_score.")
    else:
        theirs = state.arrays.get("roi_heads.box_predictor.cls_score.weight")
        if theirs is not None and max(ids) >= theirs.shape[0]:
            raise ConversionError(
                f"{state.path}: its classifier has {theirs.shape[0]} rows, too few for category "
                f"id {max(ids)}"
            )
        layout.add_dense(
            out, box_head.classifier, "roi_heads.box_predictor.cls_score.", rows=[0] + ids
        )
    regression_rows = np.array([4 * i + layout.DELTA_ORDER[k] for i in ids for k in range(4)])
    layout.add_dense(
        out, box_head.box_regressor, "roi_heads.box_predictor.bbox_pred.", rows=regression_rows
    )
    if model.roi_heads.mask_head is not None:
        dataset_ids = model.roi_heads.classifier_rows is not None
        layout.add_mask_head(
            out, model,
            [f"roi_heads.mask_head.{i}.0." for i in range(model.roi_heads.mask_head.num_convs)],
            "roi_heads.mask_predictor.conv5_mask.", "roi_heads.mask_predictor.mask_fcn_logits.",
            predictor_rows=None if dataset_ids else [0] + ids,
        )  # fmt: skip
    return out
