"""Builds the detector from a ``model`` config section (`fpn_tf.configs.experiment.ModelConfig`).

The one place a config becomes components: each component takes explicit arguments (named as the
config's fields where it has a section: `RegionProposalNetwork` takes ``model.rpn``, `RoIHeads`
the sections ``model.roi_sampler``, ``roi_aligner``, ``box_head``, ``detection`` and, for a Mask
R-CNN, ``mask_roi_aligner`` and ``mask_head``; `SegmentProposalHead` ``model.segment_proposals``),
and the config dataclasses hold the paper's numbers. ``model.architecture`` says which model:
"faster_rcnn", "mask_rcnn" (`MaskRCNN`: with the mask branch) or "segment_proposals" (the pyramid and the §6 segment-proposal head).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import keras

from fpn_tf.modeling.backbones import (
    build_backbone,
    pixel_mean_rgb,
    pixel_normalization,
    synchronize_batch_norm,
)
from fpn_tf.modeling.faster_rcnn import FasterRCNN, MaskRCNN
from fpn_tf.modeling.fpn import build_fpn_model, build_single_scale_model
from fpn_tf.modeling.roi_heads import RoIHeads
from fpn_tf.modeling.rpn import RegionProposalNetwork
from fpn_tf.modeling.segment_proposals import SegmentProposalHead, SegmentProposalModel
from fpn_tf.ops.anchors import level_number


def build_backbone_from_config(backbone_cfg) -> keras.Model:
    """The bottom-up pathway of a ``model.backbone`` section."""
    kwargs = dict(
        weights=backbone_cfg.weights,
        freeze_at=backbone_cfg.freeze_at,
        freeze_bn=backbone_cfg.freeze_bn,
        fold_frozen_bn=backbone_cfg.fold_frozen_bn,
        bn_epsilon=backbone_cfg.bn_epsilon,
        channel_order=backbone_cfg.channel_order,
        pixel_mean=backbone_cfg.pixel_mean,
        pixel_std=backbone_cfg.pixel_std,
    )
    if backbone_cfg.type == "small_resnet":
        kwargs.update(
            widths=tuple(backbone_cfg.widths),
            blocks=tuple(backbone_cfg.blocks),
            stem_width=backbone_cfg.stem_width,
        )
    else:
        kwargs.update(stride_in_1x1=backbone_cfg.stride_in_1x1)
    backbone = build_backbone(backbone_cfg.type, **kwargs)
    if backbone_cfg.sync_batch_norm and not backbone_cfg.freeze_bn:
        backbone = synchronize_batch_norm(backbone)
    return backbone


def anchor_sizes_for(model_cfg, levels: Sequence[str]):
    """One size per level, or every size on each level used when the pyramid is cut down."""
    sizes = [float(s) for s in model_cfg.anchor.sizes]
    if len(levels) == len(sizes):
        return dict(zip(levels, [(s,) for s in sizes]))
    if len(levels) == 1:
        return {levels[0]: tuple(sizes)}
    raise ValueError(
        f"model.anchor.sizes has {len(sizes)} entries for levels {list(levels)}: "
        "give one size per level, or use a single level"
    )


def build_fpn_from_config(model_cfg, input_shape=(None, None, 3)) -> keras.Model:
    fpn_cfg = model_cfg.fpn
    backbone = build_backbone_from_config(model_cfg.backbone)
    if fpn_cfg.single_scale_level:
        return build_single_scale_model(
            backbone, fpn_cfg.single_scale_level, input_shape=input_shape
        )
    return build_fpn_model(
        backbone,
        num_channels=fpn_cfg.num_channels,
        min_level=fpn_cfg.min_level,
        max_level=fpn_cfg.max_level,
        use_top_down=fpn_cfg.use_top_down,
        use_lateral=fpn_cfg.use_lateral,
        output_levels=fpn_cfg.levels_used,
        input_shape=input_shape,
    )


def build_rpn(model_cfg, levels: Sequence[str]) -> RegionProposalNetwork:
    """The RPN of ``model.rpn`` with the ``model.anchor`` anchors on ``levels``."""
    return RegionProposalNetwork(
        anchor_sizes=anchor_sizes_for(model_cfg, levels),
        aspect_ratios=model_cfg.anchor.aspect_ratios,
        anchor_offset=model_cfg.anchor.offset,
        anchor_round=model_cfg.anchor.round_cell_anchors,
        anchor_stride_from_padded_size=model_cfg.anchor.stride_from_padded_size,
        name="rpn",
        **dataclasses.asdict(model_cfg.rpn),
    )


def build_roi_heads(
    model_cfg, num_classes: int, category_ids: Sequence[int] | None = None
) -> RoIHeads:
    """The RoI heads of ``model.roi_sampler``, ``roi_aligner``, ``box_head`` and ``detection``,
    with the mask branch of ``model.mask_roi_aligner`` and ``mask_head`` when the architecture is
    "mask_rcnn"; ``category_ids`` (the dataset's id of each class 1..C; None = 1..C) place the
    classifier rows of ``classifier_layout "dataset_ids"``."""
    classifier_rows = None
    if model_cfg.box_head.classifier_layout == "dataset_ids":
        ids = list(range(1, num_classes + 1)) if category_ids is None else list(category_ids)
        classifier_rows = [0] + [int(i) for i in ids]
    masks = model_cfg.architecture == "mask_rcnn"
    return RoIHeads(
        num_classes,
        model_cfg.roi_sampler,
        model_cfg.roi_aligner,
        model_cfg.box_head,
        model_cfg.detection,
        mask_roi_aligner=model_cfg.mask_roi_aligner if masks else None,
        mask_head=model_cfg.mask_head if masks else None,
        classifier_rows=classifier_rows,
        name="roi_heads",
    )


def _pad_value(backbone_cfg):
    """The 0..255 RGB pixel that normalises to 0 with ``pad_normalized_zero``, else None."""
    if not backbone_cfg.pad_normalized_zero:
        return None
    order, mean, _ = pixel_normalization(
        backbone_cfg.type,
        backbone_cfg.channel_order,
        backbone_cfg.pixel_mean,
        backbone_cfg.pixel_std,
    )
    return pixel_mean_rgb(order, mean)


def build_segment_proposal_model(model_cfg, input_shape=(None, None, 3)) -> SegmentProposalModel:
    """The paper's §6 segment proposals: the pyramid of ``model.backbone`` / ``model.fpn`` and
    the head of ``model.segment_proposals`` (class-agnostic: no classes)."""
    fpn = build_fpn_from_config(model_cfg, input_shape)
    head = SegmentProposalHead(name="head", **dataclasses.asdict(model_cfg.segment_proposals))
    return SegmentProposalModel(fpn, head, pad_value=_pad_value(model_cfg.backbone))


def build_model(model_cfg, category_ids: Sequence[int] | None = None, input_shape=(None, None, 3)):
    """The model of ``model.architecture`` from a config: `FasterRCNN`, `MaskRCNN` or the
    segment-proposal model; ``category_ids`` are the
    dataset's ids of classes 1..C (unused by the class-agnostic segment proposals)."""
    if model_cfg.architecture == "segment_proposals":
        return build_segment_proposal_model(model_cfg, input_shape)
    num_classes = model_cfg.num_classes or (len(category_ids) if category_ids else 0)
    if num_classes <= 0:
        raise ValueError("model.num_classes is 0 and no dataset categories were given")
    if category_ids is not None and len(category_ids) != num_classes:
        raise ValueError(
            f"model.num_classes={num_classes} but the dataset has "
            f"{len(category_ids)} categories"
        )
    fpn = build_fpn_from_config(model_cfg, input_shape)
    levels = sorted(fpn.output.keys(), key=level_number)
    pad_value = _pad_value(model_cfg.backbone)
    # Built in this order (initialisers draw their seeds when constructed): same seed, same model.
    rpn = build_rpn(model_cfg, levels)
    roi_heads = build_roi_heads(model_cfg, num_classes, category_ids)
    model = MaskRCNN if model_cfg.architecture == "mask_rcnn" else FasterRCNN
    return model(fpn, rpn, roi_heads, category_ids=category_ids, pad_value=pad_value)
