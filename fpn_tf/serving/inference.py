"""Runs an exported SavedModel on image files and draws what it finds.

Needs only TensorFlow, numpy and PIL (not Keras or the model code): any SavedModel with the
outputs of docs/serving.md works. Served ``detection_masks`` are pasted into the image, drawn as
an overlay and written to the JSON as COCO RLEs.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
import tensorflow as tf

from fpn_tf.data.images import DECODABLE_FORMATS
from fpn_tf.errors import UserError
from fpn_tf.ops import mask_ops

__all__ = [
    "Detection",
    "ImageDetections",
    "PredictError",
    "SavedModelDetector",
    "detections_of",
    "draw_detections",
    "read_image",
]

# Formats whose bytes the image_bytes signature decodes; others (TIFF, WebP, ...) are decoded
# here with PIL and sent as pixels to serving_default.
_TF_DECODABLE = DECODABLE_FORMATS
# Distinct, readable box colours (Tableau 10), one per class id.
_PALETTE = tuple(
    tuple(int(c[i : i + 2], 16) for i in (0, 2, 4))
    for c in "1f77b4 ff7f0e 2ca02c d62728 9467bd 8c564b e377c2 7f7f7f bcbd22 17becf".split()
)


class PredictError(UserError, ValueError):
    """A missing or unreadable input; the message is one line naming the file."""


@dataclasses.dataclass
class Detection:
    box: tuple[float, float, float, float]  # normalised ymin, xmin, ymax, xmax in [0, 1]
    box_pixels: tuple[float, float, float, float]  # the same in pixels of the input image
    class_id: int  # the dataset's category id
    class_name: str
    score: float
    # float32 [M, M] mask probabilities over the box (box-relative), for models with masks.
    mask: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "box_pixels": [round(v, 2) for v in self.box_pixels],
            "box_normalized": [round(v, 6) for v in self.box],
            "class_id": self.class_id,
            "class_name": self.class_name,
            "score": round(self.score, 6),
        }


MASK_THRESHOLD = 0.5


def image_masks(detections: Sequence[Detection], height: int, width: int) -> np.ndarray:
    """bool [N, height, width]: the detections' masks pasted into the image, ``>= 0.5``
    (detections without a mask give all-False rows)."""
    out = np.zeros((len(detections), height, width), bool)
    rows = [i for i, d in enumerate(detections) if d.mask is not None]
    if rows:
        masks = np.stack([detections[i].mask for i in rows]).astype(np.float32)
        boxes = np.array([detections[i].box_pixels for i in rows], np.float32)
        pasted = mask_ops.paste_masks(masks, boxes, (height, width)).numpy()
        out[rows] = pasted >= MASK_THRESHOLD
    return out


@dataclasses.dataclass
class ImageDetections:
    path: str | None
    image: Image.Image  # RGB, as the model saw it
    detections: list[Detection]  # by decreasing score
    signature: str
    seconds: float

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def width(self) -> int:
        return self.image.width

    def filter(self, min_score: float) -> "ImageDetections":
        return dataclasses.replace(
            self, detections=[d for d in self.detections if d.score >= min_score]
        )

    def to_json(self) -> dict[str, Any]:
        detections = [d.to_json() for d in self.detections]
        if any(d.mask is not None for d in self.detections):
            from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top

            masks = image_masks(self.detections, self.height, self.width)
            for entry, mask in zip(detections, masks):
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                entry["segmentation"] = {
                    "size": list(rle["size"]),
                    "counts": rle["counts"].decode(),
                }
        return {
            "image": self.path,
            "height": self.height,
            "width": self.width,
            "signature": self.signature,
            "num_detections": len(self.detections),
            "detections": detections,
        }


def read_image(path: str | os.PathLike) -> tuple[bytes, Image.Image]:
    """The file's bytes and its decoded RGB image; `PredictError` when it is missing or not an
    image PIL can read."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise PredictError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise PredictError(f"{path}: is a directory, not an image file") from None
    except OSError as e:
        raise PredictError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise PredictError(f"{path}: not an image (PIL cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise PredictError(f"{path}: a damaged or unsupported image ({e})") from None
    fmt = image.format
    image = image.convert("RGB")
    image.format = fmt  # convert() drops it; kept to choose the signature
    return data, image


def detections_of(outputs, image: Image.Image, class_name) -> list[Detection]:
    """The `Detection`s of the first image of a served batch (the output names of
    docs/serving.md; TensorFlow tensors or NumPy arrays), ``image`` the input it was given
    (its size scales the normalised boxes to pixels), ``class_name(id)`` the names."""
    n = int(np.asarray(outputs["num_detections"])[0])

    def rows(key):
        return np.asarray(outputs[key])[0, :n]

    masks = rows("detection_masks") if "detection_masks" in outputs else [None] * n
    scale = np.array([image.height, image.width] * 2, np.float32)
    return [
        Detection(
            box=tuple(float(v) for v in b),
            box_pixels=tuple(float(v) for v in b * scale),
            class_id=int(round(c)),
            class_name=class_name(int(round(c))),
            score=float(s),
            mask=m,
        )
        for b, s, c, m in zip(
            rows("detection_boxes"), rows("detection_scores"), rows("detection_classes"), masks
        )
    ]


class SavedModelDetector:
    """An exported detector loaded with ``tf.saved_model.load``. ``signature``: "auto"
    (``image_bytes`` for JPEG/PNG/GIF/BMP files when the model has it, else pixels to
    ``serving_default``), "image_bytes" or "serving_default"."""

    def __init__(self, saved_model_dir: str | os.PathLike, signature: str = "auto"):
        saved_model_dir = os.fspath(saved_model_dir)
        if not tf.io.gfile.exists(os.path.join(saved_model_dir, "saved_model.pb")):
            isdir = tf.io.gfile.isdir(saved_model_dir)
            what = "no saved_model.pb in it" if isdir else "no such directory"
            raise PredictError(f"{saved_model_dir}: not a SavedModel ({what})")
        if signature not in ("auto", "image_bytes", "serving_default"):
            raise PredictError(
                f"signature must be auto, image_bytes or serving_default, got {signature!r}"
            )
        start = time.time()
        self.path = saved_model_dir
        self._loaded = tf.saved_model.load(saved_model_dir)
        self.signatures = dict(self._loaded.signatures)
        wanted = ["serving_default"] if signature == "auto" else [signature]
        missing = [s for s in wanted if s not in self.signatures]
        if missing:
            raise PredictError(
                f"{saved_model_dir}: the SavedModel has no {missing[0]!r} "
                f"signature (it has {sorted(self.signatures)})"
            )
        self.signature = signature
        self.class_names = self._read_class_names()
        self.load_seconds = time.time() - start

    def _read_class_names(self) -> dict[int, str]:
        path = os.path.join(self.path, "assets", "category_map.json")
        if not tf.io.gfile.exists(path):
            return {}
        from fpn_tf.data.category_map import CategoryMap  # pylint: disable=g-import-not-at-top

        return CategoryMap.from_json(path).dataset_id_to_name()

    def class_name(self, class_id: int) -> str:
        return self.class_names.get(class_id, f"class {class_id}")

    def _signature_for(self, image: Image.Image) -> str:
        if self.signature != "auto":
            return self.signature
        if "image_bytes" in self.signatures and image.format in _TF_DECODABLE:
            return "image_bytes"
        return "serving_default"

    def detect(self, data: bytes, image: Image.Image, path: str | None = None) -> ImageDetections:
        """Detections of one image given as its file bytes and its decoded RGB image (as
        `read_image` returns them); `PredictError` when the model rejects it."""
        signature = self._signature_for(image)
        start = time.time()
        try:
            if signature == "image_bytes":
                out = self.signatures[signature](image_bytes=tf.constant([data]))
            else:
                pixels = np.asarray(image, np.uint8)[None]
                out = self.signatures[signature](images=tf.constant(pixels))
        except tf.errors.InvalidArgumentError as e:
            # e.g. a JPEG that PIL reads but TensorFlow's decoder finds damaged.
            lines = [
                l
                for l in (e.message or str(e)).strip().splitlines()
                if l.strip()
                and not l.startswith(("Graph execution", "Detected at", "<stack", "\t"))
            ]
            raise PredictError(
                f"{path or 'image'}: the model could not use it: {lines[0] if lines else e}"
            ) from None
        seconds = time.time() - start
        detections = detections_of(out, image, self.class_name)
        return ImageDetections(path, image, detections, signature, seconds)

    def detect_file(self, path: str | os.PathLike) -> ImageDetections:
        data, image = read_image(path)
        return self.detect(data, image, os.fspath(path))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


MASK_ALPHA = 0.45


def draw_detections(image: Image.Image, detections: Sequence[Detection]) -> Image.Image:
    """A copy of ``image`` with each detection's mask (a translucent overlay in its class colour,
    when it has one), box and "name score" label drawn on it."""
    out = image.convert("RGB")
    if any(d.mask is not None for d in detections):
        pixels = np.asarray(out, np.float32)
        masks = image_masks(detections, out.height, out.width)
        for d, mask in sorted(zip(detections, masks), key=lambda dm: dm[0].score):
            color = np.array(_PALETTE[d.class_id % len(_PALETTE)], np.float32)
            pixels[mask] = (1 - MASK_ALPHA) * pixels[mask] + MASK_ALPHA * color
        out = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    line = max(2, round(min(out.size) / 200))
    font = _font(max(10, round(min(out.size) / 40)))
    # Lowest score first, so the best boxes end up on top.
    for d in sorted(detections, key=lambda d: d.score):
        color = _PALETTE[d.class_id % len(_PALETTE)]
        y0, x0, y1, x1 = d.box_pixels
        draw.rectangle([x0, y0, x1, y1], outline=color, width=line)
        label = f"{d.class_name} {d.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left, bottom - top
        ty = y0 - th - 2 * line if y0 - th - 2 * line >= 0 else y0
        draw.rectangle([x0, ty, x0 + tw + 2 * line, ty + th + 2 * line], fill=color)
        draw.text((x0 + line - left, ty + line - top), label, fill=(255, 255, 255), font=font)
    return out
