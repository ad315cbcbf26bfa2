"""The evaluation's ground truth, checked before pycocotools (which trusts its input: malformed
segmentations raise deep inside ``COCOeval``, loop forever or crash) scores against it.

* boxes (box AP, proposal AR): an annotation needs a finite ``bbox`` of positive size and a
  known ``image_id`` and ``category_id``, else it leaves every metric (``BOX_REASONS``, as
  training skips it). Missing keys, a ``bbox`` that is not four numbers, or entries without an
  integer ``id`` are a :class:`DataError`. A missing ``area`` is the box's; missing or repeated
  annotation ids get private ones.
* masks (mask AP, AR): the segmentation passes training's ``check_segmentation`` and is scored
  as its RLE; a failing one leaves the mask metrics only and its box becomes an ignore region
  there, like a crowd region.

``on_bad_data="error"`` makes the first unusable annotation a ``DataError``; what was left out,
per metric, reason and id, is in :meth:`GroundTruth.left_out` and ``metrics.json``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
from absl import logging
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from fpn_tf.data.errors import DataError, parse_json, read_json
from fpn_tf.data.segmentation_check import (
    MASK_REASONS,
    check_image_size,
    check_segmentation,
    is_int,
    is_number,
)

__all__ = ["BOX_REASONS", "GroundTruth", "coco_from_dataset", "read_groundtruth"]

BOX_REASONS = {
    "bad_box_size": "a zero, negative or non-finite box size",
    "unknown_category": "a category_id not in 'categories'",
    "unknown_image": "an image_id not in 'images'",
}
_REASONS = {**BOX_REASONS, **MASK_REASONS}
_MAX_LISTED = 20


def read_groundtruth(path: str) -> dict:
    """The JSON of an annotation file; a missing file or bad JSON is a one-line DataError."""
    path = os.fspath(path)
    if "://" in path:  # through tf.io.gfile
        return read_json(path, "evaluation annotation file")
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except (FileNotFoundError, IsADirectoryError) as e:
        raise DataError(f"{path}: evaluation annotation file not found") from e
    return parse_json(text, path)


def coco_from_dataset(dataset: Mapping) -> COCO:
    """A pycocotools COCO over ``dataset`` (images, annotations, categories), indexed quietly."""
    coco = COCO()
    dataset = dict(dataset)
    for key in ("images", "annotations", "categories"):
        dataset.setdefault(key, [])
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _float(x: Any) -> float:
    try:
        return float(x)
    except (OverflowError, TypeError, ValueError):
        return math.nan


class GroundTruth:
    """A checked annotation file (path, dataset dict or ``COCO``); ``image_sizes`` {image id:
    (height, width)} fills sizes the file lacks; ``name`` names it in logs and errors."""

    def __init__(
        self,
        source: Union[str, os.PathLike, Mapping, COCO],
        on_bad_data: str = "skip",
        image_sizes: Optional[Mapping[int, Tuple[int, int]]] = None,
        name: Optional[str] = None,
    ):
        if on_bad_data not in ("skip", "error"):
            raise ValueError(f"on_bad_data must be 'skip' or 'error', got {on_bad_data!r}")
        if isinstance(source, COCO):
            dataset, default_name = source.dataset, "ground truth"
        elif isinstance(source, Mapping):
            dataset, default_name = source, "ground truth"
        else:
            default_name = os.fspath(source)
            dataset = read_groundtruth(default_name)
        self.name = name or default_name
        self.on_bad_data = on_bad_data
        if not isinstance(dataset, Mapping):
            raise DataError(f"{self.name}: the top level must be a JSON object")
        self.images = self._check_images(dataset.get("images", []), image_sizes or {})
        self._image_ids = {im["id"] for im in self.images}
        self.categories_list = self._check_categories(dataset.get("categories", []))
        self.categories: Dict[int, str] = {
            int(c["id"]): str(c.get("name", c["id"])) for c in self.categories_list
        }
        # Annotations that passed the box checks, their segmentations aside for the mask check.
        self.annotations: List[dict] = []
        self._segmentations: List[Any] = []
        # reason -> [(reported id, image id)] of the annotations left out of every metric.
        self.left_out_of_boxes: Dict[str, List[Tuple[Any, Any]]] = collections.defaultdict(list)
        self.generated_ids = 0
        self._check_annotations(dataset.get("annotations", []))
        self._masks_checked = False
        self.left_out_of_masks: Dict[str, List[Tuple[Any, Any]]] = collections.defaultdict(list)
        self.clipped_polygons: List[Tuple[Any, Any]] = []

    def _list(self, value, key: str) -> list:
        if not isinstance(value, list):
            raise DataError(f"{self.name}: '{key}' must be a list")
        return value

    def _check_images(self, entries, image_sizes) -> List[dict]:
        images, seen = [], set()
        for n, img in enumerate(self._list(entries, "images")):
            if not isinstance(img, Mapping) or not is_int(img.get("id")):
                raise DataError(f"{self.name}: images[{n}] has no integer 'id'")
            iid = int(img["id"])
            if iid in seen:
                raise DataError(f"{self.name}: image id {iid} is listed more than once")
            seen.add(iid)
            image = dict(img)
            if iid in image_sizes and check_image_size(img.get("height"), img.get("width")):
                image["height"], image["width"] = (int(v) for v in image_sizes[iid])
            images.append(image)
        return images

    def _check_categories(self, entries) -> List[dict]:
        categories = []
        for n, cat in enumerate(self._list(entries, "categories")):
            if not isinstance(cat, Mapping) or not is_int(cat.get("id")):
                raise DataError(f"{self.name}: categories[{n}] has no integer 'id'")
            categories.append(dict(cat))
        return categories

    def _unusable(self, table, reason: str, reported_id, image_id, what: str):
        if self.on_bad_data == "error":
            raise DataError(
                f"{self.name}: annotation id {reported_id} (image id {image_id}): {what} (set "
                "eval_data.on_bad_data=skip to leave such ground truth out of the metrics)"
            )
        table[reason].append((reported_id, image_id))

    def _check_annotations(self, entries):
        used_ids = set()
        for n, ann in enumerate(self._list(entries, "annotations")):
            if not isinstance(ann, Mapping):
                raise DataError(f"{self.name}: annotations[{n}] is not an object")
            aid = ann.get("id")
            unique = is_int(aid) and abs(aid) < 2**63 and aid not in used_ids
            reported = int(aid) if unique else f"#{n}"
            for key in ("bbox", "image_id", "category_id"):
                if key not in ann:
                    raise DataError(
                        f"{self.name}: annotation id {reported}: required key '{key}' is missing"
                    )
            iid, cid, bbox = ann["image_id"], ann["category_id"], ann["bbox"]
            if not is_int(iid) or int(iid) not in self._image_ids:
                what = f"image_id {iid!r} is not in 'images'"
                self._unusable(self.left_out_of_boxes, "unknown_image", reported, iid, what)
                continue
            if not is_int(cid) or int(cid) not in self.categories:
                what = f"category_id {cid!r} is not in 'categories'"
                self._unusable(self.left_out_of_boxes, "unknown_category", reported, iid, what)
                continue
            if (
                not isinstance(bbox, (list, tuple))
                or len(bbox) != 4
                or not all(map(is_number, bbox))
            ):
                raise DataError(
                    f"{self.name}: annotation id {reported} (image id {iid}): 'bbox' must be "
                    f"[x, y, width, height] numbers, got {bbox!r}"
                )
            x, y, w, h = (_float(v) for v in bbox)
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                what = f"bbox {list(bbox)} has zero, negative or non-finite size"
                self._unusable(self.left_out_of_boxes, "bad_box_size", reported, iid, what)
                continue
            if unique:
                key = int(aid)
            else:  # pycocotools matches by id: give it one no other annotation has
                self.generated_ids += 1
                key = -(2**62) - n
            used_ids.add(key)
            area = _float(ann.get("area")) if is_number(ann.get("area")) else math.nan
            self.annotations.append(
                {
                    "id": key,
                    "image_id": int(iid),
                    "category_id": int(cid),
                    "bbox": [x, y, w, h],
                    "area": area if math.isfinite(area) else w * h,
                    "iscrowd": int(bool(ann.get("iscrowd", 0))),
                    "reported_id": reported,
                }
            )
            self._segmentations.append(ann.get("segmentation"))
        if self.generated_ids:
            logging.warning(
                "%s: %d annotation(s) have no integer id or repeat another's; they are scored "
                "under generated ids and named by position (#n) in this log",
                self.name,
                self.generated_ids,
            )
        if self.left_out_of_boxes:
            logging.warning(
                "%s: %s", self.name, _describe(self.left_out_of_boxes, "left out of every metric")
            )

    def _check_masks(self) -> List[dict]:
        """The annotations for the mask metrics (checked masks as compressed RLE, ignore regions
        for the unusable ones); fills ``left_out_of_masks`` and ``clipped_polygons``."""
        sizes = {im["id"]: (im.get("height"), im.get("width")) for im in self.images}
        out = []
        for ann, segmentation in zip(self.annotations, self._segmentations):
            if ann["image_id"] not in sizes:
                continue  # an image the file does not list is never scored
            h, w = sizes[ann["image_id"]]
            checked = check_segmentation(segmentation, h, w)
            if checked.ok:
                rle = {"size": [int(h), int(w)], "counts": checked.counts}
                out.append({**ann, "segmentation": rle})
                if checked.clipped:
                    self.clipped_polygons.append((ann["reported_id"], ann["image_id"]))
                continue
            self._unusable(
                self.left_out_of_masks,
                checked.reason,
                ann["reported_id"],
                ann["image_id"],
                checked.what,
            )
            region = _box_region(ann["bbox"], h, w)
            if region is not None:
                out.append({**ann, "segmentation": region, "iscrowd": 1, "left_out": True})
        return out

    @functools.cached_property
    def coco(self) -> COCO:
        """The box ground truth for pycocotools (bbox AP) and the proposal recall."""
        return coco_from_dataset(
            {
                "images": self.images,
                "categories": self.categories_list,
                "annotations": [dict(a) for a in self.annotations],
            }
        )

    @functools.cached_property
    def mask_coco(self) -> COCO:
        """The mask ground truth for pycocotools (segm): checked masks, ignore regions."""
        annotations = self._check_masks()
        self._masks_checked = True
        if self.left_out_of_masks:
            logging.warning(
                "%s: %s",
                self.name,
                _describe(
                    self.left_out_of_masks,
                    "left out of the mask metrics (box AP keeps them; each is an ignore region "
                    "there, as a crowd region is)",
                ),
            )
        if self.clipped_polygons:
            logging.warning(
                "%s: clipped the segmentation polygons of %d annotation(s) that reach more than "
                "an image size outside their image (the mask inside the image is the "
                "polygon's): ids %s",
                self.name,
                len(self.clipped_polygons),
                _ids([i for i, _ in self.clipped_polygons]),
            )
        return coco_from_dataset(
            {"images": self.images, "categories": self.categories_list, "annotations": annotations}
        )

    def left_out(self, masks: bool, image_ids) -> Dict[str, List[Any]]:
        """{reason: [annotation ids]} of ``image_ids`` that the box (or mask, box reasons
        included) metrics leave out."""
        if masks and not self._masks_checked:
            _ = self.mask_coco
        wanted = set(int(i) for i in image_ids)
        tables = [self.left_out_of_boxes] + ([self.left_out_of_masks] if masks else [])
        out: Dict[str, List[Any]] = {}
        for table in tables:
            for reason, entries in table.items():
                ids = [a for a, image_id in entries if is_int(image_id) and image_id in wanted]
                if ids:
                    out.setdefault(reason, []).extend(ids)
        return out

    def report(self, metric: str, masks: bool, image_ids) -> Dict[str, List[Any]]:
        """Logs (one line) and returns what ``metric`` leaves out of the scored images."""
        left_out = self.left_out(masks, image_ids)
        if left_out:
            total = sum(len(v) for v in left_out.values())
            logging.warning(
                "evaluation: %s leaves out %d ground-truth annotation(s) of the %d scored "
                "image(s)%s: %s",
                metric,
                total,
                len(image_ids),
                " (unusable masks: box AP keeps them; each is an ignore region in the mask "
                "metrics)"
                if masks and set(left_out) - set(BOX_REASONS)
                else "",
                "; ".join(f"{r} {len(ids)} (ids {_ids(ids)})" for r, ids in left_out.items()),
            )
        return left_out

    def check_image(self, image_id: int):
        if image_id not in self.coco.imgs:
            raise ValueError(f"image_id {image_id} is not in the ground-truth annotation file.")

    def image_size(self, image_id: int):
        """(height, width) of an image as the ground truth says, or None."""
        info = self.coco.imgs.get(image_id, {})
        if check_image_size(info.get("height"), info.get("width")) is None:
            return int(info["height"]), int(info["width"])
        return None

    def check_categories(self, classes: np.ndarray, what: str):
        if not self.categories or classes.size == 0:
            return
        unknown = sorted({int(c) for c in np.unique(classes)} - set(self.categories))
        if unknown:
            raise ValueError(
                f"{what} have category ids {unknown} that the dataset does not have "
                f"(valid: {sorted(self.categories)[:10]}{'...' if len(self.categories) > 10 else ''}). "
                "Contiguous training indices must be mapped to dataset ids."
            )

    def for_image(self, image_id: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(boxes yxyx [G,4], classes [G], is_crowd [G], areas [G]) of one image."""
        anns = self.coco.imgToAnns.get(image_id, [])
        if not anns:
            return np.zeros((0, 4)), np.zeros((0,), np.int64), np.zeros((0,), bool), np.zeros((0,))
        xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        boxes = np.stack(
            [xywh[:, 1], xywh[:, 0], xywh[:, 1] + xywh[:, 3], xywh[:, 0] + xywh[:, 2]], 1
        )
        classes = np.array([a["category_id"] for a in anns], np.int64)
        crowd = np.array([bool(a["iscrowd"]) for a in anns])
        areas = np.array([a["area"] for a in anns], np.float64)
        return boxes, classes, crowd, areas


def _box_region(bbox, h, w) -> Optional[dict]:
    """The box clipped to the image as a compressed RLE, or None (no usable size, empty)."""
    if check_image_size(h, w) is not None:
        return None
    x, y, bw, bh = bbox
    x0, y0 = min(max(x, 0.0), float(w)), min(max(y, 0.0), float(h))
    x1, y1 = min(max(x + bw, 0.0), float(w)), min(max(y + bh, 0.0), float(h))
    if x1 <= x0 or y1 <= y0:
        return None
    box = np.array([[x0, y0, x1 - x0, y1 - y0]], np.float64)
    rle = mask_utils.frPyObjects(box, int(h), int(w))[0]
    if int(mask_utils.area(rle)) == 0:
        return None
    return rle


def _ids(ids: List[Any]) -> str:
    text = ", ".join(str(i) for i in ids[:_MAX_LISTED])
    return text + (f", ... ({len(ids)} in all)" if len(ids) > _MAX_LISTED else "")


def _describe(table: Mapping[str, List[Tuple[Any, Any]]], what: str) -> str:
    total = sum(len(v) for v in table.values())
    parts = [
        f"{reason} {len(entries)} [{_REASONS.get(reason, reason)}] (ids "
        f"{_ids([a for a, _ in entries])})"
        for reason, entries in sorted(table.items())
    ]
    return f"{total} ground-truth annotation(s) {what}: " + "; ".join(parts)


def as_groundtruth(source, on_bad_data: str = "skip") -> GroundTruth:
    """``source`` if it is a :class:`GroundTruth`, else the checked ground truth of it."""
    if isinstance(source, GroundTruth):
        return source
    return GroundTruth(source, on_bad_data=on_bad_data)
