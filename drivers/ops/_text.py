"""Text ops for OCR models (PaddleOCR / rapidocr): DB detection boxes, crops of rotated boxes,
aspect-keeping resize with right padding, and CTC greedy decoding against a vocabulary.

A text detector (DB) gives a probability map; ``db_boxes`` turns it into rotated boxes as
PaddleOCR's ``DBPostProcess`` does (binarise, regions, minimum-area rectangles, box score,
unclip); ``scale_boxes`` maps them to the image the map was computed from; ``crop_rotated``
cuts each box out of that image upright at the recogniser's height; the recogniser's softmax
goes through ``ctc_greedy``, and ``labels_to_text`` spells the labels with the vocabulary the
model ships (``vocabulary_from_metadata`` reads it from the ONNX ``character`` metadata).

Each numeric op is a numba kernel behind a thin function that checks and shapes its input,
with ``<op>_reference``, the same op in plain numpy, next to it: the tests hold the two
equal (exactly, for boxes, pixels and labels).  Work is bounded by the input's size: regions
are found in one pass over the map (a scanline fill), a region's hull from its pixels' first
and last column per row, and at most ``max_candidates`` regions (the largest) are measured,
each scored over its own rectangle.  On a 960x960 map of 23 lines ``db_boxes`` takes about
0.8 ms (PaddleOCR's OpenCV and pyclipper code about 4 ms, boxes within 1.5 px of its).

Coordinates are pixel positions ``(x, y)`` with ``(0, 0)`` the centre of the top-left pixel,
as OpenCV counts them.
"""

from __future__ import annotations

import math
from typing import Sequence

import numba
import numpy as np

from ._exceptions import OpInputError, OpParamsError
from ._image import _batch, _column_taps, _output, _path, _resize_rows, _row_taps, _rows_used, resize_reference

__all__ = ["db_boxes", "scale_boxes", "crop_rotated", "resize_pad", "ctc_greedy", "labels_to_text",
           "vocabulary_from_metadata", "check_vocabulary"]

DB_BOXES = "text.db_boxes"
SCALE_BOXES = "text.scale_boxes"
CROP_ROTATED = "text.crop_rotated"
RESIZE_PAD = "image.resize_pad"
CTC_GREEDY = "text.ctc_greedy"
LABELS_TO_TEXT = "text.labels_to_text"

#: Boxes whose top-left corners are less than this many map pixels apart vertically are on
#: one line and read left to right (PaddleOCR's ``sorted_boxes``).
SAME_LINE = 10.0
#: A pixel centre this close outside a box's edge still counts as inside it.
_EPS = 1e-6
#: A crop taller than this times its width is a vertical line of text: turned upright.
TALL = 1.5


# -- text detection: boxes from a DB probability map ------------------------------------------------


def _prob_map(prob: np.ndarray) -> np.ndarray:
    """The map as a C-contiguous float32 [H, W], or OpInputError."""
    p = np.asarray(prob)
    if p.dtype.kind != "f":
        raise OpInputError(DB_BOXES, f"the probability map must be float32, not {p.dtype}")
    if p.ndim not in (2, 3, 4) or p.shape[:-2] not in ((), (1,), (1, 1)):
        raise OpInputError(DB_BOXES, f"the probability map must be [H, W], [1, H, W] or [1, 1, H, W] "
                                     f"(one map at a time), not {p.ndim}-D {p.shape}")
    p = np.ascontiguousarray(p.reshape(p.shape[-2:]), np.float32)
    if not np.isfinite(p).all():
        raise OpInputError(DB_BOXES, "the probability map has NaN or infinite values")
    return p


def _db_params(thresh: float, box_thresh: float, unclip_ratio: float, max_candidates: int,
               min_size: float) -> tuple[float, float, float, int, float]:
    for name, value in (("thresh", thresh), ("box_thresh", box_thresh), ("unclip_ratio", unclip_ratio),
                        ("min_size", min_size)):
        if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
            raise OpParamsError(DB_BOXES, name, f"must be a finite number, not {value!r}")
    if unclip_ratio < 0:
        raise OpParamsError(DB_BOXES, "unclip_ratio", f"must be >= 0, not {unclip_ratio}")
    if min_size < 0:
        raise OpParamsError(DB_BOXES, "min_size", f"must be >= 0, not {min_size}")
    if isinstance(max_candidates, bool) or not isinstance(max_candidates, (int, np.integer)) or max_candidates < 1:
        raise OpParamsError(DB_BOXES, "max_candidates", f"must be an integer >= 1, not {max_candidates!r}")
    return float(thresh), float(box_thresh), float(unclip_ratio), int(max_candidates), float(min_size)


@numba.njit(cache=True, nogil=True)
def _grown(a, need):
    """``a`` in an array of at least ``need`` elements and twice its size (the rest unset)."""
    out = np.empty(max(2 * a.size, need), a.dtype)
    out[:a.size] = a
    return out


@numba.njit(cache=True, nogil=True)
def _next_set(mask, y, x):
    """The first column from ``x`` on where row ``y`` of ``mask`` is set, or the row's length."""
    w = mask.shape[1]
    while x < w and not mask[y, x]:
        x += 1
    return x


@numba.njit(cache=True, nogil=True)
def _components(mask):
    """8-connected regions of ``mask`` (which is used up: each pixel is cleared as it is taken)
    numbered in raster order of their first pixel: per region its pixel count, first and last
    row, and its runs of pixels along the rows: region ``l``'s are ``start[l]`` to
    ``start[l + 1]``, each a row, first and last column.

    A scanline fill: each seed grows into its whole run along the row, and the runs touching
    it in the rows above and below (diagonals included) become seeds.  The arrays start small
    and grow as needed, outside the loops over pixels: allocating them at their bounds (the
    map's size) costs page faults, and an array replaced inside a loop costs numba a
    reference count update on every pass."""
    h, w = mask.shape
    count = np.empty(64, np.int64)
    top = np.empty(64, np.int64)
    bottom = np.empty(64, np.int64)
    start = np.zeros(65, np.int64)
    run_y = np.empty(1024, np.int32)
    run_first = np.empty(1024, np.int32)
    run_last = np.empty(1024, np.int32)
    seed_y = np.empty(1024, np.int32)
    seed_x = np.empty(1024, np.int32)
    n = runs = 0
    for y in range(h):
        x = _next_set(mask, y, 0)
        while x < w:
            mask[y, x] = False
            seed_y[0], seed_x[0] = y, x
            held, pixels, last = 1, 0, y
            while held:
                held -= 1
                sy, sx = seed_y[held], seed_x[held]
                left = sx
                while left > 0 and mask[sy, left - 1]:
                    left -= 1
                    mask[sy, left] = False
                right = sx
                while right < w - 1 and mask[sy, right + 1]:
                    right += 1
                    mask[sy, right] = False
                if runs == run_y.size:
                    run_y, run_first, run_last = _grown(run_y, 0), _grown(run_first, 0), _grown(run_last, 0)
                run_y[runs], run_first[runs], run_last[runs] = sy, left, right
                runs += 1
                pixels += right - left + 1
                last = max(last, sy)
                need = held + right - left + 4  # at most one seed per two columns, per row
                if need > seed_y.size:
                    seed_y, seed_x = _grown(seed_y, need), _grown(seed_x, need)
                for ny in (sy - 1, sy + 1):
                    if ny < 0 or ny >= h:
                        continue
                    seeded = False  # within a run of pixels whose first is already a seed
                    for nx in range(max(left - 1, 0), min(right + 2, w)):
                        if not mask[ny, nx]:
                            seeded = False
                        elif not seeded:
                            mask[ny, nx] = False
                            seed_y[held], seed_x[held] = ny, nx
                            held += 1
                            seeded = True
            if n == count.size:
                count, top, bottom, start = _grown(count, 0), _grown(top, 0), _grown(bottom, 0), _grown(start, 0)
            count[n], top[n], bottom[n] = pixels, y, last
            n += 1
            start[n] = runs
            x = _next_set(mask, y, x + 1)
    return (count[:n].copy(), top[:n].copy(), bottom[:n].copy(), start[:n + 1].copy(),
            run_y[:runs].copy(), run_first[:runs].copy(), run_last[:runs].copy())


@numba.njit(cache=True, nogil=True)
def _cross(ox, oy, ax, ay, bx, by):
    return (ax - ox) * (by - oy) - (ay - oy) * (bx - ox)


@numba.njit(cache=True, nogil=True)
def _hull(px, py):
    """Convex hull (Andrew's monotone chain) of distinct points sorted by (y, x); collinear
    points are not vertices.  Returns the vertices' x and y."""
    n = px.size
    if n == 1:
        return px.copy(), py.copy()
    hx = np.empty(2 * n, np.float64)
    hy = np.empty(2 * n, np.float64)
    k = 0
    for i in range(n):
        while k >= 2 and _cross(hx[k - 2], hy[k - 2], hx[k - 1], hy[k - 1], px[i], py[i]) <= 0:
            k -= 1
        hx[k], hy[k] = px[i], py[i]
        k += 1
    lower = k + 1
    for i in range(n - 2, -1, -1):
        while k >= lower and _cross(hx[k - 2], hy[k - 2], hx[k - 1], hy[k - 1], px[i], py[i]) <= 0:
            k -= 1
        hx[k], hy[k] = px[i], py[i]
        k += 1
    return hx[:k - 1].copy(), hy[:k - 1].copy()


@numba.njit(cache=True, nogil=True)
def _min_area_rect(hx, hy):
    """The smallest rectangle around a convex polygon has a side on one of its edges: try each
    edge, the first smallest wins.  Returns the rectangle as ``(bx, by, ex, ey, u0, u1, v0, v1)``:
    its points are ``b + (u e + v n) / |e|^2`` for u in [u0, u1], v in [v0, v1], n = (-ey, ex)."""
    m = hx.size
    if m == 1:
        return hx[0], hy[0], 1.0, 0.0, 0.0, 0.0, 0.0, 0.0
    best = np.inf
    found = (0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    for i in range(m):
        j = (i + 1) % m
        bx, by = hx[i], hy[i]
        ex, ey = hx[j] - bx, hy[j] - by
        u0 = v0 = np.inf
        u1 = v1 = -np.inf
        for k in range(m):
            dx, dy = hx[k] - bx, hy[k] - by
            u = dx * ex + dy * ey
            v = dy * ex - dx * ey
            u0, u1, v0, v1 = min(u0, u), max(u1, u), min(v0, v), max(v1, v)
        area = (u1 - u0) * (v1 - v0) / (ex * ex + ey * ey)
        if area < best:
            best = area
            found = (bx, by, ex, ey, u0, u1, v0, v1)
    return found


@numba.njit(cache=True, nogil=True)
def _corners(bx, by, ex, ey, u0, u1, v0, v1):
    out = np.empty((4, 2), np.float64)
    length2 = ex * ex + ey * ey
    us = (u0, u1, u1, u0)
    vs = (v0, v0, v1, v1)
    for c in range(4):
        out[c, 0] = bx + (us[c] * ex - vs[c] * ey) / length2
        out[c, 1] = by + (us[c] * ey + vs[c] * ex) / length2
    return out


@numba.njit(cache=True, nogil=True)
def _row_span(c, y):
    """Where the row ``y`` crosses the convex quadrilateral ``c``: (left x, right x), or
    (inf, -inf) if it misses it."""
    left, right = np.inf, -np.inf
    for k in range(4):
        x1, y1 = c[k, 0], c[k, 1]
        x2, y2 = c[(k + 1) % 4, 0], c[(k + 1) % 4, 1]
        lo, hi = min(y1, y2), max(y1, y2)
        if y < lo - _EPS or y > hi + _EPS:
            continue
        if hi - lo < _EPS:
            left, right = min(left, x1, x2), max(right, x1, x2)
        else:
            t = min(max((y - y1) / (y2 - y1), 0.0), 1.0)
            x = x1 + t * (x2 - x1)
            left, right = min(left, x), max(right, x)
    return left, right


@numba.njit(cache=True, nogil=True)
def _box_score(prob, c):
    """Mean of ``prob`` over the pixel centres inside the quadrilateral ``c`` (0 if none)."""
    h, w = prob.shape
    ya = max(int(np.ceil(min(c[0, 1], c[1, 1], c[2, 1], c[3, 1]) - _EPS)), 0)
    yb = min(int(np.floor(max(c[0, 1], c[1, 1], c[2, 1], c[3, 1]) + _EPS)), h - 1)
    total = 0.0
    n = 0
    for y in range(ya, yb + 1):
        left, right = _row_span(c, float(y))
        if left > right:
            continue
        xa = max(int(np.ceil(left - _EPS)), 0)
        xb = min(int(np.floor(right + _EPS)), w - 1)
        for x in range(xa, xb + 1):
            total += prob[y, x]
            n += 1
    return total / n if n else 0.0


@numba.njit(cache=True, nogil=True)
def _clockwise(c, w, h):
    """The corners as top-left, top-right, bottom-right, bottom-left the way PaddleOCR's
    ``get_mini_boxes`` orders them (the two leftmost are the left side), clipped to the map."""
    order = np.arange(4)
    for i in range(1, 4):  # insertion sort by (x, y)
        j = i
        while j > 0 and (c[order[j], 0] < c[order[j - 1], 0]
                         or (c[order[j], 0] == c[order[j - 1], 0] and c[order[j], 1] < c[order[j - 1], 1])):
            order[j], order[j - 1] = order[j - 1], order[j]
            j -= 1
    tl, bl = (order[0], order[1]) if c[order[1], 1] > c[order[0], 1] else (order[1], order[0])
    tr, br = (order[2], order[3]) if c[order[3], 1] > c[order[2], 1] else (order[3], order[2])
    out = np.empty((4, 2), np.float64)
    for k, src in enumerate((tl, tr, br, bl)):
        out[k, 0] = min(max(c[src, 0], 0.0), w - 1.0)
        out[k, 1] = min(max(c[src, 1], 0.0), h - 1.0)
    return out


@numba.njit(cache=True, nogil=True)
def _reading_order(boxes):
    """Indices of the boxes top to bottom, left to right: by the top-left corner's (y, x), then
    neighbours on one line (y within SAME_LINE) swapped into x order (PaddleOCR's sorted_boxes)."""
    x = boxes[:, 0, 0].copy()
    y = boxes[:, 0, 1].copy()
    order = np.argsort(x, kind="mergesort")
    order = order[np.argsort(y[order], kind="mergesort")]
    for i in range(order.size - 1):
        for j in range(i, -1, -1):
            a, b = order[j], order[j + 1]
            if abs(y[b] - y[a]) < SAME_LINE and x[b] < x[a]:
                order[j], order[j + 1] = b, a
            else:
                break
    return order


@numba.njit(cache=True, nogil=True)
def _db_boxes(prob, thresh, box_thresh, unclip_ratio, max_candidates, min_size):
    h, w = prob.shape
    count, top, bottom, start, run_y, run_first, run_last = _components(prob > thresh)
    n = count.size
    chosen = np.arange(n) if n <= max_candidates else np.sort(np.argsort(-count, kind="mergesort")[:max_candidates])
    boxes = np.empty((chosen.size, 4, 2), np.float64)
    scores = np.empty(chosen.size, np.float64)
    first = np.empty(h, np.int64)  # per row of a region, its first and last column
    last = np.empty(h, np.int64)
    px = np.empty(2 * h, np.float64)
    py = np.empty(2 * h, np.float64)
    kept = 0
    for l in chosen:
        rows = bottom[l] - top[l] + 1
        first[:rows] = w
        last[:rows] = -1
        for k in range(start[l], start[l + 1]):
            r = run_y[k] - top[l]
            first[r] = min(first[r], run_first[k])
            last[r] = max(last[r], run_last[k])
        m = 0
        for r in range(rows):  # rows in order, first then last column: sorted by (y, x)
            if last[r] < 0:
                continue
            y = float(top[l] + r)
            px[m], py[m] = first[r], y
            m += 1
            if last[r] != first[r]:
                px[m], py[m] = last[r], y
                m += 1
        hx, hy = _hull(px[:m], py[:m])
        bx, by, ex, ey, u0, u1, v0, v1 = _min_area_rect(hx, hy)
        root = np.sqrt(ex * ex + ey * ey)
        side_u, side_v = (u1 - u0) / root, (v1 - v0) / root
        if min(side_u, side_v) < min_size:
            continue
        score = _box_score(prob, _corners(bx, by, ex, ey, u0, u1, v0, v1))
        if score < box_thresh:
            continue
        perimeter = 2.0 * (side_u + side_v)
        d = side_u * side_v * unclip_ratio / perimeter if perimeter > 0 else 0.0
        if min(side_u, side_v) + 2.0 * d < min_size + 2.0:
            continue
        s = d * root
        boxes[kept] = _clockwise(_corners(bx, by, ex, ey, u0 - s, u1 + s, v0 - s, v1 + s), w, h)
        scores[kept] = score
        kept += 1
    order = _reading_order(boxes[:kept])
    return boxes[:kept][order], scores[:kept][order]


def db_boxes(prob: np.ndarray, thresh: float = 0.3, box_thresh: float = 0.6, unclip_ratio: float = 1.5,
             max_candidates: int = 1000, min_size: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Text boxes from a DB text detector's probability map, as PaddleOCR post-processes it.

    ``prob`` is one map, float32 ``[H, W]``, ``[1, H, W]`` or ``[1, 1, H, W]``.  Pixels above
    ``thresh`` (compared in float32, as numpy compares a float32 map with a Python float) are
    text; each 8-connected region of them (the ``max_candidates`` largest, if there are more)
    gets the minimum-area rotated rectangle around its pixel centres (cv2.minAreaRect of its
    contour: one side lies on an edge of the convex hull; every edge is tried).  A region whose
    rectangle's short side is under ``min_size`` is dropped, and so is one whose score, the
    mean probability over the pixel centres inside the rectangle, is under ``box_thresh``
    (PaddleOCR's "fast" score, which rasterises the rectangle with cv2.fillPoly: the two
    differ by about a percent at the rectangle's edge).  The rectangle is then unclipped:
    every side moves out by ``area * unclip_ratio / perimeter`` (pyclipper's offset without
    the rounded corners), and dropped if its short side is now under ``min_size + 2``.

    Returns ``(boxes, scores)``: float32 ``[K, 4, 2]`` corners ``(x, y)`` clockwise from the
    top-left, in map pixels, clipped to the map; float32 ``[K]`` scores.  Boxes are in reading
    order: top to bottom, and left to right within SAME_LINE pixels.  No box (K = 0) is an
    answer: a map with no text.  ``scale_boxes`` maps boxes to the image the map came from.
    """
    p = _prob_map(prob)
    thresh, box_thresh, unclip_ratio, max_candidates, min_size = _db_params(
        thresh, box_thresh, unclip_ratio, max_candidates, min_size)
    if p.size == 0:
        return np.zeros((0, 4, 2), np.float32), np.zeros(0, np.float32)
    boxes, scores = _db_boxes(p, np.float32(thresh), box_thresh, unclip_ratio, max_candidates, min_size)
    return boxes.astype(np.float32), scores.astype(np.float32)


def _components_reference(mask: np.ndarray) -> list[np.ndarray]:
    """Each 8-connected region's pixels (flat indices, raster order), regions in raster order
    of their first pixel.  Labels are pixel indices: each pixel and the pixel its label names
    take the smallest label next to it, then every pixel the label of the pixel its label
    names, until nothing changes (hook and jump, as Shiloach and Vishkin)."""
    h, w = mask.shape
    big = h * w
    pixels = np.flatnonzero(mask)
    if not pixels.size:
        return []
    label = np.where(mask.reshape(-1), np.arange(big), big)
    while True:
        padded = np.pad(label.reshape(h, w), 1, constant_values=big)
        smallest = label.reshape(h, w).copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(smallest, padded[dy:dy + h, dx:dx + w], out=smallest, where=mask)
        near = smallest.reshape(-1)[pixels]
        new = label.copy()
        np.minimum.at(new, label[pixels], near)
        new[pixels] = np.minimum(new[pixels], near)
        while True:
            jumped = new[new[pixels]]
            if np.array_equal(jumped, new[pixels]):
                break
            new[pixels] = jumped
        if np.array_equal(new, label):
            break
        label = new
    pixels = pixels[np.argsort(label[pixels], kind="stable")]
    starts = np.flatnonzero(np.diff(label[pixels], prepend=-1))
    return np.split(pixels, starts[1:])


def _hull_reference(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Andrew's monotone chain over all of a region's pixels, sorted by (y, x)."""
    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    if len(points) == 1:
        return points
    lower: list[tuple[float, float]] = []
    for p in points:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(points):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def _min_area_rect_reference(hull: np.ndarray) -> tuple[float, ...]:
    if len(hull) == 1:
        return hull[0, 0], hull[0, 1], 1.0, 0.0, 0.0, 0.0, 0.0, 0.0
    e = np.roll(hull, -1, axis=0) - hull
    dx = hull[None, :, 0] - hull[:, None, 0]
    dy = hull[None, :, 1] - hull[:, None, 1]
    u = dx * e[:, 0, None] + dy * e[:, 1, None]
    v = dy * e[:, 0, None] - dx * e[:, 1, None]
    area = (u.max(1) - u.min(1)) * (v.max(1) - v.min(1)) / (e[:, 0] * e[:, 0] + e[:, 1] * e[:, 1])
    i = int(np.argmin(area))
    return hull[i, 0], hull[i, 1], e[i, 0], e[i, 1], u[i].min(), u[i].max(), v[i].min(), v[i].max()


def _corners_reference(bx: float, by: float, ex: float, ey: float, u0: float, u1: float, v0: float,
                       v1: float) -> np.ndarray:
    u, v = np.array([u0, u1, u1, u0]), np.array([v0, v0, v1, v1])
    length2 = ex * ex + ey * ey
    return np.stack([bx + (u * ex - v * ey) / length2, by + (u * ey + v * ex) / length2], axis=1)


def _box_score_reference(prob: np.ndarray, c: np.ndarray) -> float:
    h, w = prob.shape
    ys = np.arange(max(int(np.ceil(c[:, 1].min() - _EPS)), 0), min(int(np.floor(c[:, 1].max() + _EPS)), h - 1) + 1)
    x1, y1 = c[:, 0], c[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    lo, hi = np.minimum(y1, y2), np.maximum(y1, y2)
    y = ys[:, None].astype(np.float64)
    crosses = (y >= lo - _EPS) & (y <= hi + _EPS)
    flat = hi - lo < _EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        x = x1 + np.clip((y - y1) / (y2 - y1), 0.0, 1.0) * (x2 - x1)
    left = np.where(crosses, np.where(flat, np.minimum(x1, x2), x), np.inf).min(axis=1)
    right = np.where(crosses, np.where(flat, np.maximum(x1, x2), x), -np.inf).max(axis=1)
    values = [prob[row, max(int(np.ceil(a - _EPS)), 0):min(int(np.floor(b + _EPS)), w - 1) + 1]
              for row, a, b in zip(ys, left, right) if a <= b]
    inside = np.concatenate(values).astype(np.float64) if values else np.zeros(0)
    return float(np.cumsum(inside)[-1] / inside.size) if inside.size else 0.0  # summed in order, as the kernel


def _clockwise_reference(c: np.ndarray, w: int, h: int) -> np.ndarray:
    p = sorted(c.tolist())
    tl, bl = (p[0], p[1]) if p[1][1] > p[0][1] else (p[1], p[0])
    tr, br = (p[2], p[3]) if p[3][1] > p[2][1] else (p[3], p[2])
    out = np.array([tl, tr, br, bl], np.float64)
    return np.stack([np.clip(out[:, 0], 0.0, w - 1.0), np.clip(out[:, 1], 0.0, h - 1.0)], axis=1)


def _reading_order_reference(boxes: np.ndarray) -> list[int]:
    x, y = boxes[:, 0, 0].tolist(), boxes[:, 0, 1].tolist()
    order = sorted(range(len(boxes)), key=lambda i: (y[i], x[i]))
    for i in range(len(order) - 1):
        for j in range(i, -1, -1):
            a, b = order[j], order[j + 1]
            if abs(y[b] - y[a]) < SAME_LINE and x[b] < x[a]:
                order[j], order[j + 1] = b, a
            else:
                break
    return order


def db_boxes_reference(prob: np.ndarray, thresh: float = 0.3, box_thresh: float = 0.6, unclip_ratio: float = 1.5,
                       max_candidates: int = 1000, min_size: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    p = _prob_map(prob)
    thresh, box_thresh, unclip_ratio, max_candidates, min_size = _db_params(
        thresh, box_thresh, unclip_ratio, max_candidates, min_size)
    h, w = p.shape
    regions = _components_reference(p > np.float32(thresh)) if p.size else []
    if len(regions) > max_candidates:
        largest = np.argsort([-len(r) for r in regions], kind="stable")[:max_candidates]
        regions = [regions[i] for i in sorted(largest)]
    boxes, scores = [], []
    for pixels in regions:
        ys, xs = np.divmod(pixels, w)
        hull = np.array(_hull_reference([(float(x), float(y)) for x, y in zip(xs, ys)]))
        bx, by, ex, ey, u0, u1, v0, v1 = _min_area_rect_reference(hull)
        root = math.sqrt(ex * ex + ey * ey)
        side_u, side_v = (u1 - u0) / root, (v1 - v0) / root
        if min(side_u, side_v) < min_size:
            continue
        score = _box_score_reference(p, _corners_reference(bx, by, ex, ey, u0, u1, v0, v1))
        if score < box_thresh:
            continue
        perimeter = 2.0 * (side_u + side_v)
        d = side_u * side_v * unclip_ratio / perimeter if perimeter > 0 else 0.0
        if min(side_u, side_v) + 2.0 * d < min_size + 2.0:
            continue
        s = d * root
        boxes.append(_clockwise_reference(_corners_reference(bx, by, ex, ey, u0 - s, u1 + s, v0 - s, v1 + s), w, h))
        scores.append(score)
    if not boxes:
        return np.zeros((0, 4, 2), np.float32), np.zeros(0, np.float32)
    order = _reading_order_reference(np.array(boxes))
    return np.array(boxes)[order].astype(np.float32), np.array(scores)[order].astype(np.float32)


def _quads(op: str, boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes)
    if b.dtype.kind not in "fiu" or b.ndim != 3 or b.shape[1:] != (4, 2):
        raise OpInputError(op, f"boxes must be real numbers [K, 4, 2] (four (x, y) corners each), "
                               f"not {b.dtype} {b.shape}")
    b = b.astype(np.float64)
    if not np.isfinite(b).all():
        raise OpInputError(op, "boxes have NaN or infinite coordinates")
    return b


def _size_pair(op: str, name: str, hw: Sequence[int]) -> tuple[int, int]:
    if len(hw) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in hw):
        raise OpParamsError(op, name, f"must be (height, width), two integers >= 1, not {hw!r}")
    return int(hw[0]), int(hw[1])


def scale_boxes(boxes: np.ndarray, from_hw: Sequence[int], to_hw: Sequence[int]) -> np.ndarray:
    """Boxes ``[K, 4, 2]`` found on a ``from_hw`` (height, width) map, on an image of ``to_hw``:
    ``x / from_w * to_w`` and ``y / from_h * to_h`` (as PaddleOCR maps them), clipped to the
    image's pixels.  float32."""
    b = _quads(SCALE_BOXES, boxes)
    fh, fw = _size_pair(SCALE_BOXES, "from_hw", from_hw)
    th, tw = _size_pair(SCALE_BOXES, "to_hw", to_hw)
    x = np.clip(b[..., 0] / fw * tw, 0.0, tw - 1.0)
    y = np.clip(b[..., 1] / fh * th, 0.0, th - 1.0)
    return np.stack([x, y], axis=-1).astype(np.float32)


# -- crops of rotated boxes and aspect-keeping resize -----------------------------------------------


def _fitted_width(h: int, w: int, height: int, width: int) -> int:
    """The width of an ``h`` x ``w`` image resized to ``height`` keeping its aspect, at most
    ``width`` (PaddleOCR's ``resize_norm_img``)."""
    return max(1, min(int(math.ceil(height * (w / float(h)))), width))


def _check_out(op: str, height: int, width: int, pad: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise OpParamsError(op, name, f"must be an integer >= 1, not {value!r}")
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or not 0 <= pad <= 255:
        raise OpParamsError(op, "pad", f"must be an integer from 0 to 255, not {pad!r}")


def _crop_plan_checked(image_shape: tuple[int, ...], boxes: np.ndarray, height: int,
                       width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``_crop_plan`` for an image of ``image_shape``, or OpInputError for a box that does not lie on it."""
    h, w = image_shape[:2]
    maps, sizes, upright, widths, bad = _crop_plan(boxes, h, w, height, width)
    if bad >= 0:
        p = boxes[bad]
        side = int(max(np.hypot(*(p[0] - p[1])), np.hypot(*(p[2] - p[3])), np.hypot(*(p[0] - p[3])),
                       np.hypot(*(p[1] - p[2]))))
        raise OpInputError(CROP_ROTATED, f"box {bad} has a side of {side} pixels on an image of {h}x{w}: "
                                         f"boxes must lie on the image (sides of at most {_longest(h, w)})")
    return maps, sizes, upright, widths


@numba.njit(cache=True, nogil=True)
def _longest(h, w):
    """The longest side a box on an ``h`` x ``w`` image may have (a side of a box on the image is
    at most h + w)."""
    return 2 * (h + w) + 32


@numba.njit(cache=True, nogil=True)
def _side(ax, ay, bx, by):
    dx, dy = ax - bx, ay - by
    return math.sqrt(dx * dx + dy * dy)


@numba.njit(cache=True, nogil=True)
def _crop_plan(boxes, h, w, height, width):
    """Per box of ``boxes`` (float64 [K, 4, 2]) on an ``h`` x ``w`` image: the 3x3 map from
    crop pixels to image pixels, the crop's (height, width) (its longer top or bottom side by
    its longer left or right side, as PaddleOCR's crop), whether it is turned upright, and its
    width once resized to ``height``; and the first box with a side too long to lie on the
    image (-1 if none, else the plan is unfinished)."""
    k = boxes.shape[0]
    maps = np.empty((k, 3, 3), np.float64)
    sizes = np.empty((k, 2), np.int64)
    upright = np.zeros(k, np.bool_)
    widths = np.empty(k, np.int64)
    longest = _longest(h, w)
    for b in range(k):
        p = boxes[b]
        fw = max(_side(p[0, 0], p[0, 1], p[1, 0], p[1, 1]), _side(p[2, 0], p[2, 1], p[3, 0], p[3, 1]))
        fh = max(_side(p[0, 0], p[0, 1], p[3, 0], p[3, 1]), _side(p[1, 0], p[1, 1], p[2, 0], p[2, 1]))
        if max(fw, fh) >= longest + 1:
            return maps, sizes, upright, widths, b
        cw, ch = max(int(fw), 1), max(int(fh), 1)
        _homography(p, cw, ch, maps[b])
        sizes[b, 0], sizes[b, 1] = ch, cw
        upright[b] = ch / cw >= TALL
        rh, rw = (cw, ch) if upright[b] else (ch, cw)
        widths[b] = max(1, min(int(math.ceil(height * (rw / rh))), width))  # as _fitted_width
    return maps, sizes, upright, widths, -1


#: A box whose corners are this close (in pixels) to a parallelogram's is taken as one, mapped
#: affinely (no division per pixel): a rotated rectangle's corners rounded to float32 are off
#: by that much, far below the warp's 1/256 of a pixel.
_FLAT = 1.0 / 512


@numba.njit(cache=True, nogil=True)
def _homography(p, cw, ch, m):
    """Into ``m``: the perspective map taking the crop's corners (0, 0), (cw, 0), (cw, ch),
    (0, ch) to the box's four corners ``p``, in closed form (Heckbert's square-to-quadrilateral
    map, scaled to the crop); for a parallelogram (as a rotated rectangle is, within _FLAT), or
    a box that is not a strictly convex quadrilateral (a line, a point, corners out of order),
    the affine map fixed by its first, second and fourth corner."""
    x0, y0, x1, y1, x2, y2, x3, y3 = p[0, 0], p[0, 1], p[1, 0], p[1, 1], p[2, 0], p[2, 1], p[3, 0], p[3, 1]
    left = right = 0
    scale = 1.0
    for i in range(4):
        ex, ey = p[(i + 1) % 4, 0] - p[i, 0], p[(i + 1) % 4, 1] - p[i, 1]
        scale = max(scale, abs(ex), abs(ey))
    for i in range(4):
        ex, ey = p[(i + 1) % 4, 0] - p[i, 0], p[(i + 1) % 4, 1] - p[i, 1]
        fx, fy = p[(i + 2) % 4, 0] - p[(i + 1) % 4, 0], p[(i + 2) % 4, 1] - p[(i + 1) % 4, 1]
        turn = ex * fy - ey * fx
        if turn > 1e-9 * scale * scale:
            left += 1
        elif turn < -1e-9 * scale * scale:
            right += 1
    m[2, 2] = 1.0
    parallelogram = abs(x0 - x1 + x2 - x3) <= _FLAT and abs(y0 - y1 + y2 - y3) <= _FLAT
    if (left == 4 or right == 4) and not parallelogram:
        dx1, dx2, dx3 = x1 - x2, x3 - x2, x0 - x1 + x2 - x3
        dy1, dy2, dy3 = y1 - y2, y3 - y2, y0 - y1 + y2 - y3
        den = dx1 * dy2 - dx2 * dy1
        g = (dx3 * dy2 - dx2 * dy3) / den
        k = (dx1 * dy3 - dx3 * dy1) / den
        m[0, 0], m[0, 1], m[0, 2] = (x1 - x0 + g * x1) / cw, (x3 - x0 + k * x3) / ch, x0
        m[1, 0], m[1, 1], m[1, 2] = (y1 - y0 + g * y1) / cw, (y3 - y0 + k * y3) / ch, y0
        m[2, 0], m[2, 1] = g / cw, k / ch
        if np.isfinite(m).all():
            return
    m[0, 0], m[0, 1], m[0, 2] = (x1 - x0) / cw, (x3 - x0) / ch, x0
    m[1, 0], m[1, 1], m[1, 2] = (y1 - y0) / cw, (y3 - y0) / ch, y0
    m[2, 0], m[2, 1] = 0.0, 0.0


def _crop_plan_reference(image_shape: tuple[int, ...], boxes: np.ndarray, height: int,
                         width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    h, w = image_shape[:2]
    maps = np.empty((len(boxes), 3, 3), np.float64)
    sizes = np.empty((len(boxes), 2), np.int64)
    upright = np.zeros(len(boxes), np.bool_)
    widths = np.empty(len(boxes), np.int64)
    for b, p in enumerate(boxes.tolist()):
        side = [math.sqrt((p[i][0] - p[j][0]) * (p[i][0] - p[j][0]) + (p[i][1] - p[j][1]) * (p[i][1] - p[j][1]))
                for i, j in ((0, 1), (2, 3), (0, 3), (1, 2))]
        if max(side) >= 2 * (h + w) + 32 + 1:
            raise OpInputError(CROP_ROTATED, f"box {b} has a side of {int(max(side))} pixels: "
                                             f"boxes must lie on the image")
        cw, ch = max(int(max(side[:2])), 1), max(int(max(side[2:])), 1)
        maps[b] = _homography_reference(np.array(p), cw, ch)
        sizes[b] = ch, cw
        upright[b] = ch / cw >= TALL
        rh, rw = (cw, ch) if upright[b] else (ch, cw)
        widths[b] = _fitted_width(rh, rw, height, width)
    return maps, sizes, upright, widths


def _homography_reference(p: np.ndarray, cw: int, ch: int) -> np.ndarray:
    edges = np.roll(p, -1, axis=0) - p
    turns = edges[:, 0] * np.roll(edges[:, 1], -1) - edges[:, 1] * np.roll(edges[:, 0], -1)
    tol = 1e-9 * max(float(np.abs(edges).max()), 1.0) ** 2
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = p.tolist()
    parallelogram = abs(x0 - x1 + x2 - x3) <= _FLAT and abs(y0 - y1 + y2 - y3) <= _FLAT
    if ((turns > tol).all() or (turns < -tol).all()) and not parallelogram:
        with np.errstate(all="ignore"):
            dx1, dx2, dx3 = x1 - x2, x3 - x2, x0 - x1 + x2 - x3
            dy1, dy2, dy3 = y1 - y2, y3 - y2, y0 - y1 + y2 - y3
            den = np.float64(dx1 * dy2 - dx2 * dy1)
            g, k = (dx3 * dy2 - dx2 * dy3) / den, (dx1 * dy3 - dx3 * dy1) / den
            m = np.array([[(x1 - x0 + g * x1) / cw, (x3 - x0 + k * x3) / ch, x0],
                          [(y1 - y0 + g * y1) / cw, (y3 - y0 + k * y3) / ch, y0], [g / cw, k / ch, 1.0]])
        if np.isfinite(m).all():
            return m
    return np.array([[(x1 - x0) / cw, (x3 - x0) / ch, x0], [(y1 - y0) / cw, (y3 - y0) / ch, y0], [0.0, 0.0, 1.0]])


# The warp samples the image at each crop pixel's position under the box's map, in float64
# per pixel (a row's terms once per row, the column's term per pixel: a contiguous loop numba
# vectorises, the division included), clamped to the image (the edge pixels repeated beyond
# it, as cv2's BORDER_REPLICATE) and rounded to 1/256 of a pixel; the bilinear blend is then
# integer arithmetic on those 8-bit fractions, rounded once.  That is within 1 of the exact
# blend, and of cv2.warpPerspective (which rounds positions to 1/32) where the image is smooth.

_SUB_BITS = 8  # sub-pixel positions and bilinear weights: 1/256 of a pixel


@numba.njit(cache=True, nogil=True)
def _warp_into(src, m, ch, cw, cols, crop, offs, wxs, wys):
    """Bilinear sample of ``src`` (HWC) at ``m`` applied to each crop pixel (x, y), into
    ``crop`` (flat, ``ch * cw * C``); ``cols`` holds 0.0, 1.0, ... and ``offs``, ``wxs``,
    ``wys`` are a row's scratch (each at least ``cw`` long)."""
    h, w, c = src.shape
    s = src.reshape(-1)
    right = np.uint64(c if w > 1 else 0)  # the next pixel along x and y (none in an image 1 pixel wide or high)
    down = np.uint64(w * c if h > 1 else 0)
    one = np.uint64(1)
    xl, yl = float(w - 1), float(h - 1)
    xm, ym = np.int32(max(w - 2, 0)), np.int32(max(h - 2, 0))
    wc, cc = np.uint64(w * c), np.uint64(c)
    m00, m10, m20 = m[0, 0], m[1, 0], m[2, 0]
    affine = m[2, 0] == 0.0 and m[2, 1] == 0.0 and m[2, 2] == 1.0  # the division by 1 left out (exact)
    for i in range(ch):
        rx = m[0, 1] * i + m[0, 2]
        ry = m[1, 1] * i + m[1, 2]
        rw = m[2, 1] * i + m[2, 2]
        if affine:
            for j in range(cw):  # contiguous: vectorised
                sx = m00 * cols[j] + rx
                sy = m10 * cols[j] + ry
                sx = min(sx, xl) if sx >= 0.0 else 0.0
                sy = min(sy, yl) if sy >= 0.0 else 0.0
                x = np.int32(sx * 256.0 + 0.5)
                y = np.int32(sy * 256.0 + 0.5)
                x0 = min(x >> 8, xm)
                y0 = min(y >> 8, ym)
                offs[j] = np.uint64(y0) * wc + np.uint64(x0) * cc
                wxs[j] = x - (x0 << 8)
                wys[j] = y - (y0 << 8)
        else:
            for j in range(cw):
                d = m20 * cols[j] + rw
                sx = (m00 * cols[j] + rx) / d
                sy = (m10 * cols[j] + ry) / d
                sx = min(sx, xl) if sx >= 0.0 else 0.0  # NaN (a degenerate map) to 0 too
                sy = min(sy, yl) if sy >= 0.0 else 0.0
                x = np.int32(sx * 256.0 + 0.5)
                y = np.int32(sy * 256.0 + 0.5)
                x0 = min(x >> 8, xm)
                y0 = min(y >> 8, ym)
                offs[j] = np.uint64(y0) * wc + np.uint64(x0) * cc
                wxs[j] = x - (x0 << 8)
                wys[j] = y - (y0 << 8)
        row = crop[i * cw * c:(i + 1) * cw * c]
        if c == 3:
            for j in range(cw):
                p, ax, ay = offs[j], wxs[j], wys[j]
                q = p + down
                a, b, e, f = np.int32(s[p]), np.int32(s[p + right]), np.int32(s[q]), np.int32(s[q + right])
                t, u = (a << 8) + (b - a) * ax, (e << 8) + (f - e) * ax
                row[3 * j] = np.uint8(((t << 8) + (u - t) * ay + 32768) >> 16)
                p, q = p + one, q + one
                a, b, e, f = np.int32(s[p]), np.int32(s[p + right]), np.int32(s[q]), np.int32(s[q + right])
                t, u = (a << 8) + (b - a) * ax, (e << 8) + (f - e) * ax
                row[3 * j + 1] = np.uint8(((t << 8) + (u - t) * ay + 32768) >> 16)
                p, q = p + one, q + one
                a, b, e, f = np.int32(s[p]), np.int32(s[p + right]), np.int32(s[q]), np.int32(s[q + right])
                t, u = (a << 8) + (b - a) * ax, (e << 8) + (f - e) * ax
                row[3 * j + 2] = np.uint8(((t << 8) + (u - t) * ay + 32768) >> 16)
        else:
            for j in range(cw):
                p, ax, ay = offs[j], wxs[j], wys[j]
                for k in range(c):
                    q = p + np.uint64(k)
                    a, b = np.int32(s[q]), np.int32(s[q + right])
                    e, f = np.int32(s[q + down]), np.int32(s[q + down + right])
                    t, u = (a << 8) + (b - a) * ax, (e << 8) + (f - e) * ax
                    row[c * j + k] = np.uint8(((t << 8) + (u - t) * ay + 32768) >> 16)


@numba.njit(cache=True, nogil=True)
def _crop_rotated(src, maps, sizes, upright, widths, height, width, pad):
    """All the crops, warped one at a time into a scratch crop (reused: no allocation per box
    but the resize's taps), turned upright if need be, resized into their batch row and padded."""
    k, c = maps.shape[0], src.shape[2]
    out = np.empty((k, height, width, c), np.uint8)
    area, longest = 1, 1
    for b in range(k):
        area = max(area, sizes[b, 0] * sizes[b, 1])
        longest = max(longest, sizes[b, 0], sizes[b, 1])
    crop = np.empty(area * c, np.uint8)
    turned = np.empty(area * c if upright.any() else 0, np.uint8)
    wide = np.empty(2 * longest * c, np.uint8)  # a crop one column wide, doubled (see _two_columns)
    cols = np.arange(longest).astype(np.float64)
    offs = np.empty(longest, np.uint64)
    wxs = np.empty(longest, np.int32)
    wys = np.empty(longest, np.int32)
    for b in range(k):
        ch, cw = sizes[b, 0], sizes[b, 1]
        _warp_into(src, maps[b], ch, cw, cols, crop, offs, wxs, wys)
        img = crop[:ch * cw * c].reshape(ch, cw, c)
        if upright[b]:  # np.rot90: a quarter turn counter-clockwise
            for i in range(cw):
                for j in range(ch):
                    for e in range(c):
                        turned[(i * ch + j) * c + e] = crop[(j * cw + cw - 1 - i) * c + e]
            img = turned[:ch * cw * c].reshape(cw, ch, c)
        _resize_padded(img, wide, out, b, widths[b], pad)
    return out


@numba.njit(cache=True, nogil=True)
def _resize_padded(img, wide, out, b, used, pad):
    """``img`` (HWC, C-contiguous) resized into ``out[b, :, :used]`` (``out`` NHWC,
    C-contiguous), ``pad`` after it; ``wide`` holds a copy of an image one column wide with its
    column doubled (see _two_columns) and is at least 2 * H * C long."""
    height, width, c = out.shape[1], out.shape[2], out.shape[3]
    if img.shape[1] == 1:
        n = img.shape[0]
        for i in range(n):
            for e in range(c):
                wide[2 * i * c + e] = img[i, 0, e]
                wide[(2 * i + 1) * c + e] = img[i, 0, e]
        img = wide[:2 * n * c].reshape(n, 2, c)
    y0, y1, b0, b1 = _row_taps(img.shape[0], height)
    xo, a1 = _column_taps(img.shape[1], used, c)
    path = _path(img.shape[0], img.shape[1], height, used, c, _rows_used(y0, y1), xo, a1)
    flat = out.reshape(-1)
    row = width * c
    base = b * height * row
    _resize_rows(img, y0, y1, b0, b1, xo, a1, path, flat, base, row, 0, height)
    for i in range(height):
        flat[base + i * row + used * c:base + (i + 1) * row] = pad


def _image(op: str, image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3:
        raise OpInputError(op, f"the image must be uint8 HWC (one image), not {img.dtype} {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0 or img.shape[2] == 0:
        raise OpInputError(op, f"an image of {img.shape} has no pixels to crop")
    return np.ascontiguousarray(img)


def crop_rotated(image: np.ndarray, boxes: np.ndarray, height: int = 48, width: int = 320,
                 pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each box of a uint8 HWC image cut out upright at the recogniser's size.

    A box is four corners ``(x, y)``, clockwise from the top-left (as ``db_boxes`` gives
    them, scaled to the image).  Its crop, sampled bilinearly (at positions rounded to 1/256
    of a pixel) through the perspective map from the crop's corners to the box's (affine for a
    parallelogram, as a rotated rectangle is), has the box's own size: its longer top or bottom side by
    its longer left or right side (PaddleOCR's ``get_rotate_crop_image``, which uses cubic
    sampling).  A crop at least TALL times as high as wide (a vertical line of text) is turned
    a quarter counter-clockwise.  It is then resized to ``height`` keeping its aspect, to the
    width ``min(ceil(height * w / h), width)``, and padded on the right with ``pad`` up to
    ``width``.

    Returns the crops, uint8 ``[K, height, width, C]``, and the widths used, int32 ``[K]``.
    """
    img = _image(CROP_ROTATED, image)
    b = _quads(CROP_ROTATED, boxes)
    _check_out(CROP_ROTATED, height, width, pad)
    maps, sizes, upright, widths = _crop_plan_checked(img.shape, b, height, width)
    return _crop_rotated(img, maps, sizes, upright, widths, height, width, pad), widths.astype(np.int32)


def _warp_reference(src: np.ndarray, m: np.ndarray, ch: int, cw: int) -> np.ndarray:
    h, w, c = src.shape
    i = np.arange(ch, dtype=np.float64)[:, None]
    j = np.arange(cw, dtype=np.float64)[None, :]
    with np.errstate(all="ignore"):
        d = m[2, 0] * j + (m[2, 1] * i + m[2, 2])
        sx = (m[0, 0] * j + (m[0, 1] * i + m[0, 2])) / d
        sy = (m[1, 0] * j + (m[1, 1] * i + m[1, 2])) / d
    sx = np.where(sx >= 0.0, np.minimum(sx, w - 1.0), 0.0)
    sy = np.where(sy >= 0.0, np.minimum(sy, h - 1.0), 0.0)
    x = np.floor(sx * 256.0 + 0.5).astype(np.int64)  # 1/256 of a pixel
    y = np.floor(sy * 256.0 + 0.5).astype(np.int64)
    x0 = np.minimum(x >> 8, max(w - 2, 0))
    y0 = np.minimum(y >> 8, max(h - 2, 0))
    ax, ay = (x - (x0 << 8))[..., None], (y - (y0 << 8))[..., None]
    s = src.astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    v = ((256 - ay) * ((256 - ax) * s[y0, x0] + ax * s[y0, x1]) + ay * ((256 - ax) * s[y1, x0] + ax * s[y1, x1]))
    return ((v + 32768) >> 16).astype(np.uint8)


def crop_rotated_reference(image: np.ndarray, boxes: np.ndarray, height: int = 48, width: int = 320,
                           pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    img = _image(CROP_ROTATED, image)
    b = _quads(CROP_ROTATED, boxes)
    _check_out(CROP_ROTATED, height, width, pad)
    maps, sizes, upright, widths = _crop_plan_reference(img.shape, b, height, width)
    out = np.full((len(b), height, width, img.shape[2]), pad, np.uint8)
    for i in range(len(b)):
        crop = _warp_reference(img, maps[i], int(sizes[i, 0]), int(sizes[i, 1]))
        if upright[i]:
            crop = np.rot90(crop)
        out[i, :, :widths[i]] = resize_reference(np.ascontiguousarray(crop), height, int(widths[i]))
    return out, widths.astype(np.int32)


def _images(images: np.ndarray | Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The images as a list of HWC arrays, and the NHWC array if one was given (or an HWC
    image, as a batch of one); OpInputError for anything else or an image without pixels."""
    if isinstance(images, np.ndarray):
        batch = _batch(RESIZE_PAD, images)
        imgs = list(batch)
    else:
        batch, imgs = None, []
        for i, img in enumerate(images):
            a = np.asarray(img)
            if a.ndim != 3:
                raise OpInputError(RESIZE_PAD, f"a sequence of images must hold HWC images; image {i} is "
                                               f"{a.ndim}-D {a.shape}")
            imgs.append(_batch(RESIZE_PAD, a)[0])
        if not imgs:
            raise OpInputError(RESIZE_PAD, "an empty sequence has no images (for none, pass an empty NHWC array)")
        if len({img.shape[2] for img in imgs}) > 1:
            raise OpInputError(RESIZE_PAD, f"the images have different channel counts: {[img.shape for img in imgs]}")
    for img in imgs:
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise OpInputError(RESIZE_PAD, f"an image of {img.shape[0]}x{img.shape[1]} pixels has nothing to resize")
    return imgs, batch


@numba.njit(cache=True, nogil=True)
def _resize_pad(batch, widths, pad, out):
    wide = np.empty(2 * batch.shape[1] * batch.shape[3], np.uint8)
    for b in range(batch.shape[0]):
        _resize_padded(batch[b], wide, out, b, widths[b], pad)


def resize_pad(images: np.ndarray | Sequence[np.ndarray], height: int, width: int,
               pad: int = 0, *, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Aspect-keeping resize to ``height`` and padding on the right to ``width``, as a text
    recogniser takes its input: each image gets the width ``min(ceil(height * w / h), width)``
    (bilinear, as ``image.resize``: within 1 of cv2.INTER_LINEAR) and ``pad`` after it.

    ``images`` is one HWC uint8 image, an NHWC batch, or a sequence of HWC images of any sizes
    (crops).  Returns uint8 ``[N, height, width, C]`` (N = 1 for one image) and each image's
    width, int32 ``[N]``.  ``out``, a uint8 ``[N, height, width, C]`` array, takes the images
    instead of a new array (and is returned).
    """
    _check_out(RESIZE_PAD, height, width, pad)
    imgs, batch = _images(images)
    widths = np.array([_fitted_width(img.shape[0], img.shape[1], height, width) for img in imgs], np.int64)
    shape = (len(imgs), height, width, imgs[0].shape[2] if imgs else batch.shape[3])
    dst = _output(RESIZE_PAD, imgs, out, shape, np.uint8, batched=True)
    if batch is not None:
        _resize_pad(batch, widths, pad, dst)
        return dst, widths.astype(np.int32)
    wide = np.empty(2 * max(img.shape[0] for img in imgs) * shape[3], np.uint8)
    for b, img in enumerate(imgs):  # each its own size: one kernel call each
        _resize_padded(img, wide, dst, b, widths[b], pad)
    return dst, widths.astype(np.int32)


def resize_pad_reference(images: np.ndarray | Sequence[np.ndarray], height: int, width: int,
                         pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    _check_out(RESIZE_PAD, height, width, pad)
    imgs, batch = _images(images)
    channels = batch.shape[3] if batch is not None else imgs[0].shape[2]
    widths = [_fitted_width(img.shape[0], img.shape[1], height, width) for img in imgs]
    out = np.full((len(imgs), height, width, channels), pad, np.uint8)
    for b, (img, w) in enumerate(zip(imgs, widths)):
        out[b, :, :w] = resize_reference(img, height, w)
    return out, np.array(widths, np.int32)


# -- CTC greedy decoding ----------------------------------------------------------------------------


def _probs(probs: np.ndarray, blank: int) -> np.ndarray:
    p = np.asarray(probs)
    if p.dtype.kind != "f" or p.ndim != 3:
        raise OpInputError(CTC_GREEDY, f"needs float scores [N, T, C] (batch, steps, classes), not {p.dtype} {p.shape}")
    if p.shape[2] == 0:
        raise OpInputError(CTC_GREEDY, f"scores {p.shape} have no classes")
    if isinstance(blank, bool) or not isinstance(blank, (int, np.integer)) or not 0 <= blank < p.shape[2]:
        raise OpParamsError(CTC_GREEDY, "blank", f"must be a class from 0 to {p.shape[2] - 1}, not {blank!r}")
    return np.ascontiguousarray(p if p.dtype in (np.float32, np.float64) else p.astype(np.float32))


@numba.njit(cache=True, nogil=True)
def _ctc_collapse(best, top, blank):
    n, steps = best.shape
    labels = np.full((n, steps), -1, np.int32)
    lengths = np.zeros(n, np.int32)
    confidence = np.zeros(n, np.float32)
    for r in range(n):
        previous, kept, total = -1, 0, 0.0
        for t in range(steps):
            label = best[r, t]
            if label != blank and label != previous:
                labels[r, kept] = label
                kept += 1
                total += top[r, t]
            previous = label
        lengths[r] = kept
        if kept:
            confidence[r] = total / kept
    return labels, lengths, confidence


def ctc_greedy(probs: np.ndarray, blank: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy (best path) CTC decoding of a recogniser's softmax ``[N, T, C]``: per row, the
    most likely class of each step (the first of equal ones; a NaN wins as in np.argmax),
    repeats collapsed, ``blank`` dropped.

    Returns ``(labels, lengths, confidence)``: int32 ``[N, T]`` class labels left-aligned and
    padded with -1, int32 ``[N]`` how many, and float32 ``[N]`` the mean probability of the
    steps kept (0 for a row that kept none), as PaddleOCR's CTCLabelDecode scores a line.

    Each step's best class is numpy's argmax (vectorised: 6x faster than a scalar loop over a
    recogniser's 6,625 classes); the kernel collapses the path.
    """
    p = _probs(probs, blank)
    best = np.argmax(p, axis=2)
    top = np.take_along_axis(p, best[..., None], axis=2)[..., 0]
    return _ctc_collapse(best, top, int(blank))


def ctc_greedy_reference(probs: np.ndarray, blank: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = _probs(probs, blank)
    n, steps, _ = p.shape
    best = np.argmax(p, axis=2)
    top = np.take_along_axis(p, best[..., None], axis=2)[..., 0].astype(np.float64)
    keep = best != blank
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    labels = np.full((n, steps), -1, np.int32)
    lengths = keep.sum(axis=1).astype(np.int32)
    confidence = np.zeros(n, np.float32)
    for r in range(n):
        labels[r, :lengths[r]] = best[r, keep[r]]
        if lengths[r]:
            confidence[r] = top[r, keep[r]].mean()
    return labels, lengths, confidence


def check_vocabulary(vocabulary: Sequence[str], classes: int, blank: int = 0) -> None:
    """A recogniser scoring ``classes`` classes, one of them the CTC ``blank``, needs a
    character for each of the other ``classes - 1``: OpInputError names a shorter vocabulary."""
    if len(vocabulary) < classes - 1:
        raise OpInputError(LABELS_TO_TEXT, (
            f"the vocabulary has {len(vocabulary)} characters but the model scores {classes} classes "
            f"({classes - 1} besides the blank {blank}): a PaddleOCR model's vocabulary is its 'character' "
            f"metadata, one character a line, and a space as the last class if it was trained with spaces "
            f"(vocabulary_from_metadata(text, space=True))"))


def labels_to_text(labels: np.ndarray, lengths: np.ndarray, vocabulary: Sequence[str], blank: int = 0,
                   classes: int | None = None) -> list[str]:
    """The text of each row of ``ctc_greedy``'s labels: class ``i`` is ``vocabulary[i - 1]``
    for ``i > blank`` and ``vocabulary[i]`` below it (the vocabulary lists every class but the
    blank, in order; with the blank 0, as PaddleOCR's, class i is vocabulary[i - 1]).  Give
    ``classes`` (the recogniser's C) to check the vocabulary is long enough for every class;
    a label beyond the vocabulary raises OpInputError either way."""
    lab, lens = np.asarray(labels), np.asarray(lengths)
    if lab.ndim != 2 or lab.dtype.kind not in "iu" or lens.shape != (lab.shape[0],) or lens.dtype.kind not in "iu":
        raise OpInputError(LABELS_TO_TEXT, f"needs integer labels [N, T] and lengths [N], as ctc_greedy gives, "
                                           f"not {lab.dtype} {lab.shape} and {lens.dtype} {lens.shape}")
    if ((lens < 0) | (lens > lab.shape[1])).any():
        raise OpInputError(LABELS_TO_TEXT, f"lengths must be from 0 to {lab.shape[1]}, not {lens.tolist()}")
    if classes is not None:
        check_vocabulary(vocabulary, classes, blank)
    texts = []
    for row, n in zip(lab, lens):
        used = row[:n].astype(np.int64)
        if n and (used.min() < 0 or (used == blank).any() or used.max() > len(vocabulary)):
            raise OpInputError(LABELS_TO_TEXT, (
                f"labels {used.tolist()} are not all classes of a vocabulary of {len(vocabulary)} characters "
                f"besides the blank {blank} (classes 0 to {len(vocabulary)}): is the vocabulary the model's?"))
        texts.append("".join(vocabulary[i - (i > blank)] for i in used.tolist()))
    return texts


def vocabulary_from_metadata(text: str, space: bool = True) -> list[str]:
    """A PaddleOCR recogniser's vocabulary from its ``character`` metadata (or dictionary file):
    one character a line (only ``\\n`` and ``\\r\\n`` end a line; other whitespace, such as an
    ideographic space, is a character), with ``' '`` appended as the last class if ``space``
    (PaddleOCR's ``use_space_char``, how its released models were trained)."""
    if not isinstance(text, str):
        raise OpInputError(LABELS_TO_TEXT, f"the vocabulary must be text, not {type(text).__name__}")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocabulary = [line[:-1] if line.endswith("\r") else line for line in lines]
    return vocabulary + [" "] if space else vocabulary
