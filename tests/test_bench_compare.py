"""Smoke tests of bench/: the helpers, the Model Garden settings, and the A/B harness's weight
copy between model variants (small inputs, seconds)."""

import numpy as np
import pytest
import tensorflow as tf

from bench import common


def test_padding_and_synthetic_batch():
    assert common.padded([800, 1333], 32) == [800, 1344]
    assert common.padded([800, 1333], 64) == [832, 1344]
    images, info, boxes, classes = common.synthetic_batch(2, (100, 130), (128, 160), 3, 8)
    assert images.shape == (2, 128, 160, 3) and info.shape == (2, 4, 2)
    assert (classes[:, :3] > 0).all() and (classes[:, 3:] == -1).all()
    assert (boxes[:, :3, 2] <= 100).all() and (boxes[:, :3, 3] <= 130).all()


def test_model_garden_config_matches_ours():
    pytest.importorskip("official.vision.configs.maskrcnn")
    from bench.compare_model_garden import model_garden_config

    m = model_garden_config([800, 1333], [832, 1344]).task.model
    assert m.input_size == [832, 1344, 3] and m.num_classes == 91 and not m.include_mask
    assert (m.roi_generator.num_proposals, m.roi_generator.test_num_proposals) == (2000, 1000)
    assert m.roi_sampler.num_sampled_rois == 512 and m.roi_aligner.crop_size == 7
    assert (m.detection_head.num_convs, m.detection_head.num_fcs, m.detection_head.fc_dims) == (
        0,
        2,
        1024,
    )


def test_ab_copies_weights_between_folded_and_unfolded_models_and_outputs_agree():
    """bench/ab_ours.py: B gets A's weights (a folded BatchNorm's vectors from the BatchNorm
    layer), so the two variants' stage outputs can be compared."""
    import keras
    from bench import ab_ours
    from fpn_tf.configs.loader import load_config
    from fpn_tf.modeling.factory import build_model

    def build(override):
        cfg = load_config(
            params_override=(
                "model.backbone.type=small_resnet,model.backbone.freeze_bn=true,"
                "model.backbone.widths=[8,8,16,16],model.backbone.stem_width=8,"
                "model.fpn.num_channels=16,model.rpn.head_channels=16,model.box_head.fc_dims=32,"
                "model.num_classes=3," + override
            ),
            validate=False,
        )
        return build_model(cfg.model, input_shape=(64, 96, 3))

    keras.utils.set_random_seed(1)
    unfolded = build("model.backbone.fold_frozen_bn=false,model.roi_aligner.align_impl=gather")
    keras.utils.set_random_seed(2)  # different initial weights: the copy must make them equal
    folded = build("model.roi_aligner.align_impl=crop_and_resize")
    bn = [v for v in unfolded.weights if v.path.endswith("_bn/moving_variance")]
    assert len(bn) > 10
    for v in bn:
        v.assign(np.full(v.shape, 2.5, "float32"))
    ab_ours.copy_weights(unfolded, folded)
    features = {
        "images": tf.constant(np.random.default_rng(0).uniform(0, 255, (1, 64, 96, 3)), tf.float32)
    }
    ref, rois = ab_ours.stage_outputs(unfolded, features)
    out, same_rois = ab_ours.stage_outputs(folded, features, rois)
    assert same_rois is rois and sorted(ref) == sorted(out)
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-4, atol=1e-4, err_msg=key)
    with pytest.raises(ValueError, match="no weight for"):
        ab_ours.copy_weights(build("model.box_head.fc_dims=16"), folded)


def test_ours_reports_the_settings_of_the_model_it_built():
    """bench/compare_model_garden.py reads each setting from the component that holds it (the
    RPN's from its config section): a refactor of the layers must not break the benchmark."""
    from absl import flags
    from bench import compare_model_garden

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["compare_model_garden"])
    settings = compare_model_garden.Ours([128, 160], "model.backbone.weights=null").settings
    assert settings["input"] == [128, 160]
    rpn = [
        settings[k] for k in ("pre_nms_train", "post_nms_train", "pre_nms_test", "post_nms_test")
    ]
    assert rpn == [2000, 2000, 1000, 1000]
    assert (settings["rois"], settings["fc"], settings["roi_align"]) == (512, 1024, 7)
