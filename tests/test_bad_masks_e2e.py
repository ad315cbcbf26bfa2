"""Bad masks through the commands, as a user meets them: ``python -m fpn_tf.train
--mode=train_and_eval`` with a periodic evaluation, and ``python -m fpn_tf.data.convert_coco
--include_masks``, on a tiny data set whose training and evaluation files both hold one
annotation of each kind that used to end a run in a traceback, an endless hang, a silent
mis-score or a segmentation fault (issue 23), plus an image whose every mask is bad. One run
serves the tests of all the classes (each asserts its own annotations, in the train and the eval
summaries); a second data set, with no usable mask at all, must stop before training in one line.
Each command runs in a subprocess with a CPU limit it finishes well within."""

import json
import os
import re
import sys

import pytest

from data_testing import pattern, write_coco_json, write_image
import watched

pytestmark = pytest.mark.slow

H, W = 64, 96
CPU_LIMIT_S = 600  # the run takes well under a minute of CPU; more is a hang
# TensorFlow maps ~5 GiB of address space; a regression that makes pycocotools allocate
# gigabytes then fails in the child instead of exhausting a shared machine.
MEMORY_LIMIT_BYTES = 8 * 2**30

# Training annotation ids; the evaluation file holds the same annotations with ids + 200.
CLASSES = {
    "traceback": {201: "bad_polygon", 202: "bad_segmentation_type", 203: "bad_rle"}
    | {204: "bad_polygon", 205: "missing_segmentation"},
    "hang": {206: "bad_rle"},
    "mis_score": {207: "bad_polygon", 208: "empty_mask", 209: "mask_size_mismatch"},
    "image_without_masks": {211: "bad_polygon", 212: "bad_segmentation_type"},
}
CLIPPED = 210  # the segfault class: coordinates of 1e12, clipped and kept


def _rect(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _annotations(offset=0):
    def ann(aid, iid, bbox, segmentation=..., cat=1):
        a = {"id": aid + offset, "image_id": iid, "category_id": cat, "bbox": bbox}
        a.update(iscrowd=0, area=float(bbox[2] * bbox[3]))
        if segmentation is not ...:
            a["segmentation"] = segmentation
        return a

    box = [20, 20, 10, 10]
    return [
        ann(101, 1, [10, 10, 30, 20], _rect(10, 10, 30, 20)),
        ann(102, 1, [50, 30, 30, 25], _rect(50, 30, 30, 25), cat=2),
        ann(301, 3, [5, 5, 40, 40], _rect(5, 5, 40, 40), cat=2),
        ann(302, 3, [50, 10, 20, 30], _rect(50, 10, 20, 30)),
        # a traceback: TypeError / KeyError / our ValueError at the first periodic evaluation
        ann(201, 1, box, [[20, 20, 30, 30]]),  # 2 points
        ann(202, 1, box, 7),  # a number
        ann(203, 1, box, {"size": [H, W]}),  # an RLE without counts
        ann(204, 1, box, []),  # an empty list
        ann(205, 1, box),  # no segmentation
        # an endless hang of pycocotools' mask IoU: runs that do not add up to H x W
        ann(206, 1, box, {"size": [H, W], "counts": [100, 50, 7]}),
        # a silent mis-score: odd coordinates, entirely outside, an RLE of another size
        ann(207, 1, box, [[20, 20, 30, 20, 30, 30, 20]]),
        ann(208, 1, box, [[200, 200, 220, 200, 220, 220]]),
        ann(209, 1, box, {"size": [32, 48], "counts": [32 * 48]}),
        # a segmentation fault in pycocotools' rasteriser (training, conversion, evaluation)
        ann(CLIPPED, 3, [0, 40, 96, 10], [[0, 40, 1e12, 40, 1e12, 50, 0, 50]]),
        # image 2: every mask bad
        ann(211, 2, [10, 10, 20, 20], [[10, 10, 30, 10]]),
        ann(212, 2, [40, 20, 20, 20], "garbage"),
    ]


def _write_data(root, annotations_of):
    image_dir = os.path.join(root, "images")
    for i in (1, 2, 3):
        write_image(os.path.join(image_dir, f"{i}.png"), pattern(H, W, i))
    images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2, 3)]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    files = {
        split: write_coco_json(os.path.join(root, f"{split}.json"), images, anns, cats)
        for split, anns in annotations_of.items()
    }
    return files, image_dir


def _overrides(train_json, eval_json, image_dir):
    """The tiny Mask R-CNN of tests/conftest.py's TINY_OVERRIDES, smaller still, on our files:
    2 steps, a periodic evaluation at step 1, the final one at step 2."""
    from conftest import TINY_OVERRIDES

    overrides = {k: v for k, v in TINY_OVERRIDES.items() if ".synthetic." not in k}
    overrides.update(
        {
            "model.mask_head.num_convs": 1,
            "model.mask_head.conv_dims": 8,
            # Every class on every image: the hang needs a detection to meet the bad mask.
            "model.detection.score_threshold": 0.0,
            "train_data.mask_crop_size": 14,
            "train.total_steps": 2,
            "train.warmup_steps": 1,
            "train.checkpoint_every_steps": 100,
            "eval.every_steps": 1,
            "eval.summary_images": 0,
        }
    )
    for split, path in (("train_data", train_json), ("eval_data", eval_json)):
        overrides.update(
            {
                f"{split}.source": "coco",
                f"{split}.annotation_file": path,
                f"{split}.image_dir": image_dir,
                f"{split}.resize.short_side": H,
                f"{split}.resize.max_long_side": W,
            }
        )
    return json.dumps(overrides)


def _run(module, *args):
    from test_bad_masks import limit_memory

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.getcwd())
    return watched.run(
        [sys.executable, "-m", module, *args],
        cpu_limit_s=CPU_LIMIT_S,
        env=env,
        preexec_fn=limit_memory(MEMORY_LIMIT_BYTES),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One train_and_eval run on the data set with every class, in train.json and eval.json."""
    root = str(tmp_path_factory.mktemp("bad_masks"))
    files, image_dir = _write_data(
        root, {"train": _annotations(), "eval": _annotations(offset=200)}
    )
    model_dir = os.path.join(root, "run")
    result = _run(
        "fpn_tf.train",
        "--config_file=configs/cpu_demo_mask.yaml",
        f"--model_dir={model_dir}",
        "--mode=train_and_eval",
        "--noexport",
        f"--params_override={_overrides(files['train'], files['eval'], image_dir)}",
    )
    metrics_file = os.path.join(model_dir, "eval", "metrics.json")
    metrics = json.load(open(metrics_file)) if os.path.exists(metrics_file) else {}
    return result, metrics, files


def _lines(text, pattern_):
    return [line for line in text.splitlines() if re.search(pattern_, line)]


def _assert_class(run, ids_to_reasons):
    """The run ended well, and each annotation is a counted skip naming it: in the training
    log (per reason, with the ids), in the evaluation summary of the periodic and the final
    evaluation, and in metrics.json (ids + 200 in the evaluation file)."""
    result, metrics, files = run
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    train_log = result.stderr
    for aid, reason in ids_to_reasons.items():
        skip = _lines(
            train_log, rf"{re.escape(files['train'])}: skipped \d+ annotation\(s\) .*\[{reason}\]"
        )
        assert len(skip) == 1 and f"annotation {aid}" in skip[0], (aid, reason, skip)
    summary = _lines(train_log, r"Trained 2 steps .*training data masks: ")
    assert len(summary) == 1, train_log[-3000:]
    for reason in set(ids_to_reasons.values()):
        assert re.search(rf"\b{reason} \d", summary[0]), (reason, summary[0])
    # Both evaluations (step 1, periodic; step 2, final) say what mask AP left out, box AP nothing.
    evaluations = _lines(train_log, r"evaluation: mask_AP leaves out 11 ground-truth annotation")
    assert len(evaluations) == 2, train_log[-3000:]
    assert len(_lines(train_log, r"Eval at step 1: .*mask_AP")) == 1
    for aid, reason in ids_to_reasons.items():
        assert str(aid + 200) in evaluations[0] and str(aid + 200) in evaluations[1]
        assert aid + 200 in metrics["gt_left_out"]["mask_AP"][reason], (aid, reason)
    assert metrics["num_gt_left_out_of_mask_AP"] == 11 and metrics["num_gt_left_out_of_AP"] == 0
    assert "AP" not in metrics["gt_left_out"] and metrics["step"] == 2
    assert 0.0 <= metrics["mask_AP"] <= 1.0 and 0.0 <= metrics["AP"] <= 1.0


def test_traceback_class_is_skipped_and_counted(run):
    _assert_class(run, CLASSES["traceback"])


def test_hang_class_is_skipped_and_counted(run):
    """The run finishes (within CPU_LIMIT_S: watched.run raises Hang otherwise) with
    a detection of class 1 on image 1 evaluated against the rest of its ground truth."""
    _assert_class(run, CLASSES["hang"])


def test_silent_mis_score_class_is_skipped_and_counted(run):
    _assert_class(run, CLASSES["mis_score"])


def test_segfault_class_is_clipped_and_kept(run):
    result, metrics, files = run
    assert result.returncode == 0, (result.returncode, result.stderr[-4000:])  # not -11
    train = _lines(
        result.stderr, rf"{re.escape(files['train'])}: clipped the segmentation polygons of 1 "
    )
    evaluation = _lines(
        result.stderr, rf"{re.escape(files['eval'])}: clipped the segmentation polygons of 1 "
    )
    assert len(train) == 1 and f"annotation {CLIPPED}" in train[0]
    assert len(evaluation) == 1 and f"ids {CLIPPED + 200}" in evaluation[0]
    assert CLIPPED + 200 not in sum(metrics["gt_left_out"]["mask_AP"].values(), [])
    assert _lines(result.stderr, r"Trained 2 steps .*polygons clipped 1")


def test_an_image_whose_every_mask_is_skipped_is_named(run):
    _assert_class(run, CLASSES["image_without_masks"])
    result, _, files = run
    named = _lines(
        result.stderr, rf"{re.escape(files['train'])}: 1 image\(s\) lost every annotation"
    )
    assert len(named) == 1 and named[0].endswith("image 2")
    assert _lines(result.stderr, r"Trained 2 steps .*images left without objects: 2$")


def test_training_on_nothing_stops_before_training_in_one_line(tmp_path):
    """Every segmentation invalid (not missing): a mask model would train on zero masks."""
    bad = [a for a in _annotations() if a["id"] not in (101, 102, 301, 302, CLIPPED)]
    files, image_dir = _write_data(str(tmp_path), {"train": bad, "eval": bad})
    model_dir = str(tmp_path / "run")
    result = _run(
        "fpn_tf.train",
        "--config_file=configs/cpu_demo_mask.yaml",
        f"--model_dir={model_dir}",
        "--mode=train_and_eval",
        "--noexport",
        f"--params_override={_overrides(files['train'], files['eval'], image_dir)}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "no annotation has a usable mask: 11 skipped for their masks" in errors[0]
    assert files["train"] in errors[0] and "annotation 201" in errors[0]
    assert not [f for f in os.listdir(model_dir) if f.startswith("ckpt-")]  # no step was taken


def test_convert_coco_include_masks_clips_and_counts_instead_of_crashing(tmp_path):
    files, image_dir = _write_data(str(tmp_path), {"train": _annotations()})
    prefix = str(tmp_path / "records" / "train")
    result = _run(
        "fpn_tf.data.convert_coco",
        f"--annotation_file={files['train']}",
        f"--image_dir={image_dir}",
        f"--output_prefix={prefix}",
        "--num_shards=1",
        "--include_masks",
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])  # not -11
    assert "Traceback" not in result.stderr
    assert _lines(result.stderr, rf"clipped the segmentation polygons of 1 .*annotation {CLIPPED}")
    wrote = _lines(result.stderr, r"Wrote 3 images, 5 annotations")
    assert len(wrote) == 1 and "'bad_polygon': 4" in wrote[0] and "'bad_rle': 2" in wrote[0]
    assert os.path.exists(prefix + "-00000-of-00001.tfrecord")
