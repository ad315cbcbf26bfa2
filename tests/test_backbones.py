"""Bottom-up backbones: C2..C5 strides, preprocessing inside the model, freezing, weight loading."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.configs.experiment import BackboneConfig
from layer_test import run_layer_test
from fpn_tf.modeling.backbones import (
    PixelNormalization,
    build_backbone,
    pixel_mean_rgb,
    pixel_normalization,
)
from fpn_tf.modeling.frozen_batch_norm import Conv2DFrozenBatchNorm, fold_frozen_batch_norm

BN_VECTORS = ("gamma", "beta", "moving_mean", "moving_variance")
# small_resnet as the CPU demo trains it: nothing frozen.
SMALL = dict(type="small_resnet", freeze_at=0, freeze_bn=False)


def _check_strides(outputs, height, width):
    assert sorted(outputs) == ["C2", "C3", "C4", "C5"]
    for name, value in outputs.items():
        stride = 2 ** int(name[1:])
        assert value.shape[1:3] == (math.ceil(height / stride), math.ceil(width / stride)), name


def test_resnet101_endpoints_and_channels():
    backbone = build_backbone(type="resnet101")
    out = backbone(tf.zeros((1, 97, 131, 3)))
    _check_strides(out, 97, 131)
    assert [out[k].shape[-1] for k in ("C2", "C3", "C4", "C5")] == [256, 512, 1024, 2048]
    assert backbone.get_layer("conv4_block23_out") is not None


@pytest.mark.parametrize("height,width", [(64, 96), (65, 97)])
def test_small_resnet_strides(height, width):
    backbone = build_backbone(**SMALL, widths=[8, 16, 24, 32], stem_width=8)
    out = backbone(tf.zeros((2, height, width, 3)))
    _check_strides(out, height, width)
    assert [out[k].shape[-1] for k in ("C2", "C3", "C4", "C5")] == [8, 16, 24, 32]


def test_pixel_normalization_caffe_bgr():
    rgb = np.array([[[[10.0, 20.0, 30.0]]]], "float32")
    _, out = run_layer_test(
        PixelNormalization, dict(mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 2.0), to_bgr=True), rgb
    )
    np.testing.assert_allclose(out.numpy()[0, 0, 0], [30 - 1, 20 - 2, (10 - 3) / 2])


def test_resnet50_frozen_bn_and_stem_stay_frozen_through_a_training_step():
    backbone = build_backbone(freeze_at=2, freeze_bn=True)
    # Frozen BatchNorms are folded into their convs; their vectors are never trainable.
    folded = [l for l in backbone.layers if isinstance(l, Conv2DFrozenBatchNorm)]
    assert len(folded) == 53
    assert all(w.name not in BN_VECTORS for w in backbone.trainable_weights)
    x = keras.Input((64, 64, 3))
    feats = backbone(x)
    y = keras.layers.GlobalAveragePooling2D()(feats["C5"])
    model = keras.Model(x, keras.layers.Dense(1)(y))
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    snapshot = {v.path: v.numpy().copy() for v in backbone.weights}
    rng = np.random.default_rng(0)
    model.fit(
        rng.uniform(0, 255, (4, 64, 64, 3)).astype("float32"),
        rng.normal(size=(4, 1)).astype("float32") * 10,
        epochs=1,
        batch_size=4,
        verbose=0,
    )
    after = {v.path: v.numpy() for v in backbone.weights}
    bn_vars = [p for p in snapshot if p.split("/")[-1] in BN_VECTORS]
    assert any("moving_mean" in p for p in bn_vars) and any("gamma" in p for p in bn_vars)
    for p in bn_vars:
        np.testing.assert_array_equal(after[p], snapshot[p], err_msg=p)
    frozen_stages = [p for p in snapshot if p.split("/")[-2].startswith(("conv1_", "conv2_"))]
    assert any(p.endswith("conv2_block3_3_conv/kernel") for p in frozen_stages)
    for p in frozen_stages:
        np.testing.assert_array_equal(after[p], snapshot[p], err_msg=p)
    trained = [p for p in snapshot if "conv5_block3_3_conv/kernel" in p]
    assert trained and not np.array_equal(after[trained[0]], snapshot[trained[0]])


def test_resnet_trainable_bn_when_not_frozen():
    backbone = build_backbone(freeze_at=0, freeze_bn=False)
    assert all(l.trainable for l in backbone.layers)
    assert sum(isinstance(l, keras.layers.BatchNormalization) for l in backbone.layers) == 53


def test_resnet_weights_load_from_local_file(tmp_path):
    source = keras.applications.ResNet50(include_top=False, weights=None)
    rng = np.random.default_rng(0)
    kernel = source.get_layer("conv3_block1_1_conv").kernel
    kernel.assign(rng.normal(size=kernel.shape).astype("float32"))
    path = str(tmp_path / "resnet50_notop.weights.h5")
    source.save_weights(path)
    backbone = build_backbone(weights=path)
    loaded = [v for v in backbone.weights if v.path.endswith("conv3_block1_1_conv/kernel")]
    np.testing.assert_array_equal(loaded[0].numpy(), kernel.numpy())


def test_build_backbone_rejects_unknown_names_and_weights_for_small():
    with pytest.raises(ValueError, match="'type' must be one of"):
        build_backbone(type="vgg16")
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_backbone(type="small_resnet", weights="imagenet")
    with pytest.raises(ValueError, match="Unknown config key 'depth'"):
        build_backbone(depth=50)


# --- torchvision / detectron2 switches: stride in the 3x3, BatchNorm epsilon, normalisation ---

TORCHVISION_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255
TORCHVISION_STD = (58.395, 57.12, 57.375)
DETECTRON2_BGR_MEAN = (103.53, 116.28, 123.675)


def _randomise_weights(model, seed=0):
    """Every conv kernel and bias and every BatchNorm vector random (moderate BN statistics, so
    activations neither vanish nor explode over 16 blocks)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.6, 1.2, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, n).astype("float32"))
            layer.moving_mean.assign(rng.normal(0, 0.2, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
        elif isinstance(layer, keras.layers.Conv2D):
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape).astype("float32"))


def _torch_conv(x, layer, stride, padding):
    """torch.nn.Conv2d semantics: ``padding`` zeros on every side, then a 'valid' conv."""
    kernel, bias = (w.numpy() for w in layer.weights)
    x = tf.pad(x, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    return tf.nn.conv2d(x, kernel, stride, "VALID") + bias


def _frozen_bn(x, layer, epsilon):
    gamma, beta, mean, variance = (w.numpy() for w in layer.weights)
    return (x - mean) / np.sqrt(variance + epsilon) * gamma + beta


def _torchvision_resnet50_reference(model, images, epsilon):
    """C2..C5 of torchvision's ResNet-50 (Bottleneck: stride in conv2, the 3x3; symmetric
    padding; stem max-pool padded with -inf) written with tf.nn on ``model``'s weights, read by
    layer name; inputs normalised as torchvision's GeneralizedRCNNTransform."""
    get = model.get_layer
    x = (images / 255.0 - np.array(TORCHVISION_MEAN) / 255.0) / (np.array(TORCHVISION_STD) / 255.0)
    x = tf.constant(x, tf.float32)
    x = tf.nn.relu(_frozen_bn(_torch_conv(x, get("conv1_conv"), 2, 3), get("conv1_bn"), epsilon))
    x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=-np.inf)
    x = tf.nn.max_pool2d(x, 3, 2, "VALID")
    outputs = {}
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for b in range(1, blocks + 1):
            name = f"conv{stage}_block{b}"
            stride = 2 if (b == 1 and stage > 2) else 1

            def conv_bn(y, i, s, pad):
                return _frozen_bn(
                    _torch_conv(y, get(f"{name}_{i}_conv"), s, pad), get(f"{name}_{i}_bn"), epsilon
                )

            identity = conv_bn(x, 0, stride, 0) if b == 1 else x
            y = tf.nn.relu(conv_bn(x, 1, 1, 0))
            y = tf.nn.relu(conv_bn(y, 2, stride, 1))
            x = tf.nn.relu(conv_bn(y, 3, 1, 0) + identity)
        outputs[f"C{stage}"] = x.numpy()
    return outputs


@pytest.fixture(scope="module")
def torchvision_style_resnet50():
    """Our stride-in-3x3 ResNet-50 with torchvision's epsilon and normalisation, random weights."""
    keras.utils.set_random_seed(0)
    model = build_backbone(
        stride_in_1x1=False,
        bn_epsilon=1e-5,
        channel_order="rgb",
        pixel_mean=TORCHVISION_MEAN,
        pixel_std=TORCHVISION_STD,
        fold_frozen_bn=False,
    )
    _randomise_weights(model)
    return model


@pytest.mark.parametrize("height,width", [(64, 96), (65, 97)])
def test_stride_in_3x3_resnet50_equals_torchvision_bottlenecks(
    torchvision_style_resnet50, height, width
):
    """Even sizes are where Keras 'same' (0 before, 1 after for stride 2) and torch's symmetric
    padding sample different pixels; odd sizes check the ceil(H / 2) sizes of every stage."""
    model = torchvision_style_resnet50
    images = np.random.default_rng(1).uniform(0, 255, (2, height, width, 3)).astype("float32")
    reference = _torchvision_resnet50_reference(model, images, epsilon=1e-5)
    folded, count = fold_frozen_batch_norm(model)
    assert count == 53
    for candidate in (model, folded):
        out = candidate(images)
        _check_strides(out, height, width)
        for level, expected in reference.items():
            scale = np.abs(expected).max()
            assert scale > 1e-2, level  # not all dead
            np.testing.assert_allclose(
                out[level].numpy(), expected, rtol=1e-4, atol=1e-4 * scale, err_msg=level
            )


def test_stride_in_1x1_stays_keras_applications_and_its_outputs(
    torchvision_style_resnet50, tmp_path, monkeypatch
):
    from fpn_tf.modeling import backbones

    # stride_in_1x1=True (the default) never builds our own ResNet ...
    def not_ours(*args, **kwargs):
        raise AssertionError("stride_in_1x1=True must use keras.applications")

    monkeypatch.setattr(backbones, "bottleneck_resnet_v1_5", not_ours)
    default = build_backbone(fold_frozen_bn=False)
    monkeypatch.undo()
    ours = torchvision_style_resnet50
    # ... and the two differ only in where conv3..conv5's first block strides.
    for stage in (3, 4, 5):
        block = f"conv{stage}_block1"
        assert default.get_layer(f"{block}_1_conv").strides == (2, 2)
        assert default.get_layer(f"{block}_2_conv").strides == (1, 1)
        assert ours.get_layer(f"{block}_1_conv").strides == (1, 1)
        assert ours.get_layer(f"{block}_2_conv").strides == (2, 2)
        assert ours.get_layer(f"{block}_2_conv").padding == "valid"
        assert ours.get_layer(f"{block}_2_pad").padding == ((1, 1), (1, 1))
    assert not any(l.name.endswith("_2_pad") for l in default.layers)
    assert default.get_layer("caffe_preprocess").get_config()["to_bgr"]

    # Today's outputs: keras.applications' ResNet50 on caffe-preprocessed pixels, same weights.
    source = keras.applications.ResNet50(include_top=False, weights=None)
    _randomise_weights(source, seed=3)
    path = str(tmp_path / "r50.weights.h5")
    source.save_weights(path)
    default.load_weights(path)
    images = np.random.default_rng(2).uniform(0, 255, (1, 64, 96, 3)).astype("float32")
    expected = source(keras.applications.resnet.preprocess_input(images.copy())).numpy()
    np.testing.assert_allclose(default(images)["C5"].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_stride_in_3x3_has_keras_applications_names_shapes_and_weight_files(tmp_path):
    from keras.src.legacy.saving import legacy_h5_format
    import h5py

    source = keras.applications.ResNet50(include_top=False, weights=None)
    _randomise_weights(source, seed=4)
    ours = build_backbone(stride_in_1x1=False, fold_frozen_bn=False)

    def weighted(model):
        return [(l.name, [tuple(w.shape) for w in l.weights]) for l in model.layers if l.weights]

    assert weighted(ours) == weighted(source)  # names, shapes and order
    bns = [l for l in ours.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 53 and {l.epsilon for l in bns} == {1.001e-5}  # keras.applications'
    expected = {l.name: [w.numpy() for w in l.weights] for l in source.layers if l.weights}
    new_path = str(tmp_path / "r50.weights.h5")
    source.save_weights(new_path)
    legacy_path = str(tmp_path / "r50.h5")  # the format keras.applications downloads
    with h5py.File(legacy_path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    for path, fold in ((new_path, True), (legacy_path, False)):
        loaded = build_backbone(stride_in_1x1=False, weights=path, fold_frozen_bn=fold)
        names = {l.name for l in loaded.layers}
        for name, values in expected.items():
            if name in names:
                got = [w.numpy() for w in loaded.get_layer(name).weights][: len(values)]
            else:  # a BatchNorm folded into its conv
                conv = loaded.get_layer(name[: -len("bn")] + "conv")
                got = [getattr(conv, v).numpy() for v in BN_VECTORS]
            assert len(got) == len(values)
            for a, b in zip(got, values):
                np.testing.assert_array_equal(a, b, err_msg=f"{path} {name}")
    with pytest.raises(ValueError, match="stride_in_1x1"):
        build_backbone(stride_in_1x1=False, weights="imagenet")


@pytest.mark.parametrize(
    "freeze_at,freeze_bn,fold", [(2, True, True), (3, True, False), (0, False, True)]
)
def test_stride_in_3x3_freezes_and_folds_as_keras_applications(freeze_at, freeze_bn, fold):
    args = dict(freeze_at=freeze_at, freeze_bn=freeze_bn, fold_frozen_bn=fold)
    theirs = build_backbone(**args)
    ours = build_backbone(stride_in_1x1=False, **args)

    def flags(model):
        return [(l.name, type(l).__name__, l.trainable) for l in model.layers if l.weights]

    assert flags(ours) == flags(theirs)
    assert [v.path for v in ours.trainable_weights] == [v.path for v in theirs.trainable_weights]
    folded = sum(isinstance(l, Conv2DFrozenBatchNorm) for l in ours.layers)
    assert folded == (53 if freeze_bn and fold else 0)


@pytest.mark.parametrize(
    "build,count",
    [
        (lambda **kw: build_backbone(**kw), 53),
        (lambda **kw: build_backbone(stride_in_1x1=False, **kw), 53),
        (lambda **kw: build_backbone(**SMALL, widths=[8, 8, 16, 16], stem_width=8, **kw), 13),
        (
            lambda **kw: build_backbone(
                type="small_resnet", widths=[8, 8, 16, 16], stem_width=8, freeze_bn=True, **kw
            ),
            13,
        ),
    ],
    ids=["keras_folded", "stride_in_3x3_folded", "small", "small_folded"],
)
def test_bn_epsilon_reaches_every_batch_norm_and_folded_conv(build, count):
    normalizations = (keras.layers.BatchNormalization, Conv2DFrozenBatchNorm)
    layers = [l for l in build(bn_epsilon=0.25).layers if isinstance(l, normalizations)]
    assert len(layers) == count
    assert [l.epsilon for l in layers] == [0.25] * count


def test_small_resnet_bn_epsilon_default():
    backbone = build_backbone(**SMALL, widths=[8, 8, 8, 8], stem_width=8)
    bns = [l for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and {l.epsilon for l in bns} == {1e-5}


def test_bn_epsilon_changes_the_outputs_as_epsilon_does():
    """Same weights, epsilon 0.25 and variances lowered by (0.25 - 1.001e-5): the same outputs,
    unfolded and folded (a stray epsilon anywhere breaks the equality)."""
    reference = build_backbone(fold_frozen_bn=False)
    _randomise_weights(reference, seed=5)
    changed = build_backbone(fold_frozen_bn=False, bn_epsilon=0.25)
    changed.set_weights(reference.get_weights())
    images = np.random.default_rng(6).uniform(0, 255, (1, 32, 48, 3)).astype("float32")
    expected = reference(images)["C5"].numpy()
    assert not np.allclose(changed(images)["C5"].numpy(), expected, atol=1e-2)  # it matters
    for layer in changed.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_variance.assign(layer.moving_variance - (0.25 - 1.001e-5))
    folded, _ = fold_frozen_batch_norm(changed)
    for model in (changed, folded):
        np.testing.assert_allclose(model(images)["C5"].numpy(), expected, rtol=1e-4, atol=1e-4)


def _normalized_input(backbone, images):
    """What the first conv sees: the output of the backbone's PixelNormalization layer."""
    layer = next(l for l in backbone.layers if isinstance(l, PixelNormalization))
    return keras.Model(backbone.input, layer.output)(images).numpy()


def test_pixel_normalization_defaults_and_validation():
    assert pixel_normalization("resnet50") == ("bgr", (103.939, 116.779, 123.68), (1.0, 1.0, 1.0))
    assert pixel_normalization("small_resnet") == ("rgb", TORCHVISION_MEAN, TORCHVISION_STD)
    assert pixel_normalization("resnet101", "bgr", DETECTRON2_BGR_MEAN, [1, 1, 1]) == (
        "bgr",
        DETECTRON2_BGR_MEAN,
        (1.0, 1.0, 1.0),
    )
    assert pixel_mean_rgb("bgr", DETECTRON2_BGR_MEAN) == (123.675, 116.28, 103.53)
    assert pixel_mean_rgb("rgb", TORCHVISION_MEAN) == TORCHVISION_MEAN
    with pytest.raises(ValueError, match="all three or none"):
        pixel_normalization("resnet50", "rgb", TORCHVISION_MEAN)
    with pytest.raises(ValueError, match="channel_order"):
        pixel_normalization("resnet50", "grb", TORCHVISION_MEAN, TORCHVISION_STD)
    with pytest.raises(ValueError, match="positive"):
        pixel_normalization("resnet50", "rgb", TORCHVISION_MEAN, (1, 0, 1))


def test_backbones_normalise_their_input_as_configured():
    rgb = np.random.default_rng(7).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    small = dict(type="small_resnet", widths=[8, 8, 8, 8], stem_width=8)
    cases = [
        # default resnet50: keras.applications' caffe mode, as its ImageNet weights expect
        (BackboneConfig(), keras.applications.resnet.preprocess_input(rgb.copy())),
        # detectron2's R-50: BGR, mean given in BGR order, std 1
        (
            BackboneConfig(
                **small,
                channel_order="bgr",
                pixel_mean=list(DETECTRON2_BGR_MEAN),
                pixel_std=[1, 1, 1],
            ),
            rgb[..., ::-1] - np.array(DETECTRON2_BGR_MEAN),
        ),
        # default small_resnet: RGB ImageNet mean / std
        (
            BackboneConfig(**small),
            (rgb - np.array(TORCHVISION_MEAN)) / np.array(TORCHVISION_STD),
        ),
        # torchvision: x / 255, then (x - mean) / std with mean, std in 0..1 units
        (
            BackboneConfig(
                **small,
                channel_order="rgb",
                pixel_mean=list(TORCHVISION_MEAN),
                pixel_std=list(TORCHVISION_STD),
            ),
            (rgb / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
        ),
    ]
    for cfg, expected in cases:
        got = _normalized_input(build_backbone(cfg), rgb)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4, err_msg=str(cfg))

    # torchvision's whole backbone section reaches the builder.
    torchvision = BackboneConfig(
        weights=None,
        stride_in_1x1=False,
        bn_epsilon=1e-5,
        channel_order="rgb",
        pixel_mean=list(TORCHVISION_MEAN),
        pixel_std=list(TORCHVISION_STD),
        pad_normalized_zero=True,
    )
    backbone = build_backbone(torchvision)
    assert backbone.get_layer("conv3_block1_2_conv").strides == (2, 2)
    folded = [l for l in backbone.layers if isinstance(l, Conv2DFrozenBatchNorm)]
    assert len(folded) == 53 and {l.epsilon for l in folded} == {1e-5}
    np.testing.assert_allclose(_normalized_input(backbone, rgb), cases[-1][1], rtol=1e-5, atol=1e-4)
