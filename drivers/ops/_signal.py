"""Signal ops: framing, per-frame statistics, band energies, vibration features.

A signal is the last axis of an array; the statistics reduce it and keep the leading axes,
so a batch of frames ``[N, length]`` gives ``[N]`` (``[N, bands]``, ``[N, 3 + bands]``).
They compute in float64 and return float32, the dtype models take.  Each op is a numba
kernel behind a thin function that checks and shapes its input, with ``<op>_reference``,
the same op in plain numpy, next to it for the tests.

Band energies need the power spectrum ``|rfft(x * window)|**2``, and numba cannot call
``np.fft``.  For a frame length that is a power of two the kernels run their own FFT: the
real input packed into a complex one of half the length (even samples real, odd samples
imaginary), an iterative radix-2 transform, then the split into the real transform's
bins.  For other lengths they take the DFT of just the bins the bands cover.  The total
power comes from Parseval's theorem either way.  Twiddles, bit reversal and each band's
bins are computed once per (length, rate, bands, window) in Python and cached: the bins
come from ``np.fft.rfftfreq`` with the comparisons the numpy reference makes, so a bin at
a band's edge falls on the same side in both.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import numba
import numpy as np

from ._exceptions import OpInputError

__all__ = ["WINDOWS", "frame", "rms", "kurtosis", "crest_factor", "band_energies", "vibration_features"]

#: fastmath for the kernels that sum: reassociation lets LLVM vectorise a sum (10x here),
#: and changes it no more than numpy's pairwise order does.  No flag that assumes away NaN
#: or inf: a NaN sample still makes a NaN statistic.
_SUMS = {"reassoc", "contract"}

#: Frequency bands ``[[lo, hi], ...]`` in Hz, each ``lo <= f < hi``.
Bands = Sequence[Sequence[float]]

#: Window functions by the names a manifest uses (symmetric, as np.hanning and np.hamming).
WINDOWS = {"rect": np.ones, "hann": np.hanning, "hamming": np.hamming}


@functools.lru_cache(maxsize=64)
def _window(name: str, length: int) -> np.ndarray:
    w = WINDOWS[name](length).astype(np.float64)
    w.flags.writeable = False
    return w


def _signals(op: str, x: np.ndarray) -> np.ndarray:
    """Float samples (float64 stays, other dtypes become float32) with at least one axis."""
    x = np.asarray(x)
    if x.ndim == 0 or x.dtype.kind not in "fiu":
        raise OpInputError(op, f"signals must be real numbers with at least one axis, not {x.dtype} {x.shape}")
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


def _frames(op: str, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """Frames as a C-contiguous 2-D array, and the leading axes to give the result back."""
    x = _signals(op, x)
    if x.shape[-1] == 0:
        raise OpInputError(op, f"frames of length 0 ({x.shape}) have no statistics")
    lead = x.shape[:-1]
    return np.ascontiguousarray(x.reshape(math.prod(lead), x.shape[-1])), lead


# -- framing ----------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _frame(x, length, hop, window):
    signals, samples = x.shape
    n = (samples - length) // hop + 1 if samples >= length else 0
    out = np.empty((signals * n, length), x.dtype)
    for s in range(signals):
        for i in range(n):
            start = i * hop
            row = out[s * n + i]
            for j in range(length):
                row[j] = x[s, start + j] * window[j]
    return out


def frame(x: np.ndarray, length: int, hop: int | None = None, window: str = "rect") -> np.ndarray:
    """Cut a signal ``[samples]`` into ``[n, length]`` frames, ``hop`` samples apart (default:
    ``length``, no overlap), each multiplied by ``window``; samples after the last whole frame
    are dropped.  A batch of signals ``[N, samples]`` gives ``[N * n, length]``, signal by
    signal, so the frames are the batch a model takes."""
    x = _signals("signal.frame", x)
    lead = x.shape[:-1]
    rows = np.ascontiguousarray(x.reshape(math.prod(lead), x.shape[-1]))
    return _frame(rows, length, length if hop is None else hop, _window(window, length).astype(x.dtype))


def frame_reference(x: np.ndarray, length: int, hop: int | None = None, window: str = "rect") -> np.ndarray:
    x = _signals("signal.frame", x)
    hop = length if hop is None else hop
    n = (x.shape[-1] - length) // hop + 1 if x.shape[-1] >= length else 0
    index = np.arange(n)[:, None] * hop + np.arange(length)
    return (x[..., index] * _window(window, length).astype(x.dtype)).reshape(-1, length)


# -- per-frame statistics ---------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, fastmath=_SUMS)
def _rms_of(x):
    acc = 0.0
    for i in range(x.size):
        v = np.float64(x[i])
        acc += v * v
    return np.sqrt(acc / x.size)


@numba.njit(cache=True, nogil=True, fastmath=_SUMS, error_model="numpy")  # constant frame: 0 / 0 is NaN
def _kurtosis_of(x):
    mean = 0.0
    for i in range(x.size):
        mean += x[i]
    mean /= x.size
    m2 = m4 = 0.0
    for i in range(x.size):
        c = x[i] - mean
        c2 = c * c
        m2 += c2
        m4 += c2 * c2
    m2 /= x.size
    return (m4 / x.size) / (m2 * m2)


@numba.njit(cache=True, nogil=True)
def _max_bits(bits, mask):
    top = mask ^ mask
    for i in range(bits.size):
        top = max(top, bits[i] & mask)
    return top


@numba.njit(cache=True, nogil=True)
def _peak_of(x):
    """max |x|, NaN if there is one (as np.max), from the samples' bit patterns: without
    the sign bit, floats order as their bits do (NaN above inf), and a max of integers
    vectorises where a max of floats with numpy's NaN rule does not (17x here)."""
    peak = np.empty(1, x.dtype)
    if x.itemsize == 4:
        peak.view(np.uint32)[0] = _max_bits(x.view(np.uint32), np.uint32(0x7FFF_FFFF))
    else:
        peak.view(np.uint64)[0] = _max_bits(x.view(np.uint64), np.uint64(0x7FFF_FFFF_FFFF_FFFF))
    return np.float64(peak[0])


@numba.njit(cache=True, nogil=True)
def _rms(x):
    out = np.empty(x.shape[0], np.float32)
    for i in range(x.shape[0]):
        out[i] = _rms_of(x[i])
    return out


@numba.njit(cache=True, nogil=True)
def _kurtosis(x):
    out = np.empty(x.shape[0], np.float32)
    for i in range(x.shape[0]):
        out[i] = _kurtosis_of(x[i])
    return out


@numba.njit(cache=True, nogil=True, error_model="numpy")  # a silent frame: 0 / 0 is NaN, as in numpy
def _crest_factor(x):
    out = np.empty(x.shape[0], np.float32)
    for i in range(x.shape[0]):
        out[i] = _peak_of(x[i]) / _rms_of(x[i])
    return out


def rms(frames: np.ndarray) -> np.ndarray:
    """Root mean square of each frame."""
    x, lead = _frames("signal.rms", frames)
    return _rms(x).reshape(lead)


def rms_reference(frames: np.ndarray) -> np.ndarray:
    x = _frames("signal.rms", frames)[0].astype(np.float64)
    return np.sqrt((x ** 2).mean(axis=-1)).astype(np.float32).reshape(np.shape(frames)[:-1])


def kurtosis(frames: np.ndarray) -> np.ndarray:
    """Pearson's kurtosis of each frame, not the excess (a Gaussian gives 3): the fourth
    central moment over the squared variance.  A constant frame gives NaN if its mean is
    exact (integer samples are); otherwise rounding leaves a meaningless number, as it does
    in numpy, and not necessarily the same one."""
    x, lead = _frames("signal.kurtosis", frames)
    return _kurtosis(x).reshape(lead)


def _kurtosis_reference(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(axis=-1, keepdims=True)
    c2 = centred * centred  # not centred ** 4: numpy takes float powers other than 2 with pow()
    with np.errstate(divide="ignore", invalid="ignore"):
        return (c2 * c2).mean(axis=-1) / c2.mean(axis=-1) ** 2


def kurtosis_reference(frames: np.ndarray) -> np.ndarray:
    x = _frames("signal.kurtosis", frames)[0].astype(np.float64)
    return _kurtosis_reference(x).astype(np.float32).reshape(np.shape(frames)[:-1])


def crest_factor(frames: np.ndarray) -> np.ndarray:
    """Peak over RMS of each frame (both about zero, not the mean).  A silent frame gives NaN."""
    x, lead = _frames("signal.crest_factor", frames)
    return _crest_factor(x).reshape(lead)


def _crest_reference(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(x).max(axis=-1) / np.sqrt((x ** 2).mean(axis=-1))


def crest_factor_reference(frames: np.ndarray) -> np.ndarray:
    x = _frames("signal.crest_factor", frames)[0].astype(np.float64)
    return _crest_reference(x).astype(np.float32).reshape(np.shape(frames)[:-1])


# -- spectrum ---------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """What the spectrum kernels need for one frame length, rate, set of bands and window."""

    window: np.ndarray    # float64 [n]
    cos: np.ndarray       # cos(2 pi j / n), j < n
    sin: np.ndarray       # sin(2 pi j / n)
    reverse: np.ndarray   # bit reversal of 0..n/2-1 when n is a power of two >= 2, else empty
    bins: np.ndarray      # int64 [bands, 2]: each band's rfft bins, first to last + 1


@functools.lru_cache(maxsize=32)
def _plan(n: int, rate: float, bands: tuple[tuple[float, float], ...], window: str) -> _Plan:
    angle = 2 * np.pi * np.arange(n) / n
    half = n // 2
    if n >= 2 and n & (n - 1) == 0:
        bits = half.bit_length() - 1
        j = np.arange(half)
        reverse = np.zeros(half, np.int64)
        for b in range(bits):
            reverse |= ((j >> b) & 1) << (bits - 1 - b)
    else:
        reverse = np.zeros(0, np.int64)
    freqs = np.fft.rfftfreq(n, 1 / rate)
    # The bins with lo <= rfftfreq < hi, as the reference's masks pick them.
    bins = np.array([np.searchsorted(freqs, band) for band in bands], np.int64).reshape(len(bands), 2)
    return _Plan(_window(window, n), np.cos(angle), np.sin(angle), reverse, bins)


def _band_key(bands: Bands) -> tuple[tuple[float, float], ...]:
    return tuple((float(lo), float(hi)) for lo, hi in bands)


@numba.njit(cache=True, nogil=True)
def _fft_power(xw, cos, sin, reverse, re, im, power):
    """``power[k] = |rfft(xw)[k]|**2`` for all n/2 + 1 bins, n = xw.size a power of two >= 2."""
    n = xw.size
    m = n // 2
    for i in range(m):  # z[i] = xw[2i] + 1j * xw[2i + 1], in bit-reversed order
        r = reverse[i]
        re[i] = xw[2 * r]
        im[i] = xw[2 * r + 1]
    size = 2
    while size <= m:  # radix-2 butterflies; exp(-2 pi i j / size) is entry j * n / size
        half = size // 2
        step = n // size
        for start in range(0, m, size):
            for j in range(half):
                wr, wi = cos[j * step], -sin[j * step]
                a, b = start + j, start + j + half
                tr = wr * re[b] - wi * im[b]
                ti = wr * im[b] + wi * re[b]
                re[b], im[b] = re[a] - tr, im[a] - ti
                re[a] += tr
                im[a] += ti
        size *= 2
    # X[k] = E[k] + exp(-2 pi i k / n) O[k], with E and O the transforms of the even and odd
    # samples: E[k] = (Z[k] + conj Z[m-k]) / 2, O[k] = (Z[k] - conj Z[m-k]) / 2i.
    power[0] = (re[0] + im[0]) ** 2
    power[m] = (re[0] - im[0]) ** 2
    for k in range(1, m):
        er, ei = 0.5 * (re[k] + re[m - k]), 0.5 * (im[k] - im[m - k])
        orr, oi = 0.5 * (im[k] + im[m - k]), -0.5 * (re[k] - re[m - k])
        wr, wi = cos[k], -sin[k]
        xr = er + wr * orr - wi * oi
        xi = ei + wr * oi + wi * orr
        power[k] = xr * xr + xi * xi


@numba.njit(cache=True, nogil=True)
def _dft_bin_power(xw, k, cos, sin):
    """``|rfft(xw)[k]|**2`` straight from the definition: any length, O(n) per bin."""
    n = xw.size
    sr = si = 0.0
    j = 0
    for t in range(n):
        sr += xw[t] * cos[j]
        si += xw[t] * sin[j]
        j += k
        if j >= n:
            j -= n
    return sr * sr + si * si


@numba.njit(cache=True, nogil=True, fastmath=_SUMS, error_model="numpy")  # silent frame: 0 / 0 is NaN
def _band_fractions_of(x, window, cos, sin, reverse, bins, xw, re, im, power, out):
    """Fill ``out`` with each band's fraction of the frame's total power."""
    n = x.size
    energy = dc = nyquist = 0.0
    for t in range(n):
        v = x[t] * window[t]
        xw[t] = v
        energy += v * v
        dc += v
    for t in range(0, n, 2):
        nyquist += xw[t]
    for t in range(1, n, 2):
        nyquist -= xw[t]
    # Parseval: the full spectrum's power is n * energy; the rfft keeps bin 0, the Nyquist bin
    # of an even length, and one of each conjugate pair of the others.
    total = n * energy + dc * dc
    if n % 2 == 0:
        total += nyquist * nyquist
    total /= 2
    fft = reverse.size > 0
    if fft:
        _fft_power(xw, cos, sin, reverse, re, im, power)
    for b in range(bins.shape[0]):
        acc = 0.0
        for k in range(bins[b, 0], bins[b, 1]):
            acc += power[k] if fft else _dft_bin_power(xw, k, cos, sin)
        out[b] = acc / total


@numba.njit(cache=True, nogil=True)
def _band_energies(x, window, cos, sin, reverse, bins):
    rows, n = x.shape
    out = np.empty((rows, bins.shape[0]), np.float32)
    xw, power = np.empty(n), np.empty(n // 2 + 1)
    re, im = np.empty(n // 2), np.empty(n // 2)
    for r in range(rows):
        _band_fractions_of(x[r], window, cos, sin, reverse, bins, xw, re, im, power, out[r])
    return out


def band_energies(frames: np.ndarray, rate: float, bands: Bands, window: str = "hann") -> np.ndarray:
    """Each band's fraction of a frame's power: the power spectrum ``|rfft(frame * window)|**2``
    summed over the bins with frequency in ``[lo, hi)`` Hz, over its sum over all bins.
    ``rate`` is the sample rate in Hz.  A silent frame gives NaN."""
    x, lead = _frames("signal.band_energies", frames)
    out = _band_energies(x, *_plan(x.shape[1], float(rate), _band_key(bands), window))
    return out.reshape(*lead, len(bands))


def _band_energies_reference(x: np.ndarray, rate: float, bands: Bands, window: np.ndarray) -> list[np.ndarray]:
    spectrum = np.abs(np.fft.rfft(x * window, axis=-1)) ** 2
    freqs = np.fft.rfftfreq(x.shape[-1], 1 / rate)
    total = spectrum.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return [spectrum[..., (freqs >= lo) & (freqs < hi)].sum(axis=-1) / total for lo, hi in bands]


def band_energies_reference(frames: np.ndarray, rate: float, bands: Bands, window: str = "hann") -> np.ndarray:
    x = _frames("signal.band_energies", frames)[0].astype(np.float64)
    fractions = _band_energies_reference(x, rate, bands, WINDOWS[window](x.shape[1]))
    return np.stack(fractions, axis=-1).astype(np.float32).reshape(*np.shape(frames)[:-1], len(bands))


# -- vibration features -----------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, error_model="numpy")  # silent frame: NaN crest factor, as in numpy
def _vibration_features(x, window, cos, sin, reverse, bins):
    rows, n = x.shape
    out = np.empty((rows, 3 + bins.shape[0]), np.float32)
    xw, power = np.empty(n), np.empty(n // 2 + 1)
    re, im = np.empty(n // 2), np.empty(n // 2)
    for r in range(rows):
        row = x[r]
        rms = _rms_of(row)
        out[r, 0] = rms
        out[r, 1] = _kurtosis_of(row)
        out[r, 2] = _peak_of(row) / rms
        _band_fractions_of(row, window, cos, sin, reverse, bins, xw, re, im, power, out[r, 3:])
    return out


def vibration_features(frames: np.ndarray, rate: float, bands: Bands) -> np.ndarray:
    """The vibration model's inputs for each frame: ``[rms, kurtosis, crest factor, band
    fractions...]`` (the band fractions of a Hann-windowed spectrum), with no intermediate
    arrays; ``tools.build_demo_models.features`` is the definition."""
    x, lead = _frames("signal.vibration_features", frames)
    out = _vibration_features(x, *_plan(x.shape[1], float(rate), _band_key(bands), "hann"))
    return out.reshape(*lead, 3 + len(bands))


def vibration_features_reference(frames: np.ndarray, rate: float, bands: Bands) -> np.ndarray:
    x = _frames("signal.vibration_features", frames)[0].astype(np.float64)
    rms = np.sqrt((x ** 2).mean(axis=-1))
    columns = [rms, _kurtosis_reference(x), _crest_reference(x),
               *_band_energies_reference(x, rate, bands, np.hanning(x.shape[1]))]
    return np.stack(columns, axis=-1).astype(np.float32).reshape(*np.shape(frames)[:-1], 3 + len(bands))
