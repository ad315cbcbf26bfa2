"""Every weight of the detector is reachable by tf.train.Checkpoint from the model alone (layers
kept in dicts or lists would not be), so restoring a model without its optimizer is complete."""

import pytest

from layer_test import assert_checkpoint_tracks_every_variable
from test_detector import fixed_batch, tiny_model
from test_mask_head import tiny_mask_model


@pytest.mark.parametrize("build", [tiny_model, tiny_mask_model], ids=["faster_rcnn", "mask_rcnn"])
def test_model_only_checkpoint_restores_every_weight(build):
    features, _ = fixed_batch()

    def built():
        model = build()
        model(features)
        return model

    model = built()
    _, stored = assert_checkpoint_tracks_every_variable(model, built)
    if model.mask_heads is not None:  # the mask head's 4 convs, deconv, predictor: kernel + bias
        mask_weights = model.mask_heads.weights
        assert len(mask_weights) == 12
        assert sum("mask_heads" in k for k in stored) == 12, [k for k in stored if "mask" in k]
