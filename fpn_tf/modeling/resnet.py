"""Bottleneck ResNet-50/101 with a block's stride in its 3x3 conv (torchvision's "ResNet v1.5").

keras.applications' layer names, order and weight shapes (one weight mapping serves both), plus
``conv{s}_block1_2_pad``, which pads the strided 3x3 like torch (one zero each side; Keras 'same'
pads 0 before and 1 after). The zero-padded max-pool equals torch's -inf padding after a ReLU.
"""

from __future__ import annotations

import keras

__all__ = ["RESNET_BLOCKS", "bottleneck_resnet_v1_5"]

# Bottleneck blocks of conv2..conv5.
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_WIDTHS = (64, 128, 256, 512)  # bottleneck widths of conv2..conv5; outputs have 4x as many
_KERAS_APPLICATIONS_BN_EPSILON = 1.001e-5


def _bn(x, epsilon, name):
    return keras.layers.BatchNormalization(axis=3, epsilon=epsilon, name=name)(x)


def _bottleneck(x, filters, stride, conv_shortcut, epsilon, name):
    """keras.applications' ``block1`` with the stride moved from ``_1_conv`` to ``_2_conv``."""
    if conv_shortcut:
        shortcut = keras.layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
        shortcut = _bn(shortcut, epsilon, f"{name}_0_bn")
    else:
        shortcut = x
    y = keras.layers.Conv2D(filters, 1, name=f"{name}_1_conv")(x)
    y = _bn(y, epsilon, f"{name}_1_bn")
    y = keras.layers.Activation("relu", name=f"{name}_1_relu")(y)
    if stride == 1:
        y = keras.layers.Conv2D(filters, 3, padding="same", name=f"{name}_2_conv")(y)
    else:
        y = keras.layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name=f"{name}_2_pad")(y)
        y = keras.layers.Conv2D(filters, 3, strides=stride, name=f"{name}_2_conv")(y)
    y = _bn(y, epsilon, f"{name}_2_bn")
    y = keras.layers.Activation("relu", name=f"{name}_2_relu")(y)
    y = keras.layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(y)
    y = _bn(y, epsilon, f"{name}_3_bn")
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.Activation("relu", name=f"{name}_out")(y)


def bottleneck_resnet_v1_5(x, depth: int = 50, bn_epsilon: float | None = None) -> dict:
    """The ResNet-50/101 graph on the normalised image tensor ``x`` [B, H, W, 3]:
    ``{"C2".."C5"}``, the outputs of conv2..conv5 (strides 4..32). ``bn_epsilon``: every
    BatchNorm's; None = keras.applications' 1.001e-5."""
    if depth not in RESNET_BLOCKS:
        raise ValueError(f"ResNet depth must be 50 or 101, got {depth}")
    epsilon = _KERAS_APPLICATIONS_BN_EPSILON if bn_epsilon is None else float(bn_epsilon)
    x = keras.layers.ZeroPadding2D(padding=((3, 3), (3, 3)), name="conv1_pad")(x)
    x = keras.layers.Conv2D(64, 7, strides=2, name="conv1_conv")(x)
    x = _bn(x, epsilon, "conv1_bn")
    x = keras.layers.Activation("relu", name="conv1_relu")(x)
    x = keras.layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    outputs = {}
    for stage, (filters, blocks) in enumerate(zip(_WIDTHS, RESNET_BLOCKS[depth]), start=2):
        for b in range(1, blocks + 1):
            stride = 2 if (b == 1 and stage > 2) else 1
            x = _bottleneck(x, filters, stride, b == 1, epsilon, f"conv{stage}_block{b}")
        outputs[f"C{stage}"] = x
    return outputs
