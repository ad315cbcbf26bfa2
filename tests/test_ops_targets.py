"""Tests of fpn_tf.ops.target_assigner (RPN labels and the Fast R-CNN RoI sampler)."""

import numpy as np
import tensorflow as tf

from anchor_testing import paper_anchors
from fpn_tf.ops import anchors as anchor_lib
from fpn_tf.ops import box_ops
from fpn_tf.ops import target_assigner as ta


# The config's values (RPNConfig, RoISamplerConfig, BoxHeadConfig), which the ops take explicitly.
RPN = dict(
    positive_iou=0.7,
    negative_iou=0.3,
    num_samples=256,
    positive_fraction=0.5,
    positive_iou_inclusive=False,
)
ROI = dict(
    num_samples=512, foreground_fraction=0.25, foreground_iou=0.5, box_weights=(10, 10, 5, 5)
)


def assign_rpn_targets(*args, **kwargs):
    return ta.assign_rpn_targets(*args, **{**RPN, **kwargs})


def sample_rois(*args, **kwargs):
    return ta.sample_rois(*args, **{**ROI, **kwargs})


def _batch(*xs):
    return [tf.constant(np.asarray(x)[None]) for x in xs]


# ----------------------------------------------------------------------------- RPN


def test_rpn_gt_matched_only_by_its_best_anchor():
    anchors = tf.constant(
        [
            [0, 0, 10, 20],  # IoU 0.5: the gt's best anchor -> positive
            [0, 0, 10, 25],  # IoU 0.4 -> ignored
            [0, 0, 10, 40],  # IoU 0.25 -> negative
            [100, 100, 110, 110],
        ],
        tf.float32,
    )  # IoU 0 -> negative
    gt = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], np.float32)
    iou = box_ops.pairwise_iou(anchors, gt).numpy()
    np.testing.assert_allclose(iou[:, 0], [0.5, 0.4, 0.25, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(iou[:, 1], 0.0)
    boxes, classes = _batch(gt, [3, -1])
    t = assign_rpn_targets(anchors, boxes, classes)
    np.testing.assert_array_equal(t.labels.numpy()[0], [1, -1, 0, 0])
    np.testing.assert_array_equal(t.matched_gt_indices.numpy()[0], [0, -1, -1, -1])
    decoded = box_ops.decode_boxes(t.box_targets[0, 0], anchors[0], (1, 1, 1, 1))
    np.testing.assert_allclose(decoded.numpy(), gt[0], atol=1e-4)
    np.testing.assert_array_equal(t.box_targets.numpy()[0, 1:], 0.0)


def test_rpn_hand_labels_thresholds_and_ties():
    anchors = tf.constant(
        [
            [0, 0, 10, 10],  # IoU 1.0 with gt 0 -> positive
            [0, 0, 10, 8],  # IoU 0.8 -> positive (> 0.7)
            [0, 0, 10, 5],  # IoU 0.5 -> ignored
            [0, 0, 10, 2],  # IoU 0.2 -> negative
            [50, 50, 60, 60],  # IoU 0.5 with gt 1 (its best, tied)
            [50, 55, 60, 65],  # IoU 0.5 with gt 1 (its best, tied)
            [200, 200, 210, 210],
        ],
        tf.float32,
    )  # negative
    gt = np.array([[0, 0, 10, 10], [50, 52.5, 60, 62.5]], np.float32)
    iou = box_ops.pairwise_iou(anchors, gt).numpy()
    np.testing.assert_allclose(iou[:, 0][:4], [1.0, 0.8, 0.5, 0.2], rtol=1e-6)
    np.testing.assert_allclose(iou[4:6, 1], [0.6, 0.6], rtol=1e-6)
    boxes, classes = _batch(gt, [1, 2])
    t = assign_rpn_targets(anchors, boxes, classes)
    np.testing.assert_array_equal(t.labels.numpy()[0], [1, 1, -1, 0, 1, 1, 0])
    np.testing.assert_array_equal(t.matched_gt_indices.numpy()[0], [0, 0, -1, -1, 1, 1, -1])


def test_rpn_crowd_never_positive_and_ignores_negatives_inside():
    anchors = tf.constant(
        [
            [0, 0, 100, 100],  # IoU 1 with the crowd box: not positive
            [10, 10, 20, 20],  # inside the crowd box: ignored (IoA 1)
            [90, 90, 110, 110],  # IoA 0.25: stays negative
            [300, 300, 310, 310],
        ],
        tf.float32,
    )
    gt = np.array([[0, 0, 100, 100], [0, 0, 0, 0]], np.float32)
    boxes, classes, crowd = _batch(gt, [1, -1], [True, False])
    t = assign_rpn_targets(anchors, boxes, classes, crowd)
    labels = t.labels.numpy()[0]
    assert not np.any(labels == 1)
    np.testing.assert_array_equal(labels, [-1, -1, 0, 0])
    # Without the crowd flag the same box is an ordinary positive.
    t = assign_rpn_targets(anchors, boxes, classes, tf.zeros_like(crowd))
    assert t.labels.numpy()[0, 0] == 1


def test_rpn_no_gt_gives_only_negatives_256_sampled():
    anchors, _ = anchor_lib.concat_anchors(paper_anchors((128, 160)))
    boxes = tf.zeros([2, 5, 4])
    classes = -tf.ones([2, 5], tf.int32)
    t = assign_rpn_targets(anchors, boxes, classes, tf.zeros([2, 5], tf.bool))
    labels = t.labels.numpy()
    assert labels.shape == (2, anchors.shape[0])
    for b in range(2):
        assert (labels[b] == 0).sum() == 256
        assert (labels[b] == 1).sum() == 0
        assert ((labels[b] == -1).sum()) == anchors.shape[0] - 256
    assert np.all(t.box_targets.numpy() == 0)
    assert np.all(t.matched_gt_indices.numpy() == -1)
    # Zero gt rows at all (N = 0) also works.
    t0 = assign_rpn_targets(anchors, tf.zeros([1, 0, 4]), tf.zeros([1, 0], tf.int32))
    assert (t0.labels.numpy() == 0).sum() == 256


def test_rpn_at_most_128_positives_and_random_batched_sampling():
    anchors, _ = anchor_lib.concat_anchors(paper_anchors((256, 256)))
    a = anchors.numpy()
    # gt = 40 anchors themselves (+ their near duplicates): far more than 128 positives.
    rng = np.random.default_rng(0)
    pick = rng.choice(a.shape[0], 40, replace=False)
    gt = np.stack([a[pick], a[pick][::-1]])  # 2 images
    classes = np.ones([2, 40], np.int32)
    t = assign_rpn_targets(anchors, tf.constant(gt), tf.constant(classes))
    labels = t.labels.numpy()
    full = assign_rpn_targets(anchors, tf.constant(gt), tf.constant(classes), num_samples=10**7)
    for b in range(2):
        assert (full.labels.numpy()[b] == 1).sum() > 128
        assert (labels[b] == 1).sum() == 128
        assert (labels[b] == 0).sum() == 128
        # Sampled positives are a subset of all positives.
        assert np.all(full.labels.numpy()[b][labels[b] == 1] == 1)
    # Targets decode back to the matched gt for every positive.
    pos = labels == 1
    idx = t.matched_gt_indices.numpy()
    dec = box_ops.decode_boxes(t.box_targets, anchors, (1, 1, 1, 1)).numpy()
    for b in range(2):
        np.testing.assert_allclose(dec[b][pos[b]], gt[b][idx[b][pos[b]]], atol=1e-3)


def test_rpn_stateless_seed():
    anchors, _ = anchor_lib.concat_anchors(paper_anchors((64, 64)))
    gt = tf.constant([[[8, 8, 40, 40], [0, 0, 0, 0]]], tf.float32)
    cls = tf.constant([[1, -1]])
    seed = tf.constant([3, 4])
    t1 = assign_rpn_targets(anchors, gt, cls, num_samples=32, seed=seed)
    t2 = assign_rpn_targets(anchors, gt, cls, num_samples=32, seed=seed)
    assert t1.labels.shape == (1, anchors.shape[0])
    np.testing.assert_array_equal(t1.labels.numpy(), t2.labels.numpy())
    assert (t1.labels.numpy() >= 0).sum() == 32


def test_rpn_xla():
    anchors, _ = anchor_lib.concat_anchors(paper_anchors((64, 96)))
    gt = tf.constant([[[8, 8, 40, 40], [10, 50, 60, 90], [0, 0, 0, 0]]] * 2, tf.float32)
    cls = tf.constant([[1, 2, -1]] * 2)
    crowd = tf.constant([[False, True, False]] * 2)
    f = tf.function(lambda *a: assign_rpn_targets(*a, seed=tf.constant([1, 2])), jit_compile=True)
    t = f(anchors, gt, cls, crowd)
    ref = assign_rpn_targets(anchors, gt, cls, crowd, num_samples=10**6)
    labels = t.labels.numpy()
    assert labels.shape == (2, anchors.shape[0])
    assert np.all(ref.labels.numpy()[labels == 1] == 1)
    assert np.all(ref.labels.numpy()[labels == 0] == 0)
    assert (labels >= 0).sum(axis=1).tolist() == [256, 256]


def test_rpn_positive_iou_inclusive_labels_an_anchor_at_exactly_the_threshold():
    """torchvision / detectron2 Matcher: positive iff IoU >= 0.7; ours: > 0.7. Negative is
    IoU < 0.3 in both (an anchor at exactly 0.3 is ignored)."""
    anchors = tf.constant(
        [
            [0, 0, 10, 10],  # IoU 1.0: the gt's best anchor, positive either way
            [0, 0, 10, 7],  # IoU 0.7 exactly (70 / 100)
            [0, 0, 10, 6],  # IoU 0.6 -> ignored
            [0, 0, 10, 3],  # IoU 0.3 exactly -> ignored (not < 0.3)
            [0, 0, 10, 2],  # IoU 0.2 -> negative
            [100, 100, 110, 110],  # IoU 0 -> negative
        ],
        tf.float32,
    )
    gt = np.array([[0, 0, 10, 10]], np.float32)
    iou = box_ops.pairwise_iou(anchors, gt).numpy()[:, 0]
    assert iou[1] == np.float32(0.7) and iou[3] == np.float32(0.3)
    boxes, classes = _batch(gt, [1])
    strict = assign_rpn_targets(anchors, boxes, classes)
    np.testing.assert_array_equal(strict.labels.numpy()[0], [1, -1, -1, -1, 0, 0])
    inclusive = assign_rpn_targets(anchors, boxes, classes, positive_iou_inclusive=True)
    np.testing.assert_array_equal(inclusive.labels.numpy()[0], [1, 1, -1, -1, 0, 0])
    np.testing.assert_array_equal(inclusive.matched_gt_indices.numpy()[0], [0, 0, -1, -1, -1, -1])
    decoded = box_ops.decode_boxes(inclusive.box_targets[0, 1], anchors[1], (1, 1, 1, 1))
    np.testing.assert_allclose(decoded.numpy(), gt[0], atol=1e-4)
    # The XLA path (no gt-column trimming) honours it too.
    f = tf.function(
        lambda *a: assign_rpn_targets(*a, positive_iou_inclusive=True), jit_compile=True
    )
    np.testing.assert_array_equal(
        f(anchors, boxes, classes).labels.numpy()[0], [1, 1, -1, -1, 0, 0]
    )


# ----------------------------------------------------------------------------- RoIs


def _random_boxes(rng, shape, lo=0, hi=500, min_size=8, max_size=200):
    yx = rng.uniform(lo, hi, shape + (2,))
    return np.concatenate([yx, yx + rng.uniform(min_size, max_size, shape + (2,))], -1).astype(
        np.float32
    )


def test_roi_sampler_fractions():
    rng = np.random.default_rng(0)
    gt = np.array([[100, 100, 300, 300], [50, 300, 250, 450], [0, 0, 0, 0]], np.float32)
    # 400 proposals jittered around the gt (foreground) + 1600 random (mostly background).
    jitter = gt[rng.integers(0, 2, 400)] + rng.uniform(-8, 8, (400, 4)).astype(np.float32)
    props = np.concatenate([jitter, _random_boxes(rng, (1600,))])[None]
    props = np.concatenate([props, props[:, ::-1]])  # 2 images
    gt = np.stack([gt, gt])
    classes = np.array([[4, 7, -1]] * 2, np.int32)
    r = sample_rois(tf.constant(props), tf.constant(gt), tf.constant(classes))
    assert r.rois.shape == (2, 512, 4)
    fg = r.foreground_mask.numpy()
    cls = r.class_targets.numpy()
    for b in range(2):
        assert fg[b].sum() == 128  # 25 % of 512
        assert r.valid_mask.numpy()[b].all()
        assert np.all(fg[b][:128]) and not np.any(fg[b][128:])  # foreground first
        assert set(cls[b][fg[b]]) <= {4, 7}
        assert np.all(cls[b][~fg[b]] == 0)
        iou = box_ops.pairwise_iou(r.rois[b], gt[b]).numpy().max(axis=1)
        assert np.all(iou[fg[b]] >= 0.5) and np.all(iou[~fg[b]] < 0.5)
    dec = box_ops.decode_boxes(r.box_targets, r.rois, (10, 10, 5, 5)).numpy()
    idx = r.matched_gt_indices.numpy()
    for b in range(2):
        np.testing.assert_allclose(dec[b][fg[b]], gt[b][idx[b][fg[b]]], atol=1e-2)
        assert np.all(r.box_targets.numpy()[b][~fg[b]] == 0)


def test_roi_sampler_includes_gt_as_foreground():
    rng = np.random.default_rng(1)
    gt = np.array([[[10, 10, 50, 50], [60, 60, 90, 120], [0, 0, 0, 0]]], np.float32)
    props = _random_boxes(rng, (1, 300), lo=300, hi=600)  # all far from the gt
    r = sample_rois(tf.constant(props), tf.constant(gt), tf.constant([[2, 5, -1]]))
    fg = r.foreground_mask.numpy()[0]
    assert fg.sum() == 2
    rois = r.rois.numpy()[0][fg]
    order = np.argsort(rois[:, 0])
    np.testing.assert_allclose(rois[order], gt[0, :2])
    assert sorted(r.class_targets.numpy()[0][fg].tolist()) == [2, 5]
    np.testing.assert_allclose(r.box_targets.numpy()[0][fg], 0.0, atol=1e-5)
    # 2 gt + 300 proposals = 302 candidates < 512: the remaining rows are padding.
    np.testing.assert_array_equal(r.valid_mask.numpy()[0], np.arange(512) < 302)
    np.testing.assert_array_equal(r.class_targets.numpy()[0][302:], -1)


def test_roi_sampler_padding_no_gt_and_validity():
    rng = np.random.default_rng(2)
    props = _random_boxes(rng, (2, 100))
    valid = np.ones([2, 100], bool)
    valid[1, 50:] = False
    gt = np.zeros([2, 4, 4], np.float32)
    cls = -np.ones([2, 4], np.int32)
    r = sample_rois(
        tf.constant(props), tf.constant(gt), tf.constant(cls), proposal_valid=tf.constant(valid)
    )
    assert r.rois.shape == (2, 512, 4)
    vm = r.valid_mask.numpy()
    np.testing.assert_array_equal(vm.sum(axis=1), [100, 50])
    assert not r.foreground_mask.numpy().any()
    cls_t = r.class_targets.numpy()
    assert np.all(cls_t[vm] == 0) and np.all(cls_t[~vm] == -1)
    assert np.all(r.rois.numpy()[~vm] == 0)
    assert np.all(vm[:, :50])  # sampled rows come first
    # The sampled rois of image 1 are exactly its 50 valid proposals.
    got = r.rois.numpy()[1][vm[1]]
    np.testing.assert_allclose(np.sort(got[:, 0]), np.sort(props[1, :50, 0]))


def test_roi_sampler_crowd_never_foreground():
    gt = np.array([[[0, 0, 200, 200], [300, 300, 400, 400]]], np.float32)
    crowd = np.array([[True, False]])
    props = np.array(
        [
            [
                [0, 0, 200, 200],  # equal to the crowd box: not fg, not bg (IoA 1)
                [10, 10, 50, 50],  # inside the crowd: dropped
                [150, 150, 250, 250],  # IoA 0.25: background
                [300, 300, 400, 390],
            ]
        ],
        np.float32,
    )  # fg for gt 1
    r = sample_rois(tf.constant(props), tf.constant(gt), tf.constant([[1, 2]]), tf.constant(crowd))
    vm = r.valid_mask.numpy()[0]
    fg = r.foreground_mask.numpy()[0]
    rois = r.rois.numpy()[0]
    assert vm.sum() == 3 and fg.sum() == 2  # gt 1 appended + proposal 3; proposal 2 bg
    assert np.all(r.class_targets.numpy()[0][fg] == 2)
    assert not any(np.allclose(x, [0, 0, 200, 200]) for x in rois[vm])
    assert not any(np.allclose(x, [10, 10, 50, 50]) for x in rois[vm])


def test_roi_sampler_xla():
    rng = np.random.default_rng(3)
    props = tf.constant(_random_boxes(rng, (2, 600)))
    gt = tf.constant(_random_boxes(rng, (2, 6)))
    cls = tf.constant([[1, 2, 3, -1, -1, -1], [3, 3, -1, -1, -1, -1]])
    f = tf.function(
        lambda p, g, c: sample_rois(p, g, c, seed=tf.constant([5, 6])), jit_compile=True
    )
    r = f(props, gt, cls)
    assert r.rois.shape == (2, 512, 4)
    assert r.valid_mask.numpy().all()
    assert np.all(r.foreground_mask.numpy().sum(axis=1) <= 128)
    assert np.all(r.foreground_mask.numpy().sum(axis=1) >= 2)
    u = sample_rois(props[:1], gt[:1], cls[:1], num_samples=64)
    assert u.rois.shape == (1, 64, 4) and u.class_targets.shape == (1, 64)


def test_rpn_targets_over_real_gt_columns_equal_all_columns():
    """Outside XLA the IoU runs over the real gt rows only (the padding rows are dropped, the
    real ones moved first): labels, targets and matched indices equal the all-columns result."""
    rng = np.random.default_rng(0)
    boxes = np.zeros((2, 12, 4), np.float32)
    classes = -np.ones((2, 12), np.int32)
    for b, rows in enumerate([(0, 1, 5), (2,)]):  # real rows not contiguous
        for r in rows:
            y, x = rng.uniform(0, 80, 2)
            boxes[b, r] = (y, x, y + rng.uniform(10, 40), x + rng.uniform(10, 40))
            classes[b, r] = 1
    anchors, _ = anchor_lib.concat_anchors(
        anchor_lib.generate_anchors(
            (128, 128), ("P3", "P4"), {"P3": (32,), "P4": (64,)}, (0.5, 1.0, 2.0), offset=0.5
        )
    )
    seed = tf.constant([3, 4])
    compact = assign_rpn_targets(anchors, boxes, classes, None, seed=seed)
    full = ta._assign_rpn_targets(  # pylint: disable=protected-access
        anchors,
        tf.constant(boxes),
        tf.constant(classes),
        tf.zeros((2, 12), tf.bool),
        **RPN,
        crowd_ioa_threshold=0.7,
        box_weights=(1.0, 1.0, 1.0, 1.0),
        seed=seed,
    )
    assert int(tf.reduce_sum(tf.cast(compact.labels == 1, tf.int32))) >= 4
    assert set(np.unique(compact.matched_gt_indices.numpy())) >= {0, 1, 5, 2}
    for field in compact._fields:
        np.testing.assert_array_equal(getattr(compact, field), getattr(full, field), err_msg=field)
