r"""Converts a COCO-format dataset to TFRecord shards (Model Garden's schema).

    python -m fpn_tf.data.convert_coco --annotation_file=instances_train2017.json \
      --image_dir=train2017 --output_prefix=tfrecords/train --num_shards=256

The JSON is validated by :func:`fpn_tf.data.coco_reader.load_coco` (so the shards hold exactly
the reader's examples) and each example is made by Model Garden's ``create_tf_example``; the
category map goes to ``<output_prefix>-category_map.json``. ``--include_masks`` writes each mask
as ``image/object/mask`` (a 0/1 PNG, ``COCO.annToMask``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterator

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

from fpn_tf.data import coco_reader
from fpn_tf.data.segmentation_check import compressed_rle_runs
from fpn_tf.data.tfrecord_reader import category_map_path_for_prefix
from fpn_tf.errors import exit_on_user_error, fail, parse_flags

__all__ = ["ConversionResult", "convert_coco_to_tfrecords"]


@dataclasses.dataclass
class ConversionResult:
    shard_files: list[str]
    category_map_file: str
    num_images: int
    num_annotations: int
    skipped_annotations: dict[str, int]
    skipped_images: dict[str, int]
    seconds: float

    @property
    def file_pattern(self) -> str:
        n = len(self.shard_files)
        return self.shard_files[0].replace(f"-00000-of-{n:05d}", f"-*-of-{n:05d}")


def _segmentation_for_model_garden(rle_counts: bytes, height: int, width: int, crowd: bool):
    """A validated mask (compressed RLE) in the form Model Garden's ``coco_segmentation_to_mask_png``
    decodes to one [height, width] mask: an uncompressed RLE, in a list when not crowd (it takes
    the max over the list's masks) and alone when crowd (it decodes it as it is)."""
    runs = compressed_rle_runs(rle_counts)
    rle = {"size": [int(height), int(width)], "counts": runs}
    return rle if crowd else [rle]


def _annotations_for_model_garden(index: coco_reader.CocoIndex, i: int) -> list[dict[str, Any]]:
    """Image i's validated annotations as COCO dicts for create_tf_example (with their
    ``segmentation`` when the index has masks)."""
    ex = index.example(i)
    width, height = float(ex["width"]), float(ex["height"])
    anns = []
    rles = ex.get("mask_rles", [None] * len(ex["gt_classes"]))
    for box, cls, crowd, aid, area, rle in zip(
        ex["gt_boxes"],
        ex["gt_classes"],
        ex["gt_is_crowd"],
        ex["annotation_ids"],
        ex["areas"],
        rles,
    ):
        y0, x0, y1, x1 = (float(v) for v in box)
        w, h = x1 - x0, y1 - y0
        # create_tf_example drops a box when x + w > width: keep rounding from
        # pushing a box that ends on the border over it.
        while x0 + w > width:
            w = float(np.nextafter(w, 0.0))
        while y0 + h > height:
            h = float(np.nextafter(h, 0.0))
        ann = {
            "id": int(aid),
            "bbox": [x0, y0, w, h],
            "category_id": index.category_map.to_dataset_id(int(cls)),
            "iscrowd": int(bool(crowd)),
            "area": float(area),
        }
        if rle is not None:
            ann["segmentation"] = _segmentation_for_model_garden(
                rle, ex["height"], ex["width"], bool(crowd)
            )
        anns.append(ann)
    return anns


def convert_coco_to_tfrecords(
    annotation_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    output_prefix: str | os.PathLike,
    num_shards: int = 32,
    on_bad_data: str = "skip",
    verify_images: str = "header",
    num_processes: int = 0,
    include_masks: bool = False,
) -> ConversionResult:
    """Writes ``<output_prefix>-NNNNN-of-MMMMM.tfrecord`` shards and the category map JSON.

    ``on_bad_data`` and ``verify_images`` are :func:`coco_reader.load_coco`'s;
    ``num_processes``: worker processes (0: this one).
    """
    # Imported here: the module defines absl flags and pulls in tf_keras.
    from official.vision.data import create_coco_tf_record  # pylint: disable=g-import-not-at-top
    from official.vision.data import tfrecord_lib  # pylint: disable=g-import-not-at-top

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    start = time.time()
    output_prefix = os.fspath(output_prefix)
    image_dir = os.fspath(image_dir)
    index = coco_reader.load_coco(
        annotation_file,
        image_dir,
        on_bad_data=on_bad_data,
        verify_images=verify_images,
        include_masks=include_masks,
    )
    parent = os.path.dirname(output_prefix)
    if parent:
        tf.io.gfile.makedirs(parent)
    id_to_name = index.category_map.dataset_id_to_name()

    def args() -> Iterator[tuple[Any, ...]]:
        for i in range(index.num_images):
            image = {
                "id": int(index.image_ids[i]),
                "file_name": str(index.file_names[i]),
                "height": int(index.heights[i]),
                "width": int(index.widths[i]),
            }
            # create_tf_example's positional arguments: image, image_dirs, panoptic_masks_dir,
            # bbox_annotations, id_to_name_map, caption_annotations, panoptic_annotation,
            # is_category_thing, include_panoptic_masks, include_masks.
            yield (
                image,
                [image_dir],
                None,
                _annotations_for_model_garden(index, i),
                id_to_name,
                None,
                None,
                None,
                False,
                bool(include_masks),
            )

    logging.info(
        "Writing %d images in %d shard(s) to %s-*", index.num_images, num_shards, output_prefix
    )
    num_skipped = tfrecord_lib.write_tf_record_dataset(
        output_prefix,
        args(),
        create_coco_tf_record.create_tf_example,
        num_shards,
        multiple_processes=num_processes,
    )
    if num_skipped:
        # Cannot happen for boxes that passed load_coco; say so if it does.
        logging.warning("Model Garden's create_tf_example dropped %d box(es)", num_skipped)
    cmap_file = category_map_path_for_prefix(output_prefix)
    index.category_map.to_json(cmap_file)
    shards = [f"{output_prefix}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
    result = ConversionResult(
        shard_files=shards,
        category_map_file=cmap_file,
        num_images=index.num_images,
        num_annotations=index.num_annotations - num_skipped,
        skipped_annotations=dict(index.skipped_annotations),
        skipped_images=dict(index.skipped_images),
        seconds=time.time() - start,
    )
    logging.info(
        "Wrote %d images, %d annotations to %s (%d shards) and the category "
        "map to %s in %.1f s; skipped images: %s; skipped annotations: %s",
        result.num_images,
        result.num_annotations,
        result.file_pattern,
        num_shards,
        cmap_file,
        result.seconds,
        result.skipped_images or "none",
        result.skipped_annotations or "none",
    )
    return result


def define_flags() -> None:
    """Command-line flags (defined only when run as a program)."""
    # create_coco_tf_record defines --image_dir, --num_shards, --num_processes,
    # --include_masks on import; ours replace them (allow_override) with our meaning.
    from official.vision.data import create_coco_tf_record  # noqa: F401  # pylint: disable=g-import-not-at-top

    flags.DEFINE_string("annotation_file", None, "COCO instances JSON file.")
    flags.DEFINE_string(
        "image_dir",
        None,
        "Folder the JSON's file_name entries are relative to.",
        allow_override=True,
    )
    flags.DEFINE_string(
        "output_prefix",
        None,
        "Shards are written to <output_prefix>-NNNNN-of-MMMMM"
        ".tfrecord, the category map to "
        "<output_prefix>-category_map.json.",
    )
    flags.DEFINE_integer(
        "num_shards", 32, "Number of shard files.", lower_bound=1, allow_override=True
    )
    flags.DEFINE_enum(
        "on_bad_data",
        "skip",
        list(coco_reader.ON_BAD_DATA),
        "skip: skip, count and log bad boxes/images; error: stop "
        "at the first one with a message naming it.",
    )
    flags.DEFINE_enum(
        "verify_images",
        "header",
        list(coco_reader.VERIFY_IMAGES),
        "How much of each image file to read at load time.",
    )
    flags.DEFINE_bool(
        "include_masks",
        False,
        "Also write each object's mask (image/object/mask, one PNG per object) from its "
        "segmentation; bad segmentations are handled as --on_bad_data says.",
        allow_override=True,
    )
    flags.DEFINE_integer(
        "num_processes",
        0,
        "Processes encoding examples (0: this process).",
        lower_bound=0,
        allow_override=True,
    )
    flags.mark_flags_as_required(["annotation_file", "image_dir", "output_prefix"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: every option is a --flag (see --helpfull)")
    f = flags.FLAGS
    with exit_on_user_error():
        convert_coco_to_tfrecords(
            f.annotation_file,
            f.image_dir,
            f.output_prefix,
            num_shards=f.num_shards,
            on_bad_data=f.on_bad_data,
            verify_images=f.verify_images,
            num_processes=f.num_processes,
            include_masks=f.include_masks,
        )


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
