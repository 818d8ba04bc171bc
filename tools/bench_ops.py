"""Pre/post-processing ops benchmark: each numba op against its numpy reference.

    python -m tools.bench_ops [--runs 7] [--min-time 0.05] [--out bench-results/ops.json]

For every op, on sizes a model meets (a 640x480 camera frame resized to 320x320, a
2048-sample vibration frame, 1000 classes for a batch of 32, 1000 candidate boxes...):
the numba op as a driver calls it (argument checks and reshaping included) and its
``<op>_reference`` in plain numpy are each called once to compile and warm caches, checked
to agree, then timed in alternation ``--runs`` times; a run repeats the call for at least
``--min-time`` seconds and counts the time per call.  Medians are reported, with the
speed-up (reference time over numba time).  Where OpenCV is importable, a second resize
row takes ``cv2.resize`` as the reference; where it is not, the output says so.  Everything runs in one
thread: the kernels release the GIL, so a driver can run them on worker threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any, Callable

import numba
import numpy as np

from drivers.ops import image as _image, post as _post, signal as _signal
from tools._benchkit import write_results
from tools.build_demo_models import BANDS, RATE, simulate


def cases(rng: np.random.Generator) -> list[tuple[str, str, Callable[[], Any], Callable[[], Any]]]:
    """(op, size, numba call, numpy call) for each op."""
    camera = rng.integers(0, 256, (480, 640, 3), np.uint8)
    small = rng.integers(0, 256, (320, 320, 3), np.uint8)
    recording = simulate(1, True, rng).repeat(40, axis=0).reshape(-1)  # 6.4 s at 12.8 kHz
    frame = simulate(1, True, rng)
    frames = simulate(32, True, rng)
    logits = rng.normal(0, 3, (32, 1000)).astype(np.float32)
    scores = rng.random((10_000, 1)).astype(np.float32)
    xy = rng.uniform(0, 600, (1000, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(10, 120, (1000, 2)).astype(np.float32)], axis=1)
    box_scores = rng.random(1000).astype(np.float32)
    quantized = rng.integers(-128, 128, (1, 84, 8400), np.int8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    bands = [list(b) for b in BANDS]

    def pair(module: Any, name: str, *args: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
        fn, ref = getattr(module, name), getattr(module, name + "_reference")
        return (lambda: fn(*args)), (lambda: ref(*args))

    return [
        ("image.resize", "640x480x3 -> 320x320", *pair(_image, "resize", camera, 320, 320)),
        ("image.letterbox", "640x480x3 -> 320x320", *pair(_image, "letterbox", camera, 320, 320)),
        ("image.normalize", "320x320x3 -> 3x320x320", *pair(_image, "normalize", small, mean, std)),
        ("image.bgr_to_rgb", "640x480x3", *pair(_image, "bgr_to_rgb", camera)),
        ("image.rgb_to_gray", "640x480x3", *pair(_image, "rgb_to_gray", camera)),
        ("signal.frame", "81920 samples, 2048 / hop 512, hann", *pair(_signal, "frame", recording, 2048, 512, "hann")),
        ("signal.rms", "32 x 2048", *pair(_signal, "rms", frames)),
        ("signal.kurtosis", "32 x 2048", *pair(_signal, "kurtosis", frames)),
        ("signal.crest_factor", "32 x 2048", *pair(_signal, "crest_factor", frames)),
        ("signal.band_energies", "1 x 2048, 4 bands", *pair(_signal, "band_energies", frame, RATE, bands)),
        ("signal.vibration_features", "1 x 2048", *pair(_signal, "vibration_features", frame, RATE, bands)),
        ("signal.vibration_features", "32 x 2048", *pair(_signal, "vibration_features", frames, RATE, bands)),
        ("post.softmax", "32 x 1000", *pair(_post, "softmax", logits)),
        ("post.topk", "32 x 1000, k=5", *pair(_post, "topk", logits, 5)),
        ("post.argmax", "32 x 1000", *pair(_post, "argmax", logits)),
        ("post.threshold_hysteresis", "10000 x 1", *pair(_post, "threshold_hysteresis", scores, 0.7, 0.4)),
        ("post.nms", "1000 boxes, IoU 0.5", *pair(_post, "nms", boxes, box_scores, 0.5)),
        ("post.dequantize_int8", "1 x 84 x 8400", *pair(_post, "dequantize_int8", quantized, 0.05, 3)),
    ]


def agree(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return all(agree(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and (np.array_equal(a, b) if a.dtype.kind in "biu"
                                       else np.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True))
    return a == b


def per_call(fn: Callable[[], Any], min_time: float) -> float:
    """Seconds per call, over as many calls as fill ``min_time``."""
    loops = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            return elapsed / loops
        loops = max(loops * 2, int(loops * min_time / max(elapsed, 1e-9)) + 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per timed run")
    parser.add_argument("--out", default="bench-results/ops.json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = [(op, size, "numpy", fast, slow, agree) for op, size, fast, slow in cases(rng)]
    try:
        import cv2
    except ImportError:
        cv2 = None
    else:
        camera = rng.integers(0, 256, (480, 640, 3), np.uint8)
        rows.append(("image.resize", "640x480x3 -> 320x320", "cv2", lambda: _image.resize(camera, 320, 320),
                     lambda: cv2.resize(camera, (320, 320), interpolation=cv2.INTER_LINEAR),
                     lambda a, b: np.abs(a.astype(int) - b).max() <= 1))  # cv2 weighs in fixed point
    results = []
    for op, size, reference, fast, slow, check in rows:
        if not check(fast(), slow()):  # also the warm-up: compiles, or loads numba's cache
            raise SystemExit(f"{op}: the numba op and its {reference} reference disagree; "
                             "run pytest tests/test_ops.py")
        numba_s, reference_s = [], []
        for _ in range(args.runs):
            numba_s.append(per_call(fast, args.min_time))
            reference_s.append(per_call(slow, args.min_time))
        med_numba, med_reference = statistics.median(numba_s), statistics.median(reference_s)
        results.append({"op": op, "size": size, "reference": reference, "numba_us": med_numba * 1e6,
                        "reference_us": med_reference * 1e6, "speedup": med_reference / med_numba,
                        "runs_numba_us": [t * 1e6 for t in numba_s],
                        "runs_reference_us": [t * 1e6 for t in reference_s]})
    print(f"{'op':<26} {'size':<36} {'numba us':>10} {'reference us':>18} {'speed-up':>9}")
    for r in results:
        print(f"{r['op']:<26} {r['size']:<36} {r['numba_us']:>10.1f} {r['reference']:>6} {r['reference_us']:>11.1f} "
              f"{r['speedup']:>8.1f}x")
    if cv2 is None:
        print("\ncv2 (OpenCV) is not installed: resize is not compared with cv2.resize "
              "(pip install opencv-python-headless to add that row)")
    slow_ops = [f"{r['op']} ({r['size']}): {r['speedup']:.1f}x" for r in results
                if r["speedup"] < 2 and r["reference"] == "numpy"]
    if slow_ops:
        print("\nnumba less than 2x faster than numpy: " + "; ".join(slow_ops))
    write_results(args.out, {
        "runs": args.runs, "min_time_s": args.min_time, "cv2": None if cv2 is None else cv2.__version__,
        "numba": numba.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "results": results})


if __name__ == "__main__":
    main()
