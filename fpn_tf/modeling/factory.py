"""Builds the detector from a ``model`` config section (`fpn_tf.configs.experiment.ModelConfig`).

Components take explicit arguments; this module is the one place that reads a config to call them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import keras

from fpn_tf.modeling.backbones import backbone_from_config
from fpn_tf.modeling.faster_rcnn import DetectionParams, FasterRCNN, RoIParams, RPNParams
from fpn_tf.modeling.fpn import build_fpn_model, build_single_scale_model


def _pick(section, cls):
    fields = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in dataclasses.asdict(section).items() if k in fields}


def anchor_sizes_for(model_cfg, levels: Sequence[str]):
    """One size per level, or every size on each level used when the pyramid is cut down."""
    sizes = [float(s) for s in model_cfg.anchor.sizes]
    if len(levels) == len(sizes):
        return dict(zip(levels, [(s,) for s in sizes]))
    if len(levels) == 1:
        return {levels[0]: tuple(sizes)}
    raise ValueError(f"model.anchor.sizes has {len(sizes)} entries for levels {list(levels)}: "
                     "give one size per level, or use a single level")


def build_fpn_from_config(model_cfg, input_shape=(None, None, 3)) -> keras.Model:
    fpn_cfg = model_cfg.fpn
    if fpn_cfg.single_scale_level:
        return build_single_scale_model(backbone_from_config(model_cfg.backbone),
                                        fpn_cfg.single_scale_level, input_shape=input_shape)
    return build_fpn_model(
        backbone_from_config(model_cfg.backbone), num_channels=fpn_cfg.num_channels,
        min_level=fpn_cfg.min_level, max_level=fpn_cfg.max_level,
        use_top_down=fpn_cfg.use_top_down, use_lateral=fpn_cfg.use_lateral,
        output_levels=fpn_cfg.levels_used, input_shape=input_shape)


def build_model(model_cfg, category_ids: Sequence[int] | None = None,
                input_shape=(None, None, 3)) -> FasterRCNN:
    """FPN Faster R-CNN from a config; ``category_ids`` are the dataset's ids of classes 1..C."""
    num_classes = model_cfg.num_classes or (len(category_ids) if category_ids else 0)
    if num_classes <= 0:
        raise ValueError("model.num_classes is 0 and no dataset categories were given")
    if category_ids is not None and len(category_ids) != num_classes:
        raise ValueError(f"model.num_classes={num_classes} but the dataset has "
                         f"{len(category_ids)} categories")
    fpn = build_fpn_from_config(model_cfg, input_shape)
    levels = sorted(fpn.output.keys(), key=lambda k: int(k[1:]))
    return FasterRCNN(
        fpn, num_classes=num_classes, anchor_sizes=anchor_sizes_for(model_cfg, levels),
        aspect_ratios=model_cfg.anchor.aspect_ratios, rpn_head_channels=model_cfg.rpn.head_channels,
        fc_dims=model_cfg.roi.fc_dims, num_fc=model_cfg.roi.num_fc,
        rpn=_pick(model_cfg.rpn, RPNParams), roi=_pick(model_cfg.roi, RoIParams),
        detection=_pick(model_cfg.detection, DetectionParams), category_ids=category_ids)
