"""The synthetic shapes dataset: loadable, multi-scale, deterministic."""

import json
import os
import sys

import numpy as np
import pytest

from fpn_tf.data import synthetic
from fpn_tf.data.coco_reader import load_coco
import watched

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    paths = synthetic.generate_dataset(str(root), num_train=40, num_val=8, seed=11)
    return root, paths


def test_writes_a_loadable_dataset(generated):
    root, paths = generated
    assert set(paths) == {"train", "val"}
    train = load_coco(
        paths["train"]["annotation_file"],
        paths["train"]["image_dir"],
        on_bad_data="error",
        verify_images="full",
    )
    val = load_coco(
        paths["val"]["annotation_file"],
        paths["val"]["image_dir"],
        on_bad_data="error",
        verify_images="full",
    )
    assert train.num_images == 40 and val.num_images == 8
    assert not set(train.image_ids) & set(val.image_ids)
    # Non-contiguous ids, all four classes used.
    assert train.category_map.dataset_ids == (1, 3, 7, 9)
    assert set(train.gt_classes) == {1, 2, 3, 4}
    # Some images are negatives.
    counts = train.num_instances_per_image
    assert (counts == 0).sum() >= 1 and counts.max() >= 3
    # JPEG and PNG files, some in sub-folders; sides within 320..512.
    names = list(train.file_names)
    assert any(n.endswith(".png") for n in names)
    assert any(n.endswith(".jpg") for n in names)
    assert any("/" in n for n in names)
    assert train.heights.min() >= 320 and train.widths.max() <= 512
    assert (train.heights > train.widths).any()
    assert (train.heights < train.widths).any()


def test_object_sizes_span_8_to_200_px(generated):
    _, paths = generated
    data = json.load(open(paths["train"]["annotation_file"]))
    sides = np.array([np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in data["annotations"]])
    assert sides.min() < 14 and sides.max() > 120
    assert sides.min() >= 6 and sides.max() <= 205
    assert (sides < 32).sum() >= 10 and (sides > 96).sum() >= 5
    # Tight boxes of drawn pixels: area <= box area.
    for a in data["annotations"]:
        assert 0 < a["area"] <= a["bbox"][2] * a["bbox"][3]


def test_deterministic_given_seed(tmp_path):
    a = synthetic.generate_split(str(tmp_path / "a"), "train", 5, seed=3)
    b = synthetic.generate_split(str(tmp_path / "b"), "train", 5, seed=3)
    c = synthetic.generate_split(str(tmp_path / "c"), "train", 5, seed=4)
    ja, jb, jc = (json.load(open(p["annotation_file"])) for p in (a, b, c))
    assert ja == jb and ja != jc
    for img in ja["images"]:
        fa = open(os.path.join(a["image_dir"], img["file_name"]), "rb").read()
        fb = open(os.path.join(b["image_dir"], img["file_name"]), "rb").read()
        assert fa == fb


def test_command_line(tmp_path):
    run = watched.run(
        [
            sys.executable,
            "-m",
            "fpn_tf.data.synthetic",
            f"--output_dir={tmp_path}",
            "--num_train=3",
            "--num_val=2",
            "--image_size=64,96",
            "--max_object_size=40",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    paths = json.loads(run.stdout)
    data = json.load(open(paths["val"]["annotation_file"]))
    assert len(data["images"]) == 2
    assert all(64 <= i["height"] <= 96 for i in data["images"])
    # The generator does not load TensorFlow.
    run = watched.run(
        [
            sys.executable,
            "-c",
            "import sys, fpn_tf.data.synthetic; " "print('tensorflow' in sys.modules)",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.stdout.strip() == "False", run.stderr[-2000:]
