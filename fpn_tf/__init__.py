"""fpn_tf: Feature Pyramid Networks with Faster R-CNN in Keras 3 / TensorFlow."""

__version__ = "0.1.0"
