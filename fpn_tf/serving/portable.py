"""The detector as one graph that converters outside TensorFlow can take (ONNX, LiteRT).

`portable_detect_function` wraps a `FasterRCNN` (with or without masks) into a ``tf.function``
``images uint8 [B, H, W, 3] -> the outputs of docs/serving.md`` whose ops all have ONNX and
LiteRT builtin counterparts:

* the resize of the SavedModel's ``serving_default`` (`fpn_tf.data.transforms.resized_size`,
  bilinear, zero padded bottom/right to a multiple of ``pad_multiple``) done once for the whole
  batch (all images of a dense batch share one size, so no loop over images is needed, unlike
  `fpn_tf.serving.detection.preprocess_images`);
* RoIAlign as one batched gather (``align_impl="gather"``, the same samples as the
  ``CropAndResize`` path, which neither ONNX Runtime's ``RoiAlign`` semantics nor LiteRT
  builtins reproduce);
* NMS as the greedy per-image kernel (``nms_impl="per_image"``: ``NonMaxSuppressionV3/V5`` in a
  loop over the batch), never ``CombinedNonMaxSuppression`` (no LiteRT builtin, no ONNX op).

These settings are put on the model only while the function is traced
(:func:`portable_settings`) and are the ones its config documents as giving the same samples /
the same boxes as the others (``model.roi.align_impl``, ``model.rpn.nms_impl``,
``model.detection.nms_impl``), so the exported graph computes the SavedModel's detections.
"""

from __future__ import annotations

import contextlib
import json
import os

import tensorflow as tf

from fpn_tf.data import transforms
from fpn_tf.serving.detection import NUM_DETECTIONS, ImageTensorModule
from fpn_tf.serving.export import ExportError

__all__ = [
    "UnsupportedModelError",
    "portable_detect_function",
    "portable_settings",
    "serving_config",
    "sidecar_files",
    "write_validated",
]


class UnsupportedModelError(ExportError):
    """A model the portable graph cannot hold (e.g. segment proposals); one line."""


@contextlib.contextmanager
def portable_settings(model):
    """Temporarily sets the model's RoIAlign to ``gather`` and its NMS to ``per_image``."""
    for attr in ("rpn", "roi_heads"):
        if not hasattr(model, attr):
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a Faster / Mask R-CNN (no {attr}): only "
                "detectors (model.architecture faster_rcnn or mask_rcnn) export to ONNX / LiteRT"
            )
    changes = [
        (model.rpn, "nms_impl", "per_image"),
        (model.roi_heads, "nms_impl", "per_image"),
        (model.roi_heads, "align_impl", "gather"),
    ]
    if getattr(model, "mask_heads", None) is not None:
        changes.append((model.mask_heads, "align_impl", "gather"))
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in changes]
    try:
        for obj, attr, value in changes:
            setattr(obj, attr, value)
        yield model
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def portable_detect_function(
    model,
    short_side: int,
    max_long_side: int,
    pad_multiple: int,
    *,
    resize_rounding: str = "round",
    resize_method: str = "bilinear",
    num_detections: int = NUM_DETECTIONS,
    batch_size: int | None = None,
    image_size: tuple[int, int] | None = None,
):
    """A concrete function ``images uint8 [B, H, W, 3]`` -> the serving outputs.

    Args:
      model: a `FasterRCNN` (Faster or Mask R-CNN).
      short_side, max_long_side, pad_multiple, resize_rounding: the eval resize rule.
      resize_method: only "bilinear" (``tf.image.resize``): detectron2's "pil_bilinear" is
        integer arithmetic with no equivalent here, and is refused (`UnsupportedModelError`).
      num_detections: rows of every output.
      batch_size, image_size: None for dynamic dimensions (ONNX), or fixed ones (LiteRT).

    Returns:
      ``(concrete_function, output_keys)``; outputs are a dict with the keys of docs/serving.md.
    """
    if resize_method != "bilinear":
        raise UnsupportedModelError(
            f"eval_data.resize_method {resize_method!r} is not exported to ONNX or LiteRT (only "
            "'bilinear'); export with --params_override=eval_data.resize_method=bilinear (the "
            "detections then differ from the SavedModel's on resized images)"
        )
    formatter = ImageTensorModule(
        model,
        short_side,
        max_long_side,
        pad_multiple,
        num_detections,
        resize_rounding=resize_rounding,
    )
    m = float(pad_multiple)

    def detect(images):
        shape = tf.shape(images)
        batch = shape[0]
        size = tf.cast(shape[1:3], tf.float32)
        resized = transforms.resized_size(size, short_side, max_long_side, resize_rounding)
        resized_int = tf.cast(resized, tf.int32)
        padded = tf.cast(tf.math.ceil(resized / m) * m, tf.int32)
        x = tf.image.resize(
            tf.cast(images, tf.float32), resized_int, method=tf.image.ResizeMethod.BILINEAR
        )
        pad = padded - resized_int
        x = tf.pad(x, [[0, 0], [0, pad[0]], [0, pad[1]], [0, 0]])
        info = tf.stack([size, resized, resized / size, tf.zeros([2], tf.float32)])
        info = tf.tile(info[None], [batch, 1, 1])
        out = model({"images": x, "image_info": info}, training=False)
        sizes = tf.tile(tf.cast(shape[1:3], tf.int32)[None], [batch, 1])
        return formatter.format_outputs(out, sizes)

    h, w = image_size if image_size is not None else (None, None)
    spec = tf.TensorSpec([batch_size, h, w, 3], tf.uint8, name="images")
    with portable_settings(model):
        fn = tf.function(detect, input_signature=[spec], autograph=False)
        concrete = fn.get_concrete_function()
    keys = sorted(concrete.structured_outputs)
    return concrete, keys


def sidecar_files(
    model_path: str,
    category_map,
    serving_config: dict,
) -> dict[str, str]:
    """``{path: text}`` of the files written beside an ONNX / LiteRT export: the category map
    (JSON, `CategoryMap`'s), the label map (TF Object Detection API text proto) and the
    serving config (resize rule, input, outputs)."""
    from fpn_tf import portable_client  # pylint: disable=g-import-not-at-top
    from fpn_tf.serving.export import label_map_pbtxt  # pylint: disable=g-import-not-at-top

    return {
        portable_client.sidecar_path(model_path, portable_client.CATEGORY_MAP_SUFFIX): (
            category_map.to_json() + "\n"
        ),
        portable_client.sidecar_path(model_path, portable_client.LABEL_MAP_SUFFIX): (
            label_map_pbtxt(category_map)
        ),
        portable_client.sidecar_path(model_path, portable_client.SERVING_CONFIG_SUFFIX): (
            json.dumps(serving_config, indent=1) + "\n"
        ),
    }


def write_validated(model_path: str, content: bytes, validate, sidecars: dict[str, str]) -> str:
    """Writes ``content`` to ``model_path`` only once ``validate(partial_path)`` has loaded it
    from a ``.partial`` sibling (so a file that fails at load time is never left in place),
    then the sidecars; returns ``model_path``. ``validate`` raises `ExportError` to refuse."""
    model_path = os.fspath(model_path)
    directory = os.path.dirname(os.path.abspath(model_path))
    if os.path.isdir(model_path):
        raise ExportError(f"{model_path}: is a directory; give a file path")
    os.makedirs(directory, exist_ok=True)
    partial = model_path + ".partial"
    try:
        with open(partial, "wb") as f:
            f.write(content)
        validate(partial)
        for path, text in sidecars.items():
            with open(path + ".partial", "w", encoding="utf-8") as f:
                f.write(text)
        for path in sidecars:
            os.replace(path + ".partial", path)
        os.replace(partial, model_path)
    finally:
        for path in [partial, *(p + ".partial" for p in sidecars)]:
            if os.path.exists(path):
                os.remove(path)
    return model_path


def serving_config(
    fmt: str,
    short_side: int,
    max_long_side: int,
    pad_multiple: int,
    resize_rounding: str,
    num_detections: int,
    outputs,
    **extra,
) -> dict:
    """The ``<stem>.serving_config.json`` of an ONNX / LiteRT export."""
    return {
        "format": fmt,
        "short_side": int(short_side),
        "max_long_side": int(max_long_side),
        "pad_multiple": int(pad_multiple),
        "resize_rounding": str(resize_rounding),
        "num_detections": int(num_detections),
        "input": "images: uint8 [batch, height, width, 3] RGB",
        "outputs": list(outputs),
        "boxes": "normalised [ymin, xmin, ymax, xmax] relative to the input image",
        "classes": "dataset category ids (see the category map beside the model)",
        **extra,
    }
