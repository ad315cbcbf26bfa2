"""Reads TFRecord shards in Model Garden's tf.Example detection schema.

Decoding reuses ``official.vision.dataloaders.tf_example_decoder.TfExampleDecoder``
(the schema written by ``official.vision.data.create_coco_tf_record`` and by our
:mod:`fpn_tf.data.convert_coco`). Each element is converted to the same
per-image dict as :mod:`fpn_tf.data.coco_reader` gives:

* boxes: the schema stores them normalised to [0, 1]; they are scaled to
  pixels of the decoded image and clipped to it;
* classes: the schema stores dataset category ids; they are mapped to the
  contiguous 1..C with the :class:`CategoryMap`. A class id the map does not
  know stops the pipeline with a message naming the image (the map does not
  belong to these shards);
* ``image_id``: ``image/source_id`` parsed as an integer (COCO ids are; a
  non-numeric source id is hashed to a non-negative int64);
* boxes of zero size (possible in shards made by other tools) are dropped
  with a printed warning naming the image.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Sequence

import tensorflow as tf

from fpn_tf.data.category_map import CategoryMap, as_category_map
from fpn_tf.data.errors import DataError

__all__ = [
    "TfRecordIndex",
    "category_map_path_for_prefix",
    "read_tfrecords",
    "shard_files",
]

_SHARD_RE = re.compile(r"^(?P<prefix>.*)-\d{5}-of-\d{5}\.tfrecord$")
CATEGORY_MAP_SUFFIX = "-category_map.json"


def category_map_path_for_prefix(output_prefix: str) -> str:
    """Where the converter writes the category map of ``output_prefix`` shards."""
    return output_prefix + CATEGORY_MAP_SUFFIX


def shard_files(file_pattern: str | Sequence[str]) -> list[str]:
    """Expands glob pattern(s) (comma-separated allowed) into sorted files."""
    patterns = (
        [p for p in file_pattern.split(",") if p]
        if isinstance(file_pattern, str)
        else list(file_pattern)
    )
    files = []
    for pattern in patterns:
        matched = tf.io.gfile.glob(pattern)
        if not matched:
            raise DataError(f"{pattern}: no TFRecord files match")
        files.extend(matched)
    files = sorted(set(f for f in files if not f.endswith(".json")))
    if not files:
        raise DataError(f"{file_pattern}: no TFRecord files match")
    return files


def _find_category_map(files: Sequence[str]) -> str:
    candidates = []
    for f in files:
        m = _SHARD_RE.match(f)
        if m:
            candidates.append(category_map_path_for_prefix(m.group("prefix")))
    candidates.append(os.path.join(os.path.dirname(files[0]), "category_map.json"))
    for c in dict.fromkeys(candidates):
        if tf.io.gfile.exists(c):
            return c
    raise DataError(
        f"{files[0]}: no category map found beside the shards (looked for "
        f"{', '.join(dict.fromkeys(candidates))}); pass category_map= (a "
        "CategoryMap, its JSON, or the COCO annotation file the shards came "
        "from)"
    )


class TfRecordIndex:
    """TFRecord shards + their CategoryMap; the TFRecord twin of CocoIndex.

    Args:
      file_pattern: glob pattern, comma-separated patterns, or a list of files.
      category_map: a CategoryMap, a path to its JSON (or to a COCO annotation
        file), or None to use the ``<prefix>-category_map.json`` that
        :mod:`fpn_tf.data.convert_coco` writes beside the shards.
    """

    def __init__(
        self,
        file_pattern: str | Sequence[str],
        category_map: CategoryMap | str | os.PathLike | None = None,
    ):
        self.files = shard_files(file_pattern)
        if category_map is None:
            category_map = _find_category_map(self.files)
        self.category_map = as_category_map(category_map)
        # Imported here: the module pulls in Model Garden (and tf_keras).
        from official.vision.dataloaders import tf_example_decoder  # pylint: disable=g-import-not-at-top

        self._decoder = tf_example_decoder.TfExampleDecoder(
            include_mask=False, regenerate_source_id=False
        )

    num_images = None  # unknown without a pass over the shards

    def item_dataset(
        self,
        shuffle_files: bool = False,
        seed: int | None = None,
        cycle_length: int | None = None,
        num_shards: int = 1,
        shard_index: int = 0,
        deterministic: bool | None = None,
    ) -> tf.data.Dataset:
        """Serialized tf.Examples, interleaved across the shard files."""
        files = tf.data.Dataset.from_tensor_slices(self.files)
        records_shard = False
        if num_shards > 1:
            if len(self.files) >= num_shards:
                files = files.shard(num_shards, shard_index)
            else:
                records_shard = True
        if shuffle_files:
            files = files.shuffle(len(self.files), seed=seed, reshuffle_each_iteration=True)
        ds = files.interleave(
            tf.data.TFRecordDataset,
            cycle_length=cycle_length or min(len(self.files), 16),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=deterministic,
        )
        if records_shard:
            ds = ds.shard(num_shards, shard_index)
        return ds

    def decode(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        """One serialized tf.Example -> the per-image dict."""
        d = self._decoder.decode(serialized)
        image = d["image"]
        shape = tf.shape(image, out_type=tf.int32)
        height, width = shape[0], shape[1]
        source_id = d["source_id"]
        # COCO ids are integers; any other source id is hashed to one.
        image_id = tf.cond(
            tf.strings.regex_full_match(source_id, r"-?[0-9]{1,18}"),
            lambda: tf.strings.to_number(source_id, tf.int64),
            lambda: tf.strings.to_hash_bucket_fast(source_id, 2**62),
        )
        hw = tf.cast(tf.stack([height, width, height, width]), tf.float32)
        boxes = tf.reshape(tf.cast(d["groundtruth_boxes"], tf.float32), [-1, 4])
        boxes = tf.clip_by_value(boxes, 0.0, 1.0) * hw
        classes = self.category_map.dataset_to_contiguous_ids(d["groundtruth_classes"])
        check = tf.debugging.Assert(
            tf.reduce_all(classes > 0),
            [
                "TFRecord image has a category id the category map does not know; " "image id:",
                image_id,
                "class ids:",
                d["groundtruth_classes"],
                "known:",
                tf.constant(self.category_map.dataset_ids),
            ],
            summarize=200,
        )
        is_crowd = tf.cast(d["groundtruth_is_crowd"], tf.bool)
        non_empty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        num_empty = tf.reduce_sum(tf.cast(~non_empty, tf.int32))

        def _warn():
            tf.print(
                "WARNING: fpn_tf.data: dropped",
                num_empty,
                "zero-size box(es) of TFRecord image id",
                image_id,
                output_stream=sys.stderr,
            )
            return tf.constant(0)

        warned = tf.cond(num_empty > 0, _warn, lambda: tf.constant(0))
        with tf.control_dependencies([check, warned]):
            keep = tf.identity(non_empty)
        return {
            "image": image,
            "image_id": image_id,
            "height": height,
            "width": width,
            "gt_boxes": tf.boolean_mask(boxes, keep),
            "gt_classes": tf.boolean_mask(classes, keep),
            "gt_is_crowd": tf.boolean_mask(is_crowd, keep),
        }

    def dataset(
        self, num_parallel_calls: int = tf.data.AUTOTUNE, deterministic: bool | None = None
    ) -> tf.data.Dataset:
        """Per-image dicts, shards read in sorted-file order (interleaved)."""
        return self.item_dataset(deterministic=deterministic).map(
            self.decode, num_parallel_calls=num_parallel_calls, deterministic=deterministic
        )


def read_tfrecords(
    file_pattern: str | Sequence[str],
    category_map: CategoryMap | str | os.PathLike | None = None,
) -> tuple[tf.data.Dataset, CategoryMap]:
    """Reads shards; returns (per-image dataset, CategoryMap)."""
    index = TfRecordIndex(file_pattern, category_map)
    return index.dataset(), index.category_map
