"""One round-trip check for the library's layers and models (after keras-hub's run_layer_test):
the config round trip, the same outputs from a clone given the layer's weights, and checkpoint
tracking of every variable."""

import tempfile

import numpy as np
import tensorflow as tf


def _call(layer, inputs):
    return layer(inputs)


def run_layer_test(
    layer_cls,
    init_kwargs=None,
    input_data=None,
    *,
    layer=None,
    call=_call,
    atol=1e-5,
    check_config=True,
    check_outputs=True,
    check_checkpoint=True,
):
    """Checks ``layer_cls(**init_kwargs)`` (or ``layer``, already made) on ``input_data``:

    - ``clone = layer_cls.from_config(layer.get_config())`` has the same config and variable
      paths (unless not ``check_config``: a model whose sub-layers get new unique names) and,
      given the layer's weights (set_weights), ``call(clone, input_data)`` gives the same
      outputs as ``call(layer, input_data)`` (within ``atol``; every leaf of the output
      structure);
    - every variable is tracked: a ``tf.train.Checkpoint`` of one instance, whose weights were
      all changed to values no initialiser gives, restores each of them into another instance.

    ``call(layer, input_data)`` runs (and so builds) a layer; the default calls it on the input.
    Returns ``(layer, output)`` for the test's own assertions."""
    if layer is None:
        layer = layer_cls(**(init_kwargs or {}))
    out = call(layer, input_data)
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    call(clone, input_data)
    if check_config:
        assert clone.get_config() == config
        assert [v.path for v in clone.weights] == [v.path for v in layer.weights]
    clone.set_weights(layer.get_weights())
    if check_outputs:
        again = call(clone, input_data)
        flat_out, flat_again = tf.nest.flatten(out), tf.nest.flatten(again)
        assert len(flat_out) == len(flat_again)
        for a, b in zip(flat_out, flat_again):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=atol)
    if check_checkpoint:
        assert_checkpoint_tracks_every_variable(
            clone, lambda: _built(layer_cls.from_config(config), call, input_data)
        )
    return layer, out


def _built(layer, call, input_data):
    call(layer, input_data)
    return layer


def assert_checkpoint_tracks_every_variable(saved, make_other):
    """Changes every float variable of ``saved`` (a built layer or model) to values no
    initialiser gives, checkpoints it alone (``tf.train.Checkpoint(model=saved)``) and restores
    that into ``make_other()`` (another built instance): every variable comes back, which a
    variable held where tf.train.Checkpoint does not look (a plain dict or list) would not."""
    rng = np.random.default_rng(123)
    for v in saved.weights:
        value = np.asarray(v.numpy())
        if np.issubdtype(value.dtype, np.floating):
            v.assign(rng.uniform(-1.0, 1.0, value.shape).astype(value.dtype))
    with tempfile.TemporaryDirectory() as tmp:
        path = tf.train.Checkpoint(model=saved).save(tmp + "/ckpt")
        other = make_other()
        tf.train.Checkpoint(model=other).restore(path).assert_existing_objects_matched()
        reader = tf.train.load_checkpoint(path)
        stored = [k for k in reader.get_variable_to_shape_map() if k.endswith("VARIABLE_VALUE")]
    assert len(stored) >= len(saved.weights)
    assert len(other.weights) == len(saved.weights)
    for a, b in zip(saved.weights, other.weights):
        np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=a.path)
    return other, stored
