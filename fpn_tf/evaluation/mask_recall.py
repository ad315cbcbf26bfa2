"""Class-agnostic mask average recall of segment proposals (the paper's Table 6 metric).

Each proposal's mask is pasted, thresholded at 0.5 and RLE-encoded; AR is read from pycocotools'
``COCOeval(iouType="segm", useCats=0)`` recall (correct by construction; pasting dominates the
time): "mask_AR@10", "mask_AR@100", "mask_AR@1000", "mask_ARs@1000", ... (-1: no ground truth).
"""

from __future__ import annotations

import contextlib
import io
from typing import Dict, List, Mapping, Sequence

import numpy as np
from absl import logging
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from fpn_tf.evaluation.coco_evaluator import (
    GroundTruthSource,
    _batch_image_ids,
    _Evaluator,
    _numpy,
    _to_image_id,
    load_coco_groundtruth,
)

__all__ = ["MaskProposalRecallEvaluator"]

_AREAS = ("", "s", "m", "l")  # COCOeval's areaRngLbl order: all, small, medium, large


class MaskProposalRecallEvaluator(_Evaluator):
    """Mask AR at each of ``limits`` (COCOeval's maxDets), AR_s/m/l at the largest; ground
    truth as in ``COCOEvaluator``. Masks are pasted ``CHUNK`` at a time (CHUNK x H x W floats)."""

    CHUNK = 100

    def __init__(
        self,
        annotation_file: GroundTruthSource,
        *,
        limits: Sequence[int] = (10, 100, 1000),
        on_bad_data: str = "skip",
    ):
        super().__init__(annotation_file, on_bad_data)
        self.limits = tuple(int(n) for n in limits)
        self._results: Dict[int, List[dict]] = {}

    def reset(self):
        super().reset()
        self._results = {}

    def add_proposals(self, image_id, masks, boxes, scores):
        """One image's [P, M, M] masks over ``boxes`` [P, 4] and ``scores`` [P], pasted at the
        image's size in the ground truth."""
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        from fpn_tf.ops import mask_ops  # pylint: disable=g-import-not-at-top

        image_id = _to_image_id(image_id)
        masks = np.asarray(masks, np.float32)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scores = np.asarray(scores, np.float32).reshape(-1)
        if not len(masks) == len(boxes) == len(scores):
            raise ValueError(
                f"{len(masks)} masks, {len(boxes)} boxes, {len(scores)} scores for image "
                f"{image_id}."
            )
        self._see(image_id)
        order = np.argsort(-scores, kind="stable")[: max(self.limits)]
        masks, boxes, scores = masks[order], boxes[order], scores[order]
        size = self._gt.image_size(image_id)
        if size is None:
            raise ValueError(f"image {image_id}: no height/width in the ground truth")
        h, w = size
        results = []
        for start in range(0, len(masks), self.CHUNK):
            pasted = mask_ops.paste_masks(
                tf.constant(masks[start : start + self.CHUNK]),
                tf.constant(boxes[start : start + self.CHUNK]),
                (h, w),
            ).numpy()
            binary = np.asfortranarray((pasted >= 0.5).transpose(1, 2, 0).astype(np.uint8))
            for rle, score in zip(mask_utils.encode(binary), scores[start : start + self.CHUNK]):
                results.append({"segmentation": rle, "score": float(score)})
        if image_id in self._results:
            logging.warning(
                "MaskProposalRecallEvaluator: image %d fed twice; keeping the latest.", image_id
            )
        self._results[image_id] = results

    def update_state(self, predictions: Mapping):
        """Adds "image_id" [B], "proposal_masks" [B, P, M, M], "proposal_boxes" [B, P, 4],
        "proposal_scores" [B, P], optional "num_proposals" [B] (else score <= 0 is padding)."""
        image_ids = _batch_image_ids(predictions)
        masks = _numpy(predictions["proposal_masks"])
        boxes = _numpy(predictions["proposal_boxes"])
        scores = _numpy(predictions["proposal_scores"])
        num = predictions.get("num_proposals")
        num = None if num is None else _numpy(num).reshape(-1)
        for i, image_id in enumerate(image_ids):
            keep = np.arange(scores.shape[1]) < int(num[i]) if num is not None else scores[i] > 0
            self.add_proposals(image_id, masks[i][keep], boxes[i][keep], scores[i][keep])

    def evaluate(self) -> Dict[str, float]:
        """COCOeval (segm, class-agnostic) over the images fed so far."""
        image_ids = self.image_ids()
        if not image_ids:
            logging.warning("MaskProposalRecallEvaluator.evaluate: no images were fed.")
            last = self.limits[-1]
            names = [f"mask_AR@{n}" for n in self.limits] + [f"mask_AR{s}@{last}" for s in "sml"]
            return {n: 0.0 for n in names}
        gt = self._gt.mask_coco  # checked masks; unusable ones are ignore regions
        # With useCats=0 COCOeval still gathers by params.catIds: proposals take one of them.
        categories = list(gt.dataset["categories"]) or [{"id": 1, "name": "object"}]
        category = int(categories[0]["id"])
        annotations = []
        for image_id in image_ids:
            for r in self._results.get(image_id, []):
                rle = r["segmentation"]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category,
                        "segmentation": rle,
                        "area": float(mask_utils.area(rle)),
                        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                        "score": r["score"],
                        "iscrowd": 0,
                    }
                )
        dt = load_coco_groundtruth(
            {
                "images": list(gt.dataset["images"]),
                "categories": categories,
                "annotations": annotations,
            }
        )
        coco_eval = COCOeval(gt, dt, iouType="segm")
        coco_eval.params.imgIds = image_ids
        coco_eval.params.useCats = 0
        coco_eval.params.catIds = [int(c["id"]) for c in categories]
        coco_eval.params.maxDets = list(self.limits)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.evaluate()
            coco_eval.accumulate()
        recall = coco_eval.eval["recall"]  # [T, K=1, A, M]
        metrics = {}
        for m, limit in enumerate(self.limits):
            for a, size in enumerate(_AREAS):
                if size and limit != self.limits[-1]:
                    continue
                r = recall[:, 0, a, m]
                metrics[f"mask_AR{size}@{limit}"] = float(np.mean(r)) if np.all(r > -1) else -1.0
        logging.info("Mask proposal recall on %d images: %s", len(image_ids), metrics)
        self._left_out["mask_AR"] = self._gt.report("mask_AR", True, image_ids)
        return metrics
