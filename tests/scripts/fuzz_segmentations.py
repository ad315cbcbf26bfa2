"""Random and adversarial COCO segmentations (hypothesis) thrown at the segmentation check and at
mask-AP evaluation; run in a process of its own by tests/test_bad_masks.py, because what it
guards against is a hang or a crash of the whole process (pycocotools is C).

    python tests/scripts/fuzz_segmentations.py [--examples=N]

For every example: ``check_segmentation`` returns (never raises); a mask it accepts decodes to
its image's size with the area it reports; and ``COCOEvaluator`` scores a ground truth holding
the segmentation beside a good one (detections: the good object's exact mask and a random one)
to metrics in [0, 1] or -1, the segmentation left out of mask AP exactly when the check refused
it. Prints one line of counts and exits 0; any failure is hypothesis' report and exit 1.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from fpn_tf.data.segmentation_check import MASK_REASONS, check_segmentation  # noqa: E402
from fpn_tf.evaluation.coco_evaluator import COCOEvaluator  # noqa: E402

# Numbers as annotation exports break them: huge, tiny, non-finite, ints beyond float range.
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-200, 200),
    st.integers(-(10**400), 10**400),
    st.integers(-50, 100),
    st.sampled_from([1e7, -1e7, 1e12, -1e12, 1.7e308, -1.7e308, 2**31, 2**32 + 5, -0.0]),
)
JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=8), NUMBERS)
POLYGON = st.lists(NUMBERS, max_size=14)
POLYGONS = st.lists(st.one_of(POLYGON, JUNK, st.lists(JUNK, max_size=6)), max_size=4)


def _pick(draw, weights: dict):
    """A key of ``weights`` drawn with those relative weights (hypothesis shrinks to the first)."""
    k = draw(st.integers(0, sum(weights.values()) - 1))
    for key, weight in weights.items():
        if k < weight:
            return key
        k -= weight
    raise AssertionError


@st.composite
def rle_counts(draw, h, w):
    """Run lists that add up to h x w (valid), nearly, or not at all."""
    total = h * w
    cuts = sorted(draw(st.lists(st.integers(0, total), max_size=8)))
    runs = np.diff([0, *cuts, total]).tolist()
    kind = _pick(draw, {"exact": 5, "off": 2, "random": 1, "junk": 1})
    if kind == "off":
        k = draw(st.integers(0, len(runs) - 1))
        runs[k] += draw(st.sampled_from([-1, 1, 2**32, -(2**32), 10**30]))
    elif kind == "random":
        runs = draw(st.lists(st.integers(-(2**40), 2**40), max_size=8))
    elif kind == "junk":
        runs = draw(st.lists(JUNK, max_size=6))
    return runs


@st.composite
def rle_strings(draw, h, w):
    """Compressed RLE strings: valid ones (of a random h x w mask), mutated ones, random text."""
    bits = draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
    mask = np.asfortranarray(np.array(bits, np.uint8).reshape(h, w))
    counts = mask_utils.encode(mask)["counts"].decode("ascii")
    kind = _pick(draw, {"valid": 4, "cut": 1, "append": 1, "replace": 1, "random": 1})
    if kind == "cut":
        counts = counts[: draw(st.integers(0, len(counts) - 1))]
    elif kind == "append":
        counts += draw(st.text(min_size=1, max_size=4))
    elif kind == "replace":
        i = draw(st.integers(0, len(counts) - 1))
        counts = counts[:i] + draw(st.characters()) + counts[i + 1 :]
    elif kind == "random":
        counts = draw(st.one_of(st.text(max_size=20), st.binary(max_size=20)))
    return counts


@st.composite
def rles(draw, image_size):
    h, w = image_size
    kind = _pick(draw, {"image": 6, "other": 2, "junk": 1})
    size = {
        "image": [h, w],
        "other": draw(st.lists(st.integers(-3, 48), min_size=2, max_size=2)),
        "junk": draw(st.one_of(st.lists(JUNK, max_size=3), JUNK)),
    }[kind]
    ch, cw = size if kind == "other" and min(size) > 0 else (h, w)
    counts_kind = _pick(draw, {"runs": 4, "string": 4, "junk": 1})
    counts = {
        "runs": lambda: draw(rle_counts(ch, cw)),
        "string": lambda: draw(rle_strings(ch, cw)),
        "junk": lambda: draw(JUNK),
    }[counts_kind]()
    rle = {}
    if draw(st.integers(0, 9)):  # now and then without "size" or "counts"
        rle["size"] = size
    if draw(st.integers(0, 9)):
        rle["counts"] = counts
    return rle


@st.composite
def polygons(draw, image_size):
    """Plausible polygons (around the image, some reaching far), and broken ones."""
    h, w = image_size
    kind = _pick(draw, {"plausible": 5, "far": 2, "broken": 2})
    if kind == "broken":
        return draw(POLYGONS)
    out = []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(3, 8))
        xs = draw(st.lists(st.floats(-0.3 * w, 1.3 * w), min_size=n, max_size=n))
        ys = draw(st.lists(st.floats(-0.3 * h, 1.3 * h), min_size=n, max_size=n))
        if kind == "far":
            k = draw(st.integers(0, n - 1))
            xs[k] = draw(NUMBERS)
        out.append([v for xy in zip(xs, ys) for v in xy])
    return out


IMAGE_SIZES = st.tuples(st.integers(8, 48), st.integers(8, 48))


@st.composite
def segmentations(draw, image_size):
    kind = _pick(draw, {"polygons": 4, "rle": 4, "junk": 1, "flat": 1, "dict": 1})
    return draw(
        {
            "polygons": polygons(image_size),
            "rle": rles(image_size),
            "junk": JUNK,
            "flat": st.lists(NUMBERS, max_size=10),  # a flat list, not a list of polygons
            "dict": st.dictionaries(st.text(max_size=5), JUNK, max_size=3),
        }[kind]
    )


STATS = collections.Counter()


def _check_one(segmentation, h, w):
    checked = check_segmentation(segmentation, h, w)
    if checked.ok:
        mask = mask_utils.decode({"size": [h, w], "counts": checked.counts})
        assert mask.shape == (h, w) and int(mask.sum()) == checked.area > 0
        STATS["accepted"] += 1
    else:
        assert checked.reason in MASK_REASONS and checked.what and "\n" not in checked.what
        STATS[checked.reason] += 1
    return checked


@st.composite
def cases(draw):
    h, w = draw(IMAGE_SIZES)
    return h, w, draw(segmentations((h, w)))


def run(examples: int) -> None:
    common = settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )

    @common
    @given(cases())
    def check_never_fails(case):
        h, w, segmentation = case
        _check_one(segmentation, h, w)

    @settings(common, max_examples=max(examples // 4, 10))
    @given(cases(), st.integers(0, 2**32 - 1), st.booleans())
    def mask_ap_never_fails(case, seed, crowd):
        h, w, segmentation = case
        checked = _check_one(segmentation, h, w)
        good = {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "bbox": [1, 1, 6, 5],
            "area": 30.0,
            "iscrowd": 0,
            "segmentation": [[1, 1, 7, 1, 7, 6, 1, 6]],
        }
        bad = {
            "id": 2,
            "image_id": 1,
            "category_id": 1,
            "bbox": [0, 0, w / 2, h / 2],
            "area": 9.0,
            "iscrowd": int(crowd),
            "segmentation": segmentation,
        }
        gt = {
            "images": [{"id": 1, "height": h, "width": w}],
            "categories": [{"id": 1, "name": "a"}],
            "annotations": [good, bad],
        }
        rng = np.random.default_rng(seed)
        exact = np.zeros((h, w), np.uint8)
        exact[1:6, 1:7] = 1
        random_mask = (rng.random((h, w)) < 0.3).astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(np.stack([exact, random_mask], -1)))
        evaluator = COCOEvaluator(gt)
        evaluator.add_detections(
            1, [[1, 1, 6, 7], [0, 0, h, w]], [0.9, 0.5], [1, 1], segmentations=rles
        )
        metrics = evaluator.evaluate()
        for name, value in metrics.items():
            assert math.isfinite(value) and (value == -1 or 0 <= value <= 1), (name, value)
        left_out = evaluator.left_out()["mask_AP"]
        assert left_out == ({} if checked.ok else {checked.reason: [2]}), left_out
        assert evaluator.left_out()["AP"] == {}
        STATS["evaluated"] += 1

    check_never_fails()
    mask_ap_never_fails()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=300)
    args = parser.parse_args()
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # the evaluator's per-example lines
    run(args.examples)
    print(" ".join(f"{k}={v}" for k, v in sorted(STATS.items())))


if __name__ == "__main__":
    main()
