"""The one check of a COCO ``segmentation``, run before pycocotools sees it (numpy + pycocotools).

Training, the evaluation ground truth and ``convert_coco`` all call :func:`check_segmentation`:
the compressed RLE ``COCO.annToRLE`` would give, or why it cannot (a :data:`MASK_REASONS` key and
one line). pycocotools checks nothing: bad input makes it raise, drop coordinates, loop forever
or crash. Accepted:

* polygons: a non-empty list of polygons, each an even-length list of at least 6 finite
  numbers. Vertices within the image extended by its own size on every side are rasterised as
  pycocotools does; a polygon reaching beyond is first clipped to that range
  (Sutherland-Hodgman; :attr:`CheckedSegmentation.clipped`). A mask with no pixel in the image
  is ``empty_mask``;
* uncompressed RLE: ``size`` the image's ``[height, width]``, ``counts`` non-negative integers
  summing to height x width;
* compressed RLE: ``size`` as above, ``counts`` a string that decodes as pycocotools reads it
  (:func:`compressed_rle_runs`) to runs summing to height x width.

The image needs a positive integer size under 2**31 pixels (pycocotools' counts are 32-bit).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

__all__ = [
    "MASK_REASONS",
    "CheckedSegmentation",
    "check_image_size",
    "check_segmentation",
    "compressed_rle_runs",
    "is_int",
    "is_number",
]

# reason -> what it means, for log lines ("skipped 3 annotation(s) with <what> [<reason>]").
MASK_REASONS = {
    "missing_segmentation": "no 'segmentation'",
    "bad_segmentation_type": "a 'segmentation' that is neither polygons nor an RLE",
    "bad_polygon": "a malformed segmentation polygon",
    "bad_rle": "a malformed segmentation RLE",
    "mask_size_mismatch": "a segmentation RLE whose size differs from the image's",
    "empty_mask": "an empty mask (area 0 in the image)",
    "bad_image_size": "an image without a usable height/width for its mask",
}

# Polygons are clipped to the image extended by this many image sizes on every side.
POLYGON_MARGIN = 1.0
# pycocotools keeps run lengths and pixel indices in 32-bit integers, and its rasteriser the
# polygon coordinates times 5 (within the margin: up to 5 (1 + 2 m) x the side).
MAX_IMAGE_PIXELS = 2**31 - 1
MAX_IMAGE_SIDE = 2**27
# The rasteriser holds 16 bytes per boundary point (its coordinates x 5, one point per step along
# the longer axis of each edge): 2**24 points are 256 MiB, a perimeter of ~3 million pixels.
MAX_BOUNDARY_POINTS = 2**24


@dataclasses.dataclass(frozen=True)
class CheckedSegmentation:
    """The outcome of :func:`check_segmentation`: ``counts`` (compressed RLE bytes over the
    image's (height, width)) or ``reason`` + ``what`` (one line: what is wrong)."""

    counts: bytes | None
    reason: str | None = None
    what: str = ""
    clipped: bool = False  # a polygon reached beyond the margin and was clipped to it
    area: int = 0  # pixels of the mask

    @property
    def ok(self) -> bool:
        return self.counts is not None


def _bad(reason: str, what: str) -> CheckedSegmentation:
    return CheckedSegmentation(None, reason, what)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _all_numbers(values) -> bool:
    """Whether every item is a number (not a bool); Python floats and ints take the fast way."""
    for v in values:
        t = type(v)
        if t is float or t is int or is_number(v):
            continue
        return False
    return True


def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_image_size(height: Any, width: Any) -> str | None:
    """None when (height, width) can hold masks for pycocotools, else what is wrong."""
    if not (is_int(height) and is_int(width)) or height <= 0 or width <= 0:
        return (
            f"the image's height/width {_short(height)}/{_short(width)} are not positive integers"
        )
    if int(height) * int(width) > MAX_IMAGE_PIXELS or max(height, width) > MAX_IMAGE_SIDE:
        return (
            f"the image's {height}x{width} size exceeds what pycocotools can rasterise "
            f"(2**31 - 1 pixels, {MAX_IMAGE_SIDE} a side)"
        )
    return None


def compressed_rle_runs(counts: bytes) -> list[int] | None:
    """The runs (uncompressed RLE ``counts``) of a compressed RLE string, as pycocotools'
    ``rleFrString`` reads it, or None if it is malformed (a character out of range, a truncated
    number, a negative run)."""
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None
            c = counts[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
    return runs


def check_segmentation(segmentation: Any, height: int, width: int) -> CheckedSegmentation:
    """The mask of a ``segmentation`` as ``COCO.annToRLE`` gives it, or why it is unusable;
    never raises on any JSON value."""
    problem = check_image_size(height, width)
    if problem is not None:
        return _bad("bad_image_size", problem)
    h, w = int(height), int(width)
    clipped = False
    if segmentation is None:
        return _bad("missing_segmentation", "has no 'segmentation'")
    if isinstance(segmentation, list):
        polygons = _checked_polygons(segmentation)
        if isinstance(polygons, CheckedSegmentation):
            return polygons
        polygons, clipped = _clip_polygons(polygons, h, w)
        if not polygons:
            return _bad(
                "empty_mask",
                "segmentation has area 0 in the image (its polygons lie entirely outside it)",
            )
        # Each edge is at most 5 x (1 + 2 m) x the longer side in steps: count exactly only
        # when that bound could exceed the limit (polygons of thousands of vertices).
        vertices = sum(len(p) // 2 for p in polygons)
        bound = vertices * (5 * (1 + 2 * POLYGON_MARGIN) * max(h, w) + 2)
        points = 0.0
        if bound > MAX_BOUNDARY_POINTS:
            points = sum(_boundary_points(p.reshape(-1, 2)) for p in polygons)
        if points > MAX_BOUNDARY_POINTS:
            return _bad(
                "bad_polygon",
                f"segmentation polygons are too long to rasterise ({points:.3g} boundary points at "
                f"pycocotools' 5x resolution, more than {MAX_BOUNDARY_POINTS})",
            )
        rle = mask_utils.merge(mask_utils.frPyObjects([p.tolist() for p in polygons], h, w))
    elif isinstance(segmentation, dict):
        rle = _checked_rle(segmentation, h, w)
        if isinstance(rle, CheckedSegmentation):
            return rle
    else:
        return _bad(
            "bad_segmentation_type",
            "'segmentation' must be a list of polygons or an RLE object, got "
            f"{type(segmentation).__name__} {_short(segmentation)}",
        )
    area = int(mask_utils.area(rle))
    if area == 0:
        return _bad("empty_mask", "segmentation has area 0 in the image (an empty mask)")
    return CheckedSegmentation(bytes(rle["counts"]), clipped=clipped, area=area)


def _checked_polygons(segmentation: list) -> list[np.ndarray] | CheckedSegmentation:
    """float64 [2 n] coordinates per polygon, or the problem."""
    if not segmentation:
        return _bad("bad_polygon", "'segmentation' is an empty list of polygons")
    polygons = []
    for k, poly in enumerate(segmentation):
        if not isinstance(poly, (list, tuple)) or not _all_numbers(poly):
            return _bad(
                "bad_polygon", f"segmentation polygon {k} is not a list of numbers: {_short(poly)}"
            )
        try:
            values = np.array(poly, np.float64)
        except OverflowError:  # a Python int beyond float range
            values = np.array([np.inf])
        if not np.isfinite(values).all():
            problem = "has a non-finite or out-of-range coordinate"
        elif len(poly) % 2:
            problem = f"has an odd number of coordinates ({len(poly)})"
        elif len(poly) < 6:
            problem = f"has fewer than 3 points ({len(poly) // 2})"
        else:
            polygons.append(values)
            continue
        return _bad("bad_polygon", f"segmentation polygon {k} {problem}")
    return polygons


def _clip_polygons(polygons: list[np.ndarray], h: int, w: int) -> tuple[list[np.ndarray], bool]:
    """The polygons (flat coordinates) clipped to x in [-m w, (1 + m) w], y in [-m h, (1 + m) h]
    (m = POLYGON_MARGIN); those within it unchanged. Returns (polygons with >= 3 points, any
    clipped)."""
    x0, x1 = -POLYGON_MARGIN * w, (1 + POLYGON_MARGIN) * w
    y0, y1 = -POLYGON_MARGIN * h, (1 + POLYGON_MARGIN) * h
    side = min(h, w)
    out, clipped = [], False
    for flat in polygons:
        if flat.min() >= -POLYGON_MARGIN * side and flat.max() <= (1 + POLYGON_MARGIN) * side:
            out.append(flat)  # within the margin on both axes (the common case, cheaply)
            continue
        p = flat.reshape(-1, 2)
        xs, ys = p[:, 0], p[:, 1]
        if xs.min() >= x0 and xs.max() <= x1 and ys.min() >= y0 and ys.max() <= y1:
            out.append(flat)
            continue
        clipped = True
        # Scaled by a power of two (exact) so that no difference of two coordinates overflows.
        exponent = max(0, math.frexp(float(np.abs(p).max()))[1] - 1000)
        q = _sutherland_hodgman(
            np.ldexp(p, -exponent), *(math.ldexp(v, -exponent) for v in (x0, y0, x1, y1))
        )
        if len(q) >= 3:
            out.append(np.clip(np.ldexp(q, exponent), [x0, y0], [x1, y1]).ravel())
    return out, clipped


def _sutherland_hodgman(points: np.ndarray, x0, y0, x1, y1) -> np.ndarray:
    """The polygon ``points`` [n, 2] clipped to the rectangle (a convex region: exact for any
    polygon, up to degenerate edges along the rectangle's sides, which lie outside the image)."""
    pts = [(float(x), float(y)) for x, y in points]
    for axis, bound, keep_below in ((0, x0, False), (0, x1, True), (1, y0, False), (1, y1, True)):

        def inside(pt, axis=axis, bound=bound, keep_below=keep_below):
            return pt[axis] <= bound if keep_below else pt[axis] >= bound

        def crossing(a, b, axis=axis, bound=bound):
            # Where the edge from the inside point ``a`` to ``b`` meets the bound, measured from
            # ``a``: precise even when ``b`` is astronomically far.
            t = (bound - a[axis]) / (b[axis] - a[axis])
            other = a[1 - axis] + t * (b[1 - axis] - a[1 - axis])
            return (bound, other) if axis == 0 else (other, bound)

        kept = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            if inside(cur):
                if not inside(prev):
                    kept.append(crossing(cur, prev))
                kept.append(cur)
            elif inside(prev):
                kept.append(crossing(prev, cur))
        pts = kept
        if not pts:
            break
    return np.array(pts, np.float64).reshape(-1, 2)


def _boundary_points(polygon: np.ndarray) -> float:
    """How many boundary points pycocotools' ``rleFrPoly`` allocates for ``polygon`` (its
    vertices x 5, rounded as it rounds; one point per step along each edge's longer axis); a
    float, inf for coordinates no integer holds."""
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.trunc(5.0 * polygon + 0.5)
        steps = np.abs(scaled - np.roll(scaled, -1, axis=0)).max(axis=1)
        total = float(steps.sum()) + len(polygon)
    return total if np.isfinite(total) else math.inf


def _checked_rle(segmentation: dict, h: int, w: int):
    """A pycocotools RLE dict, or the problem."""
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(is_int, size))):
        return _bad(
            "bad_rle", f"segmentation RLE 'size' must be [height, width], got {_short(size)}"
        )
    if (int(size[0]), int(size[1])) != (h, w):
        return _bad(
            "mask_size_mismatch",
            f"segmentation RLE size {list(size)} (h, w) differs from the image's [{h}, {w}]",
        )
    if "counts" not in segmentation:
        return _bad("bad_rle", "segmentation RLE has no 'counts'")
    if isinstance(counts, list):
        if not all(is_int(c) and c >= 0 for c in counts) or sum(counts) != h * w:
            return _bad(
                "bad_rle",
                f"segmentation RLE counts are not non-negative integers summing to {h * w}",
            )
        return mask_utils.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
    if isinstance(counts, (str, bytes)):
        try:
            raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
        except UnicodeEncodeError:
            raw = b"\xff"
        runs = compressed_rle_runs(raw)
        if runs is None or sum(runs) != h * w:
            return _bad(
                "bad_rle", f"segmentation RLE counts string does not decode to {h * w} pixels"
            )
        return {"size": [h, w], "counts": raw}
    return _bad(
        "bad_rle",
        f"segmentation RLE 'counts' must be a list or a string, got {type(counts).__name__}",
    )
