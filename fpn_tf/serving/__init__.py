"""Export: the SavedModel described in docs/serving.md and what reads it.

* :func:`export_saved_model` writes it (the trainer calls it at the end of training;
  ``python -m fpn_tf.export`` calls it on a model directory, read by
  `fpn_tf.modeling.model_dir.load_model`);
* `fpn_tf.serving.detection`: one `tf.Module` per input type (``serving_default`` images,
  ``image_bytes``, ``tf_example``);
* :func:`read_category_map` reads the id -> name map that travels with the SavedModel;
* `fpn_tf.serving.inference`: runs a SavedModel on image files and draws the detections
  (``python -m fpn_tf.predict``).
"""

from fpn_tf.serving.detection import (
    NUM_DETECTIONS,
    OUTPUT_KEYS,
    DetectionModule,
    ImageBytesModule,
    ImageTensorModule,
    TfExampleModule,
    preprocess_images,
)
from fpn_tf.serving.export import (
    ExportError,
    export_saved_model,
    label_map_pbtxt,
    read_category_map,
)

__all__ = [
    "NUM_DETECTIONS",
    "OUTPUT_KEYS",
    "DetectionModule",
    "ExportError",
    "ImageBytesModule",
    "ImageTensorModule",
    "TfExampleModule",
    "export_saved_model",
    "label_map_pbtxt",
    "preprocess_images",
    "read_category_map",
]
