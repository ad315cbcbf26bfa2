"""COCO -> TFRecords (our converter) -> reader gives the COCO reader's examples."""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.data.category_map import CategoryMap
from fpn_tf.data.coco_reader import load_coco
from fpn_tf.data.convert_coco import convert_coco_to_tfrecords
from fpn_tf.data.errors import DataError
from fpn_tf.data.pipeline import CocoSource, TfRecordSource, build_dataset, load_source
from data_testing import data_config, decoded_examples, pattern, write_image, write_tiny_coco
from fpn_tf.data.tfrecord_reader import TfRecordIndex
import watched

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    write_image(root / "images" / "e.jpg", pattern(26, 34, 9))
    ann, image_dir = write_tiny_coco(
        root,
        extra_images=[{"id": 14, "file_name": "e.jpg", "height": 26, "width": 34}],
        extra_annotations=[
            {
                "id": 105,
                "image_id": 14,
                "bbox": [3.25, 5.5, 30.75, 20.5],
                "category_id": 7,
                "iscrowd": 0,
                "area": 600.0,
            },
            # Unusable: skipped and counted by the converter too.
            {"id": 106, "image_id": 14, "bbox": [3, 5, 0, 5], "category_id": 7},
        ],
    )
    result = convert_coco_to_tfrecords(ann, image_dir, root / "records" / "train", num_shards=3)
    return ann, image_dir, result


def _by_id(ds):
    return {int(e["image_id"]): e for e in ds.as_numpy_iterator()}


def test_converter_writes_shards_and_category_map(converted):
    _, _, result = converted
    assert len(result.shard_files) == 3
    assert all(os.path.exists(f) for f in result.shard_files)
    assert result.shard_files[0].endswith("train-00000-of-00003.tfrecord")
    assert result.category_map_file.endswith("train-category_map.json")
    assert CategoryMap.from_json(result.category_map_file).dataset_ids == (1, 3, 7, 9)
    assert result.num_images == 5 and result.num_annotations == 6
    assert result.skipped_annotations == {"bad_box_size": 1}


def test_both_readers_give_the_same_examples(converted):
    ann, image_dir, result = converted
    coco = load_coco(ann, image_dir)
    coco_ds, coco_map = decoded_examples(coco), coco.category_map
    # The category map is found beside the shards.
    tfr = TfRecordIndex(result.file_pattern)
    tfr_ds, tfr_map = decoded_examples(tfr), tfr.category_map
    assert coco_map == tfr_map
    a, b = _by_id(coco_ds), _by_id(tfr_ds)
    assert sorted(a) == sorted(b) == [10, 11, 12, 13, 14]
    for image_id in a:
        x, y = a[image_id], b[image_id]
        assert x["image"].shape == y["image"].shape
        assert y["image"].dtype == np.uint8
        np.testing.assert_array_equal(x["image"], y["image"])  # PNG: exact
        assert (x["height"], x["width"]) == (y["height"], y["width"])
        # Normalised float32 in the record -> pixels: within 1e-3 px.
        np.testing.assert_allclose(x["gt_boxes"], y["gt_boxes"], atol=1e-3)
        np.testing.assert_array_equal(x["gt_classes"], y["gt_classes"])
        np.testing.assert_array_equal(x["gt_is_crowd"], y["gt_is_crowd"])
    # The box that ends on the right border (x + w == width) survived.
    np.testing.assert_allclose(b[10]["gt_boxes"][1], [10, 20, 24, 32], atol=1e-3)
    np.testing.assert_array_equal(b[10]["gt_is_crowd"], [False, False, True])
    assert b[12]["gt_boxes"].shape == (0, 4)  # the negative image


def test_pipelines_from_both_sources_agree(converted):
    ann, image_dir, result = converted
    cfg = data_config(
        dict(short_side=32, max_long_side=64), global_batch_size=1, max_num_instances=4
    )
    coco = build_dataset(load_source(CocoSource(ann, image_dir)), cfg, training=False)
    tfr = build_dataset(load_source(TfRecordSource(result.file_pattern)), cfg, training=False)

    def collect(ds):
        return {int(f["image_id"][0]): (f, l) for f, l in ds}

    a, b = collect(coco), collect(tfr)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k][0]["images"], b[k][0]["images"])
        np.testing.assert_allclose(a[k][0]["image_info"], b[k][0]["image_info"])
        np.testing.assert_allclose(a[k][1]["gt_boxes"], b[k][1]["gt_boxes"], atol=1e-3)
        np.testing.assert_array_equal(a[k][1]["gt_classes"], b[k][1]["gt_classes"])


def test_unknown_class_in_records_stops_with_message(converted):
    _, _, result = converted
    partial = CategoryMap(
        [{"id": 1, "name": "circle"}, {"id": 3, "name": "square"}, {"id": 9, "name": "ring"}]
    )
    ds = decoded_examples(TfRecordIndex(result.shard_files, category_map=partial))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="category id the category map does not know"
    ):
        for _ in ds:
            pass


def test_converter_error_mode_and_missing_map(converted, tmp_path):
    ann, image_dir, result = converted
    with pytest.raises(DataError, match=r"annotation id 106 \(image id 14\)"):
        convert_coco_to_tfrecords(ann, image_dir, tmp_path / "x", num_shards=1, on_bad_data="error")
    lonely = tmp_path / "lonely-00000-of-00001.tfrecord"
    lonely.write_bytes(open(result.shard_files[0], "rb").read())
    with pytest.raises(DataError, match="no category map found"):
        TfRecordIndex(str(lonely))


@pytest.mark.slow
def test_command_line(converted, tmp_path):
    ann, image_dir, _ = converted
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [
        sys.executable,
        "-m",
        "fpn_tf.data.convert_coco",
        f"--annotation_file={ann}",
        f"--image_dir={image_dir}",
        f"--output_prefix={tmp_path}/cli/val",
        "--num_shards=2",
    ]
    run = watched.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "cli")) == [
        "val-00000-of-00002.tfrecord",
        "val-00001-of-00002.tfrecord",
        "val-category_map.json",
    ]
    assert "skipped 1 annotation(s)" in run.stderr
    assert "Wrote 5 images, 6 annotations" in run.stderr

    bad = cmd[:3] + [f"--annotation_file={tmp_path}/nope.json"] + cmd[4:]
    run = watched.run(bad, cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}/nope.json: annotation file not found"
    )


def test_foreign_records_non_numeric_id_and_empty_box(tmp_path, capfd):
    # A record written by another tool: string source id, a zero-size box.
    from official.vision.data import tfrecord_lib  # pylint: disable=g-import-not-at-top
    import io  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top

    buf = io.BytesIO()
    Image.fromarray(pattern(10, 20)).save(buf, format="PNG")
    feats = tfrecord_lib.image_info_to_feature_dict(10, 20, "x.png", "img-a", buf.getvalue(), "png")
    feats.update(
        {
            "image/object/bbox/xmin": tfrecord_lib.convert_to_feature([0.1, 0.5]),
            "image/object/bbox/xmax": tfrecord_lib.convert_to_feature([0.6, 0.5]),
            "image/object/bbox/ymin": tfrecord_lib.convert_to_feature([0.2, 0.1]),
            "image/object/bbox/ymax": tfrecord_lib.convert_to_feature([0.8, 0.9]),
            "image/object/class/label": tfrecord_lib.convert_to_feature([3, 9]),
        }
    )
    path = str(tmp_path / "foreign.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    cmap = CategoryMap([{"id": 3, "name": "a"}, {"id": 9, "name": "b"}])
    (ex,) = list(decoded_examples(TfRecordIndex(path, category_map=cmap)).as_numpy_iterator())
    assert ex["image_id"] >= 0
    np.testing.assert_allclose(ex["gt_boxes"], [[2, 2, 8, 12]], atol=1e-4)
    np.testing.assert_array_equal(ex["gt_classes"], [1])
    np.testing.assert_array_equal(ex["gt_is_crowd"], [False])
    assert "dropped 1 zero-size box(es)" in capfd.readouterr().err
