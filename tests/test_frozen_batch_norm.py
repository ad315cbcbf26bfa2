"""Frozen BatchNorm folded into its convolution: same outputs, gradients and training step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.modeling.backbones import build_backbone
from layer_test import run_layer_test
from fpn_tf.modeling.frozen_batch_norm import Conv2DFrozenBatchNorm, fold_frozen_batch_norm


def _randomise_batch_norms(model, seed=0):
    """Non-trivial statistics, so that a wrong fold cannot pass as identity."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.5, n).astype("float32"))
            layer.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, n).astype("float32"))


def _conv_bn_model(use_bias, strides, padding):
    x = keras.Input((None, None, 5))
    y = keras.layers.Conv2D(7, 3, strides=strides, padding=padding, use_bias=use_bias, name="c")(x)
    bn = keras.layers.BatchNormalization(epsilon=1e-5, name="c_bn")
    bn.trainable = False
    y = keras.layers.ReLU()(bn(y))
    model = keras.Model(x, y)
    _randomise_batch_norms(model)
    if use_bias:
        model.get_layer("c").bias.assign(np.linspace(-1, 1, 7).astype("float32"))
    return model


@pytest.mark.parametrize("use_bias,strides,padding", [(True, 1, "same"), (False, 2, "valid")])
def test_fold_matches_conv_then_frozen_bn_forward_and_backward(use_bias, strides, padding):
    model = _conv_bn_model(use_bias, strides, padding)
    folded, count = fold_frozen_batch_norm(model)
    assert count == 1
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    layer = folded.get_layer("c")
    assert isinstance(layer, Conv2DFrozenBatchNorm)
    assert [v.name for v in layer.trainable_weights] == (
        ["kernel", "bias"] if use_bias else ["kernel"]
    )
    assert sorted(v.name for v in layer.non_trainable_weights) == [
        "beta",
        "gamma",
        "moving_mean",
        "moving_variance",
    ]

    x = tf.constant(np.random.default_rng(1).normal(size=(2, 11, 13, 5)).astype("float32"))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ref, out = model(x), folded(x)
        ref_loss = tf.reduce_sum(ref * ref)
        out_loss = tf.reduce_sum(out * out)
    assert out.shape == ref.shape and float(tf.reduce_max(ref)) > 1.0
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    for a, b in [
        (tape.gradient(ref_loss, x), tape.gradient(out_loss, x)),
        (
            tape.gradient(ref_loss, model.get_layer("c").kernel),
            tape.gradient(out_loss, layer.kernel),
        ),
    ]:
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-4)


def test_trainable_batch_norm_is_not_folded():
    x = keras.Input((8, 8, 3))
    y = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 1)(x))
    _, count = fold_frozen_batch_norm(keras.Model(x, y))
    assert count == 0


def test_folded_small_resnet_equals_unfolded_and_trains_the_same():
    kwargs = dict(type="small_resnet", widths=[8, 16, 24, 32], stem_width=8, freeze_bn=True)
    keras.utils.set_random_seed(0)
    plain = build_backbone(fold_frozen_bn=False, **kwargs)
    _randomise_batch_norms(plain)
    folded, count = fold_frozen_batch_norm(plain)
    assert count == sum(isinstance(l, keras.layers.BatchNormalization) for l in plain.layers) > 10
    # Frozen stages keep frozen kernels; the others train.
    assert not folded.get_layer("conv2_block1_1_conv").trainable
    assert folded.get_layer("conv3_block1_1_conv").trainable
    assert len(folded.trainable_weights) == len(plain.trainable_weights) > 0

    images = tf.constant(np.random.default_rng(2).uniform(0, 255, (2, 64, 96, 3)), tf.float32)
    ref, out = plain(images), folded(images)
    for level in ref:
        np.testing.assert_allclose(out[level].numpy(), ref[level].numpy(), rtol=1e-4, atol=1e-4)

    def sgd_step(model):
        opt = keras.optimizers.SGD(0.1, momentum=0.9)
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_mean(v * v) for v in model(images).values()])
        opt.apply(tape.gradient(loss, model.trainable_weights), model.trainable_weights)
        return {v.path: v.numpy() for v in model.weights}

    before = folded.get_layer("conv5_block1_2_conv").kernel.numpy()
    after_plain, after_folded = sgd_step(plain), sgd_step(folded)
    for name in ("conv5_block1_2_conv/kernel", "conv3_block1_1_conv/kernel"):
        np.testing.assert_allclose(after_folded[name], after_plain[name], rtol=1e-4, atol=1e-4)
    assert float(np.abs(after_folded["conv5_block1_2_conv/kernel"] - before).max()) > 1e-4
    np.testing.assert_array_equal(
        after_folded["conv5_block1_2_conv/moving_mean"],
        folded.get_layer("conv5_block1_2_conv").moving_mean.numpy(),
    )


def test_resnet50_is_folded_by_default_and_matches_keras_applications():
    plain = build_backbone(fold_frozen_bn=False)
    _randomise_batch_norms(plain, seed=3)
    folded, count = fold_frozen_batch_norm(plain)
    assert count == 53  # every conv of ResNet-50 (49 + 4 shortcut convs) has a BatchNorm
    default = build_backbone()
    assert sum(isinstance(l, Conv2DFrozenBatchNorm) for l in default.layers) == 53
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in default.layers)
    images = tf.constant(np.random.default_rng(4).uniform(0, 255, (1, 96, 128, 3)), tf.float32)
    ref, out = plain(images), folded(images)
    for level in ref:
        scale = float(tf.reduce_max(tf.abs(ref[level])))
        np.testing.assert_allclose(
            out[level].numpy(), ref[level].numpy(), rtol=1e-4, atol=1e-5 * scale
        )


def test_folded_backbone_config_and_keras_file_round_trip(tmp_path):
    model = build_backbone(type="small_resnet", widths=[8, 8, 8, 8], stem_width=8)
    layer = model.get_layer("conv3_block1_1_conv")
    assert isinstance(layer, Conv2DFrozenBatchNorm)
    run_layer_test(
        Conv2DFrozenBatchNorm, layer=layer, input_data=tf.zeros((1, 8, 8, layer.kernel.shape[-2]))
    )
    assert Conv2DFrozenBatchNorm.from_config(layer.get_config()).epsilon == 1e-5
    layer.moving_mean.assign(np.full(8, 0.25, "float32"))
    path = str(tmp_path / "backbone.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    images = tf.constant(np.random.default_rng(5).uniform(0, 255, (1, 32, 32, 3)), tf.float32)
    np.testing.assert_allclose(
        loaded(images)["C5"].numpy(), model(images)["C5"].numpy(), rtol=1e-6, atol=1e-6
    )


def test_fold_under_bfloat16_policy_computes_in_bfloat16_close_to_float32():
    x = tf.constant(np.random.default_rng(6).normal(size=(1, 9, 9, 5)).astype("float32"))
    ref = _conv_bn_model(True, 1, "same")
    expected = ref(x).numpy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = _conv_bn_model(True, 1, "same")
        model.set_weights(ref.get_weights())
        folded, _ = fold_frozen_batch_norm(model)
        out = folded(x)
    finally:
        keras.config.set_dtype_policy("float32")
    assert out.dtype == tf.bfloat16
    assert folded.get_layer("c").gamma.dtype == "float32"
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), expected, rtol=0.05, atol=0.05)


def _torchvision_frozen_bn_after_conv(x_nhwc, kernel, gamma, beta, mean, variance, eps):
    """torch's conv2d (same padding, stride 1) then torchvision's ``FrozenBatchNorm2d.forward``
    (ops/misc.py, 0.29): ``scale = w * (rv + eps).rsqrt()``, ``x * scale + (b - rm * scale)``,
    written out in torch (torchvision cannot be imported next to TensorFlow). NHWC float32."""
    import torch

    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
    weight = torch.from_numpy(kernel).permute(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, ...]
    y = torch.nn.functional.conv2d(x, weight, padding=kernel.shape[0] // 2)
    w, b, rm, rv = (torch.from_numpy(v).reshape(1, -1, 1, 1) for v in (gamma, beta, mean, variance))
    scale = w * (rv + eps).rsqrt()
    return (y * scale + (b - rm * scale)).permute(0, 2, 3, 1).numpy()


def test_epsilon_zero_equals_torchvision_frozen_batch_norm_folded_or_not():
    """torchvision runs its COCO_V1 detection weights with FrozenBatchNorm2d eps 0. With
    epsilon 0 the fold and the unfolded frozen BatchNorm compute torchvision's numbers on
    channels of running variance 1e-6..1e-4 (where 1e-5 changes the output by up to 70 %), and a
    channel of variance 0 is non-finite everywhere, as in torchvision (scale = w * rsqrt(0))."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 9, 11, 5)).astype("float32")
    kernel = (rng.normal(size=(3, 3, 5, 6)) * 1e-2).astype("float32")  # small conv outputs
    variance = np.array([1e-6, 3e-6, 1e-5, 1e-4, 1e-2, 0.0], "float32")
    gamma = rng.uniform(0.5, 2.0, 6).astype("float32")
    beta = rng.normal(0, 0.5, 6).astype("float32")
    mean = rng.normal(0, 1e-3, 6).astype("float32")
    theirs = _torchvision_frozen_bn_after_conv(x, kernel, gamma, beta, mean, variance, 0.0)
    finite = slice(0, 5)
    assert np.all(np.isfinite(theirs[..., finite])) and not np.any(np.isfinite(theirs[..., 5]))

    def ours(epsilon):
        inputs = keras.Input((None, None, 5))
        conv = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, name="c")
        bn = keras.layers.BatchNormalization(epsilon=epsilon, name="c_bn")
        bn.trainable = False
        model = keras.Model(inputs, bn(conv(inputs)))
        conv.kernel.assign(kernel)
        bn.set_weights([gamma, beta, mean, variance])
        folded, count = fold_frozen_batch_norm(model)
        assert count == 1 and folded.get_layer("c").epsilon == epsilon
        return model(x).numpy(), folded(x).numpy()

    scale = np.abs(theirs[..., finite]).max(axis=(0, 1, 2))  # per channel
    assert scale.min() > 0.1
    for out in ours(0.0):
        relative = np.abs(out[..., finite] - theirs[..., finite]).max(axis=(0, 1, 2)) / scale
        assert relative.max() < 1e-5, relative
        assert not np.any(np.isfinite(out[..., 5]))
    # The old epsilon on the same weights: a channel moves by 1 - sqrt(v / (v + 1e-5)), 70 % at
    # v = 1e-6, 5e-4 at v = 1e-2.
    for out in ours(1e-5):
        relative = np.abs(out[..., finite] - theirs[..., finite]).max(axis=(0, 1, 2)) / scale
        assert relative[0] > 0.5 and relative[4] < 1e-3, relative


def test_backbones_take_epsilon_zero_and_refuse_a_negative_one():
    kwargs = dict(type="small_resnet", widths=[8, 8, 8, 8], stem_width=8, freeze_bn=True)
    model = build_backbone(bn_epsilon=0.0, **kwargs)
    folded = [layer for layer in model.layers if isinstance(layer, Conv2DFrozenBatchNorm)]
    assert len(folded) > 10 and {layer.epsilon for layer in folded} == {0.0}
    images = tf.constant(np.random.default_rng(8).uniform(0, 255, (1, 32, 32, 3)), tf.float32)
    assert np.all(np.isfinite(model(images)["C5"].numpy()))
    for backbone_type in ("small_resnet", "resnet50"):
        with pytest.raises(
            ValueError, match=r"^Config key 'bn_epsilon' must be >= 0 or null, got -1e-05\.$"
        ):
            build_backbone(type=backbone_type, bn_epsilon=-1e-5)
