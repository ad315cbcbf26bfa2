"""The pyramid: shapes, values against a NumPy reference, ablation switches, Functional reuse."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.modeling.backbones import build_backbone
from layer_test import run_layer_test
from fpn_tf.modeling.fpn import FeaturePyramid, build_fpn_model, upsample_nearest_to


def _np_conv(x, kernel, bias):
    """'same' convolution, stride 1, of x [H,W,Cin] with kernel [k,k,Cin,Cout] (cross-correlation)."""
    k = kernel.shape[0]
    pad = k // 2
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[:2]
    out = np.zeros((h, w, kernel.shape[-1]), np.float64)
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("hwc,cd->hwd", xp[dy : dy + h, dx : dx + w], kernel[dy, dx])
    return out + bias


def _np_upsample_to(x, h, w):
    rows = np.arange(h) // 2
    cols = np.arange(w) // 2
    return x[rows][:, cols]


def _np_pyramid(layer, c_maps, use_top_down=True, use_lateral=True):
    """The paper's formula written out directly with the layer's weights (single image)."""
    w = {v.path.split("/")[-2] + "/" + v.path.split("/")[-1]: v.numpy() for v in layer.weights}
    conv = lambda name, x: _np_conv(x, w[f"{name}/kernel"], w[f"{name}/bias"])
    merged = {5: conv("lateral_P5", c_maps[5])}
    for lvl in (4, 3, 2):
        h, wd = c_maps[lvl].shape[:2]
        if not use_top_down:
            merged[lvl] = conv(f"lateral_P{lvl}", c_maps[lvl])
        elif not use_lateral:
            merged[lvl] = _np_upsample_to(merged[lvl + 1], h, wd)
        else:
            merged[lvl] = _np_upsample_to(merged[lvl + 1], h, wd) + conv(
                f"lateral_P{lvl}", c_maps[lvl]
            )
    out = {f"P{l}": conv(f"output_P{l}", merged[l]) for l in (2, 3, 4, 5)}
    out["P6"] = out["P5"][::2, ::2]
    return out


def _random_c_maps(rng, sizes=((13, 17), (7, 9), (4, 5), (2, 3)), channels=(3, 5, 6, 8)):
    return {
        lvl: rng.normal(size=(h, w, c)).astype("float32")
        for lvl, (h, w), c in zip((2, 3, 4, 5), sizes, channels)
    }


def test_upsample_nearest_crops_to_odd_sizes():
    x = tf.reshape(tf.range(6, dtype=tf.float32), (1, 2, 3, 1))
    like = tf.zeros((1, 3, 5, 1))
    up = upsample_nearest_to(x, like)[0, :, :, 0].numpy()
    np.testing.assert_array_equal(up, [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]])


def test_upsample_nearest_exact_and_dynamic_sizes_agree_with_numpy():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype("float32")
    expected = x.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_array_equal(upsample_nearest_to(x, tf.zeros((2, 6, 8, 5))), expected)
    dynamic = tf.function(
        upsample_nearest_to,
        input_signature=[
            tf.TensorSpec((None, None, None, 5)),
            tf.TensorSpec((None, None, None, 5)),
        ],
    )
    np.testing.assert_array_equal(dynamic(x, tf.zeros((2, 6, 8, 5))), expected)
    np.testing.assert_array_equal(dynamic(x, tf.zeros((2, 5, 7, 5))), expected[:, :5, :7])


@pytest.mark.parametrize("use_top_down,use_lateral", [(True, True), (False, True), (True, False)])
def test_pyramid_values_match_numpy_formula(use_top_down, use_lateral):
    rng = np.random.default_rng(1)
    c_maps = _random_c_maps(rng)
    layer = FeaturePyramid(
        num_channels=4,
        use_top_down=use_top_down,
        use_lateral=use_lateral,
        kernel_initializer=keras.initializers.RandomNormal(seed=3),
    )
    out = layer({f"C{l}": c[None] for l, c in c_maps.items()})
    # Random non-zero biases so that the bias terms are checked too.
    for v in layer.weights:
        if v.path.endswith("bias"):
            v.assign(rng.normal(size=v.shape).astype("float32"))
    out = layer({f"C{l}": c[None] for l, c in c_maps.items()})
    expected = _np_pyramid(layer, c_maps, use_top_down, use_lateral)
    assert sorted(out) == ["P2", "P3", "P4", "P5", "P6"]
    for name, value in expected.items():
        assert out[name].shape[1:] == value.shape, name
        np.testing.assert_allclose(out[name][0].numpy(), value, rtol=1e-4, atol=1e-4, err_msg=name)
    laterals = {v.path.split("/")[-2] for v in layer.weights if "lateral" in v.path}
    assert laterals == (
        {"lateral_P5"}
        if not use_lateral
        else {"lateral_P2", "lateral_P3", "lateral_P4", "lateral_P5"}
    )


def test_pyramid_accepts_list_and_subset_of_levels():
    rng = np.random.default_rng(2)
    c_maps = _random_c_maps(rng)
    full = FeaturePyramid(num_channels=4)
    subset = FeaturePyramid(num_channels=4, output_levels=["P2"])
    full_out = full([c_maps[l][None] for l in (2, 3, 4, 5)])
    subset([c_maps[l][None] for l in (2, 3, 4, 5)])
    subset.set_weights(full.get_weights())
    sub_out = subset([c_maps[l][None] for l in (2, 3, 4, 5)])
    assert list(sub_out) == ["P2"]
    np.testing.assert_allclose(sub_out["P2"].numpy(), full_out["P2"].numpy(), rtol=1e-6)
    assert subset.strides == {"P2": 4}


def test_pyramid_has_no_activation_or_normalization():
    layer = FeaturePyramid(num_channels=4)
    layer({f"C{l}": tf.zeros((1, 2 ** (6 - l), 2 ** (6 - l), 3)) for l in (2, 3, 4, 5)})
    kinds = {type(sub).__name__ for sub in layer._flatten_layers(include_self=False)}
    assert kinds == {"Conv2D", "MaxPooling2D"}
    assert all(
        sub.activation.__name__ == "linear"
        for sub in layer._flatten_layers(include_self=False)
        if hasattr(sub, "activation")
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(min_level=3, max_level=2), "min_level"),
        (dict(use_top_down=False, use_lateral=False), "lateral"),
        (dict(output_levels=["P7"]), "P7"),
    ],
)
def test_pyramid_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeaturePyramid(**kwargs)


def test_pyramid_names_missing_inputs():
    layer = FeaturePyramid(num_channels=4)
    with pytest.raises(ValueError, match="C2"):
        layer(
            {
                "C3": tf.zeros((1, 4, 4, 3)),
                "C4": tf.zeros((1, 2, 2, 3)),
                "C5": tf.zeros((1, 1, 1, 3)),
            }
        )


def test_pyramid_get_config_round_trip():
    features = {
        f"C{l}": tf.random.normal((1, 64 // 2**l, 64 // 2**l, 4), seed=l) for l in range(2, 6)
    }
    run_layer_test(
        FeaturePyramid,
        dict(num_channels=8, use_lateral=False, output_levels=["P3", "P4"], name="fp"),
        features,
    )


@pytest.fixture(scope="module")
def resnet50_fpn():
    return build_fpn_model(build_backbone(type="resnet50"), num_channels=256)


@pytest.mark.parametrize("height,width", [(800, 1333), (257, 391)])
def test_resnet50_fpn_strides_and_shapes(resnet50_fpn, height, width):
    out = resnet50_fpn(tf.zeros((1, height, width, 3)))
    assert sorted(out) == ["P2", "P3", "P4", "P5", "P6"]
    for name, value in out.items():
        stride = 2 ** int(name[1:])
        assert tuple(value.shape) == (1, math.ceil(height / stride), math.ceil(width / stride), 256)


def test_fpn_model_functional_reuse_trains_and_round_trips(tmp_path):
    backbone = build_backbone(
        type="small_resnet", freeze_at=0, freeze_bn=False, widths=[8, 16, 16, 32], stem_width=8
    )
    fpn = build_fpn_model(backbone, num_channels=16)
    x = keras.Input((64, 96, 3))
    feats = fpn(x)
    y = keras.layers.Conv2D(2, 1, name="my_head")(feats["P3"])
    model = keras.Model(x, y)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(2, 64, 96, 3)).astype("float32")
    targets = rng.normal(size=(2, 8, 12, 2)).astype("float32")
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(images, targets, epochs=1, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    changed = [not np.allclose(b, w.numpy()) for b, w in zip(before, model.trainable_weights)]
    assert any(changed)
    path = tmp_path / "user_model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(
        restored.predict(images, verbose=0), model.predict(images, verbose=0), rtol=1e-5, atol=1e-5
    )
    restored_fpn = restored.layers[1]
    assert isinstance(restored_fpn.get_layer("feature_pyramid"), FeaturePyramid)


@pytest.mark.parametrize("like_hw", [(6, 8), (5, 7)])
def test_upsample_nearest_gradient_sums_each_2x2_block(like_hw):
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 3, 4, 5)).astype("float32"))
    dy = np.random.default_rng(2).normal(size=(2,) + like_hw + (5,)).astype("float32")
    with tf.GradientTape() as tape:
        tape.watch(x)
        up = upsample_nearest_to(x, tf.zeros((2,) + like_hw + (5,)))
    grad = tape.gradient(up, x, output_gradients=tf.constant(dy)).numpy()
    padded = np.zeros((2, 6, 8, 5), "float32")
    padded[:, : like_hw[0], : like_hw[1]] = dy
    expected = padded.reshape(2, 3, 2, 4, 2, 5).sum(axis=(2, 4))
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)
    xla = tf.function(
        lambda v: tf.gradients(
            upsample_nearest_to(v, tf.zeros((2,) + like_hw + (5,))), v, grad_ys=tf.constant(dy)
        )[0],
        jit_compile=True,
    )
    np.testing.assert_allclose(xla(x), expected, rtol=1e-6, atol=1e-6)
