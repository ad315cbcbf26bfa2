"""Typed experiment configuration: a tree of dataclasses whose defaults are the paper's numbers
(Lin et al., CVPR 2017, §4-5) and detectron2's "1x" COCO schedule.

Each field declares its own checks (``field(0.7, unit_interval)``); a section's ``_check_values``
holds the rules that relate several fields. No TensorFlow: configs load in milliseconds.
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
    "ResizeConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "RuntimeConfig",
    "ExperimentConfig",
]


def _require_not_above(section, p, low: str, high: str):
    """The cross-field rule ``section.<low> <= section.<high>``."""
    a, b = getattr(section, low), getattr(section, high)
    _require(a <= b, p + low, f"({a}) must not exceed {p}{high} ({b}).")


@dataclasses.dataclass
class BackboneConfig(Config):
    """Bottom-up pathway: C2..C5, strides 4..32.

    weights: null (random), "imagenet" (keras.applications) or a local .h5 / .weights.h5.
    freeze_at: 0 = train everything, 1 = the stem frozen, 2 = stem + conv2 (detectron2), ... 5.
    freeze_bn: BatchNorm in inference mode, statistics and affine parameters frozen.
    sync_batch_norm: a training BatchNorm takes its statistics over all replicas.
    fold_frozen_bn: each conv + frozen BatchNorm runs as one convolution (faster; the checkpoint
      holds the BatchNorm vectors under the conv's name).
    widths / blocks / stem_width: small_resnet only ([64, 128, 256, 512] / [2, 2, 2, 2] / 64 is
      ResNet-18).
    stride_in_1x1: resnet50/101: a bottleneck's stride in its 1x1 conv (keras.applications,
      detectron2) or, false, its 3x3 conv (torchvision; weights null or a local file).
    bn_epsilon: every BatchNorm's; null = the builder's (1.001e-5 resnet*, 1e-5 small_resnet); 0
      (torchvision's COCO_V1 weights) needs freeze_bn.
    channel_order / pixel_mean / pixel_std: all three or none (null = the type's own: resnet* bgr
      [103.939, 116.779, 123.68] std 1; small_resnet rgb [123.675, 116.28, 103.53] [58.395,
      57.12, 57.375]). Inputs are RGB 0..255; mean and std are in channel_order, 0..255 units.
    pad_normalized_zero: the padding set to pixel_mean, 0 after normalisation (as torchvision
      and detectron2 pad). The reference configs hold the published weights' settings.
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

    num_channels: d of every level (paper: 256). min_level/max_level: P2..P6 (P6: stride-2
    max-pool of P5). use_top_down / use_lateral: false for Table 1's "bottom-up pyramid" / "no
    lateral" ablations. levels_used: the levels the heads use (["P2"]: Table 1 (f)); null = all.
    single_scale_level: "C4"/"C5": the heads on that backbone map (Table 1 (a)/(b)).
    """

    num_channels: int = field(256, positive)
    min_level: int = field(2, in_range(2, 5))
    max_level: int = field(6, in_range(2, 6))
    use_top_down: bool = True
    use_lateral: bool = True
    levels_used: Optional[List[str]] = field(None, non_empty, unique)
    single_scale_level: Optional[Literal["C4", "C5"]] = None

    def _check_values(self, p):
        _require_not_above(self, p, "min_level", "max_level")
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

    offset: cell (y, x)'s anchors centred at ((y + offset) * stride, ...): 0.5 (ours, Model
      Garden) or 0.0 (torchvision, detectron2).
    round_cell_anchors: the cell anchors rounded to integers, half to even (torchvision).
    stride_from_padded_size: a level's stride per axis is padded_size // map_size (torchvision:
      P6 of 800 pixels has stride 61); false: 2**level.
    """

    sizes: List[float] = field([32.0, 64.0, 128.0, 256.0, 512.0], non_empty, each(positive))
    aspect_ratios: List[float] = field([0.5, 1.0, 2.0], non_empty, each(positive))
    offset: float = field(0.5, in_range(0, 1, "[)"))
    round_cell_anchors: bool = False
    stride_from_padded_size: bool = False


@dataclasses.dataclass
class RPNConfig(Config):
    """Region proposal network (paper §4.1), one head shared by all levels.

    positive_iou / negative_iou: anchors with IoU > 0.7 positive, < 0.3 negative; each ground
      truth's best anchor is positive too (IoU > 0). positive_iou_inclusive: >= instead of >
      (torchvision's and detectron2's Matcher).
    pre_nms_top_k_*: kept per level before NMS; post_nms_top_k_*: per image. _train applies
      when a loss is computed, _test otherwise.
    nms_per_level: one NMS per level, then the best of all (torchvision, detectron2).
    min_box_size: proposals with a smaller side (input pixels) are dropped.
    smooth_l1_beta: 1/9 = Detectron's sigma 3; 0 = L1. head_channels: null = num_channels.
    head_sparse_backward: the head's gradient only where the loss reaches (same up to rounding).
    nms_impl: "per_image" (XLA-compatible) or "padded" (one batched op); same boxes.
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
        _require_not_above(self, p, "negative_iou", "positive_iou")


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
    """Eq. 1 + RoIAlign: an RoI of w×h input pixels goes to level k = floor(canonical_level +
    log2(sqrt(wh) / canonical_size) + level_epsilon) in [min_level, max_level].

    sampling_ratio: samples per bin per axis (0 = adaptive, at most 4).
    aligned: the half-pixel shift (detectron2's ROIAlignV2); false: torchvision's.
    level_epsilon: 0 (ours, exact); torchvision's LevelMapper uses 1e-6 in float32.
    align_impl: "gather" (static shapes), "crop_and_resize" (faster forward on CPUs) or "auto"
      (crop_and_resize at inference, gather in training and under XLA); same samples.
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
        _require_not_above(self, p, "min_level", "max_level")
        _require(
            self.min_level <= self.canonical_level <= self.max_level,
            p + "canonical_level",
            f"must be in [{p}min_level, {p}max_level] = [{self.min_level}, {self.max_level}], "
            f"got {self.canonical_level}.",
        )


@dataclasses.dataclass
class BoxHeadConfig(Config):
    """The Fast R-CNN box head (paper §4.2): num_fc fc layers of fc_dims, classifier, box deltas.

    box_weights: the box coder's. smooth_l1_beta: 1.0 = Fast R-CNN's; 0 = L1 (detectron2).
    loss_weight: of both box-head losses.
    classifier_layout: "contiguous" (ours): row 0 background, row k class k. "dataset_ids"
      (torchvision's COCO models): max(id) + 1 rows, row id for category id; softmax and loss over
      all rows.
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

    nms_impl: "per_image", "padded" (XLA-compatible) or "combined" (no XLA kernel); the same
      detections unless over 5000 candidates pass score_threshold.
    min_box_size: clipped detections with a smaller side (input pixels) are removed before NMS
      (torchvision: 1e-2; ours, detectron2: 0).
    """

    score_threshold: float = field(0.05, unit_interval)
    nms_iou: float = field(0.5, unit_interval)
    max_detections: int = field(100, positive)
    nms_impl: Literal["per_image", "padded", "combined"] = "per_image"
    min_box_size: float = field(0.0, non_negative)


@dataclasses.dataclass
class MaskHeadConfig(Config):
    """The Mask R-CNN mask head (He et al. 2017): num_convs 3x3 convs of conv_dims, a 2x2 deconv
    and 1x1 mask logits at twice mask_roi_aligner.output_size. class_agnostic: one mask for all
    classes (paper: one per class)."""

    num_convs: int = field(4, non_negative)
    conv_dims: int = field(256, positive)
    class_agnostic: bool = False
    loss_weight: float = field(1.0, non_negative)


@dataclasses.dataclass
class SegmentProposalConfig(Config):
    """Segment proposals (paper §6; Appendix A of arXiv 1612.03144v2): DeepMask MLPs applied
    fully convolutionally on P2..P6 (the appendix uses model.fpn.num_channels 128).

    hidden_dims: the w x w conv's outputs (paper: 512). mask_size: mask side (paper: 14).
    window_sizes: one head per window size, shared by P2..P6 (paper: [5, 7]).
    object_sizes: per head, the object scale (longer side, input px) on P2, doubling per level
      (paper: 32, 32√2); an object goes to the (head, level) nearest in log scale.
    mask_box_scale: the mask covers this x the group's scale around the cell centre (paper: 1.25).
    center_tolerance (unit "cells" = the stride, or "object_size"): a window is positive when its
      centre is this close to the box centre on both axes (paper: 1 cell).
    crowd_ioa_threshold: a negative this much inside a crowd box is ignored (ours).
    batch_size_per_image, positive_fraction: windows sampled per image (paper: 128, 1 : 3).
    pre_nms_top_k: with NMS, windows per (level, head) before it (ours).
    post_nms_top_k: proposals per image (paper: 1000).
    nms_iou: on the mask boxes; 1 = no NMS (paper).
    objectness_loss_weight, mask_loss_weight: paper: 1, 10.
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
    """The detector. num_classes: foreground classes; 0 = the dataset's.

    architecture: "faster_rcnn", "mask_rcnn" (plus mask_roi_aligner / mask_head) or
      "segment_proposals" (§6: the pyramid and segment_proposals; RPN and RoI sections unused).
    init_checkpoint: fine-tune from another model's weights: a model directory (its latest
      checkpoint) or a checkpoint prefix in one; only the model weights, the run starting at step
      0 with a fresh optimizer. A resumed run ignores it; backbone.weights are then not loaded.
    init_checkpoint_modules: "all" (every weight; the class-specific layers only when the source
      has the same category ids, else fresh, logged) or "backbone". The weights taken must have
      the source's shapes (else a one-line error naming the layer).
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


@dataclasses.dataclass
class SyntheticDataConfig(Config):
    """A generated shapes set in COCO format (source: synthetic), for tests and the CPU demo,
    written once under output_dir (null = the trainer's choice) and read as COCO. image_size:
    [min, max] pixels of each side; max_objects: per image."""

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
class ResizeConfig(Config):
    """One image's resize (paper §5.1) and padding, in the pipeline and the export.

    short_side / max_long_side: resize to this shorter side, the longer at most this (800 /
      1333). pad_multiple: padded sizes are multiples of it.
    rounding: "round" (half to even, float32; ours, Model Garden), "floor" (torchvision: 480x640
      -> 800x1066, round gives 800x1067) or "half_up" (detectron2's ResizeShortestEdge; differs
      from round on ~0.1 % of sizes).
    method: "bilinear" (tf.image.resize, no anti-aliasing; ours, torchvision) or "pil_bilinear"
      (detectron2's PIL resize of the uint8 image, bit-exact, slower on a CPU).
    """

    short_side: int = field(800, positive)
    max_long_side: int = 1333
    pad_multiple: int = field(32, at_least(1))
    rounding: Literal["round", "floor", "half_up"] = "round"
    method: Literal["bilinear", "pil_bilinear"] = "bilinear"

    def _check_values(self, p):
        _require(
            self.max_long_side >= self.short_side,
            p + "max_long_side",
            f"({self.max_long_side}) must be >= {p}short_side ({self.short_side}).",
        )


@dataclasses.dataclass
class DataConfig(Config):
    """One input pipeline (train_data or eval_data).

    source: "coco" (annotation_file + image_dir), "tfrecord" (Model Garden tf.Example shards of
      file_pattern; category_map: the id -> name JSON, null = the one beside them) or
      "synthetic". eval_data's annotation_file, when set, is the COCO metrics' ground truth.
    resize: how each image is resized and padded (eval_data's is the export's too).
    padding_mode: "orientation" (two static shapes), "square" (one) or "batch" (per batch).
    global_batch_size: over all replicas. shuffle_buffer_size: null = every image (COCO).
    max_num_instances: ground-truth rows per image (extra objects dropped).
    mask_crop_size: S of the box-relative labels["gt_masks"] [B, N, S, S] of mask models.
    on_bad_data: "skip" a corrupt example (logged) or "error".
    verify_images: how much of each COCO image file is checked when indexing.
    """

    source: Literal["coco", "tfrecord", "synthetic"] = "coco"
    annotation_file: Optional[str] = None
    image_dir: Optional[str] = None
    file_pattern: Optional[str] = None
    category_map: Optional[str] = None
    resize: ResizeConfig = dataclasses.field(default_factory=ResizeConfig)
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


@dataclasses.dataclass
class TrainConfig(Config):
    """Optimisation and the training loop (detectron2 "1x": 90k steps at batch 16).

    learning_rate: for reference_batch_size images; scale_lr_with_batch multiplies it by
      global_batch_size / reference_batch_size (linear scaling; step counts unchanged).
    optimizer: "sgd" (momentum) or "adamw".
    weight_decay: sgd: coupled L2 (w * weight_decay added to the gradient before momentum, as
      Caffe/detectron2); adamw: decoupled. weight_decay_excludes_bn_and_bias: as it says.
    warmup_steps / warmup_factor: LR ramps linearly from warmup_factor * LR.
    decay_steps / decay_factor: LR times decay_factor at each step listed.
    gradient_clip_norm: by global norm; null = none. on_nan: "stop" the run or "skip" the update.
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
        if not self.scale_lr_with_batch:
            return self.learning_rate
        return self.learning_rate * global_batch_size / self.reference_batch_size


@dataclasses.dataclass
class EvalConfig(Config):
    """Evaluation. steps: batches per evaluation (null = all). every_steps: in train_and_eval.
    compute_rpn_recall: proposal AR@100/AR@1000 (paper Table 1). summary_images: held-out images
    with detections >= summary_score_threshold (red) and ground truth (green) in TensorBoard."""

    steps: Optional[int] = field(None, positive)
    every_steps: int = field(10000, positive)
    compute_rpn_recall: bool = True
    per_category_metrics: bool = False
    summary_images: int = field(4, non_negative)
    summary_score_threshold: float = field(0.5, unit_interval)


@dataclasses.dataclass
class RuntimeConfig(Config):
    """Where and how the computation runs.

    strategy: "one_device" (devices[0], else the first GPU, else the CPU), "mirrored" (devices,
      else all local GPUs) or "multi_worker_mirrored" (TF_CONFIG). devices: null = automatic.
    num_logical_cpu_devices: split the CPU (multi-replica tests without GPUs); 0 = as is.
    mixed_precision: null/"float32", "mixed_float16", "mixed_bfloat16" ("float16"/"bfloat16":
      Model Garden spellings). jit_compile: XLA-compile the train/eval steps.
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
        return {
            None: None,
            "float32": None,
            "float16": "mixed_float16",
            "mixed_float16": "mixed_float16",
            "bfloat16": "mixed_bfloat16",
            "mixed_bfloat16": "mixed_bfloat16",
        }[self.mixed_precision]


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
        """Raises ConfigError on impossible values; returns self. Both global batch sizes must
        divide by ``num_replicas`` (null = from runtime when known). ``check_files``: the paths
        must exist (the training data's only when ``training``)."""
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
