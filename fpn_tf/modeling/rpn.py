"""The region proposal network on the feature pyramid (paper §4.1), as one Keras layer.

`RegionProposalNetwork` owns the whole stage: the head shared by every level (3x3 conv, then
sibling 1x1 objectness and box-delta convs), the anchors (one size per level, three aspect
ratios), the labelling and sampling of anchors against the ground truth, the proposals (per-level
top-k, decode, clip, one NMS per image or per level) and the two RPN losses. The arithmetic is pure
TensorFlow in `fpn_tf.ops` (`anchors`, `target_assigner`, `postprocess`, `rpn_head_ops`) and
`fpn_tf.modeling.losses`; this layer holds the settings and calls them::

    proposals, losses = rpn(features, image_valid_hw, labels=labels)   # training, validation
    proposals, _ = rpn(features, image_valid_hw)                        # inference
"""

from __future__ import annotations

from typing import Mapping, Sequence

import keras
import tensorflow as tf

from fpn_tf.modeling.losses import rpn_losses
from fpn_tf.ops import anchors as anchor_ops
from fpn_tf.ops import postprocess, target_assigner
from fpn_tf.ops.rpn_head_ops import rpn_head_level


@keras.saving.register_keras_serializable(package="fpn_tf")
class RPNHead(keras.layers.Layer):
    """3x3 conv + ReLU, then sibling 1x1 convs for objectness and box deltas, on every level.

    "The parameters of the heads are shared across all feature pyramid levels" (paper §4.1).

    Call with ``{"P2": [B,H,W,C], ...}``; returns ``(logits, deltas)``, two dicts with
    ``logits[level]: [B, H, W, A]`` and ``deltas[level]: [B, H, W, 4A]`` (anchor order of
    `fpn_tf.ops.anchors`: cell-major, then anchor type).

    Args:
      num_anchors: A, anchor types per location (3: one size, three aspect ratios).
      channels: width of the 3x3 conv (paper: 256, the pyramid's d).
      sparse_backward: compute the gradient only at the positions where the loss's gradient is
        non-zero (the sampled anchors), `fpn_tf.ops.rpn_head_ops`; same values as the dense one.
    """

    def __init__(self, num_anchors: int, channels: int, sparse_backward: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.num_anchors = int(num_anchors)
        self.channels = int(channels)
        self.sparse_backward = bool(sparse_backward)
        init = keras.initializers.RandomNormal(stddev=0.01)
        self.conv = keras.layers.Conv2D(
            self.channels,
            3,
            padding="same",
            activation="relu",
            kernel_initializer=init,
            name="conv",
            dtype=self.dtype_policy,
        )
        self.objectness = keras.layers.Conv2D(
            self.num_anchors, 1, kernel_initializer=init, name="objectness", dtype=self.dtype_policy
        )
        self.box_deltas = keras.layers.Conv2D(
            4 * self.num_anchors,
            1,
            kernel_initializer=init,
            name="box_deltas",
            dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        shape = tuple(
            next(iter(input_shape.values())) if isinstance(input_shape, Mapping) else input_shape
        )
        self.conv.build(shape)
        hidden = shape[:-1] + (self.channels,)
        self.objectness.build(hidden)
        self.box_deltas.build(hidden)

    def call(self, features, training=None):
        # The three convs' weights, applied by one op per level whose backward can skip the
        # positions no loss reaches (the layers stay: they own, build and save the weights).
        # Inference (training=False) takes no gradient: plain ops, nothing custom in a SavedModel.
        sparse = self.sparse_backward and training is not False
        weights = [
            keras.ops.cast(w, self.compute_dtype)
            for w in (
                self.conv.kernel,
                self.conv.bias,
                self.objectness.kernel,
                self.objectness.bias,
                self.box_deltas.kernel,
                self.box_deltas.bias,
            )
        ]
        logits, deltas = {}, {}
        for level, x in features.items():
            logits[level], deltas[level] = rpn_head_level(
                keras.ops.cast(x, self.compute_dtype), *weights, sparse_backward=sparse
            )
        return logits, deltas

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_anchors": self.num_anchors,
                "channels": self.channels,
                "sparse_backward": self.sparse_backward,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="fpn_tf")
class RegionProposalNetwork(keras.layers.Layer):
    """The RPN: shared head, anchors, anchor targets, proposals and losses.

    The keyword arguments are the fields of the ``model.rpn`` config section
    (`fpn_tf.configs.experiment.RPNConfig`, which documents each one and holds the paper's
    numbers as its defaults), plus the anchors. They have no defaults here so that each number is
    written once: `fpn_tf.modeling.factory.build_rpn` builds this layer from a config, and on its
    own ``RegionProposalNetwork(**RPNConfig().to_dict(), anchor_sizes=..., aspect_ratios=...,
    anchor_offset=0.5, anchor_round=False, anchor_stride_from_padded_size=False)``.

    Args:
      anchor_sizes: ``{level: sizes}``, the levels the RPN runs on and their anchor sizes
        (paper: one size per level, 32..512 on P2..P6; the single-level ablations put all five on
        one level). The head is shared, so every level needs the same number of anchor types.
      aspect_ratios: anchor height/width ratios (0.5, 1, 2).
      anchor_offset, anchor_round, anchor_stride_from_padded_size: ``model.anchor``'s offset,
        round_cell_anchors and stride_from_padded_size (`fpn_tf.ops.anchors.generate_anchors`).
        The padded image size is the first level's map size times its stride.
      head_channels: the 3x3 conv's width; None = the features' channels.
      head_sparse_backward, positive_iou, negative_iou, batch_size_per_image, positive_fraction,
      pre_nms_top_k_train / _test, post_nms_top_k_train / _test, nms_iou, min_box_size,
      smooth_l1_beta, loss_weight, nms_impl, nms_per_level, positive_iou_inclusive: as
        ``model.rpn``. The ``_train`` pair applies when
        ``labels`` are given (a loss is computed: training and validation losses alike), the
        ``_test`` pair otherwise.

    Call: ``rpn(features, image_valid_hw, labels=None, training=None)`` with ``features`` a dict
    ``{"P2": [B, H2, W2, C], ...}`` holding (at least) the anchor levels, ``image_valid_hw``
    float [B, 2] the unpadded ``(height, width)`` of each image (proposals are clipped to it),
    ``labels`` None or ``{"gt_boxes" [B, N, 4], "gt_classes" [B, N], "gt_is_crowd" [B, N]
    (optional)}``. Returns ``(proposals, losses)``: `fpn_tf.ops.postprocess.Proposals` (boxes
    [B, K, 4], scores [B, K], valid [B, K]) and ``{"rpn_objectness_loss", "rpn_box_loss"}``
    (weighted by ``loss_weight``; empty without labels). No gradient flows through the proposals.
    """

    def __init__(
        self,
        *,
        anchor_sizes: Mapping[str, Sequence[float]],
        aspect_ratios: Sequence[float],
        anchor_offset: float,
        anchor_round: bool,
        anchor_stride_from_padded_size: bool,
        head_channels: int | None,
        head_sparse_backward: bool,
        positive_iou: float,
        negative_iou: float,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_top_k_train: int,
        post_nms_top_k_train: int,
        pre_nms_top_k_test: int,
        post_nms_top_k_test: int,
        nms_iou: float,
        min_box_size: float,
        smooth_l1_beta: float,
        loss_weight: float,
        nms_impl: str,
        nms_per_level: bool,
        positive_iou_inclusive: bool,
        **kwargs,
    ):
        kwargs.pop("autocast", None)
        # autocast=False: the boxes and sizes given to `call` stay float32 under mixed
        # precision (the head casts the features to its compute dtype itself).
        super().__init__(autocast=False, **kwargs)
        self.anchor_sizes = {str(k): tuple(float(s) for s in v) for k, v in anchor_sizes.items()}
        self.levels = sorted(self.anchor_sizes, key=anchor_ops.level_number)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        per_level = anchor_ops.num_anchors_per_location(
            self.levels, self.anchor_sizes, self.aspect_ratios
        )
        if len(set(per_level.values())) != 1:
            raise ValueError(
                f"the shared RPN head needs the same anchors per location on every "
                f"level, got {dict(per_level)}"
            )
        self.num_anchors = next(iter(per_level.values()))
        self.anchor_offset = float(anchor_offset)
        self.anchor_round = bool(anchor_round)
        self.anchor_stride_from_padded_size = bool(anchor_stride_from_padded_size)
        self.head_channels = None if head_channels is None else int(head_channels)
        self.head_sparse_backward = bool(head_sparse_backward)
        self.positive_iou, self.negative_iou = float(positive_iou), float(negative_iou)
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.pre_nms_top_k_train = int(pre_nms_top_k_train)
        self.post_nms_top_k_train = int(post_nms_top_k_train)
        self.pre_nms_top_k_test = int(pre_nms_top_k_test)
        self.post_nms_top_k_test = int(post_nms_top_k_test)
        self.nms_iou, self.min_box_size = float(nms_iou), float(min_box_size)
        self.smooth_l1_beta, self.loss_weight = float(smooth_l1_beta), float(loss_weight)
        self.nms_impl = str(nms_impl)
        self.nms_per_level = bool(nms_per_level)
        self.positive_iou_inclusive = bool(positive_iou_inclusive)

    def build(self, features_shape):
        missing = sorted(set(self.levels) - set(features_shape))
        if missing:
            raise ValueError(
                f"anchor sizes for levels {missing} that the pyramid does not "
                f"output ({sorted(features_shape)})"
            )
        channels = int(features_shape[self.levels[0]][-1])
        # The head's width can default to the features' only here, so the head is made here.
        self.head = RPNHead(
            self.num_anchors,
            self.head_channels or channels,
            sparse_backward=self.head_sparse_backward,
            name="head",
            dtype=self.dtype_policy,
        )
        self.head.build((None, None, None, channels))

    # --- the pieces, each usable on its own --------------------------------------------------
    def anchors(self, image_size):
        """``OrderedDict level -> [H_l * W_l * A, 4]`` for a padded ``(height, width)``."""
        return anchor_ops.generate_anchors(
            image_size,
            self.levels,
            self.anchor_sizes,
            self.aspect_ratios,
            offset=self.anchor_offset,
            round_cell_anchors=self.anchor_round,
            stride_from_padded_size=self.anchor_stride_from_padded_size,
        )

    def head_outputs(self, features, training=None):
        """Per-level float32 objectness logits [B, A_l] and deltas [B, A_l, 4] (anchor order)."""
        logits, deltas = self.head({lvl: features[lvl] for lvl in self.levels}, training=training)
        batch = tf.shape(features[self.levels[0]])[0]
        return (
            {lvl: tf.cast(tf.reshape(logits[lvl], [batch, -1]), tf.float32) for lvl in self.levels},
            {
                lvl: tf.cast(tf.reshape(deltas[lvl], [batch, -1, 4]), tf.float32)
                for lvl in self.levels
            },
        )

    def proposals(self, logits, deltas, anchors, image_valid_hw, train: bool):
        """`postprocess.generate_proposals` with the train or test top-k; no gradient."""
        return postprocess.generate_proposals(
            {k: tf.stop_gradient(v) for k, v in logits.items()},
            {k: tf.stop_gradient(v) for k, v in deltas.items()},
            anchors,
            tf.cast(image_valid_hw, tf.float32),
            pre_nms_top_k=self.pre_nms_top_k_train if train else self.pre_nms_top_k_test,
            post_nms_top_k=self.post_nms_top_k_train if train else self.post_nms_top_k_test,
            nms_iou=self.nms_iou,
            min_size=self.min_box_size,
            nms_impl=self.nms_impl,
            nms_per_level=self.nms_per_level,
        )

    def assign_targets(self, anchors, labels):
        """Sampled anchor labels (1 / 0 / -1) and box targets for all levels concatenated."""
        all_anchors, _ = anchor_ops.concat_anchors(anchors)
        return target_assigner.assign_rpn_targets(
            all_anchors,
            tf.cast(labels["gt_boxes"], tf.float32),
            tf.cast(labels["gt_classes"], tf.int32),
            labels.get("gt_is_crowd"),
            positive_iou=self.positive_iou,
            negative_iou=self.negative_iou,
            num_samples=self.batch_size_per_image,
            positive_fraction=self.positive_fraction,
            positive_iou_inclusive=self.positive_iou_inclusive,
        )

    def compute_loss(self, logits, deltas, targets):
        """``{"rpn_objectness_loss", "rpn_box_loss"}`` for per-level outputs and their targets."""
        objectness, box = rpn_losses(
            targets.labels,
            targets.box_targets,
            tf.concat([logits[lvl] for lvl in self.levels], axis=1),
            tf.concat([deltas[lvl] for lvl in self.levels], axis=1),
            self.batch_size_per_image,
            self.smooth_l1_beta,
        )
        return {
            "rpn_objectness_loss": objectness * self.loss_weight,
            "rpn_box_loss": box * self.loss_weight,
        }

    def call(self, features, image_valid_hw, labels=None, training=None):
        logits, deltas = self.head_outputs(features, training)
        anchors = self.anchors(_padded_size(features[self.levels[0]], self.levels[0]))
        losses = {}
        if labels is not None:
            losses = self.compute_loss(logits, deltas, self.assign_targets(anchors, labels))
        proposals = self.proposals(
            logits, deltas, anchors, image_valid_hw, train=labels is not None
        )
        return proposals, losses

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "anchor_sizes": {k: list(v) for k, v in self.anchor_sizes.items()},
                "aspect_ratios": list(self.aspect_ratios),
                **{
                    name: getattr(self, name)
                    for name in (
                        "anchor_offset",
                        "anchor_round",
                        "anchor_stride_from_padded_size",
                        "head_channels",
                        "head_sparse_backward",
                        "positive_iou",
                        "negative_iou",
                        "batch_size_per_image",
                        "positive_fraction",
                        "pre_nms_top_k_train",
                        "post_nms_top_k_train",
                        "pre_nms_top_k_test",
                        "post_nms_top_k_test",
                        "nms_iou",
                        "min_box_size",
                        "smooth_l1_beta",
                        "loss_weight",
                        "nms_impl",
                        "nms_per_level",
                        "positive_iou_inclusive",
                    )
                },
            }
        )
        return config


def _padded_size(feature, level):
    """The padded image size whose ``ceil(size / stride)`` grid is this level's map: every
    coarser level's anchors then match its map too (``ceil(ceil(x / a) / b) = ceil(x / ab)``).
    Python ints when the map's shape is static (the anchors become constants)."""
    stride = anchor_ops.level_stride(level)
    h, w = feature.shape[1], feature.shape[2]
    if h is not None and w is not None:
        return (int(h) * stride, int(w) * stride)
    return tf.shape(feature)[1:3] * stride
