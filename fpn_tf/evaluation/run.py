"""Runs a detector over an evaluation dataset and scores it with COCO metrics (library, no flags).

Box AP/AP50/AP75/APs/APm/APl come from pycocotools; proposal recall AR@100/AR@1000 (and by size),
the paper's Table 1 metric, from `ProposalRecallEvaluator`. Detections and metrics are written as
JSON into ``output_dir``.
"""

from __future__ import annotations

import time

from absl import logging
import tensorflow as tf

from fpn_tf.evaluation.coco_evaluator import (
    COCOEvaluator,
    ProposalRecallEvaluator,
    load_coco_groundtruth,
)


def evaluate_detector(
    model,
    dataset,
    annotation_file: str,
    output_dir: str | None = None,
    max_steps: int | None = None,
    compute_rpn_recall: bool = True,
    per_category_metrics: bool = False,
    log_every: int = 20,
) -> dict:
    """Box AP (and proposal AR) of ``model`` on ``dataset`` (batches of `fpn_tf.data`).

    Returns a flat dict: AP, AP50, AP75, APs, APm, APl, ARmax*, and AR@100, AR@1000, ARs@100, ...
    plus ``num_images`` and ``eval_seconds``.
    """
    groundtruth = load_coco_groundtruth(annotation_file)
    boxes_eval = COCOEvaluator(groundtruth, per_category_metrics=per_category_metrics)
    recall_eval = ProposalRecallEvaluator(groundtruth) if compute_rpn_recall else None

    @tf.function
    def predict(features):
        return model(
            {"images": features["images"], "image_info": features["image_info"]}, training=False
        )

    start = time.time()
    num_images = 0
    for step, (features, _) in enumerate(dataset):
        if max_steps is not None and step >= max_steps:
            break
        outputs = {k: v.numpy() for k, v in predict(features).items()}
        outputs["image_id"] = features["image_id"].numpy()
        boxes_eval.update_state(outputs)
        if recall_eval is not None:
            recall_eval.update_state(outputs)
        num_images += len(outputs["image_id"])
        if log_every and (step + 1) % log_every == 0:
            logging.info(
                "eval: %d images, %.1f images/s", num_images, num_images / (time.time() - start)
            )
    if num_images == 0:
        raise ValueError(f"the evaluation dataset ({annotation_file}) yielded no images")
    metrics = dict(boxes_eval.evaluate(output_dir))
    if recall_eval is not None:
        metrics.update(recall_eval.evaluate(output_dir))
    metrics["num_images"] = num_images
    metrics["eval_seconds"] = round(time.time() - start, 2)
    return metrics
