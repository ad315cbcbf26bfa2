"""LiteRT (TensorFlow Lite) export of a Faster / Mask R-CNN with builtin ops only.

No SELECT_TF_OPS: the TF 2.20 wheel and ``ai-edge-litert`` ship no Flex delegate. The graph is
`fpn_tf.serving.portable`'s with ``resized_input=True`` (batch 1, dynamic height and width; the
client resizes, `fpn_tf.portable_client`). Insert-axis slices become ``ExpandDims`` (no builtin
for them with two unknown dimensions); the file is checked builtin-only and loaded by the
interpreter before it is moved into place.
"""

from __future__ import annotations

import os
import re
import tempfile
import time

import tensorflow as tf

from fpn_tf.configs.experiment import ResizeConfig
from fpn_tf.serving import portable
from fpn_tf.serving.detection import NUM_DETECTIONS
from fpn_tf.serving.export import ExportError

__all__ = ["QUANTIZATIONS", "builtin_op_names", "export_litert", "non_builtin_ops"]

QUANTIZATIONS = ("none", "float16", "dynamic_int8")


def _op_codes(content: bytes):
    try:
        from ai_edge_litert import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
    except ImportError:  # the copy inside TensorFlow
        from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    for code in model.operatorCodes:
        builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        custom = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
        yield names.get(builtin, str(builtin)), custom


def builtin_op_names(content: bytes) -> list[str]:
    """The operator codes of a .tflite flatbuffer (``CUSTOM`` for custom / Flex ops)."""
    return [name for name, _ in _op_codes(content)]


def non_builtin_ops(content: bytes) -> list[str]:
    """Custom and Flex ops of a .tflite flatbuffer (their custom codes); empty = builtins only."""
    return [custom or name for name, custom in _op_codes(content) if name == "CUSTOM" or custom]


def _validate(path: str) -> None:
    with open(path, "rb") as f:
        extra = non_builtin_ops(f.read())
    if extra:
        raise ExportError(f"the LiteRT model holds non-builtin ops {sorted(set(extra))}")
    try:
        from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top

        Interpreter(model_path=path).allocate_tensors()
    except Exception as e:  # pylint: disable=broad-except
        raise ExportError(
            f"the LiteRT interpreter cannot load the converted model: {portable.first_line(e)}"
        ) from e


def _conversion_error(e: Exception) -> ExportError:
    pattern = r"'(tf\.[A-Za-z0-9_]+)' op is neither a custom op nor a flex op"
    ops = sorted(set(re.findall(pattern, str(e))))
    if ops:
        return ExportError(f"ops with no LiteRT builtin: {', '.join(ops)} (builtins only, no Flex)")
    lines = [l for l in str(e).splitlines() if "error" in l.lower()] or str(e).splitlines() or [""]
    return ExportError(f"the LiteRT converter failed: {lines[0].strip()[:300] or type(e).__name__}")


def _const(graph_def, name: str):
    for node in graph_def.node:
        if node.name == name and node.op == "Const":
            return tf.make_ndarray(node.attr["value"].tensor)
    return None


def new_axis_slices_to_expand_dims(graph_def) -> int:
    """Rewrites, in place, each ``StridedSlice`` that only inserts axes (unit strides, full ranges
    elsewhere, no ellipsis or shrink) as ``ExpandDims``; returns how many."""
    count = 0
    for node in list(graph_def.node):
        a = node.attr
        new = a["new_axis_mask"].i if node.op == "StridedSlice" else 0
        if not new or a["ellipsis_mask"].i or a["shrink_axis_mask"].i:
            continue
        strides = _const(graph_def, node.input[3].split(":")[0])
        if strides is None or not (strides == 1).all():
            continue
        others = ((1 << len(strides)) - 1) & ~new
        if (a["begin_mask"].i & others) != others or (a["end_mask"].i & others) != others:
            continue
        source, dtype = node.input[0], a["T"].type
        for axis in [i for i in range(len(strides)) if new >> i & 1]:
            const = graph_def.node.add(name=f"{node.name}/axis_{axis}", op="Const")
            const.attr["dtype"].type = tf.int32.as_datatype_enum
            const.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(axis, tf.int32))
            expand = graph_def.node.add(name=f"{node.name}/expand_{axis}", op="ExpandDims")
            expand.input.extend([source, const.name])
            expand.attr["T"].type = dtype
            expand.attr["Tdim"].type = tf.int32.as_datatype_enum
            source = expand.name
        node.op = "Identity"  # the slice's name now forwards the last ExpandDims
        del node.input[:]
        node.input.append(source)
        for key in list(a):
            if key != "T":
                del a[key]
        count += 1
    return count


def _frozen_without_new_axis_slices(concrete):
    """``concrete`` with its variables as constants and the axis-inserting slices rewritten.
    Converted with its variables instead, the file would hold resource variables that the
    interpreter leaves uninitialised (all-zero weights)."""
    from tensorflow.python.framework import convert_to_constants as c2c  # pylint: disable=g-import-not-at-top

    data = c2c._FunctionConverterDataInEager(  # pylint: disable=protected-access
        func=concrete, lower_control_flow=True, aggressive_inlining=False
    )
    graph_def, converted = c2c._replace_variables_by_constants(converter_data=data)  # pylint: disable=protected-access
    new_axis_slices_to_expand_dims(graph_def)
    return c2c._construct_concrete_function(concrete, graph_def, converted)  # pylint: disable=protected-access


def export_litert(
    model,
    path: str | os.PathLike,
    category_map,
    resize: ResizeConfig,
    *,
    num_detections: int = NUM_DETECTIONS,
    quantization: str = "none",
) -> str:
    """Writes ``path`` (.tflite) and its sidecars; returns ``path``. ``resize``: the model's.
    ``quantization``: "none", "float16" (weights) or "dynamic_int8" (dynamic range). Raises
    `ExportError` (writing nothing) for an op with no builtin or a file that does not load."""
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    start = time.time()
    category_map = portable.prepare_export(model, category_map, resize)
    concrete, keys = portable.portable_detect_function(
        model, resize, num_detections=num_detections, resized_input=True
    )
    frozen = _frozen_without_new_axis_slices(concrete)
    specs = concrete.structured_input_signature[0]

    @tf.function(input_signature=specs)
    def serve(images, image_sizes):
        return dict(zip(keys, frozen(images, image_sizes)))  # outputs in nest order: sorted keys

    # Through a SavedModel, so the file has a "serving_default" signature (the converter's own
    # SavedModel step fails on the custom gradients it does not need).
    with tempfile.TemporaryDirectory(prefix="fpn_tf_litert_") as tmp:
        tf.saved_model.save(
            tf.Module(),
            tmp,
            signatures={"serving_default": serve.get_concrete_function()},
            options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
        )
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
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
        resize,
        num_detections,
        keys,
        input="images: float32 [1, Hp, Wp, 3], the image resized by `resize` (RGB 0..255), zero "
        "padded to multiples of resize.pad_multiple; image_sizes: int32 [1, 4] = height, width, "
        "resized height, resized width (fpn_tf.portable_client.resize_for_litert)",
        quantization=quantization,
    )
    return portable.write_export(path, content, _validate, category_map, config, start)
