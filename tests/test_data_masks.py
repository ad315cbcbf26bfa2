"""Instance masks through the data path: COCO segmentations (polygons, RLE, crowd), bad masks,
box-relative gt_masks through resize / flip / pad, TFRecords, the synthetic generator."""

import hashlib
import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from fpn_tf.configs.experiment import DataConfig, ResizeConfig
from fpn_tf.data import synthetic, transforms
from fpn_tf.data.coco_reader import load_coco
from fpn_tf.data.convert_coco import convert_coco_to_tfrecords
from fpn_tf.data.errors import DataError
from fpn_tf.data.pipeline import CocoSource, build_dataset, load_source
from data_testing import (
    data_config,
    decoded_examples,
    pattern,
    write_coco_json,
    write_image,
    write_tiny_coco,
    write_truncated_png,
)
from fpn_tf.data.tfrecord_reader import TfRecordIndex
from fpn_tf.ops import mask_ops

H, W = 40, 60  # image 1
BH, BW = 48, 64  # image 2: one large object


def _uncompressed(mask):
    """COCO's uncompressed RLE of a [h, w] 0/1 mask (column-major runs, starting with 0s)."""
    flat = np.asarray(mask, np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": [int(r) for r in runs]}


def _compressed(mask):
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


def _bbox(segmentation, h, w):
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, h, w)
    else:
        rle = segmentation
    return [float(v) for v in mask_utils.toBbox(rle)]


def _ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)


def _ring_rect():
    m = np.zeros((H, W), np.uint8)
    m[3:20, 35:58] = 1
    m[8:14, 40:50] = 0  # a hole
    return m


def _mask_annotations():
    """Image 1 (40 x 60): one annotation in each COCO form; image 2: one large ellipse."""
    two_part_polygon = [[5, 5, 30, 8, 12, 30], [20.5, 30, 32, 30, 32, 38.5, 20.5, 38.5]]
    anns = [
        (101, 1, two_part_polygon, 0, 1),
        (102, 1, _uncompressed(_ring_rect()), 0, 3),
        (103, 1, _compressed(_ellipse(H, W, 28, 45, 9, 12)), 0, 7),
        (104, 1, _uncompressed(_ellipse(H, W, 20, 30, 19, 29)), 1, 9),  # crowd: COCO's form
        (105, 1, _compressed(_ellipse(H, W, 10, 15, 6, 6)), 1, 1),  # crowd, compressed
        (201, 2, _compressed(_ellipse(BH, BW, 26, 30, 17, 24)), 0, 3),
    ]
    out = []
    for aid, iid, segm, crowd, cat in anns:
        h, w = (H, W) if iid == 1 else (BH, BW)
        out.append(
            {
                "id": aid,
                "image_id": iid,
                "category_id": cat,
                "iscrowd": crowd,
                "segmentation": segm,
                "bbox": _bbox(segm, h, w),
                "area": 1.0,
            }
        )
    return out


def _write_mask_coco(root, extra_images=(), extra_annotations=()):
    root = str(root)
    image_dir = os.path.join(root, "images")
    write_image(os.path.join(image_dir, "one.png"), pattern(H, W, 1))
    write_image(os.path.join(image_dir, "two.png"), pattern(BH, BW, 2))
    images = [
        {"id": 1, "file_name": "one.png", "height": H, "width": W},
        {"id": 2, "file_name": "two.png", "height": BH, "width": BW},
    ] + list(extra_images)
    ann = write_coco_json(
        os.path.join(root, "ann.json"), images, _mask_annotations() + list(extra_annotations)
    )
    return ann, image_dir


@pytest.fixture(scope="module")
def masks_coco(tmp_path_factory):
    return _write_mask_coco(tmp_path_factory.mktemp("masks"))


def _by_id(ds):
    return {int(e["image_id"]): e for e in ds.as_numpy_iterator()}


def _masked_examples(index):
    return index.item_dataset().map(lambda i: index.decode(i, include_masks=True))


def test_decoded_masks_equal_ann_to_mask_for_every_form(masks_coco):
    ann, image_dir = masks_coco
    index = load_coco(ann, image_dir, on_bad_data="error", include_masks=True)
    coco = COCO(ann)
    ex = _by_id(_masked_examples(index))
    for image_id, ids in ((1, [101, 102, 103, 104, 105]), (2, [201])):
        got = ex[image_id]["gt_masks"]
        assert got.dtype == np.uint8 and got.shape[0] == len(ids)
        want = np.stack([coco.annToMask(coco.anns[a]) for a in ids])
        np.testing.assert_array_equal(got, want)
        assert got.sum() > 0
    np.testing.assert_array_equal(ex[1]["gt_is_crowd"], [False, False, False, True, True])
    # The forms' own pixels: the RLE ones are the masks they were made of.
    np.testing.assert_array_equal(ex[1]["gt_masks"][1], _ring_rect())
    np.testing.assert_array_equal(ex[1]["gt_masks"][2], _ellipse(H, W, 28, 45, 9, 12))
    np.testing.assert_array_equal(ex[1]["gt_masks"][3], _ellipse(H, W, 20, 30, 19, 29))


def test_a_source_loaded_without_masks_gets_them_once_when_asked(masks_coco):
    ann, image_dir = masks_coco
    source = load_source(CocoSource(ann, image_dir))
    assert not source.has_masks and "_with_masks" not in source.__dict__
    masked = source.with_masks()
    assert masked is source.with_masks() and masked.drops is source.drops
    direct = load_coco(ann, image_dir, include_masks=True)
    assert list(masked.mask_rles) == list(direct.mask_rles)
    np.testing.assert_array_equal(masked.gt_boxes, direct.gt_boxes)


def _unbatched(ds):
    out = []
    for f, l in ds:
        for b in range(f["image_id"].shape[0]):
            out.append(
                ({k: v[b].numpy() for k, v in f.items()}, {k: v[b].numpy() for k, v in l.items()})
            )
    return out


def _resize_nearest(mask, hw):
    """Nearest resize by pixel centres (i -> floor((i + 0.5) * h / H))."""
    h, w = mask.shape
    rows = np.minimum(((np.arange(hw[0]) + 0.5) * h / hw[0]).astype(int), h - 1)
    cols = np.minimum(((np.arange(hw[1]) + 0.5) * w / hw[1]).astype(int), w - 1)
    return mask[rows][:, cols]


def _tight_box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float32)


def test_gt_masks_paste_back_onto_the_resized_flipped_image(masks_coco):
    ann, image_dir = masks_coco
    source = load_source(CocoSource(ann, image_dir))
    coco = COCO(ann)
    original = {iid: [coco.annToMask(a) for a in coco.imgToAnns[iid]] for iid in (1, 2)}
    first_box = {iid: coco.imgToAnns[iid][0]["bbox"] for iid in (1, 2)}  # x, y, w, h
    cfg = data_config(
        dict(short_side=96, max_long_side=144),
        global_batch_size=1,
        padding_mode="square",
        max_num_instances=3,
        mask_crop_size=56,
    )
    ds = build_dataset(source, cfg, training=True, seed=0, include_masks=True)
    seen = set()
    for features, labels in _unbatched(ds.take(10)):
        iid = int(features["image_id"])
        rh, rw = (int(v) for v in features["image_info"][1])
        masks, boxes, classes = labels["gt_masks"], labels["gt_boxes"], labels["gt_classes"]
        assert masks.shape == (3, 56, 56) and masks.dtype == np.float32
        n = min(len(original[iid]), 3)
        assert np.all(classes[:n] > 0) and np.all(classes[n:] == -1)
        assert np.all(masks[n:] == 0)  # padding rows
        pasted = mask_ops.paste_masks(masks[:n], boxes[:n], (rh, rw)).numpy() >= 0.5
        x, _, w, _ = first_box[iid]
        sx, width = rw / {1: W, 2: BW}[iid], {1: W, 2: BW}[iid]
        flipped = abs(boxes[0][1] - (width - x - w) * sx) < abs(boxes[0][1] - x * sx)
        seen.add((iid, flipped))
        for k in range(n):  # rows beyond max_num_instances are dropped with their boxes
            want = _resize_nearest(original[iid][k], (rh, rw))
            if flipped:
                want = want[:, ::-1]
            np.testing.assert_allclose(_tight_box(pasted[k]), boxes[k], atol=1.0)
            if want.sum() > 1500:  # reasonably large objects
                assert _iou(pasted[k], want) > 0.95, (iid, k, flipped)
    assert {(1, False), (1, True), (2, False), (2, True)} <= seen


def _iou(a, b):
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def test_flip_of_the_crop_is_the_crop_of_the_flipped_image_exactly():
    mask = _ellipse(30, 50, 12, 20, 9, 14) | _ellipse(30, 50, 20, 33, 6, 8)
    mask[5:9, 28:40] = 1
    box = np.array([[2.5, 5.0, 27.25, 42.0]], np.float32)
    image = tf.zeros([30, 50, 3], tf.uint8)
    _, flipped_box = transforms.horizontal_flip(image, tf.constant(box))
    direct = mask_ops.crop_masks(mask[None, :, ::-1], flipped_box, 20).numpy()
    for flip in (True, tf.constant(True)):
        ours = transforms.crop_instance_masks(mask[None], box, flip, 20, 2).numpy()
        np.testing.assert_allclose(ours[0], direct[0], atol=1e-5)
        assert np.all(ours[1] == 0) and np.abs(ours[0] - ours[0][:, ::-1]).max() > 0.5
    plain = transforms.crop_instance_masks(mask[None], box, False, 20, 1).numpy()
    np.testing.assert_allclose(plain[0], mask_ops.crop_masks(mask[None], box, 20)[0], atol=0)


def test_from_config_mask_crop_size_and_the_drop_placeholder(tmp_path, caplog):
    extra = [{"id": 3, "file_name": "broken.png", "height": 36, "width": 28}]
    broken = np.zeros((36, 28), np.uint8)
    broken[4:30, 3:20] = 1
    extra_ann = [
        {
            "id": 301,
            "image_id": 3,
            "category_id": 3,
            "iscrowd": 0,
            "bbox": [3, 4, 17, 26],
            "segmentation": _compressed(broken),
        }
    ]
    ann, image_dir = _write_mask_coco(tmp_path, extra, extra_ann)
    write_truncated_png(os.path.join(image_dir, "broken.png"), pattern(36, 28, 4))
    cfg = DataConfig(
        annotation_file=ann,
        image_dir=image_dir,
        global_batch_size=2,
        resize=ResizeConfig(short_side=48, max_long_side=64),
        max_num_instances=4,
        padding_mode="square",
        mask_crop_size=16,
    )
    source = load_source(CocoSource(ann, image_dir))
    ds = build_dataset(source, cfg, training=True, seed=1, include_masks=True)
    with caplog.at_level(logging.WARNING):
        batches = list(ds.take(4))
    ids = {int(i) for f, _ in batches for i in f["image_id"]}
    assert ids == {1, 2} and source.drops.count >= 1 and "dropped image id 3" in caplog.text
    for _, labels in batches:
        assert labels["gt_masks"].shape == (2, 4, 16, 16)
        valid = labels["gt_classes"].numpy() > 0
        assert np.all(labels["gt_masks"].numpy()[~valid] == 0)
        assert np.all(labels["gt_masks"].numpy()[valid].max(axis=(1, 2)) > 0.99)
    # Without include_masks: today's labels.
    plain = build_dataset(source, cfg, training=False)
    assert set(next(iter(plain))[1]) == {"gt_boxes", "gt_classes", "gt_is_crowd"}


def test_tfrecord_round_trip_keeps_the_masks(masks_coco, tmp_path):
    ann, image_dir = masks_coco
    result = convert_coco_to_tfrecords(
        ann, image_dir, tmp_path / "rec" / "train", num_shards=2, include_masks=True
    )
    assert result.num_annotations == 6
    coco_index = load_coco(ann, image_dir, include_masks=True)
    tfr = TfRecordIndex(result.file_pattern)
    a, b = _by_id(_masked_examples(coco_index)), _by_id(_masked_examples(tfr))
    assert sorted(a) == sorted(b) == [1, 2]
    for iid in a:
        assert b[iid]["gt_masks"].dtype == np.uint8
        np.testing.assert_array_equal(a[iid]["gt_masks"], b[iid]["gt_masks"])  # PNG: exact
    # Through the pipeline: the crops agree (boxes agree to 1e-3 px).
    cfg = data_config(
        dict(short_side=48, max_long_side=80), global_batch_size=1, max_num_instances=6
    )
    x = {
        int(f["image_id"]): l
        for f, l in _unbatched(build_dataset(coco_index, cfg, False, include_masks=True))
    }
    y = {
        int(f["image_id"]): l
        for f, l in _unbatched(build_dataset(tfr, cfg, False, include_masks=True))
    }
    for iid in x:
        np.testing.assert_allclose(x[iid]["gt_masks"], y[iid]["gt_masks"], atol=5e-3)
        assert x[iid]["gt_masks"].max() == 1.0
    # The shards' ground truth carries the masks as compressed RLE (str counts).
    gt = tfr.groundtruth()
    coco = COCO(ann)
    by_image = {}
    for g in gt["annotations"]:
        assert isinstance(g["segmentation"]["counts"], str)
        by_image.setdefault(g["image_id"], []).append(mask_utils.decode(g["segmentation"]))
    for iid, masks in by_image.items():
        want = [coco.annToMask(o) for o in coco.imgToAnns[iid]]
        np.testing.assert_array_equal(np.stack(masks), np.stack(want))
    # Shards without masks: the mask decoder stops, naming the image.
    plain = convert_coco_to_tfrecords(ann, image_dir, tmp_path / "plain" / "p", num_shards=1)
    plain_index = TfRecordIndex(plain.file_pattern)
    assert "segmentation" not in plain_index.groundtruth()["annotations"][0]
    with pytest.raises(tf.errors.InvalidArgumentError, match="mask count differs"):
        list(_masked_examples(plain_index))


BAD_MASKS = [
    # (annotation fields, reason, text in the error)
    ({}, "missing_segmentation", "has no 'segmentation'"),
    ({"segmentation": [[10, 10, 20, 10]]}, "bad_polygon", "fewer than 3 points"),
    ({"segmentation": [[10, 10, 20, 10, 20, 20, 5]]}, "bad_polygon", "odd number"),
    ({"segmentation": [[10, 10, "x", 10, 20, 20]]}, "bad_polygon", "not a list of numbers"),
    (
        {"segmentation": _compressed(np.ones((10, 10), np.uint8))},
        "mask_size_mismatch",
        "differs from the image's [20, 30]",
    ),
    ({"segmentation": {"size": [20, 30], "counts": [5, 10]}}, "bad_rle", "summing to 600"),
    ({"segmentation": [[100, 100, 120, 100, 120, 120]]}, "empty_mask", "area 0"),
]


def _bad_mask_dataset(tmp_path, entries):
    image_dir = tmp_path / "img"
    write_image(image_dir / "ok.png", pattern(20, 30, 1))
    good = {
        "id": 1,
        "image_id": 1,
        "bbox": [1, 1, 10, 10],
        "category_id": 1,
        "segmentation": [[1, 1, 11, 1, 11, 11, 1, 11]],
    }
    anns = [good] + [
        dict({"id": 500 + k, "image_id": 1, "bbox": [2, 2, 8, 8], "category_id": 1}, **fields)
        for k, fields in enumerate(entries)
    ]
    images = [{"id": 1, "file_name": "ok.png", "height": 20, "width": 30}]
    return write_coco_json(tmp_path / "ann.json", images, anns), str(image_dir)


def test_bad_masks_are_counted_skips_and_logged(tmp_path, caplog):
    ann, image_dir = _bad_mask_dataset(tmp_path, [f for f, _, _ in BAD_MASKS])
    want = {"missing_segmentation": 1, "bad_polygon": 3, "mask_size_mismatch": 1}
    want.update(bad_rle=1, empty_mask=1)
    with caplog.at_level(logging.WARNING):
        index = load_coco(ann, image_dir, include_masks=True)
    assert index.skipped_annotations == want
    assert index.num_annotations == 1 and list(index.annotation_ids) == [1]
    for reason, n in want.items():
        assert f"skipped {n} annotation(s)" in caplog.text and f"[{reason}]" in caplog.text
    assert "annotation 503" in caplog.text  # an example id
    # Without masks the same file loads clean: the checks run only when masks are asked for.
    plain = load_coco(ann, image_dir)
    assert plain.skipped_annotations == {} and plain.num_annotations == 8
    # ... and asking later (build_dataset(include_masks=True)) skips and logs the same.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cfg = data_config(dict(short_side=32, max_long_side=48), global_batch_size=1)
        ds = build_dataset(plain, cfg, False, include_masks=True)
    assert plain.with_masks().skipped_annotations == want
    assert "[empty_mask]" in caplog.text and "[bad_box_size]" not in caplog.text
    _, labels = next(iter(ds))
    assert labels["gt_masks"].shape == (1, 100, 112, 112)
    assert int(tf.reduce_sum(tf.cast(labels["gt_classes"] > 0, tf.int32))) == 1


@pytest.mark.parametrize("fields,reason,text", BAD_MASKS, ids=[r for _, r, _ in BAD_MASKS])
def test_bad_mask_is_a_one_line_error(tmp_path, fields, reason, text):
    ann, image_dir = _bad_mask_dataset(tmp_path, [fields])
    with pytest.raises(DataError) as e:
        load_coco(ann, image_dir, on_bad_data="error", include_masks=True)
    message = str(e.value)
    assert "\n" not in message and ann in message and "annotation id 500" in message
    assert text in message, (reason, message)


def test_synthetic_segmentations_are_the_drawn_shapes(tmp_path):
    paths = synthetic.generate_split(str(tmp_path), "train", 6, seed=5, image_size=(64, 96))
    data = json.load(open(paths["annotation_file"]))
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    assert len(data["annotations"]) == 29  # as before masks (seed 5)
    for a in data["annotations"]:
        segm = a["segmentation"]
        assert isinstance(segm["counts"], str) and segm["size"] == list(sizes[a["image_id"]])
        m = mask_utils.decode(segm)
        assert int(mask_utils.area(segm)) == int(m.sum()) == a["area"]
        x, y, w, h = a["bbox"]
        np.testing.assert_array_equal(_tight_box(m), [y, x, y + h, x + w])
    index = load_coco(paths["annotation_file"], paths["image_dir"], "error", include_masks=True)
    assert index.num_annotations == 29 and not index.skipped_annotations
    # Images and boxes are those of the generator before masks (recorded from its commit).
    rng = np.random.default_rng(123)
    before = [
        ("ff39afaf7932a1d2cd40a135d15e866e", [[27, 12, 13, 10], [38, 2, 23, 21]], [70, 483]),
        ("f62c22d8854df6347b3471a10ffcec50", [[36, 6, 21, 18], [18, 24, 18, 17]], [196, 306]),
        ("f9c055e0ff23786bf83ec6c9f7da2968", [[52, 8, 7, 10], [0, 2, 15, 22]], [40, 176]),
    ]
    for digest, boxes, areas in before:
        pixels, objects = synthetic.render_image(rng, 48, 64, 4, 8, 30)
        assert hashlib.md5(pixels.tobytes()).hexdigest() == digest
        assert [o["bbox"] for o in objects[:2]] == boxes
        assert [o["area"] for o in objects[:2]] == areas
        # The last object is on top: its mask's pixels are its one fill colour, and that colour
        # is (almost) nowhere else in its box.
        top = mask_utils.decode(objects[-1]["segmentation"]).astype(bool)
        colours = np.unique(pixels[top], axis=0)
        assert len(colours) == 1
        x, y, w, h = (int(v) for v in objects[-1]["bbox"])
        same = np.all(pixels == colours[0], axis=-1)
        assert same[y : y + h, x : x + w][~top[y : y + h, x : x + w]].sum() <= 2
    assert rng.integers(1 << 30) == 48383270  # the same RNG stream


def test_a_source_without_segmentations_gives_todays_labels(tmp_path):
    ann, image_dir = write_tiny_coco(tmp_path)
    source = load_source(CocoSource(ann, image_dir))
    cfg = data_config(
        dict(short_side=32, max_long_side=64), global_batch_size=4, max_num_instances=3
    )
    ds = build_dataset(source, cfg, False)
    f, l = next(iter(ds))
    assert set(l) == {"gt_boxes", "gt_classes", "gt_is_crowd"}
    assert not source.has_masks and "_with_masks" not in source.__dict__  # nothing read
    got = {int(i): (b, c) for i, b, c in zip(f["image_id"], l["gt_boxes"], l["gt_classes"])}
    # Image 10 (24 x 32 -> 32 x 43, scales 4/3 and 43/32): its three boxes, as without masks.
    np.testing.assert_allclose(
        got[10][0],
        np.array([[2, 4, 8, 12], [10, 20, 24, 32], [0, 0, 24, 32]]) * np.tile([4 / 3, 43 / 32], 2),
        rtol=1e-5,
    )
    np.testing.assert_array_equal(got[10][1], [2, 4, 1])
    # Asking it for masks: no annotation has a segmentation -> one line: it is a box data set.
    with pytest.raises(DataError, match="none of its 5 annotations has a 'segmentation'"):
        source.with_masks()
    ex = _by_id(decoded_examples(source))
    assert set(ex[10]) == {"image", "image_id", "height", "width"} | {
        "gt_boxes",
        "gt_classes",
        "gt_is_crowd",
    }
