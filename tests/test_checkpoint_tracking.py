"""Every weight of the detector is reachable by tf.train.Checkpoint from the model alone (layers
kept in dicts or lists would not be), so restoring a model without its optimizer is complete."""

import numpy as np
import pytest
import tensorflow as tf

from test_detector import fixed_batch, tiny_model
from test_mask_head import tiny_mask_model


@pytest.mark.parametrize("build", [tiny_model, tiny_mask_model], ids=["faster_rcnn", "mask_rcnn"])
def test_model_only_checkpoint_restores_every_weight(tmp_path, build):
    model = build()
    features, _ = fixed_batch()
    model(features)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    clone = build()
    clone(features)
    status = tf.train.Checkpoint(model=clone).restore(path)
    status.assert_existing_objects_matched()
    for a, b in zip(model.weights, clone.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    reader = tf.train.load_checkpoint(path)
    stored = [k for k in reader.get_variable_to_shape_map() if k.endswith("VARIABLE_VALUE")]
    assert len(stored) >= len(model.weights)
    if model.mask_heads is not None:  # the mask head's 4 convs, deconv, predictor: kernel + bias
        mask_weights = model.mask_heads.weights
        assert len(mask_weights) == 12
        assert sum("mask_heads" in k for k in stored) == 12, [k for k in stored if "mask" in k]
