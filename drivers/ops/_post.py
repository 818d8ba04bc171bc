"""Post-processing ops: softmax, top-k, argmax, hysteresis, non-max suppression, dequantisation.

Scores are the last axis (softmax, top-k, argmax) or, for the hysteresis, the first: a
model's outputs ``[N, ...]`` for N frames in time order.  Float scores keep float64 and
become float32 otherwise.  Each op is a numba kernel behind a thin function that checks
and shapes its input, with ``<op>_reference``, the same op in plain numpy, next to it for
the tests.  NaN is handled as numpy handles it, and each function says how.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from ._exceptions import OpInputError, OpParamsError

__all__ = ["softmax", "topk", "argmax", "threshold_hysteresis", "nms", "nms_rows", "dequantize_int8"]


def _scores(op: str, x: np.ndarray, floats: bool = True) -> np.ndarray:
    """Real scores, at least 1-D; float64 stays, others become float32 (if ``floats``)."""
    x = np.asarray(x)
    if x.ndim == 0 or x.dtype.kind not in "fiu":
        raise OpInputError(op, f"scores must be real numbers with at least one axis, not {x.dtype} {x.shape}")
    return x if not floats or x.dtype in (np.float32, np.float64) else x.astype(np.float32)


def _rows(op: str, x: np.ndarray, floats: bool = True) -> tuple[np.ndarray, tuple[int, ...]]:
    """Scores as C-contiguous rows over the last axis, which must not be empty, and the
    leading axes to give the result back."""
    x = _scores(op, x, floats)
    if x.shape[-1] == 0:
        raise OpInputError(op, f"an empty last axis ({x.shape}) has no scores to choose from")
    lead = x.shape[:-1]
    if x.ndim == 2 and x.flags.c_contiguous:  # as a model gives them: no copy, no reshape
        return x, lead
    return np.ascontiguousarray(x.reshape(math.prod(lead), x.shape[-1])), lead


# -- float32 rows at numpy's speed ------------------------------------------------------------------
#
# numba vectorises neither a float max (its NaN rules) nor exp (no SVML here), where numpy has
# both.  So for float32 scores the maximum comes from integer reductions over the floats'
# bits, which vectorise: the largest signed bits (the largest float if it is positive), and
# the largest and smallest magnitude (bits without the sign: above +inf's is a NaN; the
# least is the largest float when all are negative).  exp is a polynomial (Cephes' expf,
# within 2 ulp) with the power of two put in the exponent bits.


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bits are the int32 ``bits``."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.int32), codegen


_INF_BITS = 0x7F800000
_MAGNITUDE = 0x7FFFFFFF


@numba.njit(cache=True, nogil=True)
def _bits_stats(bits):
    """Of float32 bits (int32): the largest signed, the largest and the smallest magnitude."""
    top = np.int32(-2147483648)
    most = np.int32(0)
    least = np.int32(_MAGNITUDE)
    for j in range(bits.size):
        b = bits[j]
        top = b if b > top else top
        a = np.int32(b & _MAGNITUDE)
        most = a if a > most else most
        least = a if a < least else least
    return top, most, least


@numba.njit(cache=True, nogil=True)
def _max32(bits):
    """The largest of float32 bits as a float32 (NaN if one is NaN, as np.max)."""
    top, most, least = _bits_stats(bits)
    if most > _INF_BITS:
        return _F32(np.nan)
    if top >= 0:
        return _float32_from_bits(top)
    return _float32_from_bits(np.int32(least | np.int32(-2147483648)))


_F32 = np.float32
_EXP_LO = _F32(-87.33654)  # below: exp is under float32's smallest normal; 0
_LOG2E, _LN2_HI, _LN2_LO = _F32(1.44269504088896341), _F32(0.693359375), _F32(-2.12194440e-4)
_E0, _E1, _E2 = _F32(1.9875691500e-4), _F32(1.3981999507e-3), _F32(8.3334519073e-3)
_E3, _E4, _E5 = _F32(4.1665795894e-2), _F32(1.6666665459e-1), _F32(5.0000001201e-1)
_HALF32, _ONE32, _ZERO32 = _F32(0.5), _F32(1.0), _F32(0.0)


@numba.njit(cache=True, nogil=True)
def _exp_shifted(row, top, dst):
    """dst = exp(row - top) in float32, for row <= top (vectorised)."""
    for j in range(row.size):
        d = row[j] - top
        t = d if d > _EXP_LO else _EXP_LO
        n = np.floor(t * _LOG2E + _HALF32)
        r = t - n * _LN2_HI - n * _LN2_LO
        p = (((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5) * r * r + r + _ONE32
        e = p * _float32_from_bits(np.int32((np.int32(n) + 127) << 23))
        dst[j] = e if d >= _EXP_LO else _ZERO32


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz"})  # the sum vectorises
def _sum(row):
    total = 0.0
    for j in range(row.size):
        total += row[j]
    return total


@numba.njit(cache=True, nogil=True)
def _scale(row, s):
    for j in range(row.size):
        row[j] *= s


@numba.njit(cache=True, nogil=True)
def _softmax32(x):
    out = np.empty_like(x)
    bits = x.view(np.int32)
    for r in range(x.shape[0]):
        row, dst = x[r], out[r]
        top = _max32(bits[r])
        if not np.isfinite(top):  # a NaN, +inf, or all -inf: all NaN, as numpy
            dst[:] = np.nan
            continue
        _exp_shifted(row, top, dst)
        _scale(dst, _F32(1.0 / _sum(dst)))
    return out


_BLOCK = 512  # argmax: the first block of the best statistic holds the first maximum


@numba.njit(cache=True, nogil=True)
def _first(bits, mask, value, above):
    """The first j with ``bits[j] & mask`` equal to ``value`` (above it if ``above``), else
    ``bits.size``: a min-reduction over indices, which vectorises where a search loop does not."""
    n = bits.size
    first = n
    for j in range(n):
        b = bits[j] & mask
        c = j if (b > value if above else b == value) else n
        first = c if c < first else first
    return first


@numba.njit(cache=True, nogil=True)
def _argmax32(x):
    out = np.empty(x.shape[0], np.int64)
    bits = x.view(np.int32)
    n = x.shape[1]
    for r in range(x.shape[0]):
        key = bits[r]
        top, most, least = _bits_stats(key[:_BLOCK])
        up = down = 0  # the first blocks of the largest signed bits and of the least magnitude
        for b in range(_BLOCK, n, _BLOCK):
            t, m, s = _bits_stats(key[b:b + _BLOCK])
            most = m if m > most else most
            if t > top:
                up, top = b, t
            if s < least:
                down, least = b, s
        if most > _INF_BITS:  # np.argmax: the first NaN wins
            j = _first(key, _MAGNITUDE, _INF_BITS, True)
        elif top > 0:  # the largest is positive: its bits
            j = up + _first(key[up:up + _BLOCK], -1, top, False)
        elif top < 0:  # all negative: the least magnitude
            j = down + _first(key[down:down + _BLOCK], _MAGNITUDE, least, False)
        else:  # the largest is 0.0: the first zero (-0.0 == 0.0)
            j = _first(key, _MAGNITUDE, 0, False)
        out[r] = j
    return out


_FLOAT32 = np.dtype(np.float32)


def _float32_rows(x: object) -> bool:
    """Scores as a model gives them (float32 [N, C], C-contiguous, C > 0): the kernels take
    them as they are (a call costs about a microsecond less)."""
    return (type(x) is np.ndarray and x.dtype is _FLOAT32 and x.ndim == 2  # type: ignore[attr-defined]
            and x.shape[1] > 0 and x.flags.c_contiguous)  # type: ignore[attr-defined]


# -- softmax ----------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})  # the sums vectorise; no NaN flags
def _softmax(x):
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        row, dst = x[r], out[r]
        top = row[0]
        for j in range(row.size):  # np.max: a NaN wins
            if row[j] > top or np.isnan(row[j]):
                top = row[j]
        total = 0.0
        for j in range(row.size):
            e = np.exp(row[j] - top)
            dst[j] = e
            total += e
        scale = 1.0 / total
        for j in range(row.size):
            dst[j] *= scale
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, ``exp(x - max)`` normalised.  A row with a NaN, with +inf,
    or all -inf comes out all NaN, as the same formula does in numpy."""
    if _float32_rows(x):
        return _softmax32(x)
    rows, lead = _rows("post.softmax", x)
    out = (_softmax32 if rows.dtype == np.float32 else _softmax)(rows)
    return out if len(lead) == 1 else out.reshape(*lead, rows.shape[1])


def softmax_reference(x: np.ndarray) -> np.ndarray:
    x = _rows("post.softmax", x)[0].reshape(np.shape(x))
    with np.errstate(invalid="ignore"):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)


# -- top-k and argmax -------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _ranks_before(a, b):
    """``a`` comes strictly before ``b`` in descending order, NaN last."""
    return a > b or (np.isnan(b) and not np.isnan(a))


@numba.njit(cache=True, nogil=True)
def _topk(x, k):
    rows, n = x.shape
    index = np.empty((rows, k), np.int64)
    value = np.empty((rows, k), x.dtype)
    for r in range(rows):
        held = 0
        for i in range(n):  # insertion into the sorted k best so far; equal values stay in index order
            v = x[r, i]
            if held == k and not _ranks_before(v, value[r, k - 1]):
                continue
            p = held if held < k else k - 1
            while p > 0 and _ranks_before(v, value[r, p - 1]):
                value[r, p] = value[r, p - 1]
                index[r, p] = index[r, p - 1]
                p -= 1
            value[r, p] = v
            index[r, p] = i
            held = min(held + 1, k)
    return index, value


def _check_k(x: np.ndarray, k: int) -> None:
    if not 1 <= k <= x.shape[-1]:
        raise OpInputError("post.topk", f"k={k} is not between 1 and the {x.shape[-1]} scores of the last axis")


def topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest scores of the last axis, largest first: ``(indices (int64), values)``.
    Equal scores come in index order; NaN counts as the smallest score.  Costs O(n k) per row:
    meant for the few best of many classes."""
    rows, lead = _rows("post.topk", x)
    _check_k(rows, k)
    index, value = _topk(rows, k)
    return index.reshape(*lead, k), value.reshape(*lead, k)


def topk_reference(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    x = _rows("post.topk", x)[0].reshape(np.shape(x))
    _check_k(x, k)
    index = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return index, np.take_along_axis(x, index, axis=-1)


@numba.njit(cache=True, nogil=True)
def _argmax(x):
    out = np.empty(x.shape[0], np.int64)
    for r in range(x.shape[0]):
        row = x[r]
        best, top = 0, row[0]
        if not np.isnan(top):
            for i in range(1, row.size):
                if row[i] > top:
                    best, top = i, row[i]
                elif np.isnan(row[i]):  # np.argmax: the first NaN wins
                    best = i
                    break
        out[r] = best
    return out


def argmax(x: np.ndarray) -> np.ndarray:
    """Index (int64) of the largest score of the last axis: the first of equal ones, the
    first NaN if there is one (as np.argmax).  Integer scores are compared as they are."""
    if _float32_rows(x):
        return _argmax32(x)
    rows, lead = _rows("post.argmax", x, floats=False)
    out = (_argmax32 if rows.dtype == np.float32 else _argmax)(rows)
    return out if len(lead) == 1 else out.reshape(lead)


def argmax_reference(x: np.ndarray) -> np.ndarray:
    return np.argmax(_rows("post.argmax", x, floats=False)[0].reshape(np.shape(x)), axis=-1)


# -- hysteresis -------------------------------------------------------------------------------------


def check_hysteresis(on: float, off: float) -> None:
    """The thresholds must leave a band between them, or a score could both switch on and off."""
    if not off < on:
        raise OpParamsError("post.threshold_hysteresis", "off", f"must be below on ({off} is not below {on})")


@numba.njit(cache=True, nogil=True)
def _hysteresis(x, on, off, start):
    steps, channels = x.shape
    state = np.full(channels, start)
    out = np.empty((steps, channels), np.bool_)
    for t in range(steps):
        for c in range(channels):
            v = x[t, c]
            if v >= on:
                state[c] = True
            elif v <= off:
                state[c] = False
            out[t, c] = state[c]
    return out


def threshold_hysteresis(scores: np.ndarray, on: float, off: float, start: bool = False) -> np.ndarray:
    """A boolean state per score: it turns on at a score >= ``on``, off at a score <= ``off``,
    and otherwise (a NaN included) stays, starting from ``start``.  The sequence runs along
    the first axis (frames in time order); every other position (a model's ``[N, 1]``
    output has one) is a channel with its own state.  The thresholds are compared in the
    scores' precision, so a float32 score of 0.7 reaches ``on=0.7``.  Pass the last state
    as ``start`` to carry it from one batch to the next."""
    check_hysteresis(on, off)
    x = _scores("post.threshold_hysteresis", scores)
    steps = np.ascontiguousarray(x.reshape(x.shape[0], math.prod(x.shape[1:])))
    kind = x.dtype.type
    return _hysteresis(steps, kind(on), kind(off), bool(start)).reshape(x.shape)


def threshold_hysteresis_reference(scores: np.ndarray, on: float, off: float, start: bool = False) -> np.ndarray:
    check_hysteresis(on, off)
    x = _scores("post.threshold_hysteresis", scores)
    switch_on, switch_off = x >= x.dtype.type(on), x <= x.dtype.type(off)
    steps = np.arange(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1)))
    # The state at t is set by the last step up to t whose score switched it, if any.
    last = np.maximum.accumulate(np.where(switch_on | switch_off, steps, -1), axis=0)
    decided = np.take_along_axis(switch_on, np.maximum(last, 0), axis=0)
    return np.where(last >= 0, decided, bool(start))


# -- non-max suppression ----------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, error_model="numpy")  # two empty boxes: IoU 0 / 0 is NaN, never suppressing
def _nms(boxes, scores, iou_threshold, score_threshold):
    n = boxes.shape[0]
    order = np.argsort(-scores, kind="mergesort")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    suppressed = np.zeros(n, np.bool_)
    keep = np.empty(n, np.int64)
    kept = 0
    for a in range(n):
        i = order[a]
        if scores[i] < score_threshold:
            break
        if suppressed[i]:
            continue
        keep[kept] = i
        kept += 1
        for b in range(a + 1, n):
            j = order[b]
            if suppressed[j]:
                continue
            w = max(0.0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            h = max(0.0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            inter = w * h
            if inter / (area[i] + area[j] - inter) > iou_threshold:
                suppressed[j] = True
    return keep[:kept].copy()


def _boxes(boxes: np.ndarray, scores: np.ndarray, score_threshold: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Boxes and scores as float64, and the score threshold in the scores' precision."""
    b, s = np.asarray(boxes), np.asarray(scores)
    if b.ndim != 2 or b.shape[1] != 4 or s.shape != (b.shape[0],):
        raise OpInputError("post.nms", f"needs boxes [N, 4] and scores [N], not {b.shape} and {s.shape}")
    if b.dtype.kind not in "fiu" or s.dtype.kind not in "fiu":
        raise OpInputError("post.nms", f"boxes and scores must be real numbers, not {b.dtype} and {s.dtype}")
    b, s64 = b.astype(np.float64), s.astype(np.float64)
    if not (np.isfinite(b).all() and np.isfinite(s64).all()):
        raise OpInputError("post.nms", "boxes and scores must be finite (no NaN or inf)")
    floor = -math.inf if score_threshold is None else float(_scores("post.nms", s).dtype.type(score_threshold))
    return b, s64, floor


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        score_threshold: float | None = None) -> np.ndarray:
    """Greedy non-max suppression, as torchvision.ops.nms: the indices (int64) of the boxes
    kept, highest score first (equal scores in index order).  Boxes are ``x1, y1, x2, y2``;
    a box suppresses every lower-scored one whose IoU with it exceeds ``iou_threshold``.
    Boxes scoring below ``score_threshold`` are dropped first.  IoU is computed in float64,
    where torchvision uses the boxes' dtype.  Degenerate boxes (x2 <= x1 or y2 <= y1) have
    no area, overlap nothing and are kept if nothing suppressed them."""
    b, s, floor = _boxes(boxes, scores, score_threshold)
    return _nms(b, s, float(iou_threshold), floor)


def nms_reference(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
                  score_threshold: float | None = None) -> np.ndarray:
    b, s, floor = _boxes(boxes, scores, score_threshold)
    order = np.argsort(-s, kind="stable")
    order = order[s[order] >= floor]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]))
        h = np.maximum(0.0, np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]))
        inter = w * h
        with np.errstate(invalid="ignore"):
            order = rest[~(inter / (area[i] + area[rest] - inter) > iou_threshold)]
    return np.array(keep, np.int64)


def nms_rows(detections: np.ndarray, iou_threshold: float, score_threshold: float | None = None) -> np.ndarray:
    """``nms`` on detections ``[N, 5+]`` (``x1, y1, x2, y2, score``, then anything, e.g. a
    class), returning the rows kept: the ``post.nms`` op of a pipeline."""
    d = np.asarray(detections)
    if d.ndim != 2 or d.shape[1] < 5:
        raise OpInputError("post.nms", f"needs detections [N, 5+] (x1, y1, x2, y2, score, ...), not {d.shape}")
    return d[nms(d[:, :4], d[:, 4], iou_threshold, score_threshold)]


# -- dequantisation ---------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _dequantize(q, scale, zero_point):
    out = np.empty(q.size, np.float32)
    for i in range(q.size):
        out[i] = np.float32(np.int32(q[i]) - zero_point) * scale
    return out


def _quantized(q: np.ndarray, zero_point: int) -> np.ndarray:
    q = np.asarray(q)
    if q.dtype not in (np.int8, np.uint8):
        raise OpInputError("post.dequantize_int8", f"needs int8 or uint8 values, not {q.dtype}")
    info = np.iinfo(q.dtype)
    if not info.min <= zero_point <= info.max:
        raise OpInputError("post.dequantize_int8", f"zero_point {zero_point} is outside {q.dtype}")
    return q


def dequantize_int8(q: np.ndarray, scale: float, zero_point: int = 0) -> np.ndarray:
    """``(q - zero_point) * scale`` as float32 for int8 or uint8 ``q``, one scale for the
    tensor (ONNX DequantizeLinear, per tensor)."""
    q = _quantized(q, zero_point)
    return _dequantize(q.reshape(-1), np.float32(scale), np.int32(zero_point)).reshape(q.shape)


def dequantize_int8_reference(q: np.ndarray, scale: float, zero_point: int = 0) -> np.ndarray:
    q = _quantized(q, zero_point)
    return (q.astype(np.int32) - np.int32(zero_point)).astype(np.float32) * np.float32(scale)
