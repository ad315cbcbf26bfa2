"""The SavedModel of docs/serving.md: :func:`export_saved_model` writes it,
`fpn_tf.serving.detection` holds its signatures, :func:`read_category_map` reads its id -> name
map and `fpn_tf.serving.inference` runs it on image files (``python -m fpn_tf.predict``).
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
