"""COCO segm AP beside bbox AP: box-relative masks pasted, RLE-encoded and scored by pycocotools."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from fpn_tf.evaluation.coco_evaluator import COCOEvaluator, encode_masks
from fpn_tf.ops import mask_ops

H, W = 120, 160


def _disc(cy, cx, r):
    yy, xx = np.mgrid[0:H, 0:W]
    return (((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2) <= r * r).astype(np.uint8)


def _ring(cy, cx, r):
    return _disc(cy, cx, r) - _disc(cy, cx, r * 0.5)


def _annotation(ann_id, mask, category_id):
    ys, xs = np.nonzero(mask)
    x0, y0 = float(xs.min()), float(ys.min())
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()
    return {
        "id": ann_id,
        "image_id": 1,
        "category_id": category_id,
        "bbox": [x0, y0, float(xs.max() + 1) - x0, float(ys.max() + 1) - y0],
        "area": float(mask.sum()),
        "iscrowd": 0,
        "segmentation": rle,
    }


def _groundtruth(masks):
    return {
        "images": [{"id": 1, "height": H, "width": W, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "disc"}, {"id": 9, "name": "ring"}],
        "annotations": [_annotation(i + 1, m, c) for i, (m, c) in enumerate(masks)],
    }


def _box_of(mask):
    ys, xs = np.nonzero(mask)
    return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float32)


def _predictions(masks_and_classes, box_masks=None):
    boxes = np.stack([_box_of(m) for m, _ in masks_and_classes])
    full = np.stack([m for m, _ in masks_and_classes])
    relative = mask_ops.crop_masks(full, boxes, 28).numpy() if box_masks is None else box_masks
    n = len(boxes)
    return {
        "image_id": np.array([1]),
        "detection_boxes": boxes[None],
        "detection_scores": np.linspace(0.9, 0.8, n)[None],
        "detection_classes": np.array([[c for _, c in masks_and_classes]]),
        "num_detections": np.array([n]),
        "detection_masks": relative[None],
        "original_size": np.array([[H, W]]),
    }


OBJECTS = [(_disc(40, 50, 25), 1), (_ring(70, 115, 30), 9)]


def test_perfect_masks_give_mask_ap_one():
    ev = COCOEvaluator(_groundtruth(OBJECTS))
    ev.update_state(_predictions(OBJECTS))
    metrics = ev.evaluate()
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["mask_AP"] == pytest.approx(1.0)
    assert metrics["mask_AP50"] == pytest.approx(1.0)


def test_wrong_masks_lower_mask_ap_but_not_box_ap():
    # Right boxes, masks of the wrong shape: a full box for the ring (its hole counts against
    # it: IoU = ring area / box area ~ 0.59) and the ring's hole for the disc (IoU ~ 0).
    boxes_right = np.stack([_box_of(m) for m, _ in OBJECTS])
    masks = np.zeros((2, 28, 28), np.float32)
    masks[0, 10:18, 10:18] = 1.0
    masks[1] = 1.0
    ev = COCOEvaluator(_groundtruth(OBJECTS))
    ev.update_state(_predictions(OBJECTS, box_masks=masks))
    metrics = ev.evaluate()
    assert metrics["AP"] == pytest.approx(1.0)
    ring, ring_box = OBJECTS[1][0], boxes_right[1]
    full_box = np.zeros_like(ring)
    full_box[int(ring_box[0]) : int(ring_box[2]), int(ring_box[1]) : int(ring_box[3])] = 1
    iou = ring.sum() / full_box.sum()
    assert 0.5 < iou < 0.65
    # Ring: a match at IoU 0.50 and 0.55 only (2 of 10 thresholds); disc: none. Mean over the
    # two categories of (2/10, 0) = 0.1.
    assert metrics["mask_AP"] == pytest.approx(0.1, abs=1e-6)
    assert metrics["mask_AP50"] == pytest.approx(0.5, abs=1e-6)


def test_encode_masks_is_the_paste_thresholded():
    disc = OBJECTS[0][0]
    box = _box_of(disc)[None]
    crop = mask_ops.crop_masks(disc[None], box, 28)
    rle = encode_masks(crop.numpy(), box, (H, W))[0]
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    pasted = mask_ops.paste_masks(crop, box, (H, W)).numpy()[0] >= 0.5
    np.testing.assert_array_equal(decoded, pasted)
    assert (decoded & disc).sum() / (decoded | disc).sum() > 0.95


def test_no_masks_no_mask_metrics_and_missing_groundtruth_masks_left_out_of_mask_ap():
    ev = COCOEvaluator(_groundtruth(OBJECTS))
    preds = _predictions(OBJECTS)
    del preds["detection_masks"]
    ev.update_state(preds)
    metrics = ev.evaluate()
    assert "mask_AP" not in metrics and metrics["AP"] == pytest.approx(1.0)
    assert ev.left_out() == {"AP": {}}

    gt = _groundtruth(OBJECTS)
    del gt["annotations"][1]["segmentation"]
    ev = COCOEvaluator(gt)
    ev.update_state(_predictions(OBJECTS))
    metrics = ev.evaluate()
    # Box AP keeps annotation 2; mask AP leaves it out (its box is an ignore region there, so the
    # ring's correct detection is no false positive): the disc alone scores, perfectly.
    assert metrics["AP"] == pytest.approx(1.0) and metrics["mask_AP"] == pytest.approx(1.0)
    assert ev.left_out() == {"AP": {}, "mask_AP": {"missing_segmentation": [2]}}

    from fpn_tf.data.errors import DataError

    with pytest.raises(DataError, match=r"annotation id 2 \(image id 1\): has no 'segmentation'"):
        ev = COCOEvaluator(gt, on_bad_data="error")
        ev.update_state(_predictions(OBJECTS))
        ev.evaluate()
