"""Faster R-CNN on the feature pyramid (paper §4): RPN + Fast R-CNN, as one Keras model.

    image -> fpn (backbone + pyramid) -> {P2..P6}
          -> RPN head on every level -> proposals (per-level top-k, decode, clip, NMS, top-k)
          -> Eq. 1 level assignment + RoIAlign 7x7 on P2..P5 -> 2x1024 fc head
          -> (C+1)-way classifier + class-specific box deltas -> detections

`FasterRCNN` is a `keras.Model` (a `MultiLossModel`: its ``train_step`` is the one training step
of the package) whose ``compute_losses`` gives the four losses of a batch of `fpn_tf.data`, so
``model.fit`` trains it, and whose ``call`` returns detections. Everything runs
batched inside one graph: no Python loop over images; the only Python loops are the static unrolls
over pyramid levels where each level's tensors have their own shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import keras
import tensorflow as tf

from fpn_tf.modeling.heads import FastRCNNBoxHead, RPNHead
from fpn_tf.modeling.losses import fast_rcnn_losses, rpn_losses
from fpn_tf.modeling.multi_loss_model import MultiLossModel
from fpn_tf.ops import anchors as anchor_ops
from fpn_tf.ops import postprocess, roi_ops, target_assigner


LOSS_NAMES = ("rpn_objectness_loss", "rpn_box_loss", "fast_rcnn_class_loss",
              "fast_rcnn_box_loss", "total_loss")


@dataclasses.dataclass
class RPNParams:
    """RPN numbers (paper §4.1 and DESIGN.md): anchor labelling, sampling, proposals."""
    positive_iou: float = 0.7
    negative_iou: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_top_k_train: int = 2000
    post_nms_top_k_train: int = 2000
    pre_nms_top_k_test: int = 1000
    post_nms_top_k_test: int = 1000
    nms_iou: float = 0.7
    min_box_size: float = 0.0
    smooth_l1_beta: float = 1.0 / 9.0
    loss_weight: float = 1.0
    # "per_image" (map over images of the built-in greedy NMS: 2.5-3.5x faster than "padded" on
    # a 2-core CPU, same boxes, XLA-compatible) or "padded" (one batched op).
    nms_impl: str = "per_image"
    # The head's backward only where the loss reaches (fpn_tf/ops/rpn_head_ops.py); same values.
    head_sparse_backward: bool = True


@dataclasses.dataclass
class RoIParams:
    """Fast R-CNN numbers (paper §4.2): RoI sampling, Eq. 1, RoIAlign, box coder."""
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    foreground_iou: float = 0.5
    canonical_size: float = 224.0
    canonical_level: int = 4
    min_level: int = 2
    max_level: int = 5
    output_size: int = 7
    sampling_ratio: int = 2
    box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)
    smooth_l1_beta: float = 1.0
    loss_weight: float = 1.0
    align_impl: str = "auto"  # RoIAlign: "auto", "gather" or "crop_and_resize" (roi_ops)


@dataclasses.dataclass
class DetectionParams:
    """Inference post-processing: score threshold, per-class NMS, detections per image."""
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    max_detections: int = 100
    nms_impl: str = "per_image"   # "per_image", "padded" or "combined" (no XLA kernel)


def _params(cls, value):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
    return cls(**value)


@keras.saving.register_keras_serializable(package="fpn_tf")
class FasterRCNN(MultiLossModel):
    """FPN Faster R-CNN.

    Args:
      fpn: a model image -> ``{"P2": ..., ...}`` (see `fpn_tf.modeling.fpn.build_fpn_model`). Its
        output levels carry the RPN; levels ``roi.min_level..roi.max_level`` among them carry
        Fast R-CNN (Eq. 1 is clamped to the levels present).
      num_classes: C, the foreground classes.
      anchor_sizes: one anchor size per RPN level (paper: 32..512 on P2..P6), or a dict
        ``level -> sizes`` (e.g. all five sizes on one level for the single-scale ablations).
      aspect_ratios: height/width ratios of the anchors (0.5, 1, 2).
      rpn_head_channels: width of the RPN's 3x3 conv (default: the pyramid's channels).
      fc_dims, num_fc: the box head's fully connected layers (1024, 2).
      rpn, roi, detection: `RPNParams`, `RoIParams`, `DetectionParams` or dicts of their fields.
      category_ids: the dataset's category id of each contiguous class 1..C (default 1..C);
        outputs carry these ids.

    Inputs: ``images`` float [B, H, W, 3] RGB 0..255, or a dict with ``"images"`` and
    ``"image_info"`` [B, 4, 2] (rows: original size, resized size, scale, offset): then the valid
    region of each padded image is its resized size and boxes come back in original-image pixels.
    """

    def __init__(self, fpn: keras.Model, num_classes: int, anchor_sizes=(32, 64, 128, 256, 512),
                 aspect_ratios=(0.5, 1.0, 2.0), rpn_head_channels: int | None = None,
                 fc_dims: int = 1024, num_fc: int = 2, rpn=None, roi=None, detection=None,
                 category_ids: Sequence[int] | None = None, name: str = "faster_rcnn", **kwargs):
        super().__init__(loss_names=LOSS_NAMES, name=name, **kwargs)
        self.fpn = fpn
        self.num_classes = int(num_classes)
        self.rpn_params = _params(RPNParams, rpn)
        self.roi_params = _params(RoIParams, roi)
        self.detection_params = _params(DetectionParams, detection)
        self.levels = sorted(fpn.output.keys(), key=anchor_ops.level_number)
        if isinstance(anchor_sizes, Mapping):
            self.anchor_sizes = {k: tuple(v) for k, v in anchor_sizes.items()}
        else:
            anchor_sizes = tuple(anchor_sizes)
            if len(anchor_sizes) != len(self.levels):
                raise ValueError(f"{len(anchor_sizes)} anchor sizes for {len(self.levels)} "
                                 f"levels {self.levels}: give one size per level or a dict")
            self.anchor_sizes = {lvl: (s,) for lvl, s in zip(self.levels, anchor_sizes)}
        missing = sorted(set(self.anchor_sizes) - set(self.levels))
        if missing:
            raise ValueError(f"anchor sizes for levels {missing} that the pyramid does not output")
        self.rpn_levels = [lvl for lvl in self.levels if lvl in self.anchor_sizes]
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        per_level = anchor_ops.num_anchors_per_location(
            self.rpn_levels, self.anchor_sizes, self.aspect_ratios)
        if len(set(per_level.values())) != 1:
            raise ValueError(f"the shared RPN head needs the same anchors per location on every "
                             f"level, got {dict(per_level)}")
        self.num_anchors = next(iter(per_level.values()))
        roi_levels = [lvl for lvl in self.levels if self.roi_params.min_level
                      <= anchor_ops.level_number(lvl) <= self.roi_params.max_level]
        if not roi_levels:
            raise ValueError(f"no pyramid level in roi.min_level..max_level among {self.levels}")
        self.roi_levels = roi_levels
        self.roi_min_level = anchor_ops.level_number(roi_levels[0])
        self.roi_max_level = anchor_ops.level_number(roi_levels[-1])
        channels = fpn.output[self.levels[0]].shape[-1]
        self.rpn_head_channels = int(rpn_head_channels or channels)
        self.fc_dims, self.num_fc = int(fc_dims), int(num_fc)
        self.rpn_head = RPNHead(self.num_anchors, self.rpn_head_channels,
                                sparse_backward=self.rpn_params.head_sparse_backward,
                                name="rpn_head")
        self.box_head = FastRCNNBoxHead(self.num_classes, fc_dims, num_fc, name="box_head")
        ids = list(category_ids) if category_ids is not None else list(range(1, num_classes + 1))
        if len(ids) != self.num_classes:
            raise ValueError(f"{len(ids)} category ids for {num_classes} classes")
        self.category_ids = [int(i) for i in ids]
        self.build_heads(channels)

    def build_heads(self, channels):
        self.rpn_head.build((None, None, None, channels))
        size = self.roi_params.output_size
        self.box_head.build((None, None, size, size, channels))

    # --- the pieces -----------------------------------------------------------------------
    def _split_inputs(self, inputs):
        if isinstance(inputs, Mapping):
            images = inputs["images"]
            image_info = inputs.get("image_info")
        else:
            images, image_info = inputs, None
        images = tf.convert_to_tensor(images)
        shape = tf.shape(images)
        padded_hw = tf.cast(shape[1:3], tf.float32)
        if image_info is None:
            valid_hw = tf.tile(padded_hw[None], [shape[0], 1])
        else:
            valid_hw = tf.cast(image_info, tf.float32)[:, 1, :]
        return images, image_info, valid_hw

    def _image_size(self, images):
        """(H, W) as python ints when static (anchors become constants), else a tensor."""
        h, w = images.shape[1], images.shape[2]
        if h is not None and w is not None:
            return (int(h), int(w))
        return tf.shape(images)[1:3]

    def anchors(self, image_size):
        return anchor_ops.generate_anchors(image_size, self.rpn_levels, self.anchor_sizes,
                                           self.aspect_ratios)

    def _rpn_outputs(self, features, training=None):
        logits, deltas = self.rpn_head({lvl: features[lvl] for lvl in self.rpn_levels},
                                       training=training)
        batch = tf.shape(features[self.rpn_levels[0]])[0]
        flat_logits = {lvl: tf.cast(tf.reshape(logits[lvl], [batch, -1]), tf.float32)
                       for lvl in self.rpn_levels}
        flat_deltas = {lvl: tf.cast(tf.reshape(deltas[lvl], [batch, -1, 4]), tf.float32)
                       for lvl in self.rpn_levels}
        return flat_logits, flat_deltas

    def _proposals(self, logits, deltas, anchors, valid_hw, training):
        p = self.rpn_params
        return postprocess.generate_proposals(
            {k: tf.stop_gradient(v) for k, v in logits.items()},
            {k: tf.stop_gradient(v) for k, v in deltas.items()},
            anchors, valid_hw,
            pre_nms_top_k=p.pre_nms_top_k_train if training else p.pre_nms_top_k_test,
            post_nms_top_k=p.post_nms_top_k_train if training else p.post_nms_top_k_test,
            nms_iou=p.nms_iou, min_size=p.min_box_size, nms_impl=p.nms_impl)

    def _box_head(self, features, rois, training):
        r = self.roi_params
        pooled = roi_ops.multilevel_roi_align(
            {lvl: features[lvl] for lvl in self.roi_levels}, rois, output_size=r.output_size,
            sampling_ratio=r.sampling_ratio, min_level=self.roi_min_level,
            max_level=self.roi_max_level, canonical_size=r.canonical_size,
            canonical_level=r.canonical_level, impl=r.align_impl, training=training)
        logits, deltas = self.box_head(pooled, training=training)
        return tf.cast(logits, tf.float32), tf.cast(deltas, tf.float32)

    # --- training ---------------------------------------------------------------------------
    def compute_losses(self, features, labels, training=True):
        """The four losses (dict of scalars, plus ``total_loss``) for one batch."""
        images, _, valid_hw = self._split_inputs(features)
        pyramid = self.fpn(images, training=training)
        logits, deltas = self._rpn_outputs(pyramid, training)
        anchors = self.anchors(self._image_size(images))
        all_anchors, _ = anchor_ops.concat_anchors(anchors)
        gt_boxes = tf.cast(labels["gt_boxes"], tf.float32)
        gt_classes = tf.cast(labels["gt_classes"], tf.int32)
        gt_is_crowd = labels.get("gt_is_crowd")
        p = self.rpn_params
        rpn_targets = target_assigner.assign_rpn_targets(
            all_anchors, gt_boxes, gt_classes, gt_is_crowd, positive_iou=p.positive_iou,
            negative_iou=p.negative_iou, num_samples=p.batch_size_per_image,
            positive_fraction=p.positive_fraction)
        rpn_obj, rpn_box = rpn_losses(
            rpn_targets.labels, rpn_targets.box_targets,
            tf.concat([logits[l] for l in self.rpn_levels], axis=1),
            tf.concat([deltas[l] for l in self.rpn_levels], axis=1),
            p.batch_size_per_image, p.smooth_l1_beta)

        proposals = self._proposals(logits, deltas, anchors, valid_hw, training=True)
        r = self.roi_params
        roi_targets = target_assigner.sample_rois(
            proposals.boxes, gt_boxes, gt_classes, gt_is_crowd, proposals.valid,
            num_samples=r.batch_size_per_image, foreground_fraction=r.positive_fraction,
            foreground_iou=r.foreground_iou, box_weights=tuple(r.box_weights))
        class_logits, box_deltas = self._box_head(pyramid, roi_targets.rois, training)
        cls_loss, box_loss = fast_rcnn_losses(
            roi_targets.class_targets, roi_targets.box_targets, class_logits, box_deltas,
            r.smooth_l1_beta, valid=roi_targets.valid_mask)
        losses = {
            "rpn_objectness_loss": rpn_obj * p.loss_weight,
            "rpn_box_loss": rpn_box * p.loss_weight,
            "fast_rcnn_class_loss": cls_loss * r.loss_weight,
            "fast_rcnn_box_loss": box_loss * r.loss_weight,
        }
        losses["total_loss"] = tf.add_n(list(losses.values()))
        return losses

    # --- inference --------------------------------------------------------------------------
    def call(self, inputs, training=False):
        """Detections: boxes [B, N, 4] yxyx (original-image pixels when ``image_info`` is given,
        else input pixels), scores [B, N], dataset class ids [B, N] (int32), counts [B], and the
        RPN proposals (same frame) for recall evaluation."""
        images, image_info, valid_hw = self._split_inputs(inputs)
        pyramid = self.fpn(images, training=training)
        logits, deltas = self._rpn_outputs(pyramid, training)
        anchors = self.anchors(self._image_size(images))
        proposals = self._proposals(logits, deltas, anchors, valid_hw, training=False)
        class_logits, box_deltas = self._box_head(pyramid, proposals.boxes, training)
        d = self.detection_params
        det = postprocess.postprocess_detections(
            tf.nn.softmax(class_logits, axis=-1), box_deltas, proposals.boxes, valid_hw,
            box_weights=tuple(self.roi_params.box_weights), score_threshold=d.score_threshold,
            nms_iou=d.nms_iou, max_detections=d.max_detections, nms_impl=d.nms_impl)
        id_table = tf.constant([0] + self.category_ids, tf.int32)
        valid_rows = tf.sequence_mask(det.num_detections, d.max_detections)
        classes = tf.where(valid_rows, tf.gather(id_table, det.classes), 0)
        boxes, proposal_boxes = det.boxes, proposals.boxes
        if image_info is not None:
            scale = tf.cast(image_info, tf.float32)[:, 2, :]
            scale = tf.concat([scale, scale], axis=-1)[:, None, :]
            boxes = boxes / scale
            proposal_boxes = proposal_boxes / scale
        return {
            "detection_boxes": boxes,
            "detection_scores": det.scores,
            "detection_classes": classes,
            "num_detections": det.num_detections,
            "proposal_boxes": proposal_boxes,
            "proposal_scores": proposals.scores,
        }

    # --- serialisation ----------------------------------------------------------------------
    def get_config(self):
        return {
            "name": self.name,
            "fpn": keras.saving.serialize_keras_object(self.fpn),
            "num_classes": self.num_classes,
            "anchor_sizes": {k: list(v) for k, v in self.anchor_sizes.items()},
            "aspect_ratios": list(self.aspect_ratios),
            "rpn_head_channels": self.rpn_head_channels,
            "fc_dims": self.fc_dims,
            "num_fc": self.num_fc,
            "rpn": dataclasses.asdict(self.rpn_params),
            "roi": {**dataclasses.asdict(self.roi_params),
                    "box_weights": list(self.roi_params.box_weights)},
            "detection": dataclasses.asdict(self.detection_params),
            "category_ids": list(self.category_ids),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["fpn"] = keras.saving.deserialize_keras_object(config["fpn"])
        return cls(**config)
