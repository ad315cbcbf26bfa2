"""Segment proposals (paper §6, Appendix A): the appendix's geometry, positives, sampling, loss
weight and NMS-free inference on hand cases; our earlier geometry (the ablation config) by hand,
crowd ignore, the losses against NumPy, a tiny model that learns, the call's outputs, mask AR
against hand values, and Mask R-CNN's masks as proposals on a stub."""

import math
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from pycocotools import mask as mask_utils

from fpn_tf.configs.experiment import ExperimentConfig, SegmentProposalConfig
from fpn_tf.evaluation.mask_recall import MaskProposalRecallEvaluator
from fpn_tf.modeling.factory import build_segment_proposal_model
from fpn_tf.modeling.segment_proposals import (
    SegmentProposalHead,
    mask_rcnn_segment_proposals,
)
from fpn_tf.ops import mask_ops, postprocess
from fpn_tf.ops.segment_windows import assign_segment_targets, window_geometry


def scale_group_of(longer_side: float, groups) -> int:
    """The group index an object of this longer side goes to (the rule in NumPy: nearest s in
    log space)."""
    logs = [abs(math.log(max(longer_side, 1e-3)) - math.log(g[2])) for g in groups]
    return int(np.argmin(logs))


# Our choices before Appendix A (configs/cpu_demo_segment_proposals_ours.yaml): objects of
# s = w x stride, masks over 1.75 s, positives within 0.22 s, NMS at 0.8.
OURS = dict(
    object_sizes=[20.0, 28.0],
    mask_box_scale=1.75,
    center_tolerance=0.22,
    center_tolerance_unit="object_size",
    batch_size_per_image=256,
    positive_fraction=0.5,
    nms_iou=0.8,
    objectness_loss_weight=1.0,
    mask_loss_weight=1.0,
)
PAPER = SegmentProposalConfig()


def map_sizes(size):
    return {f"P{lvl}": (-(-size // 2**lvl),) * 2 for lvl in range(2, 7)}


def ours_geometry(size=128):
    return window_geometry(map_sizes(size), (5, 7), 1.75, OURS["object_sizes"])


def paper_geometry(size=256):
    return window_geometry(
        map_sizes(size), PAPER.window_sizes, PAPER.mask_box_scale, PAPER.object_sizes
    )


def assign(windows, boxes, classes, crowd=None, bs=100000, frac=0.5, valid_hw=None, ours=True):
    return assign_segment_targets(
        windows,
        np.asarray(boxes, np.float32)[None],
        np.asarray(classes, np.int32)[None],
        None if crowd is None else np.asarray(crowd, bool)[None],
        valid_hw,
        center_tolerance=OURS["center_tolerance"] if ours else PAPER.center_tolerance,
        center_tolerance_unit=OURS["center_tolerance_unit"] if ours else "cells",
        crowd_ioa_threshold=0.7,
        num_samples=bs,
        positive_fraction=frac,
    )


def group_slice(windows, window_size, level):
    g = [i for i, (w, lvl, _) in enumerate(windows.groups) if (w, lvl) == (window_size, level)][0]
    start = sum(windows.group_sizes[:g])
    return g, slice(start, start + windows.group_sizes[g])


def gt_labels(boxes_per_image, size=128, n=4, crowd=None):
    """Ground truth of full-square objects (yxyx int boxes) as the data pipeline gives it."""
    b = len(boxes_per_image)
    boxes = np.zeros((b, n, 4), np.float32)
    classes = -np.ones((b, n), np.int32)
    full = np.zeros((b, n, size, size), np.float32)
    for i, objects in enumerate(boxes_per_image):
        for j, (y0, x0, y1, x1) in enumerate(objects):
            boxes[i, j] = (y0, x0, y1, x1)
            classes[i, j] = 1
            full[i, j, y0:y1, x0:x1] = 1
    masks = tf.stack([mask_ops.crop_masks(full[i], boxes[i], 112) for i in range(b)])
    return {
        "gt_boxes": boxes,
        "gt_classes": classes,
        "gt_is_crowd": np.zeros((b, n), bool) if crowd is None else np.asarray(crowd),
        "gt_masks": masks,
    }


# --- Appendix A: the paper's geometry, targets, sampling, loss weight and inference ------------


def test_defaults_are_appendix_a():
    c = SegmentProposalConfig()
    assert (c.hidden_dims, c.mask_size, c.window_sizes) == (512, 14, [5, 7])
    np.testing.assert_allclose(c.object_sizes, [32, 32 * np.sqrt(2)], rtol=1e-7)
    assert (c.mask_box_scale, c.center_tolerance, c.center_tolerance_unit) == (1.25, 1.0, "cells")
    assert (c.batch_size_per_image, c.positive_fraction) == (128, 0.25)  # 32 : 96 = 1 : 3
    assert (c.post_nms_top_k, c.nms_iou) == (1000, 1.0)  # the 1000 best, no NMS
    assert c.mask_loss_weight == 10 * c.objectness_loss_weight
    with pytest.raises(Exception, match="object_sizes.*one object size per window size"):
        ExperimentConfig.from_dict(
            {"model": {"segment_proposals": {"window_sizes": [5], "object_sizes": [32, 45]}}}
        ).validate()


def test_appendix_a_scales_and_mask_regions():
    w = paper_geometry()
    by_group = {(g[0], g[1]): g[2] for g in w.groups}
    np.testing.assert_allclose([by_group[5, f"P{k}"] for k in range(2, 7)], [32, 64, 128, 256, 512])
    np.testing.assert_allclose(
        [by_group[7, f"P{k}"] for k in range(2, 7)], np.sqrt(2) * np.array([32, 64, 128, 256, 512])
    )
    side = (w.mask_boxes[:, 2] - w.mask_boxes[:, 0]).numpy()
    gid = w.group_ids.numpy()
    for i, (ws, level, _) in enumerate(w.groups):  # 25 % padding: {40, ..., 640}, √2 for 7x7
        want = 40 * 2 ** (int(level[1]) - 2) * (np.sqrt(2) if ws == 7 else 1)
        np.testing.assert_allclose(side[gid == i], want, rtol=1e-6)


def _positives(w, box, ours=False):
    t = assign(w, [box], [1], ours=ours)
    labels = t.labels.numpy()[0]
    assert (labels[labels != 1] == 0).all()  # every other window negative (all sampled)
    return np.flatnonzero(labels == 1)


def test_object_of_128_px_goes_to_the_5x5_head_on_p4_with_a_160_px_mask_region():
    w = paper_geometry()
    box = [40, 56, 168, 184]  # 128 x 128, centre (104, 120): cell (6, 7) of P4
    assert w.groups[scale_group_of(128, w.groups)][:2] == (5, "P4")
    pos = _positives(w, box)
    _, sl = group_slice(w, 5, "P4")
    # ±1 cell (16 px) on both axes, inclusive: the 3 x 3 cells around (6, 7) of the 16 x 16 map.
    assert pos.tolist() == [sl.start + i * 16 + j for i in (5, 6, 7) for j in (6, 7, 8)]
    centre = sl.start + 6 * 16 + 7
    np.testing.assert_allclose(w.mask_boxes.numpy()[centre], [24, 40, 184, 200])  # 160 px
    # Its 14x14 mask target: the object covers the middle 128 / 160 of the region.
    lab = gt_labels([[box]], size=256)
    target = mask_ops.mask_targets(
        lab["gt_masks"], lab["gt_boxes"], w.mask_boxes.numpy()[centre][None, None], [[0]], 14
    ).numpy()[0, 0]
    want = np.zeros((14, 14))
    want[1:13, 1:13] = 1  # bin centres 24 + (k + 0.5) * 160 / 14 in [40, 168] for k = 1..12
    np.testing.assert_array_equal(target, want)


def test_object_of_181_px_goes_to_the_7x7_head_on_p4():
    w = paper_geometry(384)
    box = [14, 30, 195, 211]  # 181 x 181 (≈ 128√2), centre (104.5, 120.5)
    assert w.groups[scale_group_of(181, w.groups)][:2] == (7, "P4")
    pos = _positives(w, box)
    g, sl = group_slice(w, 7, "P4")
    assert len(pos) and (w.group_ids.numpy()[pos] == g).all()
    side = (w.mask_boxes[:, 2] - w.mask_boxes[:, 0]).numpy()[pos]
    np.testing.assert_allclose(side, 160 * np.sqrt(2), rtol=1e-6)  # 226 px
    # Centre half a pixel off the grid: on y the cell centres 104 and 120 (i = 6, 7) are within
    # 16 px of 104.5, 88 is 16.5 px away; on x 120 and 136 (j = 7, 8) of 120.5. P4 is 24 x 24.
    want = [sl.start + i * 24 + j for i in (6, 7) for j in (7, 8)]
    assert pos.tolist() == want
    # Nearest in log space: the boundary is √(128 x 128√2) = 152.2 px.
    assert w.groups[scale_group_of(152, w.groups)][:2] == (5, "P4")
    assert w.groups[scale_group_of(153, w.groups)][:2] == (7, "P4")


def test_positives_are_exactly_the_windows_within_one_cell():
    w = paper_geometry()
    centers, gid = w.centers.numpy(), w.group_ids.numpy()
    rng = np.random.default_rng(0)
    for _ in range(6):
        side = float(rng.uniform(24, 400))
        cy, cx = rng.uniform(60, 200, 2)
        box = [cy - side / 2, cx - side / 3, cy + side / 2, cx + side / 3]
        g = scale_group_of(side, w.groups)
        stride = 2 ** int(w.groups[g][1][1])
        within = np.all(np.abs(centers - np.float32([cy, cx])) <= stride, axis=1)
        want = np.flatnonzero(within & (gid == g))
        assert len(want) >= 4
        np.testing.assert_array_equal(_positives(w, box), want)


def test_sampling_is_128_windows_at_1_to_3_and_the_mask_loss_weighs_10x():
    keras.utils.set_random_seed(2)
    head = SegmentProposalHead(SegmentProposalConfig(hidden_dims=8))
    feats = {
        f"P{lvl}": tf.random.normal([2, s, s, 4]) for lvl, s in zip(range(2, 7), (32, 16, 8, 4, 2))
    }
    head.build({k: v.shape for k, v in feats.items()})
    for w in (5, 7):  # logits far from 0, so that the losses depend on the targets
        for layer in (head.mlp(w).hidden, head.mlp(w).mask, head.mlp(w).objectness):
            layer.kernel.assign(tf.random.normal(layer.kernel.shape, stddev=0.5))
    # 32-px objects (5x5 on P2) centred on cell centres: 9 positives each, 45 per image.
    objects = [[(2 + 16 * i, 2 + 20 * i, 34 + 16 * i, 34 + 20 * i) for i in range(5)]] * 2
    labels = gt_labels(objects, size=128, n=5)
    valid_hw = np.full((2, 2), 128.0, np.float32)
    logits, hidden = head.head_outputs(feats)
    windows = head.windows(feats)
    tgt = head.assign_targets(windows, labels, valid_hw)
    lab, matched = tgt.labels.numpy(), tgt.matched_gt_indices.numpy()
    assert ((matched >= 0).sum(1) == 45).all()
    np.testing.assert_array_equal((lab == 1).sum(1), [32, 32])  # 128 x 0.25
    np.testing.assert_array_equal((lab == 0).sum(1), [96, 96])  # 1 : 3
    losses = head.compute_loss(logits, hidden, windows, tgt, labels)
    z = logits.numpy().astype(np.float64)
    want_score = (_bce(z, lab == 1) * (lab >= 0)).sum() / (2 * 128)
    per_window = []
    gid = windows.group_ids.numpy()
    for b, r in zip(*np.nonzero(lab == 1)):  # masks of the sampled positives only
        mlp = head.mlp(windows.groups[gid[r]][0])
        mz = hidden.numpy()[b, r] @ mlp.mask.kernel.numpy()[0, 0] + mlp.mask.bias.numpy()
        y = _np_square_target(windows.mask_boxes.numpy()[r], labels["gt_boxes"][b, matched[b, r]])
        per_window.append(_bce(mz.reshape(14, 14), y).mean())
    assert len(per_window) == 64
    np.testing.assert_allclose(losses["segment_objectness_loss"], want_score, rtol=1e-5)
    np.testing.assert_allclose(losses["segment_mask_loss"], 10 * np.mean(per_window), rtol=1e-5)


def test_inference_without_nms_returns_the_1000_best_windows():
    keras.utils.set_random_seed(3)
    model = tiny_model()  # the paper's inference: nms_iou 1, post_nms_top_k 1000
    features, _, _ = synthetic_batch()
    images = tf.constant(features["images"])
    out = model({"images": images, "image_info": tf.constant(features["image_info"])})
    pyramid = model.fpn(images)
    logits, hidden = model.head.head_outputs(pyramid)
    windows = model.head.windows(pyramid)
    assert logits.shape[1] == 2 * (32 * 32 + 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2)  # 2728 windows
    np.testing.assert_array_equal(out["num_proposals"], [1000, 1000])
    for i in range(2):
        order = np.argsort(-logits.numpy()[i], kind="stable")[:1000]
        np.testing.assert_allclose(
            out["proposal_scores"].numpy()[i], tf.sigmoid(logits[i]).numpy()[order], rtol=1e-6
        )
        np.testing.assert_allclose(
            out["proposal_boxes"].numpy()[i], windows.mask_boxes.numpy()[order], atol=1e-4
        )
        want_masks = tf.sigmoid(model.head.mask_logits(hidden[i : i + 1], order[None], windows))
        np.testing.assert_allclose(out["proposal_masks"][i], want_masks[0], atol=1e-5)
        # No suppression: heavily overlapping windows (neighbours on a level) are both kept.
        b = out["proposal_boxes"].numpy()[i]
        iou = postprocess.box_ops.pairwise_iou(b, b).numpy() - np.eye(len(b))
        assert iou.max() > 0.8


# --- our earlier geometry (the ablation config), targets ---------------------------------------


def test_window_geometry_canonical_sizes_interleave_in_half_octaves():
    w = ours_geometry()
    sizes = sorted(g[2] for g in w.groups)
    assert sizes == [20, 28, 40, 56, 80, 112, 160, 224, 320, 448]
    assert len(w.centers) == 2 * (32 * 32 + 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2)
    g, sl = group_slice(w, 5, "P3")
    # Cell (5, 6) of P3: centre (44, 52), mask box side 1.75 * 40 = 70.
    r = sl.start + 5 * 16 + 6
    np.testing.assert_allclose(w.centers[r], [44, 52])
    np.testing.assert_allclose(w.mask_boxes[r], [9, 17, 79, 87])
    assert int(w.group_ids[r]) == g and float(w.canonical_sizes[r]) == 40


def test_object_of_side_40_goes_to_p3_5x5_at_the_expected_cells_with_the_expected_mask():
    w = ours_geometry()
    box = [30, 30, 70, 70]  # longer side 40, centred at (50, 50)
    assert w.groups[scale_group_of(40, w.groups)][:2] == (5, "P3")
    t = assign(w, [box, [0, 0, 0, 0]], [1, -1])
    labels = t.labels.numpy()[0]
    g, sl = group_slice(w, 5, "P3")
    positives = np.flatnonzero(labels == 1)
    # Centres (i + 0.5) * 8 within 0.22 * 40 = 8.8 px of 50: i in {5, 6} on both axes.
    expected = [sl.start + i * 16 + j for i in (5, 6) for j in (5, 6)]
    assert positives.tolist() == expected
    assert (t.matched_gt_indices.numpy()[0][expected] == 0).all()
    assert (labels[labels != 1] == 0).all()  # everything else negative (all sampled)
    # Mask target over window (5, 5)'s mask box [9, 9, 79, 79]: 5-px cells, samples at
    # 11.5 + 5k; inside [30, 70] for k = 4..11.
    lab = gt_labels([[box]])
    target = mask_ops.mask_targets(
        lab["gt_masks"], lab["gt_boxes"], w.mask_boxes.numpy()[expected[0]][None, None], [[0]], 14
    ).numpy()[0, 0]
    want = np.zeros((14, 14))
    want[4:12, 4:12] = 1
    np.testing.assert_array_equal(target, want)


def test_scale_groups_clamp_and_nearest_centre_wins():
    w = ours_geometry()
    assert w.groups[scale_group_of(6, w.groups)][:2] == (5, "P2")  # clamped, not dropped
    assert w.groups[scale_group_of(1000, w.groups)][:2] == (7, "P6")
    assert w.groups[scale_group_of(56, w.groups)][:2] == (7, "P3")
    # Nearest in log scale, not linearly: 33.8 px is above sqrt(28 * 40) = 33.47 (-> 40 px) but
    # below (28 + 40) / 2 = 34 (-> 28 px).
    t = assign(w, [[30, 30, 63.8, 63.8]], [1])
    groups = w.group_ids.numpy()[t.labels.numpy()[0] == 1]
    assert len(groups) and {w.groups[g][:2] for g in groups} == {(5, "P3")}
    # Two side-40 objects 8 px apart: the shared window column goes to the nearer centre.
    t = assign(w, [[30, 30, 70, 70], [30, 38, 70, 78]], [1, 1])
    _, sl = group_slice(w, 5, "P3")
    m = t.matched_gt_indices.numpy()[0][sl].reshape(16, 16)
    assert m[5, 5] == 0 and m[5, 7] == 1  # centres x 44 -> gt 0 (x 50); 60 -> gt 1 (x 58)
    assert m[5, 6] == 0  # x 52: 2 px from gt 0, 6 px from gt 1


def test_windows_mostly_inside_a_crowd_box_are_ignored_but_positives_stay():
    w = ours_geometry()
    crowd_box = [0, 0, 80, 80]
    t = assign(w, [crowd_box, [30, 30, 70, 70]], [1, 1], crowd=[True, False])
    labels = t.labels.numpy()[0]
    mb = w.mask_boxes.numpy()
    inter = np.prod(np.clip(np.minimum(mb[:, 2:], 80) - np.maximum(mb[:, :2], 0), 0, None), -1)
    ioa = inter / np.prod(mb[:, 2:] - mb[:, :2], -1)
    inside = ioa > 0.7
    assert inside.sum() > 50
    positive = labels == 1
    assert positive.sum() == 4 and (positive & inside).sum() > 0  # some positives in the crowd
    np.testing.assert_array_equal(labels[inside & ~positive], -1)
    np.testing.assert_array_equal(labels[~inside & ~positive], 0)
    assert (t.matched_gt_indices.numpy()[0][positive] == 1).all()  # never the crowd row


def test_sampling_respects_the_budget_and_windows_in_the_padding_are_ignored():
    w = ours_geometry()
    t = assign(w, [[30, 30, 70, 70]], [1], bs=16, frac=0.125, valid_hw=np.array([[96.0, 128.0]]))
    labels = t.labels.numpy()[0]
    assert (labels == 1).sum() == 2 and (labels == 0).sum() == 14
    assert (labels[w.centers.numpy()[:, 0] >= 96] == -1).all()


def _np_square_target(mask_box, gt_box, m=14):
    """Target of a full-square object: 1 where the bin's sample point is inside the object."""
    y0, x0, y1, x1 = mask_box
    ys = y0 + (np.arange(m) + 0.5) * (y1 - y0) / m
    xs = x0 + (np.arange(m) + 0.5) * (x1 - x0) / m
    iny = (ys >= gt_box[0]) & (ys <= gt_box[2])
    inx = (xs >= gt_box[1]) & (xs <= gt_box[3])
    return (iny[:, None] & inx[None, :]).astype(np.float64)


def _bce(z, y):
    return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


def test_losses_match_numpy_on_a_hand_case():
    keras.utils.set_random_seed(1)
    # Our earlier geometry (its mask targets are exact on these squares), the paper's weights.
    geometry = {k: OURS[k] for k in ("object_sizes", "mask_box_scale", "center_tolerance")}
    cfg = SegmentProposalConfig(
        hidden_dims=8,
        batch_size_per_image=2000,
        positive_fraction=0.5,
        center_tolerance_unit="object_size",
        **geometry,
    )
    head = SegmentProposalHead(cfg)
    feats = {
        f"P{lvl}": tf.random.normal([2, s, s, 4]) for lvl, s in zip(range(2, 7), (16, 8, 4, 2, 1))
    }
    head.build({k: v.shape for k, v in feats.items()})
    for w in (5, 7):  # logits far from 0, so that the losses depend on the targets
        for layer in (head.mlp(w).hidden, head.mlp(w).mask, head.mlp(w).objectness):
            layer.kernel.assign(tf.random.normal(layer.kernel.shape, stddev=0.5))
            layer.bias.assign(tf.random.normal(layer.bias.shape))
    objects = [[(10, 12, 34, 30)], [(20, 20, 40, 40), (2, 40, 14, 60)]]
    labels = gt_labels(objects, size=64)
    valid_hw = np.full((2, 2), 64.0, np.float32)
    _, losses = head(feats, valid_hw, labels=labels)
    logits, hidden = head.head_outputs(feats)
    windows = head.windows(feats)
    tgt = head.assign_targets(windows, labels, valid_hw)  # all windows sampled: deterministic
    lab, matched = tgt.labels.numpy(), tgt.matched_gt_indices.numpy()
    assert (lab >= 0).all() and (lab == 1).sum() >= 6
    z = logits.numpy().astype(np.float64)
    want_obj = _bce(z, (lab == 1)).sum() / (2 * 2000)
    per_window = []
    gid = windows.group_ids.numpy()
    for b, r in zip(*np.nonzero(lab == 1)):
        mlp = head.mlp(windows.groups[gid[r]][0])
        k = mlp.mask.kernel.numpy()[0, 0]
        mz = hidden.numpy()[b, r] @ k + mlp.mask.bias.numpy()
        y = _np_square_target(windows.mask_boxes.numpy()[r], labels["gt_boxes"][b, matched[b, r]])
        per_window.append(_bce(mz.reshape(14, 14), y).mean())
    np.testing.assert_allclose(losses["segment_objectness_loss"], want_obj, rtol=1e-5)
    np.testing.assert_allclose(losses["segment_mask_loss"], 10 * np.mean(per_window), rtol=1e-5)


# --- the model ------------------------------------------------------------------------------


def tiny_model(**segment):
    m = ExperimentConfig().model
    m.backbone.type, m.backbone.weights = "small_resnet", None
    m.backbone.widths, m.backbone.stem_width, m.backbone.freeze_bn = [8, 16, 16, 32], 8, False
    m.fpn.num_channels = 16
    m.segment_proposals.hidden_dims = 32
    for k, v in segment.items():
        setattr(m.segment_proposals, k, v)
    return build_segment_proposal_model(m)


def synthetic_batch(size=128):
    """Two images: a square and a disc on one, two squares on the other, with masks."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 60, (2, size, size, 3)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    shapes = [
        [("square", (20, 20, 60, 60)), ("disc", (70, 60, 118, 108))],
        [("square", (10, 70, 34, 94)), ("square", (50, 10, 114, 74))],
    ]
    n = 3
    boxes, classes = np.zeros((2, n, 4), np.float32), -np.ones((2, n), np.int32)
    full = np.zeros((2, n, size, size), np.float32)
    for i, objs in enumerate(shapes):
        for j, (kind, (y0, x0, y1, x1)) in enumerate(objs):
            if kind == "square":
                m = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
            else:
                cy, cx, r = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2
                m = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r
            full[i, j] = m
            images[i][m] = (200, 120 + 60 * j, 40)
            boxes[i, j], classes[i, j] = (y0, x0, y1, x1), 1
    masks = tf.stack([mask_ops.crop_masks(full[i], boxes[i], 112) for i in range(2)])
    info = np.tile(np.array([[size, size], [size, size], [1, 1], [0, 0]], np.float32), (2, 1, 1))
    features = {"images": images, "image_info": info, "image_id": np.array([1, 2])}
    labels = {
        "gt_boxes": boxes,
        "gt_classes": classes,
        "gt_is_crowd": np.zeros((2, n), bool),
        "gt_masks": masks,
    }
    return features, labels, full


@pytest.mark.slow
def test_a_tiny_model_learns_both_losses():
    keras.utils.set_random_seed(0)
    start = time.time()
    model = tiny_model(batch_size_per_image=64)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    features, labels, _ = synthetic_batch()
    features = {k: tf.constant(v) for k, v in features.items()}
    step = tf.function(lambda: model.train_step((features, labels)))
    history = [step() for _ in range(40)]
    obj = [float(h["segment_objectness_loss"][0]) for h in history]
    mask = [float(h["segment_mask_loss"][0]) for h in history]
    first, last = np.mean(obj[:3]), np.mean(obj[-5:])
    mfirst, mlast = np.mean(mask[:3]), np.mean(mask[-5:])
    print(f"objectness {first:.3f} -> {last:.3f}, mask {mfirst:.3f} -> {mlast:.3f}, "
          f"{time.time() - start:.1f} s")  # fmt: skip
    assert last < 0.5 * first
    assert mlast < 0.6 * mfirst


def test_call_outputs_static_shapes_ranges_frames_and_nms():
    keras.utils.set_random_seed(0)
    model = tiny_model(**{**OURS, "post_nms_top_k": 3000, "nms_iou": 0.6})
    features, _, _ = synthetic_batch()
    info = features["image_info"].copy()
    info[:, 0] = (256, 256)
    info[:, 2] = (0.5, 0.5)
    fn = tf.function(lambda x: model(x))
    out = fn({"images": tf.constant(features["images"]), "image_info": tf.constant(info)})
    assert out["proposal_boxes"].shape == (2, 3000, 4)
    assert out["proposal_scores"].shape == (2, 3000)
    assert out["proposal_masks"].shape == (2, 3000, 14, 14)
    num = out["num_proposals"].numpy()
    assert (num > 0).all() and (num < 3000).all()  # 2728 windows, NMS removes some
    scores, masks = out["proposal_scores"].numpy(), out["proposal_masks"].numpy()
    boxes = out["proposal_boxes"].numpy()
    for i in range(2):
        s = scores[i, : num[i]]
        assert ((s > 0) & (s < 1)).all() and (np.diff(s) <= 1e-7).all()
        assert (scores[i, num[i] :] == 0).all() and (masks[i, num[i] :] == 0).all()
        assert ((masks[i] >= 0) & (masks[i] <= 1)).all()
        b = boxes[i, : num[i]] * 0.5  # back to input pixels: mask boxes of the geometry
        side = b[:, 2] - b[:, 0]
        assert np.isin(np.round(side, 3), [1.75 * s for s in (20, 28, 40, 56, 80, 112, 160,
                                                               224, 320, 448)]).all()  # fmt: skip
        iou = postprocess.box_ops.pairwise_iou(b, b).numpy() - np.eye(len(b))
        assert iou.max() <= 0.6 + 1e-6
    only5 = model({"images": features["images"]}, window_sizes=[5])
    b5 = only5["proposal_boxes"].numpy()[0, : int(only5["num_proposals"][0])]
    assert np.isin(np.round(b5[:, 2] - b5[:, 0], 3), [35, 70, 140, 280, 560]).all()
    # Serialisation round trip keeps the outputs.
    clone = model.__class__.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    again = clone({"images": features["images"]})
    ref = model({"images": features["images"]})
    np.testing.assert_allclose(again["proposal_scores"], ref["proposal_scores"], atol=1e-6)


# --- mask average recall ------------------------------------------------------------------


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def coco_squares(objects, size=(100, 120)):
    """A COCO dataset of full squares: objects = {image_id: [(y0, x0, y1, x1, iscrowd)]}."""
    images, anns = [], []
    for image_id, objs in objects.items():
        images.append({"id": image_id, "height": size[0], "width": size[1]})
        for y0, x0, y1, x1, crowd in objs:
            m = np.zeros(size, np.uint8)
            m[y0:y1, x0:x1] = 1
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": 3 + len(anns) % 2,  # two classes: recall is class-agnostic
                    "segmentation": _rle(m),
                    "area": float(m.sum()),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": crowd,
                }
            )
    categories = [{"id": 3, "name": "c"}, {"id": 4, "name": "d"}]
    return {"images": images, "annotations": anns, "categories": categories}


def square_proposals(boxes, scores=None, pad_to=None):
    """Full 14x14 masks over each integer box grown by 0.25 px: pasted, exactly the box's
    pixels (over the box itself the 4 corner pixels fall below 0.5: the paste's bilinear
    fall-off, `mask_ops`)."""
    k = pad_to or len(boxes)
    out_boxes = np.zeros((k, 4), np.float32)
    out_boxes[: len(boxes)] = np.asarray(boxes, np.float32).reshape(-1, 4) + [
        -0.25,
        -0.25,
        0.25,
        0.25,
    ]
    masks = np.zeros((k, 14, 14), np.float32)
    masks[: len(boxes)] = 1.0
    s = np.zeros((k,), np.float32)
    s[: len(boxes)] = scores if scores is not None else np.linspace(0.9, 0.5, len(boxes))
    return masks, out_boxes, s


def test_full_masks_paste_to_exactly_their_box():
    masks, boxes, _ = square_proposals([(10, 20, 50, 60)])
    pasted = mask_ops.paste_masks(masks, boxes, (100, 120)).numpy()[0] >= 0.5
    want = np.zeros((100, 120), bool)
    want[10:50, 20:60] = True
    np.testing.assert_array_equal(pasted, want)
    exact = mask_ops.paste_masks(masks, [[10, 20, 50, 60]], (100, 120)).numpy()[0] >= 0.5
    assert (exact != want).sum() == 4 and not exact[10, 20]


def test_mask_recall_perfect_shifted_missed_crowd_and_limits():
    objects = {
        1: [(10, 20, 50, 60, 0), (60, 10, 75, 25, 0)],  # 40x40 (medium) and 15x15 (small)
        2: [(0, 0, 100, 110, 0), (20, 20, 60, 60, 1)],  # 100x110 (large) and a crowd
    }
    gt = coco_squares(objects)
    perfect = {1: [(10, 20, 50, 60), (60, 10, 75, 25)], 2: [(0, 0, 100, 110)]}

    def run(proposals, **kw):
        ev = MaskProposalRecallEvaluator(gt, **kw)
        for image_id, boxes in proposals.items():
            m, b, s = square_proposals(boxes, pad_to=12)
            ev.update_state(
                {
                    "image_id": [image_id],
                    "proposal_masks": m[None],
                    "proposal_boxes": b[None],
                    "proposal_scores": s[None],
                    "num_proposals": [len(boxes)],
                }
            )
        return ev.evaluate()

    m = run(perfect)
    assert m == {
        "mask_AR@10": 1.0,
        "mask_AR@100": 1.0,
        "mask_AR@1000": 1.0,
        "mask_ARs@1000": 1.0,
        "mask_ARm@1000": 1.0,
        "mask_ARl@1000": 1.0,
    }
    # The 40x40 square shifted 4 px right: IoU 36*40 / (2*1600 - 1440) = 0.818, a hit at
    # 0.50..0.80 (7 of 10 thresholds): its recall 0.7, the average over 3 objects 2.7 / 3.
    shifted = {1: [(10, 24, 50, 64), (60, 10, 75, 25)], 2: [(0, 0, 100, 110)]}
    m = run(shifted)
    assert m["mask_AR@1000"] == pytest.approx(2.7 / 3, abs=1e-9)
    assert m["mask_ARm@1000"] == pytest.approx(0.7, abs=1e-9)
    assert m["mask_ARs@1000"] == 1.0 and m["mask_ARl@1000"] == 1.0
    # The small object missed: recall 2/3; AR_s 0. A proposal on the crowd changes nothing.
    missed = {1: [(10, 20, 50, 60)], 2: [(20, 20, 60, 60), (0, 0, 100, 110)]}
    m = run(missed)
    assert m["mask_AR@1000"] == pytest.approx(2 / 3, abs=1e-9)
    assert m["mask_ARs@1000"] == 0.0 and m["mask_ARl@1000"] == 1.0
    # Limits: the small object's proposal ranked 11th of image 1 counts at 100, not at 10.
    decoys = [(0, 90 + i, 5, 95 + i) for i in range(9)]
    late = {1: [(10, 20, 50, 60)] + decoys + [(60, 10, 75, 25)], 2: [(0, 0, 100, 110)]}
    m = run(late)
    assert m["mask_AR@10"] == pytest.approx(2 / 3, abs=1e-9) and m["mask_AR@100"] == 1.0
    # The best-scored proposals are kept when there are more than the largest limit.
    ev = MaskProposalRecallEvaluator(gt, limits=(1, 2))
    m, b, _ = square_proposals([(0, 90, 5, 95), (0, 0, 100, 110), (0, 91, 5, 96)])
    ev.add_proposals(2, m, b, [0.1, 0.9, 0.2])
    assert ev.evaluate()["mask_AR@1"] == 1.0
    # Only the images fed count: image 2 alone.
    m = run({2: [(0, 0, 100, 110)]})
    assert m["mask_AR@1000"] == 1.0 and m["mask_ARs@1000"] == -1.0


def test_mask_recall_needs_the_image_size_in_the_ground_truth():
    gt = coco_squares({1: [(10, 20, 50, 60, 0)], 2: []})
    del gt["images"][1]["height"], gt["images"][1]["width"]
    m, b, s = square_proposals([(10, 20, 50, 60)])
    ev = MaskProposalRecallEvaluator(gt)
    with pytest.raises(ValueError, match="image 2: no height/width"):
        ev.add_proposals(2, m, b, s)
    ev.add_proposals(1, m, b, s)
    assert ev.evaluate()["mask_AR@1000"] == 1.0


def test_mask_recall_equals_cocoeval_on_random_proposals():
    """The evaluator's numbers are COCOeval's (segm, useCats=0) on the same pasted masks."""
    from pycocotools.cocoeval import COCOeval

    from fpn_tf.evaluation.coco_evaluator import load_coco_groundtruth

    rng = np.random.default_rng(3)
    objects = {1: [(10, 20, 50, 60, 0), (60, 10, 75, 25, 0)], 2: [(5, 5, 95, 100, 0)]}
    gt = coco_squares(objects)
    ev = MaskProposalRecallEvaluator(gt, limits=(1, 3, 20))
    results = []
    for image_id, objs in objects.items():
        y0 = rng.uniform(0, 60, 20)
        x0 = rng.uniform(0, 70, 20)
        boxes = np.stack([y0, x0, y0 + rng.uniform(8, 60, 20), x0 + rng.uniform(8, 60, 20)], 1)
        for o in objs:  # a few near hits
            boxes[rng.integers(20)] = np.array(o[:4]) + rng.uniform(-4, 4, 4)
        masks = rng.uniform(0.2, 1.0, (20, 14, 14)).astype(np.float32)
        scores = rng.uniform(0.1, 1, 20).astype(np.float32)
        ev.add_proposals(image_id, masks, boxes, scores)
        pasted = mask_ops.paste_masks(masks, boxes.astype(np.float32), (100, 120)).numpy()
        for p, s in zip(pasted, scores):
            results.append({"image_id": image_id, "category_id": 3,
                            "segmentation": _rle(p >= 0.5), "score": float(s)})  # fmt: skip
    coco = load_coco_groundtruth(gt)
    dt = coco.loadRes(results)
    ce = COCOeval(coco, dt, iouType="segm")
    ce.params.useCats, ce.params.maxDets = 0, [1, 3, 20]
    ce.evaluate()
    ce.accumulate()
    got = ev.evaluate()
    for m, limit in enumerate((1, 3, 20)):
        assert got[f"mask_AR@{limit}"] == pytest.approx(
            float(np.mean(ce.eval["recall"][:, 0, 0, m]))
        )
    assert 0 < got["mask_AR@20"] < 1


# --- Mask R-CNN's masks as segment proposals ------------------------------------------------


class _StubMaskRCNN:
    """The Mask R-CNN contract: fpn, rpn, roi_heads.box_outputs / class_probabilities,
    roi_heads.predict_masks; mask value = class / 10 so the chosen class shows in the output."""

    def __init__(self, boxes, scores, logits):
        self.boxes, self.scores, self.logits = boxes, scores, logits
        self.seen = {}
        stub = self

        class Heads:
            def box_outputs(self, features, rois):
                stub.seen["rois"] = rois
                r = int(rois.shape[1])  # one row per RoI
                logits = np.pad(stub.logits, [[0, 0], [0, max(r - 4, 0)], [0, 0]])[:, :r]
                return tf.constant(logits), tf.zeros(tf.shape(rois))

            def class_probabilities(self, logits):
                return tf.nn.softmax(logits, -1)

            def predict_masks(self, features, detections):
                stub.seen["detections"] = detections
                c = tf.cast(detections.classes, tf.float32)[..., None, None] / 10.0
                return tf.ones([1, detections.boxes.shape[1], 28, 28]) * c

        self.roi_heads = Heads()

    def fpn(self, images, training=False):
        self.seen["images"] = images
        return {"P2": tf.zeros([1, 4, 4, 2])}

    def rpn(self, pyramid, valid_hw, training=False):
        self.seen["valid_hw"] = valid_hw
        valid = tf.constant(self.scores) > 0
        return postprocess.Proposals(tf.constant(self.boxes), tf.constant(self.scores), valid), {}


def test_mask_rcnn_adapter_on_a_stub():
    boxes = np.array([[[0, 0, 10, 10], [5, 5, 20, 30], [1, 2, 3, 4], [0, 0, 0, 0]]], np.float32)
    scores = np.array([[0.9, 0.8, 0.3, 0.0]], np.float32)  # RPN order, last row padding
    logits = np.array([[[5, 0, 1, 0], [0, 2, 0, 3], [9, 1, 2, 0], [0, 0, 0, 0]]], np.float32)
    stub = _StubMaskRCNN(boxes, scores, logits)
    info = np.array([[[200, 200], [100, 100], [0.5, 0.5], [0, 0]]], np.float32)
    out = mask_rcnn_segment_proposals(
        stub, {"images": np.zeros((1, 64, 64, 3)), "image_info": info}, top_k=6
    )
    assert out["proposal_boxes"].shape == (1, 6, 4) and out["proposal_masks"].shape == (
        1,
        6,
        28,
        28,
    )
    np.testing.assert_allclose(out["proposal_boxes"][0, :3], boxes[0, :3] / 0.5)
    np.testing.assert_allclose(out["proposal_scores"][0], [0.9, 0.8, 0.3, 0, 0, 0])
    assert int(out["num_proposals"][0]) == 3
    # The most probable foreground class, never the background (row 0 wins for proposal 0, 2).
    np.testing.assert_allclose(out["proposal_masks"][0, :, 0, 0], [0.2, 0.3, 0.2, 0, 0, 0])
    np.testing.assert_allclose(stub.seen["valid_hw"], [[100, 100]])
    np.testing.assert_array_equal(stub.seen["detections"].num_detections, [3])
    np.testing.assert_allclose(stub.seen["detections"].boxes[0, :3], boxes[0, :3])
    out2 = mask_rcnn_segment_proposals(stub, np.zeros((1, 64, 64, 3), np.float32), top_k=2)
    assert out2["proposal_boxes"].shape == (1, 2, 4)
    np.testing.assert_allclose(out2["proposal_boxes"][0], boxes[0, :2])  # input pixels
