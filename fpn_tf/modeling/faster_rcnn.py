"""Faster R-CNN and Mask R-CNN on the feature pyramid (paper §4): pyramid -> RPN -> RoI heads.

A `MultiLossModel`: ``compute_losses`` gives a batch's losses (``model.fit`` trains it), ``call``
returns detections. Everything runs batched in one graph; the only Python loops are the static
unrolls over pyramid levels.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from fpn_tf.modeling import image_io
from fpn_tf.modeling.multi_loss_model import MultiLossModel
from fpn_tf.modeling.roi_heads import RoIHeads
from fpn_tf.modeling.rpn import RegionProposalNetwork

LOSS_NAMES = (
    "rpn_objectness_loss",
    "rpn_box_loss",
    "fast_rcnn_class_loss",
    "fast_rcnn_box_loss",
    "total_loss",
)
MASK_LOSS_NAMES = LOSS_NAMES[:-1] + ("mask_loss", "total_loss")


@keras.saving.register_keras_serializable(package="fpn_tf")
class FasterRCNN(MultiLossModel):
    """FPN Faster R-CNN: ``fpn`` (image -> {"P2": ...}) -> ``rpn`` -> ``roi_heads``.

    ``category_ids``: the dataset id of each class 1..C (default 1..C), which the outputs carry.
    ``pad_value``: None or the RGB 0..255 pixel the padding is set to (`image_io.prepare_inputs`).
    Inputs: images, or ``{"images", "image_info"}``.
    """

    with_masks = False

    def __init__(
        self,
        fpn: keras.Model,
        rpn: RegionProposalNetwork,
        roi_heads: RoIHeads,
        category_ids: Sequence[int] | None = None,
        pad_value: Sequence[float] | None = None,
        name: str | None = None,
        **kwargs,
    ):
        if (roi_heads.mask_head is not None) != self.with_masks:
            raise ValueError(
                f"{type(self).__name__} needs RoI heads "
                + ("with a mask branch" if self.with_masks else "without a mask branch (MaskRCNN)")
            )
        loss_names = MASK_LOSS_NAMES if self.with_masks else LOSS_NAMES
        name = name or ("mask_rcnn" if self.with_masks else "faster_rcnn")
        super().__init__(loss_names=loss_names, name=name, **kwargs)
        if pad_value is not None:
            pad_value = tuple(float(v) for v in pad_value)
            if len(pad_value) != 3:
                raise ValueError(f"pad_value needs 3 values (R, G, B), got {pad_value}")
        self.pad_value = pad_value
        self.fpn, self.rpn, self.roi_heads = fpn, rpn, roi_heads
        self.num_classes = roi_heads.num_classes
        ids = (
            list(category_ids) if category_ids is not None else list(range(1, self.num_classes + 1))
        )
        if len(ids) != self.num_classes:
            raise ValueError(f"{len(ids)} category ids for {self.num_classes} classes")
        self.category_ids = [int(i) for i in ids]
        # Weights exist from construction (a checkpoint restores before any call); layers
        # deserialised by from_config come built.
        shapes = {level: tuple(t.shape) for level, t in fpn.output.items()}
        for stage in (self.rpn, self.roi_heads):
            if not stage.built:
                stage.build(shapes)

    def compute_losses(self, features, labels, training=True):
        images, _, valid_hw = image_io.prepare_inputs(features, self.pad_value)
        pyramid = self.fpn(images, training=training)
        proposals, rpn_losses = self.rpn(pyramid, valid_hw, labels=labels, training=training)
        _, roi_losses = self.roi_heads(
            pyramid, proposals, valid_hw, labels=labels, training=training
        )
        losses = {**rpn_losses, **roi_losses}
        losses["total_loss"] = tf.add_n(list(losses.values()))
        return losses

    def call(self, inputs, training=False):
        """Boxes [B, N, 4] yxyx (original pixels with ``image_info``), scores, dataset class ids
        (int32), counts [B] and the RPN proposals; a Mask R-CNN adds ``detection_masks`` float32
        [B, N, 28, 28], box-relative probabilities, zero rows past num_detections."""
        images, image_info, valid_hw = image_io.prepare_inputs(inputs, self.pad_value)
        pyramid = self.fpn(images, training=training)
        proposals, _ = self.rpn(pyramid, valid_hw, training=training)
        detections, masks = self.roi_heads(pyramid, proposals, valid_hw, training=training)
        id_table = tf.constant([0] + self.category_ids, tf.int32)
        valid_rows = tf.sequence_mask(
            detections.num_detections, self.roi_heads.detection_config.max_detections
        )
        outputs = {
            "detection_boxes": image_io.to_original(detections.boxes, image_info),
            "detection_scores": detections.scores,
            "detection_classes": tf.where(valid_rows, tf.gather(id_table, detections.classes), 0),
            "num_detections": detections.num_detections,
            "proposal_boxes": image_io.to_original(proposals.boxes, image_info),
            "proposal_scores": proposals.scores,
        }
        if masks is not None:
            outputs["detection_masks"] = masks
        return outputs

    def get_config(self):
        return {
            "name": self.name,
            "category_ids": list(self.category_ids),
            "pad_value": None if self.pad_value is None else list(self.pad_value),
            **{
                k: keras.saving.serialize_keras_object(getattr(self, k))
                for k in ("fpn", "rpn", "roi_heads")
            },
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for k in ("fpn", "rpn", "roi_heads"):
            config[k] = keras.saving.deserialize_keras_object(config[k])
        return cls(**config)


@keras.saving.register_keras_serializable(package="fpn_tf")
class MaskRCNN(FasterRCNN):
    """FPN Mask R-CNN (He et al. 2017): a `FasterRCNN` whose ``roi_heads`` have a mask branch."""

    with_masks = True

    def __init__(self, fpn, rpn, roi_heads, **kwargs):
        super().__init__(fpn, rpn, roi_heads, **kwargs)
        # The mask head is at model/mask_heads/head too, where existing checkpoints hold it.
        self.mask_heads = _CheckpointPath(roi_heads.mask_head)


class _CheckpointPath(keras.layers.Layer):
    """Holds the mask head at ``head``, its checkpoint path in older model directories."""

    def __init__(self, head):
        super().__init__(name="mask_heads")
        self.head = head
        self.built = True
