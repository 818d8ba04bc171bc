"""Audio ops: the log-mel spectrogram front end of speech and sound models.

``log_mel`` turns samples ``[samples]`` or ``[N, samples]`` into ``[N, n_mels, frames]``
float32, the layout Whisper, torchaudio and librosa use: frames ``hop`` samples apart,
each ``n_fft`` long (the signal padded by ``n_fft // 2`` on both sides when ``center``,
mirrored as ``torch.stft`` pads or with zeros as ``librosa.stft`` does by default),
multiplied by a periodic window, their power spectrum ``|rfft|**power`` through a mel
filterbank, then a logarithm of the energies floored at ``floor``.  The filterbank is
``librosa.filters.mel``'s, computed the same way (slaney or HTK mel scale, slaney area
normalisation or none).

Numba cannot call ``np.fft``, so the op is three steps, a cache-sized chunk of frames at a
time: a numba kernel cuts the padded, windowed frames (no padded copy of the signal),
``np.fft.rfft`` transforms them, and a second kernel takes the power, the filterbank
product and the log.  A mel filter covers a short run of bins, so the kernel sums each
filter over its run only (about 2 bins per bin of the spectrum, against ``n_mels`` per bin
for the dense product).  The filterbank and the window are computed once per parameter set
and cached.  Everything is float64 inside; the result is float32.  ``log_mel_reference``
is the same op in plain numpy (``np.pad``, fancy-index framing, a dense matrix product)
for the tests.

Whisper's own front end is ``log_mel(audio, log="log10")`` followed by its clamp to
``max - 8`` and ``(x + 4) / 4``, with the last frame dropped: those belong to the model.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numba
import numpy as np

from ._exceptions import OpInputError, OpParamsError

__all__ = ["LOG_MEL", "WINDOWS", "LOGS", "mel_filterbank", "log_mel", "log_mel_reference"]

#: The op's name, as a manifest gives it.
LOG_MEL = "audio.log_mel"

#: Periodic windows (``scipy.signal.get_window(name, n, fftbins=True)``, torch's default):
#: the symmetric window of ``n + 1`` points without its last one, what a spectrogram uses.
WINDOWS = ("hann", "hamming", "rect")

#: The logarithms ``log`` may name: natural, base 10, and decibels of power (``10 log10``,
#: librosa.power_to_db with ``ref=1``, ``amin=floor`` and no ``top_db``).
LOGS = {"ln": 0, "log10": 1, "db": 2}

#: Limits that keep the cached tables and the work per frame bounded.
MAX_N_FFT = 1 << 16
MAX_N_MELS = 1 << 12


# -- parameters and cached tables -------------------------------------------------------------------


def _check_params(rate: float, n_fft: int, hop: int, n_mels: int, fmin: float, fmax: float | None,
                  window: str, power: float, log: str, floor: float, norm: str | None, mel_scale: str,
                  pad_mode: str) -> float:
    """Check the parameters; return ``fmax`` (``rate / 2`` when None)."""
    def bad(param: str, problem: str) -> OpParamsError:
        return OpParamsError(LOG_MEL, param, problem)

    def integer(value: object) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise bad("rate", f"must be a sample rate in Hz above 0, not {rate!r}")
    if not (integer(n_fft) and 2 <= n_fft <= MAX_N_FFT):
        raise bad("n_fft", f"must be an integer from 2 to {MAX_N_FFT}, not {n_fft!r}")
    if not (integer(hop) and hop >= 1):
        raise bad("hop", f"must be an integer of at least 1, not {hop!r}")
    if not (integer(n_mels) and 1 <= n_mels <= MAX_N_MELS):
        raise bad("n_mels", f"must be an integer from 1 to {MAX_N_MELS}, not {n_mels!r}")
    top = rate / 2 if fmax is None else fmax
    if not (isinstance(fmin, (int, float)) and 0 <= fmin < rate / 2):
        raise bad("fmin", f"must be a frequency in Hz from 0 to below rate / 2 = {rate / 2:g}, not {fmin!r}")
    if not (isinstance(top, (int, float)) and fmin < top <= rate / 2):
        raise bad("fmax", f"must be a frequency in Hz above fmin={fmin!r} and at most rate / 2 = {rate / 2:g}, "
                          f"not {fmax!r}")
    if window not in WINDOWS:
        raise bad("window", f"must be one of {', '.join(WINDOWS)}, not {window!r}")
    if not (isinstance(power, (int, float)) and math.isfinite(power) and power > 0):
        raise bad("power", f"must be a number above 0 (2 for power, 1 for magnitude), not {power!r}")
    if log not in LOGS:
        raise bad("log", f"must be one of {', '.join(LOGS)}, not {log!r}")
    if not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor > 0):
        raise bad("floor", f"must be a number above 0 (the log of 0 is -inf), not {floor!r}")
    if norm not in ("slaney", None):
        raise bad("norm", f"must be 'slaney' or None, not {norm!r}")
    if mel_scale not in ("slaney", "htk"):
        raise bad("mel_scale", f"must be 'slaney' or 'htk', not {mel_scale!r}")
    if pad_mode not in ("reflect", "constant"):
        raise bad("pad_mode", f"must be 'reflect' or 'constant' (zeros), not {pad_mode!r}")
    return float(top)


@functools.lru_cache(maxsize=16)
def _window(name: str, n: int) -> np.ndarray:
    phase = 2 * np.pi * np.arange(n) / n
    match name:
        case "hann":
            w = 0.5 - 0.5 * np.cos(phase)
        case "hamming":
            w = 0.54 - 0.46 * np.cos(phase)
        case _:
            w = np.ones(n)
    w.flags.writeable = False
    return w


def _hz_to_mel(hz: np.ndarray, htk: bool) -> np.ndarray:
    """librosa.hz_to_mel for an array."""
    if htk:
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    f_sp = 200.0 / 3
    mels = hz / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_t = hz >= min_log_hz
    mels[log_t] = min_log_mel + np.log(hz[log_t] / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray, htk: bool) -> np.ndarray:
    """librosa.mel_to_hz for an array."""
    if htk:
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_t = mels >= min_log_mel
    freqs[log_t] = min_log_hz * np.exp(logstep * (mels[log_t] - min_log_mel))
    return freqs


class _Filterbank(NamedTuple):
    weights: np.ndarray  # float64 [n_mels, n_fft // 2 + 1], read-only
    runs: np.ndarray     # int64 [n_mels, 2]: each filter's first non-zero bin and last + 1


@functools.lru_cache(maxsize=16)
def _filterbank(rate: float, n_fft: int, n_mels: int, fmin: float, fmax: float, norm: str | None,
                mel_scale: str) -> _Filterbank:
    htk = mel_scale == "htk"
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / rate)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(np.asarray([fmin], np.float64), htk)[0],
                                   _hz_to_mel(np.asarray([fmax], np.float64), htk)[0], n_mels + 2), htk)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, 1 + n_fft // 2))
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    if norm == "slaney":
        weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, np.newaxis]
    runs = np.zeros((n_mels, 2), np.int64)
    for i in range(n_mels):
        nonzero = np.flatnonzero(weights[i])
        if nonzero.size:
            runs[i] = nonzero[0], nonzero[-1] + 1
    weights.flags.writeable = False
    runs.flags.writeable = False
    return _Filterbank(weights, runs)


def mel_filterbank(rate: float = 16000, n_fft: int = 400, n_mels: int = 80, fmin: float = 0.0,
                   fmax: float | None = None, norm: str | None = "slaney", mel_scale: str = "slaney") -> np.ndarray:
    """The mel filterbank float64 ``[n_mels, n_fft // 2 + 1]`` (read-only, cached), as
    ``librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax,
    htk=mel_scale == "htk", norm=norm, dtype=np.float64)`` computes it."""
    top = _check_params(rate, n_fft, 1, n_mels, fmin, fmax, "hann", 2.0, "ln", 1e-10, norm, mel_scale, "reflect")
    return _filterbank(float(rate), int(n_fft), int(n_mels), float(fmin), top, norm, mel_scale).weights


# -- input ------------------------------------------------------------------------------------------


def _samples(x: np.ndarray) -> np.ndarray:
    """Signals as C-contiguous [N, samples] float32 or float64."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        hint = "; convert PCM to float in [-1, 1] first (int16: x / 32768)" if x.dtype.kind in "iu" else ""
        raise OpInputError(LOG_MEL, f"needs float32 (or float64) samples, not {x.dtype}{hint}")
    if x.ndim not in (1, 2):
        raise OpInputError(LOG_MEL, f"needs samples [samples] or signals [N, samples], not shape {x.shape}")
    return np.ascontiguousarray(x.reshape(x.shape[0] if x.ndim == 2 else 1, x.shape[-1]))


def _frame_count(samples: int, n_fft: int, hop: int, center: bool) -> tuple[int, int]:
    """(frames, padding on the left)."""
    if samples == 0:
        raise OpInputError(LOG_MEL, "the signal has no samples")
    pad = n_fft // 2 if center else 0
    padded = samples + 2 * pad
    if padded < n_fft:
        raise OpInputError(LOG_MEL, f"a signal of {samples} samples is shorter than n_fft={n_fft}: "
                                    f"give at least {n_fft} samples, or center=True to pad it")
    return 1 + (padded - n_fft) // hop, pad


# -- kernels ----------------------------------------------------------------------------------------
#
# The frames are processed a chunk at a time, in buffers of ``_CHUNK`` values per frame row:
# small enough to stay in cache between the three steps, and reused, where whole-signal
# temporaries (30 s of audio: 10 MB of frames, 10 MB of spectrum) cost more in page faults
# than the work.  A chunk runs frame-major ([n_fft, frames]), so the window, the power and
# each filter's sum run along contiguous frames and vectorise.  Frame ``j`` of a chunk is
# frame ``j % frames`` of signal ``j // frames``; a chunk may span signals.

#: Float64 values per row of a chunk buffer (512 kB).
_CHUNK = 1 << 16


@numba.njit(cache=True, nogil=True)
def _frames_into(x, hop, frames, pad, reflect, window, first, out):
    """Windowed frames ``first, first + 1, ...`` of the signals x [N, samples] padded by
    ``pad`` samples each side, into the columns of ``out`` [n_fft, count].  The padding is
    mirrored without repeating the edge (np.pad's 'reflect', periodic when it is longer than
    the signal) or zeros."""
    n_fft, count = out.shape
    samples = x.shape[1]
    period = 2 * (samples - 1)
    c = 0
    while c < count:
        s, t0 = divmod(first + c, frames)
        n = min(frames - t0, count - c)
        for k in range(n_fft):
            dst = out[k, c:c + n]
            wk = window[k]
            for i in range(n):
                j = (t0 + i) * hop - pad + k
                if j < 0 or j >= samples:
                    if not reflect:
                        dst[i] = 0.0
                        continue
                    if period == 0:
                        j = 0
                    else:
                        j %= period  # Python's modulo: non-negative
                        if j >= samples:
                            j = period - j
                dst[i] = x[s, j] * wk
        c += n


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})  # sums vectorise; no NaN flags
def _mel_log_into(spectrum, frames, power, weights, runs, floor, log, first, p, acc, out):
    """``log(max(weights @ |spectrum|**power, floor))`` for the frames ``first, ...`` whose
    spectra are the columns of ``spectrum`` [bins, count], into out [N, n_mels, frames]
    (float32); each filter is summed over its run of bins only.  ``p`` [bins, >= count] and
    ``acc`` [>= count] are scratch.  A NaN stays NaN."""
    n_mels = weights.shape[0]
    bins, count = spectrum.shape
    half = power / 2
    for k in range(bins):
        src, dst = spectrum[k], p[k]
        for j in range(count):
            dst[j] = src[j].real * src[j].real + src[j].imag * src[j].imag
        if power == 1.0:
            for j in range(count):
                dst[j] = np.sqrt(dst[j])
        elif power != 2.0:
            for j in range(count):
                dst[j] = dst[j] ** half
    c = 0
    while c < count:
        s, t0 = divmod(first + c, frames)
        n = min(frames - t0, count - c)
        for m in range(n_mels):
            a = acc[:n]
            a[:] = 0.0
            for k in range(runs[m, 0], runs[m, 1]):
                wk = weights[m, k]
                pk = p[k, c:c + n]
                for i in range(n):
                    a[i] += wk * pk[i]
            row = out[s, m, t0:t0 + n]
            for i in range(n):
                v = a[i]
                if v < floor:  # not `not v >= floor`: NaN passes through
                    v = floor
                if log == 0:
                    row[i] = np.log(v)
                elif log == 1:
                    row[i] = np.log10(v)
                else:
                    row[i] = 10.0 * np.log10(v)
        c += n


# -- the op -----------------------------------------------------------------------------------------


def log_mel(signal: np.ndarray, rate: float = 16000, n_fft: int = 400, hop: int = 160, n_mels: int = 80,
            fmin: float = 0.0, fmax: float | None = None, window: str = "hann", center: bool = True,
            power: float = 2.0, log: str = "ln", floor: float = 1e-10, norm: str | None = "slaney",
            mel_scale: str = "slaney", pad_mode: str = "reflect") -> np.ndarray:
    """Log-mel spectrogram float32 ``[N, n_mels, frames]`` of float samples ``[samples]`` (N
    = 1) or ``[N, samples]`` at ``rate`` Hz.

    Frame ``t`` starts at sample ``t * hop``; with ``center`` (the default) the signal is first
    padded by ``n_fft // 2`` samples each side (``pad_mode``: mirrored as ``torch.stft`` and
    Whisper do, or zeros as ``librosa.stft`` does by default), so frames = ``1 + samples //
    hop`` for an even ``n_fft`` and any signal of at least one sample; without it, frames =
    ``1 + (samples - n_fft) // hop`` and a signal shorter than ``n_fft`` is refused.  Each
    frame is multiplied by the periodic ``window`` and gives ``|rfft|**power`` (2: power, 1:
    magnitude) over the ``n_fft // 2 + 1`` bins, then ``mel_filterbank(...) @ that``, then
    ``log`` ("ln", "log10" or "db" = 10 log10) of the energies floored at ``floor``: silence
    gives ``log(floor)``.  A NaN sample makes its frames' energies NaN.
    """
    top = _check_params(rate, n_fft, hop, n_mels, fmin, fmax, window, power, log, floor, norm, mel_scale, pad_mode)
    x = _samples(signal)
    frames, pad = _frame_count(x.shape[1], n_fft, hop, center)
    bank = _filterbank(float(rate), int(n_fft), int(n_mels), float(fmin), top, norm, mel_scale)
    win = _window(window, n_fft)
    out = np.empty((x.shape[0], n_mels, frames), np.float32)
    total = x.shape[0] * frames
    if total == 0:  # a batch of no signals
        return out
    chunk = min(total, max(16, _CHUNK // n_fft))
    bins = n_fft // 2 + 1
    windowed, spectrum = np.empty((n_fft, chunk)), np.empty((bins, chunk), np.complex128)
    p, acc = np.empty((bins, chunk)), np.empty(chunk)
    for first in range(0, total, chunk):
        n = min(chunk, total - first)
        if n < chunk:  # the last, short chunk
            windowed, spectrum = np.empty((n_fft, n)), np.empty((bins, n), np.complex128)
        _frames_into(x, hop, frames, pad, pad_mode == "reflect", win, first, windowed)
        np.fft.rfft(windowed, axis=0, out=spectrum)
        _mel_log_into(spectrum, frames, float(power), bank.weights, bank.runs, float(floor), LOGS[log],
                      first, p, acc, out)
    return out


def log_mel_reference(signal: np.ndarray, rate: float = 16000, n_fft: int = 400, hop: int = 160, n_mels: int = 80,
                      fmin: float = 0.0, fmax: float | None = None, window: str = "hann", center: bool = True,
                      power: float = 2.0, log: str = "ln", floor: float = 1e-10, norm: str | None = "slaney",
                      mel_scale: str = "slaney", pad_mode: str = "reflect") -> np.ndarray:
    top = _check_params(rate, n_fft, hop, n_mels, fmin, fmax, window, power, log, floor, norm, mel_scale, pad_mode)
    x = _samples(signal).astype(np.float64)
    frames, pad = _frame_count(x.shape[1], n_fft, hop, center)
    if pad:
        x = np.pad(x, ((0, 0), (pad, pad)), mode=pad_mode)
    index = np.arange(frames)[:, None] * hop + np.arange(n_fft)
    spectrum = np.abs(np.fft.rfft(x[:, index] * _window(window, n_fft), axis=-1)) ** power  # [N, frames, bins]
    weights = _filterbank(float(rate), int(n_fft), int(n_mels), float(fmin), top, norm, mel_scale).weights
    mel = np.maximum(weights @ spectrum.transpose(0, 2, 1), floor)
    match log:
        case "ln":
            out = np.log(mel)
        case "log10":
            out = np.log10(mel)
        case _:
            out = 10.0 * np.log10(mel)
    return out.astype(np.float32)
