"""Bottom-up pathway: backbones that return the paper's C2..C5 (strides 4, 8, 16, 32).

A backbone is a Functional model, RGB pixels 0..255 (any size) -> ``{"C2", ..., "C5"}``, that
normalises its input itself (`PixelNormalization`). ``resnet50`` / ``resnet101`` are
`keras.applications` ResNets, or with ``stride_in_1x1: false`` torchvision's variant (same layer
names); ``small_resnet`` is a narrow basic-block ResNet for CPUs, trained from scratch.
"""

from __future__ import annotations

from typing import Sequence

import keras

from fpn_tf.configs.experiment import BackboneConfig
from fpn_tf.modeling.frozen_batch_norm import fold_frozen_batch_norm
from fpn_tf.modeling.resnet import bottleneck_resnet_v1_5

BACKBONE_LEVELS = ("C2", "C3", "C4", "C5")
# Stages by the prefix of their layer names, for freeze_at.
_STAGES = [(1, "conv1_"), (1, "pool1_")] + [(s, f"conv{s}_") for s in range(2, 6)]

# Last block of conv2..conv5 in keras.applications ResNets.
_RESNET_ENDPOINTS = {
    "resnet50": ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
    "resnet101": ("conv2_block3_out", "conv3_block4_out", "conv4_block23_out", "conv5_block3_out"),
}
_RESNET_BUILDERS = {
    "resnet50": keras.applications.ResNet50,
    "resnet101": keras.applications.ResNet101,
}
# ImageNet means (0..255): BGR for keras.applications' caffe mode, RGB (with std) for torchvision.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_IMAGENET_RGB_MEAN = (123.675, 116.28, 103.53)
_IMAGENET_RGB_STD = (58.395, 57.12, 57.375)
# Each type's own normalisation: (channel order the first conv sees, mean, std, layer name).
_DEFAULT_PIXEL_NORMALIZATION = {
    "resnet50": ("bgr", _CAFFE_BGR_MEAN, (1.0, 1.0, 1.0), "caffe_preprocess"),
    "resnet101": ("bgr", _CAFFE_BGR_MEAN, (1.0, 1.0, 1.0), "caffe_preprocess"),
    "small_resnet": ("rgb", _IMAGENET_RGB_MEAN, _IMAGENET_RGB_STD, "imagenet_normalize"),
}
CHANNEL_ORDERS = ("rgb", "bgr")


@keras.saving.register_keras_serializable(package="fpn_tf")
class PixelNormalization(keras.layers.Layer):
    """RGB 0..255 in, ``(x - mean) / std`` out, channels reversed first with ``to_bgr``
    (``mean`` / ``std`` in the output order)."""

    def __init__(self, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), to_bgr=False, **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.to_bgr = bool(to_bgr)

    def call(self, images):
        x = keras.ops.cast(images, self.compute_dtype)
        if self.to_bgr:
            x = keras.ops.flip(x, axis=-1)
        mean = keras.ops.convert_to_tensor(self.mean, dtype=self.compute_dtype)
        std = keras.ops.convert_to_tensor(self.std, dtype=self.compute_dtype)
        return (x - mean) / std

    def get_config(self):
        config = super().get_config()
        config.update({"mean": list(self.mean), "std": list(self.std), "to_bgr": self.to_bgr})
        return config


def pixel_normalization(
    backbone_type: str,
    channel_order: str | None = None,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
) -> tuple[str, tuple[float, float, float], tuple[float, float, float]]:
    """``(channel_order, mean, std)`` (0..255, in the order the first conv sees): the given
    three, or with all three None the type's own."""
    if backbone_type not in _DEFAULT_PIXEL_NORMALIZATION:
        raise ValueError(
            f"unknown backbone type {backbone_type!r}; expected resnet50, resnet101 or small_resnet"
        )
    given = [v is not None for v in (channel_order, pixel_mean, pixel_std)]
    if not any(given):
        return _DEFAULT_PIXEL_NORMALIZATION[backbone_type][:3]
    if not all(given):
        raise ValueError(
            "channel_order, pixel_mean and pixel_std are given together (all three or none), got "
            f"channel_order={channel_order!r}, pixel_mean={pixel_mean!r}, pixel_std={pixel_std!r}"
        )
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    mean, std = tuple(float(m) for m in pixel_mean), tuple(float(s) for s in pixel_std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"need 3 means and 3 positive stds, got mean={mean}, std={std}")
    return channel_order, mean, std


def pixel_mean_rgb(channel_order: str, mean: Sequence[float]) -> tuple[float, float, float]:
    """``mean`` (given in ``channel_order``) in RGB order: the 0..255 pixel that normalises to 0."""
    mean = tuple(float(m) for m in mean)
    return mean[::-1] if channel_order == "bgr" else mean


def _normalization_layer(config: BackboneConfig) -> PixelNormalization:
    order, mean, std = pixel_normalization(
        config.type, config.channel_order, config.pixel_mean, config.pixel_std
    )
    default = config.channel_order is None  # the config gives all three or none
    name = _DEFAULT_PIXEL_NORMALIZATION[config.type][3] if default else "pixel_normalize"
    return PixelNormalization(mean=mean, std=std, to_bgr=order == "bgr", name=name)


def synchronize_batch_norm(model: keras.Model) -> keras.Model:
    """A copy of a Functional ``model`` whose BatchNorm layers compute statistics over all
    replicas (``synchronized=True``), with the same weights and trainable flags."""

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization):
            config["synchronized"] = True
        new = layer.__class__.from_config(config)
        new.trainable = layer.trainable
        return new

    synced = keras.models.clone_model(model, clone_function=clone)
    synced.set_weights(model.get_weights())
    for old, new in zip(model.layers, synced.layers):
        new.trainable = old.trainable
    return synced


def _freeze(model: keras.Model, config: BackboneConfig) -> None:
    """Freezes every BatchNorm (``freeze_bn``) and every layer of stages <= ``freeze_at``."""
    frozen_prefixes = tuple(p for stage, p in _STAGES if stage <= config.freeze_at)
    for layer in model.layers:
        # A non-trainable Keras 3 BatchNormalization runs in inference mode (moving statistics).
        if config.freeze_bn and isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
        if frozen_prefixes and layer.name.startswith(frozen_prefixes):
            layer.trainable = False


def build_backbone(
    config: BackboneConfig | None = None,
    input_shape: Sequence[int | None] = (None, None, 3),
    **fields,
) -> keras.Model:
    """The backbone of a ``model.backbone`` section, ``fields`` overriding it by name
    (``build_backbone(type="small_resnet", widths=[8, 8, 8, 8])``), validated."""
    config = (config or BackboneConfig()).override(fields).validate_section()
    images = keras.Input(shape=tuple(input_shape), name="images")
    x = _normalization_layer(config)(images)
    build = _small_resnet if config.type == "small_resnet" else _resnet
    model = keras.Model(images, build(x, config), name=config.type)
    if config.type == "small_resnet" or not config.stride_in_1x1:
        if config.weights is not None:
            model.load_weights(config.weights)
        _freeze(model, config)
    if config.freeze_bn and config.fold_frozen_bn:
        model, _ = fold_frozen_batch_norm(model)
    if config.sync_batch_norm and not config.freeze_bn:
        model = synchronize_batch_norm(model)
    return model


def _resnet(x, config: BackboneConfig) -> dict:
    """ResNet-50/101 C2..C5 of the normalised ``x``: keras.applications' (loaded and frozen
    here), or with ``stride_in_1x1`` false `resnet`'s graph (loaded and frozen by the caller)."""
    if not config.stride_in_1x1:
        depth = int(config.type[len("resnet") :])
        return bottleneck_resnet_v1_5(x, depth=depth, bn_epsilon=config.bn_epsilon)
    resnet = _RESNET_BUILDERS[config.type](
        include_top=False, weights=config.weights, input_tensor=x
    )
    for layer in resnet.layers:
        if config.bn_epsilon is not None and isinstance(layer, keras.layers.BatchNormalization):
            layer.epsilon = float(config.bn_epsilon)  # read on every call, copied by a fold
    _freeze(resnet, config)
    return {
        level: resnet.get_layer(name).output
        for level, name in zip(BACKBONE_LEVELS, _RESNET_ENDPOINTS[config.type])
    }


def _conv_bn_relu(x, filters, kernel, stride, name, epsilon, relu=True):
    conv = keras.layers.Conv2D(
        filters,
        kernel,
        stride,
        "same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )
    x = conv(x)
    x = keras.layers.BatchNormalization(epsilon=epsilon, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _basic_block(x, filters, stride, name, epsilon):
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn_relu(x, filters, 1, stride, f"{name}_0", epsilon, relu=False)
    y = _conv_bn_relu(x, filters, 3, stride, f"{name}_1", epsilon)
    y = _conv_bn_relu(y, filters, 3, 1, f"{name}_2", epsilon, relu=False)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _small_resnet(x, config: BackboneConfig) -> dict:
    """A narrow ResNet-18 shape: a 3x3/2 + 3x3/2 stem, then conv2..conv5 of ``blocks`` basic
    blocks of ``widths`` channels, conv3..conv5 opening with stride 2."""
    epsilon = 1e-5 if config.bn_epsilon is None else float(config.bn_epsilon)
    x = _conv_bn_relu(x, config.stem_width, 3, 2, "conv1_a", epsilon)
    x = _conv_bn_relu(x, config.stem_width, 3, 2, "conv1_b", epsilon)
    outputs = {}
    stages = zip(BACKBONE_LEVELS, config.widths, config.blocks)
    for stage, (level, width, n) in enumerate(stages, start=2):
        for b in range(n):
            stride = 2 if (b == 0 and stage > 2) else 1
            x = _basic_block(x, width, stride, f"conv{stage}_block{b + 1}", epsilon)
        outputs[level] = x
    return outputs
