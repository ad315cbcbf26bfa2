"""COCO-format reader: decoding, validation, on_bad_data, crowd, negatives."""

import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.data import coco_reader
from fpn_tf.data.coco_reader import load_coco
from fpn_tf.data.errors import DataError
from fpn_tf.data.pipeline import CocoSource, build_dataset, load_source
from data_testing import pattern, write_coco_json, write_image
from data_testing import data_config, decoded_examples, write_tiny_coco


def _by_id(ds):
    return {int(e["image_id"]): e for e in ds.as_numpy_iterator()}


def test_reads_images_boxes_classes_crowd_and_negatives(tmp_path):
    ann, image_dir = write_tiny_coco(tmp_path)
    index = load_coco(ann, image_dir)
    ds, cmap = decoded_examples(index), index.category_map
    assert cmap.dataset_ids == (1, 3, 7, 9)
    ex = _by_id(ds)
    assert sorted(ex) == [10, 11, 12, 13]

    a = ex[10]
    assert a["image"].dtype == np.uint8 and a["image"].shape == (24, 32, 3)
    np.testing.assert_array_equal(a["image"], pattern(24, 32, 0))
    assert (a["height"], a["width"]) == (24, 32)
    # COCO [x, y, w, h] -> [ymin, xmin, ymax, xmax] pixels.
    np.testing.assert_array_equal(a["gt_boxes"], [[2, 4, 8, 12], [10, 20, 24, 32], [0, 0, 24, 32]])
    # dataset ids 3, 9, 1 -> contiguous 2, 4, 1
    np.testing.assert_array_equal(a["gt_classes"], [2, 4, 1])
    np.testing.assert_array_equal(a["gt_is_crowd"], [False, False, True])
    assert a["gt_boxes"].dtype == np.float32 and a["gt_classes"].dtype == np.int32

    # An image without annotations is kept, with empty ground truth.
    c = ex[12]
    assert c["gt_boxes"].shape == (0, 4) and c["gt_classes"].shape == (0,)


def test_grayscale_and_rgba_png_come_out_rgb(tmp_path):
    ann, image_dir = write_tiny_coco(tmp_path)
    ex = _by_id(decoded_examples(load_coco(ann, image_dir)))
    gray = (np.arange(40 * 20).reshape(40, 20) % 251).astype(np.uint8)
    b = ex[11]["image"]  # grayscale PNG, in a sub-folder
    assert b.shape == (40, 20, 3)
    for ch in range(3):
        np.testing.assert_array_equal(b[..., ch], gray)
    c = ex[12]["image"]  # RGBA PNG: alpha dropped, colours kept
    assert c.shape == (16, 16, 3)
    np.testing.assert_array_equal(c, pattern(16, 16, 2))


def _dataset(tmp_path, images, annotations):
    """Writes 2 valid 20x30 PNGs (ids 1, 2) + the given entries."""
    image_dir = tmp_path / "img"
    for i in (1, 2):
        write_image(image_dir / f"ok{i}.png", pattern(20, 30, i))
    base = [{"id": i, "file_name": f"ok{i}.png", "height": 20, "width": 30} for i in (1, 2)]
    good = [{"id": 1, "image_id": 1, "bbox": [1, 1, 10, 10], "category_id": 1}]
    ann = write_coco_json(tmp_path / "ann.json", base + images, good + annotations)
    return ann, str(image_dir)


BAD_ANNOTATIONS = [
    # (annotation, reason, text in the error message)
    (
        {"id": 501, "image_id": 2, "bbox": [3, 3, 0, 5], "category_id": 1},
        "bad_box_size",
        "zero, negative",
    ),
    (
        {"id": 502, "image_id": 2, "bbox": [3, 3, 5, -2], "category_id": 3},
        "bad_box_size",
        "zero, negative",
    ),
    (
        {"id": 503, "image_id": 2, "bbox": [25, 3, 8, 5], "category_id": 1},
        "box_outside_image",
        "outside the 20x30",
    ),
    (
        {"id": 504, "image_id": 2, "bbox": [-3, 3, 8, 5], "category_id": 1},
        "box_outside_image",
        "outside",
    ),
    (
        {"id": 505, "image_id": 2, "bbox": [3, 3, 5, 5], "category_id": 2},
        "unknown_category",
        "category_id 2 is not in 'categories'",
    ),
    (
        {"id": 506, "image_id": 99, "bbox": [3, 3, 5, 5], "category_id": 1},
        "unknown_image",
        "image_id 99 is not in 'images'",
    ),
]


@pytest.mark.parametrize(
    "ann_entry,reason,text", BAD_ANNOTATIONS, ids=[r[1] + str(r[0]["id"]) for r in BAD_ANNOTATIONS]
)
def test_bad_annotation_error_names_file_and_id(tmp_path, ann_entry, reason, text):
    del reason
    ann, image_dir = _dataset(tmp_path, [], [ann_entry])
    with pytest.raises(DataError) as e:
        load_coco(ann, image_dir, on_bad_data="error")
    msg = str(e.value)
    assert "\n" not in msg
    assert "ann.json" in msg and f"annotation id {ann_entry['id']}" in msg
    assert text in msg


def test_bad_annotations_skipped_counted_and_logged(tmp_path, caplog):
    ann, image_dir = _dataset(tmp_path, [], [a for a, _, _ in BAD_ANNOTATIONS])
    with caplog.at_level(logging.WARNING):
        index = load_coco(ann, image_dir)  # on_bad_data="skip" is the default
    assert index.skipped_annotations == {
        "bad_box_size": 2,
        "box_outside_image": 2,
        "unknown_category": 1,
        "unknown_image": 1,
    }
    assert index.num_images == 2 and index.num_annotations == 1
    text = caplog.text
    assert "skipped 2 annotation(s)" in text and "[bad_box_size]" in text
    assert "annotation 501" in text and "[unknown_image]" in text


def test_slight_overflow_is_clipped_not_skipped(tmp_path):
    # 0.6 px beyond the right/bottom edge and 0.4 px before the left: clipped.
    ann, image_dir = _dataset(
        tmp_path, [], [{"id": 7, "image_id": 2, "bbox": [-0.4, 10, 30.0, 10.6], "category_id": 9}]
    )
    index = load_coco(ann, image_dir, on_bad_data="error")
    assert index.num_clipped_boxes == 1 and not index.skipped_annotations
    ex = index.example(list(index.image_ids).index(2))
    np.testing.assert_allclose(ex["gt_boxes"], [[10, 0, 20, 29.6]], atol=1e-5)


def _write_bad_images(tmp_path):
    image_dir = tmp_path / "img"
    (image_dir).mkdir(parents=True, exist_ok=True)
    (image_dir / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    jpeg = write_image(image_dir / "trunc.jpg", pattern(64, 64, 5))
    data = open(jpeg, "rb").read()
    (image_dir / "trunc.jpg").write_bytes(data[: len(data) // 2])
    write_image(image_dir / "wrong_size.png", pattern(10, 12, 6))
    return [
        {"id": 30, "file_name": "missing.jpg", "height": 20, "width": 30},
        {"id": 31, "file_name": "garbage.jpg", "height": 20, "width": 30},
        {"id": 32, "file_name": "wrong_size.png", "height": 20, "width": 30},
    ], {"id": 33, "file_name": "trunc.jpg", "height": 64, "width": 64}


@pytest.mark.parametrize(
    "image_id,text",
    [
        (30, "missing.jpg does not exist"),
        (31, "garbage.jpg cannot be decoded"),
        (32, "wrong_size.png is 10x12 (h x w) but the JSON says 20x30"),
    ],
)
def test_bad_image_error_names_file(tmp_path, image_id, text):
    bad, _ = _write_bad_images(tmp_path)
    entry = [b for b in bad if b["id"] == image_id]
    ann, image_dir = _dataset(tmp_path, entry, [])
    with pytest.raises(DataError) as e:
        load_coco(ann, image_dir, on_bad_data="error")
    assert f"image id {image_id}" in str(e.value) and text in str(e.value)


def test_bad_images_skipped_and_counted(tmp_path):
    bad, trunc = _write_bad_images(tmp_path)
    anns = [
        {"id": 900 + b["id"], "image_id": b["id"], "bbox": [1, 1, 2, 2], "category_id": 1}
        for b in bad
    ]
    ann, image_dir = _dataset(tmp_path, bad + [trunc], anns)
    index = load_coco(ann, image_dir)
    # "header" verification does not decode, so the truncated JPEG passes ...
    assert index.skipped_images == {
        "missing_image_file": 1,
        "corrupt_image": 1,
        "image_size_mismatch": 1,
    }
    assert index.skipped_annotations == {"of_skipped_images": 3}
    assert sorted(index.image_ids) == [1, 2, 33]
    # ... "full" verification does.
    index = load_coco(ann, image_dir, verify_images="full")
    assert index.skipped_images["corrupt_image"] == 2
    assert sorted(index.image_ids) == [1, 2]


def test_pipeline_guard_drops_undecodable_file(tmp_path, caplog):
    # Without verification the corrupt file reaches tf.data: with "skip" the
    # element is dropped, logged and counted, with "error" the error names it.
    bad, _ = _write_bad_images(tmp_path)
    ann, image_dir = _dataset(tmp_path, [bad[1]], [])
    source = load_source(CocoSource(ann, image_dir, verify_images="none"))
    cfg = data_config(dict(short_side=32, max_long_side=64), global_batch_size=1)
    ds = build_dataset(source, cfg, training=False)
    with caplog.at_level(logging.WARNING):
        ids = sorted(int(f["image_id"][0]) for f, _ in ds)
    assert ids == [1, 2]
    assert "dropped image id 31" in caplog.text and "garbage.jpg" in caplog.text
    assert "not JPEG/PNG/GIF/BMP" in caplog.text  # the reason
    assert source.drops.count == 1 and "garbage.jpg" in source.drops.summary()
    ds = build_dataset(
        load_source(CocoSource(ann, image_dir, on_bad_data="error", verify_images="none")),
        cfg,
        training=False,
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="garbage.jpg"):
        for _ in ds:
            pass


@pytest.mark.parametrize(
    "content,text",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"images": [], "annotations": []}), "required key 'categories' is missing"),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "x.png"}],
                    "annotations": [{"id": 77, "image_id": 1, "category_id": 1}],
                    "categories": [{"id": 1, "name": "a"}],
                }
            ),
            "annotation id 77: required key 'bbox' is missing",
        ),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "x.png"}],
                    "annotations": [{"id": 78, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}],
                    "categories": [{"id": 1, "name": "a"}],
                }
            ),
            "annotation id 78 (image id 1): 'bbox' must be [x, y, width, height]",
        ),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "x.png"}, {"id": 1, "file_name": "y.png"}],
                    "annotations": [],
                    "categories": [{"id": 1, "name": "a"}],
                }
            ),
            "image id 1 is listed more than once",
        ),
    ],
)
def test_malformed_json_always_raises(tmp_path, content, text):
    path = tmp_path / "broken.json"
    path.write_text(content)
    write_image(tmp_path / "x.png", pattern(4, 4))
    with pytest.raises(DataError) as e:
        load_coco(path, tmp_path, on_bad_data="skip")
    assert "broken.json" in str(e.value) and text in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_height_width_read_from_file(tmp_path):
    write_image(tmp_path / "img" / "p.jpg", pattern(18, 26))
    ann = write_coco_json(
        tmp_path / "a.json",
        [{"id": 5, "file_name": "p.jpg"}],
        [{"id": 1, "image_id": 5, "bbox": [0, 0, 26, 18], "category_id": 3}],
    )
    index = load_coco(ann, tmp_path / "img", verify_images="none")
    assert (index.heights[0], index.widths[0]) == (18, 26)
    assert index.skipped_annotations == {}


def test_invalid_arguments(tmp_path):
    ann, image_dir = write_tiny_coco(tmp_path)
    with pytest.raises(ValueError, match="on_bad_data"):
        load_coco(ann, image_dir, on_bad_data="ignore")
    with pytest.raises(ValueError, match="verify_images"):
        load_coco(ann, image_dir, verify_images="some")
    with pytest.raises(DataError, match="annotation file not found"):
        load_coco(os.path.join(tmp_path, "nope.json"), image_dir)
    assert coco_reader.BOX_TOLERANCE_PX == 1.0


def test_empty_data_set_is_a_clear_error(tmp_path):
    ann = tmp_path / "empty.json"
    ann.write_text(
        json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]})
    )
    with pytest.raises(DataError, match=r"empty\.json: the data set is empty"):
        load_coco(str(ann), str(tmp_path))
