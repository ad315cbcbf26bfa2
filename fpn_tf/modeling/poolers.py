"""Eq. 1 level assignment + RoIAlign on the pyramid, one layer per branch (box, mask).

    pooler = MultiLevelRoIAlign(RoIAlignerConfig(output_size=7))
    roi_features = pooler(pyramid, rois)  # [B, R, 7, 7, C]

The arithmetic is `fpn_tf.ops.roi_ops.multilevel_roi_align` (its gather implementation is the
one the ONNX / LiteRT exports use); this layer holds one ``model.roi_aligner``-shaped section
(`fpn_tf.configs.experiment.RoIAlignerConfig`) and the pyramid levels it pools from.
"""

from __future__ import annotations

import dataclasses

import keras

from fpn_tf.configs.experiment import RoIAlignerConfig
from fpn_tf.ops import anchors as anchor_ops
from fpn_tf.ops import roi_ops


def section(cls, value):
    """``value`` as a fresh ``cls`` config section: a section (copied, so that changing the
    layer's settings never changes the caller's config) or its ``to_dict`` (``from_config``)."""
    if isinstance(value, cls):
        return dataclasses.replace(value)
    return cls.from_dict(value)


@keras.saving.register_keras_serializable(package="fpn_tf")
class MultiLevelRoIAlign(keras.layers.Layer):
    """RoIAlign of each RoI on the pyramid level Eq. 1 assigns it.

    ``config``: a `RoIAlignerConfig` (or its dict). The RoIs go to the levels
    ``min_level..max_level`` that the features hold (Eq. 1 is clamped to those: a single-level
    ablation pools everything from its one level).

    Call: ``pooler(features, rois, training=None)`` with the pyramid dict and float [B, R, 4] yxyx
    boxes in input pixels; returns [B, R, S, S, C] in the features' dtype.
    """

    def __init__(self, config, **kwargs):
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)  # boxes stay float32 under mixed precision
        self.config = section(RoIAlignerConfig, config)
        self.levels = None

    def build(self, features_shape):
        c = self.config
        present = sorted(features_shape, key=anchor_ops.level_number)
        self.levels = [
            lvl for lvl in present if c.min_level <= anchor_ops.level_number(lvl) <= c.max_level
        ]
        if not self.levels:
            raise ValueError(
                f"no pyramid level in min_level..max_level ({c.min_level}..{c.max_level}) "
                f"of the RoIAlign among {present}"
            )
        self.channels = int(features_shape[self.levels[0]][-1])
        self.built = True

    def output_shape_for(self, channels=None):
        """``(None, None, S, S, C)``: what the heads after this pooler are built with."""
        size = self.config.output_size
        return (None, None, size, size, channels or self.channels)

    def call(self, features, rois, training=None):
        c = self.config
        first, last = (anchor_ops.level_number(lvl) for lvl in (self.levels[0], self.levels[-1]))
        return roi_ops.multilevel_roi_align(
            {lvl: features[lvl] for lvl in self.levels},
            rois,
            output_size=c.output_size,
            sampling_ratio=c.sampling_ratio,
            aligned=c.aligned,
            min_level=first,
            max_level=last,
            canonical_size=c.canonical_size,
            canonical_level=c.canonical_level,
            impl=c.align_impl,
            training=training,
            level_epsilon=c.level_epsilon,
        )

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict()}
