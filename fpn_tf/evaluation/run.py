"""Runs a detector over an evaluation dataset and scores what it outputs: detections (box and
mask AP), box proposals (AR, the paper's Table 1) or segment proposals (mask AR, Table 6).

Only the images the dataset yielded are scored (the others count as ``num_skipped_images``);
``num_gt_left_out_of_<metric>`` and ``gt_left_out`` ``{metric: {reason: [annotation ids]}}``
report the ground truth each metric left out. The one writer of ``metrics.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import logging
import tensorflow as tf

from fpn_tf.data.tfrecord_reader import TfRecordIndex
from fpn_tf.evaluation.mask_recall import MaskProposalRecallEvaluator
from fpn_tf.evaluation.coco_evaluator import (
    DETECTIONS_FILENAME,
    METRICS_FILENAME,
    COCOEvaluator,
    ProposalRecallEvaluator,
)
from fpn_tf.evaluation.groundtruth import GroundTruth
from fpn_tf.file_io import write_text

GROUNDTRUTH_FILENAME = "groundtruth.json"
_MAX_LISTED_IDS = 20


def groundtruth_file(source, output_dir: str | None) -> str:
    """``source``'s annotation file; shards without one get it written from the shards into
    ``output_dir`` (a temporary folder when None)."""
    if source.annotation_file:
        return source.annotation_file
    if not isinstance(source, TfRecordIndex):
        raise TypeError(f"no ground truth for a source of type {type(source).__name__}")
    directory = output_dir or tempfile.mkdtemp(prefix="fpn_tf_eval_")
    path = os.path.join(directory, GROUNDTRUTH_FILENAME)
    if not tf.io.gfile.exists(path):
        write_text(directory, GROUNDTRUTH_FILENAME, json.dumps(source.groundtruth()))
        logging.info("Wrote the ground truth of %s to %s", source.drops.name, path)
    return path


def checked_groundtruth(source, output_dir: str | None = None) -> GroundTruth:
    """``source``'s checked ground truth, with the image sizes the source read from the files."""
    sizes = None
    if hasattr(source, "heights") and hasattr(source, "image_ids"):
        sizes = {
            int(i): (int(h), int(w))
            for i, h, w in zip(source.image_ids, source.heights, source.widths)
        }
    return GroundTruth(
        groundtruth_file(source, output_dir),
        on_bad_data=getattr(source, "on_bad_data", "skip"),
        image_sizes=sizes,
    )


def evaluate_detector(
    model,
    dataset,
    source,
    output_dir: str | None = None,
    *,
    groundtruth: GroundTruth | None = None,
    step: int | None = None,
    max_steps: int | None = None,
    compute_rpn_recall: bool = True,
    per_category_metrics: bool = False,
    log_every: int = 20,
) -> dict:
    """The metrics dict of ``model`` (outputs in original pixels, dataset category ids) on
    ``dataset``, built from the loaded ``source``; ``output_dir`` None writes nothing,
    ``max_steps`` limits the batches, ``groundtruth`` reuses a :func:`checked_groundtruth`."""
    if groundtruth is None:
        groundtruth = checked_groundtruth(source, output_dir)
    evaluators = None

    @tf.function
    def predict(features):
        return model(
            {"images": features["images"], "image_info": features["image_info"]}, training=False
        )

    start = time.time()
    seen: set[int] = set()
    drops_before = source.drops.count
    for batch, (features, _) in enumerate(dataset):
        if max_steps is not None and batch >= max_steps:
            break
        outputs = {k: v.numpy() for k, v in predict(features).items()}
        outputs["image_id"] = features["image_id"].numpy()
        outputs["original_size"] = features["image_info"][:, 0, :].numpy()
        if evaluators is None:
            evaluators = _evaluators_for(
                outputs, groundtruth, compute_rpn_recall, per_category_metrics
            )
        for evaluator in evaluators:
            evaluator.update_state(outputs)
        seen.update(int(i) for i in outputs["image_id"])
        if log_every and (batch + 1) % log_every == 0:
            logging.info(
                "eval: %d images, %.1f images/s", len(seen), len(seen) / (time.time() - start)
            )
    if not seen:
        raise ValueError(f"the evaluation dataset ({source.drops.name}) yielded no images")
    skipped = _report_skipped(groundtruth.coco, seen, source, drops_before, max_steps)
    metrics = {}
    left_out = {}
    for evaluator in evaluators:
        metrics.update(evaluator.evaluate())
        for metric, by_reason in evaluator.left_out().items():
            metrics[f"num_gt_left_out_of_{metric}"] = sum(len(ids) for ids in by_reason.values())
            if by_reason:
                left_out[metric] = by_reason
    if left_out:  # the one non-number entry, there only when something was left out
        metrics["gt_left_out"] = left_out
    metrics["num_images"] = len(seen)
    metrics["num_skipped_images"] = len(skipped)
    metrics["eval_seconds"] = round(time.time() - start, 2)
    if step is not None:
        metrics["step"] = int(step)
    if output_dir is not None:
        for evaluator in evaluators:
            if isinstance(evaluator, COCOEvaluator):
                write_text(output_dir, DETECTIONS_FILENAME, json.dumps(evaluator.results()))
        write_text(output_dir, METRICS_FILENAME, json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def _evaluators_for(outputs, groundtruth, compute_rpn_recall, per_category_metrics) -> list:
    """The evaluators of the first batch's output keys."""
    evaluators = []
    if "detection_boxes" in outputs:
        evaluators.append(COCOEvaluator(groundtruth, per_category_metrics=per_category_metrics))
    if "proposal_masks" in outputs:
        evaluators.append(MaskProposalRecallEvaluator(groundtruth))
    elif compute_rpn_recall and "proposal_boxes" in outputs:
        evaluators.append(ProposalRecallEvaluator(groundtruth))
    return evaluators


def _report_skipped(groundtruth, seen: set[int], source, drops_before: int, max_steps) -> list:
    """Logs the images of the annotation file that were not scored; returns their ids."""
    skipped = sorted(set(groundtruth.getImgIds()) - seen)
    if not skipped:
        return skipped
    dropped = source.drops.count - drops_before
    listed = ", ".join(str(i) for i in skipped[:_MAX_LISTED_IDS])
    if len(skipped) > _MAX_LISTED_IDS:
        listed += ", ..."
    why = [f"{dropped} dropped at run time (failed to decode)"] if dropped else []
    at_load = sum(getattr(source, "skipped_images", {}).values())
    if at_load:
        why.append(f"{at_load} skipped when the data was loaded")
    if max_steps is not None:
        why.append(f"eval.steps={max_steps} batches did not reach the rest")
    logging.warning(
        "evaluation: scored %d images; %d image(s) of the ground truth were skipped and do not "
        "count (%s): ids %s",
        len(seen),
        len(skipped),
        "; ".join(why) or "not in the evaluation data",
        listed,
    )
    return skipped
