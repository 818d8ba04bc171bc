"""Image ops: bilinear resize, letterbox, normalisation to CHW float32, colour conversion.

Images are uint8, HWC for one image or NHWC for a batch; every op takes either and keeps
the batch axis if there is one.  Each op is a numba kernel behind a thin function that
checks and shapes its input, with ``<op>_reference``, the same op written in plain numpy,
next to it: the tests hold the two equal (exactly, for uint8 results).

Resizing samples at half-pixel centres with clamped edges, as ``cv2.INTER_LINEAR`` does
(no antialiasing when shrinking), but weights in float64 and rounds half up, where OpenCV
uses 11-bit fixed-point weights: results differ from cv2's by at most 1.
"""

from __future__ import annotations

from typing import Sequence

import numba
import numpy as np

from ._exceptions import OpInputError

__all__ = ["resize", "letterbox", "letterbox_image", "letterbox_geometry", "normalize", "bgr_to_rgb",
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


def _check_size(op: str, batch: np.ndarray, height: int, width: int) -> None:
    if batch.shape[1] == 0 or batch.shape[2] == 0:
        raise OpInputError(op, f"an image of {batch.shape[1]}x{batch.shape[2]} pixels has nothing to resize")
    if height < 1 or width < 1:
        raise OpInputError(op, f"cannot resize to {height}x{width} pixels")


# -- resize -----------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _taps(n_in, n_out):
    """Along one axis: for each output pixel, the two source pixels and the second's weight."""
    first = np.empty(n_out, np.int64)
    second = np.empty(n_out, np.int64)
    weight = np.empty(n_out, np.float64)
    scale = n_in / n_out
    for o in range(n_out):
        f = (o + 0.5) * scale - 0.5
        i = int(np.floor(f))
        w = f - i
        if i < 0:
            i, w = 0, 0.0
        if i >= n_in - 1:
            i, w = n_in - 1, 0.0
        first[o] = i
        second[o] = min(i + 1, n_in - 1)
        weight[o] = w
    return first, second, weight


def _taps_reference(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    first = np.floor(f).astype(np.int64)
    weight = f - first
    weight[first < 0] = 0.0
    first[first < 0] = 0
    weight[first >= n_in - 1] = 0.0
    first[first >= n_in - 1] = n_in - 1
    return first, np.minimum(first + 1, n_in - 1), weight


@numba.njit(cache=True, nogil=True)
def _resize_into(src, dst):
    """Resize one HWC image into ``dst`` (any HWC view: a letterbox canvas's middle)."""
    y0, y1, wy = _taps(src.shape[0], dst.shape[0])
    x0, x1, wx = _taps(src.shape[1], dst.shape[1])
    for i in range(dst.shape[0]):
        a0, a1 = 1.0 - wy[i], wy[i]
        top, bottom = src[y0[i]], src[y1[i]]
        for j in range(dst.shape[1]):
            b0, b1 = 1.0 - wx[j], wx[j]
            c0, c1 = x0[j], x1[j]
            for k in range(src.shape[2]):
                v = a0 * (b0 * top[c0, k] + b1 * top[c1, k]) + a1 * (b0 * bottom[c0, k] + b1 * bottom[c1, k])
                dst[i, j, k] = min(int(v + 0.5), 255)


@numba.njit(cache=True, nogil=True)
def _resize(src, height, width):
    out = np.empty((src.shape[0], height, width, src.shape[3]), np.uint8)
    for b in range(src.shape[0]):
        _resize_into(src[b], out[b])
    return out


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of HWC or NHWC uint8 image(s) to ``height`` x ``width``."""
    batch = _batch("image.resize", img)
    _check_size("image.resize", batch, height, width)
    return _like(img, _resize(batch, height, width))


def resize_reference(img: np.ndarray, height: int, width: int) -> np.ndarray:
    batch = _batch("image.resize", img)
    _check_size("image.resize", batch, height, width)
    src = batch.astype(np.float64)
    y0, y1, wy = _taps_reference(src.shape[1], height)
    x0, x1, wx = _taps_reference(src.shape[2], width)
    b0, b1 = (1.0 - wx)[:, None], wx[:, None]
    top, bottom = src[:, y0], src[:, y1]
    top = b0 * top[:, :, x0] + b1 * top[:, :, x1]
    bottom = b0 * bottom[:, :, x0] + b1 * bottom[:, :, x1]
    v = (1.0 - wy)[:, None, None] * top + wy[:, None, None] * bottom
    return _like(img, np.minimum(np.floor(v + 0.5), 255).astype(np.uint8))


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


@numba.njit(cache=True, nogil=True)
def _letterbox(src, height, width, new_h, new_w, top, left, pad):
    out = np.full((src.shape[0], height, width, src.shape[3]), pad, np.uint8)
    for b in range(src.shape[0]):
        _resize_into(src[b], out[b, top:top + new_h, left:left + new_w])
    return out


def letterbox(img: np.ndarray, height: int, width: int, pad: int = 114) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize keeping the aspect ratio to fit ``height`` x ``width``, centred on a canvas
    filled with ``pad`` (114, YOLO's grey, by default).

    Returns the image(s), the scale, and the (top, left) padding.
    """
    batch = _batch("image.letterbox", img)
    _check_size("image.letterbox", batch, height, width)
    scale, new_h, new_w, top, left = letterbox_geometry(batch.shape[1], batch.shape[2], height, width)
    return _like(img, _letterbox(batch, height, width, new_h, new_w, top, left, pad)), scale, (top, left)


def letterbox_reference(img: np.ndarray, height: int, width: int,
                        pad: int = 114) -> tuple[np.ndarray, float, tuple[int, int]]:
    batch = _batch("image.letterbox", img)
    _check_size("image.letterbox", batch, height, width)
    scale, new_h, new_w, top, left = letterbox_geometry(batch.shape[1], batch.shape[2], height, width)
    out = np.full((batch.shape[0], height, width, batch.shape[3]), pad, np.uint8)
    out[:, top:top + new_h, left:left + new_w] = resize_reference(batch, new_h, new_w)
    return _like(img, out), scale, (top, left)


def letterbox_image(img: np.ndarray, height: int, width: int, pad: int = 114) -> np.ndarray:
    """``letterbox`` without the geometry: the ``image.letterbox`` op of a pipeline."""
    return letterbox(img, height, width, pad)[0]


# -- normalisation ----------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _normalize(src, mul, add):
    n, h, w, c = src.shape
    out = np.empty((n, c, h, w), np.float32)
    for b in range(n):
        for k in range(c):
            for i in range(h):
                for j in range(w):
                    out[b, k, i, j] = src[b, i, j, k] * mul[k] + add[k]
    return out


def _channel_values(batch: np.ndarray, name: str, values: Sequence[float]) -> np.ndarray:
    c = batch.shape[3]
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size not in (1, c):
        raise OpInputError("image.normalize", f"{name} has {v.size} values for images of {c} channels")
    return np.broadcast_to(v, (c,))


def normalize(img: np.ndarray, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
              scale: bool = True) -> np.ndarray:
    """HWC (NHWC) uint8 to CHW (NCHW) float32: ``(x / 255 - mean) / std`` per channel, or
    ``(x - mean) / std`` if not ``scale``.  One mean or std value serves every channel."""
    batch = _batch("image.normalize", img)
    m, s = _channel_values(batch, "mean", mean), _channel_values(batch, "std", std)
    mul = (1 / 255 if scale else 1.0) / s
    return _like(img, _normalize(batch, mul, -m / s))


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
