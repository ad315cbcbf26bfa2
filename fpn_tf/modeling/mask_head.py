"""The Mask R-CNN mask head (He et al. 2017, Fig. 4 right), initialised as detectron2 and
torchvision (convs He-normal fan_out, predictor N(0, 0.001), zero biases)."""

from __future__ import annotations

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
    """3x3 convs + ReLU, a 2x2 stride-2 deconv + ReLU and a 1x1 predictor of K mask logits.

    K: 1 if ``class_agnostic``, else C + 1 (channel k = class k), or ``max(classifier_rows) + 1``
    with class k at ``classifier_rows[k]`` (torchvision's 91-row COCO layout, converted without
    reordering). [B, R, S, S, C] RoI features -> logits [B, R, 2S, 2S, K].
    """

    def __init__(
        self,
        num_classes,
        conv_dims,
        num_convs,
        class_agnostic=False,
        classifier_rows=None,
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
        def relu():  # a fresh (unseeded) initialiser per layer
            return dict(activation="relu", kernel_initializer=_he_normal_fan_out())

        for i in range(1, self.num_convs + 1):
            conv = keras.layers.Conv2D(
                self.conv_dims, 3, padding="same", name=f"mask_conv{i}", dtype=self.dtype_policy,
                **relu(),
            )  # fmt: skip
            setattr(self, f"conv{i}", conv)
        self.deconv = keras.layers.Conv2DTranspose(
            self.conv_dims, 2, strides=2, name="mask_deconv", dtype=self.dtype_policy, **relu()
        )
        self.predictor = keras.layers.Conv2D(
            self.num_outputs, 1, name="mask_logits", dtype=self.dtype_policy,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
        )  # fmt: skip

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
        keys = ("num_classes", "conv_dims", "num_convs", "class_agnostic", "classifier_rows")
        return {**super().get_config(), **{k: getattr(self, k) for k in keys}}
