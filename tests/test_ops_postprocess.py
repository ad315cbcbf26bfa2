"""Tests of fpn_tf.ops.postprocess: NMS, RPN proposals, Fast R-CNN detections."""

import math

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.ops import anchors as anchor_lib
from fpn_tf.ops import postprocess as pp

IMPLS = ["padded", "per_image"]

RATIOS = (0.5, 1.0, 2.0)
# The config's values (RPNConfig / RoISamplerConfig, BoxHeadConfig), which the ops take explicitly.
PROPOSALS = dict(
    pre_nms_top_k=2000,
    post_nms_top_k=2000,
    nms_iou=0.7,
    min_size=0.0,
    nms_impl="padded",
    nms_per_level=False,
)
DETECTIONS = dict(
    score_threshold=0.05,
    nms_iou=0.5,
    max_detections=100,
    box_weights=(10.0, 10.0, 5.0, 5.0),
    min_box_size=0.0,
)


def proposals(*args, **kwargs):
    return pp.generate_proposals(*args, **{**PROPOSALS, **kwargs})


def detections(*args, **kwargs):
    return pp.postprocess_detections(*args, **{**DETECTIONS, **kwargs})


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_nms_hand_case(impl):
    boxes = tf.constant(
        [
            [
                [0, 0, 10, 10],  # 0.9
                [0, 0, 10, 11],  # 0.8, IoU 0.91 with box 0: suppressed
                [100, 100, 120, 120],  # 0.95: first
                [0, 5, 10, 15],  # 0.7, IoU 1/3 with box 0: kept
                [200, 200, 210, 210],
            ],  # 0.99 but invalid
            [[0, 0, 0, 0], [5, 5, 25, 25], [5, 5, 25, 26], [0, 0, 4, 4], [1, 1, 2, 2]],
        ],
        tf.float32,
    )
    scores = tf.constant([[0.9, 0.8, 0.95, 0.7, 0.99], [5.0, -1.0, -2.0, -3.0, -4.0]])
    valid = tf.constant([[True, True, True, True, False], [True] * 5])
    idx, keep = pp.batched_nms(boxes, scores, 4, 0.5, valid=valid, impl=impl)
    np.testing.assert_array_equal(
        keep.numpy(), [[True, True, True, False], [True, True, True, False]]
    )
    np.testing.assert_array_equal(idx.numpy(), [[2, 0, 3, 0], [1, 3, 4, 0]])


@pytest.mark.parametrize("impl", IMPLS)
def test_generate_proposals_hand_case(impl):
    # Two levels; zero deltas, so proposals are the (clipped) anchors.
    anchors = {
        "P2": tf.constant(
            [
                [0, 0, 10, 10],
                [0, 0, 10, 11],
                [20, 20, 40, 40],
                [-30, -30, -10, -10],  # outside the image: clipped to empty
                [50, 50, 70, 90],
            ],
            tf.float32,
        ),  # clipped to [50, 50, 60, 80]
        "P3": tf.constant([[21, 21, 41, 41], [0, 40, 30, 80]], tf.float32),
    }
    logits = {"P2": tf.constant([[3.0, 2.0, 1.0, 9.0, 0.0]]), "P3": tf.constant([[0.5, -1.0]])}
    deltas = {k: tf.zeros([1, v.shape[0], 4]) for k, v in anchors.items()}
    image_shape = tf.constant([[60.0, 80.0]])
    p = proposals(
        logits, deltas, anchors, image_shape, pre_nms_top_k=10, post_nms_top_k=6, nms_impl=impl
    )
    assert p.boxes.shape == (1, 6, 4) and p.scores.shape == (1, 6)
    expected = np.array(
        [
            [0, 0, 10, 10],  # 3.0 (suppresses [0,0,10,11], IoU 0.91)
            [20, 20, 40, 40],  # 1.0 (suppresses P3's [21,21,41,41], IoU 0.82)
            [50, 50, 60, 80],  # 0.0
            [0, 40, 30, 80],
        ],
        np.float32,
    )  # -1.0
    np.testing.assert_allclose(p.boxes.numpy()[0, :4], expected)
    np.testing.assert_array_equal(p.valid.numpy()[0], [True] * 4 + [False] * 2)
    np.testing.assert_allclose(
        p.scores.numpy()[0, :4], 1 / (1 + np.exp(-np.array([3.0, 1.0, 0.0, -1.0]))), rtol=1e-6
    )
    np.testing.assert_array_equal(p.boxes.numpy()[0, 4:], 0.0)
    np.testing.assert_array_equal(p.scores.numpy()[0, 4:], 0.0)
    # pre_nms_top_k = 1 per level: only [0,0,10,10]... no: P2's best is the empty
    # (outside) anchor, which is dropped; P3 keeps [21,21,41,41].
    p1 = proposals(
        logits, deltas, anchors, image_shape, pre_nms_top_k=1, post_nms_top_k=3, nms_impl=impl
    )
    np.testing.assert_array_equal(p1.valid.numpy()[0], [True, False, False])
    np.testing.assert_allclose(p1.boxes.numpy()[0, 0], [21, 21, 41, 41])


@pytest.mark.parametrize("impl", IMPLS)
def test_generate_proposals_nms_per_level_keeps_overlaps_of_different_levels(impl):
    """The hand case above with torchvision's / detectron2's per-level NMS: P3's [21,21,41,41]
    (IoU 0.82 with P2's [20,20,40,40]) survives; within P2 [0,0,10,11] is still suppressed."""
    anchors = {
        "P2": tf.constant(
            [
                [0, 0, 10, 10],
                [0, 0, 10, 11],
                [20, 20, 40, 40],
                [-30, -30, -10, -10],
                [50, 50, 70, 90],
            ],
            tf.float32,
        ),
        "P3": tf.constant([[21, 21, 41, 41], [0, 40, 30, 80]], tf.float32),
    }
    logits = {"P2": tf.constant([[3.0, 2.0, 1.0, 9.0, 0.0]]), "P3": tf.constant([[0.5, -1.0]])}
    deltas = {k: tf.zeros([1, v.shape[0], 4]) for k, v in anchors.items()}
    image_shape = tf.constant([[60.0, 80.0]])

    def run(post_nms_top_k, per_level=True):
        return proposals(
            logits,
            deltas,
            anchors,
            image_shape,
            pre_nms_top_k=10,
            post_nms_top_k=post_nms_top_k,
            nms_impl=impl,
            nms_per_level=per_level,
        )

    p = run(6)
    assert p.boxes.shape == (1, 6, 4) and p.scores.shape == (1, 6) and p.valid.shape == (1, 6)
    expected = [
        [0, 0, 10, 10],
        [20, 20, 40, 40],
        [21, 21, 41, 41],
        [50, 50, 60, 80],
        [0, 40, 30, 80],
    ]
    np.testing.assert_allclose(p.boxes.numpy()[0, :5], expected)
    np.testing.assert_array_equal(p.valid.numpy()[0], [True] * 5 + [False])
    np.testing.assert_allclose(
        p.scores.numpy()[0, :5], 1 / (1 + np.exp(-np.array([3.0, 1.0, 0.5, 0.0, -1.0]))), rtol=1e-6
    )
    np.testing.assert_array_equal(p.boxes.numpy()[0, 5:], 0.0)
    np.testing.assert_array_equal(p.scores.numpy()[0, 5:], 0.0)
    # The global NMS suppresses the P3 box.
    g = run(6, per_level=False)
    assert not (g.boxes.numpy()[0] == [21, 21, 41, 41]).all(-1).any()
    # post_nms_top_k is over all levels, by score; more rows than candidates are padding.
    np.testing.assert_allclose(run(3).boxes.numpy()[0], expected[:3])
    assert run(20).valid.numpy().sum() == 5 and run(20).boxes.shape == (1, 20, 4)


def test_generate_proposals_nms_per_level_equals_one_run_per_level_merged():
    rng = np.random.default_rng(3)
    anchors = anchor_lib.generate_anchors(
        (48, 64), ("P2", "P3", "P4"), {"P2": (16,), "P3": (32,), "P4": (64,)}, RATIOS, offset=0.5
    )
    logits = {
        k: tf.constant(rng.normal(size=(2, v.shape[0])), tf.float32) for k, v in anchors.items()
    }
    deltas = {
        k: tf.constant(rng.normal(size=(2, v.shape[0], 4)) * 0.2, tf.float32)
        for k, v in anchors.items()
    }
    size = tf.constant([[48.0, 60.0], [40.0, 64.0]])
    kwargs = dict(pre_nms_top_k=40, post_nms_top_k=60, nms_iou=0.5)
    for impl in IMPLS:
        got = proposals(logits, deltas, anchors, size, nms_impl=impl, nms_per_level=True, **kwargs)
        # One level alone: its global NMS is its per-level NMS.
        runs = [
            proposals(
                {k: logits[k]}, {k: deltas[k]}, {k: anchors[k]}, size, nms_impl=impl, **kwargs
            )
            for k in anchors
        ]
        for b in range(2):
            rows = [
                (float(s), tuple(box))
                for r in runs
                for s, box, v in zip(r.scores.numpy()[b], r.boxes.numpy()[b], r.valid.numpy()[b])
                if v
            ]
            rows = sorted(rows, key=lambda row: -row[0])[:60]
            n = len(rows)
            assert int(got.valid.numpy()[b].sum()) == n and n > 40  # more than one level's
            np.testing.assert_allclose(got.scores.numpy()[b, :n], [s for s, _ in rows], rtol=1e-6)
            np.testing.assert_allclose(got.boxes.numpy()[b, :n], [x for _, x in rows], atol=1e-5)
        if impl != "per_image":
            continue  # (the padded NMS takes seconds to trace)
        # Unknown anchor counts (tf.function with dynamic shapes) give the same proposals.
        spec = {k: tf.TensorSpec([2, None], tf.float32) for k in anchors}
        dspec = {k: tf.TensorSpec([2, None, 4], tf.float32) for k in anchors}
        aspec = {k: tf.TensorSpec([None, 4], tf.float32) for k in anchors}

        @tf.function(input_signature=[spec, dspec, aspec])
        def dynamic(lg, dl, an):
            return proposals(lg, dl, an, size, nms_impl="per_image", nms_per_level=True, **kwargs)

        dyn = dynamic(logits, deltas, dict(anchors))
        np.testing.assert_array_equal(dyn.valid.numpy(), got.valid.numpy())
        np.testing.assert_allclose(dyn.boxes.numpy(), got.boxes.numpy(), atol=1e-5)


def test_generate_proposals_decodes_and_clips_per_image():
    anchors = {"P2": tf.constant([[10, 10, 20, 20]], tf.float32)}
    logits = {"P2": tf.constant([[1.0], [1.0]])}
    # dy = 0.5 (shift by half a height), dh = log 2; image 1 is too small: clipped.
    deltas = {"P2": tf.constant([[[0.5, 0.0, math.log(2.0), 0.0]]] * 2)}
    p = proposals(
        logits, deltas, anchors, tf.constant([[100.0, 100.0], [22.0, 100.0]]), post_nms_top_k=2
    )
    np.testing.assert_allclose(
        p.boxes.numpy()[:, 0], [[10, 10, 30, 20], [10, 10, 22, 20]], atol=1e-4
    )


def _det_inputs():
    # 3 RoIs, 2 classes. RoIs 0 and 1 overlap (IoU 0.81); zero deltas -> boxes = RoIs.
    rois = tf.constant([[[0, 0, 100, 100], [0, 0, 90, 90], [200, 200, 250, 260]]], tf.float32)
    probs = tf.constant(
        [
            [
                [0.1, 0.8, 0.1],  # class 1: 0.8
                [0.1, 0.2, 0.7],  # class 2: 0.7 (different class, kept)
                [0.2, 0.04, 0.76],
            ]
        ]
    )  # class 1 0.04 < 0.05 dropped; class 2 kept
    deltas = tf.zeros([1, 3, 2, 4])
    return probs, deltas, rois


@pytest.mark.parametrize("impl", ["combined"] + IMPLS)
def test_detections_hand_case(impl):
    probs, deltas, rois = _det_inputs()
    d = detections(
        probs, deltas, rois, tf.constant([[240.0, 300.0]]), max_detections=6, nms_impl=impl
    )
    assert d.boxes.shape == (1, 6, 4) and d.classes.dtype == tf.int32
    n = int(d.num_detections.numpy()[0])
    got = sorted(
        zip(
            [round(float(x), 4) for x in d.scores.numpy()[0, :n]],
            d.classes.numpy()[0, :n].tolist(),
            [tuple(round(float(v), 3) for v in b) for b in d.boxes.numpy()[0, :n]],
        ),
        reverse=True,
    )
    # (RoI 0, class 1) 0.8; (RoI 2, class 2) 0.76 clipped to y <= 240; (RoI 1, class 2) 0.7
    # survives next to RoI 0 (other class); (RoI 1, class 1) 0.2 is suppressed by RoI 0
    # (same class, IoU 0.81); (RoI 0, class 2) 0.1 is suppressed by RoI 1 (same class);
    # (RoI 2, class 1) 0.04 is under the threshold.
    assert got == [
        (0.8, 1, (0, 0, 100, 100)),
        (0.76, 2, (200, 200, 240, 260)),
        (0.7, 2, (0, 0, 90, 90)),
    ]
    np.testing.assert_allclose(d.scores.numpy()[0, :3], [0.8, 0.76, 0.7], rtol=1e-6)
    assert np.all(d.boxes.numpy()[0, n:] == 0) and np.all(d.scores.numpy()[0, n:] == 0)
    assert np.all(d.classes.numpy()[0, n:] == 0)


@pytest.mark.parametrize("impl", ["combined"] + IMPLS)
def test_detections_delta_layouts_and_padding_rois(impl):
    probs, deltas, rois = _det_inputs()
    with_bg = tf.concat([tf.ones([1, 3, 1, 4]) * 9.0, deltas], axis=2)  # [B, R, C+1, 4]
    flat = tf.reshape(deltas, [1, 3, 8])  # [B, R, 4C]
    ref = detections(probs, deltas, rois, [240.0, 300.0], nms_impl=impl)
    for dl in (with_bg, flat):
        d = detections(probs, dl, rois, [240.0, 300.0], nms_impl=impl)
        np.testing.assert_allclose(d.boxes.numpy(), ref.boxes.numpy())
    assert ref.boxes.shape == (1, 100, 4)
    # A zero (padding) RoI gives no detection.
    padded_rois = tf.concat([rois[:, :2], tf.zeros([1, 1, 4])], axis=1)
    d = detections(probs, deltas, padded_rois, [240.0, 300.0], nms_impl=impl)
    assert d.num_detections.numpy().tolist() == [2]


@pytest.mark.parametrize("impl", ["combined"] + IMPLS)
def test_detections_min_box_size_removes_thin_boxes_after_clipping(impl):
    """torchvision's remove_small_boxes(1e-2): a box with a side < min_box_size (here after
    clipping to the image) is no detection; min_box_size 0 keeps it."""
    rois = tf.constant(
        [
            [
                [0, 0, 100, 100],  # kept
                [150, 10, 200, 10.005],  # 0.005 wide
                [150, 299.995, 200, 350],  # 0.005 wide once clipped to x <= 300
                [10, 150, 10.02, 250],  # 0.02 high: kept
            ]
        ],
        tf.float32,
    )
    probs = tf.constant([[[0.1, 0.9]] * 4])
    deltas = tf.zeros([1, 4, 1, 4])
    size = tf.constant([[240.0, 300.0]])

    def run(min_box_size):
        d = detections(probs, deltas, rois, size, nms_impl=impl, min_box_size=min_box_size)
        n = int(d.num_detections.numpy()[0])
        return sorted(tuple(np.round(b, 3)) for b in d.boxes.numpy()[0, :n])

    assert run(1e-2) == [(0, 0, 100, 100), (10, 150, 10.02, 250)]
    assert len(run(0.0)) == 4
    assert run(0.03) == [(0, 0, 100, 100)]


def test_detection_impls_agree_on_random_inputs():
    rng = np.random.default_rng(0)
    bsz, r, c = 2, 200, 6
    yx = rng.uniform(0, 300, (bsz, r, 2))
    rois = np.concatenate([yx, yx + rng.uniform(10, 150, (bsz, r, 2))], -1).astype(np.float32)
    probs = tf.nn.softmax(rng.normal(size=(bsz, r, c + 1)) * 2).numpy().astype(np.float32)
    deltas = (rng.normal(size=(bsz, r, c, 4)) * 0.3).astype(np.float32)
    size = tf.constant([[400.0, 380.0], [350.0, 420.0]])
    outs = [detections(probs, deltas, rois, size, nms_impl=i) for i in ["combined"] + IMPLS]
    for o in outs[1:]:
        np.testing.assert_array_equal(o.num_detections.numpy(), outs[0].num_detections.numpy())
        np.testing.assert_allclose(o.scores.numpy(), outs[0].scores.numpy())
        np.testing.assert_array_equal(o.classes.numpy(), outs[0].classes.numpy())
        np.testing.assert_allclose(o.boxes.numpy(), outs[0].boxes.numpy(), atol=1e-3)


@pytest.mark.slow
def test_postprocess_xla():
    """Proposals (both NMS impls) and detections ("padded" / "per_image") compile with XLA.

    ``nms_impl="combined"`` is not tested here: ``CombinedNonMaxSuppression`` has no
    XLA kernel (on CPU or GPU), so it cannot run under ``jit_compile=True``.
    """
    rng = np.random.default_rng(1)
    anchors = anchor_lib.generate_anchors(
        (64, 96), ("P3", "P4"), {"P3": (32,), "P4": (64,)}, RATIOS, offset=0.5
    )
    logits = {
        k: tf.constant(rng.normal(size=(2, v.shape[0])), tf.float32) for k, v in anchors.items()
    }
    deltas = {
        k: tf.constant(rng.normal(size=(2, v.shape[0], 4)) * 0.2, tf.float32)
        for k, v in anchors.items()
    }
    size = tf.constant([[64.0, 90.0], [50.0, 96.0]])
    for impl in IMPLS:

        def props(lg, dl, s, impl=impl):
            return proposals(lg, dl, anchors, s, pre_nms_top_k=50, post_nms_top_k=30, nms_impl=impl)

        xla = tf.function(props, jit_compile=True)(logits, deltas, size)
        ref = props(logits, deltas, size)
        np.testing.assert_array_equal(xla.valid.numpy(), ref.valid.numpy())
        np.testing.assert_allclose(xla.boxes.numpy(), ref.boxes.numpy(), atol=1e-4)
    rois = xla.boxes
    probs = tf.nn.softmax(tf.constant(rng.normal(size=(2, 30, 4)) * 2, tf.float32))
    dd = tf.constant(rng.normal(size=(2, 30, 3, 4)) * 0.2, tf.float32)
    for impl in IMPLS:

        def det(p, d, r, s, impl=impl):
            return detections(p, d, r, s, nms_impl=impl)

        got = tf.function(det, jit_compile=True)(probs, dd, rois, size)
        ref = det(probs, dd, rois, size)
        np.testing.assert_array_equal(got.classes.numpy(), ref.classes.numpy())
        np.testing.assert_allclose(got.boxes.numpy(), ref.boxes.numpy(), atol=1e-4)
