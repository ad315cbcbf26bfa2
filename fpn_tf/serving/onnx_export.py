"""ONNX export of a Faster / Mask R-CNN through tf2onnx (Keras 3's ONNX converter on TF).

Input ``images`` uint8 [batch, height, width, 3] (dynamic, one size per batch), resized inside by
eval_data.resize; the outputs are the SavedModel's. Opset 17 is the newest tf2onnx 1.17 maps for
every op here.
"""

from __future__ import annotations

import os
import time

import tensorflow as tf

from fpn_tf.configs.experiment import ResizeConfig
from fpn_tf.serving import portable
from fpn_tf.serving.detection import NUM_DETECTIONS
from fpn_tf.serving.export import ExportError

__all__ = ["ONNX_OPSET", "export_onnx"]

ONNX_OPSET = 17


def _validate(path: str) -> None:
    try:
        import onnxruntime as ort  # pylint: disable=g-import-not-at-top

        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:  # pylint: disable=broad-except
        raise ExportError(f"ONNX Runtime cannot load the converted model: {portable.first_line(e)}")


def export_onnx(
    model,
    path: str | os.PathLike,
    category_map,
    resize: ResizeConfig,
    *,
    num_detections: int = NUM_DETECTIONS,
    opset: int = ONNX_OPSET,
) -> str:
    """Writes ``path`` (.onnx) and its sidecars; returns ``path``. ``resize``: the model's.
    Raises `ExportError` (writing nothing) if the conversion or ONNX Runtime's load fails."""
    try:
        import tf2onnx  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ExportError(
            "--format=onnx needs tf2onnx and onnxruntime: pip install -e '.[export]'"
        ) from e
    start = time.time()
    category_map = portable.prepare_export(model, category_map, resize)
    concrete, keys = portable.portable_detect_function(model, resize, num_detections=num_detections)
    try:
        proto, _ = tf2onnx.convert.from_function(
            tf.function(concrete),
            input_signature=list(concrete.structured_input_signature[0]),
            opset=opset,
        )
    except Exception as e:  # pylint: disable=broad-except
        raise ExportError(f"tf2onnx could not convert the model: {portable.first_line(e)}") from e
    names = [o.name for o in proto.graph.output]
    if sorted(names) != keys:
        raise ExportError(f"the ONNX outputs are {names}, expected {keys}")
    config = portable.serving_config(
        "onnx",
        resize,
        num_detections,
        keys,
        input="images: uint8 [batch, height, width, 3] RGB, any size (one size per batch)",
        opset=int(opset),
    )
    return portable.write_export(
        path, proto.SerializeToString(), _validate, category_map, config, start
    )
