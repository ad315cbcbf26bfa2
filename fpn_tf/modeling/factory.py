"""Builds a model from a ``model`` config section, one builder per part in the order the data
flows: backbone -> pyramid -> RPN -> RoI heads (or the §6 segment-proposal head)."""

from __future__ import annotations

from typing import Sequence

from fpn_tf.modeling.backbones import build_backbone, pixel_mean_rgb, pixel_normalization
from fpn_tf.modeling.faster_rcnn import FasterRCNN, MaskRCNN
from fpn_tf.modeling.fpn import build_fpn_model
from fpn_tf.modeling.roi_heads import RoIHeads
from fpn_tf.modeling.rpn import RegionProposalNetwork
from fpn_tf.modeling.segment_proposals import SegmentProposalHead, SegmentProposalModel
from fpn_tf.ops.anchors import level_number


def build_roi_heads(
    model_cfg, num_classes: int, category_ids: Sequence[int] | None = None
) -> RoIHeads:
    """The RoI heads, with the mask branch for "mask_rcnn"; ``category_ids`` (None = 1..C) place
    the classifier rows of ``classifier_layout "dataset_ids"``."""
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
    b = backbone_cfg
    order, mean, _ = pixel_normalization(b.type, b.channel_order, b.pixel_mean, b.pixel_std)
    return pixel_mean_rgb(order, mean)


def build_segment_proposal_model(model_cfg, input_shape=(None, None, 3)) -> SegmentProposalModel:
    """The paper's §6 segment proposals (class-agnostic)."""
    fpn = build_fpn_model(build_backbone(model_cfg.backbone), model_cfg.fpn, input_shape)
    head = SegmentProposalHead(model_cfg.segment_proposals, name="head")
    return SegmentProposalModel(fpn, head, pad_value=_pad_value(model_cfg.backbone))


def build_model(model_cfg, category_ids: Sequence[int] | None = None, input_shape=(None, None, 3)):
    """`FasterRCNN`, `MaskRCNN` or the segment-proposal model, by ``model.architecture``;
    ``category_ids``: the dataset's ids of classes 1..C."""
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
    # Built in the order the data flows (initialisers draw their seeds when constructed, so the
    # same seed gives the same model).
    fpn = build_fpn_model(build_backbone(model_cfg.backbone), model_cfg.fpn, input_shape)
    levels = sorted(fpn.output.keys(), key=level_number)
    pad_value = _pad_value(model_cfg.backbone)
    rpn = RegionProposalNetwork(model_cfg.rpn, model_cfg.anchor, levels, name="rpn")
    roi_heads = build_roi_heads(model_cfg, num_classes, category_ids)
    model = MaskRCNN if model_cfg.architecture == "mask_rcnn" else FasterRCNN
    return model(fpn, rpn, roi_heads, category_ids=category_ids, pad_value=pad_value)
