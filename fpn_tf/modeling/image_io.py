"""The models' inputs and outputs: split the input, fill the padding, boxes back to original pixels.

A model's input is ``images`` float [B, H, W, 3] RGB 0..255, or ``{"images", "image_info"}``
with ``image_info`` [B, 4, 2] (rows: original size, resized size, scale, offset; `fpn_tf.data`):
then each padded image's valid region is its resized size, and output boxes are rescaled to
original-image pixels (as torchvision's ``GeneralizedRCNNTransform`` does both ways).
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
    """[B, H, W, C] ``images`` with every pixel at row >= valid height or column >= valid width
    (``valid_hw`` [B, 2]) set to ``value`` (one number per channel); float images keep their
    dtype, others become float32."""
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
    """``(images, image_info or None, valid_hw)`` with the padding set to ``pad_value`` (an RGB
    0..255 pixel, the backbone's mean, so the padding is 0 after normalisation, as torchvision
    and detectron2 pad the normalised batch with zeros); unchanged when ``pad_value`` or
    ``image_info`` is None (without image_info the whole image is valid)."""
    images, image_info, valid_hw = split_inputs(inputs)
    if pad_value is not None and image_info is not None:
        images = fill_padding(images, valid_hw, pad_value)
    return images, image_info, valid_hw


def to_original(boxes, image_info):
    """[B, N, 4] yxyx boxes in input pixels -> original-image pixels (unchanged without
    ``image_info``)."""
    if image_info is None:
        return boxes
    scale = tf.cast(image_info, tf.float32)[:, 2, :]
    return boxes / tf.concat([scale, scale], axis=-1)[:, None, :]
