"""Published COCO detectors (torchvision, detectron2) converted into fpn_tf model directories."""

from fpn_tf.conversion.checkpoint_reader import ConversionError
from fpn_tf.conversion.convert import SOURCES, convert_checkpoint, load_weights

__all__ = ["ConversionError", "SOURCES", "convert_checkpoint", "load_weights"]
