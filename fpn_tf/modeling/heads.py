"""The two heads of FPN Faster R-CNN: the RPN head shared by all levels (paper §4.1) and the
Fast R-CNN box head shared by all levels (paper §4.2). Both are plain Keras layers."""

from __future__ import annotations

from typing import Mapping

import keras

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

    def __init__(self, num_anchors: int = 3, channels: int = 256, sparse_backward: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_anchors = int(num_anchors)
        self.channels = int(channels)
        self.sparse_backward = bool(sparse_backward)
        init = keras.initializers.RandomNormal(stddev=0.01)
        self.conv = keras.layers.Conv2D(self.channels, 3, padding="same", activation="relu",
                                        kernel_initializer=init, name="conv",
                                        dtype=self.dtype_policy)
        self.objectness = keras.layers.Conv2D(self.num_anchors, 1, kernel_initializer=init,
                                              name="objectness", dtype=self.dtype_policy)
        self.box_deltas = keras.layers.Conv2D(4 * self.num_anchors, 1, kernel_initializer=init,
                                              name="box_deltas", dtype=self.dtype_policy)

    def build(self, input_shape):
        shape = tuple(next(iter(input_shape.values())) if isinstance(input_shape, Mapping)
                      else input_shape)
        self.conv.build(shape)
        hidden = shape[:-1] + (self.channels,)
        self.objectness.build(hidden)
        self.box_deltas.build(hidden)
        self.built = True

    def call(self, features, training=None):
        # The three convs' weights, applied by one op per level whose backward can skip the
        # positions no loss reaches (the layers stay: they own, build and save the weights).
        # Inference (training=False) takes no gradient: plain ops, nothing custom in a SavedModel.
        sparse = self.sparse_backward and training is not False
        weights = [keras.ops.cast(w, self.compute_dtype) for w in (
            self.conv.kernel, self.conv.bias, self.objectness.kernel, self.objectness.bias,
            self.box_deltas.kernel, self.box_deltas.bias)]
        logits, deltas = {}, {}
        for level, x in features.items():
            logits[level], deltas[level] = rpn_head_level(
                keras.ops.cast(x, self.compute_dtype), *weights, sparse_backward=sparse)
        return logits, deltas

    def get_config(self):
        config = super().get_config()
        config.update({"num_anchors": self.num_anchors, "channels": self.channels,
                       "sparse_backward": self.sparse_backward})
        return config


@keras.saving.register_keras_serializable(package="fpn_tf")
class FastRCNNBoxHead(keras.layers.Layer):
    """Two hidden fully connected layers (1024, ReLU), a (C+1)-way classifier and class-specific
    box regression (paper §4.2: "2 hidden 1,024-d fully-connected (fc) layers ... before the final
    classification and bounding box regression layers").

    Call with RoI features ``[B, R, S, S, C]``; returns ``(class_logits [B, R, C+1],
    box_deltas [B, R, C, 4])`` (deltas of class k at ``[..., k-1, :]``; background has none).
    """

    def __init__(self, num_classes: int, fc_dims: int = 1024, num_fc: int = 2, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes (foreground classes) must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.fc_dims = int(fc_dims)
        self.num_fc = int(num_fc)
        # Attributes fc1, fc2, ... (not a list: listed layers are invisible to tf.train.Checkpoint).
        for i in range(self.num_fc):
            setattr(self, f"fc{i + 1}", keras.layers.Dense(
                self.fc_dims, activation="relu", name=f"fc{i + 1}",
                kernel_initializer="lecun_uniform", dtype=self.dtype_policy))
        self.classifier = keras.layers.Dense(
            self.num_classes + 1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            name="class_logits", dtype=self.dtype_policy)
        self.box_regressor = keras.layers.Dense(
            4 * self.num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            name="box_deltas", dtype=self.dtype_policy)

    @property
    def fcs(self) -> list:
        return [getattr(self, f"fc{i + 1}") for i in range(self.num_fc)]

    def build(self, input_shape):
        dims = 1
        for d in input_shape[2:]:
            dims *= int(d)
        shape = (None, dims)
        for fc in self.fcs:
            fc.build(shape)
            shape = (None, self.fc_dims)
        self.classifier.build(shape)
        self.box_regressor.build(shape)
        self.built = True

    def call(self, roi_features):
        shape = keras.ops.shape(roi_features)
        x = keras.ops.reshape(roi_features, (shape[0], shape[1], -1))
        for fc in self.fcs:
            x = fc(x)
        logits = self.classifier(x)
        deltas = keras.ops.reshape(self.box_regressor(x), (shape[0], shape[1], self.num_classes, 4))
        return logits, deltas

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "fc_dims": self.fc_dims,
                       "num_fc": self.num_fc})
        return config
