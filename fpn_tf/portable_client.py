"""Runs the ONNX and LiteRT exports of `python -m fpn_tf.export` without TensorFlow.

NumPy and the runtime only (``onnxruntime`` or ``ai_edge_litert``): no TensorFlow or other fpn_tf
imports, so it runs where TensorFlow does not. The ONNX model resizes inside; the LiteRT model
takes the image already resized (:func:`resize_for_litert`, the export's resize in NumPy).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

__all__ = [
    "LiteRTDetector",
    "OnnxDetector",
    "load_detector",
    "read_serving_config",
    "resize_bilinear",
    "resize_for_litert",
    "resized_size",
    "sidecar_path",
]

CATEGORY_MAP_SUFFIX = ".category_map.json"
LABEL_MAP_SUFFIX = ".label_map.pbtxt"
SERVING_CONFIG_SUFFIX = ".serving_config.json"


def sidecar_path(model_path: str | os.PathLike, suffix: str) -> str:
    """``exports/a.onnx`` + ``.category_map.json`` -> ``exports/a.category_map.json``."""
    return os.path.splitext(os.fspath(model_path))[0] + suffix


def read_serving_config(model_path: str | os.PathLike) -> dict[str, Any]:
    """The ``<stem>.serving_config.json`` beside an ONNX / LiteRT file."""
    path = sidecar_path(model_path, SERVING_CONFIG_SUFFIX)
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config.get("resize"), dict):
        raise ValueError(
            f"{path} has no 'resize' section: export the model again with fpn_tf.export"
        )
    return config


def resized_size(
    height: int, width: int, short_side: int, max_long_side: int, rounding: str
) -> tuple[int, int]:
    """`fpn_tf.data.transforms.resized_size` in NumPy, with its arithmetic (float32 and half to
    even for ``rounding`` "round", float64 for "floor" and "half_up")."""
    if rounding == "round":
        size = np.array([height, width], np.float32)
        by_short = np.round(size * (np.float32(short_side) / size.min()))
        by_long = np.round(size * (np.float32(max_long_side) / size.max()))
        out = by_long if by_short.max() > max_long_side else by_short
    elif rounding == "floor":
        size = np.array([height, width], np.float64)
        out = np.floor(size * min(short_side / size.min(), max_long_side / size.max()))
    elif rounding == "half_up":  # detectron2's ResizeShortestEdge
        scale = short_side / min(height, width)
        h, w = (
            (scale * height, float(short_side)) if height >= width else (short_side, scale * width)
        )
        if max(h, w) > max_long_side:
            h, w = h * (max_long_side / max(h, w)), w * (max_long_side / max(h, w))
        out = np.floor(np.array([h, w]) + 0.5)
    else:
        raise ValueError(f"rounding {rounding!r} is not round, floor or half_up")
    return int(out[0]), int(out[1])


def _taps(in_size: int, out_size: int):
    scale = np.float32(in_size) / np.float32(out_size)
    x = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(x)
    lower = np.maximum(floor, 0).astype(np.int64)
    upper = np.minimum(np.ceil(x), in_size - 1).astype(np.int64)
    return lower, upper, (x - floor).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``tf.image.resize(image, size)`` (bilinear, half-pixel centres, no anti-aliasing) in
    NumPy float32: [h, w, c] -> float32 [height, width, c]."""
    image = np.asarray(image, np.float32)
    y0, y1, dy = _taps(image.shape[0], int(size[0]))
    x0, x1, dx = _taps(image.shape[1], int(size[1]))
    dx = dx[None, :, None]
    top, bottom = image[y0], image[y1]
    top = top[:, x0] + (top[:, x1] - top[:, x0]) * dx
    bottom = bottom[:, x0] + (bottom[:, x1] - bottom[:, x0]) * dx
    return top + (bottom - top) * dy[:, None, None]


def resize_for_litert(image: np.ndarray, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """uint8 [h, w, 3] RGB -> the LiteRT export's inputs: ``images`` float32 [1, Hp, Wp, 3] (the
    image resized by the serving config's ``resize``, zero padded bottom/right to multiples of
    its ``pad_multiple``) and ``image_sizes`` int32 [[h, w, resized h, resized w]]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"need uint8 [height, width, 3] RGB, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    resize = config["resize"]
    rh, rw = resized_size(h, w, resize["short_side"], resize["max_long_side"], resize["rounding"])
    m = int(resize["pad_multiple"])
    canvas = np.zeros((1, -(-rh // m) * m, -(-rw // m) * m, 3), np.float32)
    canvas[0, :rh, :rw] = resize_bilinear(image, (rh, rw))
    return {"images": canvas, "image_sizes": np.array([[h, w, rh, rw]], np.int32)}


class _Detector:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such model file")
        self.config = read_serving_config(self.path)
        with open(sidecar_path(self.path, CATEGORY_MAP_SUFFIX), encoding="utf-8") as f:
            categories = json.load(f)["categories"]
        self.class_names = {int(c["id"]): str(c["name"]) for c in categories}


class OnnxDetector(_Detector):
    """An ONNX export in ONNX Runtime (CPU): ``detector(images)`` takes uint8 [h, w, 3] or
    [batch, h, w, 3] (one size per batch); NumPy outputs with a batch axis."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        super().__init__(path)
        import onnxruntime as ort  # pylint: disable=g-import-not-at-top

        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images, np.uint8)
        values = self.session.run(
            self.output_names, {"images": images[None] if images.ndim == 3 else images}
        )
        return dict(zip(self.output_names, values))


class LiteRTDetector(_Detector):
    """A LiteRT export in ``ai_edge_litert``'s Interpreter (default XNNPACK delegate):
    ``detector(image)`` takes one uint8 [h, w, 3] image (or [1, h, w, 3]); NumPy outputs with a
    batch axis of 1."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        super().__init__(path)
        from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top

        self.interpreter = Interpreter(model_path=self.path, num_threads=num_threads)
        self.runner = self.interpreter.get_signature_runner()

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        image = np.asarray(image)
        if image.ndim == 4:
            if image.shape[0] != 1:
                raise ValueError(f"a LiteRT export takes one image at a time, got {image.shape}")
            image = image[0]
        out = self.runner(**resize_for_litert(image, self.config))
        return {k: np.array(v) for k, v in out.items()}


def load_detector(path: str | os.PathLike, num_threads: int | None = None) -> _Detector:
    """An `OnnxDetector` for ``.onnx``, a `LiteRTDetector` for ``.tflite``."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    kinds = {".onnx": OnnxDetector, ".tflite": LiteRTDetector}
    if suffix not in kinds:
        raise ValueError(f"{os.fspath(path)}: not an .onnx or .tflite file")
    return kinds[suffix](path, num_threads)
