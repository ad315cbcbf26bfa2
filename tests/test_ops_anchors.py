"""Tests of fpn_tf.ops.anchors."""

import math

import numpy as np
import pytest
import tensorflow as tf

from anchor_testing import LEVELS, RATIOS, SIZES, paper_anchors
from fpn_tf.ops import anchors as anchor_lib


def _ceil(a, b):
    return -(-a // b)


@pytest.mark.parametrize("size", [(800, 1344), (257, 391), (1, 1), (33, 64)])
def test_counts_per_level(size):
    anchors = paper_anchors(size)
    assert list(anchors) == ["P2", "P3", "P4", "P5", "P6"]
    for level, a in anchors.items():
        l = int(level[1])
        expected = _ceil(size[0], 2**l) * _ceil(size[1], 2**l) * 3
        assert a.shape == (expected, 4), level
    all_anchors, counts = anchor_lib.concat_anchors(anchors)
    assert counts == [a.shape[0] for a in anchors.values()]
    assert all_anchors.shape == (sum(counts), 4)


def test_known_counts():
    c = {k: v.shape[0] for k, v in paper_anchors((800, 1344)).items()}
    assert c == {"P2": 201600, "P3": 50400, "P4": 12600, "P5": 3150, "P6": 819}
    c = {k: v.shape[0] for k, v in paper_anchors((257, 391)).items()}
    assert c == {
        "P2": 65 * 98 * 3,
        "P3": 33 * 49 * 3,
        "P4": 17 * 25 * 3,
        "P5": 9 * 13 * 3,
        "P6": 5 * 7 * 3,
    }


def test_feature_map_size_matches_same_padding_stride2_chain():
    x = tf.zeros([1, 257, 391, 1])
    for level in range(1, 7):
        x = tf.nn.max_pool2d(x, 1, 2, "SAME")  # a kernel-1 stride-2 "same" op, like P6
        assert anchor_lib.feature_map_size((257, 391), level) == tuple(x.shape[1:3])


def test_centres_sizes_and_ratios_at_known_location():
    anchors = paper_anchors((257, 391))
    p3 = anchors["P3"].numpy()
    width = _ceil(391, 8)
    y, x = 2, 5
    cell = p3[(y * width + x) * 3 : (y * width + x) * 3 + 3]
    centres = np.stack([(cell[:, 0] + cell[:, 2]) / 2, (cell[:, 1] + cell[:, 3]) / 2], -1)
    np.testing.assert_allclose(centres, [[20.0, 44.0]] * 3, atol=1e-4)  # (y + 0.5) * 8
    h = cell[:, 2] - cell[:, 0]
    w = cell[:, 3] - cell[:, 1]
    np.testing.assert_allclose(h * w, [64.0**2] * 3, rtol=1e-5)
    np.testing.assert_allclose(h / w, [0.5, 1.0, 2.0], rtol=1e-5)
    np.testing.assert_allclose(h, [64 * math.sqrt(0.5), 64, 64 * math.sqrt(2)], rtol=1e-5)
    # First anchor of P2 (cell 0, 0), ratio 1:2.
    np.testing.assert_allclose(
        anchors["P2"].numpy()[1], [2 - 16, 2 - 16, 2 + 16, 2 + 16], atol=1e-5
    )
    # Last cell of P6: centre ((5 - 1) + 0.5) * 64, ((7 - 1) + 0.5) * 64; size 512.
    last = anchors["P6"].numpy()[-2]  # ratio 1
    np.testing.assert_allclose(last, [288 - 256, 416 - 256, 288 + 256, 416 + 256], atol=1e-4)


def test_single_level_ablation_and_num_anchors():
    levels = ("P4",)
    sizes = {"P4": (32, 64, 128, 256, 512)}
    assert anchor_lib.num_anchors_per_location(levels, sizes, RATIOS) == {"P4": 15}
    anchors = paper_anchors((256, 320), levels=levels, sizes=sizes)
    a = anchors["P4"].numpy()
    assert a.shape == (16 * 20 * 15, 4)
    areas = (a[:15, 2] - a[:15, 0]) * (a[:15, 3] - a[:15, 1])
    np.testing.assert_allclose(
        areas, np.repeat([32.0**2, 64.0**2, 128.0**2, 256.0**2, 512.0**2], 3), rtol=1e-5
    )
    assert anchor_lib.num_anchors_per_location(LEVELS, SIZES, RATIOS) == {
        f"P{l}": 3 for l in range(2, 7)
    }
    with pytest.raises(ValueError, match=r"no anchor sizes for levels \['P3'\]"):
        paper_anchors((64, 64), levels=("P2", "P3"), sizes={"P2": (32,)})


def test_tensor_image_size_inside_tf_function():
    @tf.function(input_signature=[tf.TensorSpec([2], tf.int32)])
    def f(size):
        all_anchors, counts = anchor_lib.concat_anchors(paper_anchors(size))
        return all_anchors, tf.stack(counts)

    dyn, counts = f(tf.constant([257, 391]))
    static, static_counts = anchor_lib.concat_anchors(paper_anchors((257, 391)))
    np.testing.assert_array_equal(counts.numpy(), static_counts)
    np.testing.assert_allclose(dyn.numpy(), static.numpy())


def test_anchors_xla():
    f = tf.function(
        lambda: anchor_lib.concat_anchors(paper_anchors((96, 130)))[0],
        jit_compile=True,
    )
    ref, _ = anchor_lib.concat_anchors(paper_anchors((96, 130)))
    np.testing.assert_allclose(f().numpy(), ref.numpy())


# ------------------------------------------------------------------ torchvision / detectron2 switches


def test_offset_zero_puts_centres_on_the_grid_corners():
    anchors = paper_anchors((257, 391), offset=0.0)
    p3 = anchors["P3"].numpy()
    width = _ceil(391, 8)
    y, x = 2, 5
    cell = p3[(y * width + x) * 3 : (y * width + x) * 3 + 3]
    centres = np.stack([(cell[:, 0] + cell[:, 2]) / 2, (cell[:, 1] + cell[:, 3]) / 2], -1)
    np.testing.assert_allclose(centres, [[16.0, 40.0]] * 3, atol=1e-4)  # (y, x) * 8
    # Half a stride from the default, on every anchor of every level.
    default = paper_anchors((257, 391))
    for level, a in anchors.items():
        half = 0.5 * 2 ** int(level[1])
        np.testing.assert_allclose(default[level].numpy() - a.numpy(), half, atol=1e-3)


def test_round_cell_anchors_gives_torchvisions_integer_cell_anchors():
    # torchvision's AnchorGenerator cell anchors of fasterrcnn_resnet50_fpn (xyxy), as yxyx.
    torchvision_xyxy = {
        "P2": [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]],
        "P6": [[-362, -181, 362, 181], [-256, -256, 256, 256], [-181, -362, 181, 362]],
    }
    anchors = paper_anchors((64, 64), offset=0.0, round_cell_anchors=True)
    for level, xyxy in torchvision_xyxy.items():
        cell = np.asarray(xyxy, np.float32)[:, [1, 0, 3, 2]]
        np.testing.assert_array_equal(anchors[level].numpy()[:3], cell)  # cell (0, 0)
    # Shifted copies: cell (0, 1) of P2 is the cell anchors + 4 in x.
    np.testing.assert_array_equal(
        anchors["P2"].numpy()[3:6],
        np.asarray(torchvision_xyxy["P2"])[:, [1, 0, 3, 2]] + [0, 4, 0, 4],
    )
    # Not rounded by default: 32 * sqrt(0.5) / 2 = 11.31...
    plain = paper_anchors((64, 64), offset=0.0)["P2"].numpy()[0]
    r = 8 * math.sqrt(2)
    np.testing.assert_allclose(plain, [-r, -2 * r, r, 2 * r], rtol=1e-6)
    # Ties round half to even, as torch.round: a side of 33 has corners +-16.5 -> +-16.
    tie = paper_anchors(
        (8, 8), levels=("P3",), sizes={"P3": (33,)}, aspect_ratios=(1.0,), round_cell_anchors=True
    )["P3"].numpy()[0]
    np.testing.assert_array_equal(tie, [4 - 16, 4 - 16, 4 + 16, 4 + 16])


def test_stride_from_padded_size_on_an_800x1216_image():
    size = (800, 1216)
    anchors = paper_anchors(size, offset=0.0, stride_from_padded_size=True)
    # P6 has 13 x 19 cells: torchvision's strides 800 // 13 = 61 and 1216 // 19 = 64.
    p6 = anchors["P6"].numpy().reshape(13, 19, 3, 4)
    cy = (p6[..., 0] + p6[..., 2]) / 2
    cx = (p6[..., 1] + p6[..., 3]) / 2
    np.testing.assert_allclose(cy, np.broadcast_to(61.0 * np.arange(13)[:, None, None], cy.shape))
    np.testing.assert_allclose(cx, np.broadcast_to(64.0 * np.arange(19)[None, :, None], cx.shape))
    assert cy.max() == 61.0 * 12 and cx.max() == 64.0 * 18
    # The levels whose cells divide the padded size keep their 2**l stride.
    ref = paper_anchors(size, offset=0.0)
    for level in ("P2", "P3", "P4", "P5"):
        np.testing.assert_array_equal(anchors[level].numpy(), ref[level].numpy())
    assert np.abs(anchors["P6"].numpy() - ref["P6"].numpy()).max() == 3.0 * 12
    # With the default offset the centres are at (y + 0.5) * 61.
    half = paper_anchors(size, stride_from_padded_size=True)["P6"].numpy()
    np.testing.assert_allclose((half[0, 0] + half[0, 2]) / 2, 0.5 * 61, atol=1e-4)
    # A tensor image size (inside tf.function) gives the same anchors.
    f = tf.function(
        lambda s: paper_anchors(s, offset=0.0, stride_from_padded_size=True)["P6"],
        input_signature=[tf.TensorSpec([2], tf.int32)],
    )
    np.testing.assert_array_equal(f(tf.constant(size)).numpy(), anchors["P6"].numpy())
