"""Helpers shared by the bench scripts (no flags here)."""

from __future__ import annotations

OUR_PAD = 32
NUM_FG_CLASSES = 90  # Model Garden's num_classes=91 includes the background.


def emit_json_line(record: dict, output: str | None = None) -> dict:
    """Prints ``{"date": now, **record}`` as one JSON line and appends it to ``output``."""
    import json
    import time

    record = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
    line = json.dumps(record)
    print(line, flush=True)
    if output:
        with open(output, "a") as f:
            f.write(line + "\n")
    return record


def padded(size, multiple):
    return [-(-s // multiple) * multiple for s in size]


def synthetic_batch(batch, resized_hw, padded_hw, num_gt, max_inst, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = resized_hw
    images = np.zeros((batch, padded_hw[0], padded_hw[1], 3), np.float32)
    images[:, :h, :w] = rng.uniform(0, 255, (batch, h, w, 3)).astype(np.float32)
    boxes = np.zeros((batch, max_inst, 4), np.float32)
    classes = -np.ones((batch, max_inst), np.int32)
    for b in range(batch):
        for j in range(num_gt):
            bh = rng.uniform(min(24, h / 4), min(400, h * 0.9))
            bw = rng.uniform(min(24, w / 4), min(400, w * 0.9))
            y0, x0 = rng.uniform(0, h - bh), rng.uniform(0, w - bw)
            boxes[b, j] = (y0, x0, y0 + bh, x0 + bw)
            classes[b, j] = rng.integers(1, NUM_FG_CLASSES + 1)
    info = np.array([[h, w], [h, w], [1.0, 1.0], [0.0, 0.0]], np.float32)
    image_info = np.tile(info[None], (batch, 1, 1))
    return images, image_info, boxes, classes
