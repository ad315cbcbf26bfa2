"""COCO box / mask AP (:class:`COCOEvaluator`) and RPN proposal recall, the paper's Table 1
metric (:class:`ProposalRecallEvaluator`), accumulated per image or batch in NumPy.

Boxes are yxyx in original image pixels, classes the dataset's category ids; results use COCO's
``[x, y, width, height]``. The ground truth is checked first (:mod:`.groundtruth`); only the
images fed are evaluated. Box-relative ``detection_masks`` [B, N, M, M] are pasted, binarised at
0.5 and RLE-encoded.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, List, Mapping, Sequence, Union

import numpy as np
from absl import logging
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fpn_tf.evaluation.groundtruth import (
    GroundTruth,
    as_groundtruth,
    coco_from_dataset,
    read_groundtruth,
)

__all__ = [
    "COCO_METRIC_NAMES",
    "MASK_METRIC_PREFIX",
    "encode_masks",
    "yxyx_to_xywh",
    "load_coco_groundtruth",
    "COCOEvaluator",
    "ProposalRecallEvaluator",
]

COCO_METRIC_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "ARmax1", "ARmax10", "ARmax100", "ARs", "ARm", "ARl",
)  # fmt: skip

MASK_METRIC_PREFIX = "mask_"

DETECTIONS_FILENAME = "detections.json"
METRICS_FILENAME = "metrics.json"

# COCO's area ranges (pixels²), inclusive at both ends as in pycocotools and Detectron.
AREA_RANGES = {
    "": (0.0, 1e5**2),
    "s": (0.0, 32.0**2),
    "m": (32.0**2, 96.0**2),
    "l": (96.0**2, 1e5**2),
}

GroundTruthSource = Union[str, COCO, Mapping, GroundTruth]


def yxyx_to_xywh(boxes) -> np.ndarray:
    """[ymin, xmin, ymax, xmax] -> COCO [x, y, width, height]."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 1], b[:, 0], b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]], axis=1)


def encode_masks(masks, boxes, image_size) -> List[Dict[str, Any]]:
    """COCO compressed RLEs (counts as str) of box-relative masks [N, M, M] over ``boxes`` [N, 4]
    (yxyx pixels of an image of ``image_size`` (height, width)): pasted, then ``>= 0.5``."""
    from fpn_tf.ops import mask_ops  # TensorFlow, imported only when masks are evaluated

    masks = np.asarray(masks, np.float32)
    height, width = (int(v) for v in image_size)
    if len(masks) == 0:
        return []
    pasted = mask_ops.paste_masks(masks, np.asarray(boxes, np.float32), (height, width))
    binary = np.asfortranarray(np.transpose(pasted.numpy() >= 0.5, (1, 2, 0)).astype(np.uint8))
    rles = mask_utils.encode(binary)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of [P,4] and [G,4] yxyx boxes (continuous coordinates, no +1) -> [P, G]."""
    area_a = np.maximum(a[:, 2] - a[:, 0], 0) * np.maximum(a[:, 3] - a[:, 1], 0)
    area_b = np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)
    ymin = np.maximum(a[:, None, 0], b[None, :, 0])
    xmin = np.maximum(a[:, None, 1], b[None, :, 1])
    ymax = np.minimum(a[:, None, 2], b[None, :, 2])
    xmax = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.maximum(ymax - ymin, 0) * np.maximum(xmax - xmin, 0)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _to_image_id(value) -> int:
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode("utf-8")
    if isinstance(value, str):
        value = value.strip()
    return int(value)


def _numpy(value) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def load_coco_groundtruth(source: Union[str, Mapping, COCO]) -> COCO:
    """An unchecked pycocotools COCO of a file path, a dataset dict or a COCO (as is)."""
    if isinstance(source, COCO):
        return source
    return coco_from_dataset(source if isinstance(source, Mapping) else read_groundtruth(source))


def _batch_image_ids(values: Mapping) -> np.ndarray:
    for key in ("image_id", "source_id"):
        if key in values:
            return np.asarray(_numpy(values[key])).reshape(-1)
    raise KeyError("a batch needs 'image_id' (or 'source_id').")


class _Evaluator:
    """Shared ground-truth plumbing: the checked ground truth (``groundtruth.GroundTruth``)."""

    def __init__(self, annotation_file: GroundTruthSource, on_bad_data: str = "skip"):
        self._gt = as_groundtruth(annotation_file, on_bad_data)
        self._left_out: Dict[str, Dict[str, List[Any]]] = {}
        self._seen: Dict[int, None] = {}  # insertion-ordered set of image ids fed

    @property
    def num_images(self) -> int:
        return len(self._seen)

    @property
    def categories(self) -> Dict[int, str]:
        return dict(self._gt.categories)

    def reset(self):
        self._seen = {}
        self._left_out = {}

    def left_out(self) -> Dict[str, Dict[str, List[Any]]]:
        """{metric: {reason: [annotation ids]}} the last ``evaluate`` left out of each metric."""
        return {k: dict(v) for k, v in self._left_out.items()}

    def image_ids(self) -> List[int]:
        """The images fed so far: the ones evaluated."""
        return sorted(self._seen)

    def _see(self, image_id: int):
        self._gt.check_image(image_id)
        self._seen[image_id] = None


class COCOEvaluator(_Evaluator):
    """COCO bbox AP, and segm AP when every image fed came with masks.

    ``annotation_file``: a JSON path, COCO, dataset dict or checked ``GroundTruth``;
    ``on_bad_data="skip"`` leaves unusable ground truth out (logged, :meth:`left_out`), "error"
    raises a DataError. An annotation with a bad mask is left out of mask AP only, its box an
    ignore region there. ``per_category_metrics`` adds "AP/<name>" (and "mask_AP/<name>").
    """

    def __init__(
        self,
        annotation_file: GroundTruthSource,
        *,
        per_category_metrics: bool = False,
        on_bad_data: str = "skip",
    ):
        super().__init__(annotation_file, on_bad_data)
        self.per_category_metrics = per_category_metrics
        self._detections: List[Dict[str, Any]] = []
        self._with_masks: set = set()  # whether the images fed had masks (True / False)

    def reset(self):
        super().reset()
        self._detections = []
        self._with_masks = set()

    def add_detections(self, image_id, boxes, scores, classes, segmentations=None):
        """One image's boxes [N, 4], scores [N], classes [N] and optional N RLEs (N may be 0)."""
        image_id = _to_image_id(image_id)
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
        classes = np.rint(np.asarray(classes).reshape(-1)).astype(np.int64)
        if not len(boxes) == len(scores) == len(classes):
            raise ValueError(
                f"{len(boxes)} boxes, {len(scores)} scores, {len(classes)} classes for image {image_id}."
            )
        if segmentations is not None and len(segmentations) != len(boxes):
            raise ValueError(
                f"{len(segmentations)} masks for {len(boxes)} detections of image {image_id}."
            )
        size = self._gt.image_size(image_id)
        if segmentations is not None and size is not None:
            for rle in segmentations:
                if tuple(int(v) for v in rle["size"]) != size:
                    raise ValueError(
                        f"detection masks of image {image_id} are {rle['size'][0]}x"
                        f"{rle['size'][1]} but the ground truth says the image is "
                        f"{size[0]}x{size[1]}: mask IoU needs the same size."
                    )
        self._gt.check_categories(classes, "Detections")
        self._see(image_id)
        self._with_masks.add(segmentations is not None)
        for k, (box, score, cls) in enumerate(zip(yxyx_to_xywh(boxes), scores, classes)):
            detection = {
                "image_id": image_id,
                "category_id": int(cls),
                "bbox": [round(float(v), 3) for v in box],
                "score": float(score),
            }
            if segmentations is not None:
                detection["segmentation"] = segmentations[k]
            self._detections.append(detection)

    def update_state(self, predictions: Mapping):
        """Adds one batch: "image_id" [B], "detection_boxes" [B, N, 4], "detection_scores",
        "detection_classes" [B, N], optional "num_detections" [B] (else score <= 0 is padding),
        optional "detection_masks" [B, N, M, M] with "original_size" [B, 2] to paste them at."""
        image_ids = _batch_image_ids(predictions)
        boxes = _numpy(predictions["detection_boxes"]).astype(np.float32)
        scores = _numpy(predictions["detection_scores"])
        classes = _numpy(predictions["detection_classes"])
        num = predictions.get("num_detections")
        num = None if num is None else _numpy(num).reshape(-1)
        masks = predictions.get("detection_masks")
        if masks is not None:
            masks = _numpy(masks)
            if "original_size" not in predictions:
                raise ValueError("detection_masks need original_size.")
            original_sizes = _numpy(predictions["original_size"]).reshape(-1, 2)
        for i, image_id in enumerate(image_ids):
            keep = np.arange(scores.shape[1]) < int(num[i]) if num is not None else scores[i] > 0
            segmentations = None
            if masks is not None:
                segmentations = encode_masks(masks[i][keep], boxes[i][keep], original_sizes[i])
            self.add_detections(
                image_id, boxes[i][keep], scores[i][keep], classes[i][keep], segmentations
            )

    def results(self) -> List[Dict[str, Any]]:
        """The detections so far in COCO results format."""
        return list(self._detections)

    @property
    def has_masks(self) -> bool:
        """Whether mask AP is computed: every image fed came with masks."""
        return self._with_masks == {True}

    def evaluate(self) -> Dict[str, float]:
        """COCOeval on the images fed (-1 where an area range has no ground truth)."""
        image_ids = self.image_ids()
        iou_types = ["bbox"] + (["segm"] if self.has_masks else [])
        metrics: Dict[str, float] = {}
        if not image_ids:
            logging.warning("COCOEvaluator.evaluate: no images were fed; all metrics are 0.")
            for iou_type in iou_types:
                prefix = MASK_METRIC_PREFIX if iou_type == "segm" else ""
                metrics.update({prefix + name: 0.0 for name in COCO_METRIC_NAMES})
            return metrics
        per_category: Dict[str, float] = {}
        for iou_type in iou_types:
            prefix = MASK_METRIC_PREFIX if iou_type == "segm" else ""
            gt = self._gt.mask_coco if iou_type == "segm" else self._gt.coco
            dt = _results_to_coco(self._detections, gt, iou_type)
            coco_eval = COCOeval(gt, dt, iouType=iou_type)
            coco_eval.params.imgIds = image_ids
            summary = io.StringIO()
            with contextlib.redirect_stdout(summary):
                coco_eval.evaluate()
                coco_eval.accumulate()
                coco_eval.summarize()
            logging.info(
                "COCO %s evaluation on %d images, %d detections:\n%s",
                iou_type,
                len(image_ids),
                len(self._detections),
                summary.getvalue(),
            )
            metrics.update(
                {prefix + name: float(v) for name, v in zip(COCO_METRIC_NAMES, coco_eval.stats)}
            )
            if self.per_category_metrics:
                precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
                for k, cat_id in enumerate(coco_eval.params.catIds):
                    p = precision[:, :, k, 0, -1]
                    value = float(np.mean(p[p > -1])) if np.any(p > -1) else -1.0
                    name = self._gt.categories.get(cat_id, cat_id)
                    per_category[f"{prefix}AP/{name}"] = value
            self._left_out[prefix + "AP"] = self._gt.report(
                prefix + "AP", iou_type == "segm", image_ids
            )
        metrics.update(per_category)
        return metrics


def _results_to_coco(results: List[Dict[str, Any]], gt: COCO, iou_type: str = "bbox") -> COCO:
    """Like COCO.loadRes (box areas for bbox, mask areas for segm), also fine with zero results."""
    annotations = []
    for i, r in enumerate(results, start=1):
        x, y, w, h = r["bbox"]
        area = float(mask_utils.area(r["segmentation"])) if iou_type == "segm" else w * h
        annotations.append({**r, "area": area, "id": i, "iscrowd": 0})
    return load_coco_groundtruth(
        {
            "images": list(gt.dataset["images"]),
            "categories": list(gt.dataset["categories"]),
            "annotations": annotations,
        }
    )


class ProposalRecallEvaluator(_Evaluator):
    """Class-agnostic proposal recall "AR@100", "ARs@100", ..., "AR@1000" (-1: no ground truth).

    Detectron's ``evaluate_box_proposals``, used for FPN's Table 1: per image the non-crowd ground
    truths in the area range are greedily matched to the top-``limit`` proposals; AR is the mean
    over IoU t = 0.50:0.05:0.95 of the fraction matched at IoU >= t.
    """

    def __init__(
        self,
        annotation_file: GroundTruthSource,
        *,
        limits: Sequence[int] = (100, 1000),
        on_bad_data: str = "skip",
    ):
        super().__init__(annotation_file, on_bad_data)
        self.limits = tuple(int(n) for n in limits)
        self.iou_thresholds = np.arange(0.5, 0.95 + 1e-5, 0.05)
        self._proposals: Dict[int, np.ndarray] = {}

    def reset(self):
        super().reset()
        self._proposals = {}

    def add_proposals(self, image_id, boxes, scores=None):
        """One image's boxes [P, 4]; ``scores`` [P], or None when already sorted best first."""
        image_id = _to_image_id(image_id)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if scores is not None:
            scores = np.asarray(scores, np.float32).reshape(-1)
            if len(scores) != len(boxes):
                raise ValueError(
                    f"{len(boxes)} proposals but {len(scores)} scores for image {image_id}."
                )
            boxes = boxes[np.argsort(-scores, kind="stable")]
        self._see(image_id)
        kept = boxes[: max(self.limits)]
        if image_id in self._proposals:  # fed twice (e.g. a repeated image): keep the latest
            logging.warning(
                "ProposalRecallEvaluator: image %d fed twice; keeping the latest.", image_id
            )
        self._proposals[image_id] = kept

    def update_state(self, predictions: Mapping):
        """Adds "image_id" [B], "proposal_boxes" [B, P, 4], optional "proposal_scores" [B, P]
        and "num_proposals" [B]."""
        image_ids = _batch_image_ids(predictions)
        boxes = _numpy(predictions["proposal_boxes"]).astype(np.float32)
        scores = predictions.get("proposal_scores")
        scores = None if scores is None else _numpy(scores)
        num = predictions.get("num_proposals")
        num = None if num is None else _numpy(num).reshape(-1)
        for i, image_id in enumerate(image_ids):
            n = int(num[i]) if num is not None else boxes.shape[1]
            self.add_proposals(image_id, boxes[i, :n], None if scores is None else scores[i, :n])

    def evaluate(self) -> Dict[str, float]:
        """AR at each limit and size range over the images fed so far."""
        metrics: Dict[str, float] = {}
        image_ids = self.image_ids()
        for limit in self.limits:
            for size, (lo, hi) in AREA_RANGES.items():
                overlaps, num_gt = [], 0
                for image_id in image_ids:
                    gt_boxes, _, crowd, areas = self._gt.for_image(image_id)
                    keep = (~crowd) & (areas >= lo) & (areas <= hi)
                    gt_boxes = gt_boxes[keep]
                    num_gt += len(gt_boxes)
                    proposals = self._proposals.get(image_id, np.zeros((0, 4), np.float32))[:limit]
                    if len(gt_boxes) and len(proposals):
                        overlaps.append(
                            _greedy_matched_iou(
                                _pairwise_iou(proposals.astype(np.float64), gt_boxes)
                            )
                        )
                name = f"AR{size}@{limit}"
                if num_gt == 0:
                    metrics[name] = -1.0
                    continue
                matched = np.concatenate(overlaps) if overlaps else np.zeros((0,))
                recalls = [(matched >= t).sum() / num_gt for t in self.iou_thresholds]
                metrics[name] = float(np.mean(recalls))
        if image_ids:
            logging.info("Proposal recall on %d images: %s", len(image_ids), metrics)
            self._left_out["AR"] = self._gt.report("AR", False, image_ids)
        return metrics


def _greedy_matched_iou(iou: np.ndarray) -> np.ndarray:
    """IoUs of the min(P, G) pairs of Detectron's greedy matching of IoU [P, G]."""
    iou = iou.copy()
    num_gt = iou.shape[1]
    out = np.zeros(min(iou.shape), np.float64)
    for j in range(len(out)):
        best_proposal = iou.argmax(axis=0)  # per ground truth
        best_iou = iou[best_proposal, np.arange(num_gt)]
        g = int(best_iou.argmax())
        p = int(best_proposal[g])
        out[j] = iou[p, g]
        iou[p, :] = -1.0
        iou[:, g] = -1.0
    return out
