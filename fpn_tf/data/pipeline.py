"""The input pipeline: a source -> batches of (features, labels).

    ds = build_dataset(CocoSource("annotations/instances_train2017.json",
                                  "train2017"),
                       training=True, batch_size=16, seed=0)
    features, labels = next(iter(ds))

Each batch (see WORKSPACE.md):

* ``features["images"]``: float32 [B, Hp, Wp, 3] RGB 0..255, zero padded at
  the bottom/right;
* ``features["image_info"]``: float32 [B, 4, 2] rows ``[original (h, w),
  resized (h, w) before padding, scale (y, x), offset (y, x) = 0]``;
* ``features["image_id"]``: int64 [B] (the dataset's image id);
* ``labels["gt_boxes"]``: float32 [B, N, 4] ymin, xmin, ymax, xmax in pixels
  of the resized image; ``labels["gt_classes"]``: int32 [B, N] contiguous
  1..C, -1 = padding; ``labels["gt_is_crowd"]``: bool [B, N].
  N = ``max_num_instances``.

Static shapes (``padding_mode``): by default ("orientation") each image is
padded to a fixed size chosen by its orientation, ``[ceil32(short_side),
ceil32(max_long_side)]`` = [800, 1344] for landscape (h <= w) and [1344, 800]
for portrait, and ``group_by_window`` puts only same-orientation images in a
batch. So a run sees at most two image shapes (a jit-compiled train step
compiles twice, not once per size) and each batch holds 40 % fewer pixels
than a square [1344, 1344] ("square" mode: one shape, e.g. for TPUs). "batch" pads
each batch only to its largest image (rounded up to ``pad_multiple``): least
padding, many shapes. Batches always have a static batch size in training
(``drop_remainder``); the image dimensions are static only in "square" mode.

Order of operations: items (image indices for COCO, serialized records for
TFRecords) are sharded (``input_context``), shuffled (seeded), repeated
(training), numbered, then decoded and transformed in a parallel map
(AUTOTUNE), with each image's flip drawn from a stateless RNG seeded by
(seed, element number) so a seeded run is reproducible whatever the
parallelism; then grouped/batched and prefetched.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from fpn_tf.data import transforms
from fpn_tf.data.category_map import CategoryMap
from fpn_tf.data.coco_reader import CocoIndex, load_coco

__all__ = [
    "CocoSource",
    "DatasetInfo",
    "TfRecordSource",
    "as_source",
    "build_dataset",
    "build_dataset_from_config",
    "get_category_map",
    "load_source",
]


@dataclasses.dataclass(frozen=True)
class CocoSource:
    """A COCO-format dataset: annotation JSON + image folder."""

    annotation_file: str
    image_dir: str
    on_bad_data: str = "skip"
    verify_images: str = "header"


@dataclasses.dataclass(frozen=True)
class TfRecordSource:
    """TFRecord shards in Model Garden's schema (see tfrecord_reader)."""

    file_pattern: str
    category_map: str | None = None  # path; None: the JSON beside the shards
    on_bad_data: str = "skip"


@dataclasses.dataclass
class DatasetInfo:
    """What a trainer needs to know besides the batches."""

    category_map: CategoryMap
    num_images: int | None  # None for TFRecords (not counted)
    image_shapes: list[tuple[int, int]]  # padded (h, w) shapes; [] = varying
    per_replica_batch_size: int
    seed: int | None
    skipped_annotations: dict[str, int]
    skipped_images: dict[str, int]


def as_source(source: Any) -> CocoSource | TfRecordSource:
    """Accepts a source dataclass, a dict, or any object with the fields.

    COCO: ``annotation_file`` + ``image_dir``; TFRecords: ``file_pattern``
    (+ optional ``category_map``); both: optional ``on_bad_data``; COCO:
    optional ``verify_images``. A ``type`` or ``source`` of "coco"/"tfrecord"
    picks the kind; otherwise ``file_pattern`` means TFRecords.
    """
    if isinstance(source, (CocoSource, TfRecordSource)):
        return source
    get = (
        (lambda k, d=None: source.get(k, d))
        if isinstance(source, Mapping)
        else (lambda k, d=None: getattr(source, k, d))
    )
    kind = get("type")
    if kind is None and get("source") in ("coco", "tfrecord"):
        kind = get("source")  # the experiment config's discriminator
    if kind == "tfrecord" or (kind is None and get("file_pattern")):
        return TfRecordSource(
            file_pattern=get("file_pattern"),
            category_map=get("category_map"),
            on_bad_data=get("on_bad_data") or "skip",
        )
    if kind in (None, "coco") and get("annotation_file"):
        return CocoSource(
            annotation_file=os.fspath(get("annotation_file")),
            image_dir=os.fspath(get("image_dir")),
            on_bad_data=get("on_bad_data") or "skip",
            verify_images=get("verify_images") or "header",
        )
    raise ValueError(
        "a data source needs annotation_file + image_dir (COCO) or "
        f"file_pattern (TFRecords), got {source!r}"
    )


_SOURCE_CACHE: dict[Any, Any] = {}


def load_source(source: Any):
    """Loads (and caches) a source: a CocoIndex or a TfRecordIndex.

    Loading a COCO annotation file is validated and slow for COCO (~20 s), so
    the result is cached per source and file stamp (mtime, size): the train
    loop, the evaluator and :func:`get_category_map` share one load.
    """
    src = as_source(source)
    if isinstance(src, CocoSource):
        try:
            st = os.stat(src.annotation_file)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        key = (src, stamp)
        if key not in _SOURCE_CACHE:
            _SOURCE_CACHE[key] = load_coco(
                src.annotation_file,
                src.image_dir,
                on_bad_data=src.on_bad_data,
                verify_images=src.verify_images,
            )
        return _SOURCE_CACHE[key]
    from fpn_tf.data.tfrecord_reader import TfRecordIndex  # pylint: disable=g-import-not-at-top

    key = (src, None)
    if key not in _SOURCE_CACHE:
        _SOURCE_CACHE[key] = TfRecordIndex(src.file_pattern, src.category_map)
    return _SOURCE_CACHE[key]


def get_category_map(source: Any) -> CategoryMap:
    """The CategoryMap of a source (loads it once; see load_source)."""
    return load_source(source).category_map


def _on_bad_data(source: Any) -> str:
    return as_source(source).on_bad_data


def build_dataset(
    source: Any,
    training: bool,
    batch_size: int,
    *,
    short_side: int = 800,
    max_long_side: int = 1333,
    pad_multiple: int = 32,
    padding_mode: str = "orientation",
    max_num_instances: int = 100,
    random_flip: bool = True,
    shuffle: bool | None = None,
    shuffle_buffer_size: int | None = None,
    seed: int | None = None,
    deterministic: bool | None = None,
    repeat: bool | None = None,
    drop_remainder: bool | None = None,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    prefetch_buffer_size: int = tf.data.AUTOTUNE,
    input_context: tf.distribute.InputContext | None = None,
    return_info: bool = False,
):
    """Builds the training or evaluation input pipeline.

    Args:
      source: :class:`CocoSource`, :class:`TfRecordSource`, or a dict/object
        with their fields (see :func:`as_source`).
      training: training (shuffle, flip, repeat, drop remainder) or evaluation
        (no shuffle, no flip, one pass, partial batches kept; every image
        exactly once, in file order within each orientation group).
      batch_size: the *global* batch size. With ``input_context`` the dataset
        yields ``input_context.get_per_replica_batch_size(batch_size)``.
      short_side: resize the shorter side to this (paper: 800) ...
      max_long_side: ... unless the longer side would exceed this (1333).
      pad_multiple: padded sizes are multiples of this (32 = stride of P5).
      padding_mode: "orientation" (default), "square" or "batch" (module doc).
      max_num_instances: N, ground-truth rows per image (more: first N kept,
        with a warning).
      random_flip: random horizontal flip with p=0.5 (training only).
      shuffle, repeat, drop_remainder: default to ``training``.
      shuffle_buffer_size: None or 0: every image (COCO: the buffer holds
        image indices, not pixels); 1000 serialized records for TFRecords.
      seed: seeds the shuffle and the flips; None draws one (logged).
      deterministic: element order of parallel maps; default True if ``seed``
        is given, else False (faster).
      num_parallel_calls, prefetch_buffer_size: tf.data tuning (AUTOTUNE).
      input_context: from ``strategy.distribute_datasets_from_function``; shards
        the input across pipelines.
      return_info: also return a :class:`DatasetInfo`.

    Returns:
      ``tf.data.Dataset`` of ``(features, labels)``, or ``(dataset, info)``.
    """
    if padding_mode not in transforms.PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {transforms.PADDING_MODES}," f" got {padding_mode!r}"
        )
    if batch_size < 1 or max_num_instances < 1 or pad_multiple < 1:
        raise ValueError("batch_size, max_num_instances and pad_multiple must be " ">= 1")
    shuffle = training if shuffle is None else shuffle
    repeat = training if repeat is None else repeat
    drop_remainder = training if drop_remainder is None else drop_remainder
    flip = training and random_flip
    if deterministic is None:
        deterministic = seed is not None
    if seed is None and (shuffle or flip):
        seed = int(np.random.default_rng().integers(2**31 - 1))
        logging.info("fpn_tf.data: no seed given; drew seed=%d", seed)

    num_pipelines, pipeline_id = 1, 0
    per_replica_batch = batch_size
    if input_context is not None:
        num_pipelines = input_context.num_input_pipelines
        pipeline_id = input_context.input_pipeline_id
        per_replica_batch = input_context.get_per_replica_batch_size(batch_size)

    index = load_source(source)
    skip_bad = _on_bad_data(source) == "skip"
    if isinstance(index, CocoIndex):
        items = index.item_dataset()
        if num_pipelines > 1:
            items = items.shard(num_pipelines, pipeline_id)
        buffer = shuffle_buffer_size or max(index.num_images, 1)
        too_many = int(np.sum(index.num_instances_per_image > max_num_instances))
        if too_many:
            logging.warning(
                "%s: %d image(s) have more than max_num_instances=%d annotations; "
                "only their first %d are used",
                index.annotation_file,
                too_many,
                max_num_instances,
                max_num_instances,
            )
    else:
        items = index.item_dataset(
            shuffle_files=shuffle,
            seed=seed,
            num_shards=num_pipelines,
            shard_index=pipeline_id,
            deterministic=deterministic,
        )
        buffer = shuffle_buffer_size or 1000
    if shuffle:
        items = items.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        items = items.repeat()
    items = items.enumerate()

    flip_seed = None
    if flip:
        # A distinct stream per input pipeline.
        flip_seed = (int(seed) * 1_000_003 + pipeline_id) % (2**62)
    decode = index.decode
    transform_args = dict(
        short_side=short_side,
        max_long_side=max_long_side,
        pad_multiple=pad_multiple,
        padding_mode=padding_mode,
        max_num_instances=max_num_instances,
    )

    def element(number, item):
        example = decode(item)
        do_flip = False
        if flip_seed is not None:
            rng_seed = tf.stack([tf.constant(flip_seed, tf.int64), number])
            do_flip = tf.random.stateless_uniform([], seed=rng_seed) < 0.5
        return transforms.preprocess_example(example, flip=do_flip, **transform_args)

    ds = items.map(element, num_parallel_calls=num_parallel_calls, deterministic=deterministic)
    if skip_bad:
        # Last guard: an image file that fails to decode in tf.data (files are
        # checked at load time only as far as verify_images asks) is dropped;
        # coco_reader.decode_image_guarded prints a line naming it.
        ds = ds.ignore_errors(log_warning=True)

    if padding_mode == "orientation":

        def key(features, labels):
            del labels
            resized = features["image_info"][1]
            return tf.cast(resized[0] > resized[1], tf.int64)  # 1: portrait

        ds = ds.group_by_window(
            key_func=key,
            reduce_func=lambda _, window: window.batch(
                per_replica_batch, drop_remainder=drop_remainder
            ),
            window_size=per_replica_batch,
        )
    elif padding_mode == "square":
        ds = ds.batch(per_replica_batch, drop_remainder=drop_remainder)
    else:
        ds = ds.padded_batch(per_replica_batch, drop_remainder=drop_remainder)

    options = tf.data.Options()
    options.deterministic = deterministic
    ds = ds.with_options(options).prefetch(prefetch_buffer_size)

    if not return_info:
        return ds
    info = DatasetInfo(
        category_map=index.category_map,
        num_images=index.num_images,
        image_shapes=transforms.fixed_padded_size(
            padding_mode, short_side, max_long_side, pad_multiple
        ),
        per_replica_batch_size=per_replica_batch,
        seed=seed,
        skipped_annotations=dict(getattr(index, "skipped_annotations", {})),
        skipped_images=dict(getattr(index, "skipped_images", {})),
    )
    return ds, info


# Keyword arguments of build_dataset that a config object may carry.
_BUILD_ARGS = (
    "short_side",
    "max_long_side",
    "pad_multiple",
    "padding_mode",
    "max_num_instances",
    "random_flip",
    "shuffle",
    "shuffle_buffer_size",
    "seed",
    "deterministic",
    "repeat",
    "drop_remainder",
)


def build_dataset_from_config(
    config: Any,
    training: bool,
    batch_size: int | None = None,
    input_context: tf.distribute.InputContext | None = None,
    return_info: bool = False,
    **overrides,
):
    """``build_dataset`` from a config object or dict.

    The config holds the source fields (see :func:`as_source`), optionally
    ``global_batch_size`` or ``batch_size``, and any of build_dataset's keyword
    arguments by the same names; missing ones keep their defaults.
    ``overrides`` (build_dataset keyword arguments, e.g. ``seed``) win over the
    config.
    """
    get = (
        (lambda k: config.get(k))
        if isinstance(config, Mapping)
        else (lambda k: getattr(config, k, None))
    )
    if batch_size is None:
        batch_size = get("global_batch_size") or get("batch_size")
    if batch_size is None:
        raise ValueError("no batch_size given and none in the config")
    kwargs = {k: get(k) for k in _BUILD_ARGS if get(k) is not None}
    kwargs.update(overrides)
    return build_dataset(
        config,
        training,
        int(batch_size),
        input_context=input_context,
        return_info=return_info,
        **kwargs,
    )


def image_shapes(
    padding_mode: str = "orientation",
    short_side: int = 800,
    max_long_side: int = 1333,
    pad_multiple: int = 32,
) -> Sequence[tuple[int, int]]:
    """Padded image shapes a run will see (empty for "batch")."""
    return transforms.fixed_padded_size(padding_mode, short_side, max_long_side, pad_multiple)
