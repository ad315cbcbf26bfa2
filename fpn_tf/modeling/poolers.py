"""Eq. 1 level assignment + RoIAlign on the pyramid, one layer per branch (box, mask)."""

from __future__ import annotations

import keras

from fpn_tf.configs.experiment import RoIAlignerConfig
from fpn_tf.ops import anchors as anchor_ops
from fpn_tf.ops import roi_ops


@keras.saving.register_keras_serializable(package="fpn_tf")
class MultiLevelRoIAlign(keras.layers.Layer):
    """RoIAlign of each RoI on the level Eq. 1 assigns it, clamped to the levels of
    ``min_level..max_level`` the features hold. ``config``: a `RoIAlignerConfig` (or its dict).

    ``pooler(features, rois [B, R, 4] yxyx input pixels)`` -> [B, R, S, S, C].
    """

    def __init__(self, config, **kwargs):
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)  # boxes stay float32 under mixed precision
        self.config = RoIAlignerConfig.of(config)
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
        first, last = (anchor_ops.level_number(lvl) for lvl in (self.levels[0], self.levels[-1]))
        return roi_ops.multilevel_roi_align(
            {lvl: features[lvl] for lvl in self.levels},
            rois,
            **dict(self.config.to_dict(), min_level=first, max_level=last),
            training=training,
        )

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict()}
