"""The RoIAlign ops called with `RoIAlignerConfig`'s defaults for the settings a test leaves out
(the ops themselves take every setting explicitly)."""

from fpn_tf.configs.experiment import RoIAlignerConfig
from fpn_tf.ops import roi_ops

ALIGNER = RoIAlignerConfig().to_dict()
EQ1 = {
    k: ALIGNER[k]
    for k in ("min_level", "max_level", "canonical_size", "canonical_level", "level_epsilon")
}


def roi_align(features, rois, **settings):
    """``roi_ops.multilevel_roi_align`` with the config's defaults under ``settings``."""
    return roi_ops.multilevel_roi_align(features, rois, **{**ALIGNER, **settings})


def eq1_levels(boxes, **settings):
    """``roi_ops.assign_levels`` with the config's defaults under ``settings``."""
    return roi_ops.assign_levels(boxes, **{**EQ1, **settings})
