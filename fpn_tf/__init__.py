"""fpn_tf: Feature Pyramid Networks with Faster R-CNN in Keras 3 / TensorFlow.

import fpn_tf
loaded = fpn_tf.load_model("models/coco_r50_fpn_torchvision")  # any model directory
detections = loaded.model(images)
"""

__version__ = "0.1.0"


def load_model(model_dir, **kwargs):
    """`fpn_tf.modeling.model_dir.load_model`, imported on use (``import fpn_tf`` stays light)."""
    from fpn_tf.modeling.model_dir import load_model as _load  # pylint: disable=g-import-not-at-top

    return _load(model_dir, **kwargs)
