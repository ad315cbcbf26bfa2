"""COCO box AP and proposal recall on a small hand-made COCO set with non-contiguous category ids."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fpn_tf.evaluation import (
    COCO_METRIC_NAMES,
    COCOEvaluator,
    ProposalRecallEvaluator,
    load_coco_groundtruth,
    yxyx_to_xywh,
)

CATEGORY_IDS = [1, 5, 90]  # non-contiguous, like COCO's
NAMES = {1: "person", 5: "airplane", 90: "toothbrush"}


def _make_dataset(num_images=12, seed=0):
    """Images 640x480 with 1-6 boxes each of small, medium and large sizes, plus one crowd region."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(101, 101 + num_images):  # ids that are not 0..N-1 either
        images.append({"id": image_id, "height": 480, "width": 640, "file_name": f"{image_id}.jpg"})
        for _ in range(rng.integers(1, 7)):
            side = float(rng.choice([20.0, 60.0, 150.0]))
            w, h = side * rng.uniform(0.7, 1.3), side * rng.uniform(0.7, 1.3)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice(CATEGORY_IDS)),
                    "bbox": [x, y, w, h],
                    "area": w * h * 0.8,  # like a mask area: smaller than the box
                    "iscrowd": 0,
                }
            )
    annotations.append(
        {
            "id": len(annotations) + 1,
            "image_id": 101,
            "category_id": 1,
            "bbox": [0, 0, 300, 200],
            "area": 60000.0,
            "iscrowd": 1,
        }
    )
    categories = [{"id": i, "name": NAMES[i]} for i in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}


@pytest.fixture()
def dataset():
    return _make_dataset()


@pytest.fixture()
def annotation_file(tmp_path, dataset):
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(dataset))
    return str(path)


def _per_image(dataset, crowd=False):
    """image_id -> (boxes yxyx, classes, is_crowd, areas)."""
    out = {im["id"]: ([], [], [], []) for im in dataset["images"]}
    for a in dataset["annotations"]:
        if a["iscrowd"] and not crowd:
            continue
        x, y, w, h = a["bbox"]
        boxes, classes, crowds, areas = out[a["image_id"]]
        boxes.append([y, x, y + h, x + w])
        classes.append(a["category_id"])
        crowds.append(bool(a["iscrowd"]))
        areas.append(a["area"])
    return {
        k: tuple(
            np.array(v, np.float64).reshape(-1, 4) if i == 0 else np.array(v)
            for i, v in enumerate(t)
        )
        for k, t in out.items()
    }


def _feed_perfect(evaluator, dataset, class_fn=lambda c: c):
    for image_id, (boxes, classes, _, _) in _per_image(dataset).items():
        evaluator.add_detections(
            image_id, boxes, np.ones(len(boxes)), [class_fn(c) for c in classes]
        )


# ---- box AP ---------------------------------------------------------------------------------


def test_perfect_detections_give_ap_1(annotation_file, dataset, tmp_path):
    evaluator = COCOEvaluator(annotation_file)
    _feed_perfect(evaluator, dataset)
    metrics = evaluator.evaluate()
    assert set(COCO_METRIC_NAMES) <= set(metrics)
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(1.0)
    for name in ("APs", "APm", "APl", "ARmax100"):
        assert metrics[name] == pytest.approx(1.0)


def test_perfect_detections_with_a_loaded_groundtruth(dataset):
    evaluator = COCOEvaluator(load_coco_groundtruth(dataset))
    _feed_perfect(evaluator, dataset)
    metrics = evaluator.evaluate()
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)


def test_wrong_classes_give_ap_near_0(annotation_file, dataset):
    evaluator = COCOEvaluator(annotation_file)
    shift = {1: 5, 5: 90, 90: 1}  # every detection gets another category
    _feed_perfect(evaluator, dataset, class_fn=lambda c: shift[int(c)])
    metrics = evaluator.evaluate()
    assert metrics["AP"] < 0.05 and metrics["AP50"] < 0.05


def test_zero_detections_give_ap_0(annotation_file, dataset, tmp_path):
    evaluator = COCOEvaluator(annotation_file)
    for image in dataset["images"]:
        evaluator.add_detections(image["id"], np.zeros((0, 4)), np.zeros((0,)), np.zeros((0,)))
    metrics = evaluator.evaluate()
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0
    assert evaluator.results() == []
    assert COCOEvaluator(annotation_file).evaluate()["AP"] == 0.0  # nothing fed at all


def test_only_fed_images_are_evaluated(annotation_file, dataset):
    """eval.steps may cover part of the set: images never fed do not count as misses."""
    evaluator = COCOEvaluator(annotation_file)
    per_image = _per_image(dataset)
    for image_id in list(per_image)[:3]:
        boxes, classes, _, _ = per_image[image_id]
        evaluator.add_detections(image_id, boxes, np.ones(len(boxes)), classes)
    assert evaluator.num_images == 3
    assert evaluator.evaluate()["AP"] == pytest.approx(1.0)


def test_results_json_is_coco_results_format(annotation_file, dataset, tmp_path):
    evaluator = COCOEvaluator(annotation_file)
    _feed_perfect(evaluator, dataset)
    (tmp_path / "detections.json").write_text(json.dumps(evaluator.results()))
    results = json.loads((tmp_path / "detections.json").read_text())
    assert isinstance(results, list) and len(results) == sum(
        1 for a in dataset["annotations"] if not a["iscrowd"]
    )
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score"}
        assert isinstance(r["image_id"], int) and isinstance(r["category_id"], int)
        assert len(r["bbox"]) == 4 and r["bbox"][2] > 0 and r["bbox"][3] > 0
    assert {r["category_id"] for r in results} <= set(CATEGORY_IDS)
    first = next(a for a in dataset["annotations"] if not a["iscrowd"])
    match = [
        r
        for r in results
        if r["image_id"] == first["image_id"] and r["category_id"] == first["category_id"]
    ]
    assert any(np.allclose(r["bbox"], first["bbox"], atol=1e-3) for r in match)  # [x, y, w, h]
    # pycocotools itself accepts the file.
    gt = load_coco_groundtruth(annotation_file)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(str(tmp_path / "detections.json"))
    assert len(dt.anns) == len(results)


def test_update_state_batch_ignores_rows_past_num_detections(annotation_file, dataset):
    """Batches of original-pixel boxes; padded rows beyond num_detections ignored."""
    per_image = _per_image(dataset)
    evaluator = COCOEvaluator(annotation_file)
    image_ids = list(per_image)
    for start in range(0, len(image_ids), 4):
        ids = image_ids[start : start + 4]
        n = 10
        boxes = np.zeros((len(ids), n, 4), np.float32)
        scores = np.zeros((len(ids), n), np.float32)
        classes = np.zeros((len(ids), n), np.float32)
        num = np.zeros((len(ids),), np.float32)
        for b, image_id in enumerate(ids):
            gt_boxes, gt_classes, _, _ = per_image[image_id]
            k = len(gt_boxes)
            boxes[b, :k] = gt_boxes
            scores[b, :k] = 0.9
            classes[b, :k] = gt_classes
            scores[b, k:] = 0.5  # padding rows with scores: ignored by num_detections
            num[b] = k
        evaluator.update_state(
            {
                "image_id": np.array(ids, np.int64),
                "detection_boxes": boxes,
                "detection_scores": scores,
                "detection_classes": classes,
                "num_detections": num,
            }
        )
    results = evaluator.results()
    assert {r["category_id"] for r in results} <= set(CATEGORY_IDS)
    assert evaluator.evaluate()["AP"] == pytest.approx(1.0)


def test_update_state_without_num_detections_drops_zero_score_rows(annotation_file, dataset):
    per_image = _per_image(dataset)
    ids = list(per_image)
    m = max(len(v[0]) for v in per_image.values()) + 2  # at least two padding rows each
    boxes = np.zeros((len(ids), m, 4), np.float32)
    scores = np.zeros((len(ids), m), np.float32)
    classes = np.zeros((len(ids), m), np.float32)
    for b, image_id in enumerate(ids):
        gt_boxes, gt_classes, _, _ = per_image[image_id]
        k = len(gt_boxes)
        boxes[b, :k], scores[b, :k], classes[b, :k] = gt_boxes, 1.0, gt_classes
    evaluator = COCOEvaluator(annotation_file)
    evaluator.update_state(
        {
            "image_id": np.array(ids),
            "detection_boxes": boxes,
            "detection_scores": scores,
            "detection_classes": classes,
        }
    )
    assert len(evaluator.results()) == sum(len(v[0]) for v in per_image.values())
    assert evaluator.evaluate()["AP"] == pytest.approx(1.0)


def test_category_and_image_checks(annotation_file):
    evaluator = COCOEvaluator(annotation_file)
    with pytest.raises(ValueError, match="category ids"):
        evaluator.add_detections(101, [[0, 0, 10, 10]], [0.9], [2])  # 2 is not a dataset id
    with pytest.raises(ValueError, match="image_id"):
        evaluator.add_detections(5, [[0, 0, 10, 10]], [0.9], [1])


def test_per_category_metrics(annotation_file, dataset):
    evaluator = COCOEvaluator(annotation_file, per_category_metrics=True)
    _feed_perfect(evaluator, dataset)
    metrics = evaluator.evaluate()
    for name in NAMES.values():
        assert metrics[f"AP/{name}"] == pytest.approx(1.0)


# ---- proposal recall ------------------------------------------------------------------------


def test_perfect_proposals_give_ar_1(annotation_file, dataset, tmp_path):
    evaluator = ProposalRecallEvaluator(annotation_file)
    rng = np.random.default_rng(1)
    for image_id, (boxes, _, _, _) in _per_image(dataset).items():
        noise = rng.uniform(0, 640, (50, 2))
        junk = np.concatenate([noise, noise + 10], axis=1)[:, [1, 0, 3, 2]]
        proposals = np.concatenate([boxes, junk])
        scores = np.concatenate([np.ones(len(boxes)), np.full(len(junk), 0.5)])
        evaluator.add_proposals(image_id, proposals, scores)
    metrics = evaluator.evaluate()
    for name in ("AR@100", "AR@1000", "ARs@1000", "ARm@1000", "ARl@1000", "ARs@100"):
        assert metrics[name] == pytest.approx(1.0), name


def test_far_away_proposals_give_ar_0(annotation_file, dataset):
    evaluator = ProposalRecallEvaluator(annotation_file)
    rng = np.random.default_rng(2)
    for image in dataset["images"]:
        corner = rng.uniform(5000, 6000, (200, 2))  # nowhere near the 640x480 image
        evaluator.add_proposals(image["id"], np.concatenate([corner, corner + 50], axis=1))
    metrics = evaluator.evaluate()
    assert metrics["AR@100"] < 0.01 and metrics["AR@1000"] < 0.01


def test_proposal_recall_counts_limit_and_iou_thresholds():
    """One image, two objects: AR@1 = 1/2; a proposal at IoU 0.72 is recalled at 5 of 10 thresholds."""

    def ann(i, bbox):
        return {"id": i, "image_id": 7, "category_id": 3, "bbox": bbox, "area": 100.0, "iscrowd": 0}

    gt = {
        "images": [{"id": 7, "height": 100, "width": 100}],
        "annotations": [ann(1, [0, 0, 10, 10]), ann(2, [50, 50, 10, 10])],
        "categories": [{"id": 3, "name": "x"}],
    }
    evaluator = ProposalRecallEvaluator(gt, limits=(1, 2))
    evaluator.add_proposals(7, [[0, 0, 10, 10], [50, 50, 60, 57.2]], [0.9, 0.8])  # 2nd: IoU 0.72
    metrics = evaluator.evaluate()
    assert metrics["AR@1"] == pytest.approx(0.5)
    assert metrics["AR@2"] == pytest.approx((1.0 + 0.5) / 2)  # 0.50..0.70 of 0.50..0.95 = 5/10
    assert metrics["ARm@2"] == -1.0  # no medium objects


def test_proposal_update_state_batch(annotation_file, dataset):
    per_image = _per_image(dataset)
    evaluator = ProposalRecallEvaluator(annotation_file)
    ids = list(per_image)
    m = max(len(v[0]) for v in per_image.values())
    boxes = np.zeros((len(ids), m, 4), np.float32)
    classes = -np.ones((len(ids), m), np.int32)
    num = np.zeros(len(ids), np.int32)
    for b, image_id in enumerate(ids):
        gt_boxes, gt_classes, _, _ = per_image[image_id]
        boxes[b, : len(gt_boxes)], classes[b, : len(gt_boxes)], num[b] = (
            gt_boxes,
            gt_classes,
            len(gt_boxes),
        )
    evaluator.update_state(
        {"image_id": np.array(ids), "proposal_boxes": boxes, "num_proposals": num},
    )
    assert evaluator.evaluate()["AR@1000"] == pytest.approx(1.0)


# ---- helpers --------------------------------------------------------------------------------


def test_yxyx_to_xywh():
    np.testing.assert_allclose(yxyx_to_xywh([[1, 2, 11, 22]]), [[2, 1, 20, 10]])


def test_load_coco_groundtruth_accepts_dict_path_and_object(annotation_file, dataset):
    from_path = load_coco_groundtruth(annotation_file)
    assert isinstance(from_path, COCO) and sorted(from_path.getCatIds()) == CATEGORY_IDS
    assert load_coco_groundtruth(from_path) is from_path
    assert len(load_coco_groundtruth(dataset).imgs) == len(dataset["images"])
    assert os.path.exists(annotation_file)


def test_proposal_recall_agrees_with_cocoeval_use_cats_0():
    rng = np.random.default_rng(3)
    dataset = _make_dataset(num_images=15, seed=3)
    gt = load_coco_groundtruth(dataset)
    evaluator = ProposalRecallEvaluator(gt, limits=(10, 100))
    results = []
    for image_id, (boxes, _, _, _) in _per_image(dataset).items():
        jittered = np.repeat(boxes, 10, axis=0) + rng.normal(0, 6, (len(boxes) * 10, 4))
        corner = rng.uniform(0, 500, (60, 2))
        random = np.concatenate([corner, corner + rng.uniform(10, 150, (60, 2))], axis=1)
        proposals = np.concatenate([jittered, random])
        scores = rng.uniform(size=len(proposals))
        evaluator.add_proposals(image_id, proposals, scores)
        for (y0, x0, y1, x1), score in zip(proposals, scores):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(score),
                }
            )
    ours = evaluator.evaluate()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(gt, gt.loadRes(results), "bbox")
        coco_eval.params.useCats = 0
        coco_eval.params.maxDets = [10, 100]
        coco_eval.evaluate()
        coco_eval.accumulate()
    recall = coco_eval.eval["recall"]  # [iou, category, area, max dets]
    for m, limit in enumerate((10, 100)):
        for a, size in enumerate(("", "s", "m", "l")):
            assert ours[f"AR{size}@{limit}"] == pytest.approx(recall[:, 0, a, m].mean(), abs=0.02)


# ---- evaluate_detector: one annotation file, only the images that ran ----------------------


class _PerfectDetector:
    """Returns an image's ground-truth boxes as detections and proposals, found by its original
    (h, w), which is distinct for each image of the set."""

    def __init__(self, annotation_file):
        data = json.loads(open(annotation_file).read())
        sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
        self.table = {size: ([], []) for size in sizes.values()}
        for a in data["annotations"]:
            if not a.get("iscrowd"):
                x, y, w, h = a["bbox"]
                boxes, classes = self.table[sizes[a["image_id"]]]
                boxes.append([y, x, y + h, x + w])
                classes.append(a["category_id"])

    def _lookup(self, image_info):
        n = 8
        info = image_info.numpy()
        boxes = np.zeros((len(info), n, 4), np.float32)
        classes = np.zeros((len(info), n), np.float32)
        num = np.zeros((len(info),), np.int32)
        for b, row in enumerate(info):
            gt_boxes, gt_classes = self.table[(int(row[0, 0]), int(row[0, 1]))]
            k = len(gt_boxes)
            if k:
                boxes[b, :k], classes[b, :k] = gt_boxes, gt_classes
            num[b] = k
        return boxes, (np.arange(n)[None] < num[:, None]).astype(np.float32), classes, num

    def __call__(self, inputs, training=False):
        import tensorflow as tf

        boxes, scores, classes, num = tf.py_function(
            self._lookup, [inputs["image_info"]], [tf.float32, tf.float32, tf.float32, tf.int32]
        )
        return {
            "detection_boxes": boxes,
            "detection_scores": scores,
            "detection_classes": classes,
            "num_detections": num,
            "proposal_boxes": boxes,
            "proposal_scores": scores,
            "num_proposals": num,
        }


def _eval_dataset(source):
    from fpn_tf.data.pipeline import build_dataset
    from data_testing import data_config

    cfg = data_config(
        dict(short_side=32, max_long_side=64), global_batch_size=2, max_num_instances=4
    )
    return build_dataset(source, cfg, training=False)


def test_evaluation_scores_only_the_images_that_ran(tmp_path, caplog):
    """A truncated PNG passes the header check, fails in tf.data: it is reported as skipped and
    its ground truth does not count, so a perfect detector still scores AP 1."""
    import logging

    from fpn_tf.data.pipeline import CocoSource, load_source
    from data_testing import write_tiny_coco_with_truncated_png
    from fpn_tf.evaluation.run import evaluate_detector

    ann, image_dir = write_tiny_coco_with_truncated_png(tmp_path / "data")
    source = load_source(CocoSource(ann, image_dir))
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING):
        metrics = evaluate_detector(
            _PerfectDetector(ann), _eval_dataset(source), source, str(out), step=7
        )
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AR@100"] == pytest.approx(1.0)
    assert metrics["num_images"] == 4 and metrics["num_skipped_images"] == 1
    assert metrics["step"] == 7
    assert "dropped image id 14" in caplog.text and "broken.png" in caplog.text
    skipped = [r.getMessage() for r in caplog.records if "were skipped" in r.getMessage()]
    assert len(skipped) == 1 and "ids 14" in skipped[0] and "1 dropped at run time" in skipped[0]
    # metrics.json and detections.json, written once, by evaluate_detector.
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    detections = json.loads((out / "detections.json").read_text())
    assert {d["image_id"] for d in detections} == {10, 11, 13}  # 12 is a negative
    assert sorted(os.listdir(out)) == ["detections.json", "metrics.json"]


def test_tfrecord_evaluation_writes_its_groundtruth_from_the_shards(tmp_path):
    from fpn_tf.data.convert_coco import convert_coco_to_tfrecords
    from fpn_tf.data.pipeline import TfRecordSource, load_source
    from data_testing import write_tiny_coco
    from fpn_tf.evaluation.run import evaluate_detector

    ann, image_dir = write_tiny_coco(tmp_path / "data")
    result = convert_coco_to_tfrecords(ann, image_dir, tmp_path / "records" / "val", num_shards=2)
    source = load_source(TfRecordSource(result.file_pattern))
    original = json.loads(open(ann).read())
    written = source.groundtruth()
    assert {(i["id"], i["height"], i["width"]) for i in written["images"]} == {
        (i["id"], i["height"], i["width"]) for i in original["images"]
    }
    assert written["categories"] == original["categories"]

    def by_image(anns):
        return sorted(
            (a["image_id"], a["category_id"], a["iscrowd"], round(a["area"], 2))
            + tuple(round(v, 3) for v in a["bbox"])
            for a in anns
        )

    assert by_image(written["annotations"]) == by_image(original["annotations"])
    out = tmp_path / "eval"
    metrics = evaluate_detector(
        _PerfectDetector(ann), _eval_dataset(source), source, str(out), compute_rpn_recall=False
    )
    assert metrics["AP"] == pytest.approx(1.0) and metrics["num_skipped_images"] == 0
    assert json.loads((out / "groundtruth.json").read_text()) == written
