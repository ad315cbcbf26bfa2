"""Every weight of the detector is reachable by tf.train.Checkpoint from the model alone (layers
kept in dicts or lists would not be), so restoring a model without its optimizer is complete; and
checkpoints with the mask head at model/mask_heads/head (older code's only path, which
converted model directories hold) restore, and the ones written now hold that path too."""

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.modeling import MaskRCNN, model_dir
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
    if isinstance(model, MaskRCNN):  # the mask head's 4 convs, deconv, predictor: kernel + bias
        assert len(model.roi_heads.mask_head.weights) == 12
        assert sum("mask_head" in k for k in stored) == 12, [k for k in stored if "mask" in k]


def _older_object_graph(model):
    """The checkpoint graph of the code before RoIHeads owned the mask branch: the box head
    under roi_heads, the mask head under a separate mask_heads layer."""
    return tf.train.Checkpoint(
        model=tf.train.Checkpoint(
            fpn=model.fpn,
            rpn=model.rpn,
            roi_heads=tf.train.Checkpoint(box_head=model.roi_heads.box_head),
            mask_heads=tf.train.Checkpoint(head=model.roi_heads.mask_head),
        )
    )


def test_mask_head_checkpoint_path_of_older_code_restores_both_ways(tmp_path):
    features, _ = fixed_batch()
    old = tiny_mask_model()
    old(features)
    for w in old.weights:
        w.assign(np.random.default_rng(len(w.path)).normal(size=w.shape).astype(w.dtype))
    path = _older_object_graph(old).save(str(tmp_path / "old" / "ckpt"))
    new = tiny_mask_model()
    assert model_dir.restore_model(new, path) is False  # every part found, no optimizer
    for a, b in zip(old.weights, new.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # A checkpoint written now restores into the older graph (code that reads that path).
    path = tf.train.Checkpoint(model=new).save(str(tmp_path / "new" / "ckpt"))
    older = tiny_mask_model()
    _older_object_graph(older).restore(path).assert_existing_objects_matched()
    for a, b in zip(new.roi_heads.mask_head.weights, older.roi_heads.mask_head.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
