"""Runs a detector over an evaluation dataset and scores it with COCO metrics (library, no flags).

What is scored follows what the model gives: detections by pycocotools (box AP; with masks
``segm`` mask AP), box proposals by `ProposalRecallEvaluator` (AR, the paper's Table 1), a
segment-proposal model's masks by `MaskProposalRecallEvaluator` (mask AR, Table 6). The ground
truth is a COCO source's annotation file, or for TFRecord shards without one
``groundtruth.json`` written from the shards into ``output_dir``.

Only the images the dataset yielded are scored; the annotation file's other images are logged
and counted as ``num_skipped_images``. The ground truth is checked first
(:mod:`fpn_tf.evaluation.groundtruth`, ``eval_data.on_bad_data``); the metrics count what each
metric left out (``num_gt_left_out_of_<metric>``) and ``gt_left_out`` gives their ids
(``{metric: {reason: [annotation ids]}}``).

``evaluate_detector`` is the one writer of ``metrics.json`` (and ``detections.json``).
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
    """The COCO annotation file that holds ``source``'s ground truth.

    A COCO source's annotation file, or a TFRecord source's ``annotation_file``; shards without
    one get it written from the shards into ``output_dir`` (a temporary folder when None).
    """
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
    """The checked ground truth of an evaluation source (``groundtruth`` module): its annotation
    file, with the image sizes the source read from the files where the file lacks them, checked
    as the source's ``on_bad_data`` says."""
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
    """Box AP (and proposal AR) of ``model`` on ``dataset``, batches of the loaded ``source``.

    Args:
      model: called as ``model({"images", "image_info"}, training=False)``; returns detections
        (and proposals) in original-image pixels with dataset category ids.
      dataset: ``fpn_tf.data.build_dataset(source, training=False, ...)``.
      source: the loaded source the dataset reads (its ground truth, its run-time drops).
      output_dir: where detections.json and metrics.json (and a TFRecord source's
        groundtruth.json) go; None writes nothing.
      groundtruth: ``checked_groundtruth(source)`` made once for several evaluations (None:
        made here).
      step: the training step, recorded in the metrics.
      max_steps: evaluate this many batches only (None: the whole set).

    Returns:
      A flat dict: AP, AP50, AP75, APs, APm, APl, ARmax*, (mask_AP, ... for a model with masks),
      AR@100, AR@1000, ARs@100, ...,
      ``num_images`` (scored), ``num_skipped_images`` (in the annotation file, not scored),
      ``num_gt_left_out_of_<metric>`` and ``gt_left_out`` (module doc), ``eval_seconds`` and
      ``step`` when given.
    """
    if groundtruth is None:
        groundtruth = checked_groundtruth(source, output_dir)
    # What is scored follows what the model gives: detections (box AP, mask AP with masks), box
    # proposals (AR), segment proposals (mask AR, the segment-proposal model's only output).
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
    """The evaluators of a model's outputs (the first batch's keys)."""
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
