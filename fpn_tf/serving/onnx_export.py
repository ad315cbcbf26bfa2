"""ONNX export of a Faster / Mask R-CNN through tf2onnx (``pip install -e '.[export]'``).

    from fpn_tf.serving.onnx_export import export_onnx
    export_onnx(model, "exports/cpu_demo.onnx", category_map, **source.preprocessing)

The graph is `fpn_tf.serving.portable`'s: input ``images`` uint8 [batch, height, width, 3] with
dynamic batch, height and width (one size per batch, as ``serving_default``), resized inside by
the eval rule, outputs named as the SavedModel's (docs/serving.md), an image with no detection
giving ``num_detections`` 0 and zero rows. tf2onnx is the converter Keras 3 itself uses for
``export(format="onnx")`` on the TensorFlow backend; opset 17 (the newest opset whose ops
tf2onnx 1.17 maps for everything here; ONNX Runtime 1.31 runs opsets up to 23). The file is
written only after ONNX Runtime has loaded it (`portable.write_validated`).
"""

from __future__ import annotations

import os
import time

from absl import logging
import tensorflow as tf

from fpn_tf.data.category_map import as_category_map
from fpn_tf.serving import portable
from fpn_tf.serving.detection import NUM_DETECTIONS
from fpn_tf.serving.export import ExportError, _check_category_map

__all__ = ["ONNX_OPSET", "export_onnx"]

ONNX_OPSET = 17


def _validate(path: str) -> None:
    try:
        import onnxruntime as ort  # pylint: disable=g-import-not-at-top

        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:  # pylint: disable=broad-except
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ExportError(f"ONNX Runtime cannot load the converted model: {first}") from e


def export_onnx(
    model,
    path: str | os.PathLike,
    category_map,
    short_side: int,
    max_long_side: int,
    pad_multiple: int,
    *,
    resize_rounding: str = "round",
    resize_method: str = "bilinear",
    num_detections: int = NUM_DETECTIONS,
    opset: int = ONNX_OPSET,
) -> str:
    """Writes ``path`` (.onnx) and its sidecars; returns ``path``.

    Raises:
      ExportError: a model that is not a detector, a conversion that fails or a file ONNX
        Runtime cannot load (nothing is written then).
    """
    try:
        import tf2onnx  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ExportError(
            "--format=onnx needs tf2onnx and onnxruntime: pip install -e '.[export]'"
        ) from e
    start = time.time()
    path = os.fspath(path)
    category_map = as_category_map(category_map)
    _check_category_map(model, category_map)
    concrete, keys = portable.portable_detect_function(
        model,
        short_side,
        max_long_side,
        pad_multiple,
        resize_rounding=resize_rounding,
        resize_method=resize_method,
        num_detections=num_detections,
    )
    spec = [tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")]
    try:
        proto, _ = tf2onnx.convert.from_function(
            tf.function(concrete), input_signature=spec, opset=opset
        )
    except Exception as e:  # pylint: disable=broad-except
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ExportError(f"tf2onnx could not convert the model: {first}") from e
    names = [o.name for o in proto.graph.output]
    if sorted(names) != sorted(keys):
        raise ExportError(f"the ONNX outputs are {names}, expected {keys}")
    config = portable.serving_config(
        "onnx",
        short_side,
        max_long_side,
        pad_multiple,
        resize_rounding,
        num_detections,
        keys,
        opset=int(opset),
        batch="any (one image size per batch)",
    )
    portable.write_validated(
        path,
        proto.SerializeToString(),
        _validate,
        portable.sidecar_files(path, category_map, config),
    )
    logging.info(
        "Exported ONNX (opset %d, outputs %s) to %s in %.1f s (%.1f MB)",
        opset,
        keys,
        path,
        time.time() - start,
        os.path.getsize(path) / 1e6,
    )
    return path
