"""Bottom-up pathway: backbones that return the paper's C2..C5 (strides 4, 8, 16, 32).

Paper §3: "we use the output of the last residual block of each stage ... {C2, C3, C4, C5} for
conv2, conv3, conv4 and conv5 outputs ... strides of {4, 8, 16, 32} pixels. We do not include conv1
into the pyramid."

Every backbone here is a Functional `keras.Model` that takes RGB pixels in 0..255 (any size) and
returns ``{"C2": ..., "C3": ..., "C4": ..., "C5": ...}``. The normalisation a backbone needs lives
inside the model (`PixelNormalization`), so callers never preprocess.

* ``resnet50`` / ``resnet101``: `keras.applications` ResNets (caffe-style BGR mean subtraction, as
  their ImageNet weights expect). ``weights`` is ``None`` (random), ``"imagenet"`` (downloaded by
  Keras on first use) or a local ``.h5`` / ``.weights.h5`` path. By default BatchNorm is frozen
  (inference statistics, not trained) and the stem + conv2 are frozen (detectron2's ``FREEZE_AT=2``).
  Frozen BatchNorms are folded into the conv before them (`frozen_batch_norm`): same outputs, one
  fused convolution instead of conv + bias + BatchNorm passes. ``stride_in_1x1=False`` builds
  torchvision's variant instead (stride in the 3x3 conv; `fpn_tf.modeling.resnet`), with the same
  layer names and weight shapes.
* ``small_resnet``: a narrow basic-block ResNet for 2-core CPUs (tests, the CPU demo). It is trained
  from scratch, so its BatchNorm normally trains (``freeze_bn=False``).

Every builder also takes ``bn_epsilon`` (every BatchNorm's epsilon; None = the builder's own:
keras.applications' 1.001e-5, small_resnet's 1e-5) and ``channel_order`` / ``pixel_mean`` /
``pixel_std`` (the input normalisation, all three or none; :func:`pixel_normalization`), the
switches that let torchvision's and detectron2's published weights run as they were trained.
"""

from __future__ import annotations

from typing import Sequence

import keras

from fpn_tf.modeling.frozen_batch_norm import fold_frozen_batch_norm
from fpn_tf.modeling.resnet import bottleneck_resnet_v1_5

BACKBONE_LEVELS = ("C2", "C3", "C4", "C5")

# Last block of conv2..conv5 in keras.applications ResNets.
_RESNET_ENDPOINTS = {
    "resnet50": ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
    "resnet101": ("conv2_block3_out", "conv3_block4_out", "conv4_block23_out", "conv5_block3_out"),
}
_RESNET_BUILDERS = {
    "resnet50": keras.applications.ResNet50,
    "resnet101": keras.applications.ResNet101,
}
# Mean of ImageNet in BGR order, used by keras.applications' caffe-mode preprocessing.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
# ImageNet mean and std in RGB order, 0..255 units: torchvision's (0.485, 0.456, 0.406) and
# (0.229, 0.224, 0.225) times 255.
_IMAGENET_RGB_MEAN = (123.675, 116.28, 103.53)
_IMAGENET_RGB_STD = (58.395, 57.12, 57.375)
# Each backbone type's own input normalisation: (channel order the first conv sees, mean, std),
# mean and std in that channel order, 0..255 units; and the name of its normalisation layer.
_DEFAULT_PIXEL_NORMALIZATION = {
    "resnet50": ("bgr", _CAFFE_BGR_MEAN, (1.0, 1.0, 1.0)),
    "resnet101": ("bgr", _CAFFE_BGR_MEAN, (1.0, 1.0, 1.0)),
    "small_resnet": ("rgb", _IMAGENET_RGB_MEAN, _IMAGENET_RGB_STD),
}
_DEFAULT_NORMALIZATION_LAYER = {
    "resnet50": "caffe_preprocess",
    "resnet101": "caffe_preprocess",
    "small_resnet": "imagenet_normalize",
}
CHANNEL_ORDERS = ("rgb", "bgr")


@keras.saving.register_keras_serializable(package="fpn_tf")
class PixelNormalization(keras.layers.Layer):
    """RGB 0..255 in; ``(x[..., order] - mean) / std`` out, as the backbone's weights expect.

    Args:
      mean: per-channel mean, in the *output* channel order.
      std: per-channel standard deviation, in the output channel order.
      to_bgr: reverse the channel order first (caffe-style ResNet weights are BGR).
    """

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
    """``(channel_order, mean, std)`` of a backbone's input normalisation.

    Inputs are RGB 0..255; ``channel_order`` ("rgb" or "bgr") is the order the first conv sees,
    and ``mean`` / ``std`` are in that order, in 0..255 units. All three None = the backbone
    type's own (resnet*: caffe mode, "bgr", (103.939, 116.779, 123.68), std 1; small_resnet:
    "rgb", ImageNet mean (123.675, 116.28, 103.53), std (58.395, 57.12, 57.375)); otherwise all
    three must be given. torchvision: "rgb", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375);
    detectron2's R-50: "bgr", (103.53, 116.28, 123.675), std 1.
    """
    if backbone_type not in _DEFAULT_PIXEL_NORMALIZATION:
        raise ValueError(
            f"unknown backbone type {backbone_type!r}; expected resnet50, resnet101 or small_resnet"
        )
    given = [v is not None for v in (channel_order, pixel_mean, pixel_std)]
    if not any(given):
        return _DEFAULT_PIXEL_NORMALIZATION[backbone_type]
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


def _normalization_layer(backbone_type, channel_order, pixel_mean, pixel_std):
    order, mean, std = pixel_normalization(backbone_type, channel_order, pixel_mean, pixel_std)
    default = channel_order is None and pixel_mean is None and pixel_std is None
    name = _DEFAULT_NORMALIZATION_LAYER[backbone_type] if default else "pixel_normalize"
    return PixelNormalization(mean=mean, std=std, to_bgr=order == "bgr", name=name)


def _check_bn_epsilon(bn_epsilon: float | None) -> None:
    """None or >= 0. 0 is torchvision's COCO_V1 setting (FrozenBatchNorm2d with eps 0, see
    `fpn_tf.configs.experiment.BackboneConfig`): scale = gamma * rsqrt(moving_variance), inf for
    a channel of variance 0, as in torchvision."""
    if bn_epsilon is not None and not bn_epsilon >= 0:
        raise ValueError(f"bn_epsilon must be >= 0, got {bn_epsilon}")


def _set_bn_epsilon(model: keras.Model, bn_epsilon: float | None) -> None:
    """Every BatchNormalization of ``model`` gets ``bn_epsilon`` (None: left as built). Keras
    reads the attribute on every call, and a fold or clone copies it from the layer's config."""
    if bn_epsilon is None:
        return
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.epsilon = float(bn_epsilon)


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


def _freeze(model: keras.Model, freeze_at: int, freeze_bn: bool, stage_prefixes) -> None:
    """Freezes BatchNorm everywhere (if asked) and every layer of stages <= freeze_at."""
    frozen_prefixes = tuple(p for stage, p in stage_prefixes if stage <= freeze_at)
    for layer in model.layers:
        if freeze_bn and isinstance(layer, keras.layers.BatchNormalization):
            # In Keras 3 a non-trainable BatchNormalization runs in inference mode: its moving
            # statistics are used and never updated, and gamma/beta get no gradient.
            layer.trainable = False
        if frozen_prefixes and layer.name.startswith(frozen_prefixes):
            layer.trainable = False


def build_resnet_backbone(
    depth: int = 50,
    weights: str | None = None,
    freeze_at: int = 2,
    freeze_bn: bool = True,
    input_shape: Sequence[int | None] = (None, None, 3),
    name: str | None = None,
    fold_frozen_bn: bool = True,
    stride_in_1x1: bool = True,
    bn_epsilon: float | None = None,
    channel_order: str | None = None,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
) -> keras.Model:
    """A ResNet-50/101 as image -> {"C2".."C5"}.

    Args:
      depth: 50 or 101.
      weights: None (random), "imagenet", or a local path to a Keras weights file.
      freeze_at: freeze the stem (1) and stages conv2..conv{freeze_at}; 0 trains everything.
      freeze_bn: keep every BatchNorm in inference mode and not trainable.
      input_shape: HxWx3 (None for any size).
      fold_frozen_bn: with ``freeze_bn``, compute each conv + frozen BatchNorm pair as one
        convolution (`Conv2DFrozenBatchNorm`: same outputs up to float rounding, faster).
        The weights are loaded first, into the unfolded layers, then folded.
      stride_in_1x1: where a block's stride 2 goes: True = the first 1x1 conv (keras.applications,
        MSRA, detectron2's R-50); False = the 3x3 conv (torchvision's ResNet-50), built by
        `fpn_tf.modeling.resnet` with keras.applications' layer names and weight shapes. Its
        weights are a local file (keras.applications' ImageNet weights are stride-in-1x1).
      bn_epsilon: every BatchNorm's epsilon; None = keras.applications' 1.001e-5.
      channel_order, pixel_mean, pixel_std: the input normalisation (:func:`pixel_normalization`);
        None = caffe mode (BGR, ImageNet mean, std 1), as keras.applications' weights expect.
    """
    key = f"resnet{depth}"
    if key not in _RESNET_BUILDERS:
        raise ValueError(f"ResNet depth must be 50 or 101, got {depth}")
    if freeze_at not in range(0, 6):
        raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
    _check_bn_epsilon(bn_epsilon)
    if not stride_in_1x1 and weights == "imagenet":
        raise ValueError(
            "weights='imagenet' are keras.applications' ResNet weights, which put the stride in "
            "the 1x1 conv (stride_in_1x1=True); with stride_in_1x1=False give a local weights "
            "file (e.g. converted from torchvision) or None"
        )
    images = keras.Input(shape=tuple(input_shape), name="images")
    x = _normalization_layer(key, channel_order, pixel_mean, pixel_std)(images)
    stages = [(1, "conv1_"), (1, "pool1_")] + [(s, f"conv{s}_") for s in range(2, 6)]
    if stride_in_1x1:
        resnet = _RESNET_BUILDERS[key](include_top=False, weights=weights, input_tensor=x)
        _set_bn_epsilon(resnet, bn_epsilon)
        _freeze(resnet, freeze_at, freeze_bn, stages)
        outputs = {
            level: resnet.get_layer(layer_name).output
            for level, layer_name in zip(BACKBONE_LEVELS, _RESNET_ENDPOINTS[key])
        }
        model = keras.Model(images, outputs, name=name or key)
    else:
        outputs = bottleneck_resnet_v1_5(x, depth=depth, bn_epsilon=bn_epsilon)
        model = keras.Model(images, outputs, name=name or key)
        if weights is not None:
            model.load_weights(weights)
        _freeze(model, freeze_at, freeze_bn, stages)
    return _maybe_fold(model, freeze_bn and fold_frozen_bn)


def _maybe_fold(model: keras.Model, fold: bool) -> keras.Model:
    if not fold:
        return model
    folded, _ = fold_frozen_batch_norm(model)
    return folded


def _conv_bn_relu(x, filters, kernel, stride, name, relu=True, epsilon=1e-5):
    x = keras.layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(epsilon=epsilon, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _basic_block(x, filters, stride, name, epsilon=1e-5):
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn_relu(x, filters, 1, stride, f"{name}_0", relu=False, epsilon=epsilon)
    y = _conv_bn_relu(x, filters, 3, stride, f"{name}_1", epsilon=epsilon)
    y = _conv_bn_relu(y, filters, 3, 1, f"{name}_2", relu=False, epsilon=epsilon)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def build_small_resnet_backbone(
    widths: Sequence[int] = (32, 64, 128, 256),
    blocks: Sequence[int] = (1, 1, 1, 1),
    stem_width: int = 32,
    freeze_at: int = 0,
    freeze_bn: bool = False,
    input_shape: Sequence[int | None] = (None, None, 3),
    name: str = "small_resnet",
    fold_frozen_bn: bool = True,
    bn_epsilon: float | None = None,
    channel_order: str | None = None,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
) -> keras.Model:
    """A narrow basic-block ResNet (ResNet-18 shape, fewer channels) for CPUs: image -> C2..C5.

    Stem: 3x3/2 conv then 3x3/2 conv (stride 4), then four stages of basic blocks with
    ``widths`` channels; stages 3..5 start with stride 2. Same ``ceil(H / 2**l)`` sizes as ResNet.
    With ``freeze_bn`` and ``fold_frozen_bn`` the frozen BatchNorms are folded into their convs.
    ``bn_epsilon``: every BatchNorm's (None = 1e-5); ``channel_order`` / ``pixel_mean`` /
    ``pixel_std``: the input normalisation (None = RGB, ImageNet mean and std).
    """
    if len(widths) != 4 or len(blocks) != 4:
        raise ValueError(f"widths and blocks need 4 entries (conv2..conv5), got {widths}, {blocks}")
    _check_bn_epsilon(bn_epsilon)
    epsilon = 1e-5 if bn_epsilon is None else float(bn_epsilon)
    images = keras.Input(shape=tuple(input_shape), name="images")
    x = _normalization_layer("small_resnet", channel_order, pixel_mean, pixel_std)(images)
    x = _conv_bn_relu(x, stem_width, 3, 2, "conv1_a", epsilon=epsilon)
    x = _conv_bn_relu(x, stem_width, 3, 2, "conv1_b", epsilon=epsilon)
    outputs = {}
    for i, (level, width, n) in enumerate(zip(BACKBONE_LEVELS, widths, blocks)):
        stage = i + 2
        for b in range(n):
            stride = 2 if (b == 0 and stage > 2) else 1
            x = _basic_block(x, width, stride, f"conv{stage}_block{b + 1}", epsilon=epsilon)
        outputs[level] = x
    model = keras.Model(images, outputs, name=name)
    _freeze(model, freeze_at, freeze_bn, [(1, "conv1_")] + [(s, f"conv{s}_") for s in range(2, 6)])
    return _maybe_fold(model, freeze_bn and fold_frozen_bn)


def build_backbone(backbone_type: str = "resnet50", **kwargs) -> keras.Model:
    """Builds a backbone by name: "resnet50", "resnet101" or "small_resnet"."""
    if backbone_type in ("resnet50", "resnet101"):
        return build_resnet_backbone(depth=int(backbone_type[len("resnet") :]), **kwargs)
    if backbone_type == "small_resnet":
        if kwargs.pop("weights", None) is not None:
            raise ValueError("small_resnet has no pretrained weights; set backbone.weights to null")
        if not kwargs.pop("stride_in_1x1", True):
            raise ValueError(
                "stride_in_1x1=False is for resnet50/resnet101 (small_resnet has no 1x1)"
            )
        return build_small_resnet_backbone(**kwargs)
    raise ValueError(
        f"unknown backbone type {backbone_type!r}; expected resnet50, resnet101 or small_resnet"
    )
