"""numba's cache, warmed: every op of drivers.ops compiled once before the driver serves.

numba compiles a kernel at its first call and keeps the machine code in its cache on disk
(next to the module, or in ``NUMBA_CACHE_DIR``).  With a cold cache the first requests
would pay seconds of compilation each, past their deadlines (a sensor pipeline gives 2 s).
So the driver calls ``warm()`` in its setup, before READY: each op once, on a small input of
the kind it takes (uint8 NHWC images, float32 signals and scores, int8 quantised values),
which compiles the kernels a manifest's ops use.  From a warm cache that takes about half a
second; from a cold one about 10 s on one core, within the default start_timeout (30 s).
``make`` runs ``python -m drivers.accel --warm`` after installing, so that a first boot
finds the cache warm.
"""

from __future__ import annotations

import sys
import time

__all__ = ["warm", "main"]

_BANDS = [[0.0, 100.0], [100.0, 200.0]]


def _cases() -> list[tuple[str, dict[str, object], object]]:
    import numpy as np

    image = np.zeros((1, 8, 8, 3), np.uint8)
    signal = np.zeros((1, 64), np.float32)
    scores = np.zeros((1, 4), np.float32)
    return [
        ("image.resize", {"height": 4, "width": 4}, image),
        ("image.letterbox", {"height": 4, "width": 6}, image),
        ("image.normalize", {}, image),
        ("image.bgr_to_rgb", {}, image),
        ("image.rgb_to_gray", {}, image),
        ("image.bgr_to_gray", {}, image),
        ("signal.frame", {"length": 64}, signal),
        ("signal.frame", {"length": 32, "window": "hann"}, signal),
        ("signal.rms", {}, signal),
        ("signal.kurtosis", {}, signal),
        ("signal.crest_factor", {}, signal),
        ("signal.band_energies", {"rate": 400.0, "bands": _BANDS}, signal),  # FFT (a power of two)
        ("signal.band_energies", {"rate": 400.0, "bands": _BANDS}, signal[:, :60]),  # the DFT of the bins
        ("signal.vibration_features", {"rate": 400.0, "bands": _BANDS}, signal),
        ("post.softmax", {}, scores),
        ("post.topk", {"k": 2}, scores),
        ("post.argmax", {}, scores),
        ("post.threshold_hysteresis", {"on": 0.7, "off": 0.4}, scores),
        ("post.nms", {"iou_threshold": 0.5}, np.zeros((2, 6), np.float32)),
        ("post.dequantize_int8", {"scale": 0.1}, np.zeros((1, 4), np.int8)),
        ("image.resize_pad", {"height": 4, "width": 8}, image),
        ("image.to_tensor", {}, image),
        ("image.to_model", {"height": 4, "width": 4}, image),
        ("audio.log_mel", {"n_fft": 32, "hop": 16, "n_mels": 4}, np.zeros((1, 256), np.float32)),
        ("post.decode_yolo", {}, np.zeros((1, 6, 8), np.float32)),
        ("text.db_boxes", {}, np.pad(np.ones((1, 1, 8, 8), np.float32), ((0, 0), (0, 0), (4, 4), (4, 4)))),
        ("text.ctc_greedy", {"vocabulary": ["a", "b"]}, np.full((1, 4, 3), 1 / 3, np.float32)),
    ]


#: the ops' modules whose kernels numba caches
_KERNEL_MODULES = ("_image", "_post", "_signal", "_audio", "_detect", "_text")


def clear_stale_cache() -> bool:
    """Drop numba's cached kernels of drivers.ops when any of its sources changed since they
    were cached; True when it did.

    numba checks a cached kernel against its own file only, but a kernel inlines the
    kernels it calls from other files (text's crops call image's resize): after an update of
    _image.py alone, _text.py's cache would still hold the old resize.  So the cache is
    taken as one: a digest of every source of the package, kept beside the cache."""
    import hashlib
    import importlib
    from pathlib import Path

    import numba

    package = Path(importlib.import_module("drivers.ops").__file__).parent  # type: ignore[arg-type]
    digest = hashlib.sha256()
    for source in sorted(package.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    kernels = [k for name in _KERNEL_MODULES for k in vars(importlib.import_module(f"drivers.ops.{name}")).values()
               if isinstance(k, numba.core.dispatcher.Dispatcher) and k._cache is not None
               and hasattr(k._cache, "cache_path")]
    if not kernels:
        return False
    stamp = Path(kernels[0]._cache.cache_path) / "edgebus-ops.sha256"
    try:
        if stamp.read_text() == digest.hexdigest():
            return False
    except OSError:
        pass
    for kernel in kernels:
        kernel._cache.flush()
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest.hexdigest())
    except OSError:  # a read-only install: its cache is what it shipped with
        pass
    return True


def warm() -> int:
    """Run every op once (compiling it, or loading it from numba's cache, after dropping a
    cache older than the ops' sources); the number of ops run.  Imports numba."""
    from drivers.ops import pipeline

    clear_stale_cache()
    cases = _cases()
    for name, params, x in cases:
        pipeline([(name, params)])(x)
    return len(cases)


def main() -> int:
    """``python -m drivers.accel --warm``: warm the cache (at install time)."""
    started = time.perf_counter()
    count = warm()
    print(f"drivers.accel: numba's cache holds the ops' kernels ({count} ops run in "
          f"{time.perf_counter() - started:.1f}s)", file=sys.stderr)
    return 0
