"""Reads TFRecord shards in Model Garden's tf.Example detection schema (``TfExampleDecoder``)
into the per-image dict of :mod:`.coco_reader`: normalised boxes become clipped pixels (zero-size
ones dropped with a warning), dataset ids become 1..C (an unknown id fails naming the image),
``image/source_id`` the integer ``image_id`` (hashed if not numeric), and the per-object PNG
masks ``gt_masks`` uint8 [n, H, W].
"""

from __future__ import annotations

import os
import re
import sys
from typing import Sequence

import numpy as np
import tensorflow as tf

from fpn_tf.data.category_map import CategoryMap, as_category_map
from fpn_tf.data.errors import DataError, RunTimeDrops

__all__ = [
    "TfRecordIndex",
    "category_map_path_for_prefix",
    "shard_files",
]

_SHARD_RE = re.compile(r"^(?P<prefix>.*)-\d{5}-of-\d{5}\.tfrecord$")
CATEGORY_MAP_SUFFIX = "-category_map.json"


def category_map_path_for_prefix(output_prefix: str) -> str:
    """Where the converter writes the category map of ``output_prefix`` shards."""
    return output_prefix + CATEGORY_MAP_SUFFIX


def shard_files(file_pattern: str | Sequence[str]) -> list[str]:
    """Expands glob pattern(s) (comma-separated allowed) into sorted files."""
    is_str = isinstance(file_pattern, str)
    patterns = [p for p in file_pattern.split(",") if p] if is_str else list(file_pattern)
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
        f"{', '.join(dict.fromkeys(candidates))}); pass category_map= (a CategoryMap, its JSON, "
        "or the COCO annotation file the shards came from)"
    )


class TfRecordIndex:
    """TFRecord shards and their CategoryMap, the twin of CocoIndex.

    ``file_pattern``: globs (comma-separated) or files; ``category_map`` None reads the JSON
    ``convert_coco`` writes beside the shards; ``annotation_file`` None makes the evaluation's
    ground truth from the shards (:meth:`groundtruth`).
    """

    def __init__(
        self,
        file_pattern: str | Sequence[str],
        category_map: CategoryMap | str | os.PathLike | None = None,
        on_bad_data: str = "skip",
        annotation_file: str | None = None,
    ):
        if on_bad_data not in ("error", "skip"):
            raise ValueError(f"on_bad_data must be 'error' or 'skip', got {on_bad_data!r}")
        self.files = shard_files(file_pattern)
        self.on_bad_data = on_bad_data
        self.annotation_file = annotation_file
        self.drops = RunTimeDrops(
            ",".join(self.files)
            if len(self.files) < 3
            else f"{self.files[0]} (+{len(self.files) - 1} shards)"
        )
        self._groundtruth = None
        if category_map is None:
            category_map = _find_category_map(self.files)
        self.category_map = as_category_map(category_map)
        # Imported here: the module pulls in Model Garden (and tf_keras).
        from official.vision.dataloaders import tf_example_decoder  # pylint: disable=g-import-not-at-top

        decoder = tf_example_decoder.TfExampleDecoder
        self._decoder = decoder(include_mask=False, regenerate_source_id=False)
        self._mask_decoder = decoder(include_mask=True, regenerate_source_id=False)

    num_images = None  # unknown without a pass over the shards

    def item_dataset(
        self,
        shuffle_files: bool = False,
        seed: int | None = None,
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
            cycle_length=min(len(self.files), 16),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=deterministic,
        )
        if records_shard:
            ds = ds.shard(num_shards, shard_index)
        return ds

    def decode(self, serialized: tf.Tensor, include_masks: bool = False) -> dict[str, tf.Tensor]:
        """One serialized tf.Example -> the per-image dict."""
        d = (self._mask_decoder if include_masks else self._decoder).decode(serialized)
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
                "TFRecord image has a category id the category map does not know; image id:",
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
            msg = ["WARNING: fpn_tf.data: dropped", num_empty, "zero-size box(es) of image id"]
            tf.print(*msg, image_id, output_stream=sys.stderr)
            return tf.constant(0)

        warned = tf.cond(num_empty > 0, _warn, lambda: tf.constant(0))
        checks = [check, warned]
        if include_masks:
            masks = d["groundtruth_instance_masks"]
            checks.append(
                tf.debugging.Assert(
                    tf.equal(tf.shape(masks)[0], tf.shape(boxes)[0]),
                    [
                        "TFRecord image's mask count differs from its box count (shards "
                        "written without masks?); image id:",
                        image_id,
                        "masks:",
                        tf.shape(masks)[0],
                        "boxes:",
                        tf.shape(boxes)[0],
                    ],
                )
            )
        with tf.control_dependencies(checks):
            keep = tf.identity(non_empty)
        out = {
            "image": image,
            "image_id": image_id,
            "height": height,
            "width": width,
            "gt_boxes": tf.boolean_mask(boxes, keep),
            "gt_classes": tf.boolean_mask(classes, keep),
            "gt_is_crowd": tf.boolean_mask(is_crowd, keep),
        }
        if include_masks:
            masks = tf.cast(tf.boolean_mask(masks, keep) > 0.5, tf.uint8)
            out["gt_masks"] = tf.reshape(masks, tf.stack([-1, height, width]))
        return out

    def describe(self, serialized) -> tuple[str, str]:
        """(file name, source id) of one serialized example, for log lines."""
        try:
            features = tf.train.Example.FromString(bytes(serialized)).features.feature
        except Exception:  # noqa: BLE001 - not even a tf.Example
            return "a record that is not a tf.Example", "?"

        def text(key):
            values = features[key].bytes_list.value if key in features else []
            return values[0].decode("utf-8", "replace") if values else "?"

        return text("image/filename"), text("image/source_id")

    def groundtruth(self) -> dict:
        """The shards' ground truth as a COCO annotation dict (one pass, kept): boxes scaled by
        ``image/height`` / ``image/width``, ``image/object/area`` or the box area, PNG masks as
        RLE."""
        if self._groundtruth is None:
            self._groundtruth = _groundtruth_from_shards(self.files, self.category_map)
        return self._groundtruth


_GT_FEATURES = {
    "image/source_id": tf.io.FixedLenFeature((), tf.string, ""),
    "image/height": tf.io.FixedLenFeature((), tf.int64, -1),
    "image/width": tf.io.FixedLenFeature((), tf.int64, -1),
    "image/object/bbox/xmin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/xmax": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymax": tf.io.VarLenFeature(tf.float32),
    "image/object/class/label": tf.io.VarLenFeature(tf.int64),
    "image/object/is_crowd": tf.io.VarLenFeature(tf.int64),
    "image/object/area": tf.io.VarLenFeature(tf.float32),
    "image/object/mask": tf.io.VarLenFeature(tf.string),
}


def _png_mask_rle(png: bytes, height: int, width: int, source_id: str, files) -> dict:
    """A PNG instance mask -> COCO compressed RLE (counts as str)."""
    from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top

    mask = tf.io.decode_png(png, channels=1).numpy()[..., 0]
    if mask.shape != (height, width):
        raise DataError(
            f"{files[0]}: image {source_id} has a {mask.shape[0]}x{mask.shape[1]} mask in a "
            f"{height}x{width} image"
        )
    rle = mask_utils.encode(np.asfortranarray((mask > 0).astype(np.uint8)))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _groundtruth_from_shards(files: Sequence[str], category_map: CategoryMap) -> dict:
    images, annotations = [], []

    def parse(serialized):
        ex = tf.io.parse_single_example(serialized, _GT_FEATURES)
        return {
            k: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v for k, v in ex.items()
        }

    ds = tf.data.TFRecordDataset(list(files)).map(parse)
    for ex in ds.as_numpy_iterator():
        source_id = ex["image/source_id"].decode("utf-8")
        if not re.fullmatch(r"-?[0-9]{1,18}", source_id):
            raise DataError(
                f"{files[0]}: image/source_id {source_id!r} is not an integer; give eval_data an "
                "annotation_file to evaluate these shards"
            )
        h, w = int(ex["image/height"]), int(ex["image/width"])
        if h <= 0 or w <= 0:
            raise DataError(
                f"{files[0]}: image {source_id} has no image/height or image/width; give "
                "eval_data an annotation_file to evaluate these shards"
            )
        image_id = int(source_id)
        images.append({"id": image_id, "height": h, "width": w})
        dense = dict(ex)
        for key in ("xmin", "ymin", "xmax", "ymax"):  # clipped as the pipeline clips them
            dense[f"image/object/bbox/{key}"] = np.clip(dense[f"image/object/bbox/{key}"], 0, 1)
        x0, y0 = dense["image/object/bbox/xmin"] * w, dense["image/object/bbox/ymin"] * h
        x1, y1 = dense["image/object/bbox/xmax"] * w, dense["image/object/bbox/ymax"] * h
        crowd, area = dense["image/object/is_crowd"], dense["image/object/area"]
        masks = dense["image/object/mask"]
        labels = dense["image/object/class/label"]
        if len(masks) and len(masks) != len(labels):
            raise DataError(
                f"{files[0]}: image {source_id} has {len(masks)} masks for {len(labels)} boxes"
            )
        for k, label in enumerate(labels):
            bw, bh = float(x1[k] - x0[k]), float(y1[k] - y0[k])
            if bw <= 0 or bh <= 0:
                continue  # the pipeline drops these too
            segm = {}
            if len(masks):
                segm["segmentation"] = _png_mask_rle(masks[k], h, w, source_id, files)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [float(x0[k]), float(y0[k]), bw, bh],
                    "area": float(area[k]) if k < len(area) else bw * bh,
                    "iscrowd": int(crowd[k]) if k < len(crowd) else 0,
                    **segm,
                }
            )
    categories = [
        {"id": int(i), "name": n} for i, n in zip(category_map.dataset_ids, category_map.names)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}
