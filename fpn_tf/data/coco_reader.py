"""Reads a COCO-format detection dataset: one annotation JSON + an image folder.

:func:`load_coco` validates the annotation file once, in Python, and keeps what survives in
compact numpy arrays (:class:`CocoIndex`), from which ``tf.data`` reads each image file and
slices its ground truth. :meth:`CocoIndex.decode` gives per image::

    {"image":       uint8 [H, W, 3] (grayscale / RGBA / palette -> RGB),
     "image_id":    int64 [],
     "height":      int32 [],  "width": int32 [],
     "gt_boxes":    float32 [n, 4] ymin, xmin, ymax, xmax in pixels,
     "gt_classes":  int32 [n] contiguous 1..C (see CategoryMap),
     "gt_is_crowd": bool [n],
     "gt_masks":    uint8 [n, H, W] 0/1, only with masks (below)}

Images without annotations are kept as negatives. With masks, each segmentation passes
``check_segmentation`` (evaluation's and ``convert_coco``'s check too) and is kept as compressed
RLE; images that lose every annotation to it train as background.

Malformed input (unparsable JSON, missing keys, a bbox that is not four numbers, duplicate ids)
always raises :class:`DataError`; unusable data (``_ANNOTATION_REASONS``, ``_IMAGE_REASONS``,
``MASK_REASONS``) raises under ``on_bad_data="error"``, else is dropped, counted per reason and
logged with example ids. Boxes overflowing the image by up to ``BOX_TOLERANCE_PX`` are clipped.
``verify_images``: read each file's ``"header"`` (default), decode it ``"full"``, or ``"none"``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import math
import os
from typing import Any

from absl import logging
import numpy as np
import tensorflow as tf

from fpn_tf.data.category_map import CategoryMap
from fpn_tf.data import images as image_io
from fpn_tf.data.errors import DataError, RunTimeDrops, read_json
from fpn_tf.data.segmentation_check import MASK_REASONS, check_segmentation, is_int, is_number

__all__ = [
    "BOX_TOLERANCE_PX",
    "CocoIndex",
    "load_coco",
    "decode_image_guarded",
    "decode_rles",
]

ON_BAD_DATA = ("error", "skip")
VERIFY_IMAGES = ("none", "header", "full")
# A box may overflow the image by this many pixels; it is then clipped.
BOX_TOLERANCE_PX = 1.0
_MAX_LOGGED_EXAMPLES = 5

_ANNOTATION_REASONS = {
    "bad_box_size": "a zero, negative or non-finite box size",
    "box_outside_image": "a box more than 1 px outside the image",
    "unknown_category": "a category_id not in 'categories'",
    "unknown_image": "an image_id not in 'images'",
    "of_skipped_images": "their image skipped",
    **MASK_REASONS,
}
_MASK_REASONS = frozenset(MASK_REASONS)
_IMAGE_REASONS = {
    "missing_image_file": "a missing file",
    "corrupt_image": "a file that cannot be decoded",
    "image_size_mismatch": "a file whose size differs from the JSON",
}


def _float(x: Any) -> float:
    """float(x) of a number, inf for a Python int beyond the float range."""
    try:
        return float(x)
    except OverflowError:
        return math.inf


def _exists(path: str) -> bool:
    if "://" in path:
        return tf.io.gfile.exists(path)
    return os.path.isfile(path)


def _read_image_header(path: str, full: bool) -> tuple[str | None, int, int, str]:
    """Returns (problem or None, height, width, format) for one image file."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    try:
        if "://" in path:
            with tf.io.gfile.GFile(path, "rb") as f:
                import io  # pylint: disable=g-import-not-at-top

                fobj = io.BytesIO(f.read())
        else:
            fobj = open(path, "rb")  # pylint: disable=consider-using-with
        with fobj:
            with Image.open(fobj) as img:
                fmt = img.format or "?"
                width, height = img.size
                if fmt not in image_io.DECODABLE_FORMATS:
                    return (
                        f"format {fmt} is not one of {'/'.join(image_io.DECODABLE_FORMATS)}",
                        height,
                        width,
                        fmt,
                    )
                if full:
                    img.load()
        return None, height, width, fmt
    except Exception as e:  # pylint: disable=broad-except
        msg = " ".join(str(e).split()) or type(e).__name__
        return f"cannot be decoded ({msg})", -1, -1, "?"


@dataclasses.dataclass
class CocoIndex:
    """A validated dataset as flat arrays: image ``i``'s annotations are rows
    ``row_splits[i]:row_splits[i + 1]`` of the ``[A]`` arrays."""

    annotation_file: str
    image_dir: str
    category_map: CategoryMap
    image_ids: np.ndarray  # int64 [I]
    file_names: np.ndarray  # object (str) [I], as in the JSON
    file_paths: np.ndarray  # object (str) [I], full paths
    heights: np.ndarray  # int32 [I]
    widths: np.ndarray  # int32 [I]
    row_splits: np.ndarray  # int64 [I + 1]
    gt_boxes: np.ndarray  # float32 [A, 4] ymin, xmin, ymax, xmax pixels
    gt_classes: np.ndarray  # int32 [A] contiguous
    gt_is_crowd: np.ndarray  # bool [A]
    annotation_ids: np.ndarray  # int64 [A] (-1 where the JSON had none)
    areas: np.ndarray  # float32 [A] the JSON's "area" (box area if absent)
    skipped_annotations: dict[str, int]
    skipped_images: dict[str, int]
    num_clipped_boxes: int
    on_bad_data: str
    drops: RunTimeDrops = dataclasses.field(default=None)  # type: ignore[assignment]
    # object (bytes) [A] compressed RLE counts over the image; None when loaded without masks.
    mask_rles: np.ndarray | None = None
    # Annotations whose polygons were clipped; images that lost every annotation to the masks.
    clipped_polygons: list = dataclasses.field(default_factory=list)
    images_without_masks: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.drops is None:
            self.drops = RunTimeDrops(self.annotation_file)

    @property
    def has_masks(self) -> bool:
        return self.mask_rles is not None

    def with_masks(self) -> "CocoIndex":
        """This index with masks (built once, sharing :attr:`drops`): as ``load_coco(...,
        include_masks=True)`` gives for the same images."""
        if self.has_masks:
            return self
        return self._with_masks

    @functools.cached_property
    def _with_masks(self) -> "CocoIndex":
        return _index_with_masks(self)

    @property
    def num_images(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def num_annotations(self) -> int:
        return int(self.gt_classes.shape[0])

    @property
    def num_instances_per_image(self) -> np.ndarray:
        return np.diff(self.row_splits)

    def example(self, i: int) -> dict[str, Any]:
        """Image ``i``'s record in numpy (no pixels): for tests and tools."""
        s, e = int(self.row_splits[i]), int(self.row_splits[i + 1])
        return {
            "image_id": int(self.image_ids[i]),
            "file_name": str(self.file_names[i]),
            "file_path": str(self.file_paths[i]),
            "height": int(self.heights[i]),
            "width": int(self.widths[i]),
            "gt_boxes": self.gt_boxes[s:e],
            "gt_classes": self.gt_classes[s:e],
            "gt_is_crowd": self.gt_is_crowd[s:e],
            "annotation_ids": self.annotation_ids[s:e],
            "areas": self.areas[s:e],
            **({"mask_rles": list(self.mask_rles[s:e])} if self.has_masks else {}),
        }

    def masks(self, i: int) -> np.ndarray:
        """uint8 [n, H, W] 0/1: image ``i``'s decoded masks (``COCO.annToMask`` of each)."""
        if not self.has_masks:
            raise ValueError(f"{self.annotation_file}: loaded without masks; use with_masks()")
        s, e = int(self.row_splits[i]), int(self.row_splits[i + 1])
        return decode_rles(self.mask_rles[s:e], int(self.heights[i]), int(self.widths[i]))

    def item_dataset(self) -> tf.data.Dataset:
        """Image indices 0..I-1 (int64): cheap to shuffle, shard and repeat."""
        return tf.data.Dataset.range(self.num_images)

    @functools.cached_property
    def _tensors(self) -> dict[str, tf.Tensor]:
        with tf.init_scope():
            return {
                "paths": tf.constant(
                    self.file_paths.astype(str).tolist() if self.num_images else [], tf.string
                ),
                "image_ids": tf.constant(self.image_ids, tf.int64),
                "heights": tf.constant(self.heights, tf.int32),
                "widths": tf.constant(self.widths, tf.int32),
                "row_splits": tf.constant(self.row_splits, tf.int64),
                "boxes": tf.constant(self.gt_boxes.reshape(-1, 4), tf.float32),
                "classes": tf.constant(self.gt_classes, tf.int32),
                "is_crowd": tf.constant(self.gt_is_crowd, tf.bool),
            }

    def decode(self, index: tf.Tensor, include_masks: bool = False) -> dict[str, tf.Tensor]:
        """Image ``index`` decoded with its ground truth (masks need :meth:`with_masks`)."""
        t = self._tensors
        index = tf.cast(index, tf.int64)
        path = tf.gather(t["paths"], index)
        height = tf.gather(t["heights"], index)
        width = tf.gather(t["widths"], index)
        image = decode_image_guarded(
            tf.io.read_file(path), path, expected_height=height, expected_width=width
        )
        start = tf.gather(t["row_splits"], index)
        end = tf.gather(t["row_splits"], index + 1)
        out = {
            "image": image,
            "image_id": tf.gather(t["image_ids"], index),
            "height": height,
            "width": width,
            "gt_boxes": t["boxes"][start:end],
            "gt_classes": t["classes"][start:end],
            "gt_is_crowd": t["is_crowd"][start:end],
        }
        if include_masks:
            if not self.has_masks:
                raise ValueError(
                    f"{self.annotation_file}: loaded without masks; decode the index "
                    "with_masks() gives"
                )
            masks = tf.numpy_function(
                lambda i: self.masks(int(i)), [index], tf.uint8, stateful=False
            )
            out["gt_masks"] = tf.ensure_shape(masks, [None, None, None])
        return out

    def describe(self, index) -> tuple[str, str]:
        """(file, image id) of the item ``index`` of :meth:`item_dataset`, for log lines."""
        index = int(index)
        return str(self.file_paths[index]), str(int(self.image_ids[index]))


def decode_rles(counts, height: int, width: int) -> np.ndarray:
    """uint8 [n, height, width] 0/1 of compressed RLE ``counts`` (bytes)."""
    from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top

    if len(counts) == 0:
        return np.zeros((0, height, width), np.uint8)
    rles = [{"size": [height, width], "counts": c} for c in counts]
    return np.ascontiguousarray(np.transpose(mask_utils.decode(rles), (2, 0, 1)))


def decode_image_guarded(
    contents: tf.Tensor,
    path: tf.Tensor | str,
    expected_height: tf.Tensor | None = None,
    expected_width: tf.Tensor | None = None,
) -> tf.Tensor:
    """JPEG/PNG/GIF/BMP bytes -> uint8 RGB [H, W, 3]; other bytes, or another size than the
    expected one, fail with an ``InvalidArgumentError`` naming ``path``."""
    check = tf.debugging.Assert(
        image_io.has_image_signature(contents),
        ["image file is not JPEG/PNG/GIF/BMP (corrupt?):", path],
    )
    with tf.control_dependencies([check]):
        image = image_io.decode_rgb(contents)
    if expected_height is None or expected_width is None:
        return image
    shape = tf.shape(image, out_type=tf.int32)
    same = tf.logical_and(
        tf.equal(shape[0], tf.cast(expected_height, tf.int32)),
        tf.equal(shape[1], tf.cast(expected_width, tf.int32)),
    )
    check = tf.debugging.Assert(
        same,
        [
            "image file size differs from the annotation file:",
            path,
            "decoded (h, w):",
            shape[:2],
            "annotated:",
            expected_height,
            expected_width,
        ],
    )
    with tf.control_dependencies([check]):
        return tf.identity(image)


class _Problems:
    """Raises on bad data, or counts it and remembers a few examples."""

    def __init__(self, annotation_file: str, on_bad_data: str):
        self.file = annotation_file
        self.on_bad_data = on_bad_data
        self.annotations = collections.Counter()
        self.images = collections.Counter()
        self.examples = collections.defaultdict(list)
        self.clipped_polygons: list = []
        self.images_without_masks: list[int] = []

    def annotation(self, reason: str, ann_id: Any, image_id: Any, what: str):
        self._bad(
            self.annotations,
            reason,
            f"annotation id {ann_id} (image id {image_id}): {what}",
            f"annotation {ann_id}",
        )

    def image(self, reason: str, image_id: Any, what: str):
        self._bad(self.images, reason, f"image id {image_id}: {what}", f"image {image_id}")

    def clipped_polygon(self, ann_id: Any):
        self.clipped_polygons.append(ann_id)

    @property
    def num_mask_skips(self) -> int:
        return sum(n for r, n in self.annotations.items() if r in _MASK_REASONS)

    def _bad(self, counter, reason: str, what: str, example: str):
        """Raises under on_bad_data='error'; otherwise counts it and keeps a few examples."""
        if self.on_bad_data == "error":
            raise DataError(f"{self.file}: {what} (pass on_bad_data='skip' to skip such data)")
        counter[reason] += 1
        if len(self.examples[reason]) < _MAX_LOGGED_EXAMPLES:
            self.examples[reason].append(example)

    def log(self, only: frozenset | None = None):
        """Logs the counts (of the reasons in ``only``, when given)."""
        for counter, what, reasons in (
            (self.images, "image(s)", _IMAGE_REASONS),
            (self.annotations, "annotation(s)", _ANNOTATION_REASONS),
        ):
            for reason, n in sorted(counter.items()):
                if only is not None and reason not in only:
                    continue
                examples = self.examples.get(reason)
                e_g = f"; e.g. {', '.join(examples)}" if examples else ""
                logging.warning(
                    "%s: skipped %d %s with %s [%s]%s",
                    self.file,
                    n,
                    what,
                    reasons[reason],
                    reason,
                    e_g,
                )
        if self.clipped_polygons:
            logging.warning(
                "%s: clipped the segmentation polygons of %d annotation(s) that reach more than "
                "an image size outside their image to that range (the mask inside the image is "
                "the polygon's); e.g. %s",
                self.file,
                len(self.clipped_polygons),
                _listed(self.clipped_polygons, "annotation"),
            )
        if self.images_without_masks:
            logging.warning(
                "%s: %d image(s) lost every annotation to the mask checks: they are kept without "
                "objects (background images in training): %s",
                self.file,
                len(self.images_without_masks),
                _listed(self.images_without_masks, "image"),
            )


def _listed(ids: list, what: str, limit: int = 20) -> str:
    """``"image 3, image 7, ..."``: the first ``limit`` ids for a log line."""
    text = ", ".join(f"{what} {i}" for i in ids[:limit])
    return text + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _load_json(annotation_file: str) -> dict[str, Any]:
    data = read_json(annotation_file, "annotation file")
    if not isinstance(data, dict):
        raise DataError(f"{annotation_file}: the top level must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{annotation_file}: required key '{key}' is missing")
        if not isinstance(data[key], list):
            raise DataError(f"{annotation_file}: '{key}' must be a list")
    return data


@dataclasses.dataclass
class _Image:
    """One ``images`` entry while it is validated."""

    image_id: int
    path: str
    file_name: str
    height: int | None
    width: int | None


def load_coco(
    annotation_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    on_bad_data: str = "skip",
    verify_images: str = "header",
    include_masks: bool = False,
) -> CocoIndex:
    """The :class:`CocoIndex` of an instances JSON whose ``file_name``s are relative to
    ``image_dir`` (module doc)."""
    af = os.fspath(annotation_file)
    image_dir = os.fspath(image_dir)
    if on_bad_data not in ON_BAD_DATA:
        raise ValueError(f"on_bad_data must be one of {ON_BAD_DATA}, got {on_bad_data!r}")
    if verify_images not in VERIFY_IMAGES:
        raise ValueError(f"verify_images must be one of {VERIFY_IMAGES}, got {verify_images!r}")
    data = _load_json(af)
    try:
        category_map = CategoryMap(data["categories"])
    except DataError as e:
        raise DataError(f"{af}: {e}") from e
    problems = _Problems(af, on_bad_data)
    listed = _parse_images(af, data["images"], image_dir)
    kept = _usable_images(listed, verify_images, problems)
    per_image, num_clipped = _parse_annotations(
        af,
        data["annotations"],
        {im.image_id for im in listed},
        kept,
        category_map,
        problems,
        include_masks=include_masks,
    )
    problems.log()
    if num_clipped:
        msg = "%s: clipped %d box(es) that overflowed the image by <= %g px"
        logging.info(msg, af, num_clipped, BOX_TOLERANCE_PX)
    if not kept:
        skipped = sum(problems.images.values())
        raise DataError(
            f"{af}: the data set is empty: no usable images"
            + (f" ({skipped} skipped, see the log)" if skipped else "")
        )
    if include_masks:
        _require_some_masks(af, per_image, problems)
    index = _build_index(
        af, image_dir, category_map, kept, per_image, problems, num_clipped, include_masks
    )
    logging.info(
        "%s: %d images (%d without annotations), %d annotations, %d categories",
        af,
        index.num_images,
        int(np.sum(index.num_instances_per_image == 0)),
        index.num_annotations,
        category_map.num_classes,
    )
    return index


def _parse_images(af: str, entries: list, image_dir: str) -> list[_Image]:
    """The ``images`` list, checked for malformed entries (those always raise)."""
    images, seen = [], set()
    for n, img in enumerate(entries):
        if not isinstance(img, dict):
            raise DataError(f"{af}: images[{n}] is not an object")
        for key in ("id", "file_name"):
            if key not in img:
                raise DataError(
                    f"{af}: images[{n}] (id {img.get('id', '?')}): required key '{key}' is missing"
                )
        iid = img["id"]
        if not is_int(iid):
            raise DataError(f"{af}: images[{n}]: 'id' must be an integer, got {iid!r}")
        if iid in seen:
            raise DataError(f"{af}: image id {iid} is listed more than once")
        seen.add(iid)
        h, w = img.get("height"), img.get("width")
        for key, v in (("height", h), ("width", w)):
            if v is not None and (not is_int(v) or v <= 0):
                raise DataError(
                    f"{af}: image id {iid}: '{key}' must be a positive integer, got {v!r}"
                )
        name = str(img["file_name"])
        images.append(_Image(int(iid), os.path.join(image_dir, name), name, h, w))
    return images


def _usable_images(images: list[_Image], verify_images: str, problems: _Problems) -> list[_Image]:
    """The images whose file exists and reads as the JSON says (headers are read for sizes the
    JSON lacks)."""
    kept = []
    for im in images:
        if _exists(im.path):
            kept.append(im)
        else:
            problems.image("missing_image_file", im.image_id, f"file {im.path} does not exist")
    to_read = [
        im for im in kept if verify_images != "none" or im.height is None or im.width is None
    ]
    if not to_read:
        return kept
    full = verify_images == "full"
    with concurrent.futures.ThreadPoolExecutor(max(1, min(16, len(to_read)))) as pool:
        headers = list(pool.map(lambda im: _read_image_header(im.path, full), to_read))
    bad = set()
    for im, (problem, h, w, _) in zip(to_read, headers):
        if problem is not None:
            problems.image("corrupt_image", im.image_id, f"file {im.path} {problem}")
            bad.add(im.image_id)
        elif im.height is None or im.width is None:
            im.height, im.width = h, w
        elif (im.height, im.width) != (h, w):
            problems.image(
                "image_size_mismatch",
                im.image_id,
                f"file {im.path} is {h}x{w} (h x w) but the JSON says {im.height}x{im.width}",
            )
            bad.add(im.image_id)
    return [im for im in kept if im.image_id not in bad]


def _parse_annotations(
    af: str,
    entries: list,
    listed_ids: set,
    kept: list[_Image],
    category_map: CategoryMap,
    problems: _Problems,
    include_masks: bool = False,
) -> tuple[list[list[tuple]], int]:
    """Per kept image, its usable annotations as (box yxyx, class, crowd, id, area, mask RLE or
    None) rows; and the number of boxes clipped to their image."""
    position = {im.image_id: k for k, im in enumerate(kept)}
    per_image: list[list[tuple]] = [[] for _ in kept]
    mask_skips = [0] * len(kept)  # per image: annotations skipped for their mask
    num_clipped = 0
    for n, ann in enumerate(entries):
        aid, iid, bbox = _check_annotation(af, n, ann)
        if iid not in listed_ids:
            problems.annotation("unknown_image", aid, iid, f"image_id {iid} is not in 'images'")
            continue
        if iid not in position:
            problems.annotations["of_skipped_images"] += 1
            continue
        image = kept[position[iid]]
        before = problems.num_mask_skips
        row, clipped = _annotation_row(ann, aid, bbox, image, category_map, problems, include_masks)
        num_clipped += clipped
        if row is not None:
            per_image[position[iid]].append(row)
        mask_skips[position[iid]] += problems.num_mask_skips - before
    problems.images_without_masks = [
        im.image_id for im, rows, n in zip(kept, per_image, mask_skips) if n and not rows
    ]
    return per_image, num_clipped


def _check_annotation(af: str, n: int, ann: Any) -> tuple[Any, Any, list]:
    """(id, image id, bbox) of annotation ``n``; malformed annotations raise."""
    if not isinstance(ann, dict):
        raise DataError(f"{af}: annotations[{n}] is not an object")
    aid = ann.get("id", f"#{n}")
    for key in ("bbox", "image_id", "category_id"):
        if key not in ann:
            raise DataError(f"{af}: annotation id {aid}: required key '{key}' is missing")
    iid, bbox = ann["image_id"], ann["bbox"]
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(map(is_number, bbox)):
        raise DataError(
            f"{af}: annotation id {aid} (image id {iid}): 'bbox' "
            f"must be [x, y, width, height] numbers, got {bbox!r}"
        )
    return aid, iid, bbox


def _annotation_row(
    ann: dict,
    aid: Any,
    bbox: list,
    image: _Image,
    category_map: CategoryMap,
    problems: _Problems,
    include_masks: bool = False,
) -> tuple[tuple | None, bool]:
    """(row or None when unusable, whether the box was clipped) of one annotation of ``image``."""
    iid, cid = image.image_id, ann["category_id"]
    if not is_int(cid) or cid not in category_map:
        what = f"category_id {cid!r} is not in 'categories' ({list(category_map.dataset_ids)})"
        problems.annotation("unknown_category", aid, iid, what)
        return None, False
    x, y, bw, bh = (_float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, bw, bh)) or bw <= 0 or bh <= 0:
        problems.annotation(
            "bad_box_size", aid, iid, f"bbox {list(bbox)} has zero, negative or non-finite size"
        )
        return None, False
    height, width, tol = image.height, image.width, BOX_TOLERANCE_PX
    if x < -tol or y < -tol or x + bw > width + tol or y + bh > height + tol:
        problems.annotation(
            "box_outside_image",
            aid,
            iid,
            f"bbox {list(bbox)} (x, y, w, h) extends more than {tol:g} px "
            f"outside the {height}x{width} (h x w) image",
        )
        return None, False
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + bw, float(width)), min(y + bh, float(height))
    clipped = (x0, y0, x1, y1) != (x, y, x + bw, y + bh)
    if clipped and (x1 <= x0 or y1 <= y0):
        problems.annotation(
            "bad_box_size", aid, iid, f"bbox {list(bbox)} has zero size inside the image"
        )
        return None, True
    rle = None
    if include_masks:
        checked = check_segmentation(ann.get("segmentation"), height, width)
        if not checked.ok:
            problems.annotation(checked.reason, aid, iid, checked.what)
            return None, clipped
        rle = checked.counts
        if checked.clipped:
            problems.clipped_polygon(aid)
    area = ann.get("area")
    area = _float(area) if is_number(area) else math.nan
    if not math.isfinite(area):
        area = (x1 - x0) * (y1 - y0)
    row = (
        (y0, x0, y1, x1),
        category_map.to_contiguous(cid),
        bool(ann.get("iscrowd", 0)),
        int(ann["id"]) if is_int(ann.get("id")) and abs(ann["id"]) < 2**63 else -1,
        area,
        rle,
    )
    return row, clipped


def _build_index(
    af: str,
    image_dir: str,
    category_map: CategoryMap,
    kept: list[_Image],
    per_image: list[list[tuple]],
    problems: _Problems,
    num_clipped: int,
    include_masks: bool = False,
) -> CocoIndex:
    counts = np.array([len(a) for a in per_image], np.int64)
    flat = [a for anns in per_image for a in anns]
    mask_rles = None
    if include_masks:
        mask_rles = np.empty(len(flat), object)
        mask_rles[:] = [a[5] for a in flat]
    return CocoIndex(
        annotation_file=af,
        image_dir=image_dir,
        category_map=category_map,
        image_ids=np.array([im.image_id for im in kept], np.int64),
        file_names=np.array([im.file_name for im in kept], object),
        file_paths=np.array([im.path for im in kept], object),
        heights=np.array([im.height for im in kept], np.int32),
        widths=np.array([im.width for im in kept], np.int32),
        row_splits=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        gt_boxes=np.array([a[0] for a in flat], np.float32).reshape(-1, 4),
        gt_classes=np.array([a[1] for a in flat], np.int32),
        gt_is_crowd=np.array([a[2] for a in flat], bool),
        annotation_ids=np.array([a[3] for a in flat], np.int64),
        areas=np.array([a[4] for a in flat], np.float32),
        skipped_annotations=dict(problems.annotations),
        skipped_images=dict(problems.images),
        num_clipped_boxes=num_clipped,
        on_bad_data=problems.on_bad_data,
        mask_rles=mask_rles,
        clipped_polygons=list(problems.clipped_polygons),
        images_without_masks=list(problems.images_without_masks),
    )


def _require_some_masks(af: str, per_image, problems) -> None:
    """A mask data set without one usable (non-crowd) mask is a one-line DataError."""
    usable = sum(1 for rows in per_image for row in rows if not row[2])
    skipped = problems.num_mask_skips
    if usable or not skipped:
        return
    missing = problems.annotations.get("missing_segmentation", 0)
    if missing == skipped and not any(len(rows) for rows in per_image):
        raise DataError(
            f"{af}: masks were requested (model.architecture mask_rcnn or segment_proposals) "
            f"but none of its {missing} annotations has a 'segmentation'; train a box model "
            "(model.architecture: faster_rcnn) on it"
        )
    reasons = ", ".join(
        f"{r} {n}" for r, n in sorted(problems.annotations.items()) if r in _MASK_REASONS
    )
    examples = [e for r in sorted(_MASK_REASONS) for e in problems.examples.get(r, [])][:5]
    raise DataError(
        f"{af}: masks were requested (model.architecture mask_rcnn or segment_proposals, or "
        f"--include_masks) but no annotation has a usable mask: {skipped} skipped for their "
        f"masks ({reasons}; e.g. {', '.join(examples)}); fix the segmentations (see "
        "data/README.md, Bad data) or train a box model (model.architecture: faster_rcnn)"
    )


def _index_with_masks(index: CocoIndex) -> CocoIndex:
    """``index``'s (checked) images with their annotations re-read, masks included."""
    af = index.annotation_file
    logging.info("%s: reading the segmentations (masks requested)", af)
    data = _load_json(af)
    kept = [
        _Image(int(i), str(p), str(n), int(h), int(w))
        for i, p, n, h, w in zip(
            index.image_ids, index.file_paths, index.file_names, index.heights, index.widths
        )
    ]
    listed = {im.get("id") for im in data["images"] if isinstance(im, dict)}
    problems = _Problems(af, index.on_bad_data)
    per_image, num_clipped = _parse_annotations(
        af, data["annotations"], listed, kept, index.category_map, problems, include_masks=True
    )
    problems.log(only=_MASK_REASONS)  # the others were logged when the index was loaded
    _require_some_masks(af, per_image, problems)
    problems.images.update(index.skipped_images)
    masked = _build_index(
        af, index.image_dir, index.category_map, kept, per_image, problems, num_clipped, True
    )
    masked.drops = index.drops
    msg = "%s: masks of %d annotations (%d skipped for their masks)"
    logging.info(msg, af, masked.num_annotations, problems.num_mask_skips)
    return masked
