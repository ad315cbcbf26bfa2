"""Segment proposals on the feature pyramid (paper §6, Table 6; Appendix A of arXiv 1612.03144v2).

DeepMask trained fully convolutionally on P2..P6: per window size (5x5, 7x7 for the half
octaves) one MLP shared by all levels, a w x w conv to 512 then sibling 1x1 convs to a 14x14 mask
and an object score. The window geometry and targets are in `fpn_tf.ops.segment_windows`; the
config marks each number "paper" or "ours". The mask conv runs only on the windows that need a
mask (sampled positives, the K proposals), which saves every level's [B, H, W, 196] map.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import keras
import tensorflow as tf

from fpn_tf.configs.experiment import SegmentProposalConfig
from fpn_tf.modeling import image_io
from fpn_tf.modeling.multi_loss_model import MultiLossModel
from fpn_tf.ops import mask_ops, postprocess
from fpn_tf.ops.anchors import level_number
from fpn_tf.ops.segment_windows import Windows, assign_segment_targets, window_geometry

LOSS_NAMES = ("segment_objectness_loss", "segment_mask_loss", "total_loss")
LEVELS = ("P2", "P3", "P4", "P5", "P6")


@keras.saving.register_keras_serializable(package="fpn_tf")
class SegmentMLP(keras.layers.Layer):
    """One window size's MLP, shared by every level: a w x w conv + ReLU (the ReLU is ours), then
    1x1 convs to mask_size² mask logits and 1 score. N(0, 0.01) weights, zero biases (the RPN
    head's; the paper does not say).

    ``{level: [B, H, W, C]}`` -> ``(hidden {level: [B, H, W, d]}, objectness {level: [B, H, W,
    1]})``.
    """

    def __init__(self, window_size: int, hidden_dims: int, mask_size: int, **kwargs):
        super().__init__(**kwargs)
        self.window_size, self.hidden_dims = int(window_size), int(hidden_dims)
        self.mask_size = int(mask_size)
        init = keras.initializers.RandomNormal(stddev=0.01)
        common = dict(kernel_initializer=init, dtype=self.dtype_policy)
        self.hidden = keras.layers.Conv2D(
            self.hidden_dims, self.window_size, padding="same", activation="relu", name="hidden",
            **common,
        )  # fmt: skip
        self.mask = keras.layers.Conv2D(self.mask_size**2, 1, name="mask", **common)
        self.objectness = keras.layers.Conv2D(1, 1, name="objectness", **common)

    def build(self, input_shape):
        shape = tuple(
            next(iter(input_shape.values())) if isinstance(input_shape, Mapping) else input_shape
        )
        self.hidden.build(shape)
        hidden = shape[:-1] + (self.hidden_dims,)
        self.mask.build(hidden)
        self.objectness.build(hidden)

    def call(self, features):
        hidden, objectness = {}, {}
        for level, x in features.items():
            hidden[level] = self.hidden(x)
            objectness[level] = self.objectness(hidden[level])
        return hidden, objectness

    def masks(self, hidden_vectors):
        """[B, K, d] hidden vectors of K windows -> float32 mask logits [B, K, M, M]."""
        logits = self.mask(hidden_vectors[:, :, None, :])  # the 1x1 conv on a [B, K, 1, d] map
        shape = tf.shape(hidden_vectors)
        return tf.cast(
            tf.reshape(logits, tf.stack([shape[0], shape[1], self.mask_size, self.mask_size])),
            tf.float32,
        )

    def get_config(self):
        keys = ("window_size", "hidden_dims", "mask_size")
        return {**super().get_config(), **{k: getattr(self, k) for k in keys}}


@keras.saving.register_keras_serializable(package="fpn_tf")
class SegmentProposalHead(keras.layers.Layer):
    """The segment-proposal stage of a ``model.segment_proposals`` config: the MLPs (attributes
    ``mlp_5x5``, ``mlp_7x7``), window targets, losses and proposals.

    ``call(features, image_valid_hw, labels=None, window_sizes=None)`` -> ``(proposals,
    losses)``: with labels ``(None, losses)``; without ``({"boxes" [B, K, 4] mask boxes in input
    pixels, "scores" [B, K], "masks" [B, K, M, M] probabilities, "valid" [B, K]}, {})``.
    ``window_sizes`` restricts inference to some heads ([5]: "5x5 only").

    Objectness loss: sigmoid cross-entropy summed over the sampled windows / (B x
    batch_size_per_image); mask loss: the per-pixel mean over the sampled positives (0 without
    one). Negatives train the score only (paper).
    """

    def __init__(self, config: SegmentProposalConfig, **kwargs):
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        self.config = SegmentProposalConfig.of(config)
        for w in self.config.window_sizes:  # attributes, not a list (checkpoint tracking)
            mlp = SegmentMLP(
                w, self.config.hidden_dims, self.config.mask_size, name=self.mlp_name(w),
                dtype=self.dtype_policy,
            )  # fmt: skip
            setattr(self, self.mlp_name(w), mlp)

    @staticmethod
    def mlp_name(window_size: int) -> str:
        return f"mlp_{window_size}x{window_size}"

    def mlp(self, window_size: int) -> SegmentMLP:
        return getattr(self, self.mlp_name(window_size))

    def build(self, features_shape):
        levels = [lvl for lvl in LEVELS if lvl in features_shape]
        if not levels:
            raise ValueError(f"no pyramid level P2..P6 among {sorted(features_shape)}")
        channels = int(features_shape[levels[0]][-1])
        for w in self.config.window_sizes:
            self.mlp(w).build((None, None, None, channels))

    # --- the pieces --------------------------------------------------------------------------
    def windows(self, features, window_sizes=None) -> Windows:
        """The geometry of every window of the (enabled) heads on these feature maps."""
        sizes = {}
        for level in self._levels(features):
            shape = features[level].shape
            if shape[1] is None or shape[2] is None:
                shape = tf.shape(features[level])
            sizes[level] = (shape[1], shape[2])
        window_sizes = window_sizes or self.config.window_sizes
        object_sizes = [self.config.object_sizes[self._head_index(w)] for w in window_sizes]
        return window_geometry(sizes, window_sizes, self.config.mask_box_scale, object_sizes)

    def head_outputs(self, features, window_sizes=None):
        """``(objectness logits float32 [B, R], hidden [B, R, d])`` in window order."""
        levels = self._levels(features)
        batch = tf.shape(features[levels[0]])[0]
        logits, hidden = [], []
        for w in window_sizes or self.config.window_sizes:
            h, o = self.mlp(w)({lvl: features[lvl] for lvl in levels})
            for lvl in levels:
                logits.append(tf.reshape(tf.cast(o[lvl], tf.float32), [batch, -1]))
                hidden.append(tf.reshape(h[lvl], tf.stack([batch, -1, self.config.hidden_dims])))
        return tf.concat(logits, 1), tf.concat(hidden, 1)

    def mask_logits(self, hidden, window_indices, windows: Windows, window_sizes=None):
        """Mask logits [B, K, M, M] of the windows ``window_indices`` [B, K], each by its head."""
        vectors = tf.gather(hidden, window_indices, batch_dims=1)  # [B, K, d]
        group_ids = tf.gather(windows.group_ids, window_indices)  # [B, K]
        head_of_group = tf.constant([self._head_index(g[0], window_sizes) for g in windows.groups])
        head = tf.gather(head_of_group, group_ids)
        out = None
        for i, w in enumerate(window_sizes or self.config.window_sizes):
            logits = self.mlp(w).masks(vectors)
            out = logits if out is None else tf.where((head == i)[..., None, None], logits, out)
        return out

    def assign_targets(self, windows, labels, image_valid_hw):
        return assign_segment_targets(
            windows,
            labels["gt_boxes"],
            labels["gt_classes"],
            labels.get("gt_is_crowd"),
            image_valid_hw,
            center_tolerance=self.config.center_tolerance,
            center_tolerance_unit=self.config.center_tolerance_unit,
            crowd_ioa_threshold=self.config.crowd_ioa_threshold,
            num_samples=self.config.batch_size_per_image,
            positive_fraction=self.config.positive_fraction,
        )

    def compute_loss(self, logits, hidden, windows, targets, labels):
        """``{"segment_objectness_loss", "segment_mask_loss"}`` (weighted)."""
        num_images = tf.cast(tf.shape(logits)[0], tf.float32)
        sampled = tf.cast(targets.labels >= 0, tf.float32)
        positive = targets.labels == 1
        bce = tf.nn.sigmoid_cross_entropy_with_logits(
            labels=tf.cast(positive, tf.float32), logits=logits
        )
        objectness = tf.reduce_sum(bce * sampled) / (num_images * self.config.batch_size_per_image)

        # The sampled positives, at most P per image: their masks only.
        p = max(int(self.config.batch_size_per_image * self.config.positive_fraction), 1)
        p = min(p, windows.centers.shape[0]) if windows.centers.shape[0] is not None else p
        top, idx = tf.math.top_k(tf.cast(positive, tf.float32), k=p)  # positives first
        valid = top > 0
        matched = tf.where(valid, tf.gather(targets.matched_gt_indices, idx, batch_dims=1), -1)
        boxes = tf.gather(windows.mask_boxes, idx)  # [B, P, 4]
        target = mask_ops.mask_targets(
            labels["gt_masks"], labels["gt_boxes"], boxes, matched, self.config.mask_size
        )
        pred = self.mask_logits(hidden, idx, windows)
        pixel = tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=pred)
        per_window = tf.reduce_mean(pixel, axis=[2, 3])  # [B, P]
        num_pos = tf.reduce_sum(tf.cast(valid, tf.float32))
        mask = tf.math.divide_no_nan(tf.reduce_sum(tf.where(valid, per_window, 0.0)), num_pos)
        return {
            "segment_objectness_loss": objectness * self.config.objectness_loss_weight,
            "segment_mask_loss": mask * self.config.mask_loss_weight,
        }

    def proposals(self, logits, hidden, windows, image_valid_hw, window_sizes=None):
        """The K = post_nms_top_k best windows centred inside the image: with nms_iou >= 1
        (paper) by score alone; else (ours) pre_nms_top_k per (head, level), then NMS."""
        logits, hidden = tf.stop_gradient(logits), tf.stop_gradient(hidden)
        hw = tf.cast(image_valid_hw, tf.float32)[:, None, :]
        inside = tf.reduce_all(windows.centers[None] < hw, axis=-1)  # [B, R]
        ranked = tf.where(inside, logits, postprocess.NEG_INF)
        k = self.config.post_nms_top_k
        if self.config.nms_iou >= 1.0:  # no NMS: the top k by score over all windows
            num_windows = sum(windows.group_sizes)
            if not isinstance(num_windows, int):
                raise ValueError("segment proposals need static feature-map sizes")
            kk = min(k, num_windows)
            top, index = tf.math.top_k(ranked, k=kk)
            keep = tf.math.is_finite(top)
            index = tf.where(keep, index, 0)
            index = tf.pad(index, [[0, 0], [0, k - kk]])
            keep = tf.pad(keep, [[0, 0], [0, k - kk]])
        else:
            # Per group top pre_nms_top_k (groups are contiguous in window order), then NMS.
            candidates, start = [], 0
            for n in windows.group_sizes:
                if not isinstance(n, int):
                    raise ValueError("segment proposals need static feature-map sizes")
                _, i = tf.math.top_k(
                    ranked[:, start : start + n], k=min(self.config.pre_nms_top_k, n)
                )
                candidates.append(i + start)
                start += n
            cand = tf.concat(candidates, 1)  # [B, C] window indices
            cand_scores = tf.gather(ranked, cand, batch_dims=1)
            sel, keep = postprocess.batched_nms(
                tf.gather(windows.mask_boxes, cand),
                cand_scores,
                k,
                self.config.nms_iou,
                valid=tf.math.is_finite(cand_scores),
                impl="per_image",
            )
            index = tf.gather(cand, sel, batch_dims=1)  # [B, K] window indices
        scores = tf.where(keep, tf.sigmoid(tf.gather(ranked, index, batch_dims=1)), 0.0)
        boxes = tf.where(keep[..., None], tf.gather(windows.mask_boxes, index), 0.0)
        masks = tf.sigmoid(self.mask_logits(hidden, index, windows, window_sizes))
        masks = tf.where(keep[..., None, None], masks, 0.0)
        return {"boxes": boxes, "scores": scores, "masks": masks, "valid": keep}

    def call(self, features, image_valid_hw, labels=None, training=None, window_sizes=None):
        if window_sizes is not None:
            window_sizes = tuple(int(w) for w in window_sizes)
            unknown = sorted(set(window_sizes) - set(self.config.window_sizes))
            if unknown:
                raise ValueError(f"window sizes {unknown} not among {self.config.window_sizes}")
        windows = self.windows(features, window_sizes)
        logits, hidden = self.head_outputs(features, window_sizes)
        if labels is not None:
            targets = self.assign_targets(windows, labels, image_valid_hw)
            return None, self.compute_loss(logits, hidden, windows, targets, labels)
        return self.proposals(logits, hidden, windows, image_valid_hw, window_sizes), {}

    def _levels(self, features):
        return sorted((lvl for lvl in features if lvl in LEVELS), key=level_number)

    def _head_index(self, window_size, window_sizes=None):
        return list(window_sizes or self.config.window_sizes).index(window_size)

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict()}


def _output_dict(boxes, scores, masks, valid, image_info):
    """The output dict; boxes are never clipped (the masks are relative to the whole box)."""
    return {
        "proposal_boxes": image_io.to_original(boxes, image_info),
        "proposal_scores": scores,
        "proposal_masks": masks,
        "num_proposals": tf.reduce_sum(tf.cast(valid, tf.int32), axis=1),
    }


@keras.saving.register_keras_serializable(package="fpn_tf")
class SegmentProposalModel(MultiLossModel):
    """FPN segment proposals: ``fpn`` -> ``head``. Inputs and ``pad_value`` as `FasterRCNN`.

    ``call`` -> ``{"proposal_boxes" [B, K, 4] (original pixels with image_info), "proposal_scores"
    [B, K], "proposal_masks" [B, K, M, M] box-relative probabilities, "num_proposals" [B]}``, best
    first, zero rows past num_proposals.
    """

    def __init__(
        self,
        fpn: keras.Model,
        head: SegmentProposalHead,
        pad_value: Sequence[float] | None = None,
        name: str = "segment_proposals",
        **kwargs,
    ):
        super().__init__(loss_names=LOSS_NAMES, name=name, **kwargs)
        self.pad_value = None if pad_value is None else tuple(float(v) for v in pad_value)
        self.fpn, self.head = fpn, head
        if not head.built:
            head.build({level: tuple(t.shape) for level, t in fpn.output.items()})

    def _pyramid(self, inputs, training):
        images, image_info, valid_hw = image_io.prepare_inputs(inputs, self.pad_value)
        return self.fpn(images, training=training), image_info, valid_hw

    def compute_losses(self, features, labels, training=True):
        pyramid, _, valid_hw = self._pyramid(features, training)
        _, losses = self.head(pyramid, valid_hw, labels=labels, training=training)
        losses = dict(losses)
        losses["total_loss"] = tf.add_n(list(losses.values()))
        return losses

    def call(self, inputs, training=False, window_sizes=None):
        pyramid, image_info, valid_hw = self._pyramid(inputs, training)
        p, _ = self.head(pyramid, valid_hw, training=training, window_sizes=window_sizes)
        return _output_dict(p["boxes"], p["scores"], p["masks"], p["valid"], image_info)

    def get_config(self):
        return {
            "name": self.name,
            "pad_value": None if self.pad_value is None else list(self.pad_value),
            "fpn": keras.saving.serialize_keras_object(self.fpn),
            "head": keras.saving.serialize_keras_object(self.head),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for k in ("fpn", "head"):
            config[k] = keras.saving.deserialize_keras_object(config[k])
        return cls(**config)


def mask_rcnn_segment_proposals(model, inputs, top_k: int = 1000):
    """Mask R-CNN's masks as segment proposals (the benchmark's comparison row): on each of the
    RPN's ``top_k`` best proposals, the mask of the most probable foreground class, computed on
    the proposal box itself (not a regressed one). Output as `SegmentProposalModel.call`."""
    pad_value = getattr(model, "pad_value", None)
    images, image_info, valid_hw = image_io.prepare_inputs(inputs, pad_value)
    pyramid = model.fpn(images, training=False)
    proposals, _ = model.rpn(pyramid, valid_hw, training=False)
    boxes, scores, valid = proposals.boxes, proposals.scores, proposals.valid
    k = int(top_k)
    have = boxes.shape[1]
    if have is not None and have < k:  # static K: pad
        pad = k - int(have)
        boxes = tf.pad(boxes, [[0, 0], [0, pad], [0, 0]])
        scores = tf.pad(scores, [[0, 0], [0, pad]])
        valid = tf.pad(valid, [[0, 0], [0, pad]])
    boxes, scores, valid = boxes[:, :k], scores[:, :k], valid[:, :k]
    class_logits, _ = model.roi_heads.box_outputs(pyramid, boxes)
    probs = model.roi_heads.class_probabilities(class_logits)  # [B, K, C+1]
    classes = tf.argmax(probs[..., 1:], axis=-1, output_type=tf.int32) + 1
    detections = postprocess.Detections(
        boxes=boxes,
        scores=scores,
        classes=tf.where(valid, classes, 0),
        num_detections=tf.reduce_sum(tf.cast(valid, tf.int32), axis=1),
    )
    masks = tf.cast(model.roi_heads.predict_masks(pyramid, detections), tf.float32)
    masks = tf.where(valid[..., None, None], masks, 0.0)
    scores = tf.where(valid, scores, 0.0)
    boxes = tf.where(valid[..., None], boxes, 0.0)
    return _output_dict(boxes, scores, masks, valid, image_info)
