"""The models' inputs and outputs, as torchvision's ``GeneralizedRCNNTransform``.

An input is ``images`` float [B, H, W, 3] RGB 0..255, or ``{"images", "image_info"}`` with
``image_info`` [B, 4, 2] (original size, resized size, scale, offset): the valid region of each
padded image is its resized size, and output boxes go back to original-image pixels.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import tensorflow as tf


def split_inputs(inputs):
    """``(images, image_info or None, valid (height, width) float32 [B, 2])``."""
    if isinstance(inputs, Mapping):
        images, image_info = inputs["images"], inputs.get("image_info")
    else:
        images, image_info = inputs, None
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    if image_info is None:
        valid_hw = tf.tile(tf.cast(shape[1:3], tf.float32)[None], [shape[0], 1])
    else:
        valid_hw = tf.cast(image_info, tf.float32)[:, 1, :]
    return images, image_info, valid_hw


def fill_padding(images, valid_hw, value: Sequence[float]):
    """``images`` [B, H, W, C] with the pixels outside ``valid_hw`` [B, 2] set to ``value`` (one
    per channel); non-float images become float32."""
    images = tf.convert_to_tensor(images)
    if not images.dtype.is_floating:
        images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    valid_hw = tf.cast(valid_hw, tf.float32)
    rows = tf.cast(tf.range(shape[1]), tf.float32)[None, :, None] < valid_hw[:, 0, None, None]
    cols = tf.cast(tf.range(shape[2]), tf.float32)[None, None, :] < valid_hw[:, 1, None, None]
    inside = tf.logical_and(rows, cols)[..., None]  # [B, H, W, 1]
    return tf.where(inside, images, tf.constant(value, images.dtype))


def prepare_inputs(inputs, pad_value: Sequence[float] | None = None):
    """`split_inputs` with the padding set to ``pad_value`` (the backbone's RGB mean: 0 after
    normalisation, as torchvision and detectron2 pad) when both it and ``image_info`` are given."""
    images, image_info, valid_hw = split_inputs(inputs)
    if pad_value is not None and image_info is not None:
        images = fill_padding(images, valid_hw, pad_value)
    return images, image_info, valid_hw


def to_original(boxes, image_info):
    """[B, N, 4] yxyx boxes in input pixels -> original pixels (unchanged without image_info)."""
    if image_info is None:
        return boxes
    scale = tf.cast(image_info, tf.float32)[:, 2, :]
    return boxes / tf.concat([scale, scale], axis=-1)[:, None, :]
