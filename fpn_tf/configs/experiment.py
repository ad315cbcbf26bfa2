"""Typed experiment configuration for FPN Faster R-CNN.

An experiment is a tree of plain dataclasses whose defaults are the paper's numbers (Lin et al.,
CVPR 2017, §4-5) and detectron2's "1x" COCO schedule. A run's configuration is resolved in three
layers, as in TF Model Garden:

    ExperimentConfig()  ->  YAML file(s)  ->  params_override ("train.learning_rate=0.01,...")

(see :mod:`fpn_tf.configs.loader`). Every layer is checked as it is applied: unknown keys and
wrong types raise :class:`ConfigError` naming the full dotted key (:mod:`fpn_tf.configs.base`).
:meth:`ExperimentConfig.validate` then rejects impossible values naming the key: each field
declares its own checks (``field(0.7, unit_interval)``), and the ``_check_values`` of a section
holds only the rules that relate several fields (``negative_iou <= positive_iou``, one anchor
size per pyramid level, a batch divisible by the replicas, ...).

The whole resolved tree round-trips through :meth:`Config.to_dict` / :meth:`Config.from_dict` and
YAML, so a run writes it to ``model_dir`` and can be reproduced from that file alone.

Standard library and PyYAML only (no TensorFlow, no Keras), so configs load in milliseconds.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Dict, List, Literal, Optional

from fpn_tf.configs.base import (
    Check,
    Config,
    ConfigError,
    _require,
    at_least,
    each,
    field,
    in_range,
    increasing,
    length,
    non_empty,
    non_negative,
    positive,
    unique,
    unit_interval,
)

__all__ = [
    "ConfigError",
    "Config",
    "BackboneConfig",
    "FPNConfig",
    "AnchorConfig",
    "RPNConfig",
    "RoISamplerConfig",
    "RoIAlignerConfig",
    "BoxHeadConfig",
    "DetectionConfig",
    "MaskHeadConfig",
    "ModelConfig",
    "SyntheticDataConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "RuntimeConfig",
    "ExperimentConfig",
]


# --------------------------------------------------------------------------------------------
# Model.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BackboneConfig(Config):
    """Bottom-up pathway (`fpn_tf.modeling.backbones.build_backbone`): C2..C5, strides 4..32.

    weights: None (random init), "imagenet" (keras.applications) or a local .h5 / .weights.h5.
    freeze_at: 0 = train everything, 1 = freeze the stem, 2 = stem + conv2 (detectron2's
      FREEZE_AT=2), ... 5 = everything up to conv5.
    freeze_bn: BatchNorm in inference mode, statistics and affine parameters frozen.
    sync_batch_norm: a BatchNorm that trains (freeze_bn false) takes its statistics over all
      replicas.
    fold_frozen_bn: with freeze_bn, each conv + frozen BatchNorm runs as one convolution (same
      outputs up to float rounding, faster); the checkpoint holds the BatchNorm vectors under
      the conv's name.
    widths / blocks / stem_width: small_resnet only: channels and basic blocks of conv2..conv5,
      channels of the stem ([64, 128, 256, 512] / [2, 2, 2, 2] / 64 is ResNet-18).
    stride_in_1x1: resnet50/resnet101 only: where a bottleneck's stride 2 goes: true = its 1x1
      conv (keras.applications, detectron2); false = its 3x3 conv (torchvision), which needs
      weights null or a local file.
    bn_epsilon: every BatchNorm's epsilon, folded ones included; null = the builder's own
      (keras.applications 1.001e-5, small_resnet 1e-5). 0 needs freeze_bn; torchvision's COCO_V1
      detection weights run with 0.
    channel_order / pixel_mean / pixel_std: the input normalisation, all three or none. Inputs
      are RGB 0..255; channel_order is the order the first conv sees, and pixel_mean /
      pixel_std are in THAT order, 0..255 units. null = the type's own: resnet* bgr,
      [103.939, 116.779, 123.68], std 1; small_resnet rgb, [123.675, 116.28, 103.53],
      [58.395, 57.12, 57.375].
    pad_normalized_zero: set every pixel outside an image's valid region to pixel_mean before
      the backbone, so the padding is 0 after normalisation, as torchvision and detectron2 pad.

    Published weights: torchvision fasterrcnn_resnet50_fpn = stride_in_1x1 false, bn_epsilon 0,
    rgb, [123.675, 116.28, 103.53], [58.395, 57.12, 57.375], pad_normalized_zero true;
    detectron2 R-50 = bn_epsilon 1e-5, bgr, [103.53, 116.28, 123.675], [1, 1, 1],
    pad_normalized_zero true.
    """

    type: Literal["resnet50", "resnet101", "small_resnet"] = "resnet50"
    weights: Optional[str] = field(
        None, Check(lambda path: path.strip() != "", "null, 'imagenet' or a file path")
    )
    freeze_at: int = field(2, in_range(0, 5))
    freeze_bn: bool = True
    sync_batch_norm: bool = False
    fold_frozen_bn: bool = True
    widths: List[int] = field([32, 64, 128, 256], length(4, "conv2..conv5"), each(positive))
    blocks: List[int] = field([1, 1, 1, 1], length(4, "conv2..conv5"), each(positive))
    stem_width: int = field(32, positive)
    stride_in_1x1: bool = True
    bn_epsilon: Optional[float] = field(None, non_negative)
    channel_order: Optional[Literal["rgb", "bgr"]] = None
    pixel_mean: Optional[List[float]] = field(None, length(3, "in channel_order"))
    pixel_std: Optional[List[float]] = field(None, length(3, "in channel_order"), each(positive))
    pad_normalized_zero: bool = False

    def _check_values(self, p):
        if self.weights is not None:
            _require(
                self.type != "small_resnet",
                p + "weights",
                f"must be null for backbone type 'small_resnet' (it has no pretrained weights), "
                f"got {self.weights!r}.",
            )
        if self.type != "small_resnet":
            _require(
                self.stride_in_1x1 or self.weights != "imagenet",
                p + "stride_in_1x1",
                "must be true with weights 'imagenet' (keras.applications' ImageNet ResNets put "
                "the stride in the 1x1 conv); give a local weights file or null.",
            )
        if self.bn_epsilon == 0:
            _require(
                self.freeze_bn,
                p + "bn_epsilon",
                "must be positive when freeze_bn is false (a BatchNorm that trains divides by "
                "its batch variance, which can be 0); 0 is for frozen BatchNorm (torchvision's "
                "COCO_V1 weights), got 0.0.",
            )
        normalization = ("channel_order", "pixel_mean", "pixel_std")
        given = [name for name in normalization if getattr(self, name) is not None]
        missing = [name for name in normalization if name not in given]
        if given and missing:
            _require(
                False,
                p + missing[0],
                f"must be set too when {p}{given[0]} is: channel_order, pixel_mean and pixel_std "
                "are given together (all three, or none for the backbone's own).",
            )


@dataclasses.dataclass
class FPNConfig(Config):
    """Top-down pathway with lateral connections (paper §3).

    num_channels: d, the channels of every pyramid level (256 in the paper).
    min_level/max_level: pyramid levels P{min}..P{max} (2..6: P6 = stride-2 max-pool of P5).
    use_top_down / use_lateral: Table 1's "bottom-up pyramid" and "top-down pyramid without
      lateral connections" ablations.
    levels_used: the levels the heads use, e.g. ["P2"] for Table 1 (f); None = all.
    single_scale_level: "C4" or "C5": no pyramid, the heads run on that backbone map (Table 1
      (a)/(b)); None = the pyramid.
    """

    num_channels: int = field(256, positive)
    min_level: int = field(2, in_range(2, 5))
    max_level: int = field(6, in_range(2, 6))
    use_top_down: bool = True
    use_lateral: bool = True
    levels_used: Optional[List[str]] = field(None, non_empty, unique)
    single_scale_level: Optional[Literal["C4", "C5"]] = None

    def _check_values(self, p):
        _require(
            self.min_level <= self.max_level,
            p + "min_level",
            f"({self.min_level}) must not exceed {p}max_level ({self.max_level}).",
        )
        _require(
            self.use_top_down or self.use_lateral,
            p + "use_top_down",
            "and use_lateral cannot both be false (the pyramid would have no input).",
        )
        if self.levels_used is not None:
            valid = self.level_names()
            for i, level in enumerate(self.levels_used):
                _require(
                    level in valid,
                    f"{p}levels_used[{i}]",
                    f"must be one of {valid}, got {level!r}.",
                )
            _require(
                self.single_scale_level is None,
                p + "levels_used",
                "and single_scale_level are exclusive ablations; set one of them.",
            )

    def level_names(self) -> List[str]:
        return [f"P{i}" for i in range(self.min_level, self.max_level + 1)]


@dataclasses.dataclass
class AnchorConfig(Config):
    """One anchor size per pyramid level (areas 32²..512² on P2..P6) × aspect ratios (h/w).

    offset: anchor centres at ((y + offset) * stride, (x + offset) * stride) for cell (y, x):
      0.5 = the centre of the cell's pixels (ours, Model Garden); 0.0 = its top-left pixel
      (torchvision, detectron2).
    round_cell_anchors: round each cell's anchors (centred at 0) to integers, half to even
      (torchvision).
    stride_from_padded_size: each level's stride per axis is padded_size // map_size
      (torchvision: P6 of an 800-pixel side has stride 61); false: 2**level. The padded size is
      the first anchor level's map size times its stride.
    """

    sizes: List[float] = field([32.0, 64.0, 128.0, 256.0, 512.0], non_empty, each(positive))
    aspect_ratios: List[float] = field([0.5, 1.0, 2.0], non_empty, each(positive))
    offset: float = field(0.5, in_range(0, 1, "[)"))
    round_cell_anchors: bool = False
    stride_from_padded_size: bool = False


@dataclasses.dataclass
class RPNConfig(Config):
    """Region proposal network on the pyramid (paper §4.1), one head shared by all levels.

    positive_iou / negative_iou: anchors with IoU > 0.7 are positive, < 0.3 negative, the rest
      ignored; each ground truth's highest-IoU anchor is positive too (when that IoU is > 0).
    positive_iou_inclusive: positive iff IoU >= positive_iou (torchvision's and detectron2's
      Matcher) instead of > (the paper's "higher than 0.7").
    pre_nms_top_k_*: kept per level by objectness before NMS; post_nms_top_k_*: kept per image.
      The _train pair applies when a loss is computed (training and validation), _test otherwise.
    nms_per_level: one NMS per level, then the post_nms_top_k best of all levels (torchvision,
      detectron2); false: one NMS over every level's candidates.
    min_box_size: proposals with a side smaller than this (input pixels) are dropped.
    smooth_l1_beta: the box loss' smooth-L1 transition point (1/9 = Detectron's sigma 3; 0 = L1).
    head_channels: the 3x3 conv's channels; None = the pyramid's num_channels.
    head_sparse_backward: the head's gradient only at the positions the loss reaches (equal to
      the dense gradient up to float rounding, cheaper).
    nms_impl: "per_image" (a map of the greedy NMS; XLA-compatible) or "padded" (one batched
      op); same boxes either way.
    """

    head_channels: Optional[int] = field(None, positive)
    head_sparse_backward: bool = True
    positive_iou: float = field(0.7, unit_interval)
    negative_iou: float = field(0.3, unit_interval)
    batch_size_per_image: int = field(256, positive)
    positive_fraction: float = field(0.5, in_range(0, 1, "(]"))
    pre_nms_top_k_train: int = field(2000, positive)
    post_nms_top_k_train: int = field(2000, positive)
    pre_nms_top_k_test: int = field(1000, positive)
    post_nms_top_k_test: int = field(1000, positive)
    nms_iou: float = field(0.7, unit_interval)
    min_box_size: float = field(0.0, non_negative)
    smooth_l1_beta: float = field(1.0 / 9.0, non_negative)
    loss_weight: float = field(1.0, non_negative)
    nms_impl: Literal["per_image", "padded"] = "per_image"
    nms_per_level: bool = False
    positive_iou_inclusive: bool = False

    def _check_values(self, p):
        _require(
            self.negative_iou <= self.positive_iou,
            p + "negative_iou",
            f"({self.negative_iou}) must not exceed {p}positive_iou ({self.positive_iou}).",
        )


@dataclasses.dataclass
class RoISamplerConfig(Config):
    """The RoIs each image trains the second stage on: batch_size_per_image RoIs (the ground
    truth added to the proposals), positive_fraction of them at most foreground (IoU >=
    foreground_iou), the rest background (IoU below)."""

    batch_size_per_image: int = field(512, positive)
    positive_fraction: float = field(0.25, in_range(0, 1, "(]"))
    foreground_iou: float = field(0.5, unit_interval)


@dataclasses.dataclass
class RoIAlignerConfig(Config):
    """Eq. 1 + RoIAlign (`fpn_tf.modeling.poolers.MultiLevelRoIAlign`): an RoI of w×h input
    pixels goes to level k = floor(canonical_level + log2(sqrt(wh) / canonical_size) +
    level_epsilon) clamped to [min_level, max_level], then RoIAlign output_size² there.

    sampling_ratio: samples per bin along each axis (0 = adaptive: ceil(RoI size in cells /
      output_size), at most 4).
    aligned: the half-pixel shift (a cell's centre is at (i + 0.5) * stride): true is detectron2's
      ROIAlignV2; false is torchvision's MultiScaleRoIAlign (no shift, RoI sides >= one cell).
    level_epsilon: 0 (ours) computes Eq. 1 exactly from area thresholds; torchvision's
      LevelMapper uses 1e-6 (computed as it does, float32 log2).
    align_impl: same samples either way: "gather" (batched gather + matmul, static shapes),
      "crop_and_resize" (per-level native crops; faster forward on CPUs, dynamic shapes) or
      "auto" (crop_and_resize at inference, gather in training and under XLA).
    """

    output_size: int = field(7, positive)
    sampling_ratio: int = field(2, non_negative)
    canonical_size: float = field(224.0, positive)
    canonical_level: int = 4
    min_level: int = 2
    max_level: int = 5
    aligned: bool = True
    level_epsilon: float = field(0.0, non_negative)
    align_impl: Literal["auto", "gather", "crop_and_resize"] = "auto"

    def _check_values(self, p):
        _require(
            self.min_level <= self.max_level,
            p + "min_level",
            f"({self.min_level}) must not exceed {p}max_level ({self.max_level}).",
        )
        _require(
            self.min_level <= self.canonical_level <= self.max_level,
            p + "canonical_level",
            f"must be in [{p}min_level, {p}max_level] = [{self.min_level}, {self.max_level}], "
            f"got {self.canonical_level}.",
        )


@dataclasses.dataclass
class BoxHeadConfig(Config):
    """The Fast R-CNN box head (paper §4.2): num_fc hidden fc layers of fc_dims + ReLU, a
    classifier and class-specific box regression, and their losses.

    box_weights: box-coder weights of the class-specific deltas (targets and decoding).
    smooth_l1_beta: 1.0 is Fast R-CNN's smooth L1 (sigma = 1); 0 = L1 (detectron2's default).
    loss_weight: of both box-head losses in total_loss.
    classifier_layout: "contiguous" (ours, detectron2's up to moving background first): C + 1
      rows, row 0 background, row k class k. "dataset_ids" (torchvision's COCO models): max(id)
      + 1 rows, row `id` for dataset category id `id`; the softmax and the classification loss
      are over all rows, the detections read background and the dataset's rows. The box
      regression has 4C outputs either way.
    """

    num_fc: int = field(2, at_least(1))
    fc_dims: int = field(1024, positive)
    box_weights: List[float] = field(
        [10.0, 10.0, 5.0, 5.0], length(4, "dy, dx, dh, dw"), each(positive)
    )
    smooth_l1_beta: float = field(1.0, non_negative)
    loss_weight: float = field(1.0, non_negative)
    classifier_layout: Literal["contiguous", "dataset_ids"] = "contiguous"


@dataclasses.dataclass
class DetectionConfig(Config):
    """Inference post-processing: score threshold, per-class NMS, detections kept per image.

    nms_impl: the per-class NMS: "per_image" or "padded" (one class-agnostic NMS over
      class-shifted boxes; XLA-compatible) or "combined" (tf.image.combined_non_max_suppression;
      no XLA kernel); the same detections unless over 5000 candidates pass score_threshold.
    min_box_size: detections (after clipping to the image, before NMS) with a side smaller than
      this (input pixels) are removed; torchvision uses 1e-2 (remove_small_boxes), 0 (ours,
      detectron2) removes none.
    """

    score_threshold: float = field(0.05, unit_interval)
    nms_iou: float = field(0.5, unit_interval)
    max_detections: int = field(100, positive)
    nms_impl: Literal["per_image", "padded", "combined"] = "per_image"
    min_box_size: float = field(0.0, non_negative)


@dataclasses.dataclass
class MaskHeadConfig(Config):
    """The Mask R-CNN mask head (He et al. 2017, FPN variant; architecture "mask_rcnn"):
    num_convs 3x3 convs of conv_dims (ReLU), a 2x2 stride-2 deconv and per-class 1x1 mask logits
    at twice model.mask_roi_aligner.output_size (28x28, the training targets' size).

    class_agnostic: one mask for every class (false: one per class, the paper's default).
    loss_weight: the mask loss's weight in total_loss.
    """

    num_convs: int = field(4, non_negative)
    conv_dims: int = field(256, positive)
    class_agnostic: bool = False
    loss_weight: float = field(1.0, non_negative)


@dataclasses.dataclass
class SegmentProposalConfig(Config):
    """Segment proposals on the pyramid (paper §6; Appendix A of arXiv 1612.03144v2):
    DeepMask-style MLPs applied fully convolutionally on P2..P6
    (`fpn_tf.modeling.segment_proposals`, geometry and targets in `fpn_tf.ops.segment_windows`).
    Defaults are the appendix's numbers ("paper") or ours where it says nothing ("ours"); it
    also uses d = 128 (model.fpn.num_channels, configs/coco_r50_fpn_segment_proposals.yaml).

    hidden_dims: outputs of the MLP's w x w conv (paper: 512).
    mask_size: side of the predicted box-relative mask (paper: 14).
    window_sizes: the MLPs' input windows, one head per size shared by P2..P6 (paper: [5, 7]).
    object_sizes: per head, the object scale (longer side, input px) it handles on P2, doubling
      per level (paper: 32 for the 5x5, 32√2 for the 7x7). An object goes to the (head, level)
      whose scale is nearest its longer side in log space; outside the range, to the end groups.
    mask_box_scale: the mask covers a square of this x the group's scale, centred at the cell
      centre (paper: 25 % padding = 1.25).
    center_tolerance, center_tolerance_unit: a window is positive for an object of its group
      when its cell centre is within center_tolerance units of the box centre on both axes;
      unit "cells" = the level's stride, "object_size" = the group's scale (paper: 1 cell).
    crowd_ioa_threshold: a would-be negative whose mask box lies more than this much inside a
      crowd box is ignored (ours).
    batch_size_per_image, positive_fraction: windows sampled per image for the losses, at most
      that fraction positive (paper: 128, 1 : 3).
    pre_nms_top_k: with NMS, windows kept per (level, head) before it (ours).
    post_nms_top_k: proposals per image (paper: 1000).
    nms_iou: NMS IoU threshold on the mask boxes; 1 = no NMS, the top K windows (paper).
    objectness_loss_weight, mask_loss_weight: the score and mask loss weights (paper: 1, 10).
    """

    hidden_dims: int = field(512, positive)
    mask_size: int = field(14, positive)
    window_sizes: List[int] = field([5, 7], non_empty, unique, each(positive))
    object_sizes: List[float] = field([32.0, 45.254834], non_empty, each(positive))
    mask_box_scale: float = field(1.25, positive)
    center_tolerance: float = field(1.0, positive)
    center_tolerance_unit: Literal["cells", "object_size"] = "cells"
    crowd_ioa_threshold: float = field(0.7, unit_interval)
    batch_size_per_image: int = field(128, positive)
    positive_fraction: float = field(0.25, in_range(0, 1, "(]"))
    pre_nms_top_k: int = field(1000, positive)
    post_nms_top_k: int = field(1000, positive)
    nms_iou: float = field(1.0, in_range(0, 1, "(]"))
    objectness_loss_weight: float = field(1.0, non_negative)
    mask_loss_weight: float = field(10.0, non_negative)

    def _check_values(self, p):
        _require(
            len(self.object_sizes) == len(self.window_sizes),
            p + "object_sizes",
            f"needs one object size per window size ({len(self.window_sizes)}: "
            f"{self.window_sizes}), got {len(self.object_sizes)}: {self.object_sizes}.",
        )


@dataclasses.dataclass
class ModelConfig(Config):
    """FPN Faster R-CNN. num_classes: foreground classes; 0 = the dataset's number of categories.

    architecture: "faster_rcnn" (boxes), "mask_rcnn" (boxes and the mask branch of
      model.mask_roi_aligner / model.mask_head, He et al. 2017) or "segment_proposals" (the
      paper's §6 mask proposals: the pyramid and the head of model.segment_proposals; the RPN
      and RoI sections are unused). The last two train on
      each object's mask (labels["gt_masks"]).

    init_checkpoint: start a run from another model's weights (fine-tuning): a model directory
      (a training run's model_dir, or a converted model: params.yaml, category_map.json and
      ``tf.train.Checkpoint(model=..., optimizer=...)`` files; its latest checkpoint is used) or
      a checkpoint path prefix inside one (``models/x/ckpt-5``). The source model is rebuilt from
      that directory's params.yaml model section and category_map.json; only its model weights
      are taken (the optimizer state and step are not: the run starts at step 0 with a fresh
      optimizer). Used only when a run starts from step 0: a run that resumes from a checkpoint
      of its own model_dir ignores it (and logs so). null = no init checkpoint.
    init_checkpoint_modules: which weights init_checkpoint gives (`fpn_tf.training.init_checkpoint`):
      "all" = every weight of the detector (backbone, pyramid, RPN, the box head's fc layers);
      the class-specific layers (the box head's classifier and box regressor, a mask branch's
      predictor) are taken only when the source has the same classes (same category ids, hence
      the same shapes), else they keep their fresh initialisation, and the log says so. A Mask
      R-CNN started from a Faster R-CNN keeps its fresh mask branch (logged). "backbone" = only the bottom-up
      ResNet (e.g. to start a different detector from a COCO backbone). Outside the class layers,
      the weights taken must have the source's shapes: an architecture that differs (another
      backbone, pyramid width, fc size, ...) is a one-line error naming the layer and both shapes.
      With an init checkpoint the backbone's ``weights`` are not loaded (the checkpoint
      overwrites every backbone weight either way).
    """

    architecture: Literal["faster_rcnn", "mask_rcnn", "segment_proposals"] = "faster_rcnn"
    num_classes: int = field(0, non_negative)
    init_checkpoint: Optional[str] = field(
        None,
        Check(
            lambda path: path.strip() != "",
            "null, a model directory or a checkpoint path prefix",
        ),
    )
    init_checkpoint_modules: Literal["all", "backbone"] = "all"
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    fpn: FPNConfig = dataclasses.field(default_factory=FPNConfig)
    anchor: AnchorConfig = dataclasses.field(default_factory=AnchorConfig)
    rpn: RPNConfig = dataclasses.field(default_factory=RPNConfig)
    roi_sampler: RoISamplerConfig = dataclasses.field(default_factory=RoISamplerConfig)
    roi_aligner: RoIAlignerConfig = dataclasses.field(default_factory=RoIAlignerConfig)
    box_head: BoxHeadConfig = dataclasses.field(default_factory=BoxHeadConfig)
    detection: DetectionConfig = dataclasses.field(default_factory=DetectionConfig)
    mask_roi_aligner: RoIAlignerConfig = dataclasses.field(
        default_factory=lambda: RoIAlignerConfig(output_size=14)
    )
    mask_head: MaskHeadConfig = dataclasses.field(default_factory=MaskHeadConfig)
    segment_proposals: SegmentProposalConfig = dataclasses.field(
        default_factory=SegmentProposalConfig
    )

    def _check_values(self, p):
        fpn = self.fpn
        if fpn.single_scale_level is None:
            num_levels = fpn.max_level - fpn.min_level + 1
            _require(
                len(self.anchor.sizes) == num_levels,
                p + "anchor.sizes",
                f"needs one size per pyramid level P{fpn.min_level}..P{fpn.max_level} "
                f"({num_levels}), got {len(self.anchor.sizes)}: {self.anchor.sizes}.",
            )
            for name in ("roi_aligner", "mask_roi_aligner"):
                aligner = getattr(self, name)
                _require(
                    fpn.min_level <= aligner.min_level,
                    f"{p}{name}.min_level",
                    f"({aligner.min_level}) must be a pyramid level: "
                    f">= {p}fpn.min_level ({fpn.min_level}).",
                )
                _require(
                    aligner.max_level <= fpn.max_level,
                    f"{p}{name}.max_level",
                    f"({aligner.max_level}) must be a pyramid level: "
                    f"<= {p}fpn.max_level ({fpn.max_level}).",
                )


# --------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SyntheticDataConfig(Config):
    """A generated shapes set in COCO format (source: synthetic), for tests and the CPU demo.

    Arguments of fpn_tf.data.synthetic.generate_split, which writes
    <output_dir>/annotations/instances_<split>.json and images under <output_dir>/<split>/
    (split "train" for train_data, "val" for eval_data); the trainer generates it once, then
    reads it as a COCO source. output_dir: None = a folder chosen by the trainer.
    image_size: [min, max] pixels; each image's height and width are drawn from that range.
    max_objects: objects per image, at most.
    """

    num_images: int = field(400, positive)
    image_size: List[int] = field(
        [320, 512],
        Check(
            lambda size: len(size) == 2 and 16 <= size[0] <= size[1],
            "[min, max] with 16 <= min <= max",
        ),
    )
    max_objects: int = field(8, positive)
    seed: int = 0
    output_dir: Optional[str] = None


@dataclasses.dataclass
class DataConfig(Config):
    """One input pipeline (train_data or eval_data).

    Field names are those fpn_tf.data.build_dataset / as_source read.
    source: "coco" (annotation_file + image_dir), "tfrecord" (Model Garden tf.Example shards
      matching file_pattern; category_map: the id -> name JSON, None = the one beside the shards)
      or "synthetic" (generated, see SyntheticDataConfig, then read as COCO).
    annotation_file: for eval_data it is also the ground truth of the COCO metrics when set
      (official areas, crowd regions), whatever the source.
    short_side / max_long_side: resize so the shorter side is short_side and the longer side at
      most max_long_side (800 / 1333). pad_multiple: padded sizes are multiples of it.
    resize_rounding: how the resized size is rounded (fpn_tf.data.transforms.resized_size; the
      pipeline and, from eval_data, the exported SavedModel): "round" (half to even, float32, as
      Model Garden; ours), "floor" (torchvision's GeneralizedRCNNTransform: scale
      min(short_side / min(h, w), max_long_side / max(h, w)), then floor(size * scale), in
      float64; 480x640 -> 800x1066 where round gives 800x1067) or "half_up" (detectron2's
      ResizeShortestEdge: float64, int(size + 0.5); differs from "round" on ties, ~0.1 % of
      sizes).
    resize_method: how the pixels are resampled to that size (fpn_tf.data.transforms.resize_image;
      the pipeline and, from eval_data, the exported SavedModel): "bilinear" (tf.image.resize,
      float, no anti-aliasing; ours, and torchvision's F.interpolate) or "pil_bilinear"
      (detectron2's: PIL's Image.BILINEAR on the uint8 image, anti-aliased when shrinking, the
      result uint8; reproduced bit-exactly in TF, about 6x slower than "bilinear" on a CPU).
    padding_mode: "orientation" (two static shapes: landscape / portrait), "square" (one) or
      "batch" (each batch to its largest image); see fpn_tf.data.pipeline.
    global_batch_size: over all replicas; must be divisible by the number of replicas.
    shuffle_buffer_size: None = the pipeline's default (every image for COCO sources).
    max_num_instances: ground-truth rows per image (padded; extra objects dropped).
    mask_crop_size: S of labels["gt_masks"] [B, N, S, S], each object's mask over its box
      (box-relative, fpn_tf.ops.mask_ops), when the pipeline is asked for masks (a model with a
      mask head).
    on_bad_data: "skip" a corrupt/unreadable example (logged) or "error".
    verify_images: how much of each COCO image file is checked when indexing.
    """

    source: Literal["coco", "tfrecord", "synthetic"] = "coco"
    annotation_file: Optional[str] = None
    image_dir: Optional[str] = None
    file_pattern: Optional[str] = None
    category_map: Optional[str] = None
    short_side: int = field(800, positive)
    max_long_side: int = 1333
    pad_multiple: int = field(32, at_least(1))
    resize_rounding: Literal["round", "floor", "half_up"] = "round"
    resize_method: Literal["bilinear", "pil_bilinear"] = "bilinear"
    padding_mode: Literal["orientation", "square", "batch"] = "orientation"
    random_flip: bool = True
    global_batch_size: int = field(16, positive)
    shuffle_buffer_size: Optional[int] = field(None, non_negative)
    max_num_instances: int = field(100, positive)
    mask_crop_size: int = field(112, positive)
    on_bad_data: Literal["skip", "error"] = "skip"
    verify_images: Literal["header", "full", "none"] = "header"
    synthetic: SyntheticDataConfig = dataclasses.field(default_factory=SyntheticDataConfig)

    def _check_values(self, p):
        if self.source == "coco":
            _require(
                bool(self.annotation_file),
                p + "annotation_file",
                "is required when source is 'coco'.",
            )
            _require(bool(self.image_dir), p + "image_dir", "is required when source is 'coco'.")
        elif self.source == "tfrecord":
            _require(
                bool(self.file_pattern),
                p + "file_pattern",
                "is required when source is 'tfrecord'.",
            )
        _require(
            self.max_long_side >= self.short_side,
            p + "max_long_side",
            f"({self.max_long_side}) must be >= {p}short_side ({self.short_side}).",
        )

    def per_replica_batch_size(self, num_replicas: int) -> int:
        if num_replicas <= 0 or self.global_batch_size % num_replicas:
            raise ConfigError(
                f"Config key 'global_batch_size' ({self.global_batch_size}) is not divisible by "
                f"the number of replicas ({num_replicas}).",
                key="global_batch_size",
            )
        return self.global_batch_size // num_replicas

    def _file_paths(self) -> Dict[str, Optional[str]]:
        if self.source == "coco":
            return {"annotation_file": self.annotation_file, "image_dir": self.image_dir}
        if self.source == "tfrecord":
            return {
                "file_pattern": self.file_pattern,
                "category_map": self.category_map,
                "annotation_file": self.annotation_file,
            }
        return {}


def _train_data() -> DataConfig:
    return DataConfig(
        annotation_file="data/coco/annotations/instances_train2017.json",
        image_dir="data/coco/train2017",
        random_flip=True,
        global_batch_size=16,
    )


def _eval_data() -> DataConfig:
    return DataConfig(
        annotation_file="data/coco/annotations/instances_val2017.json",
        image_dir="data/coco/val2017",
        random_flip=False,
        global_batch_size=8,
    )


# --------------------------------------------------------------------------------------------
# Training, evaluation, runtime.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig(Config):
    """Optimisation and the training loop (detectron2 "1x": 90k steps at batch 16).

    learning_rate: base LR for reference_batch_size images; with scale_lr_with_batch the LR used is
      learning_rate * global_batch_size / reference_batch_size (linear scaling rule; the step
      counts are not rescaled). See :meth:`scaled_learning_rate` and fpn_tf.training.lr_schedule.
    optimizer: "sgd" (with momentum) or "adamw" (momentum is then unused).
    weight_decay: for sgd, the L2 coefficient as in the paper/Caffe/detectron2, i.e. weight_decay *
      w added to the gradient before momentum (Keras' own SGD(weight_decay=...) is decoupled and
      ~1/(1-momentum) = 10x weaker); for adamw, AdamW's decoupled decay.
    weight_decay_excludes_bn_and_bias: no decay on BatchNorm parameters and biases.
    warmup_steps / warmup_factor: LR ramps linearly from warmup_factor * LR to LR.
    decay_steps / decay_factor: LR multiplied by decay_factor at each listed step.
    gradient_clip_norm: clip by global norm; None = no clipping.
    on_nan: a non-finite loss either stops the run ("stop") or skips that update ("skip").
    """

    total_steps: int = field(90000, positive)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    learning_rate: float = field(0.02, positive)
    scale_lr_with_batch: bool = True
    reference_batch_size: int = field(16, positive)
    momentum: float = field(0.9, in_range(0, 1, "[)"))
    weight_decay: float = field(1e-4, non_negative)
    weight_decay_excludes_bn_and_bias: bool = True
    warmup_steps: int = field(1000, non_negative)
    warmup_factor: float = field(0.001, unit_interval)
    decay_steps: List[int] = field([60000, 80000], each(positive), increasing)
    decay_factor: float = field(0.1, in_range(0, 1, "(]"))
    gradient_clip_norm: Optional[float] = field(None, positive)
    checkpoint_every_steps: int = field(5000, positive)
    max_checkpoints_to_keep: int = field(5, positive)
    log_every_steps: int = field(20, positive)
    summary_every_steps: int = field(100, positive)
    on_nan: Literal["stop", "skip"] = "stop"
    seed: int = 0

    def scaled_learning_rate(self, global_batch_size: int) -> float:
        """The LR used: the linear scaling rule when scale_lr_with_batch, else learning_rate."""
        if not self.scale_lr_with_batch:
            return self.learning_rate
        return self.learning_rate * global_batch_size / self.reference_batch_size


@dataclasses.dataclass
class EvalConfig(Config):
    """Evaluation. steps: batches per evaluation (None = the whole eval set).

    every_steps: evaluate every so many training steps in train_and_eval mode.
    compute_rpn_recall: also report proposal AR@100/AR@1000 (paper Table 1).
    per_category_metrics: add AP per category to the metrics.
    summary_images: at each evaluation, this many held-out images with the predicted boxes
      (score >= summary_score_threshold, red) and the ground truth (green) go to TensorBoard.
    """

    steps: Optional[int] = field(None, positive)
    every_steps: int = field(10000, positive)
    compute_rpn_recall: bool = True
    per_category_metrics: bool = False
    summary_images: int = field(4, non_negative)
    summary_score_threshold: float = field(0.5, unit_interval)


@dataclasses.dataclass
class RuntimeConfig(Config):
    """Where and how the computation runs.

    strategy: "one_device" (devices[0], or the first GPU, else the CPU), "mirrored" (devices, or
      all local GPUs) or "multi_worker_mirrored" (cluster from TF_CONFIG).
    devices: e.g. ["/gpu:0", "/gpu:1"]; None = automatic.
    num_logical_cpu_devices: split the CPU into that many logical devices before the strategy is
      made (tests of multi-replica code without GPUs); 0 = leave as is.
    mixed_precision: None/"float32" (off), "mixed_float16" or "mixed_bfloat16" (Keras dtype
      policies); "float16" and "bfloat16" are Model Garden spellings of the two mixed policies.
    jit_compile: XLA-compile the train/eval steps.
    """

    strategy: Literal["one_device", "mirrored", "multi_worker_mirrored"] = "one_device"
    devices: Optional[List[str]] = field(None, non_empty)
    num_logical_cpu_devices: int = field(0, non_negative)
    mixed_precision: Optional[
        Literal["float32", "float16", "bfloat16", "mixed_float16", "mixed_bfloat16"]
    ] = None
    jit_compile: bool = False

    def _check_values(self, p):
        if self.devices is not None and self.strategy == "one_device":
            _require(
                len(self.devices) == 1,
                p + "devices",
                f"lists {len(self.devices)} devices but strategy is 'one_device'.",
            )

    def dtype_policy(self) -> Optional[str]:
        """The Keras dtype policy name to set, or None for the float32 default."""
        return {
            None: None,
            "float32": None,
            "float16": "mixed_float16",
            "mixed_float16": "mixed_float16",
            "bfloat16": "mixed_bfloat16",
            "mixed_bfloat16": "mixed_bfloat16",
        }[self.mixed_precision]


# --------------------------------------------------------------------------------------------
# The experiment.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExperimentConfig(Config):
    """Everything a run needs. Defaults: FPN Faster R-CNN R-50, COCO train2017/val2017, 1x."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train_data: DataConfig = dataclasses.field(default_factory=_train_data)
    eval_data: DataConfig = dataclasses.field(default_factory=_eval_data)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    def validate(
        self, num_replicas: Optional[int] = None, check_files: bool = False, training: bool = True
    ) -> "ExperimentConfig":
        """Raises ConfigError on impossible values; returns self.

        num_replicas: replicas in sync (strategy.num_replicas_in_sync); both global batch sizes
          must divide by it. None = taken from runtime.devices when listed (1 for one_device), else
          not checked.
        check_files: also require the data/weights paths that the sources need to exist.
        training: False for an evaluation alone: the training data's paths are not needed.
        """
        self.validate_section("")
        if num_replicas is None:
            if self.runtime.strategy == "one_device":
                num_replicas = 1
            elif self.runtime.devices and self.runtime.strategy == "mirrored":
                num_replicas = len(self.runtime.devices)
        if num_replicas is not None:
            if (
                not isinstance(num_replicas, int)
                or isinstance(num_replicas, bool)
                or num_replicas <= 0
            ):
                raise ConfigError(f"num_replicas must be a positive int, got {num_replicas!r}.")
            for name in ("train_data", "eval_data"):
                batch = getattr(self, name).global_batch_size
                _require(
                    batch % num_replicas == 0,
                    f"{name}.global_batch_size",
                    f"({batch}) must be divisible by the number of replicas ({num_replicas}).",
                )
        if check_files:
            paths = (
                {f"train_data.{k}": v for k, v in self.train_data._file_paths().items()}
                if training
                else {}
            )
            paths.update({f"eval_data.{k}": v for k, v in self.eval_data._file_paths().items()})
            weights = self.model.backbone.weights
            if training and weights is not None and weights != "imagenet":
                paths["model.backbone.weights"] = weights
            init = self.model.init_checkpoint
            if training and init and "://" not in init:
                _require(
                    os.path.isdir(init) or os.path.exists(init + ".index"),
                    "model.init_checkpoint",
                    f"points to {init!r}, which is neither a model directory nor a checkpoint "
                    f"({init}.index does not exist).",
                )
            for key, path in paths.items():
                if path and "://" not in path:
                    exists = (
                        bool(glob.glob(path))
                        if key.endswith("file_pattern")
                        else os.path.exists(path)
                    )
                    _require(exists, key, f"points to {path!r}, which does not exist.")
        return self
