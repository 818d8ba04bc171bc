"""Pre/post-processing ops benchmark: each numba op against its numpy reference, and the image
and score ops against the library a user would otherwise call (OpenCV, numpy).

    python -m tools.bench_ops [--runs 7] [--min-time 0.05] [--only numpy|library] [--threads 2]
                              [--out bench-results/ops.json]

For every op, on sizes a model meets (a 640x480 camera frame resized to 320x320, a
2048-sample vibration frame, 1000 classes for a batch of 32, 1000 candidate boxes...):
the numba op as a driver calls it (argument checks and reshaping included) and its
``<op>_reference`` in plain numpy are each called once to compile and warm caches, checked
to agree, then timed in alternation ``--runs`` times; a run repeats the call for at least
``--min-time`` seconds and counts the time per call.  Medians are reported, with the
speed-up (reference time over numba time).

The library rows put the camera-to-model path beside OpenCV on one thread each
(``cv2.setNumThreads(1)``; the numba kernels run on the calling thread): ``image.resize``
from 1080x1920 to 320x320, 480x640 to 640x640 and 1080x1920 to 720x1280 against
``cv2.resize`` (INTER_LINEAR, outputs within 1), ``image.letterbox`` to 640x640 against
``cv2.resize`` + ``cv2.copyMakeBorder``, ``image.to_model`` (resize or letterbox,
BGR to RGB, ImageNet mean/std, float32 NCHW in one pass) against ``cv2.resize`` + numpy's
``(x / 255 - mean) / std`` + transpose and against ``cv2.dnn.blobFromImage`` (which has no
per-channel std: both sides then use mean only); and softmax, argmax, top-k on a
classifier's [1, 1000], a recogniser's [32, 6625] (PP-OCRv4 steps) and a detector's
[1, 84, 8400] against numpy (top-k: argpartition then a sort of the k).  Their ratio is
numba's time over the library's (below 1: numba is faster), the median of the runs' ratios.
``--threads N`` adds the image rows with N threads on both sides.  Without cv2 installed
the OpenCV rows are left out, and the output says so.
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


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: the issue's camera shapes: (source height, width) -> (model height, width)
CAMERA_SHAPES = [((1080, 1920), (320, 320)), ((480, 640), (640, 640)), ((1080, 1920), (720, 1280))]
#: scores as real models give them
SCORE_SHAPES = [("classifier", (1, 1000)), ("recogniser (PP-OCRv4 rec)", (32, 6625)), ("detector", (1, 84, 8400))]

Row = tuple[str, str, str, Callable[[], Any], Callable[[], Any], Callable[[Any, Any], bool]]


def within_one(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(np.int64) - b).max()) <= 1


def within_a_pixel(a: np.ndarray, b: np.ndarray, step: float) -> bool:
    """float tensors from images within 1 (a pixel value) of each other, ``step`` per value."""
    return a.shape == b.shape and float(np.abs(a - b).max()) <= step * (1 + 1e-4)


def library_cases(rng: np.random.Generator, cv2: Any, threads: int = 1) -> list[Row]:
    """(op, size, library, numba call, library call, agree) for the camera-to-model and score ops."""
    rows: list[Row] = []
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    label = "" if threads == 1 else f", {threads} threads"
    if cv2 is not None:
        for (h0, w0), (h, w) in CAMERA_SHAPES:
            img = rng.integers(0, 256, (h0, w0, 3), np.uint8)
            size = f"{h0}x{w0}x3 -> {h}x{w}{label}"

            def cv_to_model(img: np.ndarray = img, h: int = h, w: int = w) -> np.ndarray:
                x = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)[..., ::-1]
                return np.ascontiguousarray(((x / np.float32(255) - mean) / std).transpose(2, 0, 1))

            rows += [
                ("image.resize", size, "cv2.resize",
                 lambda img=img, h=h, w=w: _image.resize(img, h, w, threads=threads),
                 lambda img=img, h=h, w=w: cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR), within_one),
                ("image.to_model", size + " (mean/std)", "cv2.resize+numpy",
                 lambda img=img, h=h, w=w: _image.to_model(img, h, w, IMAGENET_MEAN, IMAGENET_STD, swap_rb=True,
                                                           threads=threads),
                 cv_to_model, lambda a, b: within_a_pixel(a, b, 1 / 255 / min(IMAGENET_STD))),
                ("image.to_model", size + " (mean)", "cv2.dnn.blobFromImage",
                 lambda img=img, h=h, w=w: _image.to_model(img, h, w, IMAGENET_MEAN, swap_rb=True, threads=threads)[None],
                 lambda img=img, h=h, w=w: cv2.dnn.blobFromImage(img, 1 / 255, (w, h), tuple(255 * float(m) for m in mean), swapRB=True),
                 lambda a, b: within_a_pixel(a, b, 1 / 255)),
            ]
        img = rng.integers(0, 256, (1080, 1920, 3), np.uint8)
        size = f"1080x1920x3 -> 640x640{label}"

        def cv_letterbox() -> np.ndarray:
            x = cv2.resize(img, (640, 360), interpolation=cv2.INTER_LINEAR)
            return cv2.copyMakeBorder(x, 140, 140, 0, 0, cv2.BORDER_CONSTANT, value=(114, 114, 114))

        def cv_letterbox_to_model() -> np.ndarray:
            x = cv_letterbox()[..., ::-1]
            return np.ascontiguousarray(((x / np.float32(255) - mean) / std).transpose(2, 0, 1))

        rows += [
            ("image.letterbox", size, "cv2 resize+border",
             lambda: _image.letterbox(img, 640, 640, threads=threads)[0], cv_letterbox, within_one),
            ("image.to_model", size + " letterbox", "cv2.resize+numpy",
             lambda: _image.to_model(img, 640, 640, IMAGENET_MEAN, IMAGENET_STD, letterbox=True, swap_rb=True,
                                     threads=threads),
             cv_letterbox_to_model, lambda a, b: within_a_pixel(a, b, 1 / 255 / min(IMAGENET_STD))),
        ]
    if threads != 1:
        return rows
    for what, shape in SCORE_SHAPES:
        x = rng.normal(0, 4, shape).astype(np.float32)
        size = f"{'x'.join(map(str, shape))} {what}"

        def np_softmax(x: np.ndarray = x) -> np.ndarray:
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)

        def np_topk(x: np.ndarray = x, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
            index = np.argpartition(-x, k - 1, axis=-1)[..., :k]
            value = np.take_along_axis(x, index, axis=-1)
            order = np.argsort(-value, axis=-1, kind="stable")
            return np.take_along_axis(index, order, axis=-1), np.take_along_axis(value, order, axis=-1)

        rows += [
            ("post.softmax", size, "numpy", lambda x=x: _post.softmax(x), np_softmax, agree),
            ("post.argmax", size, "numpy", lambda x=x: _post.argmax(x), lambda x=x: np.argmax(x, axis=-1), agree),
            ("post.topk", size + ", k=5", "numpy", lambda x=x: _post.topk(x, 5), np_topk, agree),
        ]
    return rows


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per timed run")
    parser.add_argument("--only", choices=("numpy", "library"), help="only the rows against the numpy "
                        "references, or only those against the libraries")
    parser.add_argument("--threads", type=int, default=1, help="also time the image ops on this many threads "
                        "(cv2.setNumThreads and the ops' threads)")
    parser.add_argument("--out", default="bench-results/ops.json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    try:
        import cv2
    except ImportError:
        cv2 = None
    else:
        cv2.setNumThreads(1)
    rows: list[Row] = []
    if args.only != "library":
        rows += [(op, size, "numpy", fast, slow, agree) for op, size, fast, slow in cases(rng)]
    library_start = len(rows)
    if args.only != "numpy":
        rows += library_cases(rng, cv2)
        if args.threads > 1:
            rows += library_cases(rng, cv2, args.threads)
    load_before = load_average()
    results = []
    for index, (op, size, reference, fast, slow, check) in enumerate(rows):
        threaded = args.threads > 1 and "threads" in size
        if cv2 is not None:
            cv2.setNumThreads(args.threads if threaded else 1)
        if not check(fast(), slow()):  # also the warm-up: compiles, or loads numba's cache
            raise SystemExit(f"{op} ({size}): the numba op and {reference} disagree; run pytest tests/test_ops.py")
        numba_s, reference_s = [], []
        for _ in range(args.runs):
            numba_s.append(per_call(fast, args.min_time))
            reference_s.append(per_call(slow, args.min_time))
        med_numba, med_reference = statistics.median(numba_s), statistics.median(reference_s)
        results.append({"op": op, "size": size, "reference": reference, "library": index >= library_start,
                        "numba_us": med_numba * 1e6, "reference_us": med_reference * 1e6,
                        "speedup": med_reference / med_numba,
                        "ratio": statistics.median(n / r for n, r in zip(numba_s, reference_s)),
                        "runs_numba_us": [t * 1e6 for t in numba_s],
                        "runs_reference_us": [t * 1e6 for t in reference_s]})
    load_after = load_average()
    against_numpy = [r for r in results if not r["library"]]
    if against_numpy:
        print(f"{'op':<26} {'size':<36} {'numba us':>10} {'reference us':>18} {'speed-up':>9}")
        for r in against_numpy:
            print(f"{r['op']:<26} {r['size']:<36} {r['numba_us']:>10.1f} {r['reference']:>6} "
                  f"{r['reference_us']:>11.1f} {r['speedup']:>8.1f}x")
        slow_ops = [f"{r['op']} ({r['size']}): {r['speedup']:.1f}x" for r in against_numpy if r["speedup"] < 2]
        if slow_ops:
            print("\nnumba less than 2x faster than numpy: " + "; ".join(slow_ops))
    against_libraries = [r for r in results if r["library"]]
    if against_libraries:
        print(f"\n{'op':<16} {'size':<46} {'library':<24} {'numba us':>10} {'library us':>11} {'numba/lib':>10}")
        for r in against_libraries:
            print(f"{r['op']:<16} {r['size']:<46} {r['reference']:<24} {r['numba_us']:>10.1f} "
                  f"{r['reference_us']:>11.1f} {r['ratio']:>9.2f}x")
        print("(numba/lib: numba's time over the library's, median of the runs' ratios; one thread each "
              "unless the size says otherwise)")
    if cv2 is None and args.only != "numpy":
        print("\ncv2 (OpenCV) is not installed: the image ops are not compared with OpenCV "
              "(pip install opencv-python-headless to add those rows)")
    if load_before is not None:
        print(f"\nload average (1 min) before / after: {load_before:.2f} / {load_after:.2f} on {os.cpu_count()} CPUs")
    write_results(args.out, {
        "runs": args.runs, "min_time_s": args.min_time, "threads": args.threads,
        "cv2": None if cv2 is None else cv2.__version__, "numba": numba.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average": [load_before, load_after], "results": results})


if __name__ == "__main__":
    main()
