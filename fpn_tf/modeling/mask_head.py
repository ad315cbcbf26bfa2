"""The Mask R-CNN mask head on the feature pyramid (He et al. 2017, §3 and Fig. 4 right).

Each RoI, pooled 14x14 from its Eq. 1 level (`fpn_tf.modeling.poolers.MultiLevelRoIAlign`), goes
through four 3x3 convs of 256 (ReLU), a 2x2 stride-2 deconvolution (ReLU) to 28x28 and a 1x1
conv to one mask per class (per-pixel sigmoid, no competition between classes). The loss and
the masks of the detections are `fpn_tf.modeling.roi_heads.RoIHeads`' mask branch.

Initialisation follows detectron2 / torchvision: convs and the deconv He-normal with fan_out,
zero bias; the predictor N(0, 0.001), zero bias.
"""

from __future__ import annotations

from typing import List, Optional

import keras
import tensorflow as tf


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
