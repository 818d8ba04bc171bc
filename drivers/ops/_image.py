"""Image ops: bilinear resize, letterbox, normalisation to CHW float32, colour conversion, and
``to_model``, a camera's frame to a model's input in one pass.

Images are uint8, HWC for one image or NHWC for a batch; every op takes either and keeps
the batch axis if there is one.  Each op is a numba kernel behind a thin function that
checks and shapes its input, with ``<op>_reference``, the same op written in plain numpy,
next to it: the tests hold the two equal (exactly, for uint8 results).

Resizing is ``cv2.INTER_LINEAR``'s arithmetic: half-pixel centres, clamped edges, no
antialiasing when shrinking, and OpenCV's 11-bit fixed-point weights, so that results are
within 1 of cv2's (OpenCV's vector code rounds its intermediate sums a little differently
from its own scalar code, which these kernels follow exactly).  The kernels run at OpenCV's
speed on one core (``tools/bench_ops`` measures them side by side); ``threads`` > 1 runs an
image's rows on that many of numba's threads.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numba
import numpy as np

from ._exceptions import OpInputError

__all__ = ["resize", "letterbox", "letterbox_image", "letterbox_geometry", "normalize", "to_model", "bgr_to_rgb",
           "rgb_to_gray", "bgr_to_gray"]


def _batch(op: str, img: np.ndarray, channels: tuple[int, ...] = ()) -> np.ndarray:
    """The image(s) as a C-contiguous NHWC uint8 array, or OpInputError."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise OpInputError(op, f"images must be uint8, not {img.dtype}")
    if img.ndim not in (3, 4):
        raise OpInputError(op, f"images must be HWC or NHWC, not {img.ndim}-D {img.shape}")
    if channels and img.shape[-1] not in channels:
        raise OpInputError(op, f"images must have {' or '.join(map(str, channels))} channels, "
                               f"not {img.shape[-1]} ({img.shape})")
    return np.ascontiguousarray(img if img.ndim == 4 else img[None])


def _like(img: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Drop the batch axis ``_batch`` added to a single image."""
    return out if np.ndim(img) == 4 else out[0]


def _output(op: str, img: np.ndarray | list[np.ndarray], out: np.ndarray | None, shape: tuple[int, ...],
            dtype: type, *, batched: bool = False) -> np.ndarray:
    """Where an op writes its result of ``shape`` (with the batch axis): a new array, or the
    caller's ``out``, which must be the result as the op returns it (without the batch axis for
    one image, unless the op gives a batch whatever it is given: ``batched``), writeable,
    C-contiguous, and apart from the input (an array, or a list of images)."""
    if out is None:
        return np.empty(shape, dtype)
    one = not batched and np.ndim(img) != 4
    want = shape[1:] if one else shape
    if (not isinstance(out, np.ndarray) or out.shape != want or out.dtype != dtype or not out.flags.c_contiguous
            or not out.flags.writeable):
        got = f"{out.dtype} {list(out.shape)}" if isinstance(out, np.ndarray) else type(out).__name__
        raise OpInputError(op, f"out must be a writeable C-contiguous {np.dtype(dtype).name} array "
                               f"{list(want)} (the result's shape), not {got}")
    if any(np.may_share_memory(out, a) for a in (img if isinstance(img, list) else [img])):
        raise OpInputError(op, "out must not overlap the input: the op reads the input while it writes out")
    return out[None] if one else out


def _result(img: np.ndarray, out: np.ndarray | None, written: np.ndarray) -> np.ndarray:
    """What an op returns: the caller's ``out`` itself, or the new array without the batch
    axis ``_batch`` added to a single image."""
    return out if out is not None else _like(img, written)


def _check_size(op: str, batch: np.ndarray, height: int, width: int) -> None:
    if batch.shape[1] == 0 or batch.shape[2] == 0:
        raise OpInputError(op, f"an image of {batch.shape[1]}x{batch.shape[2]} pixels has nothing to resize")
    if height < 1 or width < 1:
        raise OpInputError(op, f"cannot resize to {height}x{width} pixels")


# -- resize -----------------------------------------------------------------------------------------
#
# cv2.INTER_LINEAR's arithmetic: along each axis, an output pixel samples the source at its
# centre, (o + 0.5) * in / out - 0.5 (computed in float32 as OpenCV does), between two source
# pixels with 11-bit fixed-point weights that add up to 2048 (clamped to the edge pixel
# beyond the image).  A pixel is then exactly (sum of weight_y * weight_x * source + 2^21) >> 22:
# the same integer whichever axis goes first, so a kernel picks the cheaper order per shape.
#
# The kernels run one destination row at a time with two small int32 row buffers:
# - rows first (shrinking): blend the destination row's two source rows over their whole
#   width (contiguous: numba vectorises it), then pick and blend the two columns of each
#   destination pixel;
# - columns first (enlarging): blend the columns of each source row a destination row needs
#   into a row buffer kept while the next destination row needs the same source row, then
#   blend the two buffers (contiguous).
# The column pick is a gather numba does not vectorise (LLVM gives Zen 4 no gathers, and
# hand-written vector gathers measured slower than the scalar loop): about 2 ns a 3-channel
# pixel, OpenCV's margin on arbitrary ratios.  Where the taps are a fixed pattern the pick
# has loops of constant strides that vectorise: halving the width, and two thirds of it for
# 3 channels (1920 -> 1280: blended into planes, picked per plane, interleaved back).
# Taps (source offsets and weights for each output row and column) are computed once per
# shape and cached.  Indices are unsigned so that numba emits no negative-index wraparound,
# and the arithmetic goes through uint32 so that LLVM keeps it in 32-bit lanes.

_ONE = 2048  # 1 << 11: the weights' fixed point (OpenCV's INTER_RESIZE_COEF_BITS)
_HALF = np.uint32(1 << 21)  # rounds (weight_y * weight_x * value) >> 22
_SHIFT = np.uint32(22)
_U = tuple(np.uint64(k) for k in range(8))


def _axis_taps_reference(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis, for each output pixel: its two source pixels and their weights (int32,
    adding up to 2048), as OpenCV computes them for INTER_LINEAR."""
    f = ((np.arange(n_out) + 0.5) * (1.0 / (n_out / n_in)) - 0.5).astype(np.float32)
    first = np.floor(f)
    f = f - first
    first = first.astype(np.int64)
    f[first < 0] = 0.0
    first[first < 0] = 0
    f[first >= n_in - 1] = 0.0
    first[first >= n_in - 1] = n_in - 1
    w1 = np.rint(f * np.float32(_ONE)).astype(np.int32)
    w0 = np.rint((np.float32(1.0) - f) * np.float32(_ONE)).astype(np.int32)
    return first, np.minimum(first + 1, n_in - 1), w0, w1


@numba.njit(cache=True, nogil=True)
def _axis_taps(n_in, n_out):
    """``_axis_taps_reference`` in numba (for kernels that resize to sizes known only inside)."""
    first = np.empty(n_out, np.int64)
    w0 = np.empty(n_out, np.int32)
    w1 = np.empty(n_out, np.int32)
    scale = 1.0 / (n_out / n_in)
    for o in range(n_out):
        f = np.float32((o + 0.5) * scale - 0.5)
        fl = np.floor(f)
        i = int(fl)
        f = np.float32(f - fl)
        if i < 0:
            i, f = 0, np.float32(0.0)
        if i >= n_in - 1:
            i, f = n_in - 1, np.float32(0.0)
        first[o] = i
        w1[o] = np.int32(np.rint(f * np.float32(2048.0)))
        w0[o] = np.int32(np.rint((np.float32(1.0) - f) * np.float32(2048.0)))
    return first, np.minimum(first + 1, n_in - 1), w0, w1


@numba.njit(cache=True, nogil=True)
def _row_taps(n_in, n_out):
    """Rows: the two source rows (uint64) and their weights."""
    first, second, w0, w1 = _axis_taps(n_in, n_out)
    return first.astype(np.uint64), second.astype(np.uint64), w0, w1


@numba.njit(cache=True, nogil=True)
def _column_taps(n_in, n_out, c):
    """Columns of a row of ``n_in`` pixels of ``c`` channels (``n_in`` >= 2): the offset of the
    first source pixel's first channel (uint64) and the second pixel's weight; the second pixel
    is always the next one (at the right edge the pair moves one left, all weight on the
    second), so a kernel loads one offset and one weight per pixel."""
    first, _, w0, w1 = _axis_taps(n_in, n_out)
    offset = np.empty(n_out, np.uint64)
    for o in range(n_out):
        if w0[o] + w1[o] != 2048:
            raise AssertionError("resize weights must add up to 2048")
        if first[o] == n_in - 1:
            first[o] -= 1
            w1[o] = 2048
        offset[o] = first[o] * c
    return offset, w1


_COLUMNS_FIRST, _ROWS_FIRST, _ROWS_FIRST_HALVED, _ROWS_FIRST_TWO_THIRDS = 0, 1, 2, 3  # the kernels' paths


@numba.njit(cache=True, nogil=True)
def _fixed_pattern(xo, a1, n_in_cols, n_out_cols, c):
    """The path of a row whose column taps are a fixed pattern a kernel of its own handles
    (the loops vectorise: their offsets are constants), else _ROWS_FIRST: halving (column j
    from 2j and 2j + 1, weights 1024) or, for 3 channels, two thirds (columns 2t and 2t + 1
    from 3t, 3t + 1 at 512 and 3t + 1, 3t + 2 at 1536).  (Whole factors, 3 to 6, in the
    same way were slower than the general pick: the planar row blend costs more than it saves.)"""
    halved = n_in_cols == 2 * n_out_cols
    thirds = c == 3 and 2 * n_in_cols == 3 * n_out_cols
    for j in range(xo.size):
        if halved and (xo[j] != 2 * c * j or a1[j] != 1024):
            halved = False
        t, odd = j // 2, j % 2
        if thirds and (xo[j] != c * (3 * t + odd) or a1[j] != (1536 if odd else 512)):
            thirds = False
    return _ROWS_FIRST_HALVED if halved else _ROWS_FIRST_TWO_THIRDS if thirds else _ROWS_FIRST


@numba.njit(cache=True, nogil=True)
def _path(n_in_rows, n_in_cols, n_out_rows, n_out_cols, c, rows_used, xo, a1):
    """The cheaper order for a shape (see the section's comment), from costs measured on the
    kernels, in units of one contiguous blended element: picking a pixel's columns from the
    int32 row about 20 per channel (about 5 in a fixed pattern: halving, two thirds),
    blending a source row's columns about 15 per channel, rounding a blended pair of rows
    about 1.5."""
    pattern = _fixed_pattern(xo, a1, n_in_cols, n_out_cols, c)
    pick = 20 if pattern == _ROWS_FIRST else 5
    columns_first = 2 * rows_used * n_out_cols * (c * 15) + 3 * n_out_rows * n_out_cols * c
    rows_first = 2 * n_out_rows * n_out_cols * (c * pick) + 2 * n_out_rows * n_in_cols * c
    return _COLUMNS_FIRST if rows_first >= columns_first else pattern


@numba.njit(cache=True, nogil=True)
def _rows_used(y0, y1):
    """How many source rows the destination rows blend."""
    return np.unique(np.concatenate((y0, y1))).size


@functools.lru_cache(maxsize=64)
def _plan(n_in_rows: int, n_in_cols: int, n_out_rows: int, n_out_cols: int, c: int) -> tuple:
    """The taps for one shape (cached: a camera's frames all have the same), read-only."""
    y0, y1, b0, b1 = _row_taps(n_in_rows, n_out_rows)
    xo, a1 = _column_taps(n_in_cols, n_out_cols, c)
    path = _path(n_in_rows, n_in_cols, n_out_rows, n_out_cols, c, _rows_used(y0, y1), xo, a1)
    for a in (y0, y1, b0, b1, xo, a1):
        a.flags.writeable = False
    return y0, y1, b0, b1, xo, a1, path


@numba.njit(cache=True, nogil=True)
def _blend_rows(s0, s1, b0, b1, v):
    """v = s0 * b0 + s1 * b1 over whole (interleaved) rows."""
    for e in range(v.size):
        v[e] = np.int32(s0[e]) * b0 + np.int32(s1[e]) * b1


@numba.njit(cache=True, nogil=True)
def _pick_columns(v, xo, a1, c, dst):
    """dst[j, k] = the rounded blend of v's two columns for output column j (uint8, interleaved)."""
    if c == 3:
        for j in range(xo.size):
            p, w = xo[j], a1[j]
            g0, g1, g2 = v[p], v[p + _U[1]], v[p + _U[2]]
            dst[3 * j] = np.uint8(np.uint32((g0 << 11) + (v[p + _U[3]] - g0) * w + _HALF) >> _SHIFT)
            dst[3 * j + 1] = np.uint8(np.uint32((g1 << 11) + (v[p + _U[4]] - g1) * w + _HALF) >> _SHIFT)
            dst[3 * j + 2] = np.uint8(np.uint32((g2 << 11) + (v[p + _U[5]] - g2) * w + _HALF) >> _SHIFT)
    elif c == 1:
        for j in range(xo.size):
            p, w = xo[j], a1[j]
            g = v[p]
            dst[j] = np.uint8(np.uint32((g << 11) + (v[p + _U[1]] - g) * w + _HALF) >> _SHIFT)
    else:
        for j in range(xo.size):
            p, w = xo[j], a1[j]
            for k in range(c):
                q = p + np.uint64(k)
                g = v[q]
                dst[c * j + k] = np.uint8(np.uint32((g << 11) + (v[q + np.uint64(c)] - g) * w + _HALF) >> _SHIFT)


@numba.njit(cache=True, nogil=True)
def _pick_halved(v, c, dst):
    """``_pick_columns`` when the row halves: output column j blends source columns 2j and
    2j + 1 with weights 1024, so the offsets are a fixed pattern and the loop vectorises."""
    if c == 3:
        for j in range(dst.size // 3):
            dst[3 * j] = np.uint8(np.uint32((v[6 * j] + v[6 * j + 3]) * 1024 + _HALF) >> _SHIFT)
            dst[3 * j + 1] = np.uint8(np.uint32((v[6 * j + 1] + v[6 * j + 4]) * 1024 + _HALF) >> _SHIFT)
            dst[3 * j + 2] = np.uint8(np.uint32((v[6 * j + 2] + v[6 * j + 5]) * 1024 + _HALF) >> _SHIFT)
    elif c == 1:
        for j in range(dst.size):
            dst[j] = np.uint8(np.uint32((v[2 * j] + v[2 * j + 1]) * 1024 + _HALF) >> _SHIFT)
    else:
        for j in range(dst.size // c):
            for k in range(c):
                dst[c * j + k] = np.uint8(np.uint32((v[2 * c * j + k] + v[2 * c * j + c + k]) * 1024 + _HALF) >> _SHIFT)


@numba.njit(cache=True, nogil=True)
def _blend_rows_planes(s0, s1, b0, b1, v):
    """``_blend_rows`` of 3-channel rows into planes: channel k of column x at ``k * width + x``."""
    n = s0.size // 3
    for x in range(n):
        v[x] = np.int32(s0[3 * x]) * b0 + np.int32(s1[3 * x]) * b1
        v[n + x] = np.int32(s0[3 * x + 1]) * b0 + np.int32(s1[3 * x + 1]) * b1
        v[2 * n + x] = np.int32(s0[3 * x + 2]) * b0 + np.int32(s1[3 * x + 2]) * b1


@numba.njit(cache=True, nogil=True)
def _pick_two_thirds_planes(v, q):
    """The column pick of a row shrinking to two thirds, plane by plane (3 channels, planar
    in and out): columns 2t and 2t + 1 from source columns 3t, 3t + 1 (weight 512) and
    3t + 1, 3t + 2 (weight 1536)."""
    n, m = v.size // 3, q.size // 3
    for k in range(3):
        p = v[k * n:(k + 1) * n]
        d = q[k * m:(k + 1) * m]
        for t in range(m // 2):
            a, b, e = p[3 * t], p[3 * t + 1], p[3 * t + 2]
            d[2 * t] = np.uint32((a << 11) + (b - a) * 512 + _HALF) >> _SHIFT
            d[2 * t + 1] = np.uint32((b << 11) + (e - b) * 1536 + _HALF) >> _SHIFT


@numba.njit(cache=True, nogil=True)
def _interleave3(q, dst):
    """Three planes of values (int32, each 0 to 255) as one interleaved uint8 row."""
    m = q.size // 3
    for x in range(m):
        dst[3 * x] = np.uint8(q[x])
        dst[3 * x + 1] = np.uint8(q[m + x])
        dst[3 * x + 2] = np.uint8(q[2 * m + x])


@numba.njit(cache=True, nogil=True)
def _pick_columns_bytes(s, xo, a1, c, dst):
    """``_pick_columns`` of a destination row that lands on source row ``s`` (its second
    row's weight is 0): (2048 * x + 2^21) >> 22 is (x + 2^10) >> 11, so no row blend."""
    if c == 3:
        for j in range(xo.size):
            p, w = xo[j], a1[j]
            g0, g1, g2 = np.int32(s[p]), np.int32(s[p + _U[1]]), np.int32(s[p + _U[2]])
            dst[3 * j] = np.uint8(np.uint32((g0 << 11) + (np.int32(s[p + _U[3]]) - g0) * w + 1024) >> 11)
            dst[3 * j + 1] = np.uint8(np.uint32((g1 << 11) + (np.int32(s[p + _U[4]]) - g1) * w + 1024) >> 11)
            dst[3 * j + 2] = np.uint8(np.uint32((g2 << 11) + (np.int32(s[p + _U[5]]) - g2) * w + 1024) >> 11)
    else:
        for j in range(xo.size):
            p, w = xo[j], a1[j]
            for k in range(c):
                q = p + np.uint64(k)
                g = np.int32(s[q])
                dst[c * j + k] = np.uint8(np.uint32((g << 11) + (np.int32(s[q + np.uint64(c)]) - g) * w + 1024) >> 11)


@numba.njit(cache=True, nogil=True)
def _blend_columns(s, xo, a1, c, h):
    """h[j, k] = s's two columns for output column j blended (int32, interleaved)."""
    if c == 3:
        for j in range(xo.size):
            p, w = xo[j], a1[j]
            g0, g1, g2 = np.int32(s[p]), np.int32(s[p + _U[1]]), np.int32(s[p + _U[2]])
            h[3 * j] = (g0 << 11) + (np.int32(s[p + _U[3]]) - g0) * w
            h[3 * j + 1] = (g1 << 11) + (np.int32(s[p + _U[4]]) - g1) * w
            h[3 * j + 2] = (g2 << 11) + (np.int32(s[p + _U[5]]) - g2) * w
    elif c == 1:
        for j in range(xo.size):
            p, w = xo[j], a1[j]
            g = np.int32(s[p])
            h[j] = (g << 11) + (np.int32(s[p + _U[1]]) - g) * w
    else:
        for j in range(xo.size):
            p, w = xo[j], a1[j]
            for k in range(c):
                q = p + np.uint64(k)
                g = np.int32(s[q])
                h[c * j + k] = (g << 11) + (np.int32(s[q + np.uint64(c)]) - g) * w


@numba.njit(cache=True, nogil=True)
def _blend_columns2(s, t, xo, a1, c, h, g):
    """``_blend_columns`` of two rows in one pass over the taps."""
    if c == 3:
        for j in range(xo.size):
            p, w = xo[j], a1[j]
            e0, e1, e2 = np.int32(s[p]), np.int32(s[p + _U[1]]), np.int32(s[p + _U[2]])
            h[3 * j] = (e0 << 11) + (np.int32(s[p + _U[3]]) - e0) * w
            h[3 * j + 1] = (e1 << 11) + (np.int32(s[p + _U[4]]) - e1) * w
            h[3 * j + 2] = (e2 << 11) + (np.int32(s[p + _U[5]]) - e2) * w
            e0, e1, e2 = np.int32(t[p]), np.int32(t[p + _U[1]]), np.int32(t[p + _U[2]])
            g[3 * j] = (e0 << 11) + (np.int32(t[p + _U[3]]) - e0) * w
            g[3 * j + 1] = (e1 << 11) + (np.int32(t[p + _U[4]]) - e1) * w
            g[3 * j + 2] = (e2 << 11) + (np.int32(t[p + _U[5]]) - e2) * w
    else:
        _blend_columns(s, xo, a1, c, h)
        _blend_columns(t, xo, a1, c, g)


@numba.njit(cache=True, nogil=True)
def _round_rows(h0, h1, b0, b1, dst):
    """dst = (h0 * b0 + h1 * b1 + 2^21) >> 22 (uint8), contiguous."""
    for e in range(dst.size):
        dst[e] = np.uint8(np.uint32(h0[e] * b0 + h1[e] * b1 + _HALF) >> _SHIFT)


@numba.njit(cache=True, nogil=True)
def _resize_rows(src, y0, y1, b0, b1, xo, a1, path, out, base, stride, r0, r1):
    """Destination rows ``r0`` to ``r1`` of one HWC image ``src`` (C-contiguous), row ``i``
    written to ``out[base + i * stride:][:width * channels]`` (``out`` flat)."""
    c = src.shape[2]
    s = src.reshape(src.shape[0], src.shape[1] * c)
    n = xo.size * c
    if path == _ROWS_FIRST_TWO_THIRDS:
        v = np.empty(s.shape[1], np.int32)
        q = np.empty(n, np.int32)
        for i in range(r0, r1):
            o = base + i * stride
            _blend_rows_planes(s[y0[i]], s[y1[i]], b0[i], b1[i], v)
            _pick_two_thirds_planes(v, q)
            _interleave3(q, out[o:o + n])
        return
    if path != _COLUMNS_FIRST:
        v = np.empty(s.shape[1], np.int32)
        for i in range(r0, r1):
            o = base + i * stride
            if b1[i] == 0 and path == _ROWS_FIRST:
                _pick_columns_bytes(s[y0[i]], xo, a1, c, out[o:o + n])
                continue
            _blend_rows(s[y0[i]], s[y1[i]], b0[i], b1[i], v)
            if path == _ROWS_FIRST_HALVED:
                _pick_halved(v, c, out[o:o + n])
            else:
                _pick_columns(v, xo, a1, c, out[o:o + n])
        return
    ha = np.empty(n, np.int32)
    hb = np.empty(n, np.int32)
    none = np.uint64(s.shape[0])  # no source row
    ra, rb = none, none  # the source rows in ha and hb
    for i in range(r0, r1):
        ya, yb = y0[i], y1[i]
        if ra != ya:
            if rb == ya:
                ha, hb, ra, rb = hb, ha, rb, ra
            elif rb != yb:
                _blend_columns2(s[ya], s[yb], xo, a1, c, ha, hb)
                ra, rb = ya, yb
            else:
                _blend_columns(s[ya], xo, a1, c, ha)
                ra = ya
        if rb != yb:
            _blend_columns(s[yb], xo, a1, c, hb)
            rb = yb
        o = base + i * stride
        _round_rows(ha, hb, b0[i], b1[i], out[o:o + n])


@numba.njit(cache=True, nogil=True)
def _fill_border(out, top, left, new_h, new_w, pad):
    """Fill an NHWC canvas with ``pad`` outside its [top, top + new_h) x [left, left + new_w) region."""
    n, height, width, c = out.shape
    flat = out.reshape(-1)
    row = width * c
    for b in range(n):
        for i in range(height):
            o = (b * height + i) * row
            if i < top or i >= top + new_h:
                flat[o:o + row] = pad
            else:
                flat[o:o + left * c] = pad
                flat[o + (left + new_w) * c:o + row] = pad


@numba.njit(cache=True, nogil=True)
def _resize_batch(src, out, top, left, y0, y1, b0, b1, xo, a1, path):
    """Each image of ``src`` (NHWC) into ``out`` (NHWC, C-contiguous) at ``(top, left)``."""
    n, height, width, c = out.shape
    flat = out.reshape(-1)
    for b in range(n):
        base = ((b * height + top) * width + left) * c
        _resize_rows(src[b], y0, y1, b0, b1, xo, a1, path, flat, base, width * c, 0, y0.size)


@numba.njit(cache=True, nogil=True, parallel=True)
def _resize_batch_parallel(src, out, top, left, y0, y1, b0, b1, xo, a1, path, chunks):
    """``_resize_batch`` with each image's rows cut into ``chunks`` run on numba's threads."""
    n, height, width, c = out.shape
    flat = out.reshape(-1)
    rows = y0.size
    for t in numba.prange(n * chunks):
        b, part = t // chunks, t % chunks
        base = ((b * height + top) * width + left) * c
        _resize_rows(src[b], y0, y1, b0, b1, xo, a1, path, flat, base, width * c,
                     part * rows // chunks, (part + 1) * rows // chunks)


def _two_columns(batch: np.ndarray) -> np.ndarray:
    """An image one pixel wide as two equal columns: the kernels blend each pixel with the
    next column (the same values: bilinear over them gives the column back exactly)."""
    return np.repeat(batch, 2, axis=2) if batch.shape[2] == 1 else batch


def _threads(op: str, threads: int) -> int:
    if threads < 1:
        raise OpInputError(op, f"threads must be at least 1, not {threads}")
    return min(int(threads), numba.config.NUMBA_NUM_THREADS)


def _resize_to(op: str, batch: np.ndarray, out: np.ndarray, top: int, left: int, new_h: int, new_w: int,
               threads: int) -> None:
    threads = _threads(op, threads)
    batch = _two_columns(batch)
    plan = _plan(batch.shape[1], batch.shape[2], new_h, new_w, batch.shape[3])
    if threads == 1:
        _resize_batch(batch, out, top, left, *plan)
        return
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        _resize_batch_parallel(batch, out, top, left, *plan, threads)
    finally:
        numba.set_num_threads(before)


def resize(img: np.ndarray, height: int, width: int, *, threads: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear resize of HWC or NHWC uint8 image(s) to ``height`` x ``width``, as
    cv2.INTER_LINEAR (within 1 of it).  ``threads`` > 1 cuts each image's rows among that
    many of numba's threads.  ``out``, an array of the result's shape and dtype, takes the
    result instead of a new array (and is returned)."""
    batch = _batch("image.resize", img)
    _check_size("image.resize", batch, height, width)
    dst = _output("image.resize", img, out, (batch.shape[0], height, width, batch.shape[3]), np.uint8)
    _resize_to("image.resize", batch, dst, 0, 0, height, width, threads)
    return _result(img, out, dst)


def resize_reference(img: np.ndarray, height: int, width: int) -> np.ndarray:
    batch = _batch("image.resize", img)
    _check_size("image.resize", batch, height, width)
    y0, y1, b0, b1 = _axis_taps_reference(batch.shape[1], height)
    x0, x1, a0, a1 = _axis_taps_reference(batch.shape[2], width)
    src = batch.astype(np.int64)
    across = src[:, :, x0] * a0[:, None] + src[:, :, x1] * a1[:, None]
    v = across[:, y0] * b0[:, None, None] + across[:, y1] * b1[:, None, None]
    return _like(img, ((v + (1 << 21)) >> 22).astype(np.uint8))


# -- letterbox --------------------------------------------------------------------------------------


def letterbox_geometry(in_height: int, in_width: int, height: int, width: int) -> tuple[float, int, int, int, int]:
    """Where ``letterbox`` puts an ``in_height`` x ``in_width`` image in a ``height`` x ``width``
    canvas: ``(scale, resized height, resized width, top, left)``.

    It depends on the shapes only, so a driver that ran ``image.letterbox`` in a pipeline
    recovers it from the input's shape to map detections back: ``x = (x' - left) / scale``.
    """
    scale = min(height / in_height, width / in_width)
    new_h = min(height, max(1, int(in_height * scale + 0.5)))
    new_w = min(width, max(1, int(in_width * scale + 0.5)))
    return scale, new_h, new_w, (height - new_h) // 2, (width - new_w) // 2


def letterbox(img: np.ndarray, height: int, width: int, pad: int = 114, *, threads: int = 1,
              out: np.ndarray | None = None) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize keeping the aspect ratio to fit ``height`` x ``width``, centred on a canvas
    filled with ``pad`` (114, YOLO's grey, by default).

    Returns the image(s), the scale, and the (top, left) padding.  ``threads`` and ``out`` as
    ``resize``.
    """
    batch = _batch("image.letterbox", img)
    _check_size("image.letterbox", batch, height, width)
    scale, new_h, new_w, top, left = letterbox_geometry(batch.shape[1], batch.shape[2], height, width)
    dst = _output("image.letterbox", img, out, (batch.shape[0], height, width, batch.shape[3]), np.uint8)
    _fill_border(dst, top, left, new_h, new_w, pad)
    _resize_to("image.letterbox", batch, dst, top, left, new_h, new_w, threads)
    return _result(img, out, dst), scale, (top, left)


def letterbox_reference(img: np.ndarray, height: int, width: int,
                        pad: int = 114) -> tuple[np.ndarray, float, tuple[int, int]]:
    batch = _batch("image.letterbox", img)
    _check_size("image.letterbox", batch, height, width)
    scale, new_h, new_w, top, left = letterbox_geometry(batch.shape[1], batch.shape[2], height, width)
    out = np.full((batch.shape[0], height, width, batch.shape[3]), pad, np.uint8)
    out[:, top:top + new_h, left:left + new_w] = resize_reference(batch, new_h, new_w)
    return _like(img, out), scale, (top, left)


def letterbox_image(img: np.ndarray, height: int, width: int, pad: int = 114, *,
                    out: np.ndarray | None = None) -> np.ndarray:
    """``letterbox`` without the geometry: the ``image.letterbox`` op of a pipeline."""
    return letterbox(img, height, width, pad, out=out)[0]


# -- normalisation ----------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _normalize(src, mul, add, out):
    n, h, w, c = src.shape
    for b in range(n):
        for k in range(c):
            for i in range(h):
                for j in range(w):
                    out[b, k, i, j] = src[b, i, j, k] * mul[k] + add[k]


def _channel_values(batch: np.ndarray, name: str, values: Sequence[float], op: str = "image.normalize") -> np.ndarray:
    c = batch.shape[3]
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size not in (1, c):
        raise OpInputError(op, f"{name} has {v.size} values for images of {c} channels")
    return np.broadcast_to(v, (c,))


def normalize(img: np.ndarray, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
              scale: bool = True, *, out: np.ndarray | None = None) -> np.ndarray:
    """HWC (NHWC) uint8 to CHW (NCHW) float32: ``(x / 255 - mean) / std`` per channel, or
    ``(x - mean) / std`` if not ``scale``.  One mean or std value serves every channel.
    ``out`` as ``resize``."""
    batch = _batch("image.normalize", img)
    m, s = _channel_values(batch, "mean", mean), _channel_values(batch, "std", std)
    mul = (1 / 255 if scale else 1.0) / s
    n, h, w, c = batch.shape
    dst = _output("image.normalize", img, out, (n, c, h, w), np.float32)
    _normalize(batch, mul, -m / s, dst)
    return _result(img, out, dst)


def normalize_reference(img: np.ndarray, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                        scale: bool = True) -> np.ndarray:
    batch = _batch("image.normalize", img)
    x = batch.astype(np.float64) / 255 if scale else batch.astype(np.float64)
    x = (x - _channel_values(batch, "mean", mean)) / _channel_values(batch, "std", std)
    return _like(img, np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32))


# -- colour -----------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _swap_red_blue(src):
    out = np.empty_like(src)
    n, h, w, c = src.shape
    for b in range(n):
        for i in range(h):
            for j in range(w):
                out[b, i, j, 0] = src[b, i, j, 2]
                out[b, i, j, 1] = src[b, i, j, 1]
                out[b, i, j, 2] = src[b, i, j, 0]
                for k in range(3, c):
                    out[b, i, j, k] = src[b, i, j, k]
    return out


def bgr_to_rgb(img: np.ndarray) -> np.ndarray:
    """Swap the first and third channels (BGR to RGB and back); a fourth (alpha) stays."""
    return _like(img, _swap_red_blue(_batch("image.bgr_to_rgb", img, (3, 4))))


def bgr_to_rgb_reference(img: np.ndarray) -> np.ndarray:
    out = _batch("image.bgr_to_rgb", img, (3, 4)).copy()
    out[..., [0, 2]] = out[..., [2, 0]]
    return _like(img, out)


@numba.njit(cache=True, nogil=True)
def _gray(src, red, blue):
    n, h, w, _ = src.shape
    out = np.empty((n, h, w, 1), np.uint8)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                p = src[b, i, j]
                out[b, i, j, 0] = (np.int32(p[red]) * 4899 + np.int32(p[1]) * 9617 + np.int32(p[blue]) * 1868
                                   + 8192) >> 14
    return out


def _gray_reference(batch: np.ndarray, red: int, blue: int) -> np.ndarray:
    x = batch.astype(np.int32)
    return ((x[..., red] * 4899 + x[..., 1] * 9617 + x[..., blue] * 1868 + 8192) >> 14).astype(np.uint8)[..., None]


def rgb_to_gray(img: np.ndarray) -> np.ndarray:
    """Luma (BT.601 weights, 14-bit fixed point exactly as cv2.COLOR_RGB2GRAY) as an HW1 image."""
    return _like(img, _gray(_batch("image.rgb_to_gray", img, (3, 4)), 0, 2))


def rgb_to_gray_reference(img: np.ndarray) -> np.ndarray:
    return _like(img, _gray_reference(_batch("image.rgb_to_gray", img, (3, 4)), 0, 2))


def bgr_to_gray(img: np.ndarray) -> np.ndarray:
    """``rgb_to_gray`` for BGR images (cv2.COLOR_BGR2GRAY)."""
    return _like(img, _gray(_batch("image.bgr_to_gray", img, (3, 4)), 2, 0))


def bgr_to_gray_reference(img: np.ndarray) -> np.ndarray:
    return _like(img, _gray_reference(_batch("image.bgr_to_gray", img, (3, 4)), 2, 0))


# -- camera to model --------------------------------------------------------------------------------
#
# resize (or letterbox) + channel swap + normalisation + HWC -> CHW in one pass: the resize
# kernels' two orders, but a destination row's values go straight to float32 planes
# (value * mul + add in float64 as ``normalize`` computes it), so there is no intermediate
# image and the result is bit for bit normalize(resize(...)).  Rows first, the column pick
# writes each channel's plane; columns first, the source rows are blended into planar
# buffers (the HWC -> CHW turn done by the column pick) and the row blend writes each plane
# contiguously.


@numba.njit(cache=True, nogil=True)
def _pick_columns_planes(v, xo, a1, c, q):
    """``_pick_columns`` into planar int32 buffers: channel k of output column j at ``k * width + j``."""
    n = xo.size
    if c == 3:
        for j in range(n):
            p, w = xo[j], a1[j]
            g0, g1, g2 = v[p], v[p + _U[1]], v[p + _U[2]]
            q[j] = np.uint32((g0 << 11) + (v[p + _U[3]] - g0) * w + _HALF) >> _SHIFT
            q[n + j] = np.uint32((g1 << 11) + (v[p + _U[4]] - g1) * w + _HALF) >> _SHIFT
            q[2 * n + j] = np.uint32((g2 << 11) + (v[p + _U[5]] - g2) * w + _HALF) >> _SHIFT
    else:
        for k in range(c):
            for j in range(n):
                r = xo[j] + np.uint64(k)
                g = v[r]
                q[k * n + j] = np.uint32((g << 11) + (v[r + np.uint64(c)] - g) * a1[j] + _HALF) >> _SHIFT


@numba.njit(cache=True, nogil=True)
def _pick_halved_planes(v, c, q):
    """``_pick_halved`` into planar int32 buffers."""
    n = q.size // c
    if c == 3:
        for j in range(n):
            q[j] = np.uint32((v[6 * j] + v[6 * j + 3]) * 1024 + _HALF) >> _SHIFT
            q[n + j] = np.uint32((v[6 * j + 1] + v[6 * j + 4]) * 1024 + _HALF) >> _SHIFT
            q[2 * n + j] = np.uint32((v[6 * j + 2] + v[6 * j + 5]) * 1024 + _HALF) >> _SHIFT
    else:
        for k in range(c):
            for j in range(n):
                q[k * n + j] = np.uint32((v[2 * c * j + k] + v[2 * c * j + c + k]) * 1024 + _HALF) >> _SHIFT


@numba.njit(cache=True, nogil=True)
def _scale_row(q, m, f, dst):
    """dst = q * m + f (float64) as float32, contiguous."""
    for e in range(dst.size):
        dst[e] = np.float32(q[e] * m + f)


@numba.njit(cache=True, nogil=True)
def _blend_columns_planes(s, t, xo, a1, c, h, g, both):
    """``_blend_columns`` (of ``s``, and of ``t`` if ``both``) into planar buffers: channel k
    of output column j at ``k * width + j``."""
    n = xo.size
    if c == 3:
        for j in range(n):
            p, w = xo[j], a1[j]
            e0, e1, e2 = np.int32(s[p]), np.int32(s[p + _U[1]]), np.int32(s[p + _U[2]])
            h[j] = (e0 << 11) + (np.int32(s[p + _U[3]]) - e0) * w
            h[n + j] = (e1 << 11) + (np.int32(s[p + _U[4]]) - e1) * w
            h[2 * n + j] = (e2 << 11) + (np.int32(s[p + _U[5]]) - e2) * w
            if both:
                e0, e1, e2 = np.int32(t[p]), np.int32(t[p + _U[1]]), np.int32(t[p + _U[2]])
                g[j] = (e0 << 11) + (np.int32(t[p + _U[3]]) - e0) * w
                g[n + j] = (e1 << 11) + (np.int32(t[p + _U[4]]) - e1) * w
                g[2 * n + j] = (e2 << 11) + (np.int32(t[p + _U[5]]) - e2) * w
    else:
        for k in range(c):
            for j in range(n):
                q = xo[j] + np.uint64(k)
                e = np.int32(s[q])
                h[k * n + j] = (e << 11) + (np.int32(s[q + np.uint64(c)]) - e) * a1[j]
                if both:
                    e = np.int32(t[q])
                    g[k * n + j] = (e << 11) + (np.int32(t[q + np.uint64(c)]) - e) * a1[j]


@numba.njit(cache=True, nogil=True)
def _round_rows_scaled(h0, h1, b0, b1, m, f, dst):
    """``_round_rows``, each value then ``* m + f`` (float64) as float32."""
    for e in range(dst.size):
        dst[e] = np.float32(np.int32(np.uint32(h0[e] * b0 + h1[e] * b1 + _HALF) >> _SHIFT) * m + f)


@numba.njit(cache=True, nogil=True)
def _to_model_rows(src, y0, y1, b0, b1, xo, a1, path, mul, add, planes, out, base, stride, r0, r1):
    """Destination rows ``r0`` to ``r1`` of one HWC image; channel k of row i written to
    ``out[base + planes[k] + i * stride:][:width]`` (``out`` flat)."""
    c = src.shape[2]
    s = src.reshape(src.shape[0], src.shape[1] * c)
    n = xo.size
    if path != _COLUMNS_FIRST:
        v = np.empty(s.shape[1], np.int32)
        q = np.empty(n * c, np.int32)
        for i in range(r0, r1):
            if path == _ROWS_FIRST_TWO_THIRDS:
                _blend_rows_planes(s[y0[i]], s[y1[i]], b0[i], b1[i], v)
                _pick_two_thirds_planes(v, q)
            else:
                _blend_rows(s[y0[i]], s[y1[i]], b0[i], b1[i], v)
                if path == _ROWS_FIRST_HALVED:
                    _pick_halved_planes(v, c, q)
                else:
                    _pick_columns_planes(v, xo, a1, c, q)
            for k in range(c):
                o = base + planes[k] + i * stride
                _scale_row(q[k * n:(k + 1) * n], mul[k], add[k], out[o:o + n])
        return
    ha = np.empty(n * c, np.int32)
    hb = np.empty(n * c, np.int32)
    none = np.uint64(s.shape[0])  # no source row
    ra, rb = none, none  # the source rows in ha and hb
    for i in range(r0, r1):
        ya, yb = y0[i], y1[i]
        if ra != ya:
            if rb == ya:
                ha, hb, ra, rb = hb, ha, rb, ra
            else:
                _blend_columns_planes(s[ya], s[yb], xo, a1, c, ha, hb, rb != yb)
                ra, rb = ya, yb
        if rb != yb:
            _blend_columns_planes(s[yb], s[yb], xo, a1, c, hb, hb, False)
            rb = yb
        for k in range(c):
            o = base + planes[k] + i * stride
            _round_rows_scaled(ha[k * n:(k + 1) * n], hb[k * n:(k + 1) * n], b0[i], b1[i], mul[k], add[k],
                               out[o:o + n])


@numba.njit(cache=True, nogil=True)
def _fill_planes(out, top, left, new_h, new_w, values):
    """Fill each plane k of an NCHW tensor with ``values[k]`` outside [top, top + new_h) x [left, left + new_w)."""
    n, c, height, width = out.shape
    if new_h == height and new_w == width:
        return
    for b in range(n):
        for k in range(c):
            plane = out[b, k]
            value = np.float32(values[k])
            for i in range(height):
                row = plane[i]
                if i < top or i >= top + new_h:
                    row[:] = value
                else:
                    row[:left] = value
                    row[left + new_w:] = value


@numba.njit(cache=True, nogil=True)
def _to_model_batch(src, out, top, left, y0, y1, b0, b1, xo, a1, path, mul, add, order):
    n, c, height, width = out.shape
    flat = out.reshape(-1)
    planes = order * (height * width)
    for b in range(n):
        base = (b * c * height + top) * width + left
        _to_model_rows(src[b], y0, y1, b0, b1, xo, a1, path, mul, add, planes, flat, base, width, 0, y0.size)


@numba.njit(cache=True, nogil=True, parallel=True)
def _to_model_batch_parallel(src, out, top, left, y0, y1, b0, b1, xo, a1, path, mul, add, order, chunks):
    n, c, height, width = out.shape
    flat = out.reshape(-1)
    planes = order * (height * width)
    rows = y0.size
    for t in numba.prange(n * chunks):
        b, part = t // chunks, t % chunks
        base = (b * c * height + top) * width + left
        _to_model_rows(src[b], y0, y1, b0, b1, xo, a1, path, mul, add, planes, flat, base, width,
                       part * rows // chunks, (part + 1) * rows // chunks)


def to_model(img: np.ndarray, height: int, width: int, mean: Sequence[float] = (0.0,),
             std: Sequence[float] = (1.0,), scale: bool = True, letterbox: bool = False, pad: int = 114,
             swap_rb: bool = False, *, threads: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """A camera's uint8 HWC (NHWC) frame(s) to a model's float32 CHW (NCHW) input in one pass:
    bilinear resize to ``height`` x ``width`` (with ``letterbox``, aspect kept and centred on
    ``pad``, as ``letterbox``), red and blue swapped if ``swap_rb`` (BGR to RGB), then per
    channel ``(x / 255 - mean) / std`` (``(x - mean) / std`` if not ``scale``), mean and std
    in the output's channel order.  Bit for bit ``normalize(resize(...))`` (or of
    ``letterbox`` / ``bgr_to_rgb``), without the intermediate images.  ``threads`` and ``out``
    as ``resize``."""
    op = "image.to_model"
    threads = _threads(op, threads)
    batch = _batch(op, img, (3, 4) if swap_rb else ())
    _check_size(op, batch, height, width)
    c = batch.shape[3]
    m, s = _channel_values(batch, "mean", mean, op), _channel_values(batch, "std", std, op)
    mul, add = (1 / 255 if scale else 1.0) / s, -m / s  # per output channel
    fill = pad * mul + add
    order = np.arange(c)  # order[k]: the output channel (plane) of source channel k
    if swap_rb:
        order[[0, 2]] = order[[2, 0]]
    mul, add = np.ascontiguousarray(mul[order]), np.ascontiguousarray(add[order])  # per source channel
    if letterbox:
        _, new_h, new_w, top, left = letterbox_geometry(batch.shape[1], batch.shape[2], height, width)
    else:
        new_h, new_w, top, left = height, width, 0, 0
    dst = _output(op, img, out, (batch.shape[0], c, height, width), np.float32)
    _fill_planes(dst, top, left, new_h, new_w, fill)
    batch = _two_columns(batch)
    plan = _plan(batch.shape[1], batch.shape[2], new_h, new_w, c)
    if threads == 1:
        _to_model_batch(batch, dst, top, left, *plan, mul, add, order)
    else:
        before = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            _to_model_batch_parallel(batch, dst, top, left, *plan, mul, add, order, threads)
        finally:
            numba.set_num_threads(before)
    return _result(img, out, dst)


def to_model_reference(img: np.ndarray, height: int, width: int, mean: Sequence[float] = (0.0,),
                       std: Sequence[float] = (1.0,), scale: bool = True, letterbox: bool = False, pad: int = 114,
                       swap_rb: bool = False) -> np.ndarray:
    x = letterbox_reference(img, height, width, pad)[0] if letterbox else resize_reference(img, height, width)
    if swap_rb:
        x = bgr_to_rgb_reference(x)
    return normalize_reference(x, mean, std, scale)
