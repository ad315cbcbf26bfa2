"""Runs the ONNX and LiteRT exports of `python -m fpn_tf.export` without TensorFlow.

NumPy, PIL and the runtime only (``onnxruntime`` or ``ai_edge_litert``): this module imports
neither TensorFlow nor the rest of fpn_tf (`fpn_tf.serving` imports TensorFlow, hence a module of
its own), so it runs where TensorFlow does not (a phone's Python, an edge box).

    from fpn_tf.portable_client import load_detector
    detector = load_detector("exports/cpu_demo.tflite")     # or .onnx
    out = detector(pixels)          # uint8 [h, w, 3] RGB -> the outputs of docs/serving.md
    names = detector.class_names    # dataset id -> name (the sidecar category map)

Every export has sidecars beside it (``<stem>.category_map.json``, ``<stem>.label_map.pbtxt``,
``<stem>.serving_config.json``). The ONNX model takes ``images`` uint8 [batch, height, width, 3]
of any size and resizes inside, as the SavedModel's ``serving_default``. The LiteRT model has
one fixed input size ``(H, W)`` (``serving_config.json``'s ``input_size``): :func:`letterbox`
scales an image to fit it (aspect ratio kept, bilinear), pads the bottom and right with zeros,
and :func:`unletterbox_boxes` maps the normalised boxes back to the original image.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

__all__ = [
    "LiteRTDetector",
    "OnnxDetector",
    "letterbox",
    "load_detector",
    "read_serving_config",
    "sidecar_path",
    "unletterbox_boxes",
]

CATEGORY_MAP_SUFFIX = ".category_map.json"
LABEL_MAP_SUFFIX = ".label_map.pbtxt"
SERVING_CONFIG_SUFFIX = ".serving_config.json"


def sidecar_path(model_path: str | os.PathLike, suffix: str) -> str:
    """``exports/a.onnx`` + ``.category_map.json`` -> ``exports/a.category_map.json``."""
    return os.path.splitext(os.fspath(model_path))[0] + suffix


def read_serving_config(model_path: str | os.PathLike) -> dict[str, Any]:
    with open(sidecar_path(model_path, SERVING_CONFIG_SUFFIX), encoding="utf-8") as f:
        return json.load(f)


def read_class_names(model_path: str | os.PathLike) -> dict[int, str]:
    """Dataset id -> name from the export's ``<stem>.category_map.json``."""
    with open(sidecar_path(model_path, CATEGORY_MAP_SUFFIX), encoding="utf-8") as f:
        return {int(c["id"]): str(c["name"]) for c in json.load(f)["categories"]}


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """uint8 [h, w, 3] -> (uint8 [H, W, 3], scale): the image scaled by
    ``scale = min(H / h, W / w)`` (PIL bilinear, sizes rounded), at the top left of a zero
    canvas of ``size``. An image of exactly ``size`` is returned as it is (scale 1)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"need uint8 [height, width, 3] RGB, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    height, width = int(size[0]), int(size[1])
    if (h, w) == (height, width):
        return image, 1.0
    scale = min(height / h, width / w)
    rh, rw = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    resized = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR))
    canvas = np.zeros((height, width, 3), np.uint8)
    canvas[:rh, :rw] = resized
    return canvas, scale


def unletterbox_boxes(
    boxes: np.ndarray, image_size: tuple[int, int], size: tuple[int, int], scale: float
) -> np.ndarray:
    """Normalised boxes of the letterboxed canvas of ``size`` -> normalised boxes of the
    original image of ``image_size`` (clipped to [0, 1]); zero rows stay zero."""
    h, w = image_size
    factor = np.array(
        [
            size[0] / (scale * h),
            size[1] / (scale * w),
            size[0] / (scale * h),
            size[1] / (scale * w),
        ],
        np.float32,
    )
    return np.clip(np.asarray(boxes, np.float32) * factor, 0.0, 1.0)


class _Detector:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such model file")
        self.config = read_serving_config(self.path)
        self.class_names = read_class_names(self.path)

    def class_name(self, class_id: int) -> str:
        return self.class_names.get(int(class_id), str(int(class_id)))


class OnnxDetector(_Detector):
    """An ONNX export in ONNX Runtime (CPU): ``detector(images)`` takes uint8 [h, w, 3] or
    [batch, h, w, 3] (one size per batch) and returns the outputs of docs/serving.md (NumPy,
    with a batch axis)."""

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
        if images.ndim == 3:
            images = images[None]
        values = self.session.run(self.output_names, {"images": images})
        return dict(zip(self.output_names, values))


class LiteRTDetector(_Detector):
    """A LiteRT export in ``ai_edge_litert``'s Interpreter (default XNNPACK delegate):
    ``detector(image)`` takes one uint8 [h, w, 3] image of any size, letterboxes it into the
    model's fixed input, and returns the outputs of docs/serving.md (batch axis of 1) with the
    boxes normalised to the original image."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        super().__init__(path)
        from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top

        self.interpreter = Interpreter(model_path=self.path, num_threads=num_threads)
        self.runner = self.interpreter.get_signature_runner()
        self.input_size = tuple(int(v) for v in self.config["input_size"])

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        image = np.asarray(image)
        if image.ndim == 4:
            if image.shape[0] != 1:
                raise ValueError(f"a LiteRT export takes one image at a time, got {image.shape}")
            image = image[0]
        canvas, scale = letterbox(image, self.input_size)
        out = {k: np.array(v) for k, v in self.runner(images=canvas[None]).items()}
        out["detection_boxes"] = unletterbox_boxes(
            out["detection_boxes"], image.shape[:2], self.input_size, scale
        )
        return out


def load_detector(path: str | os.PathLike, num_threads: int | None = None) -> _Detector:
    """An `OnnxDetector` for ``.onnx``, a `LiteRTDetector` for ``.tflite``."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix == ".onnx":
        return OnnxDetector(path, num_threads)
    if suffix == ".tflite":
        return LiteRTDetector(path, num_threads)
    raise ValueError(f"{os.fspath(path)}: not an .onnx or .tflite file")
