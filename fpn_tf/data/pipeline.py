"""The input pipeline: a source -> batches of (features, labels).

    source = load_source(CocoSource("annotations/instances_train2017.json", "train2017"))
    ds = build_dataset(source, training=True, batch_size=16, seed=0)
    features, labels = next(iter(ds))

A source is loaded (validated, indexed) once and every dataset of that split is built from it;
it also counts the images its datasets drop at run time (``source.drops``).

Each batch (WORKSPACE.md):

* ``features["images"]``: float32 [B, Hp, Wp, 3] RGB 0..255, zero padded at the bottom/right;
* ``features["image_info"]``: float32 [B, 4, 2] rows ``[original (h, w), resized (h, w) before
  padding, scale (y, x), offset (y, x) = 0]``;
* ``features["image_id"]``: int64 [B];
* ``labels["gt_boxes"]``: float32 [B, N, 4] yxyx pixels of the resized image;
  ``labels["gt_classes"]``: int32 [B, N] contiguous 1..C, -1 = padding;
  ``labels["gt_is_crowd"]``: bool [B, N]; N = ``max_num_instances``;
* with ``include_masks=True`` only, ``labels["gt_masks"]``: float32 [B, N, S, S], each object's
  mask over its box (``fpn_tf.ops.mask_ops``; S = ``mask_crop_size``); padding rows are zeros.

Static shapes (``padding_mode``): "orientation" pads each image to one of two sizes by its
orientation (``[ceil32(short_side), ceil32(max_long_side)]`` or its transpose) and batches only
images of one orientation, so a jit-compiled step compiles twice and batches hold fewer padding
pixels than "square" (one shape, e.g. for TPUs); "batch" pads each batch to its largest image
(least padding, many shapes).

Order: items (image indices for COCO, serialized records for TFRecords) are sharded
(``input_context``), shuffled (seeded), repeated (training), numbered, then decoded and
transformed in a parallel map, each image's flip drawn from a stateless RNG seeded by (seed,
element number) so a seeded run is reproducible whatever the parallelism; then batched.

Run-time drops: with ``on_bad_data="skip"`` an element whose decoding or transform fails is
dropped, logged with its file and image id and counted in ``source.drops``; with ``"error"``
the failure stops the iteration.
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

from fpn_tf.data import transforms
from fpn_tf.data.coco_reader import CocoIndex, load_coco
from fpn_tf.data.tfrecord_reader import TfRecordIndex

__all__ = [
    "CocoSource",
    "Source",
    "TfRecordSource",
    "build_dataset",
    "build_dataset_from_config",
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
    """Loads the source a ``DataConfig`` (train_data / eval_data) names.

    ``source`` "coco" and "synthetic" (generated, then read as COCO) read ``annotation_file`` +
    ``image_dir``; "tfrecord" reads ``file_pattern`` (+ ``category_map``; ``annotation_file``,
    when set, is the evaluation's ground truth).
    """
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
    training: bool,
    batch_size: int,
    *,
    short_side: int = 800,
    max_long_side: int = 1333,
    pad_multiple: int = 32,
    padding_mode: str = "orientation",
    max_num_instances: int = 100,
    resize_rounding: str = "round",
    resize_method: str = "bilinear",
    random_flip: bool = True,
    shuffle_buffer_size: int | None = None,
    seed: int | None = None,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    input_context: tf.distribute.InputContext | None = None,
    include_masks: bool = False,
    mask_crop_size: int = 112,
):
    """Builds the training or evaluation input pipeline.

    Args:
      source: a loaded source (:func:`load_source`, :func:`source_from_config`).
      training: training (shuffle, flip, repeat, drop remainder) or evaluation
        (no shuffle, no flip, one pass, partial batches kept; every image
        exactly once, in file order within each orientation group).
      batch_size: the *global* batch size. With ``input_context`` the dataset
        yields ``input_context.get_per_replica_batch_size(batch_size)``.
      short_side: resize the shorter side to this (paper: 800) ...
      max_long_side: ... unless the longer side would exceed this (1333).
      pad_multiple: padded sizes are multiples of this (32 = stride of P5).
      resize_rounding: "round", "floor" (torchvision's) or "half_up" (detectron2's):
        ``transforms.resized_size``.
      resize_method: "bilinear" (``tf.image.resize``) or "pil_bilinear" (detectron2's PIL
        resize, bit-exact): ``transforms.resize_image``.
      padding_mode: "orientation" (default), "square" or "batch" (module doc).
      max_num_instances: N, ground-truth rows per image (more: first N kept,
        with a warning).
      random_flip: random horizontal flip with p=0.5 (training only).
      shuffle_buffer_size: None or 0: every image (COCO: the buffer holds
        image indices, not pixels); 1000 serialized records for TFRecords.
      seed: seeds the shuffle and the flips; None draws one (logged). With a seed the
        parallel maps keep the element order (deterministic), else not (faster).
      num_parallel_calls: of the decoding map (AUTOTUNE).
      input_context: from ``strategy.distribute_datasets_from_function``; shards
        the input across pipelines.
      include_masks: also give ``labels["gt_masks"]`` (module doc); a COCO source without
        masks is given them by ``source.with_masks()`` (read once, then kept).
      mask_crop_size: S of the box-relative masks.

    Returns:
      ``tf.data.Dataset`` of ``(features, labels)``.
    """
    if padding_mode not in transforms.PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {transforms.PADDING_MODES}," f" got {padding_mode!r}"
        )
    if resize_rounding not in transforms.RESIZE_ROUNDINGS:
        raise ValueError(
            f"resize_rounding must be one of {transforms.RESIZE_ROUNDINGS}, "
            f"got {resize_rounding!r}"
        )
    if resize_method not in transforms.RESIZE_METHODS:
        raise ValueError(
            f"resize_method must be one of {transforms.RESIZE_METHODS}, got {resize_method!r}"
        )
    if batch_size < 1 or max_num_instances < 1 or pad_multiple < 1:
        raise ValueError("batch_size, max_num_instances and pad_multiple must be " ">= 1")
    if include_masks and mask_crop_size < 1:
        raise ValueError(f"mask_crop_size must be >= 1, got {mask_crop_size}")
    shuffle = repeat = drop_remainder = training
    flip = training and random_flip
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
    decode = functools.partial(index.decode, include_masks=True) if include_masks else index.decode
    transform_args = dict(
        short_side=short_side,
        max_long_side=max_long_side,
        pad_multiple=pad_multiple,
        padding_mode=padding_mode,
        max_num_instances=max_num_instances,
        resize_rounding=resize_rounding,
        resize_method=resize_method,
    )
    if include_masks:
        transform_args.update(include_masks=True, mask_crop_size=mask_crop_size)

    def element(number, item):
        example = decode(item)
        do_flip = False
        if flip_seed is not None:
            rng_seed = tf.stack([tf.constant(flip_seed, tf.int64), number])
            do_flip = tf.random.stateless_uniform([], seed=rng_seed) < 0.5
        return transforms.preprocess_example(example, flip=do_flip, **transform_args)

    if index.on_bad_data == "skip":
        ds = _map_dropping_failures(items, element, index, num_parallel_calls, deterministic)
    else:
        ds = items.map(element, num_parallel_calls=num_parallel_calls, deterministic=deterministic)

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
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _map_dropping_failures(items, element, source: Source, num_parallel_calls, deterministic):
    """``items.map(element)`` that drops the elements that fail, reporting each to the source.

    tf.data cannot catch an op's error inside a map function, only drop the element
    (``ignore_errors``). So each element is computed in a one-element dataset; when that comes
    out empty, a zero placeholder flagged invalid takes its place, and the filter that removes it
    reports the item (Python, only for failures) to ``source.drops``.
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


# Keyword arguments of build_dataset that a DataConfig carries.
_BUILD_ARGS = (
    "short_side",
    "max_long_side",
    "pad_multiple",
    "resize_rounding",
    "resize_method",
    "padding_mode",
    "max_num_instances",
    "random_flip",
    "shuffle_buffer_size",
    "mask_crop_size",
)


def build_dataset_from_config(
    source: Source,
    data_cfg,
    training: bool,
    input_context: tf.distribute.InputContext | None = None,
    **overrides,
):
    """``build_dataset`` of a loaded ``source`` with a ``DataConfig``'s settings.

    The batch size is the config's ``global_batch_size``; the flip is ``random_flip`` and
    ``training``; ``overrides`` (build_dataset keyword arguments, e.g. ``seed``,
    ``include_masks=True`` for a model with a mask head) win.
    """
    kwargs = {k: getattr(data_cfg, k) for k in _BUILD_ARGS}
    kwargs["random_flip"] = bool(data_cfg.random_flip and training)
    kwargs.update(overrides)
    return build_dataset(
        source,
        training,
        int(data_cfg.global_batch_size),
        input_context=input_context,
        **kwargs,
    )
