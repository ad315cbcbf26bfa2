"""detectron2's ``faster_rcnn_R_{50,101}_FPN`` state dict -> our detector's weights.

Key names of detectron2's model zoo (``backbone.bottom_up.res2.0.conv1.weight``, its FrozenBN as
``.norm.*``, ``backbone.fpn_lateral2``, ``proposal_generator.rpn_head.*``,
``roi_heads.box_head.fc1``, ``roi_heads.box_predictor.*``). Its classifier has 81 rows with the
background LAST; ours has it first, so the rows are rotated (the softmax is unchanged). Its 80
classes are COCO's categories in id order, as ours. ``pixel_mean`` / ``pixel_std``, when a file
carries them, are checked against the config (they are the config's
``model.backbone.pixel_mean`` / ``pixel_std``, BGR) rather than converted.
"""

from __future__ import annotations

import numpy as np

from fpn_tf.conversion import layout
from fpn_tf.conversion.checkpoint_reader import ConversionError, StateDict

WHAT = "detectron2 Faster R-CNN R-FPN"


def _block_keys(stage: int, index: int, conv: int):
    prefix = f"backbone.bottom_up.res{stage}.{index}."
    name = "shortcut" if conv == 0 else f"conv{conv}"
    return prefix + f"{name}.weight", prefix + f"{name}.norm."


def _check_pixel_statistics(state: StateDict, backbone_cfg) -> None:
    for key, expected in (
        ("pixel_mean", backbone_cfg.pixel_mean),
        ("pixel_std", backbone_cfg.pixel_std),
    ):
        if key not in state:
            continue
        value = state.take(key).reshape(-1)
        if expected is None or not np.allclose(value, expected, rtol=0, atol=1e-3):
            raise ConversionError(
                f"{state.path}: its {key} {value.tolist()} is not the config's "
                f"model.backbone.{key} {expected}"
            )


def assignments(model, state: StateDict, backbone_cfg) -> layout.Assignments:
    """Every weight of ``model`` from ``state``, with its layout change (not yet assigned)."""
    _check_pixel_statistics(state, backbone_cfg)
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
            "model.roi.classifier_layout: contiguous"
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
    return out
