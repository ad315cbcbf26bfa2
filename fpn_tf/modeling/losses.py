"""The four Faster R-CNN losses, each reported on its own (pure TensorFlow on float32).

Normalisation: every loss divides by the number of *sampled* anchors or RoIs,
``batch_size_per_image * num_images`` (detectron2 divides by the same number whenever an image has
enough candidates, which with 2000 proposals it always has). A constant normaliser keeps the box
losses from being inflated when an image has few positives, and makes the loss of a global batch
split over replicas exactly the mean of the replicas' losses.
"""

from __future__ import annotations

import tensorflow as tf


def smooth_l1(diff: tf.Tensor, beta: float) -> tf.Tensor:
    """Huber-style smooth L1 on ``diff``; ``beta == 0`` is plain L1."""
    abs_diff = tf.abs(diff)
    if beta <= 0:
        return abs_diff
    return tf.where(abs_diff < beta, 0.5 * tf.square(abs_diff) / beta, abs_diff - 0.5 * beta)


def rpn_losses(
    labels,
    box_targets,
    logits,
    deltas,
    batch_size_per_image: int,
    smooth_l1_beta: float = 1.0 / 9.0,
):
    """RPN objectness (binary cross-entropy) and box (smooth L1 on positives) losses.

    Args:
      labels: int32 [B, A], 1 positive, 0 negative, -1 not sampled.
      box_targets: float [B, A, 4] encoded targets (weights 1,1,1,1).
      logits: float [B, A] objectness logits; deltas: float [B, A, 4].
      batch_size_per_image: anchors sampled per image (the normaliser).
    Returns:
      ``(objectness_loss, box_loss)`` scalars.
    """
    logits = tf.cast(logits, tf.float32)
    deltas = tf.cast(deltas, tf.float32)
    num_images = tf.cast(tf.shape(labels)[0], tf.float32)
    normalizer = num_images * float(batch_size_per_image)
    sampled = tf.cast(labels >= 0, tf.float32)
    positive = tf.cast(labels == 1, tf.float32)
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=positive, logits=logits)
    objectness_loss = tf.reduce_sum(bce * sampled) / normalizer
    box = tf.reduce_sum(smooth_l1(deltas - tf.cast(box_targets, tf.float32), smooth_l1_beta), -1)
    box_loss = tf.reduce_sum(box * positive) / normalizer
    return objectness_loss, box_loss


def fast_rcnn_losses(
    class_targets,
    box_targets,
    class_logits,
    box_deltas,
    smooth_l1_beta: float = 1.0,
    valid=None,
    normalizer=None,
    classifier_rows=None,
):
    """Fast R-CNN (C+1)-way softmax cross-entropy and class-specific box loss.

    Args:
      class_targets: int32 [B, R] in 0..C (0 background).
      box_targets: float [B, R, 4] encoded targets for the RoI's ground truth (weights 10,10,5,5).
      class_logits: float [B, R, C+1]; box_deltas: float [B, R, C, 4].
      valid: optional bool [B, R], RoIs that count (padding rows excluded).
      normalizer: the divisor (default: ``B * R``, the sampled RoIs incl. padding rows).
      classifier_rows: None, or the classifier row of background and of classes 1..C (C + 1
        ints): ``class_logits`` is then [B, R, M] with M > max(rows) and the cross-entropy is
        the softmax over all M rows at the target's row (torchvision's COCO layout).
    Returns:
      ``(classification_loss, box_loss)`` scalars.
    """
    class_logits = tf.cast(class_logits, tf.float32)
    box_deltas = tf.cast(box_deltas, tf.float32)
    class_targets = tf.cast(class_targets, tf.int32)
    weight = (
        tf.ones_like(class_targets, tf.float32) if valid is None else tf.cast(valid, tf.float32)
    )
    if normalizer is None:
        normalizer = tf.cast(tf.size(class_targets), tf.float32)
    labels = tf.maximum(class_targets, 0)
    if classifier_rows is not None:
        labels = tf.gather(tf.constant(list(classifier_rows), tf.int32), labels)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=class_logits)
    classification_loss = tf.reduce_sum(ce * weight) / normalizer
    foreground = tf.cast(class_targets > 0, tf.float32) * weight
    # Pick each RoI's deltas for its ground-truth class (index k-1 for class k).
    picked = tf.gather(box_deltas, tf.maximum(class_targets - 1, 0), axis=2, batch_dims=2)
    box = tf.reduce_sum(smooth_l1(picked - tf.cast(box_targets, tf.float32), smooth_l1_beta), -1)
    box_loss = tf.reduce_sum(box * foreground) / normalizer
    return classification_loss, box_loss
