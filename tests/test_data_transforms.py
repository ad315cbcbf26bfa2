"""Resize / flip / pad with hand-computed numbers."""

import math

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.configs.experiment import ResizeConfig
from fpn_tf.data import transforms
from data_testing import resized_hw

R800 = ResizeConfig(short_side=800, max_long_side=1333)
FLOOR = ResizeConfig(short_side=800, max_long_side=1333, rounding="floor")


def _preprocess(example, flip=False, padding_mode="orientation", max_num_instances=100, **resize):
    return transforms.preprocess_example(
        example,
        ResizeConfig(**resize),
        flip=flip,
        padding_mode=padding_mode,
        max_num_instances=max_num_instances,
    )


@pytest.mark.parametrize(
    "hw,expected",
    [
        ((480, 640), (800, 1067)),  # s = 5/3: 1066.67 rounds to 1067
        ((640, 480), (1067, 800)),  # portrait
        ((300, 1000), (400, 1333)),  # 2667 > 1333: s = 1.333 -> 399.9 -> 400
        ((800, 1333), (800, 1333)),  # already there
        ((427, 640), (800, 1199)),  # 640 * 800/427 = 1199.06
    ],
)
def test_resized_size_rule(hw, expected):
    assert resized_hw(*hw, R800) == expected


def _torchvision_resized_size(h, w, short_side, max_long_side):
    """torchvision's GeneralizedRCNNTransform in eager mode: ``min(self_min_size / min_size,
    self_max_size / max_size)`` on Python ints, then ``F.interpolate(scale_factor=s,
    recompute_scale_factor=True)``: ``floor(size * s)`` on Python floats (float64)."""
    scale = min(short_side / min(h, w), max_long_side / max(h, w))
    return math.floor(h * scale), math.floor(w * scale)


@pytest.mark.parametrize(
    "hw,floor,rounded",
    [
        # the sizes torchvision 0.29.1's transform gives (measured), and ours with "round"
        ((480, 640), (800, 1066), (800, 1067)),
        ((640, 480), (1066, 800), (1067, 800)),
        ((427, 640), (800, 1199), (800, 1199)),  # 1199.06 either way
        ((300, 1000), (399, 1333), (400, 1333)),  # capped by the long side: 399.9 x 1333
        ((800, 1333), (800, 1333), (800, 1333)),
        ((333, 500), (800, 1201), (800, 1201)),
    ],
)
def test_resized_size_floor_is_torchvisions(hw, floor, rounded):
    assert resized_hw(*hw, FLOOR) == floor
    assert resized_hw(*hw, R800) == rounded
    assert _torchvision_resized_size(*hw, 800, 1333) == floor


def test_resized_size_floor_matches_torchvision_arithmetic_on_a_grid():
    """Every size 16..1400 against several others, at 800/1333 and 32/64, batched: float64
    throughout (a float32 scale gives 799 rows for 480x640)."""
    sizes = [(h, w) for h in range(16, 1401, 7) for w in (100, 333, 427, 480, 500, 640, 1000)]
    for short_side, long_side in ((800, 1333), (32, 64)):
        floor = ResizeConfig(short_side=short_side, max_long_side=long_side, rounding="floor")
        got = transforms.resized_size(tf.constant(sizes), floor).numpy()
        expected = [_torchvision_resized_size(h, w, short_side, long_side) for h, w in sizes]
        np.testing.assert_array_equal(got, expected)
    scale32 = np.float32(800) / np.float32(480)
    assert math.floor(480 * float(scale32)) == 799  # what a float32 scale would give
    with pytest.raises(ValueError, match="rounding"):
        ResizeConfig(short_side=8, max_long_side=8, rounding="ceil")


def test_preprocess_example_with_floor_rounding():
    ex = _example(480, 640, [[48, 64, 144, 192]], [2], [False])
    features, labels = _preprocess(ex, max_num_instances=1, rounding="floor")
    sy, sx = 800 / 480, 1066 / 640
    assert features["images"].shape == (800, 1344, 3)
    np.testing.assert_allclose(
        features["image_info"], [[480, 640], [800, 1066], [sy, sx], [0, 0]], rtol=1e-6
    )
    np.testing.assert_allclose(labels["gt_boxes"][0], [48 * sy, 64 * sx, 144 * sy, 192 * sx])
    img = features["images"].numpy()
    assert np.all(img[:, 1066:] == 0)
    assert img[799, :1066].mean() > 50 and img[:800, 1065].mean() > 50
    batch = _preprocess(
        ex, max_num_instances=1, rounding="floor", padding_mode="batch", pad_multiple=1
    )[0]
    assert batch["images"].shape == (800, 1066, 3)


def test_fixed_padded_sizes():
    assert transforms.fixed_padded_size("orientation", R800) == [(800, 1344), (1344, 800)]
    assert transforms.fixed_padded_size("square", R800) == [(1344, 1344)]
    assert transforms.fixed_padded_size("batch", R800) == []
    assert transforms.ceil_to_multiple(1333, 32) == 1344
    assert transforms.ceil_to_multiple(800, 32) == 800


def _example(h, w, boxes, classes, crowd, image_id=5, image=None):
    if image is None:
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    return {
        "image": tf.constant(image),
        "image_id": tf.constant(image_id, tf.int64),
        "height": tf.constant(h, tf.int32),
        "width": tf.constant(w, tf.int32),
        "gt_boxes": tf.constant(boxes, tf.float32, shape=[len(boxes), 4]),
        "gt_classes": tf.constant(classes, tf.int32, shape=[len(classes)]),
        "gt_is_crowd": tf.constant(crowd, tf.bool, shape=[len(crowd)]),
    }


def test_480x640_resize_flip_pad_exact_numbers():
    ex = _example(480, 640, [[48, 64, 144, 192], [0, 0, 480, 640]], [2, 1], [False, True])
    sy, sx = 800 / 480, 1067 / 640  # 1.666667, 1.6671875
    for flip in (False, True):
        features, labels = _preprocess(ex, flip=tf.constant(flip), max_num_instances=5)
        assert features["images"].shape == (800, 1344, 3)
        assert features["images"].dtype == tf.float32
        np.testing.assert_allclose(
            features["image_info"], [[480, 640], [800, 1067], [sy, sx], [0, 0]], rtol=1e-6
        )
        assert int(features["image_id"]) == 5
        # 64 * 1.6671875 = 106.7 and 192 * 1.6671875 = 320.1; flipped in the
        # resized image of width 1067: 1067 - 320.1 = 746.9, 1067 - 106.7 = 960.3.
        x0, x1 = (746.9, 960.3) if flip else (106.7, 320.1)
        np.testing.assert_allclose(
            labels["gt_boxes"],
            [[80, x0, 240, x1], [0, 0, 800, 1067]] + [[0, 0, 0, 0]] * 3,
            atol=1e-3,
        )
        np.testing.assert_array_equal(labels["gt_classes"], [2, 1, -1, -1, -1])
        np.testing.assert_array_equal(labels["gt_is_crowd"], [False, True, False, False, False])
        # Padding (columns 1067..1343) is zero; the image is not.
        img = features["images"].numpy()
        assert np.all(img[:, 1067:] == 0) and img[:, :1067].mean() > 50


def test_flip_mirrors_pixels_and_boxes_exactly_without_resize():
    # short_side = the image's short side: scale 1, so pixels are exact.
    image = np.random.default_rng(1).integers(0, 256, (32, 48, 3)).astype(np.uint8)
    ex = _example(32, 48, [[4, 6, 10, 20]], [3], [False], image=image)
    features, labels = _preprocess(
        ex, flip=True, short_side=32, max_long_side=100, max_num_instances=2
    )
    img = features["images"].numpy()
    assert img.shape == (32, 128, 3)  # landscape: [ceil32(32), ceil32(100)]
    np.testing.assert_array_equal(img[:, :48], image[:, ::-1].astype(np.float32))
    assert np.all(img[:, 48:] == 0)
    # xmin' = w - xmax = 48 - 20, xmax' = w - xmin = 48 - 6
    np.testing.assert_array_equal(labels["gt_boxes"][0], [4, 28, 10, 42])
    np.testing.assert_array_equal(features["image_info"][2], [1, 1])


def test_flip_after_resize_mirrors_the_resized_image():
    ex = _example(30, 40, [[3, 4, 9, 30]], [1], [False])
    args = dict(short_side=45, max_long_side=100, max_num_instances=1)
    plain, _ = _preprocess(ex, flip=False, **args)
    flipped, labels = _preprocess(ex, flip=True, **args)
    h, w = (int(v) for v in plain["image_info"][1])
    assert (h, w) == (45, 60)
    np.testing.assert_allclose(
        flipped["images"][:h, :w], plain["images"][:h, :w][:, ::-1], atol=1e-3
    )
    np.testing.assert_allclose(labels["gt_boxes"][0], [4.5, 60 - 45, 13.5, 60 - 6], atol=1e-4)


@pytest.mark.parametrize(
    "mode,hw,padded",
    [
        ("orientation", (480, 640), (128, 224)),  # resized (100, 133)
        ("orientation", (640, 480), (224, 128)),  # portrait (133, 100)
        ("square", (480, 640), (224, 224)),
        ("batch", (480, 640), (128, 160)),  # ceil32 of (100, 133)
        ("batch", (100, 100), (128, 128)),  # (100, 100)
    ],
)
def test_padding_modes_give_multiples_of_32(mode, hw, padded):
    ex = _example(*hw, [], [], [])
    features, labels = _preprocess(
        ex, short_side=100, max_long_side=200, padding_mode=mode, max_num_instances=3
    )
    assert tuple(features["images"].shape[:2]) == padded
    assert all(d % 32 == 0 for d in padded)
    # An image without ground truth: every row is padding.
    np.testing.assert_array_equal(labels["gt_classes"], [-1, -1, -1])
    np.testing.assert_array_equal(labels["gt_boxes"], np.zeros((3, 4)))


def test_pad_groundtruth_truncates_first_n_and_warns(capfd):
    boxes = tf.reshape(tf.range(20, dtype=tf.float32), [5, 4])

    @tf.function  # as in the tf.data pipeline: the warning is a graph op
    def pad(boxes):
        return transforms.pad_groundtruth(
            boxes,
            tf.constant([1, 2, 3, 4, 1]),
            tf.constant([False, True, False, False, False]),
            3,
            image_id=tf.constant(42, tf.int64),
        )

    b, c, k = pad(boxes)
    np.testing.assert_array_equal(b, boxes[:3])
    np.testing.assert_array_equal(c, [1, 2, 3])
    np.testing.assert_array_equal(k, [False, True, False])
    assert "image id 42 has 5 instances; keeping the first 3" in (capfd.readouterr().err)
