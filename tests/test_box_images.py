"""Eval images for TensorBoard: ground truth in green, confident detections in red, drawn in
the frame of the resized image."""

import numpy as np
import tensorflow as tf

from fpn_tf.evaluation.box_images import detection_images, summary_images


class _FixedDetector:
    """Returns one confident and one unconfident detection, in original-image pixels."""

    def __call__(self, inputs, training=False):
        batch = tf.shape(inputs["images"])[0]
        boxes = tf.constant([[[5.0, 5.0, 15.0, 15.0], [1.0, 1.0, 4.0, 4.0]]])
        return {
            "detection_boxes": tf.tile(boxes, [batch, 1, 1]),
            "detection_scores": tf.tile(tf.constant([[0.9, 0.2]]), [batch, 1]),
            "num_detections": tf.fill([batch], 2),
        }


def _batch():
    features = {
        "images": tf.zeros([1, 64, 96, 3]),
        # original 25x40, resized 50x80 (scale 2), padded to 64x96
        "image_info": tf.constant([[[25.0, 40.0], [50.0, 80.0], [2.0, 2.0], [0.0, 0.0]]]),
    }
    labels = {
        "gt_boxes": tf.constant([[[20.0, 40.0, 40.0, 70.0], [0.0, 0.0, 0.0, 0.0]]]),
        "gt_classes": tf.constant([[1, -1]]),
    }
    return features, labels


def test_ground_truth_green_confident_detection_red_scaled_to_the_resized_image():
    features, labels = _batch()
    image = detection_images(_FixedDetector(), features, labels, score_threshold=0.5)[0].numpy()
    assert image.dtype == np.uint8 and image.shape == (64, 96, 3)
    # The detection [5, 5, 15, 15] (original) is [10, 10, 30, 30] in the resized image.
    np.testing.assert_array_equal(image[10, 20], [255, 0, 0])
    np.testing.assert_array_equal(image[20, 30], [255, 0, 0])
    np.testing.assert_array_equal(image[20, 20], [0, 0, 0])  # inside: not filled
    # The ground truth [20, 40, 40, 70] is already in resized-image pixels.
    np.testing.assert_array_equal(image[20, 55], [0, 255, 0])
    np.testing.assert_array_equal(image[30, 70], [0, 255, 0])
    # The unconfident detection ([2, 2, 8, 8] resized) is not drawn.
    np.testing.assert_array_equal(image[2, 5], [0, 0, 0])
    assert (image[..., 0] == 255).sum() > 60 and (image[..., 1] == 255).sum() > 80


def test_summary_images_are_cropped_to_the_resized_size_and_counted():
    features, labels = _batch()
    dataset = tf.data.Dataset.from_tensors((features, labels)).repeat(3)
    images = summary_images(_FixedDetector(), dataset, num_images=2, score_threshold=0.5)
    assert [im.shape for im in images] == [(50, 80, 3), (50, 80, 3)]
