"""`fpn_tf.predict` on an ONNX or LiteRT export: the `SavedModelDetector` interface over
`fpn_tf.portable_client`, so the same images give the same drawings and JSON from each format."""

from __future__ import annotations

import os
import time

import numpy as np

from fpn_tf.serving.inference import Detection, ImageDetections, PredictError

__all__ = ["PORTABLE_SUFFIXES", "PortableDetector"]

PORTABLE_SUFFIXES = (".onnx", ".tflite")


class PortableDetector:
    """An ``.onnx`` (ONNX Runtime) or ``.tflite`` (LiteRT) export with its sidecars."""

    def __init__(self, path: str | os.PathLike):
        from fpn_tf import portable_client  # pylint: disable=g-import-not-at-top

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise PredictError(f"{path}: no such model file")
        start = time.time()
        try:
            self._detector = portable_client.load_detector(path)
        except ImportError as e:
            raise PredictError(
                f"{path}: its runtime is not installed ({e}); pip install -e '.[export]'"
            ) from None
        except (OSError, ValueError) as e:
            raise PredictError(f"{path}: cannot load it: {str(e).splitlines()[0]}") from None
        self.path = path
        self.signature = os.path.splitext(path)[1].lstrip(".")
        self.signatures = {self.signature: None}
        self.class_names = self._detector.class_names
        self.load_seconds = time.time() - start

    def class_name(self, class_id: int) -> str:
        return self.class_names.get(class_id, f"class {class_id}")

    def detect(self, data: bytes, image, path: str | None = None) -> ImageDetections:
        del data  # decoded by PIL (read_image); the exports take pixels
        start = time.time()
        out = self._detector(np.asarray(image, np.uint8))
        seconds = time.time() - start
        n = int(out["num_detections"][0])
        boxes = np.asarray(out["detection_boxes"][0, :n])
        scores = np.asarray(out["detection_scores"][0, :n])
        classes = np.asarray(out["detection_classes"][0, :n])
        masks = out["detection_masks"][0, :n] if "detection_masks" in out else [None] * n
        scale = np.array([image.height, image.width] * 2, np.float32)
        detections = [
            Detection(
                box=tuple(float(v) for v in b),
                box_pixels=tuple(float(v) for v in b * scale),
                class_id=int(round(c)),
                class_name=self.class_name(int(round(c))),
                score=float(s),
                mask=None if m is None else np.asarray(m),
            )
            for b, s, c, m in zip(boxes, scores, classes, masks)
        ]
        return ImageDetections(
            path=path, image=image, detections=detections, signature=self.signature, seconds=seconds
        )
