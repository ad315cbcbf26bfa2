"""Serving modules: one `tf.Module` per input type, sharing `DetectionModule.detect`.

``images`` (uint8 [B, H, W, 3]) -> "serving_default", ``image_bytes`` (string [B]) ->
"image_bytes", ``serialized_example`` (string [B]) -> "tf_example". Each module decodes its input
into one padded uint8 batch plus true sizes; ``detect`` resizes by the eval rule, calls the model
once with ``image_info`` and returns the outputs of docs/serving.md (boxes normalised to the
input image, exactly ``NUM_DETECTIONS`` rows, box-relative ``detection_masks`` for a mask head).
"""

from __future__ import annotations

import tensorflow as tf

from fpn_tf.configs.experiment import ResizeConfig
from fpn_tf.data import images as image_io
from fpn_tf.data import transforms

__all__ = [
    "MASK_OUTPUT_KEY",
    "NUM_DETECTIONS",
    "OUTPUT_KEYS",
    "DetectionModule",
    "ImageBytesModule",
    "ImageTensorModule",
    "TfExampleModule",
    "preprocess_images",
]

NUM_DETECTIONS = 100
OUTPUT_KEYS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")
MASK_OUTPUT_KEY = "detection_masks"


def preprocess_images(
    images: tf.Tensor, sizes: tf.Tensor, resize: ResizeConfig
) -> tuple[tf.Tensor, tf.Tensor]:
    """uint8 [B, H, W, 3] ``images`` with true (h, w) ``sizes`` int32 [B, 2] -> the model's
    (images float32 [B, Hp, Wp, 3], image_info float32 [B, 4, 2]), padded to the largest
    resized size rounded up to ``resize.pad_multiple``."""
    resized = transforms.resized_size(sizes, resize)
    largest = tf.reduce_max(resized, axis=0)
    padded = tf.cast(transforms.ceil_to_multiple_tf(largest, resize.pad_multiple), tf.int32)

    def one(args):
        image, size = args
        image = image[: size[0], : size[1], :]
        out, info, _ = transforms.resize_and_pad(image, tf.zeros([0, 4]), resize, padded)
        return out, info

    return tf.map_fn(
        one,
        (images, sizes),
        fn_output_signature=(
            tf.TensorSpec([None, None, 3], tf.float32),
            tf.TensorSpec([4, 2], tf.float32),
        ),
    )


class DetectionModule(tf.Module):
    """What every signature shares: preprocessing, one model call, the output contract
    (``num_detections`` rows; the model's own rows are zero padded or cut)."""

    signature_name: str = ""
    input_name: str = ""

    def __init__(
        self,
        model,
        resize: ResizeConfig,
        num_detections: int = NUM_DETECTIONS,
        name: str | None = None,
    ):
        super().__init__(name=name)
        # Not tracked as a child: saving the Keras object graph is not needed (the SavedModel
        # keeps the traced functions and the variables, which export_saved_model tracks) and
        # fails for layers holding dicts with int keys (FeaturePyramid's convs).
        object.__setattr__(self, "_model", model)
        self.resize = resize.validate_section("resize.")
        self.num_detections = int(num_detections)

    def detect(self, images: tf.Tensor, sizes: tf.Tensor) -> dict[str, tf.Tensor]:
        """uint8 [B, H, W, 3] padded images + int32 [B, 2] true sizes -> the four outputs."""
        model_images, image_info = preprocess_images(images, sizes, self.resize)
        out = self._model({"images": model_images, "image_info": image_info}, training=False)
        return self.format_outputs(out, sizes)

    def format_outputs(self, out, sizes: tf.Tensor) -> dict[str, tf.Tensor]:
        """The model's outputs (original-image pixels) -> the SavedModel contract."""
        n = self.num_detections
        boxes = tf.cast(out["detection_boxes"], tf.float32)
        scores = tf.cast(out["detection_scores"], tf.float32)
        classes = tf.cast(out["detection_classes"], tf.float32)
        rows = tf.shape(scores)[1]
        pad = tf.maximum(n - rows, 0)
        boxes = tf.pad(boxes[:, :n], [[0, 0], [0, pad], [0, 0]])
        scores = tf.pad(scores[:, :n], [[0, 0], [0, pad]])
        classes = tf.pad(classes[:, :n], [[0, 0], [0, pad]])
        count = tf.minimum(tf.cast(out["num_detections"], tf.int32), n)
        valid = tf.sequence_mask(count, n)
        hw = tf.cast(sizes, tf.float32)
        boxes = tf.clip_by_value(boxes / tf.tile(hw, [1, 2])[:, None, :], 0.0, 1.0)
        batch = tf.shape(sizes)[0]

        def rows(x, tail=()):  # rows beyond num_detections zeroed, static shape [None, n, *tail]
            x = tf.where(valid[(...,) + (None,) * len(tail)], x, 0.0)
            return tf.ensure_shape(tf.reshape(x, [batch, n, *tail]), [None, n, *tail])

        outputs = {
            "detection_boxes": rows(boxes, (4,)),
            "detection_scores": rows(scores),
            "detection_classes": rows(classes),
            "num_detections": tf.cast(count, tf.float32),
        }
        if MASK_OUTPUT_KEY in out:
            masks = tf.cast(out[MASK_OUTPUT_KEY], tf.float32)
            m = masks.shape[-1]
            outputs[MASK_OUTPUT_KEY] = rows(
                tf.pad(masks[:, :n], [[0, 0], [0, pad], [0, 0], [0, 0]]), (m, m)
            )
        return outputs

    @property
    def model(self):
        return self._model

    def input_signature(self) -> tf.TensorSpec:
        raise NotImplementedError

    def concrete_function(self):
        """The concrete function registered as this module's signature."""
        return self.__call__.get_concrete_function(self.input_signature())


class ImageTensorModule(DetectionModule):
    """``serving_default``: ``images`` uint8 [batch, height, width, 3], any batch and size."""

    signature_name = "serving_default"
    input_name = "images"

    def input_signature(self):
        return tf.TensorSpec([None, None, None, 3], tf.uint8, name=self.input_name)

    @tf.function
    def __call__(self, images):
        # The signature's caller checks the dtype only; a wrong rank or channel count would fail
        # deep inside with a message about some internal tensor.
        shape = tf.shape(images)
        # The rank counted at run time: tf.size(shape) would be folded to the declared rank 4.
        rank = tf.shape(tf.where(shape >= 0))[0]
        check = tf.debugging.Assert(
            tf.logical_and(tf.equal(rank, 4), tf.equal(shape[-1], 3)),
            [
                f"{self.signature_name}: input `{self.input_name}` must be uint8 [batch, height, "
                "width, 3] (RGB); got shape",
                shape,
            ],
            summarize=8,
        )
        with tf.control_dependencies([check]):
            images = tf.identity(images)
        sizes = tf.tile(shape[None, 1:3], [shape[0], 1])
        return self.detect(images, sizes)


def _decode_ragged(decode_one, elems: tf.Tensor, what: str):
    """Maps ``decode_one`` (string -> uint8 [h, w, 3]) over ``elems``: a dense zero padded uint8
    batch and the int32 [B, 2] true sizes."""

    def one(args):
        index, value = args
        image = decode_one(value, index)
        return tf.RaggedTensor.from_tensor(image)  # ragged rows so sizes may differ

    indices = tf.range(tf.shape(elems)[0])
    ragged = tf.map_fn(
        one,
        (indices, elems),
        fn_output_signature=tf.RaggedTensorSpec([None, None, 3], tf.uint8, ragged_rank=1),
        name=f"decode_{what}",
    )
    heights = tf.cast(ragged.row_lengths(axis=1), tf.int32)
    widths = tf.reduce_max(tf.cast(ragged.row_lengths(axis=2), tf.int32), axis=1)
    # ragged_rank 2 after batching: [B, (h), (w), 3]; to_tensor zero pads to the largest.
    images = ragged.to_tensor(shape=[None, None, None, 3])
    # an image with no rows would give width 0 from reduce_max: decode never returns one.
    return images, tf.stack([heights, widths], axis=1)


def _check_magic(data: tf.Tensor, index: tf.Tensor, input_name: str) -> tf.Operation:
    """An assertion that ``data`` starts like a JPEG, PNG, GIF or BMP file."""
    return tf.debugging.Assert(
        image_io.has_image_signature(data),
        [
            f"{input_name}: element",
            index,
            "is not an encoded JPEG or PNG image (nor " "GIF/BMP): its",
            tf.strings.length(data),
            "bytes start with none of their " "signatures",
        ],
    )


def decode_image(data: tf.Tensor, index: tf.Tensor, input_name: str = "image_bytes") -> tf.Tensor:
    """Encoded JPEG/PNG (also GIF first frame, BMP) -> uint8 [h, w, 3]; gray and RGBA -> RGB.

    Bytes in no known format fail with an InvalidArgumentError naming ``input_name[index]``."""
    with tf.control_dependencies([_check_magic(data, index, input_name)]):
        return image_io.decode_rgb(data)


class ImageBytesModule(DetectionModule):
    """``image_bytes``: string [batch] of encoded JPEG or PNG images; sizes may differ."""

    signature_name = "image_bytes"
    input_name = "image_bytes"

    def input_signature(self):
        return tf.TensorSpec([None], tf.string, name=self.input_name)

    @tf.function
    def __call__(self, image_bytes):
        images, sizes = _decode_ragged(
            lambda v, i: decode_image(v, i, self.input_name), image_bytes, "image_bytes"
        )
        return self.detect(images, sizes)


class TfExampleModule(DetectionModule):
    """``tf_example``: string [batch] of serialized tf.Examples in Model Garden's detection schema
    (``image/encoded``; the other features are optional), decoded with
    ``official.vision.dataloaders.tf_example_decoder.TfExampleDecoder``."""

    signature_name = "tf_example"
    input_name = "serialized_example"

    def input_signature(self):
        return tf.TensorSpec([None], tf.string, name=self.input_name)

    @tf.function
    def __call__(self, serialized_example):
        # Imported here: the module pulls in Model Garden (and tf_keras).
        from official.vision.dataloaders import tf_example_decoder  # pylint: disable=g-import-not-at-top,line-too-long

        # regenerate_source_id: the example need not carry image/source_id.
        decoder = tf_example_decoder.TfExampleDecoder(include_mask=False, regenerate_source_id=True)

        def decode_one(value, index):
            encoded = tf.io.parse_single_example(
                value, {"image/encoded": tf.io.FixedLenFeature((), tf.string)}
            )["image/encoded"]
            with tf.control_dependencies(
                [_check_magic(encoded, index, "image/encoded of " + self.input_name)]
            ):
                image = decoder.decode(value)["image"]
            return tf.ensure_shape(image, [None, None, 3])

        images, sizes = _decode_ragged(decode_one, serialized_example, "tf_example")
        return self.detect(images, sizes)
