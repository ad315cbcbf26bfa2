r"""A synthetic COCO-format detection dataset of coloured shapes.

    python -m fpn_tf.data.synthetic --output_dir=/tmp/shapes \
        --num_train=400 --num_val=100 --image_size=320,512

writes::

    <output_dir>/annotations/instances_train.json
    <output_dir>/annotations/instances_val.json
    <output_dir>/train/...  <output_dir>/val/...   (JPEG, every 4th image PNG,
                                                    every 3rd in a sub-folder)

Four classes with non-contiguous ids (1 circle, 3 square, 7 triangle, 9 ring) on gradient,
stripe or noise backgrounds; 0..``max_objects`` objects per image, log-uniform sizes, IoU <= 0.25
with earlier ones. Boxes are tight on the drawn pixels; each ``segmentation`` is the whole drawn
shape as RLE. Deterministic given ``seed`` (numpy + PIL; no TensorFlow).
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CATEGORIES", "generate_dataset", "generate_split", "render_image"]

CATEGORIES = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
    {"id": 9, "name": "ring", "supercategory": "shape"},
)
_BASE_COLOURS = {1: (220, 40, 40), 3: (40, 190, 60), 7: (40, 80, 230), 9: (235, 200, 30)}
_MAX_IOU = 0.25
_MAX_COVER = 0.3


def _overlap_ok(new, old) -> bool:
    """Limited overlap: IoU <= 0.25 and <= 30 % of the earlier box covered."""
    ix = max(0.0, min(new[0] + new[2], old[0] + old[2]) - max(new[0], old[0]))
    iy = max(0.0, min(new[1] + new[3], old[1] + old[3]) - max(new[1], old[1]))
    inter = ix * iy
    union = new[2] * new[3] + old[2] * old[3] - inter
    return inter <= _MAX_IOU * union and inter <= _MAX_COVER * old[2] * old[3]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(4)
    c0 = rng.uniform(0, 255, 3)
    c1 = rng.uniform(0, 255, 3)
    if kind == 0:  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        img = c0 + t[..., None] * (c1 - c0)
    elif kind == 1:  # stripes
        period = rng.integers(8, 48)
        horizontal = rng.integers(2) == 0
        coord = np.arange(h if horizontal else w)
        band = ((coord // period) % 2).astype(np.float32)
        band = band[:, None] if horizontal else band[None, :]
        img = c0 + band[..., None] * (c1 - c0) * 0.6
        img = np.broadcast_to(img, (h, w, 3))
    elif kind == 2:  # coarse noise, upsampled
        small = rng.uniform(0, 255, (max(h // 16, 2), max(w // 16, 2), 3))
        img = np.asarray(
            Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BILINEAR), np.float32
        )
    else:  # flat
        img = np.broadcast_to(c0, (h, w, 3))
    img = img + rng.normal(0, 6, (h, w, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(cat_id: int, bw: int, bh: int, rng: np.random.Generator) -> Image.Image:
    mask = Image.new("L", (bw, bh), 0)
    d = ImageDraw.Draw(mask)
    if cat_id == 1:
        d.ellipse((0, 0, bw - 1, bh - 1), fill=255)
    elif cat_id == 3:
        d.rectangle((0, 0, bw - 1, bh - 1), fill=255)
    elif cat_id == 7:
        if rng.integers(2) == 0:
            d.polygon([(bw / 2, 0), (bw - 1, bh - 1), (0, bh - 1)], fill=255)
        else:
            d.polygon([(0, 0), (bw - 1, 0), (bw / 2, bh - 1)], fill=255)
    else:
        d.ellipse((0, 0, bw - 1, bh - 1), fill=255)
        t = max(2, int(round(min(bw, bh) * 0.22)))
        if bw - 2 * t > 1 and bh - 2 * t > 1:
            d.ellipse((t, t, bw - 1 - t, bh - 1 - t), fill=0)
    return mask


def _segmentation(m: np.ndarray, x: int, y: int, height: int, width: int) -> dict:
    """The compressed RLE (counts as str) of the [bh, bw] bool shape ``m`` drawn at (x, y)."""
    from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top

    full = np.zeros((height, width), np.uint8, order="F")
    full[y : y + m.shape[0], x : x + m.shape[1]] = m
    rle = mask_utils.encode(full)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def render_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_objects: int,
    min_object_size: float,
    max_object_size: float,
) -> tuple[np.ndarray, list[dict]]:
    """Draws one image; returns (uint8 [h, w, 3], [{bbox, category_id, area, segmentation}])."""
    canvas = Image.fromarray(_background(rng, height, width))
    cat_ids = [c["id"] for c in CATEGORIES]
    placed, objects = [], []
    hi = max(min(max_object_size, 0.6 * min(height, width)), min_object_size)
    for _ in range(num_objects):
        for _attempt in range(20):
            size = math.exp(rng.uniform(math.log(min_object_size), math.log(hi)))
            cat = int(rng.choice(cat_ids))
            aspect = rng.uniform(0.9, 1.1) if cat == 3 else rng.uniform(0.7, 1.4)
            bw = max(int(round(size * math.sqrt(aspect))), 4)
            bh = max(int(round(size / math.sqrt(aspect))), 4)
            if bw > width or bh > height:
                continue
            x = int(rng.integers(0, width - bw + 1))
            y = int(rng.integers(0, height - bh + 1))
            if all(_overlap_ok((x, y, bw, bh), p) for p in placed):
                break
        else:
            continue
        mask = _shape_mask(cat, bw, bh, rng)
        colour = np.clip(np.array(_BASE_COLOURS[cat]) + rng.integers(-30, 31, 3), 0, 255)
        canvas.paste(tuple(int(c) for c in colour), (x, y, x + bw, y + bh), mask)
        m = np.asarray(mask) > 0
        ys, xs = np.nonzero(m)
        bx0, bx1, by0, by1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        placed.append((x, y, bw, bh))
        objects.append(
            {
                "bbox": [float(x + bx0), float(y + by0), float(bx1 - bx0), float(by1 - by0)],
                "category_id": cat,
                "area": float(m.sum()),
                "segmentation": _segmentation(m, x, y, height, width),
            }
        )
    return np.asarray(canvas), objects


def generate_split(
    output_dir: str,
    split: str,
    num_images: int,
    *,
    seed: int = 0,
    image_size: tuple[int, int] = (320, 512),
    fixed_hw: tuple[int, int] | None = None,
    max_objects: int = 8,
    min_object_size: float = 8,
    max_object_size: float = 200,
    empty_fraction: float = 0.1,
    png_every: int = 4,
    subfolder_every: int = 3,
    first_image_id: int = 1,
) -> dict[str, str]:
    """Writes one split; returns {"annotation_file", "image_dir"}."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(output_dir, split)
    ann_dir = os.path.join(output_dir, "annotations")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, annotations = [], []
    lo, hi = int(image_size[0]), int(image_size[-1])
    for n in range(num_images):
        image_id = first_image_id + n
        if fixed_hw is not None:
            h, w = int(fixed_hw[0]), int(fixed_hw[1])
        else:
            h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
        empty = rng.uniform() < empty_fraction
        k = 0 if empty else int(rng.integers(1, max_objects + 1))
        pixels, objects = render_image(rng, h, w, k, min_object_size, max_object_size)
        ext = "png" if png_every and n % png_every == png_every - 1 else "jpg"
        in_sub = subfolder_every and n % subfolder_every == subfolder_every - 1
        sub = f"part{n % 2}/" if in_sub else ""
        file_name = f"{sub}{split}_{image_id:06d}.{ext}"
        path = os.path.join(image_dir, file_name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        buf = io.BytesIO()
        save = (
            dict(format="PNG", compress_level=1)
            if ext == "png"
            else dict(format="JPEG", quality=90)
        )
        Image.fromarray(pixels).save(buf, **save)
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for obj in objects:
            annotations.append(dict(obj, id=len(annotations) + 1, image_id=image_id, iscrowd=0))
    ann_file = os.path.join(ann_dir, f"instances_{split}.json")
    with open(ann_file, "w") as f:
        json.dump(
            {
                "info": {"description": "fpn_tf synthetic shapes", "seed": seed},
                "images": images,
                "annotations": annotations,
                "categories": [dict(c) for c in CATEGORIES],
            },
            f,
        )
    return {"annotation_file": ann_file, "image_dir": image_dir}


def generate_dataset(
    output_dir: str, num_train: int = 400, num_val: int = 100, *, seed: int = 0, **kwargs: Any
) -> dict[str, dict[str, str]]:
    """Writes train and val splits (val: seed + 1, ids after train's); returns {split:
    {annotation_file, image_dir}}."""
    return {
        "train": generate_split(output_dir, "train", num_train, seed=seed, **kwargs),
        "val": generate_split(
            output_dir, "val", num_val, seed=seed + 1, first_image_id=num_train + 1, **kwargs
        ),
    }


def _main(argv: list[str]) -> None:
    from absl import flags, logging  # pylint: disable=g-import-not-at-top

    f = flags.FLAGS
    del argv
    start = time.time()
    size = [int(v) for v in f.image_size]
    if len(size) not in (1, 2) or min(size) < 16:
        raise SystemExit("error: --image_size takes one size or min,max (>= 16)")
    paths = generate_dataset(
        f.output_dir,
        f.num_train,
        f.num_val,
        seed=f.seed,
        image_size=(size[0], size[-1]),
        max_objects=f.max_objects,
        min_object_size=f.min_object_size,
        max_object_size=f.max_object_size,
        empty_fraction=f.empty_fraction,
    )
    logging.info("wrote %d + %d images in %.1f s", f.num_train, f.num_val, time.time() - start)
    print(json.dumps(paths, indent=1))


if __name__ == "__main__":
    from absl import app, flags  # pylint: disable=g-import-not-at-top

    flags.DEFINE_string("output_dir", None, "Where to write the dataset.")
    flags.DEFINE_integer("num_train", 400, "Training images.", lower_bound=0)
    flags.DEFINE_integer("num_val", 100, "Validation images.", lower_bound=0)
    flags.DEFINE_list(
        "image_size",
        ["320", "512"],
        "Image side length: one value, or min,max (each side drawn uniformly).",
    )
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_integer("max_objects", 8, "Most objects per image.")
    flags.DEFINE_float("min_object_size", 8, "Smallest object side (px).")
    flags.DEFINE_float("max_object_size", 200, "Largest object side (px).")
    flags.DEFINE_float("empty_fraction", 0.1, "Fraction of images with no object.")
    flags.mark_flag_as_required("output_dir")
    app.run(_main)
    sys.exit(0)
