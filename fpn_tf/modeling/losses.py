"""The four Faster R-CNN losses (float32).

Each divides by the number of sampled anchors or RoIs, ``batch_size_per_image * num_images`` (as
detectron2 whenever an image has enough candidates): a constant normaliser does not inflate the
box losses of images with few positives, and a global batch's loss is the mean over replicas.
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
    """``(objectness, box)``: BCE on the sampled anchors, smooth L1 on the positives.

    labels int32 [B, A] (1 positive, 0 negative, -1 not sampled); box_targets, deltas [B, A, 4].
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
    """``(classification, box)``: softmax cross-entropy and the class-specific box loss.

    class_targets int32 [B, R] in 0..C; box_targets [B, R, 4]; class_logits [B, R, C+1] (or
    [B, R, M] with ``classifier_rows``, the rows of background and classes 1..C, torchvision's
    COCO layout); box_deltas [B, R, C, 4]; valid bool [B, R]; normalizer default B * R.
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
