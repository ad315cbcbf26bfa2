"""build_dataset: batch layout, orientation grouping, flips, determinism."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.configs.experiment import DataConfig, ResizeConfig
from fpn_tf.data.pipeline import CocoSource, build_dataset, load_source, source_from_config
from data_testing import data_config, write_tiny_coco, write_tiny_coco_with_truncated_png


def small(**fields):
    """Tiny images, so short_side=32 / max_long_side=64 (padded 32x64 / 64x32)."""
    resize = dict(short_side=32, max_long_side=64, pad_multiple=32)
    return data_config(resize, **{"max_num_instances": 4, **fields})


# Resized (h, w) of the tiny images: a 24x32 -> s=4/3 -> 32 x 42.67 -> 32x43;
# b 40x20 -> s=1.6 -> 64x32; c 16x16 -> 32x32; d 20x30 -> s=1.6 -> 32x48.
RESIZED = {10: (32, 43), 11: (64, 32), 12: (32, 32), 13: (32, 48)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ann, image_dir = write_tiny_coco(tmp_path_factory.mktemp("tiny"))
    return load_source(CocoSource(ann, image_dir))


def _unbatch(ds):
    out = {}
    for features, labels in ds:
        for i in range(features["images"].shape[0]):
            out[int(features["image_id"][i])] = (
                {k: v[i].numpy() for k, v in features.items()},
                {k: v[i].numpy() for k, v in labels.items()},
                tuple(features["images"].shape),
            )
    return out


def test_eval_batches_layout_and_values(tiny):
    ds = build_dataset(tiny, small(global_batch_size=2), training=False)
    assert tiny.num_images == 4 and tiny.category_map.num_classes == 4
    spec_f, spec_l = ds.element_spec
    assert spec_f["images"].dtype == tf.float32
    assert spec_f["image_info"].shape.as_list() == [None, 4, 2]
    assert spec_f["image_id"].dtype == tf.int64
    assert spec_l["gt_boxes"].shape.as_list() == [None, 4, 4]
    assert spec_l["gt_classes"].dtype == tf.int32
    assert spec_l["gt_is_crowd"].dtype == tf.bool

    batches = list(ds)
    # 3 landscape images -> a batch of 2 and a partial one; 1 portrait.
    assert sorted(f["images"].shape[0] for f, _ in batches) == [1, 1, 2]
    # The two padded shapes of "orientation" mode.
    assert sorted({tuple(f["images"].shape[1:3]) for f, _ in batches}) == [(32, 64), (64, 32)]
    got = _unbatch(batches)
    assert sorted(got) == [10, 11, 12, 13]  # every image exactly once
    for image_id, (f, l, batch_shape) in got.items():
        h, w = RESIZED[image_id]
        assert batch_shape[1:3] == ((64, 32) if h > w else (32, 64))
        np.testing.assert_allclose(f["image_info"][1], [h, w])
        np.testing.assert_allclose(f["image_info"][3], [0, 0])
        assert np.all(f["images"][h:] == 0) and np.all(f["images"][:, w:] == 0)

    f, l, _ = got[10]
    np.testing.assert_allclose(f["image_info"][0], [24, 32])
    sy, sx = 32 / 24, 43 / 32  # 1.3333, 1.34375
    np.testing.assert_allclose(f["image_info"][2], [sy, sx], rtol=1e-6)
    # COCO [4, 2, 8, 6] = [ymin 2, xmin 4, ymax 8, xmax 12] -> scaled
    np.testing.assert_allclose(
        l["gt_boxes"],
        [
            [2 * sy, 4 * sx, 8 * sy, 12 * sx],
            [10 * sy, 20 * sx, 32, 43],
            [0, 0, 32, 43],
            [0, 0, 0, 0],
        ],
        rtol=1e-5,
    )
    np.testing.assert_array_equal(l["gt_classes"], [2, 4, 1, -1])
    np.testing.assert_array_equal(l["gt_is_crowd"], [False, False, True, False])

    # The image with no annotations: every ground-truth row is padding.
    f, l, _ = got[12]
    np.testing.assert_array_equal(l["gt_classes"], [-1] * 4)
    np.testing.assert_array_equal(l["gt_boxes"], np.zeros((4, 4)))
    np.testing.assert_array_equal(l["gt_is_crowd"], [False] * 4)


def test_training_static_batch_orientation_groups_and_flips(tiny):
    ds = build_dataset(tiny, small(global_batch_size=2), training=True, seed=3)
    spec_f, _ = ds.element_spec
    assert spec_f["images"].shape[0] == 2  # static batch (drop_remainder)
    reference = _unbatch(build_dataset(tiny, small(global_batch_size=1), training=False))
    shapes, num_flipped, num_plain = set(), 0, 0
    for features, labels in ds.take(12):
        shape = tuple(features["images"].shape)
        assert shape in ((2, 32, 64, 3), (2, 64, 32, 3))
        shapes.add(shape)
        for i in range(2):
            image_id = int(features["image_id"][i])
            h, w = RESIZED[image_id]
            img = features["images"][i, :h, :w].numpy()
            ref_f, ref_l, _ = reference[image_id]
            ref_img, ref_boxes = ref_f["images"][:h, :w], ref_l["gt_boxes"]
            if np.allclose(img, ref_img, atol=1e-3):
                num_plain += 1
            else:  # flipped: pixels mirrored, xmin' = w - xmax, xmax' = w - xmin
                np.testing.assert_allclose(img, ref_img[:, ::-1], atol=1e-3)
                ref_boxes = np.stack(
                    [ref_boxes[:, 0], w - ref_boxes[:, 3], ref_boxes[:, 2], w - ref_boxes[:, 1]], -1
                )
                num_flipped += 1
            valid = labels["gt_classes"][i].numpy() > 0
            np.testing.assert_array_equal(labels["gt_classes"][i], ref_l["gt_classes"])
            np.testing.assert_allclose(
                labels["gt_boxes"][i].numpy()[valid], ref_boxes[valid], atol=1e-3
            )
    assert len(shapes) == 2  # both orientations, never mixed in a batch
    assert num_flipped > 0 and num_plain > 0


def _first_batches(ds, n):
    return [
        (f["image_id"].numpy(), f["images"].numpy(), l["gt_boxes"].numpy()) for f, l in ds.take(n)
    ]


def test_seeded_training_is_reproducible(tiny):
    a = _first_batches(build_dataset(tiny, small(global_batch_size=1), training=True, seed=7), 8)
    b = _first_batches(build_dataset(tiny, small(global_batch_size=1), training=True, seed=7), 8)
    c = _first_batches(build_dataset(tiny, small(global_batch_size=1), training=True, seed=8), 8)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    assert any(
        not np.array_equal(x[0], y[0]) or not np.array_equal(x[2], y[2]) for x, y in zip(a, c)
    )


def test_square_and_batch_padding_modes(tiny):
    ds = build_dataset(tiny, small(global_batch_size=4, padding_mode="square"), training=False)
    ((f, _),) = list(ds)
    assert f["images"].shape == (4, 64, 64, 3)
    ds = build_dataset(tiny, small(global_batch_size=4, padding_mode="batch"), training=False)
    ((f, _),) = list(ds)
    # largest resized sides: 64 (b's height) and 48 (d's width) -> ceil32
    assert f["images"].shape == (4, 64, 64, 3)
    ds = build_dataset(tiny, small(global_batch_size=1, padding_mode="batch"), training=False)
    shapes = sorted(tuple(f["images"].shape[1:3]) for f, _ in ds)
    assert shapes == [(32, 32), (32, 64), (32, 64), (64, 32)]


def test_input_context_shards_and_splits_the_batch(tiny):
    ctx = tf.distribute.InputContext(
        num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2
    )
    cfg = small(global_batch_size=4, padding_mode="square")
    ds = build_dataset(tiny, cfg, training=False, input_context=ctx)
    assert [f["images"].shape[0] for f, _ in ds] == [2]  # the per-replica batch size
    ids = sorted(int(i) for f, _ in ds for i in f["image_id"])
    assert ids == [11, 13]  # images 1 and 3 of 0..3


def test_from_config_and_category_map(tiny):
    cfg = DataConfig(
        annotation_file=tiny.annotation_file,
        image_dir=tiny.image_dir,
        global_batch_size=2,
        resize=ResizeConfig(short_side=32, max_long_side=64),
        max_num_instances=3,
        padding_mode="square",
    )
    source = source_from_config(cfg)
    ds = build_dataset(source, cfg, training=False)
    f, l = next(iter(ds))
    assert f["images"].shape == (2, 64, 64, 3) and l["gt_classes"].shape == (2, 3)
    assert source.category_map.dataset_ids == (1, 3, 7, 9)
    # build_dataset takes a loaded source, not a description of one.
    with pytest.raises(TypeError, match="loaded source"):
        build_dataset(CocoSource(tiny.annotation_file, tiny.image_dir), small(), False)
    # The settings are checked as the config's (here assigned past the construction's checks).
    bad = small()
    bad.padding_mode = "tight"
    with pytest.raises(ValueError, match="padding_mode"):
        build_dataset(tiny, bad, training=False)
    bad = small()
    bad.resize.max_long_side = 16
    with pytest.raises(ValueError, match="resize.max_long_side"):
        build_dataset(tiny, bad, training=False)


def test_resize_rounding_from_config(tiny):
    """floor (torchvision): image a 24x32 -> s = float32(4/3) -> 32 x floor(42.67) = 32x42."""
    cfg = DataConfig(
        annotation_file=tiny.annotation_file,
        image_dir=tiny.image_dir,
        global_batch_size=1,
        resize=ResizeConfig(short_side=32, max_long_side=64, rounding="floor"),
        max_num_instances=3,
    )
    got = _unbatch(build_dataset(tiny, cfg, training=False))
    resized = {image_id: tuple(f["image_info"][1]) for image_id, (f, _, _) in got.items()}
    assert resized == {**RESIZED, 10: (32, 42)}
    f = got[10][0]
    assert np.all(f["images"][:, 42:] == 0) and f["images"][:, 41].mean() > 0
    bad = small()
    bad.resize.rounding = "ceil"
    with pytest.raises(ValueError, match="resize.rounding"):
        build_dataset(tiny, bad, training=False)


def test_run_time_drop_is_logged_with_file_and_id_and_counted(tmp_path, caplog):
    ann, image_dir = write_tiny_coco_with_truncated_png(tmp_path)
    source = load_source(CocoSource(ann, image_dir))
    assert 14 in source.image_ids  # the truncated PNG passes the default header check
    ds = build_dataset(source, small(global_batch_size=2), training=True, seed=3)
    seen = []
    with caplog.at_level(logging.WARNING):
        for features, _ in ds.take(6):  # 12 images: two passes over the 5
            seen.extend(int(i) for i in features["image_id"])
    assert 14 not in seen and set(seen) == {10, 11, 12, 13}
    drops = [r.getMessage() for r in caplog.records if "dropped image id 14" in r.getMessage()]
    assert drops and "broken.png" in drops[0] and "[1 dropped so far]" in drops[0]
    assert source.drops.count == len(drops) >= 1
    assert source.drops.images == {"14": os.path.join(image_dir, "broken.png")}
    summary = source.drops.summary()
    assert "1 image(s)" in summary and "14 (" in summary and "broken.png" in summary
