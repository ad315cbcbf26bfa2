"""Writes the SavedModel of docs/serving.md: the three signatures of `fpn_tf.serving.detection`
plus ``assets/category_map.json``, ``assets/label_map.pbtxt`` (Object Detection API format) and
``assets/serving_config.json`` (the resize, outputs). Loading needs only TensorFlow.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Sequence

from absl import logging
import tensorflow as tf

from fpn_tf.configs.experiment import ResizeConfig
from fpn_tf.data.category_map import CategoryMap, as_category_map
from fpn_tf.errors import UserError
from fpn_tf.serving.detection import (
    NUM_DETECTIONS,
    MASK_OUTPUT_KEY,
    OUTPUT_KEYS,
    ImageBytesModule,
    ImageTensorModule,
    TfExampleModule,
)

__all__ = [
    "CATEGORY_MAP_ASSET",
    "ExportError",
    "LABEL_MAP_ASSET",
    "SERVING_CONFIG_ASSET",
    "export_saved_model",
    "label_map_pbtxt",
    "read_category_map",
]

CATEGORY_MAP_ASSET = "category_map.json"  # in <export_dir>/assets/
LABEL_MAP_ASSET = "label_map.pbtxt"
SERVING_CONFIG_ASSET = "serving_config.json"
_MODULES = (ImageTensorModule, ImageBytesModule, TfExampleModule)


class ExportError(UserError, ValueError):
    """A model_dir or export_dir that cannot be used; the message is one line naming the path."""


def label_map_pbtxt(category_map: CategoryMap) -> str:
    """The map as a TF Object Detection API ``StringIntLabelMap`` text proto."""
    items = []
    for cid, name in zip(category_map.dataset_ids, category_map.names):
        quoted = json.dumps(name)  # a valid proto text string literal for any name
        items.append(f"item {{\n  id: {cid}\n  name: {quoted}\n  display_name: {quoted}\n}}\n")
    return "".join(items)


def read_category_map(saved_model: str | os.PathLike | Any) -> CategoryMap:
    """The `CategoryMap` of an export directory or of a ``tf.saved_model.load`` object."""
    if isinstance(saved_model, (str, os.PathLike)):
        path = os.path.join(os.fspath(saved_model), "assets", CATEGORY_MAP_ASSET)
    else:
        path = saved_model.category_map_file.asset_path.numpy().decode("utf-8")
    return CategoryMap.from_json(path)


def _check_category_map(model, category_map: CategoryMap) -> None:
    ids = getattr(model, "category_ids", None)
    if ids is not None and list(ids) != list(category_map.dataset_ids):
        raise ExportError(
            f"the model's category ids {list(ids)} are not the category map's "
            f"{list(category_map.dataset_ids)}: the map does not belong to this model"
        )


def _prepare_export_dir(export_dir: str) -> None:
    if not tf.io.gfile.exists(export_dir):
        return
    if not tf.io.gfile.isdir(export_dir):
        raise ExportError(f"{export_dir}: exists and is not a directory")
    entries = tf.io.gfile.listdir(export_dir)
    if not entries:
        return
    if "saved_model.pb" not in entries:
        raise ExportError(
            f"{export_dir}: not empty and not a SavedModel; refusing to overwrite it "
            "(give an empty or new directory)"
        )
    logging.info("Replacing the SavedModel in %s", export_dir)
    tf.io.gfile.rmtree(export_dir)


def export_saved_model(
    model,
    export_dir: str | os.PathLike,
    category_map: CategoryMap | str | os.PathLike | Sequence | dict,
    resize: ResizeConfig,
    *,
    num_detections: int = NUM_DETECTIONS,
) -> str:
    """Writes the SavedModel of docs/serving.md to ``export_dir`` and returns it; ``resize`` is
    the model's (its config's ``eval_data.resize``).

    A SavedModel already in ``export_dir`` is replaced; any other non-empty directory, or a
    category map whose dataset ids are not the model's ``category_ids``, raises `ExportError`.
    """
    start = time.time()
    export_dir = os.fspath(export_dir)
    category_map = as_category_map(category_map)
    _check_category_map(model, category_map)
    modules = [cls(model, resize, num_detections=num_detections) for cls in _MODULES]
    root = tf.Module()
    # The variables the traced functions capture, saved once for all three signatures. The
    # tf.Variables themselves, not their Keras wrappers: a tracked Keras Variable exports a copy
    # of its tf.Variable that TF1-style loaders (saved_model_cli run, TF Serving's session
    # bundle) restore instead of the one the functions read ("Could not find variable ...").
    root.model_variables = [getattr(v, "value", v) for v in model.variables]
    for module in modules:
        setattr(root, module.signature_name, module)
    signatures = {m.signature_name: m.concrete_function() for m in modules}
    traced = time.time()
    outputs = list(OUTPUT_KEYS)
    if MASK_OUTPUT_KEY in signatures["serving_default"].structured_outputs:
        outputs.append(MASK_OUTPUT_KEY)
    serving_config = {
        "resize": resize.to_dict(),
        "num_detections": int(num_detections),
        "signatures": {m.signature_name: m.input_name for m in modules},
        "outputs": outputs,
        "boxes": "normalised [ymin, xmin, ymax, xmax] relative to the input image",
        "classes": "dataset category ids (see category_map.json)",
    }
    _prepare_export_dir(export_dir)
    with tempfile.TemporaryDirectory(prefix="fpn_tf_assets_") as tmp:
        files = {
            CATEGORY_MAP_ASSET: category_map.to_json() + "\n",
            LABEL_MAP_ASSET: label_map_pbtxt(category_map),
            SERVING_CONFIG_ASSET: json.dumps(serving_config, indent=1) + "\n",
        }
        for filename, text in files.items():
            with open(os.path.join(tmp, filename), "w", encoding="utf-8") as f:
                f.write(text)
        # Assets are copied into <export_dir>/assets/ under their file names.
        root.category_map_file = tf.saved_model.Asset(os.path.join(tmp, CATEGORY_MAP_ASSET))
        root.label_map_file = tf.saved_model.Asset(os.path.join(tmp, LABEL_MAP_ASSET))
        root.serving_config_file = tf.saved_model.Asset(os.path.join(tmp, SERVING_CONFIG_ASSET))
        tf.saved_model.save(root, export_dir, signatures=signatures)
    logging.info(
        "Exported a SavedModel with signatures %s to %s in %.1f s (tracing %.1f s); %d classes, %s",
        sorted(signatures),
        export_dir,
        time.time() - start,
        traced - start,
        category_map.num_classes,
        resize,
    )
    return export_dir
