"""Image bytes -> RGB pixels: the one signature check and decode that data/ and serving/ share."""

from __future__ import annotations

import tensorflow as tf

__all__ = ["DECODABLE_FORMATS", "IMAGE_SIGNATURES", "decode_rgb", "has_image_signature"]

# What tf.io.decode_image reads (PIL's format names) and the first bytes of each.
DECODABLE_FORMATS = ("JPEG", "PNG", "GIF", "BMP")
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


def has_image_signature(contents: tf.Tensor) -> tf.Tensor:
    """bool []: ``contents`` starts like a JPEG, PNG, GIF or BMP file (prefixes compared: RE2
    regexes match UTF-8 text, not bytes)."""
    starts = [tf.equal(tf.strings.substr(contents, 0, len(sig)), sig) for sig in IMAGE_SIGNATURES]
    return tf.reduce_any(tf.stack(starts))


def decode_rgb(contents: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP -> uint8 RGB [h, w, 3] (alpha dropped, 16-bit PNGs scaled, an
    animated GIF's first frame); bad data fails with TensorFlow's message, which cannot name the
    input: check the signature first."""
    image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])
