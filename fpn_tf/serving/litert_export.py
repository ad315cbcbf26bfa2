"""LiteRT (TensorFlow Lite) export of a Faster / Mask R-CNN with builtin ops only.

    from fpn_tf.serving.litert_export import export_litert
    export_litert(model, "exports/cpu_demo.tflite", category_map, **source.preprocessing,
                  quantization="none")          # or "float16", "dynamic_int8"

No SELECT_TF_OPS: the TensorFlow 2.20 wheel and ``ai-edge-litert`` ship no Flex delegate, so a
model needing one converts and then fails at ``allocate_tensors``. The graph is
`fpn_tf.serving.portable`'s (gather RoIAlign, NonMaxSuppressionV4 in a loop, no
CombinedNonMaxSuppression, no strings), converted with ``TFLITE_BUILTINS`` only, its op list
checked builtin-only, and loaded (``allocate_tensors``) before it is moved into place.

The input is one fixed size ``images`` uint8 [1, H, W, 3] (``image_size``, default
``(short_side, max_long_side)``: the rule's largest landscape image): with dynamic sizes the
converter keeps ops it has no builtin for (strided slices that add an axis to tensors of two
unknown dimensions). Images of other sizes are letterboxed by the client
(`fpn_tf.portable_client.letterbox`; scale to fit, pad bottom/right with zeros) and the boxes
mapped back (``unletterbox_boxes``); the graph then resizes by the eval rule as the SavedModel.

``quantization``: ``"none"`` (float32), ``"float16"`` (weights stored float16, computed
float32), ``"dynamic_int8"`` (weights int8, activations quantized on the fly where the kernels
allow: dynamic-range quantization).
"""

from __future__ import annotations

import os
import re
import time

from absl import logging
import tensorflow as tf

from fpn_tf.data.category_map import as_category_map
from fpn_tf.serving import portable
from fpn_tf.serving.detection import NUM_DETECTIONS
from fpn_tf.serving.export import ExportError, _check_category_map

__all__ = ["QUANTIZATIONS", "builtin_op_names", "export_litert", "non_builtin_ops"]

QUANTIZATIONS = ("none", "float16", "dynamic_int8")


def _schema():
    try:
        from ai_edge_litert import schema_py_generated  # pylint: disable=g-import-not-at-top
    except ImportError:  # the copy inside TensorFlow
        from tensorflow.lite.python import schema_py_generated  # pylint: disable=g-import-not-at-top
    return schema_py_generated


def _op_codes(content: bytes):
    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = []
    for code in model.operatorCodes:
        builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        custom = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
        codes.append((names.get(builtin, str(builtin)), custom))
    return codes


def builtin_op_names(content: bytes) -> list[str]:
    """The operator codes of a .tflite flatbuffer (``CUSTOM`` for custom / Flex ops)."""
    return [name for name, _ in _op_codes(content)]


def non_builtin_ops(content: bytes) -> list[str]:
    """Custom and Flex ops of a .tflite flatbuffer (their custom codes); empty = builtins only."""
    return [custom or name for name, custom in _op_codes(content) if name == "CUSTOM" or custom]


def _validate(path: str) -> None:
    with open(path, "rb") as f:
        content = f.read()
    extra = non_builtin_ops(content)
    if extra:
        raise ExportError(f"the LiteRT model holds non-builtin ops {sorted(set(extra))}")
    try:
        from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top

        Interpreter(model_path=path).allocate_tensors()
    except Exception as e:  # pylint: disable=broad-except
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ExportError(f"the LiteRT interpreter cannot load the converted model: {first}") from e


def _conversion_error(e: Exception) -> ExportError:
    ops = sorted(
        set(re.findall(r"'(tf\.[A-Za-z0-9_]+)' op is neither a custom op nor a flex op", str(e)))
    )
    if ops:
        return ExportError(f"ops with no LiteRT builtin: {', '.join(ops)} (builtins only, no Flex)")
    lines = [l for l in str(e).splitlines() if "error" in l.lower()] or str(e).splitlines() or [""]
    return ExportError(f"the LiteRT converter failed: {lines[0].strip()[:300] or type(e).__name__}")


def export_litert(
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
    image_size: tuple[int, int] | None = None,
    quantization: str = "none",
) -> str:
    """Writes ``path`` (.tflite) and its sidecars; returns ``path``.

    Raises:
      ExportError: a model that is not a detector, an op with no builtin, a file the
        interpreter cannot load (nothing is written then).
    """
    from tensorflow.python.framework import convert_to_constants  # pylint: disable=g-import-not-at-top

    if quantization not in QUANTIZATIONS:
        raise ExportError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    start = time.time()
    path = os.fspath(path)
    category_map = as_category_map(category_map)
    _check_category_map(model, category_map)
    if image_size is None:
        image_size = (int(short_side), int(max_long_side))
    image_size = tuple(int(v) for v in image_size)
    if len(image_size) != 2 or min(image_size) < 1:
        raise ExportError(f"image_size must be (height, width) > 0, got {image_size}")
    concrete, keys = portable.portable_detect_function(
        model,
        short_side,
        max_long_side,
        pad_multiple,
        resize_rounding=resize_rounding,
        resize_method=resize_method,
        num_detections=num_detections,
        batch_size=1,
        image_size=image_size,
    )
    # Weights as constants: converted from the concrete function with its variables, the file
    # holds resource variables that the interpreter leaves uninitialised (all-zero weights).
    frozen = convert_to_constants.convert_variables_to_constants_v2(concrete)

    @tf.function(input_signature=[tf.TensorSpec([1, *image_size, 3], tf.uint8, name="images")])
    def serve(images):
        return dict(zip(keys, frozen(images)))  # outputs in nest order: sorted keys

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [serve.get_concrete_function()], tf.Module()
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    try:
        content = converter.convert()
    except Exception as e:  # pylint: disable=broad-except
        raise _conversion_error(e) from e
    config = portable.serving_config(
        "litert",
        short_side,
        max_long_side,
        pad_multiple,
        resize_rounding,
        num_detections,
        keys,
        input_size=list(image_size),
        batch=1,
        quantization=quantization,
        letterbox="scale to fit input_size (aspect kept), zero pad bottom/right "
        "(fpn_tf.portable_client.letterbox)",
    )
    portable.write_validated(
        path, content, _validate, portable.sidecar_files(path, category_map, config)
    )
    logging.info(
        "Exported LiteRT (%s, input %dx%d, builtins only) to %s in %.1f s (%.1f MB)",
        quantization,
        image_size[0],
        image_size[1],
        path,
        time.time() - start,
        len(content) / 1e6,
    )
    return path
