"""The detector as one graph that ONNX and LiteRT converters take.

Every op has an ONNX and a LiteRT builtin counterpart: RoIAlign as one batched gather
(``align_impl="gather"``) and greedy NMS per image (``nms_impl="per_image"``);
:func:`portable_settings` puts them on the model only while the export is traced.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from absl import logging
import tensorflow as tf

from fpn_tf.configs.experiment import ResizeConfig
from fpn_tf.data import transforms
from fpn_tf.data.category_map import as_category_map
from fpn_tf.serving.detection import NUM_DETECTIONS, ImageTensorModule
from fpn_tf.serving.export import ExportError, _check_category_map, label_map_pbtxt

__all__ = [
    "UnsupportedModelError",
    "portable_detect_function",
    "portable_settings",
    "prepare_export",
    "serving_config",
    "write_export",
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
    changes = [(model.rpn, "nms_impl", "per_image"), (model.roi_heads, "nms_impl", "per_image")]
    for pooler in (model.roi_heads.box_pooler, model.roi_heads.mask_pooler):
        if pooler is not None:
            changes.append((pooler.config, "align_impl", "gather"))
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in changes]
    try:
        for obj, attr, value in changes:
            setattr(obj, attr, value)
        yield model
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def prepare_export(model, category_map, resize: ResizeConfig):
    """Checks an ONNX / LiteRT export's arguments; returns the `CategoryMap`."""
    resize.validate_section("resize.")
    with portable_settings(model):
        pass
    if resize.method != "bilinear":
        raise UnsupportedModelError(
            f"eval_data.resize.method {resize.method!r} is not exported to ONNX or LiteRT (only "
            "'bilinear'); export with --params_override=eval_data.resize.method=bilinear (the "
            "detections then differ from the SavedModel's on resized images)"
        )
    category_map = as_category_map(category_map)
    _check_category_map(model, category_map)
    return category_map


def portable_detect_function(
    model,
    resize: ResizeConfig,
    *,
    num_detections: int = NUM_DETECTIONS,
    resized_input: bool = False,
):
    """``(concrete_function, output_keys)`` of the detector; outputs as docs/serving.md.

    ``resized_input=False`` (ONNX): ``images`` uint8 [B, H, W, 3], resized inside as
    ``serving_default``. ``resized_input=True`` (LiteRT, batch 1): ``images`` float32
    [1, Hp, Wp, 3] already resized and zero padded, and ``image_sizes`` int32 [1, 4] (original
    h, w, resized h, w).
    """
    formatter = ImageTensorModule(model, resize, num_detections=num_detections)

    def run(x, size, resized, batch):
        info = tf.stack([size, resized, resized / size, tf.zeros([2], tf.float32)])
        out = model({"images": x, "image_info": tf.tile(info[None], [batch, 1, 1])}, training=False)
        sizes = tf.tile(tf.cast(size, tf.int32)[None], [batch, 1])
        return formatter.format_outputs(out, sizes)

    def detect_uint8(images):
        shape = tf.shape(images)
        size = tf.cast(shape[1:3], tf.float32)
        resized = transforms.resized_size(size, resize)
        padded = transforms.ceil_to_multiple_tf(resized, resize.pad_multiple)
        pad = tf.cast(padded - resized, tf.int32)
        x = tf.image.resize(tf.cast(images, tf.float32), tf.cast(resized, tf.int32))
        x = tf.pad(x, [[0, 0], [0, pad[0]], [0, pad[1]], [0, 0]])
        return run(x, size, resized, shape[0])

    def detect_resized(images, image_sizes):
        sizes = tf.cast(image_sizes[0], tf.float32)
        return run(images, sizes[:2], sizes[2:], 1)

    if resized_input:
        fn = detect_resized
        specs = [
            tf.TensorSpec([1, None, None, 3], tf.float32, name="images"),
            tf.TensorSpec([1, 4], tf.int32, name="image_sizes"),
        ]
    else:
        fn, specs = detect_uint8, [tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")]
    with portable_settings(model):
        concrete = tf.function(fn, input_signature=specs, autograph=False).get_concrete_function()
    return concrete, sorted(concrete.structured_outputs)


def serving_config(fmt: str, resize: ResizeConfig, num_detections: int, outputs, **extra) -> dict:
    """The ``<stem>.serving_config.json`` of an ONNX / LiteRT export."""
    return {
        "format": fmt,
        "resize": resize.to_dict(),
        "num_detections": int(num_detections),
        "outputs": list(outputs),
        "boxes": "normalised [ymin, xmin, ymax, xmax] relative to the input image",
        "classes": "dataset category ids (see the category map beside the model)",
        **extra,
    }


def write_export(path, content: bytes, validate, category_map, config: dict, start: float) -> str:
    """Writes ``content`` to ``path`` once ``validate`` (raising `ExportError` to refuse) has
    loaded it from a ``.partial`` sibling, then the sidecars; returns ``path``."""
    from fpn_tf import portable_client as client  # pylint: disable=g-import-not-at-top

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ExportError(f"{path}: is a directory; give a file path")
    sidecars = {
        client.sidecar_path(path, client.CATEGORY_MAP_SUFFIX): category_map.to_json() + "\n",
        client.sidecar_path(path, client.LABEL_MAP_SUFFIX): label_map_pbtxt(category_map),
        client.sidecar_path(path, client.SERVING_CONFIG_SUFFIX): json.dumps(config, indent=1)
        + "\n",
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partials = {p: p + ".partial" for p in [*sidecars, path]}
    try:
        with open(partials[path], "wb") as f:
            f.write(content)
        validate(partials[path])
        for p, text in sidecars.items():
            with open(partials[p], "w", encoding="utf-8") as f:
                f.write(text)
        for p, partial in partials.items():
            os.replace(partial, p)
    finally:
        for partial in partials.values():
            if os.path.exists(partial):
                os.remove(partial)
    seconds, megabytes = time.time() - start, len(content) / 1e6
    logging.info(
        "Exported %s to %s in %.1f s (%.1f MB)", config["format"], path, seconds, megabytes
    )
    return path


def first_line(e: Exception) -> str:
    """The first line of an exception's message (its type for an empty one), <= 300 chars."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
