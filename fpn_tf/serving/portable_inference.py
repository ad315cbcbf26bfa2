"""`fpn_tf.predict` on an ONNX or LiteRT export: the `SavedModelDetector` interface over
`fpn_tf.portable_client`, so the same images give the same drawings and JSON from each format."""

from __future__ import annotations

import os
import time

import numpy as np

from fpn_tf.serving.inference import ImageDetections, PredictError, detections_of

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
        return ImageDetections(
            path=path,
            image=image,
            detections=detections_of(out, image, self.class_name),
            signature=self.signature,
            seconds=seconds,
        )
