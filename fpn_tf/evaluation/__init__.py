"""Evaluation: COCO box AP and RPN proposal recall (pycocotools / NumPy; no TensorFlow needed)."""

from fpn_tf.evaluation.coco_evaluator import (
    COCO_METRIC_NAMES,
    COCOEvaluator,
    ProposalRecallEvaluator,
    load_coco_groundtruth,
    yxyx_to_xywh,
)
