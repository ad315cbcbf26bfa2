"""The RPN head (one set of weights for every level) and the box head."""

import keras
import numpy as np
import tensorflow as tf

from fpn_tf.modeling.heads import FastRCNNBoxHead, RPNHead


def _pyramid(rng, channels=16):
    return {"P2": tf.constant(rng.normal(size=(2, 12, 10, channels)), tf.float32),
            "P3": tf.constant(rng.normal(size=(2, 6, 5, channels)), tf.float32)}


def test_rpn_head_applies_the_same_convs_on_every_level_in_values_and_gradients():
    rng = np.random.default_rng(0)
    features = _pyramid(rng)
    head = RPNHead(num_anchors=3, channels=8)
    head(features)
    for layer in (head.objectness, head.box_deltas):  # non-zero biases, larger kernels
        layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype("float32"))
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    assert len(head.weights) == 6  # one set of weights for all levels
    with tf.GradientTape(persistent=True) as tape:
        logits, deltas = head(features)
        ref_logits, ref_deltas = {}, {}
        for level, x in features.items():
            hidden = head.conv(x)
            ref_logits[level], ref_deltas[level] = head.objectness(hidden), head.box_deltas(hidden)
        loss = tf.add_n([tf.reduce_sum(logits[l] ** 2) + tf.reduce_sum(deltas[l] ** 2)
                         for l in features])
        ref_loss = tf.add_n([tf.reduce_sum(ref_logits[l] ** 2) + tf.reduce_sum(ref_deltas[l] ** 2)
                             for l in features])
    for level, x in features.items():
        assert logits[level].shape == x.shape[:3] + (3,)
        assert deltas[level].shape == x.shape[:3] + (12,)
        np.testing.assert_allclose(logits[level], ref_logits[level], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(deltas[level], ref_deltas[level], rtol=1e-5, atol=1e-5)
    assert float(tf.reduce_max(tf.abs(deltas["P2"]))) > 1.0
    for grad, ref in zip(tape.gradient(loss, head.weights), tape.gradient(ref_loss, head.weights)):
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-4)


def test_rpn_head_config_round_trip_and_functional_use():
    head = RPNHead(num_anchors=5, channels=12, name="rpn")
    clone = RPNHead.from_config(head.get_config())
    assert (clone.num_anchors, clone.channels, clone.name) == (5, 12, "rpn")
    x = keras.Input((None, None, 16))
    logits, deltas = clone({"P4": x})
    model = keras.Model(x, [logits["P4"], deltas["P4"]])
    a, b = model(np.zeros((1, 4, 4, 16), "float32"))
    assert a.shape == (1, 4, 4, 5) and b.shape == (1, 4, 4, 20)


def test_box_head_shapes():
    head = FastRCNNBoxHead(num_classes=3, fc_dims=32)
    logits, deltas = head(tf.zeros((2, 7, 7, 7, 8)))
    assert logits.shape == (2, 7, 4) and deltas.shape == (2, 7, 3, 4)
