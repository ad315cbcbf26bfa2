"""Helpers that write tiny COCO-format datasets for tests (numpy + PIL only).

    ann_file, image_dir = write_tiny_coco(tmp_path)

gives a 4-image dataset with known pixels and boxes (see
:func:`write_tiny_coco`); :func:`write_image` and :func:`write_coco_json` build
custom ones. :func:`data_config` gives the settings of ``build_dataset``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from fpn_tf.configs.experiment import DataConfig, ResizeConfig

__all__ = [
    "TINY_CATEGORIES",
    "data_config",
    "decoded_examples",
    "write_coco_json",
    "write_image",
    "write_tiny_coco",
    "write_tiny_coco_with_truncated_png",
    "write_truncated_png",
]

# Non-contiguous ids: contiguous classes are 1 -> 1, 3 -> 2, 7 -> 3, 9 -> 4.
TINY_CATEGORIES = (
    {"id": 1, "name": "circle"},
    {"id": 3, "name": "square"},
    {"id": 7, "name": "triangle"},
    {"id": 9, "name": "ring"},
)


def data_config(resize: dict[str, Any] | None = None, **fields) -> DataConfig:
    """A ``DataConfig`` of ``fields`` and ``resize`` (its resize section's fields), source
    "synthetic": a test loads its source itself."""
    return DataConfig(source="synthetic", resize=ResizeConfig(**(resize or {})), **fields)


def write_image(
    path: str | os.PathLike, pixels: np.ndarray, fmt: str | None = None, quality: int = 95
) -> str:
    """Writes uint8 pixels ([h, w] gray, [h, w, 2|3|4]) as PNG or JPEG.

    The format follows the extension unless ``fmt`` is given.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fmt = fmt or ("PNG" if path.lower().endswith(".png") else "JPEG")
    pixels = np.asarray(pixels, np.uint8)
    mode = {2: "L", 3: None}.get(pixels.ndim)
    if pixels.ndim == 3:
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[-1]]
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
    Image.fromarray(pixels, mode=mode).save(
        path, format=fmt, **({"quality": quality} if fmt == "JPEG" else {})
    )
    return path


def write_coco_json(
    path: str | os.PathLike,
    images: Sequence[dict],
    annotations: Sequence[dict],
    categories: Sequence[dict] = TINY_CATEGORIES,
) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            {
                "images": list(images),
                "annotations": list(annotations),
                "categories": [dict(c) for c in categories],
            },
            f,
        )
    return path


def pattern(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB test pattern (uint8 [h, w, 3])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack(
        [(xx * 7 + yy * 3) % 256, (yy * 11) % 256, rng.integers(0, 256, (height, width))], -1
    )
    return img.astype(np.uint8)


def write_tiny_coco(
    root: str | os.PathLike,
    *,
    extra_images: Sequence[dict] = (),
    extra_annotations: Sequence[dict] = (),
) -> tuple[str, str]:
    """Writes a 4-image dataset; returns (annotation_file, image_dir).

    Images (all PNG, so pixels survive exactly):

    ==== ====================== ======= ==========================================
    id   file_name              h x w   annotations (COCO bbox x, y, w, h; cat)
    ==== ====================== ======= ==========================================
    10   a.png (RGB)            24 x 32 #100 [4, 2, 8, 6] cat 3;
                                        #101 [20, 10, 12, 14] cat 9 (right edge);
                                        #102 [0, 0, 32, 24] cat 1 crowd
    11   sub/dir/b.png (gray)   40 x 20 #103 [2, 4, 10, 30] cat 7
    12   c.png (RGBA)           16 x 16 none (a negative)
    13   d.png (RGB)            20 x 30 #104 [1, 1, 5, 5] cat 1
    ==== ====================== ======= ==========================================
    """
    root = os.fspath(root)
    image_dir = os.path.join(root, "images")
    write_image(os.path.join(image_dir, "a.png"), pattern(24, 32, 0))
    gray = (np.arange(40 * 20).reshape(40, 20) % 251).astype(np.uint8)
    write_image(os.path.join(image_dir, "sub/dir/b.png"), gray)
    rgba = np.concatenate([pattern(16, 16, 2), np.full((16, 16, 1), 77, np.uint8)], -1)
    write_image(os.path.join(image_dir, "c.png"), rgba)
    write_image(os.path.join(image_dir, "d.png"), pattern(20, 30, 3))
    images = [
        {"id": 10, "file_name": "a.png", "height": 24, "width": 32},
        {"id": 11, "file_name": "sub/dir/b.png", "height": 40, "width": 20},
        {"id": 12, "file_name": "c.png", "height": 16, "width": 16},
        {"id": 13, "file_name": "d.png", "height": 20, "width": 30},
    ] + list(extra_images)
    annotations: list[dict[str, Any]] = [
        {
            "id": 100,
            "image_id": 10,
            "bbox": [4, 2, 8, 6],
            "category_id": 3,
            "iscrowd": 0,
            "area": 48.0,
        },
        {
            "id": 101,
            "image_id": 10,
            "bbox": [20, 10, 12, 14],
            "category_id": 9,
            "iscrowd": 0,
            "area": 168.0,
        },
        {
            "id": 102,
            "image_id": 10,
            "bbox": [0, 0, 32, 24],
            "category_id": 1,
            "iscrowd": 1,
            "area": 500.0,
        },
        {
            "id": 103,
            "image_id": 11,
            "bbox": [2, 4, 10, 30],
            "category_id": 7,
            "iscrowd": 0,
            "area": 300.0,
        },
        {
            "id": 104,
            "image_id": 13,
            "bbox": [1, 1, 5, 5],
            "category_id": 1,
            "iscrowd": 0,
            "area": 25.0,
        },
    ] + list(extra_annotations)
    ann_file = write_coco_json(os.path.join(root, "annotations.json"), images, annotations)
    return ann_file, image_dir


def decoded_examples(source):
    """The per-image dicts of a loaded source (``load_coco(...)`` or a ``TfRecordIndex``) in
    file order, before any transform: ``source.item_dataset().map(source.decode)``."""
    return source.item_dataset().map(source.decode)


def write_truncated_png(path: str | os.PathLike, pixels: np.ndarray, keep: float = 1 / 3) -> str:
    """Writes ``pixels`` as PNG, then cuts the file to ``keep`` of its bytes.

    The header (format, size) stays readable, so the load-time "header" check passes and the
    file fails only when it is decoded.
    """
    path = write_image(path, pixels, fmt="PNG")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: max(33, int(len(data) * keep))])
    return path


def write_tiny_coco_with_truncated_png(root: str | os.PathLike) -> tuple[str, str]:
    """:func:`write_tiny_coco` plus image 14, ``broken.png`` (36 x 28, one box [2, 3, 20, 25] of
    category 3), truncated to a third of its bytes."""
    root = os.fspath(root)
    write_truncated_png(os.path.join(root, "images", "broken.png"), pattern(36, 28, 4))
    return write_tiny_coco(
        root,
        extra_images=[{"id": 14, "file_name": "broken.png", "height": 36, "width": 28}],
        extra_annotations=[
            {"id": 105, "image_id": 14, "bbox": [2, 3, 20, 25], "category_id": 3, "iscrowd": 0}
        ],
    )


def resized_hw(height, width, resize):
    """``transforms.resized_size`` of one image as Python ints."""
    import tensorflow as tf

    from fpn_tf.data import transforms

    h, w = transforms.resized_size(tf.constant([height, width]), resize).numpy()
    return int(h), int(w)
