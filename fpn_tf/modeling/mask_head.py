"""The Mask R-CNN mask branch on the feature pyramid (He et al. 2017, §3 and Fig. 4 right).

What the paper specifies for the FPN variant: each RoI is pooled by RoIAlign to 14x14 from the
pyramid level Eq. 1 of FPN assigns it (the same assignment as the box head); four 3x3 convs of
256 channels with ReLU, a 2x2 stride-2 deconvolution with ReLU to 28x28, and a 1x1 conv to K
masks of 28x28, one per class (no competition between classes: per-pixel sigmoid, not softmax).
The loss ``L_mask`` is the average binary cross-entropy over the m x m pixels of the mask of the
RoI's ground-truth class, on foreground RoIs only; the target is the RoI's matched ground-truth
mask re-sampled on the RoI's 28x28 grid (`fpn_tf.ops.mask_ops.mask_targets`). At inference the
branch runs on the final (post-NMS) detections and the mask of each detection's predicted class
is kept, box-relative over its detection box (`fpn_tf.ops.mask_ops` convention).

Initialisation follows detectron2 / torchvision: convs and the deconv He-normal with fan_out
(``kaiming_normal_(mode="fan_out", nonlinearity="relu")``), zero bias; the predictor N(0, 0.001),
zero bias.

    masks = MaskHeads(num_classes=C, **MaskConfig().to_dict(), **eq1_fields)
    losses = masks.compute_loss(pyramid, roi_targets, labels, training=True,
                                max_foreground=F)  # {"mask_loss": ...}
    probabilities = masks.predict(pyramid, detections)  # [B, D, 28, 28] float32
"""

from __future__ import annotations

from typing import List, Optional

import keras
import tensorflow as tf

from fpn_tf.ops import anchors as anchor_ops
from fpn_tf.modeling.roi_heads import roi_levels
from fpn_tf.ops import mask_ops, roi_ops


def _he_normal_fan_out():
    # torch's kaiming_normal_ is an untruncated normal (Keras' "he_normal" is truncated, fan_in).
    # For Conv2DTranspose Keras' kernel is [kh, kw, out, in] and its "fan_out" is in * kh * kw,
    # which is torch's fan_out of ConvTranspose2d's [in, out, kh, kw] weight too.
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )


@keras.saving.register_keras_serializable(package="fpn_tf")
class MaskRCNNHead(keras.layers.Layer):
    """``num_convs`` 3x3 convs (``conv_dims``, ReLU), a 2x2 stride-2 deconv (ReLU) and a 1x1
    predictor of K mask logits per pixel.

    K (``num_outputs``): 1 if ``class_agnostic``; else ``num_classes + 1`` with channel k for
    contiguous class k (channel 0 unused), or, with ``classifier_rows`` (the box head's rows of
    background and classes 1..C, torchvision's 91-row COCO layout), ``max(classifier_rows) + 1``
    channels, class k read at ``classifier_rows[k]`` (a torchvision mask predictor converts
    without reordering). `class_channels` maps classes to channels.

    Call with RoI features ``[B, R, S, S, C]``; returns logits ``[B, R, 2S, 2S, K]`` in the
    layer's compute dtype.
    """

    def __init__(
        self,
        num_classes: int,
        conv_dims: int,
        num_convs: int,
        class_agnostic: bool = False,
        classifier_rows: Optional[List[int]] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes (foreground classes) must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.conv_dims = int(conv_dims)
        self.num_convs = int(num_convs)
        self.class_agnostic = bool(class_agnostic)
        self.classifier_rows = (
            None if classifier_rows is None else [int(r) for r in classifier_rows]
        )
        if self.classifier_rows is not None and len(self.classifier_rows) != self.num_classes + 1:
            raise ValueError(
                f"classifier_rows needs {self.num_classes + 1} rows (background and classes "
                f"1..{self.num_classes}), got {self.classifier_rows}"
            )
        if self.class_agnostic:
            self.num_outputs = 1
        elif self.classifier_rows is not None:
            self.num_outputs = max(self.classifier_rows) + 1
        else:
            self.num_outputs = self.num_classes + 1
        # Attributes conv1, conv2, ... (not a list: listed layers are invisible to checkpoints).
        for i in range(self.num_convs):
            setattr(
                self,
                f"conv{i + 1}",
                keras.layers.Conv2D(
                    self.conv_dims,
                    3,
                    padding="same",
                    activation="relu",
                    kernel_initializer=_he_normal_fan_out(),
                    name=f"mask_conv{i + 1}",
                    dtype=self.dtype_policy,
                ),
            )
        self.deconv = keras.layers.Conv2DTranspose(
            self.conv_dims,
            2,
            strides=2,
            padding="valid",
            activation="relu",
            kernel_initializer=_he_normal_fan_out(),
            name="mask_deconv",
            dtype=self.dtype_policy,
        )
        self.predictor = keras.layers.Conv2D(
            self.num_outputs,
            1,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            name="mask_logits",
            dtype=self.dtype_policy,
        )

    @property
    def convs(self) -> list:
        return [getattr(self, f"conv{i + 1}") for i in range(self.num_convs)]

    def class_channels(self, classes):
        """int32 channel of each contiguous class (0..C; 0 for background/padding rows)."""
        classes = tf.maximum(tf.cast(classes, tf.int32), 0)
        if self.class_agnostic:
            return tf.zeros_like(classes)
        if self.classifier_rows is not None:
            return tf.gather(tf.constant(self.classifier_rows, tf.int32), classes)
        return classes

    def build(self, input_shape):
        size, channels = input_shape[2], int(input_shape[-1])
        shape = (None, size, size, channels)
        for conv in self.convs:
            conv.build(shape)
            shape = (None, size, size, self.conv_dims)
        self.deconv.build(shape)
        up = None if size is None else 2 * int(size)
        self.predictor.build((None, up, up, self.conv_dims))

    def call(self, roi_features):
        shape = tf.shape(roi_features)
        static = roi_features.shape
        x = tf.reshape(roi_features, tf.concat([[-1], shape[2:]], axis=0))
        for conv in self.convs:
            x = conv(x)
        x = self.predictor(self.deconv(x))
        out_shape = tf.concat([shape[:2], tf.shape(x)[1:]], axis=0)
        x = tf.reshape(x, out_shape)
        up = None if static[2] is None else 2 * static[2]
        x.set_shape([static[0], static[1], up, up, self.num_outputs])
        return x

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "conv_dims": self.conv_dims,
                "num_convs": self.num_convs,
                "class_agnostic": self.class_agnostic,
                "classifier_rows": self.classifier_rows,
            }
        )
        return config


# MaskConfig's fields, then the Eq. 1 / RoIAlign fields shared with RoIConfig.
_MASK_FIELDS = (
    "output_size",
    "sampling_ratio",
    "num_convs",
    "conv_dims",
    "class_agnostic",
    "loss_weight",
)
EQ1_FIELDS = (
    "canonical_size",
    "canonical_level",
    "min_level",
    "max_level",
    "aligned",
    "level_epsilon",
    "align_impl",
)


@keras.saving.register_keras_serializable(package="fpn_tf")
class MaskHeads(keras.layers.Layer):
    """The mask branch: Eq. 1 + RoIAlign of RoIs (``output_size``), `MaskRCNNHead`, the mask
    loss and the masks of the final detections.

    The keyword arguments are the ``model.mask`` fields (`fpn_tf.configs.experiment.MaskConfig`),
    the Eq. 1 / RoIAlign fields of ``model.roi`` (``EQ1_FIELDS``: the RoIs go to the levels the
    box head uses), ``num_classes`` and the box head's ``classifier_rows``; no defaults, so each
    number is written once (`fpn_tf.modeling.factory.build_mask_heads`).

    Runs in the layer's dtype policy (float16 convs under ``mixed_float16``); boxes, targets,
    the loss and the output probabilities are float32 (``autocast=False``).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        output_size: int,
        sampling_ratio: int,
        num_convs: int,
        conv_dims: int,
        class_agnostic: bool,
        loss_weight: float,
        canonical_size: float,
        canonical_level: int,
        min_level: int,
        max_level: int,
        aligned: bool,
        level_epsilon: float,
        align_impl: str,
        classifier_rows: Optional[List[int]] = None,
        **kwargs,
    ):
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        self.num_classes = int(num_classes)
        self.output_size, self.sampling_ratio = int(output_size), int(sampling_ratio)
        self.num_convs, self.conv_dims = int(num_convs), int(conv_dims)
        self.class_agnostic, self.loss_weight = bool(class_agnostic), float(loss_weight)
        self.canonical_size, self.canonical_level = float(canonical_size), int(canonical_level)
        self.min_level, self.max_level = int(min_level), int(max_level)
        self.aligned, self.level_epsilon = bool(aligned), float(level_epsilon)
        self.align_impl = str(align_impl)
        self.classifier_rows = (
            None if classifier_rows is None else [int(r) for r in classifier_rows]
        )
        self.mask_size = 2 * self.output_size  # the deconv doubles the pooled size: 28
        self.head = MaskRCNNHead(
            self.num_classes,
            self.conv_dims,
            self.num_convs,
            class_agnostic=self.class_agnostic,
            classifier_rows=self.classifier_rows,
            name="mask_head",
            dtype=self.dtype_policy,
        )

    def build(self, features_shape):
        self.levels = roi_levels(features_shape, self.min_level, self.max_level)
        channels = int(features_shape[self.levels[0]][-1])
        self.head.build((None, None, self.output_size, self.output_size, channels))

    def pool(self, features, rois, training=None):
        """RoIAlign of each RoI on its Eq. 1 level (as `RoIHeads.pool`): [B, R, S, S, C]."""
        if not self.built:  # compute_loss / predict are called directly, not through __call__
            self.build({lvl: tuple(f.shape) for lvl, f in features.items()})
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

    def class_logits(self, features, rois, classes, training=None):
        """float32 [B, R, M, M]: each RoI's mask logits in the channel of its class (1..C)."""
        logits = self.head(self.pool(features, rois, training), training=training)
        channels = self.head.class_channels(classes)  # [B, R]
        picked = tf.gather(logits, channels, axis=4, batch_dims=2)  # [B, R, M, M]
        return tf.cast(picked, tf.float32)

    def targets(self, roi_targets, labels, max_foreground=None):
        """The first ``max_foreground`` rows of ``roi_targets`` (None = all): ``(rois [B, F, 4],
        classes [B, F], foreground bool [B, F], mask targets float32 [B, F, M, M])``, the
        targets 0 / 1 (`mask_ops.mask_targets`) and all 0 on rows that are not foreground."""
        f = max_foreground
        rois = roi_targets.rois[:, :f]
        foreground = roi_targets.foreground_mask[:, :f]
        classes = roi_targets.class_targets[:, :f]
        matched = tf.where(foreground, roi_targets.matched_gt_indices[:, :f], -1)
        targets = mask_ops.mask_targets(
            labels["gt_masks"], labels["gt_boxes"], rois, matched, self.mask_size
        )
        return rois, classes, foreground, tf.stop_gradient(targets)

    def compute_loss(self, features, roi_targets, labels, training=None, max_foreground=None):
        """``{"mask_loss"}``: the mean per-pixel sigmoid cross-entropy of the ground-truth
        class's mask over the foreground RoIs' M x M pixels, times ``loss_weight`` (0 without
        foreground, as detectron2 and torchvision; their normaliser too: the foreground RoIs of
        this batch, so on several replicas each replica's mean is over its own foreground).

        ``roi_targets``: `target_assigner.RoiTargets` (foreground rows first, as ``sample_rois``
        puts them); only the first ``max_foreground`` rows are pooled (``int(batch_size_per_image
        * positive_fraction)``, the sampler's cap, so every foreground row is among them; None =
        all rows), weighted by ``foreground_mask``. ``labels``: ``gt_masks`` [B, N, S, S]
        box-relative over ``gt_boxes`` [B, N, 4].
        """
        rois, classes, foreground, targets = self.targets(roi_targets, labels, max_foreground)
        logits = self.class_logits(features, rois, classes, training)
        bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)
        weight = tf.cast(foreground, tf.float32)
        total = tf.reduce_sum(tf.reduce_sum(bce, axis=[2, 3]) * weight)
        count = tf.reduce_sum(weight) * float(self.mask_size * self.mask_size)
        return {"mask_loss": tf.math.divide_no_nan(total, count) * self.loss_weight}

    def predict(self, features, detections):
        """float32 [B, D, M, M] mask probabilities of each detection's class, box-relative over
        its box (`fpn_tf.ops.postprocess.Detections`: boxes in the pyramid's input pixels,
        classes 1..C); zeros for rows >= ``num_detections``."""
        boxes = tf.cast(detections.boxes, tf.float32)
        probs = tf.sigmoid(self.class_logits(features, boxes, detections.classes, False))
        rows = tf.sequence_mask(detections.num_detections, tf.shape(boxes)[1])
        return tf.where(rows[:, :, None, None], probs, 0.0)

    def call(self, features, detections):
        return self.predict(features, detections)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "classifier_rows": self.classifier_rows,
                **{name: getattr(self, name) for name in _MASK_FIELDS + EQ1_FIELDS},
            }
        )
        return config
