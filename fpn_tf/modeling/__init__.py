"""The detectors: `FasterRCNN`, `MaskRCNN` (`factory.build_model` builds either from a config)."""

from fpn_tf.modeling.faster_rcnn import FasterRCNN, MaskRCNN
from fpn_tf.modeling.poolers import MultiLevelRoIAlign
from fpn_tf.modeling.roi_heads import RoIHeads

__all__ = ["FasterRCNN", "MaskRCNN", "MultiLevelRoIAlign", "RoIHeads"]
