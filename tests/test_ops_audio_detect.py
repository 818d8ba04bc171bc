"""The log-mel front end and the YOLO decoding ops against their numpy references (and
against librosa where it is installed), their edge cases and their errors.

Tolerances: log-mel values are float64 sums in a different order (a filter's run of bins
against a dense matrix product, chunked frames against whole-signal ones), rounded to
float32, so they must agree within ``rtol=1e-4`` (``atol=1e-5`` for logs near 0).
Detections must be equal, row for row: the same boxes kept, in the same order.  Box
coordinates are drawn on a quarter-pixel grid, where shifting boxes by a class offset (the
reference's per-class NMS) is exact, as it is for real detectors' outputs in practice.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from drivers.ops import _audio, _detect
from drivers.ops._exceptions import OpInputError, OpParamsError
from drivers.ops._image import letterbox_geometry

fuzz = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LOG_TOL = {"rtol": 1e-4, "atol": 1e-5}


def close(a: np.ndarray, b: np.ndarray, **tol: float) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    np.testing.assert_allclose(a, b, equal_nan=True, **(tol or LOG_TOL))


def same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    np.testing.assert_array_equal(a, b)


# -- log-mel ----------------------------------------------------------------------------------------


@st.composite
def log_mel_cases(draw: st.DrawFn) -> tuple[np.ndarray, dict]:
    n_fft = draw(st.sampled_from([2, 16, 31, 64, 100, 128, 400]))
    center = draw(st.booleans())
    rate = draw(st.sampled_from([8000, 16000, 22050]))
    fmax = draw(st.sampled_from([None, rate / 2, rate / 4]))
    params = {
        "rate": rate, "n_fft": n_fft, "hop": draw(st.integers(1, 2 * n_fft)),
        "n_mels": draw(st.integers(1, 40)), "fmin": draw(st.sampled_from([0.0, 20.0, 300.0])), "fmax": fmax,
        "window": draw(st.sampled_from(_audio.WINDOWS)), "center": center,
        "power": draw(st.sampled_from([2.0, 1.0, 0.5])), "log": draw(st.sampled_from(list(_audio.LOGS))),
        "floor": draw(st.sampled_from([1e-10, 1e-5])), "norm": draw(st.sampled_from(["slaney", None])),
        "mel_scale": draw(st.sampled_from(["slaney", "htk"])),
        "pad_mode": draw(st.sampled_from(["reflect", "constant"])),
    }
    samples = draw(st.integers(1 if center else n_fft, n_fft + 700))
    shape = (samples,) if draw(st.booleans()) else (draw(st.integers(1, 3)), samples)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    # Samples as a 16-bit ADC gives them, scaled: zeros, runs and silence come up.
    counts = draw(hnp.arrays(np.int16, shape, elements=st.integers(-2000, 2000)))
    return (counts / 2048).astype(dtype), params


@fuzz
@given(log_mel_cases())
def test_log_mel_matches_reference(case: tuple[np.ndarray, dict]) -> None:
    x, params = case
    out = _audio.log_mel(x, **params)
    pad = params["n_fft"] // 2 if params["center"] else 0
    frames = 1 + (x.shape[-1] + 2 * pad - params["n_fft"]) // params["hop"]
    assert out.shape == (1 if x.ndim == 1 else x.shape[0], params["n_mels"], frames)
    close(out, _audio.log_mel_reference(x, **params))


def test_log_mel_whisper_shape_and_chunks_across_signals() -> None:
    """30 s at 16 kHz gives Whisper's [1, 80, 3001]; a batch of signals gives each one's
    spectrogram (the chunks span signals)."""
    rng = np.random.default_rng(7)
    x = (0.1 * rng.standard_normal(16000 * 30)).astype(np.float32)
    out = _audio.log_mel(x)
    assert out.shape == (1, 80, 3001) and out.dtype == np.float32
    close(out, _audio.log_mel_reference(x))
    batch = np.stack([x[:16000], x[16000:32000], x[32000:48000]])
    together = _audio.log_mel(batch, log="db")
    for i in range(3):
        close(together[i], _audio.log_mel(batch[i], log="db")[0])


@pytest.mark.parametrize("log, expected", [("ln", math.log(1e-10)), ("log10", -10.0), ("db", -100.0)])
def test_log_mel_silence_is_the_floor(log: str, expected: float) -> None:
    out = _audio.log_mel(np.zeros(4000, np.float32), log=log)
    same(out, np.full((1, 80, 26), expected, np.float32))


def test_log_mel_short_signals() -> None:
    """Centred, any signal of a sample or more gives frames (the padding mirrors, repeatedly
    when it is longer than the signal, as np.pad does); not centred, one shorter than n_fft
    is refused, saying what to do."""
    for samples in (1, 2, 3, 100, 399):
        x = np.linspace(-0.5, 0.5, samples, dtype=np.float32)
        for pad_mode in ("reflect", "constant"):
            out = _audio.log_mel(x, pad_mode=pad_mode)
            assert out.shape == (1, 80, 1 + samples // 160)
            close(out, _audio.log_mel_reference(x, pad_mode=pad_mode))
    assert _audio.log_mel(np.ones(400, np.float32), center=False).shape == (1, 80, 1)
    with pytest.raises(OpInputError, match=r"'audio.log_mel'.*399 samples is shorter than n_fft=400.*center=True"):
        _audio.log_mel(np.ones(399, np.float32), center=False)
    with pytest.raises(OpInputError, match=r"'audio.log_mel'.*no samples"):
        _audio.log_mel(np.zeros(0, np.float32))
    same(_audio.log_mel(np.zeros((0, 800), np.float32)), np.zeros((0, 80, 6), np.float32))


def test_log_mel_nan_sample_spoils_only_its_frames() -> None:
    x = np.full(3200, 0.25, np.float32)
    x[1600] = np.nan
    out = _audio.log_mel(x)
    close(out, _audio.log_mel_reference(x))
    spoiled = np.isnan(out).any(axis=1)[0]
    assert spoiled[10] and not spoiled[0] and not spoiled[-1]


@pytest.mark.parametrize("signal, match", [
    (np.zeros(1000, np.int16), r"float32.*not int16.*x / 32768"),
    (np.zeros((2, 2, 1000), np.float32), r"\[samples\] or signals \[N, samples\], not shape \(2, 2, 1000\)"),
    (np.zeros(1000, np.complex64), r"not complex64"),
])
def test_log_mel_refuses_wrong_input(signal: np.ndarray, match: str) -> None:
    for fn in (_audio.log_mel, _audio.log_mel_reference):
        with pytest.raises(OpInputError, match=r"'audio.log_mel'.*" + match):
            fn(signal)


@pytest.mark.parametrize("params, param", [
    ({"fmax": 9000.0}, "fmax"), ({"fmin": -1.0}, "fmin"), ({"window": "blackman"}, "window"),
    ({"n_fft": 1}, "n_fft"), ({"hop": 0}, "hop"), ({"n_mels": 0}, "n_mels"), ({"log": "log2"}, "log"),
    ({"floor": 0.0}, "floor"), ({"norm": "l2"}, "norm"), ({"mel_scale": "bark"}, "mel_scale"),
    ({"power": 0}, "power"), ({"rate": 0}, "rate"), ({"pad_mode": "edge"}, "pad_mode"),
])
def test_log_mel_refuses_bad_params(params: dict, param: str) -> None:
    with pytest.raises(OpParamsError, match=rf"'audio.log_mel', parameter '{param}'"):
        _audio.log_mel(np.zeros(1000, np.float32), **params)


def test_log_mel_tables_are_cached() -> None:
    assert _audio.mel_filterbank() is _audio.mel_filterbank()
    assert not _audio.mel_filterbank().flags.writeable


librosa_cases = [
    {},
    {"mel_scale": "htk", "norm": None, "fmin": 30.0, "fmax": 7600.0},
    {"rate": 22050, "n_fft": 2048, "hop": 512, "n_mels": 128, "pad_mode": "constant"},
    {"n_fft": 512, "hop": 128, "n_mels": 64, "window": "hamming", "power": 1.0, "center": False},
]


@pytest.mark.parametrize("params", librosa_cases)
def test_log_mel_matches_librosa(params: dict) -> None:
    librosa = pytest.importorskip("librosa", reason="librosa is not installed (pip install librosa to compare)")
    p = {"rate": 16000, "n_fft": 400, "hop": 160, "n_mels": 80, "fmin": 0.0, "fmax": None, "norm": "slaney",
         "mel_scale": "slaney", "window": "hann", "power": 2.0, "center": True, "pad_mode": "reflect", **params}
    bank = librosa.filters.mel(sr=p["rate"], n_fft=p["n_fft"], n_mels=p["n_mels"], fmin=p["fmin"], fmax=p["fmax"],
                               htk=p["mel_scale"] == "htk", norm=p["norm"], dtype=np.float64)
    same(_audio.mel_filterbank(p["rate"], p["n_fft"], p["n_mels"], p["fmin"], p["fmax"], p["norm"], p["mel_scale"]),
         bank)
    rng = np.random.default_rng(3)
    x = (0.2 * rng.standard_normal(p["rate"] * 2)).astype(np.float32)
    spectrum = librosa.feature.melspectrogram(
        y=x.astype(np.float64), sr=p["rate"], n_fft=p["n_fft"], hop_length=p["hop"], window=p["window"],
        center=p["center"], pad_mode=p["pad_mode"], power=p["power"], n_mels=p["n_mels"], fmin=p["fmin"],
        fmax=p["fmax"], htk=p["mel_scale"] == "htk", norm=p["norm"], dtype=np.float64)
    expected = librosa.power_to_db(spectrum, ref=1.0, amin=1e-10, top_db=None).astype(np.float32)
    close(_audio.log_mel(x, log="db", **p)[0], expected, rtol=1e-4, atol=1e-3)


# -- YOLO decoding ----------------------------------------------------------------------------------


@st.composite
def yolo_cases(draw: st.DrawFn) -> tuple[np.ndarray, dict]:
    """Predictions with boxes clustered around a few objects (so NMS has work), on a quarter-
    pixel grid, and scores from a few levels (so ties and the threshold's edge come up)."""
    images, anchors, classes = draw(st.integers(1, 3)), draw(st.integers(1, 60)), draw(st.integers(1, 4))
    objectness = draw(st.booleans())
    layout = draw(st.sampled_from(_detect.LAYOUTS))
    objects = draw(hnp.arrays(np.int32, (3, 4), elements=st.integers(0, 2400)))
    which = draw(hnp.arrays(np.int64, (images, anchors), elements=st.integers(0, 2)))
    jitter = draw(hnp.arrays(np.int32, (images, anchors, 4), elements=st.integers(-40, 40)))
    xywh = np.maximum(objects[which] + jitter, 0) / 4
    levels = st.sampled_from([0.0, 0.125, 0.25, 0.3, 0.5, 0.75, 0.875, 1.0])
    scores = draw(hnp.arrays(np.float32, (images, anchors, classes + objectness), elements=levels))
    pred = np.concatenate([xywh.astype(np.float32), scores], axis=2)
    if layout == "anchors_last":
        pred = np.ascontiguousarray(pred.transpose(0, 2, 1))
    params = {
        "score_threshold": draw(st.sampled_from([0.0, 0.25, 0.5, 0.9])),
        "iou_threshold": draw(st.sampled_from([0.0, 0.3, 0.45, 0.7, 1.0])),
        "max_detections": draw(st.sampled_from([1, 3, 300])),
        "layout": layout, "objectness": objectness, "class_agnostic": draw(st.booleans()),
        "max_candidates": draw(st.sampled_from([_detect.MAX_CANDIDATES, 2, 10])),
    }
    return pred, params


@fuzz
@given(yolo_cases())
def test_decode_yolo_matches_reference(case: tuple[np.ndarray, dict]) -> None:
    pred, params = case
    got = _detect.decode_yolo(pred, **params)
    expected = _detect.decode_yolo_reference(pred, **params)
    assert len(got) == len(expected) == pred.shape[0]
    for g, e in zip(got, expected):
        same(g, e)
        assert len(g) <= params["max_detections"]
        assert (g[:, 4] > np.float32(params["score_threshold"])).all()
        assert (np.diff(g[:, 4]) <= 0).all()  # best first
    out, counts = _detect.decode_yolo_batch(pred, **params)
    assert out.shape == (pred.shape[0], params["max_detections"], 6) and counts.dtype == np.int32
    for b, rows in enumerate(got):
        assert counts[b] == len(rows)
        same(out[b, :counts[b]], rows)
        assert not out[b, counts[b]:].any()
    ref_out, ref_counts = _detect.decode_yolo_batch_reference(pred, **params)
    same(out, ref_out)
    same(counts, ref_counts)


def v8(boxes: list[list[float]], scores: list[list[float]]) -> np.ndarray:
    """One image [1, 4 + C, A] from boxes cx, cy, w, h and each anchor's class scores."""
    return np.concatenate([np.array(boxes, np.float32), np.array(scores, np.float32)], axis=1).T[None].copy()


def test_decode_yolo_by_hand() -> None:
    pred = v8([[50, 50, 20, 20], [51, 50, 20, 20], [50, 50, 20, 20], [200, 200, 10, 40]],
              [[0.9, 0.1], [0.8, 0.1], [0.1, 0.7], [0.2, 0.3]])
    rows = _detect.decode_yolo(pred)[0]
    # anchor 1 overlaps anchor 0 (same class) and goes; anchor 2 is class 1 and stays;
    # anchor 3 scores 0.3 for class 1.
    same(rows, np.array([[40, 40, 60, 60, 0.9, 0], [40, 40, 60, 60, 0.7, 1], [195, 180, 205, 220, 0.3, 1]],
                        np.float32))
    agnostic = _detect.decode_yolo(pred, class_agnostic=True)[0]
    same(agnostic[:, 4], np.array([0.9, 0.3], np.float32))


def test_decode_yolo_objectness_multiplies() -> None:
    """YOLOv5's [N, A, 5 + C]: a class's score is obj * its score."""
    pred = np.array([[[100, 100, 20, 20, 0.5, 0.6, 0.4], [10, 10, 4, 4, 0.9, 0.2, 0.25]]], np.float32)
    rows = _detect.decode_yolo(pred, layout="anchors_first", objectness=True)[0]
    same(rows, np.array([[90, 90, 110, 110, np.float32(0.5) * np.float32(0.6), 0]], np.float32))
    assert len(_detect.decode_yolo(pred, score_threshold=0.35, layout="anchors_first", objectness=True)[0]) == 0


def test_decode_yolo_nothing_above_threshold_is_empty() -> None:
    pred = np.zeros((2, 84, 100), np.float32)
    pred[:, 4:] = 0.25  # not strictly above the threshold
    for rows in (*_detect.decode_yolo(pred), *_detect.decode_yolo_reference(pred)):
        same(rows, np.zeros((0, 6), np.float32))
    out, counts = _detect.decode_yolo_batch(pred, max_detections=5)
    same(out, np.zeros((2, 5, 6), np.float32))
    same(counts, np.zeros(2, np.int32))


def test_decode_yolo_identical_boxes() -> None:
    """Identical boxes: the best (the first of equal scores) suppresses the rest, unless
    the IoU threshold is 1 (an IoU of exactly 1 does not exceed it)."""
    pred = v8([[320, 320, 64, 48]] * 6, [[0.5], [0.7], [0.7], [0.6], [0.7], [0.3]])
    for fn in (_detect.decode_yolo, _detect.decode_yolo_reference):
        same(fn(pred)[0], np.array([[288, 296, 352, 344, 0.7, 0]], np.float32))
        kept = fn(pred, iou_threshold=1.0)[0]
        same(kept[:, 4], np.array([0.7, 0.7, 0.7, 0.6, 0.5, 0.3], np.float32))


def test_decode_yolo_keeps_the_best_candidates() -> None:
    pred = v8([[10 * i, 0, 4, 4] for i in range(6)], [[s] for s in (0.3, 0.9, 0.5, 0.9, 0.4, 0.6)])
    for fn in (_detect.decode_yolo, _detect.decode_yolo_reference):
        same(fn(pred, max_candidates=3)[0][:, 0], np.array([8, 28, 48], np.float32))
        same(fn(pred, max_detections=2)[0][:, 4], np.array([0.9, 0.9], np.float32))


@pytest.mark.parametrize("where, value, match", [
    ((0, 5, 3), np.nan, r"image 0 has a NaN or infinite score"),
    ((1, 4, 7), np.inf, r"image 1 has a NaN or infinite score"),
    ((0, 2, 2), np.nan, r"image 0 has a NaN or infinite box"),
])
def test_decode_yolo_refuses_nan(where: tuple[int, int, int], value: float, match: str) -> None:
    pred = np.zeros((2, 84, 10), np.float32)
    pred[:, 4] = 0.9
    pred[:, :4] = 10
    pred[where] = value
    for fn in (_detect.decode_yolo, _detect.decode_yolo_reference, _detect.decode_yolo_batch):
        with pytest.raises(OpInputError, match=r"'post.decode_yolo'.*" + match):
            fn(pred)


def test_decode_yolo_ignores_nan_boxes_below_threshold() -> None:
    pred = np.zeros((1, 6, 3), np.float32)
    pred[0, :, 0] = [10, 10, 4, 4, 0.9, 0.1]
    pred[0, 0, 1] = np.nan  # anchor 1 scores 0
    for fn in (_detect.decode_yolo, _detect.decode_yolo_reference):
        same(fn(pred)[0], np.array([[8, 8, 12, 12, 0.9, 0]], np.float32))


@pytest.mark.parametrize("pred, kwargs, match", [
    (np.zeros((1, 84, 10), np.uint8), {}, r"float predictions \(float32\), not uint8"),
    (np.zeros((84, 8400), np.float32), {}, r"\[N, 4 \+ C, A\] \(anchors_last\), not shape \(84, 8400\)"),
    (np.zeros((1, 4, 10), np.float32), {}, r"at least one class"),
    (np.zeros((1, 10, 5), np.float32), {"layout": "anchors_first", "objectness": True}, r"at least one class"),
])
def test_decode_yolo_refuses_wrong_input(pred: np.ndarray, kwargs: dict, match: str) -> None:
    for fn in (_detect.decode_yolo, _detect.decode_yolo_reference):
        with pytest.raises(OpInputError, match=r"'post.decode_yolo'.*" + match):
            fn(pred, **kwargs)


@pytest.mark.parametrize("kwargs, param", [
    ({"layout": "nchw"}, "layout"), ({"iou_threshold": 1.5}, "iou_threshold"),
    ({"max_detections": 0}, "max_detections"), ({"score_threshold": math.nan}, "score_threshold"),
    ({"max_candidates": 0}, "max_candidates"),
])
def test_decode_yolo_refuses_bad_params(kwargs: dict, param: str) -> None:
    with pytest.raises(OpParamsError, match=rf"'post.decode_yolo', parameter '{param}'"):
        _detect.decode_yolo(np.zeros((1, 84, 10), np.float32), **kwargs)


def test_decode_yolo_float16_and_float64() -> None:
    pred = v8([[50, 50, 20, 20]], [[0.5]])
    expected = _detect.decode_yolo(pred)[0]
    for dtype in (np.float16, np.float64):
        same(_detect.decode_yolo(pred.astype(dtype))[0], expected)


# -- unletterbox ------------------------------------------------------------------------------------


@st.composite
def unletterbox_cases(draw: st.DrawFn) -> tuple[np.ndarray, dict]:
    batch = draw(st.booleans())
    shape = (draw(st.integers(1, 3)), draw(st.integers(0, 6)), 6) if batch else (draw(st.integers(0, 6)), 6)
    boxes = draw(hnp.arrays(np.float32, shape, elements=st.floats(-100, 800, width=32)))
    params = {
        "scale": draw(st.floats(0.05, 4.0)), "pad": (draw(st.integers(0, 200)), draw(st.integers(0, 200))),
        "shape": draw(st.one_of(st.none(), st.tuples(st.integers(1, 900), st.integers(1, 900)))),
    }
    if batch and draw(st.booleans()):
        params["counts"] = draw(hnp.arrays(np.int32, shape[0], elements=st.integers(0, shape[1])))
    return boxes, params


@fuzz
@given(unletterbox_cases())
def test_unletterbox_matches_reference(case: tuple[np.ndarray, dict]) -> None:
    boxes, params = case
    out = _detect.unletterbox(boxes, **params)
    same(out, _detect.unletterbox_reference(boxes, **params))
    same(out[..., 4:], boxes[..., 4:])


def test_unletterbox_undoes_letterbox() -> None:
    """A box in a 480 x 640 image, letterboxed into 640 x 640, comes back where it was."""
    scale, _, _, top, left = letterbox_geometry(480, 640, 640, 640)
    original = np.array([[100.0, 50.0, 300.0, 400.0, 0.9, 2.0]], np.float32)
    boxed = original.copy()
    boxed[:, [0, 2]] = boxed[:, [0, 2]] * scale + left
    boxed[:, [1, 3]] = boxed[:, [1, 3]] * scale + top
    close(_detect.unletterbox(boxed, scale, (top, left)), original, rtol=1e-6, atol=1e-4)
    out, counts = _detect.decode_yolo_batch(v8([[320, 320, 64, 48]], [[0.9]]), max_detections=3)
    mapped = _detect.unletterbox(out, scale, (top, left), shape=(480, 640), counts=counts)
    assert mapped[0, 0, 1] == (296 - top) / scale and not mapped[0, 1:].any()


def test_unletterbox_refuses_wrong_input() -> None:
    with pytest.raises(OpInputError, match=r"'post.unletterbox'.*not int32 \(3, 6\)"):
        _detect.unletterbox(np.zeros((3, 6), np.int32), 1.0, (0, 0))
    with pytest.raises(OpInputError, match=r"'post.unletterbox'.*counts"):
        _detect.unletterbox(np.zeros((2, 3, 6), np.float32), 1.0, (0, 0), counts=np.array([4, 0]))
    with pytest.raises(OpParamsError, match=r"'post.unletterbox', parameter 'scale'"):
        _detect.unletterbox(np.zeros((3, 6), np.float32), 0.0, (0, 0))
