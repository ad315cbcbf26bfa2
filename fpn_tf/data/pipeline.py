"""The input pipeline: a source -> batches of (features, labels).

    source = load_source(CocoSource("annotations/instances_train2017.json", "train2017"))
    ds = build_dataset(source, DataConfig(...), training=True, seed=0)
    features, labels = next(iter(ds))

A source is loaded (validated, indexed) once per split; ``source.drops`` counts the images its
datasets drop at run time. Each batch:

* ``features``: ``images`` float32 [B, Hp, Wp, 3] RGB 0..255 zero padded at the bottom/right;
  ``image_info`` float32 [B, 4, 2] rows ``[original (h, w), resized (h, w), scale (y, x),
  offset (y, x) = 0]``; ``image_id`` int64 [B];
* ``labels``: ``gt_boxes`` float32 [B, N, 4] yxyx pixels of the resized image, ``gt_classes``
  int32 [B, N] 1..C (-1 padding), ``gt_is_crowd`` bool [B, N]; with masks ``gt_masks`` float32
  [B, N, S, S], each object's mask over its box.

The settings are a ``DataConfig``'s. ``padding_mode``: "orientation" pads to one of two shapes
by orientation and batches each apart (a jit-compiled step compiles twice, less padding than
"square", one shape for TPUs); "batch" pads each batch to its largest image. Each image's flip
comes from a stateless RNG seeded by (seed, element number), so a seeded run is reproducible
whatever the parallelism. With
``on_bad_data="skip"`` an element that fails to decode or transform is dropped, logged and
counted; with ``"error"`` it stops the iteration.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Union

from absl import logging
import numpy as np
import tensorflow as tf

from fpn_tf.configs.experiment import DataConfig
from fpn_tf.data import transforms
from fpn_tf.data.coco_reader import CocoIndex, load_coco
from fpn_tf.data.tfrecord_reader import TfRecordIndex

__all__ = [
    "CocoSource",
    "Source",
    "TfRecordSource",
    "build_dataset",
    "load_source",
    "source_from_config",
]


@dataclasses.dataclass(frozen=True)
class CocoSource:
    """A COCO-format dataset: annotation JSON + image folder."""

    annotation_file: str
    image_dir: str
    on_bad_data: str = "skip"
    verify_images: str = "header"
    include_masks: bool = False  # also check and keep the segmentations at load time


@dataclasses.dataclass(frozen=True)
class TfRecordSource:
    """TFRecord shards in Model Garden's schema (see tfrecord_reader)."""

    file_pattern: str
    category_map: str | None = None  # path; None: the JSON beside the shards
    on_bad_data: str = "skip"
    annotation_file: str | None = None  # the evaluation's ground truth; None: from the shards


# A loaded source: what build_dataset reads.
Source = Union[CocoIndex, TfRecordIndex]


def load_source(spec: CocoSource | TfRecordSource) -> Source:
    """Loads (validates, indexes) a source once; build every dataset of the split from it."""
    if isinstance(spec, CocoSource):
        return load_coco(
            spec.annotation_file,
            spec.image_dir,
            on_bad_data=spec.on_bad_data,
            verify_images=spec.verify_images,
            include_masks=spec.include_masks,
        )
    if isinstance(spec, TfRecordSource):
        return TfRecordIndex(
            spec.file_pattern,
            spec.category_map,
            on_bad_data=spec.on_bad_data,
            annotation_file=spec.annotation_file,
        )
    raise TypeError(f"load_source takes a CocoSource or TfRecordSource, got {type(spec).__name__}")


def source_from_config(data_cfg) -> Source:
    """Loads the source a ``DataConfig`` names ("coco" and "synthetic" read as COCO)."""
    if data_cfg.source == "tfrecord":
        spec = TfRecordSource(
            file_pattern=data_cfg.file_pattern,
            category_map=data_cfg.category_map,
            on_bad_data=data_cfg.on_bad_data,
            annotation_file=data_cfg.annotation_file,
        )
    else:
        spec = CocoSource(
            annotation_file=os.fspath(data_cfg.annotation_file),
            image_dir=os.fspath(data_cfg.image_dir),
            on_bad_data=data_cfg.on_bad_data,
            verify_images=data_cfg.verify_images,
        )
    return load_source(spec)


def build_dataset(
    source: Source,
    data_config: DataConfig,
    training: bool,
    *,
    input_context: tf.distribute.InputContext | None = None,
    seed: int | None = None,
    include_masks: bool = False,
    num_parallel_calls: int = tf.data.AUTOTUNE,
):
    """Builds the training or evaluation input pipeline of ``data_config``'s settings (resize,
    padding_mode, max_num_instances, random_flip, shuffle_buffer_size, mask_crop_size,
    global_batch_size), checked as the config's are.

    Args:
      source: a loaded source (:func:`load_source`, :func:`source_from_config`).
      training: training (shuffle, flip, repeat, drop remainder) or evaluation
        (no shuffle, no flip, one pass, partial batches kept; every image
        exactly once, in file order within each orientation group).
      input_context: shards the input across pipelines, each yielding
        ``input_context.get_per_replica_batch_size(global_batch_size)`` images.
      seed: seeds the shuffle and the flips (None draws one, logged); with a seed the maps keep
        the element order.
      include_masks: also give ``labels["gt_masks"]`` of S = ``mask_crop_size``.
    """
    cfg = data_config.validate_section()
    max_num_instances, batch_size = cfg.max_num_instances, cfg.global_batch_size
    shuffle = repeat = drop_remainder = training
    flip = training and cfg.random_flip
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

    if not isinstance(source, (CocoIndex, TfRecordIndex)):
        raise TypeError(
            "build_dataset takes a loaded source (load_source(CocoSource(...)) or "
            f"source_from_config(data_config)), got {type(source).__name__}"
        )
    index = source
    if include_masks and isinstance(index, CocoIndex):
        index = index.with_masks()
    if isinstance(index, CocoIndex):
        items = index.item_dataset()
        if num_pipelines > 1:
            items = items.shard(num_pipelines, pipeline_id)
        buffer = cfg.shuffle_buffer_size or max(index.num_images, 1)
        too_many = int(np.sum(index.num_instances_per_image > max_num_instances))
        if too_many:
            msg = "%s: %d image(s) have more than max_num_instances=%d annotations; using %d"
            logging.warning(
                msg, index.annotation_file, too_many, max_num_instances, max_num_instances
            )
    else:
        items = index.item_dataset(
            shuffle_files=shuffle,
            seed=seed,
            num_shards=num_pipelines,
            shard_index=pipeline_id,
            deterministic=deterministic,
        )
        buffer = cfg.shuffle_buffer_size or 1000
    if shuffle:
        items = items.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        items = items.repeat()
    items = items.enumerate()

    # A distinct flip stream per input pipeline.
    flip_seed = (int(seed) * 1_000_003 + pipeline_id) % (2**62) if flip else None
    decode = functools.partial(index.decode, include_masks=True) if include_masks else index.decode
    transform_args = dict(
        padding_mode=cfg.padding_mode,
        max_num_instances=max_num_instances,
        mask_crop_size=cfg.mask_crop_size if include_masks else None,
    )

    def element(number, item):
        example = decode(item)
        do_flip = False
        if flip_seed is not None:
            rng_seed = tf.stack([tf.constant(flip_seed, tf.int64), number])
            do_flip = tf.random.stateless_uniform([], seed=rng_seed) < 0.5
        return transforms.preprocess_example(example, cfg.resize, flip=do_flip, **transform_args)

    if index.on_bad_data == "skip":
        ds = _map_dropping_failures(items, element, index, num_parallel_calls, deterministic)
    else:
        ds = items.map(element, num_parallel_calls=num_parallel_calls, deterministic=deterministic)

    if cfg.padding_mode == "orientation":

        def key(features, labels):
            del labels
            resized = features["image_info"][1]
            return tf.cast(resized[0] > resized[1], tf.int64)  # 1: portrait

        def batch(_, window):
            return window.batch(per_replica_batch, drop_remainder=drop_remainder)

        ds = ds.group_by_window(key_func=key, reduce_func=batch, window_size=per_replica_batch)
    elif cfg.padding_mode == "square":
        ds = ds.batch(per_replica_batch, drop_remainder=drop_remainder)
    else:
        ds = ds.padded_batch(per_replica_batch, drop_remainder=drop_remainder)

    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _map_dropping_failures(items, element, source: Source, num_parallel_calls, deterministic):
    """``items.map(element)`` dropping the elements that fail and reporting each to the source.

    tf.data can only drop a failed element (``ignore_errors``), so each is computed in a
    one-element dataset; an empty one is replaced by a placeholder flagged invalid, whose filter
    reports the item to ``source.drops``.
    """
    spec = items.take(1).map(element).element_spec

    def placeholder():
        return tf.nest.map_structure(
            lambda s: tf.zeros([0 if d is None else d for d in s.shape], s.dtype), spec
        )

    def one(number, item):
        computed = (
            tf.data.Dataset.from_tensors((number, item))
            .map(element)
            .ignore_errors()
            .map(lambda *out: (out, True))
        )
        fallback = tf.data.Dataset.from_tensors((placeholder(), False))
        return computed.concatenate(fallback).take(1).map(lambda out, ok: (number, item, out, ok))

    def report(number, item):
        try:  # runs eagerly: the element again, for its error message
            element(number, item)
            reason = "an error that did not repeat"
        except tf.errors.OpError as e:  # without TensorFlow's "{{function_node ..}} [Op:..]"
            message = re.sub(r"\{\{.*?\}\}|\[Op:.*$", "", e.message, flags=re.S)
            reason = " ".join(message.split())[:300] or type(e).__name__
        file, image_id = source.describe(item.numpy())
        source.drops.record(file, image_id, reason)
        return False

    def keep(number, item, out, ok):
        del out
        return tf.cond(
            ok,
            lambda: tf.constant(True),
            lambda: tf.py_function(report, [number, item], tf.bool),
        )

    ds = items.interleave(
        one,
        cycle_length=None if num_parallel_calls == tf.data.AUTOTUNE else num_parallel_calls,
        block_length=1,
        num_parallel_calls=num_parallel_calls,
        deterministic=deterministic,
    )
    return ds.filter(keep).map(lambda number, item, out, ok: out)
