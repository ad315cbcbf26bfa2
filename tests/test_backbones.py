"""Bottom-up backbones: C2..C5 strides, preprocessing inside the model, freezing, weight loading."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.modeling.backbones import (
    PixelNormalization,
    build_backbone,
    build_resnet_backbone,
    build_small_resnet_backbone,
)
from fpn_tf.modeling.frozen_batch_norm import Conv2DFrozenBatchNorm

BN_VECTORS = ("gamma", "beta", "moving_mean", "moving_variance")


def _check_strides(outputs, height, width):
    assert sorted(outputs) == ["C2", "C3", "C4", "C5"]
    for name, value in outputs.items():
        stride = 2 ** int(name[1:])
        assert value.shape[1:3] == (math.ceil(height / stride), math.ceil(width / stride)), name


def test_resnet101_endpoints_and_channels():
    backbone = build_resnet_backbone(depth=101)
    out = backbone(tf.zeros((1, 97, 131, 3)))
    _check_strides(out, 97, 131)
    assert [out[k].shape[-1] for k in ("C2", "C3", "C4", "C5")] == [256, 512, 1024, 2048]
    assert backbone.get_layer("conv4_block23_out") is not None


@pytest.mark.parametrize("height,width", [(64, 96), (65, 97)])
def test_small_resnet_strides(height, width):
    backbone = build_small_resnet_backbone(widths=(8, 16, 24, 32), stem_width=8)
    out = backbone(tf.zeros((2, height, width, 3)))
    _check_strides(out, height, width)
    assert [out[k].shape[-1] for k in ("C2", "C3", "C4", "C5")] == [8, 16, 24, 32]


def test_pixel_normalization_caffe_bgr():
    layer = PixelNormalization(mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 2.0), to_bgr=True)
    rgb = np.array([[[[10.0, 20.0, 30.0]]]], "float32")
    np.testing.assert_allclose(layer(rgb).numpy()[0, 0, 0], [30 - 1, 20 - 2, (10 - 3) / 2])
    assert PixelNormalization.from_config(layer.get_config()).get_config() == layer.get_config()


def test_resnet50_frozen_bn_and_stem_stay_frozen_through_a_training_step():
    backbone = build_resnet_backbone(depth=50, freeze_at=2, freeze_bn=True)
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
    backbone = build_resnet_backbone(depth=50, freeze_at=0, freeze_bn=False)
    assert all(l.trainable for l in backbone.layers)
    assert sum(isinstance(l, keras.layers.BatchNormalization) for l in backbone.layers) == 53


def test_resnet_weights_load_from_local_file(tmp_path):
    source = keras.applications.ResNet50(include_top=False, weights=None)
    rng = np.random.default_rng(0)
    kernel = source.get_layer("conv3_block1_1_conv").kernel
    kernel.assign(rng.normal(size=kernel.shape).astype("float32"))
    path = str(tmp_path / "resnet50_notop.weights.h5")
    source.save_weights(path)
    backbone = build_resnet_backbone(depth=50, weights=path)
    loaded = [v for v in backbone.weights if v.path.endswith("conv3_block1_1_conv/kernel")]
    np.testing.assert_array_equal(loaded[0].numpy(), kernel.numpy())


def test_build_backbone_rejects_unknown_names_and_weights_for_small():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_backbone("small_resnet", weights="imagenet")
