"""Fast R-CNN on the feature pyramid (paper §4.2), as one Keras layer.

`RoIHeads` owns the second stage: RoI sampling against the ground truth, the assignment of each
RoI to a pyramid level by Eq. 1 and RoIAlign on that level, the box head (two 1024-d fc layers, a
(C+1)-way classifier and class-specific box regression), its two losses, and the detection
post-processing (decode, per-class NMS, top detections). The arithmetic is pure TensorFlow in
`fpn_tf.ops` (`target_assigner.sample_rois`, `roi_ops`, `postprocess.postprocess_detections`)
and `fpn_tf.modeling.losses`; this layer holds the settings and calls them::

    targets, losses = roi_heads(features, proposals, image_valid_hw, labels=labels)  # training
    detections, _ = roi_heads(features, proposals, image_valid_hw)                  # inference

In training the sampled `target_assigner.RoiTargets` come back with the losses, so the mask
branch (`fpn_tf.modeling.mask_head.MaskHeads`) trains on the same RoIs as the box head.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import keras
import tensorflow as tf

from fpn_tf.modeling.losses import fast_rcnn_losses
from fpn_tf.ops import anchors as anchor_ops
from fpn_tf.ops import postprocess, roi_ops, target_assigner


@keras.saving.register_keras_serializable(package="fpn_tf")
class FastRCNNBoxHead(keras.layers.Layer):
    """Two hidden fully connected layers (1024, ReLU), a (C+1)-way classifier and class-specific
    box regression (paper §4.2: "2 hidden 1,024-d fully-connected (fc) layers ... before the final
    classification and bounding box regression layers").

    Call with RoI features ``[B, R, S, S, C]``; returns ``(class_logits [B, R, C+1],
    box_deltas [B, R, C, 4])`` (deltas of class k at ``[..., k-1, :]``; background has none).
    ``num_logits``: the classifier's rows, None = C + 1 (more for torchvision's COCO layout,
    ``model.roi.classifier_layout``: the logits are then [B, R, num_logits]).
    """

    def __init__(
        self,
        num_classes: int,
        fc_dims: int,
        num_fc: int,
        num_logits: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes (foreground classes) must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.fc_dims = int(fc_dims)
        self.num_fc = int(num_fc)
        self.num_logits = None if num_logits is None else int(num_logits)
        if self.num_logits is not None and self.num_logits < self.num_classes + 1:
            raise ValueError(
                f"num_logits ({self.num_logits}) must be at least num_classes + 1 "
                f"({self.num_classes + 1})"
            )
        # Attributes fc1, fc2, ... (not a list: listed layers are invisible to tf.train.Checkpoint).
        for i in range(self.num_fc):
            setattr(
                self,
                f"fc{i + 1}",
                keras.layers.Dense(
                    self.fc_dims,
                    activation="relu",
                    name=f"fc{i + 1}",
                    kernel_initializer="lecun_uniform",
                    dtype=self.dtype_policy,
                ),
            )
        self.classifier = keras.layers.Dense(
            self.num_classes + 1 if self.num_logits is None else self.num_logits,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            name="class_logits",
            dtype=self.dtype_policy,
        )
        self.box_regressor = keras.layers.Dense(
            4 * self.num_classes,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            name="box_deltas",
            dtype=self.dtype_policy,
        )

    @property
    def fcs(self) -> list:
        return [getattr(self, f"fc{i + 1}") for i in range(self.num_fc)]

    def build(self, input_shape):
        dims = 1
        for d in input_shape[2:]:
            dims *= int(d)
        shape = (None, dims)
        for fc in self.fcs:
            fc.build(shape)
            shape = (None, self.fc_dims)
        self.classifier.build(shape)
        self.box_regressor.build(shape)

    def call(self, roi_features):
        shape = keras.ops.shape(roi_features)
        x = keras.ops.reshape(roi_features, (shape[0], shape[1], -1))
        for fc in self.fcs:
            x = fc(x)
        logits = self.classifier(x)
        deltas = keras.ops.reshape(self.box_regressor(x), (shape[0], shape[1], self.num_classes, 4))
        return logits, deltas

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "fc_dims": self.fc_dims,
                "num_fc": self.num_fc,
                "num_logits": self.num_logits,
            }
        )
        return config


_ROI_FIELDS = (
    "batch_size_per_image",
    "positive_fraction",
    "foreground_iou",
    "canonical_size",
    "canonical_level",
    "min_level",
    "max_level",
    "output_size",
    "sampling_ratio",
    "num_fc",
    "fc_dims",
    "smooth_l1_beta",
    "loss_weight",
    "align_impl",
    "aligned",
    "level_epsilon",
    "classifier_layout",
)
_DETECTION_FIELDS = ("score_threshold", "nms_iou", "max_detections", "nms_impl", "min_box_size")


@keras.saving.register_keras_serializable(package="fpn_tf")
class RoIHeads(keras.layers.Layer):
    """RoI sampling, Eq. 1 + multi-level RoIAlign, the box head, its losses and the detections.

    The keyword arguments are the fields of the ``model.roi`` and ``model.detection`` config
    sections (`fpn_tf.configs.experiment.RoIConfig` and `DetectionConfig`, which document each one
    and hold the paper's numbers as their defaults), plus ``num_classes`` and ``classifier_rows``.
    They have no defaults here so that each number is written once:
    `fpn_tf.modeling.factory.build_roi_heads` builds this layer from a config, and on its own
    ``RoIHeads(num_classes=C, **RoIConfig().to_dict(), **DetectionConfig().to_dict())``.

    ``classifier_rows``: None with ``classifier_layout="contiguous"`` (row k = class k); with
    ``"dataset_ids"`` the classifier row of background and of classes 1..C, ``[0] +
    category_ids`` (`build_roi_heads`): the classifier then has ``max(rows) + 1`` rows, the
    softmax is over all of them, the detections read ``softmax[..., classifier_rows]`` and the
    classification loss is the cross-entropy over all rows at the target's row.

    The RoIs go to the pyramid levels ``min_level..max_level`` that the features hold (Eq. 1 is
    clamped to those; e.g. the single-level ablations pool everything from their one level).

    Call: ``roi_heads(features, proposals, image_valid_hw, labels=None, training=None)`` with the
    pyramid dict, the RPN's `Proposals`, the unpadded ``(height, width)`` [B, 2] and optionally
    the ground truth (as in `RegionProposalNetwork`). With ``labels``: ``(RoiTargets,
    {"fast_rcnn_class_loss", "fast_rcnn_box_loss"})`` (the ``batch_size_per_image`` RoIs sampled
    per image, foreground rows first, for the mask branch; the losses weighted by
    ``loss_weight``); without: ``(Detections, {})``
    (`fpn_tf.ops.postprocess.Detections`: boxes [B, D, 4], scores, classes 1..C, counts).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        batch_size_per_image: int,
        positive_fraction: float,
        foreground_iou: float,
        canonical_size: float,
        canonical_level: int,
        min_level: int,
        max_level: int,
        output_size: int,
        sampling_ratio: int,
        num_fc: int,
        fc_dims: int,
        box_weights: Sequence[float],
        smooth_l1_beta: float,
        loss_weight: float,
        align_impl: str,
        score_threshold: float,
        nms_iou: float,
        max_detections: int,
        nms_impl: str,
        aligned: bool,
        level_epsilon: float,
        classifier_layout: str,
        min_box_size: float,
        classifier_rows: Optional[List[int]] = None,
        **kwargs,
    ):
        kwargs.pop("autocast", None)
        # autocast=False: proposals, sizes and ground truth stay float32 under mixed precision.
        super().__init__(autocast=False, **kwargs)
        self.num_classes = int(num_classes)
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.foreground_iou = float(foreground_iou)
        self.canonical_size, self.canonical_level = float(canonical_size), int(canonical_level)
        self.min_level, self.max_level = int(min_level), int(max_level)
        self.output_size, self.sampling_ratio = int(output_size), int(sampling_ratio)
        self.num_fc, self.fc_dims = int(num_fc), int(fc_dims)
        self.box_weights = tuple(float(w) for w in box_weights)
        self.smooth_l1_beta, self.loss_weight = float(smooth_l1_beta), float(loss_weight)
        self.align_impl = str(align_impl)
        self.score_threshold, self.nms_iou = float(score_threshold), float(nms_iou)
        self.max_detections, self.nms_impl = int(max_detections), str(nms_impl)
        self.aligned, self.level_epsilon = bool(aligned), float(level_epsilon)
        self.min_box_size = float(min_box_size)
        self.classifier_layout = str(classifier_layout)
        self.classifier_rows = _check_classifier_rows(
            self.classifier_layout, classifier_rows, self.num_classes
        )
        self.box_head = FastRCNNBoxHead(
            self.num_classes,
            self.fc_dims,
            self.num_fc,
            num_logits=None if self.classifier_rows is None else max(self.classifier_rows) + 1,
            name="box_head",
            dtype=self.dtype_policy,
        )

    def build(self, features_shape):
        self.levels = roi_levels(features_shape, self.min_level, self.max_level)
        channels = int(features_shape[self.levels[0]][-1])
        self.box_head.build((None, None, self.output_size, self.output_size, channels))

    @property
    def max_foreground_per_image(self) -> int:
        """The sampler's cap on foreground RoIs per image (they come first in its rows)."""
        return int(self.batch_size_per_image * self.positive_fraction)

    # --- the pieces, each usable on its own --------------------------------------------------
    def sample(self, proposals, labels):
        """`target_assigner.sample_rois`: RoIs [B, batch_size_per_image, 4] and their targets."""
        return target_assigner.sample_rois(
            proposals.boxes,
            tf.cast(labels["gt_boxes"], tf.float32),
            tf.cast(labels["gt_classes"], tf.int32),
            labels.get("gt_is_crowd"),
            proposals.valid,
            num_samples=self.batch_size_per_image,
            foreground_fraction=self.positive_fraction,
            foreground_iou=self.foreground_iou,
            box_weights=self.box_weights,
        )

    def pool(self, features, rois, training=None):
        """RoIAlign of each RoI on its Eq. 1 level: [B, R, S, S, C]."""
        first, last = (anchor_ops.level_number(lvl) for lvl in (self.levels[0], self.levels[-1]))
        return roi_ops.multilevel_roi_align(
            {lvl: features[lvl] for lvl in self.levels},
            rois,
            output_size=self.output_size,
            sampling_ratio=self.sampling_ratio,
            min_level=first,
            max_level=last,
            canonical_size=self.canonical_size,
            canonical_level=self.canonical_level,
            impl=self.align_impl,
            training=training,
            aligned=self.aligned,
            level_epsilon=self.level_epsilon,
        )

    def box_outputs(self, features, rois, training=None):
        """float32 class logits [B, R, C+1] (all the classifier's rows) and class-specific
        deltas [B, R, C, 4]."""
        logits, deltas = self.box_head(self.pool(features, rois, training), training=training)
        return tf.cast(logits, tf.float32), tf.cast(deltas, tf.float32)

    def compute_loss(self, targets, class_logits, box_deltas):
        classification, box = fast_rcnn_losses(
            targets.class_targets,
            targets.box_targets,
            class_logits,
            box_deltas,
            self.smooth_l1_beta,
            valid=targets.valid_mask,
            classifier_rows=self.classifier_rows,
        )
        return {
            "fast_rcnn_class_loss": classification * self.loss_weight,
            "fast_rcnn_box_loss": box * self.loss_weight,
        }

    def class_probabilities(self, class_logits):
        """[B, R, C+1]: the softmax over all classifier rows, at background and classes 1..C."""
        probs = tf.nn.softmax(class_logits, axis=-1)
        if self.classifier_rows is not None:
            probs = tf.gather(probs, self.classifier_rows, axis=-1)
        return probs

    def detect(self, class_logits, box_deltas, rois, image_valid_hw):
        """`postprocess.postprocess_detections` on the box head's outputs for ``rois``."""
        return postprocess.postprocess_detections(
            self.class_probabilities(class_logits),
            box_deltas,
            rois,
            tf.cast(image_valid_hw, tf.float32),
            box_weights=self.box_weights,
            score_threshold=self.score_threshold,
            nms_iou=self.nms_iou,
            max_detections=self.max_detections,
            nms_impl=self.nms_impl,
            min_box_size=self.min_box_size,
        )

    def call(self, features, proposals, image_valid_hw, labels=None, training=None):
        if labels is not None:
            targets = self.sample(proposals, labels)
            outputs = self.box_outputs(features, targets.rois, training)
            return targets, self.compute_loss(targets, *outputs)
        outputs = self.box_outputs(features, proposals.boxes, training)
        return self.detect(*outputs, proposals.boxes, image_valid_hw), {}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "box_weights": list(self.box_weights),
                "classifier_rows": (
                    None if self.classifier_rows is None else list(self.classifier_rows)
                ),
                **{name: getattr(self, name) for name in _ROI_FIELDS + _DETECTION_FIELDS},
            }
        )
        return config


def roi_levels(features_shape, min_level: int, max_level: int) -> List[str]:
    """The pyramid levels of ``features_shape`` (a dict by level name) in ``min_level..
    max_level``, in order: where the RoI heads pool (Eq. 1 is clamped to them)."""
    present = sorted(features_shape, key=anchor_ops.level_number)
    levels = [lvl for lvl in present if min_level <= anchor_ops.level_number(lvl) <= max_level]
    if not levels:
        raise ValueError(
            f"no pyramid level in roi.min_level..max_level ({min_level}..{max_level}) "
            f"among {present}"
        )
    return levels


def _check_classifier_rows(layout, rows, num_classes):
    """The classifier rows of background and classes 1..C (None for the contiguous layout)."""
    if layout == "contiguous":
        if rows is not None:
            raise ValueError(
                f"classifier_rows must be None with classifier_layout 'contiguous', got {rows}"
            )
        return None
    if layout != "dataset_ids":
        raise ValueError(f"classifier_layout must be 'contiguous' or 'dataset_ids', got {layout!r}")
    if rows is None:
        raise ValueError("classifier_layout 'dataset_ids' needs classifier_rows ([0] + ids)")
    rows = [int(r) for r in rows]
    if len(rows) != num_classes + 1 or rows[0] != 0 or len(set(rows)) != len(rows):
        raise ValueError(
            f"classifier_rows must be 0 then {num_classes} distinct ids, one per class, "
            f"got {rows}"
        )
    if min(rows[1:]) < 1:
        raise ValueError(f"classifier_rows of the classes must be >= 1, got {rows}")
    return rows
