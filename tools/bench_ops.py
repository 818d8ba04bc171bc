"""Pre/post-processing ops benchmark: each numba op against its numpy reference, and the image
and score ops against the library a user would otherwise call (OpenCV, numpy).

    python -m tools.bench_ops [--runs 7] [--min-time 0.05] [--only numpy|library|models|chain] [--threads 2]
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

The model rows (``--only models``; also part of ``library`` and of a full run) put the ops of
text, detection and audio models beside the code a user would otherwise write, one thread
each (BLAS too, through threadpoolctl when installed): ``text.db_boxes`` on a 960x960 map (the
real PP-OCRv4 detector's, run once with onnxruntime on 24 rendered text lines; rectangles over
the lines when the model is unavailable) against PaddleOCR's DBPostProcess in OpenCV
(findContours, minAreaRect, boxPoints, fillPoly score; unclip as the op does it), boxes
within 2 px; ``text.crop_rotated`` of its first 20 boxes to 48x320 against
getPerspectiveTransform + warpPerspective + resize per box, same widths; ``text.ctc_greedy``
on [20, 40, 6625] against numpy argmax + collapse, same labels; ``post.nms`` on 8400 boxes
against cv2.dnn.NMSBoxes and ``detect.decode_yolo`` on a YOLOv8 [1, 84, 8400] against numpy
+ cv2.dnn.NMSBoxesBatched, the same boxes kept; ``audio.log_mel`` (30 s at 16 kHz, n_fft 400,
hop 160, 80 mels, dB) against numpy (rfft + matmul) and, when installed, librosa's
melspectrogram + power_to_db, allclose.

The chain rows (``--only chain``; also part of a full run) run a manifest's pre chain as the
driver does (``Chains.pre``: letterbox -> to_tensor, resize -> normalize, resize_pad ->
normalize), writing the intermediate image into the buffer of its previous call against new
arrays each call (``build_chains(..., reuse=False)``).  glibc's allocator recycles blocks of
the same size, so the two are close; with ``MALLOC_MMAP_THRESHOLD_=131072`` (fresh pages for
every large block, as musl's allocator gives) the reuse saves the intermediate's page faults.
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


# -- the model ops (issue 11) against the libraries ---------------------------------------------------

#: text lines rendered for the detector's map: (x, y, font size, text)
OCR_LINES = [(30 + 40 * (i % 3), 20 + 38 * i, 18 + 4 * (i % 4), text) for i, text in enumerate(
    ["Invoice 2026-11-30  total 1,284.50 EUR", "Pump station 7: pressure 3.2 bar", "ALARM ACK  operator 42",
     "Serial No. 88-1234-XK", "The quick brown fox jumps over", "the lazy dog 0123456789",
     "Line speed 1.25 m/s  setpoint 1.30", "Batch 4471 / lot 12", "Temperature 71.4 C", "Motor B current 12.7 A",
     "Valve V-203 open", "Next service: 2027-02-01", "Conveyor 3 stopped", "Shift report page 2 of 5",
     "Humidity 41 %", "Order 55021 shipped", "Checksum OK", "Firmware 4.2.17", "Door 2 closed",
     "Zone C clear", "Spindle 12000 rpm", "Coolant level low", "Badge 0042 accepted", "End of report"])]


def ocr_map(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """A 960x960 BGR image of rendered text lines and its DB probability map [960, 960]: from
    the real PP-OCRv4 detector when it and onnxruntime are there, else rectangles over the lines."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (960, 960), "white")
    draw = ImageDraw.Draw(image)
    spans = []
    for x, y, size, text in OCR_LINES:
        draw.text((x, y), text, fill="black", font=ImageFont.load_default(size=size))
        spans.append(draw.textbbox((x, y), text, font=ImageFont.load_default(size=size)))
    bgr = np.ascontiguousarray(np.asarray(image)[..., ::-1])
    try:
        import onnxruntime as ort

        from tools.fetch_models import model_path
        session = ort.InferenceSession(str(model_path("ppocr-det")), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any reason the model cannot run: synthesize the map
        prob = np.full((960, 960), 0.02, np.float32)
        for x0, y0, x1, y1 in spans:
            prob[y0 + 2:y1 - 2, x0 + 2:x1 - 2] = rng.uniform(0.7, 0.95, (y1 - y0 - 4, x1 - x0 - 4))
        return bgr, prob, f"synthesized map (rectangles over the lines; the detector is unavailable: {exc})"
    x = (np.asarray(image, np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    (out,) = session.run(None, {session.get_inputs()[0].name: x.transpose(2, 0, 1)[None].astype(np.float32)})
    return bgr, np.ascontiguousarray(out[0, 0]), "map from the real PP-OCRv4 detector (ppocr-det) on the rendered lines"


def cv_db_boxes(cv2: Any, prob: np.ndarray, thresh: float = 0.3, box_thresh: float = 0.6, unclip_ratio: float = 1.5,
                max_candidates: int = 1000, min_size: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """PaddleOCR / rapidocr's DBPostProcess in OpenCV (contours, minAreaRect, boxPoints, the
    "fast" fillPoly score), the unclip approximated as text.db_boxes does it: the rectangle's
    sides moved out by area * unclip_ratio / perimeter (no pyclipper)."""
    h, w = prob.shape
    contours, _ = cv2.findContours((prob > thresh).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    boxes, scores = [], []
    for contour in contours[:max_candidates]:
        (cx, cy), (rw, rh), angle = cv2.minAreaRect(contour)
        if min(rw, rh) < min_size:
            continue
        points = cv2.boxPoints(((cx, cy), (rw, rh), angle))
        x0, x1 = int(np.clip(np.floor(points[:, 0].min()), 0, w - 1)), int(np.clip(np.ceil(points[:, 0].max()), 0, w - 1))
        y0, y1 = int(np.clip(np.floor(points[:, 1].min()), 0, h - 1)), int(np.clip(np.ceil(points[:, 1].max()), 0, h - 1))
        mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
        cv2.fillPoly(mask, [(points - (x0, y0)).astype(np.int32)], 1)
        score = cv2.mean(prob[y0:y1 + 1, x0:x1 + 1], mask)[0]
        if score < box_thresh:
            continue
        d = rw * rh * unclip_ratio / (2 * (rw + rh))
        if min(rw, rh) + 2 * d < min_size + 2:
            continue
        points = cv2.boxPoints(((cx, cy), (rw + 2 * d, rh + 2 * d), angle))
        boxes.append(np.clip(points, 0, (w - 1, h - 1)))
        scores.append(score)
    return np.array(boxes, np.float32).reshape(-1, 4, 2), np.array(scores, np.float32)


def same_boxes(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """As many boxes, each matched by centre within 2 px with sides within 3 px and score within 0.1
    (fillPoly rasterises a slightly tilted rectangle's integer corners: up to 0.085 apart on the
    real map, where the boxes themselves agree to 0.01 px)."""
    (boxes, scores), (ref, ref_scores) = a, b
    if len(boxes) != len(ref):
        return False

    def sides(q: np.ndarray) -> np.ndarray:
        return np.sort([np.linalg.norm(q[0] - q[1]), np.linalg.norm(q[1] - q[2])])

    centres = ref.mean(axis=1)
    for box, score in zip(boxes, scores):
        j = int(np.argmin(np.linalg.norm(centres - box.mean(axis=0), axis=1)))
        if (np.linalg.norm(centres[j] - box.mean(axis=0)) > 2 or np.abs(sides(box) - sides(ref[j])).max() > 3
                or abs(score - ref_scores[j]) > 0.1):
            return False
    return True


def cv_crop_rotated(cv2: Any, image: np.ndarray, boxes: np.ndarray, height: int = 48,
                    width: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """PaddleOCR's get_rotate_crop_image + resize_norm_img's resize and pad, per box (bilinear,
    as crop_rotated samples; PaddleOCR warps with INTER_CUBIC)."""
    out = np.zeros((len(boxes), height, width, image.shape[2]), np.uint8)
    widths = np.empty(len(boxes), np.int32)
    for i, p in enumerate(boxes.astype(np.float32)):
        cw = max(int(max(np.linalg.norm(p[0] - p[1]), np.linalg.norm(p[2] - p[3]))), 1)
        ch = max(int(max(np.linalg.norm(p[0] - p[3]), np.linalg.norm(p[1] - p[2]))), 1)
        m = cv2.getPerspectiveTransform(p, np.array([[0, 0], [cw, 0], [cw, ch], [0, ch]], np.float32))
        crop = cv2.warpPerspective(image, m, (cw, ch), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if ch / cw >= 1.5:
            crop = np.rot90(crop)
        rw = max(1, min(int(np.ceil(height * crop.shape[1] / crop.shape[0])), width))
        out[i, :, :rw] = cv2.resize(crop, (rw, height), interpolation=cv2.INTER_LINEAR)
        widths[i] = rw
    return out, widths


def same_crops(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Same widths, pixels within 8 on average per crop (the two round sampling positions differently)."""
    (crops, widths), (ref, ref_widths) = a, b
    return (np.array_equal(widths, ref_widths)
            and max(float(np.abs(x.astype(np.int16) - y).mean()) for x, y in zip(crops, ref)) <= 8)


def np_ctc_greedy(probs: np.ndarray, blank: int = 0) -> list[tuple[np.ndarray, float]]:
    """PaddleOCR's CTCLabelDecode in numpy: argmax and max per step, repeats and blanks dropped."""
    best, top = probs.argmax(axis=2), probs.max(axis=2)
    rows = []
    for labels, p in zip(best, top):
        keep = labels != blank
        keep[1:] &= labels[1:] != labels[:-1]
        rows.append((labels[keep], float(p[keep].mean()) if keep.any() else 0.0))
    return rows


def same_text(a: tuple[np.ndarray, np.ndarray, np.ndarray], b: list[tuple[np.ndarray, float]]) -> bool:
    labels, lengths, confidence = a
    return all(np.array_equal(labels[r, :lengths[r]], text) and abs(confidence[r] - c) < 1e-5
               for r, (text, c) in enumerate(b))


def yolo_predictions(rng: np.random.Generator, anchors: int = 8400, classes: int = 80, objects: int = 20) -> np.ndarray:
    """A YOLOv8 output [1, 4 + classes, anchors]: boxes clustered around ``objects`` objects
    (each anchor near one), the object's class scoring 0.2-0.95, the rest of the scores low."""
    centre = rng.uniform(40, 600, (objects, 2))
    size = rng.uniform(20, 200, (objects, 2))
    which = rng.integers(0, objects, anchors)
    xywh = np.concatenate([centre[which] + rng.normal(0, 6, (anchors, 2)),
                           size[which] * rng.uniform(0.85, 1.15, (anchors, 2))], axis=1)
    scores = rng.uniform(0, 0.05, (anchors, classes))
    scores[np.arange(anchors), rng.integers(0, classes, objects)[which]] = rng.uniform(0.0, 0.95, anchors) ** 2
    return np.ascontiguousarray(np.concatenate([xywh, scores], axis=1).T[None].astype(np.float32))


def cv_decode_yolo(cv2: Any, pred: np.ndarray, score_threshold: float = 0.25, iou_threshold: float = 0.45,
                   max_detections: int = 300) -> np.ndarray:
    """Ultralytics' OpenCV example: numpy for the best class and the threshold, then
    cv2.dnn.NMSBoxesBatched (per class) on x, y, w, h boxes."""
    x = pred[0].T
    scores = x[:, 4:]
    labels, best = scores.argmax(axis=1), scores.max(axis=1)
    cand = np.flatnonzero(best > score_threshold)
    xywh = x[cand, :4].copy()
    xywh[:, :2] -= xywh[:, 2:] / 2
    kept = np.asarray(cv2.dnn.NMSBoxesBatched(xywh, best[cand], labels[cand], score_threshold, iou_threshold),
                      np.int64).reshape(-1)[:max_detections]
    boxes = np.concatenate([xywh[kept, :2], xywh[kept, :2] + xywh[kept, 2:]], axis=1)
    return np.concatenate([boxes, best[cand][kept, None], labels[cand][kept, None]], axis=1).astype(np.float32)


def same_detections(a: list[np.ndarray], b: np.ndarray) -> bool:
    rows = a[0]
    if rows.shape != b.shape:
        return False
    x, y = rows[np.lexsort(rows.T[::-1])], b[np.lexsort(b.T[::-1])]
    return bool(np.allclose(x, y, atol=1e-3))


def same_kept(a: np.ndarray, b: Any) -> bool:
    return set(np.asarray(a).tolist()) == set(np.asarray(b, np.int64).reshape(-1).tolist())


def np_log_mel(x: np.ndarray, bank: np.ndarray, n_fft: int = 400, hop: int = 160) -> np.ndarray:
    """Log-mel (dB) in numpy: zero-padded centred frames, periodic Hann, rfft, power, matmul."""
    padded = np.pad(x, n_fft // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    return 10 * np.log10(np.maximum(bank @ power.T, 1e-10))


def model_cases(rng: np.random.Generator, cv2: Any) -> tuple[list[Row], list[str]]:
    """(op, size, library, numba call, library call, agree) for the ops of text, detection and
    audio models (issue 11), and notes on what was left out or where the input came from."""
    from drivers.ops import audio, detect, post, text

    rows: list[Row] = []
    notes: list[str] = []
    if cv2 is None:
        notes.append("cv2 is not installed: db_boxes, crop_rotated and NMS are not compared with OpenCV")
    else:
        image, prob, source = ocr_map(rng)
        notes.append(f"text.db_boxes / crop_rotated: {source}")
        rows.append(("text.db_boxes", "960x960 map, 24 lines", "cv2 contours+minAreaRect",
                     lambda: text.db_boxes(prob), lambda: cv_db_boxes(cv2, prob), same_boxes))
        boxes = text.db_boxes(prob)[0][:20]
        if len(boxes) < 20:
            notes.append(f"crop_rotated: the map gave {len(boxes)} boxes, not 20")
        rows.append(("text.crop_rotated", f"{len(boxes)} boxes -> {len(boxes)}x48x320", "cv2 warpPerspective",
                     lambda: text.crop_rotated(image, boxes), lambda: cv_crop_rotated(cv2, image, boxes), same_crops))
        pred = yolo_predictions(rng)
        x = pred[0].T
        xyxy = np.concatenate([x[:, :2] - x[:, 2:4] / 2, x[:, :2] + x[:, 2:4] / 2], axis=1)
        xywh = np.concatenate([xyxy[:, :2], x[:, 2:4]], axis=1)
        best = x[:, 4:].max(axis=1)
        rows += [
            ("post.nms", "8400 boxes, score 0.25, IoU 0.45", "cv2.dnn.NMSBoxes",
             lambda: post.nms(xyxy, best, 0.45, 0.25), lambda: cv2.dnn.NMSBoxes(xywh, best, 0.25, 0.45), same_kept),
            ("detect.decode_yolo", "1x84x8400, per class", "numpy+cv2.NMSBoxesBatched",
             lambda: detect.decode_yolo(pred), lambda: cv_decode_yolo(cv2, pred), same_detections),
        ]
    steps = np.zeros((20, 40), np.int64)  # a few characters, blanks between, some repeated
    steps[rng.random((20, 40)) < 0.4] = 1
    steps[steps == 1] = rng.integers(1, 6625, int((steps == 1).sum()))
    for t in range(1, 40):
        again = rng.random(20) < 0.15
        steps[again, t] = steps[again, t - 1]
    logits = rng.normal(0, 1, (20, 40, 6625)).astype(np.float32)
    np.put_along_axis(logits, steps[..., None], 12.0, axis=2)
    probs = np.exp(logits - logits.max(axis=2, keepdims=True))
    probs /= probs.sum(axis=2, keepdims=True)
    rows.append(("text.ctc_greedy", "20x40x6625 (PP-OCRv4 rec)", "numpy argmax+collapse",
                 lambda: text.ctc_greedy(probs), lambda: np_ctc_greedy(probs), same_text))
    signal = (0.2 * rng.standard_normal(30 * 16000)).astype(np.float32)
    bank = audio.mel_filterbank(16000, 400, 80).astype(np.float32)
    ours = lambda: audio.log_mel(signal, log="db", pad_mode="constant")[0]  # noqa: E731
    rows.append(("audio.log_mel", "30 s at 16 kHz, 400/160, 80 mels", "numpy rfft+matmul",
                 ours, lambda: np_log_mel(signal, bank),
                 lambda a, b: a.shape == b.shape and np.allclose(a, b, rtol=1e-4, atol=2e-3)))
    try:
        import librosa
    except ImportError:
        notes.append("librosa is not installed: log_mel is compared with numpy only (pip install librosa to add it)")
    else:
        def librosa_log_mel() -> np.ndarray:
            s = librosa.feature.melspectrogram(y=signal, sr=16000, n_fft=400, hop_length=160, n_mels=80)
            return librosa.power_to_db(s, ref=1.0, amin=1e-10, top_db=None)

        rows.append(("audio.log_mel", "30 s at 16 kHz, 400/160, 80 mels", "librosa", ours, librosa_log_mel,
                     lambda a, b: a.shape == b.shape and np.allclose(a, b, rtol=1e-4, atol=2e-3)))
    return rows, notes


def chain_manifest(model_input: list[Any], pre: list[dict[str, Any]]) -> Any:
    import msgspec

    from protocols.modelstore import Manifest, OpSpec, TensorSpec, Variant

    return Manifest(name="bench", version="1.0.0", created=1.0,
                    inputs=[TensorSpec(name="x", dtype="float32", shape=model_input)],
                    outputs=[TensorSpec(name="y", dtype="float32", shape=["N", 4])],
                    variants={"full": Variant(file="full.onnx", sha256="", size=0)},
                    pre=[msgspec.convert(p, OpSpec) for p in pre])


def same_feed(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def chain_cases(rng: np.random.Generator) -> list[Row]:
    """A manifest's pre chain run as the driver runs it (``Chains.pre``), writing its
    intermediate image into the buffer of its last call (``reuse``, the default) against new
    arrays each call (``build_chains(..., reuse=False)``)."""
    from drivers.ops import build_chains

    half = {"mean": [0.5], "std": [0.5]}
    cases = [
        ("letterbox -> to_tensor", "1080x1920 -> 640x640", ["N", 3, 640, 640],
         [{"op": "image.letterbox", "params": {"height": 640, "width": 640}}, {"op": "image.to_tensor"}],
         rng.integers(0, 256, (1, 1080, 1920, 3), np.uint8)),
        ("resize -> normalize", "480x640 -> 640x640", ["N", 3, 640, 640],
         [{"op": "image.resize", "params": {"height": 640, "width": 640}}, {"op": "image.normalize", "params": half}],
         rng.integers(0, 256, (1, 480, 640, 3), np.uint8)),
        ("resize_pad -> normalize", "20 crops 32x200 -> 20x48x320", ["N", 3, 48, 320],
         [{"op": "image.resize_pad", "params": {"height": 48, "width": 320}},
          {"op": "image.normalize", "params": half}],
         rng.integers(0, 256, (20, 32, 200, 3), np.uint8)),
    ]
    rows: list[Row] = []
    for name, size, model_input, pre, frames in cases:
        manifest = chain_manifest(model_input, pre)
        reusing, fresh = build_chains(manifest), build_chains(manifest, reuse=False)
        rows.append((name, size, "new arrays each call", lambda c=reusing, x=frames: c.pre({"x": x}),
                     lambda c=fresh, x=frames: c.pre({"x": x}), same_feed))
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
    parser.add_argument("--only", choices=("numpy", "library", "models", "chain"), help="only the rows against the "
                        "numpy references, only those against the libraries, only the text, detection and audio "
                        "ops' rows against the libraries, or only the chains reusing their buffers")
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
    if args.only in (None, "numpy"):
        rows += [(op, size, "numpy", fast, slow, agree) for op, size, fast, slow in cases(rng)]
    library_start = len(rows)
    if args.only in (None, "library"):
        rows += library_cases(rng, cv2)
        if args.threads > 1:
            rows += library_cases(rng, cv2, args.threads)
    notes: list[str] = []
    if args.only not in ("numpy", "chain"):
        model_rows, notes = model_cases(rng, cv2)
        rows += model_rows
    chain_start = len(rows)
    if args.only in (None, "chain"):
        rows += chain_cases(rng)
    try:  # numpy's and cv2's BLAS (librosa's and the numpy log-mel's matmul) on one thread too
        from threadpoolctl import threadpool_limits
    except ImportError:
        notes.append("threadpoolctl is not installed: BLAS may use more than one thread in the numpy rows")
    else:
        threadpool_limits(1)
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
        results.append({"op": op, "size": size, "reference": reference,
                        "library": library_start <= index < chain_start, "chain": index >= chain_start,
                        "numba_us": med_numba * 1e6, "reference_us": med_reference * 1e6,
                        "speedup": med_reference / med_numba,
                        "ratio": statistics.median(n / r for n, r in zip(numba_s, reference_s)),
                        "runs_numba_us": [t * 1e6 for t in numba_s],
                        "runs_reference_us": [t * 1e6 for t in reference_s]})
    load_after = load_average()
    against_numpy = [r for r in results if not r["library"] and not r["chain"]]
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
        print(f"\n{'op':<18} {'size':<46} {'library':<26} {'numba us':>10} {'library us':>11} {'numba/lib':>10}")
        for r in against_libraries:
            print(f"{r['op']:<18} {r['size']:<46} {r['reference']:<26} {r['numba_us']:>10.1f} "
                  f"{r['reference_us']:>11.1f} {r['ratio']:>9.2f}x")
        print("(numba/lib: numba's time over the library's, median of the runs' ratios; one thread each "
              "unless the size says otherwise)")
    chains = [r for r in results if r["chain"]]
    if chains:
        print(f"\n{'pre chain':<26} {'size':<30} {'reusing us':>11} {'new arrays us':>14} {'ratio':>7}")
        for r in chains:
            print(f"{r['op']:<26} {r['size']:<30} {r['numba_us']:>11.1f} {r['reference_us']:>14.1f} "
                  f"{r['ratio']:>6.2f}x")
        malloc = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        print("(the chain writing its intermediate into its last call's buffer over new arrays each call; "
              + (f"MALLOC_MMAP_THRESHOLD_={malloc})" if malloc else "glibc's default allocator, which recycles "
                 "same-sized blocks: MALLOC_MMAP_THRESHOLD_=131072 makes it map fresh pages each time, as musl does)"))
    for note in notes:
        print(f"note: {note}")
    if cv2 is None and args.only not in ("numpy", "chain"):
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
