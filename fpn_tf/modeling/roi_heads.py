"""The second stage: Fast R-CNN (FPN paper §4.2) and the optional Mask R-CNN mask branch
(He et al. 2017) in one layer, as torchvision's ``RoIHeads``."""

from __future__ import annotations

import math
from typing import List, Optional

import keras
import tensorflow as tf

from fpn_tf.configs.experiment import (
    BoxHeadConfig,
    DetectionConfig,
    MaskHeadConfig,
    RoISamplerConfig,
)
from fpn_tf.modeling.losses import fast_rcnn_losses
from fpn_tf.modeling.mask_head import MaskRCNNHead
from fpn_tf.modeling.poolers import MultiLevelRoIAlign
from fpn_tf.ops import mask_ops, postprocess, target_assigner


@keras.saving.register_keras_serializable(package="fpn_tf")
class FastRCNNBoxHead(keras.layers.Layer):
    """Hidden fc layers + ReLU, a classifier and class-specific box regression (paper §4.2).

    [B, R, S, S, C] RoI features -> (class_logits [B, R, num_logits], box_deltas [B, R, C, 4]);
    class k's deltas at ``[..., k-1, :]``. ``num_logits`` None = C + 1.
    """

    def __init__(self, num_classes: int, fc_dims: int, num_fc: int, num_logits=None, **kwargs):
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
        dense = lambda units, name, init, **kw: keras.layers.Dense(  # noqa: E731
            units, name=name, kernel_initializer=init, dtype=self.dtype_policy, **kw
        )
        for i in range(1, self.num_fc + 1):
            setattr(
                self, f"fc{i}", dense(self.fc_dims, f"fc{i}", "lecun_uniform", activation="relu")
            )
        normal = keras.initializers.RandomNormal
        rows = self.num_classes + 1 if self.num_logits is None else self.num_logits
        self.classifier = dense(rows, "class_logits", normal(stddev=0.01))
        self.box_regressor = dense(4 * self.num_classes, "box_deltas", normal(stddev=0.001))

    @property
    def fcs(self) -> list:
        return [getattr(self, f"fc{i + 1}") for i in range(self.num_fc)]

    def build(self, input_shape):
        shape = (None, math.prod(int(d) for d in input_shape[2:]))
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
        keys = ("num_classes", "fc_dims", "num_fc", "num_logits")
        return {**super().get_config(), **{k: getattr(self, k) for k in keys}}


@keras.saving.register_keras_serializable(package="fpn_tf")
class RoIHeads(keras.layers.Layer):
    """RoI sampling, the box branch and the optional mask branch, their losses and outputs.

    Args are config sections (or their dicts): the mask branch needs both ``mask_roi_aligner``
    and ``mask_head``. ``classifier_rows``: None for the contiguous layout, else ``[0] +
    category_ids`` (``classifier_layout "dataset_ids"``; the mask channels follow it).

    ``call(features, proposals, image_valid_hw [B, 2], labels=None)``: with labels ``(RoiTargets,
    losses)``; without ``(Detections, masks float32 [B, D, M, M] or None)``.
    """

    def __init__(
        self,
        num_classes: int,
        roi_sampler,
        roi_aligner,
        box_head,
        detection,
        mask_roi_aligner=None,
        mask_head=None,
        classifier_rows: Optional[List[int]] = None,
        **kwargs,
    ):
        kwargs.pop("autocast", None)
        # autocast=False: proposals, sizes and ground truth stay float32 under mixed precision.
        super().__init__(autocast=False, **kwargs)
        self.num_classes = int(num_classes)
        self.sampler_config = RoISamplerConfig.of(roi_sampler)
        self.box_config = BoxHeadConfig.of(box_head)
        self.detection_config = DetectionConfig.of(detection)
        self.classifier_rows = _check_classifier_rows(
            self.box_config.classifier_layout, classifier_rows, self.num_classes
        )
        self.box_pooler = MultiLevelRoIAlign(roi_aligner, name="box_pooler")
        self.box_head = FastRCNNBoxHead(
            self.num_classes,
            self.box_config.fc_dims,
            self.box_config.num_fc,
            num_logits=None if self.classifier_rows is None else max(self.classifier_rows) + 1,
            name="box_head",
            dtype=self.dtype_policy,
        )
        if (mask_roi_aligner is None) != (mask_head is None):
            raise ValueError("a mask branch needs both mask_roi_aligner and mask_head")
        self.mask_pooler = self.mask_head = self.mask_config = None
        if mask_head is not None:
            self.mask_config = MaskHeadConfig.of(mask_head)
            self.mask_pooler = MultiLevelRoIAlign(mask_roi_aligner, name="mask_pooler")
            self.mask_head = MaskRCNNHead(
                self.num_classes,
                self.mask_config.conv_dims,
                self.mask_config.num_convs,
                class_agnostic=self.mask_config.class_agnostic,
                classifier_rows=self.classifier_rows,
                name="mask_head",
                dtype=self.dtype_policy,
            )

    def build(self, features_shape):
        self.box_pooler.build(features_shape)
        self.box_head.build(self.box_pooler.output_shape_for())
        if self.mask_head is not None:
            self.mask_pooler.build(features_shape)
            self.mask_head.build(self.mask_pooler.output_shape_for())
        self.built = True

    # Settings the portable export switches (`fpn_tf.serving.portable.portable_settings`).
    @property
    def align_impl(self) -> str:
        return self.box_pooler.config.align_impl

    @align_impl.setter
    def align_impl(self, value: str):
        for pooler in (self.box_pooler, self.mask_pooler):
            if pooler is not None:
                pooler.config.align_impl = value

    @property
    def nms_impl(self) -> str:
        return self.detection_config.nms_impl

    @nms_impl.setter
    def nms_impl(self, value: str):
        self.detection_config.nms_impl = value

    @property
    def max_foreground_per_image(self) -> int:
        """The sampler's cap on foreground RoIs per image (they come first in its rows)."""
        return int(self.sampler_config.batch_size_per_image * self.sampler_config.positive_fraction)

    # --- the box branch ------------------------------------------------------------------------
    def sample(self, proposals, labels):
        """RoIs [B, batch_size_per_image, 4] and their targets."""
        c = self.sampler_config
        return target_assigner.sample_rois(
            proposals.boxes,
            tf.cast(labels["gt_boxes"], tf.float32),
            tf.cast(labels["gt_classes"], tf.int32),
            labels.get("gt_is_crowd"),
            proposals.valid,
            num_samples=c.batch_size_per_image,
            foreground_fraction=c.positive_fraction,
            foreground_iou=c.foreground_iou,
            box_weights=self.box_config.box_weights,
        )

    def box_outputs(self, features, rois, training=None):
        """float32 class logits [B, R, C+1] (all the classifier's rows) and class-specific
        deltas [B, R, C, 4]."""
        pooled = self.box_pooler(features, rois, training=training)
        logits, deltas = self.box_head(pooled, training=training)
        return tf.cast(logits, tf.float32), tf.cast(deltas, tf.float32)

    def compute_loss(self, targets, class_logits, box_deltas):
        classification, box = fast_rcnn_losses(
            targets.class_targets,
            targets.box_targets,
            class_logits,
            box_deltas,
            self.box_config.smooth_l1_beta,
            valid=targets.valid_mask,
            classifier_rows=self.classifier_rows,
        )
        weight = self.box_config.loss_weight
        return {"fast_rcnn_class_loss": classification * weight, "fast_rcnn_box_loss": box * weight}

    def class_probabilities(self, class_logits):
        """[B, R, C+1]: the softmax over all classifier rows, at background and classes 1..C."""
        probs = tf.nn.softmax(class_logits, axis=-1)
        if self.classifier_rows is not None:
            probs = tf.gather(probs, self.classifier_rows, axis=-1)
        return probs

    def detect(self, class_logits, box_deltas, rois, image_valid_hw):
        c = self.detection_config
        return postprocess.postprocess_detections(
            self.class_probabilities(class_logits),
            box_deltas,
            rois,
            tf.cast(image_valid_hw, tf.float32),
            box_weights=self.box_config.box_weights,
            score_threshold=c.score_threshold,
            nms_iou=c.nms_iou,
            max_detections=c.max_detections,
            nms_impl=c.nms_impl,
            min_box_size=c.min_box_size,
        )

    # --- the mask branch -----------------------------------------------------------------------
    @property
    def mask_size(self) -> int:
        """M, the side of the predicted masks: the deconv doubles the pooled size (28)."""
        return 2 * self.mask_pooler.config.output_size

    def mask_logits(self, features, rois, classes, training=None):
        """float32 [B, R, M, M]: each RoI's mask logits in the channel of its class (1..C)."""
        logits = self.mask_head(
            self.mask_pooler(features, rois, training=training), training=training
        )
        channels = self.mask_head.class_channels(classes)  # [B, R]
        return tf.cast(tf.gather(logits, channels, axis=4, batch_dims=2), tf.float32)

    def mask_targets(self, targets, labels):
        """``(rois [B, F, 4], classes [B, F], foreground [B, F], 0/1 targets [B, F, M, M])`` of
        the first F = ``max_foreground_per_image`` sampled rows, where the sampler puts the
        foreground; targets are 0 on other rows."""
        f = self.max_foreground_per_image
        rois, foreground = targets.rois[:, :f], targets.foreground_mask[:, :f]
        matched = tf.where(foreground, targets.matched_gt_indices[:, :f], -1)
        masks = mask_ops.mask_targets(
            labels["gt_masks"], labels["gt_boxes"], rois, matched, self.mask_size
        )
        return rois, targets.class_targets[:, :f], foreground, tf.stop_gradient(masks)

    def mask_loss(self, features, targets, labels, training=None):
        """Mean per-pixel sigmoid cross-entropy of the target class's mask over this replica's
        foreground RoIs (0 without any; as detectron2 and torchvision), times ``loss_weight``."""
        rois, classes, foreground, masks = self.mask_targets(targets, labels)
        logits = self.mask_logits(features, rois, classes, training)
        bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=masks, logits=logits)
        weight = tf.cast(foreground, tf.float32)
        total = tf.reduce_sum(tf.reduce_sum(bce, axis=[2, 3]) * weight)
        count = tf.reduce_sum(weight) * float(self.mask_size * self.mask_size)
        return {"mask_loss": tf.math.divide_no_nan(total, count) * self.mask_config.loss_weight}

    def predict_masks(self, features, detections):
        """float32 [B, D, M, M] box-relative mask probabilities of each detection's class; zero
        rows past ``num_detections``."""
        boxes = tf.cast(detections.boxes, tf.float32)
        probs = tf.sigmoid(self.mask_logits(features, boxes, detections.classes, False))
        rows = tf.sequence_mask(detections.num_detections, tf.shape(boxes)[1])
        return tf.where(rows[:, :, None, None], probs, 0.0)

    def call(self, features, proposals, image_valid_hw, labels=None, training=None):
        if labels is not None:
            targets = self.sample(proposals, labels)
            losses = self.compute_loss(targets, *self.box_outputs(features, targets.rois, training))
            if self.mask_head is not None:
                losses.update(self.mask_loss(features, targets, labels, training))
            return targets, losses
        outputs = self.box_outputs(features, proposals.boxes, training)
        detections = self.detect(*outputs, proposals.boxes, image_valid_hw)
        masks = None if self.mask_head is None else self.predict_masks(features, detections)
        return detections, masks

    def get_config(self):
        masks = self.mask_head is not None
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "classifier_rows": self.classifier_rows,
            "roi_sampler": self.sampler_config.to_dict(),
            "roi_aligner": self.box_pooler.config.to_dict(),
            "box_head": self.box_config.to_dict(),
            "detection": self.detection_config.to_dict(),
            "mask_roi_aligner": self.mask_pooler.config.to_dict() if masks else None,
            "mask_head": self.mask_config.to_dict() if masks else None,
        }


def _check_classifier_rows(layout, rows, num_classes):
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
