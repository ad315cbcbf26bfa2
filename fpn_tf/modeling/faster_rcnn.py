"""Faster R-CNN on the feature pyramid (paper §4): pyramid -> RPN -> RoI heads, one Keras model.

    image -> fpn (backbone + top-down pyramid) -> {P2..P6}                  fpn_tf/modeling/fpn.py
          -> RegionProposalNetwork: shared head, anchors, proposals (+ loss)  fpn_tf/modeling/rpn.py
          -> RoIHeads: Eq. 1 + RoIAlign, 2-fc box head, detections (+ loss)   .../roi_heads.py
          -> MaskHeads (Mask R-CNN, optional): masks of the detections (+ loss) .../mask_head.py

`FasterRCNN` is a `keras.Model` (a `MultiLossModel`, whose ``train_step`` is the one training step
of the package) whose ``compute_losses`` gives the four losses of a batch of `fpn_tf.data` (five
with a mask branch), so
``model.fit`` trains it, and whose ``call`` returns detections. Everything runs
batched inside one graph: no Python loop over images; the only Python loops are the static unrolls
over pyramid levels where each level's tensors have their own shapes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import keras
import tensorflow as tf

from fpn_tf.modeling.mask_head import MaskHeads
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
    """FPN Faster R-CNN: ``fpn`` -> ``rpn`` -> ``roi_heads`` (`fpn_tf.modeling.factory.build_model`
    builds all three from a config).

    Args:
      fpn: a model image -> ``{"P2": ..., ...}`` (`fpn_tf.modeling.fpn.build_fpn_model`).
      rpn: a `RegionProposalNetwork` whose anchor levels the pyramid outputs.
      roi_heads: a `RoIHeads` (its ``num_classes`` is the detector's C).
      mask_heads: None (Faster R-CNN), or a `MaskHeads` (Mask R-CNN): ``compute_losses`` adds
        ``mask_loss`` on the RoIs ``roi_heads`` sampled, and ``call`` adds ``detection_masks``.
      category_ids: the dataset's category id of each contiguous class 1..C (default 1..C);
        outputs carry these ids.
      pad_value: None, or an RGB 0..255 pixel (the backbone's pixel mean, in RGB order) that every
        pixel outside each image's valid region is set to before the pyramid, so that the padding
        is 0 after the backbone's normalisation, as in torchvision and detectron2 (which
        normalise, then pad with zeros). Only with ``image_info`` (without, the whole image is
        valid). ``model.backbone.pad_normalized_zero`` sets it.

    Inputs: ``images`` float [B, H, W, 3] RGB 0..255, or a dict with ``"images"`` and
    ``"image_info"`` [B, 4, 2] (rows: original size, resized size, scale, offset): then the valid
    region of each padded image is its resized size and boxes come back in original-image pixels.
    """

    def __init__(
        self,
        fpn: keras.Model,
        rpn: RegionProposalNetwork,
        roi_heads: RoIHeads,
        mask_heads: MaskHeads | None = None,
        category_ids: Sequence[int] | None = None,
        pad_value: Sequence[float] | None = None,
        name: str = "faster_rcnn",
        **kwargs,
    ):
        loss_names = LOSS_NAMES if mask_heads is None else MASK_LOSS_NAMES
        super().__init__(loss_names=loss_names, name=name, **kwargs)
        if pad_value is not None:
            pad_value = tuple(float(v) for v in pad_value)
            if len(pad_value) != 3:
                raise ValueError(f"pad_value needs 3 values (R, G, B), got {pad_value}")
        self.pad_value = pad_value
        self.fpn, self.rpn, self.roi_heads = fpn, rpn, roi_heads
        self.mask_heads = mask_heads
        if mask_heads is not None and mask_heads.num_classes != roi_heads.num_classes:
            raise ValueError(
                f"mask_heads has {mask_heads.num_classes} classes, roi_heads "
                f"{roi_heads.num_classes}"
            )
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
        for stage in (self.rpn, self.roi_heads, self.mask_heads):
            if stage is not None and not stage.built:
                stage.build(shapes)

    def compute_losses(self, features, labels, training=True):
        """The four losses (five with ``mask_heads``; dict of scalars, plus ``total_loss``) for
        one batch."""
        images, image_info, valid_hw = split_inputs(features)
        pyramid = self.fpn(self.fill_padding(images, image_info, valid_hw), training=training)
        proposals, rpn_losses = self.rpn(pyramid, valid_hw, labels=labels, training=training)
        roi_targets, roi_losses = self.roi_heads(
            pyramid, proposals, valid_hw, labels=labels, training=training
        )
        losses = {**rpn_losses, **roi_losses}
        if self.mask_heads is not None:
            losses.update(
                self.mask_heads.compute_loss(
                    pyramid,
                    roi_targets,
                    labels,
                    training=training,
                    max_foreground=self.roi_heads.max_foreground_per_image,
                )
            )
        losses["total_loss"] = tf.add_n(list(losses.values()))
        return losses

    def call(self, inputs, training=False):
        """Detections: boxes [B, N, 4] yxyx (original-image pixels when ``image_info`` is given,
        else input pixels), scores [B, N], dataset class ids [B, N] (int32), counts [B], and the
        RPN proposals (same frame) for recall evaluation; with ``mask_heads`` also
        ``detection_masks`` float32 [B, N, 28, 28], each the probabilities of its detection's
        mask, box-relative over its box (`fpn_tf.ops.mask_ops`; so unchanged by the rescale to
        original-image pixels), zeros for rows >= num_detections."""
        images, image_info, valid_hw = split_inputs(inputs)
        pyramid = self.fpn(self.fill_padding(images, image_info, valid_hw), training=training)
        proposals, _ = self.rpn(pyramid, valid_hw, training=training)
        detections, _ = self.roi_heads(pyramid, proposals, valid_hw, training=training)
        masks = None
        if self.mask_heads is not None:
            masks = self.mask_heads.predict(pyramid, detections)
        id_table = tf.constant([0] + self.category_ids, tf.int32)
        valid_rows = tf.sequence_mask(detections.num_detections, self.roi_heads.max_detections)
        boxes, proposal_boxes = detections.boxes, proposals.boxes
        if image_info is not None:
            scale = tf.cast(image_info, tf.float32)[:, 2, :]
            scale = tf.concat([scale, scale], axis=-1)[:, None, :]
            boxes, proposal_boxes = boxes / scale, proposal_boxes / scale
        outputs = {
            "detection_boxes": boxes,
            "detection_scores": detections.scores,
            "detection_classes": tf.where(valid_rows, tf.gather(id_table, detections.classes), 0),
            "num_detections": detections.num_detections,
            "proposal_boxes": proposal_boxes,
            "proposal_scores": proposals.scores,
        }
        if masks is not None:
            outputs["detection_masks"] = masks
        return outputs

    def fill_padding(self, images, image_info, valid_hw):
        """``images`` with ``pad_value`` outside each image's valid region (unchanged when
        ``pad_value`` or ``image_info`` is None)."""
        if self.pad_value is None or image_info is None:
            return images
        return fill_padding(images, valid_hw, self.pad_value)

    def get_config(self):
        return {
            "name": self.name,
            "category_ids": list(self.category_ids),
            "pad_value": None if self.pad_value is None else list(self.pad_value),
            **{
                k: keras.saving.serialize_keras_object(getattr(self, k))
                for k in ("fpn", "rpn", "roi_heads")
            },
            "mask_heads": (
                None
                if self.mask_heads is None
                else keras.saving.serialize_keras_object(self.mask_heads)
            ),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for k in ("fpn", "rpn", "roi_heads", "mask_heads"):
            if config.get(k) is not None:
                config[k] = keras.saving.deserialize_keras_object(config[k])
        return cls(**config)


def split_inputs(inputs):
    """``(images, image_info or None, valid (height, width) [B, 2])`` of the model's input."""
    if isinstance(inputs, Mapping):
        images, image_info = inputs["images"], inputs.get("image_info")
    else:
        images, image_info = inputs, None
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    if image_info is None:
        valid_hw = tf.tile(tf.cast(shape[1:3], tf.float32)[None], [shape[0], 1])
    else:
        valid_hw = tf.cast(image_info, tf.float32)[:, 1, :]
    return images, image_info, valid_hw


def fill_padding(images, valid_hw, value: Sequence[float]):
    """[B, H, W, C] ``images`` with every pixel at row >= valid height or column >= valid width
    (``valid_hw`` [B, 2]) set to ``value`` (one number per channel); float images keep their
    dtype, others become float32."""
    images = tf.convert_to_tensor(images)
    if not images.dtype.is_floating:
        images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    valid_hw = tf.cast(valid_hw, tf.float32)
    rows = tf.cast(tf.range(shape[1]), tf.float32)[None, :, None] < valid_hw[:, 0, None, None]
    cols = tf.cast(tf.range(shape[2]), tf.float32)[None, None, :] < valid_hw[:, 1, None, None]
    inside = tf.logical_and(rows, cols)[..., None]  # [B, H, W, 1]
    return tf.where(inside, images, tf.constant(value, images.dtype))
