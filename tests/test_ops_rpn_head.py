"""fpn_tf.ops.rpn_head_ops: the RPN head's backward over the reached positions only equals
TensorFlow's dense gradient, for sparse and dense upstream gradients, in XLA, and in a detector."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.ops.rpn_head_ops import rpn_head_level

NAMES = ["x", "conv_kernel", "conv_bias", "cls_kernel", "cls_bias", "box_kernel", "box_bias"]


def _inputs(rng, b=2, h=9, w=11, c=8, k=6, a=3):
    x = rng.normal(size=(b, h, w, c)).astype(np.float32)
    weights = [
        rng.normal(size=s).astype(np.float32) * 0.3
        for s in [(3, 3, c, k), (k,), (1, 1, k, a), (a,), (1, 1, k, 4 * a), (4 * a,)]
    ]
    return [tf.constant(x)] + [tf.constant(v) for v in weights]


def _grads(args, loss_fn, sparse, jit=False):
    def f(*args):
        with tf.GradientTape() as tape:
            tape.watch(args)
            logits, deltas = rpn_head_level(*args, sparse_backward=sparse)
            loss = loss_fn(logits, deltas)
        return [logits, deltas] + tape.gradient(loss, list(args))

    out = tf.function(f, jit_compile=jit)(*args) if jit else f(*args)
    return [o.numpy() for o in out]


def _sampled_loss(rng, shape):
    """A loss that, like the RPN's, reads a few positions (corners included: padding)."""
    b, h, w = shape
    mask = np.zeros((b, h, w, 1), np.float32)
    mask[0, 0, 0] = mask[0, h - 1, w - 1] = mask[1, 0, w - 1] = mask[1, h // 2, w // 2] = 1
    mask[1, h // 2, w // 2 + 1] = 1  # overlapping 3x3 windows
    cls_w = tf.constant(mask * rng.normal(size=(b, h, w, 3)), tf.float32)
    box_w = tf.constant(mask * rng.normal(size=(b, h, w, 12)), tf.float32)
    return lambda logits, deltas: (
        tf.reduce_sum(tf.sigmoid(logits) * cls_w) + tf.reduce_sum(deltas**2 * box_w)
    )


@pytest.mark.parametrize("upstream", ["sampled", "dense"])
def test_sparse_backward_equals_the_dense_gradient(upstream):
    rng = np.random.default_rng(0)
    args = _inputs(rng)
    loss = (
        _sampled_loss(rng, (2, 9, 11))
        if upstream == "sampled"
        else lambda logits, deltas: tf.reduce_sum(logits**2) + tf.reduce_sum(tf.sin(deltas))
    )
    sparse, dense = _grads(args, loss, True), _grads(args, loss, False)
    for name, s, d in zip(["logits", "deltas"] + NAMES, sparse, dense):
        assert s.shape == d.shape, name
        np.testing.assert_allclose(s, d, rtol=1e-5, atol=1e-5, err_msg=name)
    grad_x = sparse[2]
    assert np.abs(grad_x).max() > 0.1
    if upstream == "sampled":  # only the 3x3 windows around the five read positions
        assert 0 < np.count_nonzero(np.abs(grad_x).sum(-1)) <= 5 * 9


def test_inside_xla_the_dense_gradient_is_used_with_equal_values():
    rng = np.random.default_rng(1)
    args = _inputs(rng)
    loss = _sampled_loss(rng, (2, 9, 11))
    for name, s, x in zip(
        ["logits", "deltas"] + NAMES, _grads(args, loss, True), _grads(args, loss, True, jit=True)
    ):
        np.testing.assert_allclose(s, x, rtol=1e-4, atol=1e-5, err_msg=name)


def test_bfloat16_inputs_give_bfloat16_gradients_close_to_float32():
    rng = np.random.default_rng(2)
    args = _inputs(rng)
    loss = _sampled_loss(rng, (2, 9, 11))
    ref = _grads(args, loss, True)
    low = _grads(
        [tf.cast(a, tf.bfloat16) for a in args],
        lambda l, d: loss(tf.cast(l, tf.float32), tf.cast(d, tf.float32)),
        True,
    )
    for name, r, g in zip(["logits", "deltas"] + NAMES, ref, low):
        assert g.dtype == tf.bfloat16.as_numpy_dtype, name
        g = g.astype(np.float32)
        assert np.abs(g - r).max() <= 0.05 * max(np.abs(r).max(), 1e-3), name


def test_detector_gradients_are_the_same_with_the_sparse_and_the_dense_rpn_backward():
    from tests.test_detector import fixed_batch, tiny_model

    keras.utils.set_random_seed(3)
    model = tiny_model()
    features, labels = fixed_batch()
    grads = {}
    for sparse in (True, False):
        model.rpn.head.sparse_backward = sparse
        tf.random.set_seed(7)  # the same anchor and RoI samples in both runs
        with tf.GradientTape() as tape:
            losses = model.compute_losses(features, labels, training=True)
        grads[sparse] = tape.gradient(losses["total_loss"], model.trainable_variables)
    rpn_names = [v.path for v in model.rpn.head.trainable_variables]
    assert len(rpn_names) == 6
    for var, s, d in zip(model.trainable_variables, grads[True], grads[False]):
        np.testing.assert_allclose(s.numpy(), d.numpy(), rtol=1e-4, atol=1e-6, err_msg=var.path)
    conv = [g for v, g in zip(model.trainable_variables, grads[True]) if v.path in rpn_names]
    assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in conv)


def test_a_level_the_loss_does_not_reach_gets_zero_gradients():
    """E.g. P6 when no sampled anchor lies on it: no positions, zero (not missing) gradients."""
    rng = np.random.default_rng(4)
    args = _inputs(rng)
    grads = _grads(args, lambda logits, deltas: 0.0 * tf.reduce_sum(logits[:, :0]), True)
    for name, g, a in zip(NAMES, grads[2:], args):
        assert g.shape == a.shape, name
        assert not np.any(g), name
