"""The region proposal network on the feature pyramid (paper §4.1): shared head, anchors, anchor
targets, proposals and losses in one Keras layer (the arithmetic is in `fpn_tf.ops`)."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import keras
import tensorflow as tf

from fpn_tf.configs.experiment import AnchorConfig, RPNConfig
from fpn_tf.modeling.losses import rpn_losses
from fpn_tf.ops import anchors as anchor_ops
from fpn_tf.ops import postprocess, target_assigner
from fpn_tf.ops.rpn_head_ops import rpn_head_level


@keras.saving.register_keras_serializable(package="fpn_tf")
class RPNHead(keras.layers.Layer):
    """3x3 conv + ReLU, then sibling 1x1 convs for objectness and box deltas, shared by every
    level (paper §4.1): ``{"P2": [B, H, W, C], ...}`` -> dicts of logits [B, H, W, A] and deltas
    [B, H, W, 4A]. ``sparse_backward``: the gradient only where the loss reaches."""

    def __init__(self, num_anchors: int, channels: int, sparse_backward: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.num_anchors = int(num_anchors)
        self.channels = int(channels)
        self.sparse_backward = bool(sparse_backward)
        init = keras.initializers.RandomNormal(stddev=0.01)
        args = dict(kernel_initializer=init, dtype=self.dtype_policy)
        self.conv = keras.layers.Conv2D(
            self.channels, 3, padding="same", activation="relu", name="conv", **args
        )
        self.objectness = keras.layers.Conv2D(self.num_anchors, 1, name="objectness", **args)
        self.box_deltas = keras.layers.Conv2D(4 * self.num_anchors, 1, name="box_deltas", **args)

    def build(self, input_shape):
        shape = tuple(
            next(iter(input_shape.values())) if isinstance(input_shape, Mapping) else input_shape
        )
        self.conv.build(shape)
        hidden = shape[:-1] + (self.channels,)
        self.objectness.build(hidden)
        self.box_deltas.build(hidden)

    def call(self, features, training=None):
        # The conv layers own the weights; one op per level applies them (sparse backward).
        sparse = self.sparse_backward and training is not False
        convs = (self.conv, self.objectness, self.box_deltas)
        weights = [keras.ops.cast(w, self.compute_dtype) for c in convs for w in (c.kernel, c.bias)]
        logits, deltas = {}, {}
        for level, x in features.items():
            logits[level], deltas[level] = rpn_head_level(
                keras.ops.cast(x, self.compute_dtype), *weights, sparse_backward=sparse
            )
        return logits, deltas

    def get_config(self):
        config = super().get_config()
        config.update(
            num_anchors=self.num_anchors,
            channels=self.channels,
            sparse_backward=self.sparse_backward,
        )
        return config


def anchor_sizes_per_level(sizes: Sequence[float], levels: Sequence[str]) -> dict:
    """``{level: sizes}``: one of ``model.anchor.sizes`` per level, or all of them on a single
    level (the single-level ablations)."""
    sizes = [float(s) for s in sizes]
    if len(levels) == len(sizes):
        return {level: (size,) for level, size in zip(levels, sizes)}
    if len(levels) == 1:
        return {levels[0]: tuple(sizes)}
    raise ValueError(
        f"model.anchor.sizes has {len(sizes)} entries for levels {list(levels)}: "
        "give one size per level, or use a single level"
    )


@keras.saving.register_keras_serializable(package="fpn_tf")
class RegionProposalNetwork(keras.layers.Layer):
    """The RPN of a ``model.rpn`` and ``model.anchor`` section on ``levels`` (one anchor size each).

    ``rpn(features, image_valid_hw, labels=None)`` -> ``(Proposals, losses)``: proposals clipped
    to the unpadded ``image_valid_hw`` [B, 2], with no gradient; with ``labels`` (``gt_boxes``,
    ``gt_classes``, optional ``gt_is_crowd``) the ``_train`` top-k and ``{"rpn_objectness_loss",
    "rpn_box_loss"}``, else the ``_test`` top-k and no losses.
    """

    def __init__(
        self, config: RPNConfig, anchor_config: AnchorConfig, levels: Sequence[str], **kwargs
    ):
        kwargs.pop("autocast", None)
        # autocast=False: boxes and sizes stay float32 under mixed precision (the head casts).
        super().__init__(autocast=False, **kwargs)
        self.config = RPNConfig.of(config)
        self.anchor_config = AnchorConfig.of(anchor_config)
        self.levels = sorted((str(level) for level in levels), key=anchor_ops.level_number)
        self.anchor_sizes = anchor_sizes_per_level(self.anchor_config.sizes, self.levels)
        self.aspect_ratios = tuple(float(r) for r in self.anchor_config.aspect_ratios)
        self.num_anchors = len(self.anchor_sizes[self.levels[0]]) * len(self.aspect_ratios)

    @property
    def nms_impl(self) -> str:
        """``config.nms_impl``; settable (the portable export switches it for a while)."""
        return self.config.nms_impl

    @nms_impl.setter
    def nms_impl(self, value: str):
        self.config = dataclasses.replace(self.config, nms_impl=value)

    def build(self, features_shape):
        missing = sorted(set(self.levels) - set(features_shape))
        if missing:
            raise ValueError(
                f"anchor sizes for levels {missing} that the pyramid does not output "
                f"({sorted(features_shape)})"
            )
        channels = int(features_shape[self.levels[0]][-1])
        # The head's width can default to the features' only here, so the head is made here.
        self.head = RPNHead(
            self.num_anchors,
            self.config.head_channels or channels,
            sparse_backward=self.config.head_sparse_backward,
            name="head",
            dtype=self.dtype_policy,
        )
        self.head.build((None, None, None, channels))

    def anchors(self, image_size):
        """``OrderedDict level -> [H_l * W_l * A, 4]`` for a padded ``(height, width)``."""
        return anchor_ops.generate_anchors(
            image_size,
            self.levels,
            self.anchor_sizes,
            self.aspect_ratios,
            offset=self.anchor_config.offset,
            round_cell_anchors=self.anchor_config.round_cell_anchors,
            stride_from_padded_size=self.anchor_config.stride_from_padded_size,
        )

    def head_outputs(self, features, training=None):
        """Per-level float32 objectness logits [B, A_l] and deltas [B, A_l, 4] (anchor order)."""
        logits, deltas = self.head({lvl: features[lvl] for lvl in self.levels}, training=training)
        batch = tf.shape(features[self.levels[0]])[0]

        def flat(x, *shape):
            return tf.cast(tf.reshape(x, [batch, -1, *shape]), tf.float32)

        return (
            {lvl: flat(logits[lvl]) for lvl in self.levels},
            {lvl: flat(deltas[lvl], 4) for lvl in self.levels},
        )

    def proposals(self, logits, deltas, anchors, image_valid_hw, train: bool):
        """`postprocess.generate_proposals` with the train or test top-k; no gradient."""
        c = self.config
        return postprocess.generate_proposals(
            {k: tf.stop_gradient(v) for k, v in logits.items()},
            {k: tf.stop_gradient(v) for k, v in deltas.items()},
            anchors,
            tf.cast(image_valid_hw, tf.float32),
            pre_nms_top_k=c.pre_nms_top_k_train if train else c.pre_nms_top_k_test,
            post_nms_top_k=c.post_nms_top_k_train if train else c.post_nms_top_k_test,
            nms_iou=c.nms_iou,
            min_size=c.min_box_size,
            nms_impl=c.nms_impl,
            nms_per_level=c.nms_per_level,
        )

    def assign_targets(self, anchors, labels):
        """Sampled anchor labels (1 / 0 / -1) and box targets for all levels concatenated."""
        all_anchors, _ = anchor_ops.concat_anchors(anchors)
        return target_assigner.assign_rpn_targets(
            all_anchors,
            tf.cast(labels["gt_boxes"], tf.float32),
            tf.cast(labels["gt_classes"], tf.int32),
            labels.get("gt_is_crowd"),
            positive_iou=self.config.positive_iou,
            negative_iou=self.config.negative_iou,
            num_samples=self.config.batch_size_per_image,
            positive_fraction=self.config.positive_fraction,
            positive_iou_inclusive=self.config.positive_iou_inclusive,
        )

    def compute_loss(self, logits, deltas, targets):
        """``{"rpn_objectness_loss", "rpn_box_loss"}`` for per-level outputs and their targets."""
        objectness, box = rpn_losses(
            targets.labels,
            targets.box_targets,
            tf.concat([logits[lvl] for lvl in self.levels], axis=1),
            tf.concat([deltas[lvl] for lvl in self.levels], axis=1),
            self.config.batch_size_per_image,
            self.config.smooth_l1_beta,
        )
        return {
            "rpn_objectness_loss": objectness * self.config.loss_weight,
            "rpn_box_loss": box * self.config.loss_weight,
        }

    def call(self, features, image_valid_hw, labels=None, training=None):
        logits, deltas = self.head_outputs(features, training)
        anchors = self.anchors(_padded_size(features[self.levels[0]], self.levels[0]))
        losses = {}
        if labels is not None:
            losses = self.compute_loss(logits, deltas, self.assign_targets(anchors, labels))
        train = labels is not None
        return self.proposals(logits, deltas, anchors, image_valid_hw, train=train), losses

    def get_config(self):
        config = super().get_config()
        config.update(
            config=self.config.to_dict(),
            anchor_config=self.anchor_config.to_dict(),
            levels=list(self.levels),
        )
        return config


def _padded_size(feature, level):
    """The padded size whose ``ceil(size / stride)`` grid is this level's map (and so every
    coarser level's); python ints when static, so the anchors are constants."""
    stride = anchor_ops.level_stride(level)
    h, w = feature.shape[1], feature.shape[2]
    if h is not None and w is not None:
        return (int(h) * stride, int(w) * stride)
    return tf.shape(feature)[1:3] * stride
