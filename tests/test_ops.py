"""The numba pre/post-processing ops against their numpy references, the registry, and the
demo model's pipelines end to end.

Tolerances: integer and boolean results (images, indices, states) and copies of the input
(frames, top-k values, dequantised values) must be equal.  Float results computed in a
different order (sums, FFT against np.fft, exp from libm against numpy's) are compared with
``rtol=1e-5, atol=1e-6``: float32 outputs, a few ulps apart.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from drivers import ops
from drivers.ops import _image, _post, _signal
from tools.build_demo_models import BANDS, RATE, features, simulate

TOL = {"rtol": 1e-5, "atol": 1e-6}
fuzz = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    np.testing.assert_array_equal(a, b)


def close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    np.testing.assert_allclose(a, b, equal_nan=True, **TOL)


# -- strategies -------------------------------------------------------------------------------------


@st.composite
def images(draw: st.DrawFn, channels: tuple[int, ...] = (1, 3, 4), max_side: int = 24) -> np.ndarray:
    shape = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)), draw(st.sampled_from(channels)))
    if draw(st.booleans()):
        shape = (draw(st.integers(1, 2)), *shape)
    return draw(hnp.arrays(np.uint8, shape))


@st.composite
def signals(draw: st.DrawFn, shape: tuple[int, ...]) -> np.ndarray:
    """Samples as an ADC gives them (int16 counts) scaled to float: zeros, constant runs and
    ties come up, and nothing underflows."""
    counts = draw(hnp.arrays(np.int16, shape, elements=st.integers(-2000, 2000)))
    return (counts / 64).astype(draw(st.sampled_from([np.float32, np.float64])))


frame_lengths = st.one_of(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 256]), st.integers(1, 200))


@st.composite
def frame_batches(draw: st.DrawFn) -> np.ndarray:
    return draw(signals((draw(st.integers(0, 4)), draw(frame_lengths))))


@st.composite
def band_lists(draw: st.DrawFn, rate: float) -> list[list[float]]:
    edges = st.one_of(st.integers(0, int(rate / 2) + 2).map(float), st.floats(0, rate / 2 * 1.1))
    out = []
    for _ in range(draw(st.integers(1, 4))):
        lo, hi = sorted(draw(st.lists(edges, min_size=2, max_size=2, unique=True)))
        out.append([lo, hi])
    return out


def score_arrays(shape: tuple[int, ...], special: bool = True) -> st.SearchStrategy[np.ndarray]:
    """Float scores with many ties, and NaN and infinities if ``special``."""
    values = st.one_of(st.sampled_from([0.0, 0.5, -1.0, 1.0, 2.0]), st.floats(-50, 50, width=32),
                       *([st.sampled_from([np.nan, np.inf, -np.inf])] if special else []))
    return st.sampled_from([np.float32, np.float64]).flatmap(lambda dt: hnp.arrays(dt, shape, elements=values))


rows = st.tuples(st.integers(0, 4), st.integers(1, 40))


# -- image ------------------------------------------------------------------------------------------


@fuzz
@given(img=images(), height=st.integers(1, 32), width=st.integers(1, 32))
def test_resize(img: np.ndarray, height: int, width: int) -> None:
    same(_image.resize(img, height, width), _image.resize_reference(img, height, width))


@fuzz
@given(img=images())
def test_resize_to_the_same_size_is_the_identity(img: np.ndarray) -> None:
    same(_image.resize(img, *img.shape[-3:-1]), img)


def test_resize_edge_cases() -> None:
    pixel = np.array([[[10, 200, 77]]], np.uint8)
    same(_image.resize(pixel, 5, 7), np.broadcast_to(pixel, (5, 7, 3)).copy())
    ramp = np.arange(4, dtype=np.uint8).reshape(1, 4, 1) * 10
    # Half-pixel centres: output x=0 samples source x=0.5 between 0 and 10, rounded half up.
    same(_image.resize(ramp, 1, 2)[0, :, 0], np.array([5, 25], np.uint8))
    with pytest.raises(ops.OpInputError, match="image.resize.*nothing to resize"):
        _image.resize(np.zeros((0, 4, 3), np.uint8), 2, 2)
    with pytest.raises(ops.OpInputError, match="uint8"):
        _image.resize(np.zeros((4, 4, 3), np.float32), 2, 2)
    with pytest.raises(ops.OpInputError, match="HWC or NHWC"):
        _image.resize(np.zeros((4, 4), np.uint8), 2, 2)
    with pytest.raises(ops.OpInputError, match="threads must be at least 1"):
        _image.resize(pixel, 2, 2, threads=0)


@pytest.mark.parametrize("n_in", [1, 2, 3, 7, 48, 480, 1080, 1920, 1999])
def test_resize_taps_are_opencvs(n_in: int) -> None:
    """The taps (numba, as the kernels use them) equal the numpy reference's, and both
    orders of a pixel's two weights add up to 2048 (the kernels rely on it)."""
    for n_out in sorted({1, 2, 5, 33, 320, 360, 640, 720, 1280, n_in, 2 * n_in + 1}):
        got, want = _image._axis_taps(n_in, n_out), _image._axis_taps_reference(n_in, n_out)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        assert (want[2] + want[3] == 2048).all()


def test_resize_takes_the_vectorised_kernels_where_the_taps_allow() -> None:
    """A regression here is invisible in the results, only in the time: 1080p to 720p takes
    the two-thirds kernel, 1080p to 540p and 640 to 320 wide the halving one."""
    assert _image._plan(1080, 1920, 720, 1280, 3)[-1] == _image._ROWS_FIRST_TWO_THIRDS
    assert _image._plan(1080, 1920, 540, 960, 3)[-1] == _image._ROWS_FIRST_HALVED
    assert _image._plan(480, 640, 320, 320, 3)[-1] == _image._ROWS_FIRST_HALVED
    assert _image._plan(480, 640, 640, 640, 3)[-1] == _image._COLUMNS_FIRST  # enlarging
    assert _image._plan(1080, 1920, 320, 320, 3)[-1] == _image._ROWS_FIRST


CAMERA_SHAPES = [((1080, 1920), (320, 320)), ((480, 640), (640, 640)), ((1080, 1920), (720, 1280)),
                 ((1080, 1920), (360, 640)), ((480, 640), (240, 320)), ((720, 1280), (640, 640))]
# the three (the third two thirds), a letterbox's third, halves


@pytest.mark.parametrize("src_hw, dst_hw", CAMERA_SHAPES)
def test_resize_against_opencv_on_camera_shapes(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> None:
    """Within 1 of cv2.INTER_LINEAR on random frames (OpenCV's vector code rounds its sums a
    little differently from its scalar code), equal to the reference, the same on 2 threads."""
    cv2 = pytest.importorskip("cv2")
    img = np.random.default_rng(sum(src_hw + dst_hw)).integers(0, 256, (*src_hw, 3), np.uint8)
    (h, w) = dst_hw
    out = _image.resize(img, h, w)
    assert np.abs(out.astype(int) - cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)).max() <= 1
    same(out, _image.resize_reference(img, h, w))
    same(_image.resize(img, h, w, threads=2), out)


def test_resize_against_opencv() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    for shape in [(48, 64, 3), (37, 5, 1), (9, 31, 4), (1, 40, 3), (40, 1, 3), (2, 2, 3)]:
        img = rng.integers(0, 256, shape, np.uint8)
        for h, w in [(20, 30), (96, 128), (48, 33), (7, 100), (1, 1), (3, 2), (160, 5)]:
            want = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, shape[2])
            diff = np.abs(_image.resize(img, h, w).astype(int) - want)
            assert diff.max() <= 1, (shape, h, w)


@fuzz
@given(img=images(channels=(1, 2, 3, 4, 5)), height=st.integers(1, 40), width=st.integers(1, 40),
       threads=st.sampled_from([1, 2]))
def test_resize_any_channels_and_threads(img: np.ndarray, height: int, width: int, threads: int) -> None:
    """Both kernel orders (rows first when shrinking, columns first when enlarging), every
    channel count (3 and 1 have kernels of their own), on one or two threads."""
    same(_image.resize(img, height, width, threads=threads), _image.resize_reference(img, height, width))


@fuzz
@given(data=st.data(), channels=st.sampled_from([1, 2, 3, 4]), threads=st.sampled_from([1, 2]),
       factor=st.sampled_from([(2, 1), (3, 2)]))
def test_resize_halving_or_two_thirds_of_the_width(data: st.DataObject, channels: int, threads: int,
                                                   factor: tuple[int, int]) -> None:
    """Halving the width, and two thirds of it for 3 channels, take kernels of their own (the
    taps a fixed pattern that vectorises): equal to the reference, in resize and to_model."""
    w = data.draw(st.integers(1, 20)) * factor[1]
    wide = w * factor[0] // factor[1]
    h0, h = data.draw(st.integers(1, 30)), data.draw(st.integers(1, 30))
    img = data.draw(hnp.arrays(np.uint8, (h0, wide, channels)))
    same(_image.resize(img, h, w, threads=threads), _image.resize_reference(img, h, w))
    close(_image.to_model(img, h, w, threads=threads), _image.to_model_reference(img, h, w))
    same(_image.to_model(img, h, w), _image.normalize(_image.resize(img, h, w)))


def test_letterbox_against_opencv() -> None:
    """As YOLO letterboxes with cv2: resize, then copyMakeBorder with grey."""
    cv2 = pytest.importorskip("cv2")
    img = np.random.default_rng(3).integers(0, 256, (1080, 1920, 3), np.uint8)
    out, scale, (top, left) = _image.letterbox(img, 640, 640)
    assert (scale, top, left) == (1 / 3, 140, 0)
    want = cv2.copyMakeBorder(cv2.resize(img, (640, 360), interpolation=cv2.INTER_LINEAR), 140, 140, 0, 0,
                              cv2.BORDER_CONSTANT, value=(114, 114, 114))
    assert np.abs(out.astype(int) - want).max() <= 1


@fuzz
@given(img=images(channels=(1, 3)), height=st.integers(1, 32), width=st.integers(1, 32), pad=st.integers(0, 255))
def test_letterbox(img: np.ndarray, height: int, width: int, pad: int) -> None:
    out, scale, (top, left) = _image.letterbox(img, height, width, pad)
    ref, ref_scale, ref_offsets = _image.letterbox_reference(img, height, width, pad)
    same(out, ref)
    assert (scale, (top, left)) == (ref_scale, ref_offsets)
    h, w = img.shape[-3:-1]
    _, new_h, new_w, _, _ = _image.letterbox_geometry(h, w, height, width)
    assert new_h == height or new_w == width or new_h == 1 or new_w == 1
    inside = np.zeros(out.shape[-3:-1], bool)
    inside[top:top + new_h, left:left + new_w] = True
    assert (out[..., ~inside, :] == pad).all()


def test_letterbox_geometry() -> None:
    img = np.full((480, 640, 3), 9, np.uint8)
    out, scale, (top, left) = _image.letterbox(img, 320, 320)
    assert (scale, top, left) == (0.5, 40, 0)
    assert (out[:40] == 114).all() and (out[40:280] == 9).all() and (out[280:] == 114).all()


@fuzz
@given(img=images(), data=st.data(), scale=st.booleans())
def test_normalize(img: np.ndarray, data: st.DataObject, scale: bool) -> None:
    c = img.shape[-1]
    n = data.draw(st.sampled_from([1, c]))
    mean = data.draw(st.lists(st.floats(-2, 260), min_size=n, max_size=n))
    std = data.draw(st.lists(st.floats(0.01, 100), min_size=n, max_size=n))
    out = _image.normalize(img, mean, std, scale)
    close(out, _image.normalize_reference(img, mean, std, scale))
    assert out.shape == (*img.shape[:-3], c, *img.shape[-3:-1])


def test_normalize_imagenet() -> None:
    img = np.array([[[0, 128, 255]]], np.uint8)
    out = _image.normalize(img, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    expect = (np.array([0, 128, 255]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    close(out[:, 0, 0], expect.astype(np.float32))
    with pytest.raises(ops.OpInputError, match="mean has 2 values for images of 3 channels"):
        _image.normalize(img, [0.1, 0.2])


@fuzz
@given(img=images(channels=(1, 3, 4)), height=st.integers(1, 32), width=st.integers(1, 32), data=st.data())
def test_to_model_is_the_ops_it_fuses(img: np.ndarray, height: int, width: int, data: st.DataObject) -> None:
    """Bit for bit normalize(resize) (or of letterbox, bgr_to_rgb), and close to the numpy references."""
    c = img.shape[-1]
    n = data.draw(st.sampled_from([1, c]))
    mean = data.draw(st.lists(st.floats(-2, 260), min_size=n, max_size=n))
    std = data.draw(st.lists(st.floats(0.01, 100), min_size=n, max_size=n))
    scale, letterbox, swap = data.draw(st.booleans()), data.draw(st.booleans()), c > 1 and data.draw(st.booleans())
    pad, threads = data.draw(st.integers(0, 255)), data.draw(st.sampled_from([1, 2]))
    out = _image.to_model(img, height, width, mean, std, scale, letterbox, pad, swap, threads=threads)
    x = _image.letterbox(img, height, width, pad)[0] if letterbox else _image.resize(img, height, width)
    same(out, _image.normalize(_image.bgr_to_rgb(x) if swap else x, mean, std, scale))
    close(out, _image.to_model_reference(img, height, width, mean, std, scale, letterbox, pad, swap))


@pytest.mark.parametrize("src_hw, dst_hw", CAMERA_SHAPES)
def test_to_model_against_opencv(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> None:
    """cv2.dnn.blobFromImage (resize, swapRB, (x - mean) * scale, NCHW) within 1/255 of a
    pixel: the resize within 1."""
    cv2 = pytest.importorskip("cv2")
    img = np.random.default_rng(5).integers(0, 256, (2, *src_hw, 3), np.uint8)
    (h, w) = dst_hw
    out = _image.to_model(img, h, w, mean=[0.5], std=[1.0], swap_rb=True)
    want = cv2.dnn.blobFromImages(list(img), 1 / 255, (w, h), mean=(127.5, 127.5, 127.5), swapRB=True)
    assert out.shape == want.shape == (2, 3, h, w)
    assert np.abs(out - want).max() <= 1 / 255 + 1e-6


def test_to_model_as_a_manifest_op() -> None:
    """``image.to_model`` in a chain: its contract and the tensor it feeds."""
    import msgspec

    from protocols.modelstore import Manifest, OpSpec, TensorSpec, Variant

    params = {"height": 64, "width": 64, "letterbox": True, "swap_rb": True, "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225]}
    m = Manifest(name="m", version="1.0.0", created=1.0,
                 inputs=[TensorSpec(name="images", dtype="float32", shape=["N", 3, 64, 64])],
                 outputs=[TensorSpec(name="y", dtype="float32", shape=["N", 2])],
                 variants={"full": Variant(file="full.onnx", sha256="", size=0)},
                 pre=[msgspec.convert({"op": "image.to_model", "params": params}, OpSpec)])
    contract = ops.check_chains(m)
    assert [(s.name, s.dtype, s.shape) for s in contract.inputs] == [("images", "uint8", ["N", None, None, 3])]
    img = np.random.default_rng(6).integers(0, 256, (2, 48, 80, 3), np.uint8)
    feed = ops.build_chains(m).pre({"images": img})["images"]
    same(feed, _image.normalize(_image.bgr_to_rgb(_image.letterbox(img, 64, 64)[0]), params["mean"], params["std"]))
    gray = Manifest(**{**msgspec.structs.asdict(m), "pre": [msgspec.convert(
        {"op": "image.to_model", "params": {"height": 64, "width": 64, "swap_rb": True}}, OpSpec)],
        "inputs": [TensorSpec(name="images", dtype="float32", shape=["N", 1, 64, 64])]})
    with pytest.raises(ops.ChainError, match="no red and blue to swap"):
        ops.check_chains(gray)
    with pytest.raises(ops.OpInputError, match="image.to_model.*mean has 2 values for images of 3 channels"):
        _image.to_model(img, 8, 8, mean=[0.1, 0.2])


@fuzz
@given(img=images(channels=(3,)), height=st.integers(1, 20), width=st.integers(1, 20), data=st.data())
def test_image_ops_write_into_out(img: np.ndarray, height: int, width: int, data: st.DataObject) -> None:
    """``out=``: the op writes its result there (whatever was in it before) and returns it."""
    from drivers.ops import _adapters, _text

    pad = data.draw(st.integers(0, 255))
    calls = [lambda **kw: _image.resize(img, height, width, **kw),
             lambda **kw: _image.letterbox(img, height, width, pad, **kw)[0],
             lambda **kw: _image.letterbox_image(img, height, width, pad, **kw),
             lambda **kw: _image.normalize(img, [0.4], [0.3], **kw),
             lambda **kw: _adapters.to_tensor(img, **kw),
             lambda **kw: _image.to_model(img, height, width, [0.5], [0.2], letterbox=True, pad=pad, swap_rb=True,
                                          threads=data.draw(st.sampled_from([1, 2])), **kw),
             lambda **kw: _text.resize_pad(img, height, width, pad, **kw)[0],
             lambda **kw: _adapters.resize_pad_images(list(img) if img.ndim == 4 else [img], height, width, pad, **kw)]
    for call in calls:
        want = call()
        out = np.full_like(want, 77)
        assert call(out=out) is out
        same(out, want)


def test_out_must_fit_the_result() -> None:
    img = np.zeros((2, 10, 12, 3), np.uint8)
    good = np.empty((2, 6, 8, 3), np.uint8)
    for bad, words in [(np.empty((1, 6, 8, 3), np.uint8), r"uint8 array \[2, 6, 8, 3\].*not uint8 \[1, 6, 8, 3\]"),
                       (good.astype(np.float32), "not float32"), (np.empty((2, 6, 16, 3), np.uint8)[:, :, ::2], "C-contig"),
                       ([[0]], "not list")]:
        with pytest.raises(ops.OpInputError, match=words):
            _image.resize(img, 6, 8, out=bad)
    frozen = good.copy()
    frozen.flags.writeable = False
    with pytest.raises(ops.OpInputError, match="writeable"):
        _image.resize(img, 6, 8, out=frozen)
    with pytest.raises(ops.OpInputError, match="out must not overlap the input") as info:
        _image.resize(img, 10, 12, out=img)
    assert info.value.op == "image.resize"
    with pytest.raises(ops.OpInputError, match=r"out must be .*float32 array \[3, 6, 8\]") as info:
        _image.to_model(img[0], 6, 8, out=np.empty((1, 3, 6, 8), np.float32))  # one image: no batch axis
    assert info.value.op == "image.to_model"


@fuzz
@given(img=images(channels=(3, 4)))
def test_colour(img: np.ndarray) -> None:
    for name in ("bgr_to_rgb", "rgb_to_gray", "bgr_to_gray"):
        same(getattr(_image, name)(img), getattr(_image, name + "_reference")(img))
    same(_image.bgr_to_rgb(_image.bgr_to_rgb(img)), img)
    same(_image.bgr_to_gray(img), _image.rgb_to_gray(_image.bgr_to_rgb(img)))


def test_gray_weights() -> None:
    px = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]], np.uint8)
    # cv2.cvtColor(px, cv2.COLOR_RGB2GRAY) gives these.
    same(_image.rgb_to_gray(px)[0, :, 0], np.array([76, 150, 29, 255, 0], np.uint8))
    with pytest.raises(ops.OpInputError, match="3 or 4 channels"):
        _image.rgb_to_gray(np.zeros((2, 2, 1), np.uint8))


# -- signal -----------------------------------------------------------------------------------------


@fuzz
@given(data=st.data(), length=st.integers(1, 64), hop=st.none() | st.integers(1, 64),
       window=st.sampled_from(sorted(_signal.WINDOWS)))
def test_frame(data: st.DataObject, length: int, hop: int | None, window: str) -> None:
    shape = data.draw(st.sampled_from([(), (2,), (3,)])) + (data.draw(st.integers(0, 300)),)
    x = data.draw(signals(shape))
    out = _signal.frame(x, length, hop, window)
    same(out, _signal.frame_reference(x, length, hop, window))
    n = (shape[-1] - length) // (hop or length) + 1 if shape[-1] >= length else 0
    assert out.shape == (int(np.prod(shape[:-1], dtype=int)) * n, length)


def test_frame_edge_cases() -> None:
    x = np.arange(10, dtype=np.float32)
    same(_signal.frame(x, 4), np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.float32))
    same(_signal.frame(x, 4, 3), np.array([[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]], np.float32))
    same(_signal.frame(x, 11), np.zeros((0, 11), np.float32))
    same(_signal.frame(np.zeros(0), 3), np.zeros((0, 3)))
    same(_signal.frame(np.arange(4, dtype=np.int16), 2), np.array([[0, 1], [2, 3]], np.float32))
    same(_signal.frame(np.ones(5), 5, window="hann"), np.hanning(5)[None])
    with pytest.raises(ops.OpInputError, match="signal.frame"):
        _signal.frame(np.float32(1), 1)


@fuzz
@given(x=frame_batches())
def test_statistics(x: np.ndarray) -> None:
    for name in ("rms", "kurtosis", "crest_factor"):
        close(getattr(_signal, name)(x), getattr(_signal, name + "_reference")(x))


def test_statistics_edge_cases() -> None:
    x = np.array([[3.0, -3.0, 3.0, -3.0], [0.0, 0.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0], [0.0] * 4])
    close(_signal.rms(x), np.array([3, 2, 2, 0], np.float32))
    close(_signal.crest_factor(x), np.array([1, 2, 1, np.nan], np.float32))  # silent: 0 / 0
    # [0, 0, 0, 4]: mean 1, central moments m2 = 12 / 4, m4 = 84 / 4, kurtosis 21 / 9.
    close(_signal.kurtosis(x), np.array([1, 21 / 9, np.nan, np.nan], np.float32))
    gaussian = np.random.default_rng(3).normal(size=(1, 200_000))
    assert abs(_signal.kurtosis(gaussian)[0] - 3) < 0.05  # Pearson, not excess
    same(_signal.rms(np.zeros((0, 8))), np.zeros(0, np.float32))
    assert _signal.rms(np.ones(5)).shape == ()
    with pytest.raises(ops.OpInputError, match="length 0"):
        _signal.rms(np.zeros((2, 0)))


@fuzz
@given(x=frame_batches(), rate=st.sampled_from([1.0, 100.0, 12800, 44100.0]), data=st.data(),
       window=st.sampled_from(sorted(_signal.WINDOWS)))
def test_band_energies(x: np.ndarray, rate: float, data: st.DataObject, window: str) -> None:
    bands = data.draw(band_lists(rate))
    close(_signal.band_energies(x, rate, bands, window), _signal.band_energies_reference(x, rate, bands, window))


@pytest.mark.parametrize("n", [1, 2, 3, 8, 100, 255, 256, 2048])
def test_spectrum_paths(n: int) -> None:
    """FFT (powers of two) and DFT (other lengths) paths, on bands tiling the spectrum (the
    fractions sum to 1) and on single bins."""
    x = np.random.default_rng(n).normal(size=(3, n))
    rate = float(n)  # bin k is k Hz
    tiling = [[0, n / 4], [n / 4, n / 3], [n / 3, n / 2 + 1]]
    out = _signal.band_energies(x, rate, tiling, "rect")
    close(out, _signal.band_energies_reference(x, rate, tiling, "rect"))
    np.testing.assert_allclose(out.sum(axis=1), 1, rtol=1e-5)
    single = [[k, k + 0.5] for k in range(n // 2 + 1)][:40]
    close(_signal.band_energies(x, rate, single), _signal.band_energies_reference(x, rate, single))


def test_band_edges_follow_rfftfreq() -> None:
    """A bin whose frequency is a band's edge falls on the side np.fft.rfftfreq puts it, which
    need not be its exact frequency k * rate / n: the same side as in the reference."""
    n, rate = 1000, 44100.0
    freqs = np.fft.rfftfreq(n, 1 / rate)
    k = next(k for k in range(1, n // 2) if freqs[k] != k * rate / n)
    edge = k * rate / n
    tone = np.cos(2 * np.pi * k * np.arange(n) / n)[None]  # all its power in bin k
    bands = [[0, edge], [edge, rate / 2]]
    out = _signal.band_energies(tone, rate, bands, "rect")
    close(out, _signal.band_energies_reference(tone, rate, bands, "rect"))
    assert out[0, int(freqs[k] >= edge)] > 0.999


@fuzz
@given(x=frame_batches(), rate=st.sampled_from([100.0, 12800]), data=st.data())
def test_vibration_features(x: np.ndarray, rate: float, data: st.DataObject) -> None:
    bands = data.draw(band_lists(rate))
    close(_signal.vibration_features(x, rate, bands), _signal.vibration_features_reference(x, rate, bands))


@pytest.mark.parametrize("fault", [False, True])
def test_vibration_features_are_the_demo_models_features(fault: bool) -> None:
    frames = simulate(16, fault, np.random.default_rng(11))
    out = _signal.vibration_features(frames, RATE, [list(b) for b in BANDS])
    close(out, features(frames))
    close(_signal.vibration_features(frames.astype(np.float64), RATE, BANDS), features(frames))


# -- post -------------------------------------------------------------------------------------------


@fuzz
@given(x=rows.flatmap(score_arrays))
def test_softmax(x: np.ndarray) -> None:
    out = _post.softmax(x)
    close(out, _post.softmax_reference(x))
    ok = np.isfinite(x).all(axis=-1)
    np.testing.assert_allclose(out[ok].sum(axis=-1), 1, rtol=1e-5)


def test_softmax_nan_and_infinities() -> None:
    """A row with a NaN, with +inf, or all -inf is all NaN (numpy's exp(x - max) does the
    same); -inf among finite scores gets 0."""
    x = np.array([[1, np.nan, 2], [1, np.inf, 2], [-np.inf] * 3, [0, -np.inf, 0], [1000, 0, -1000]], np.float32)
    out = _post.softmax(x)
    assert np.isnan(out[:3]).all()
    close(out[3:], np.array([[0.5, 0, 0.5], [1, 0, 0]], np.float32))
    close(out, _post.softmax_reference(x))
    assert _post.softmax(np.zeros((2, 3, 4), np.float16)).dtype == np.float32
    with pytest.raises(ops.OpInputError, match="empty last axis"):
        _post.softmax(np.zeros((2, 0)))


@fuzz
@given(x=rows.flatmap(score_arrays), data=st.data())
def test_topk(x: np.ndarray, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, x.shape[-1]))
    index, value = _post.topk(x, k)
    ref_index, ref_value = _post.topk_reference(x, k)
    same(index, ref_index)
    same(value, ref_value)


def test_topk_edge_cases() -> None:
    index, value = _post.topk(np.array([1, 3, np.nan, 3, 2], np.float32), 4)
    same(index, np.array([1, 3, 4, 0]))
    same(value, np.array([3, 3, 2, 1], np.float32))
    same(_post.topk(np.array([np.nan, 1, np.nan]), 3)[0], np.array([1, 0, 2]))  # NaN last, in index order
    with pytest.raises(ops.OpInputError, match="k=4 is not between 1 and the 3"):
        _post.topk(np.zeros(3), 4)


@fuzz
@given(x=rows.flatmap(score_arrays) | rows.flatmap(lambda s: hnp.arrays(np.int8, s)))
def test_argmax(x: np.ndarray) -> None:
    same(_post.argmax(x), _post.argmax_reference(x))


def test_argmax_edge_cases() -> None:
    same(_post.argmax(np.array([[1, 5, 5], [np.nan, 9, np.nan], [2, 1, np.nan]])), np.array([1, 0, 2]))
    same(_post.argmax(np.array([7], np.uint8)), np.array(0))


def test_float32_rows_of_real_models() -> None:
    """float32 scores take their own kernels (order keys, blocks of 512, a polynomial exp):
    long rows as a classifier ([1, 1000]), a recogniser ([32, 6625]) and a detector
    ([84, 8400]) give them, with the maximum, ties, NaN and -0.0 in any block."""
    rng = np.random.default_rng(7)
    for shape in [(1, 1000), (32, 6625), (84, 8400), (3, 513)]:
        x = rng.normal(0, 8, shape).astype(np.float32)
        same(_post.argmax(x), np.argmax(x, axis=-1))
        close(_post.softmax(x), _post.softmax_reference(x))
        exact = np.exp((x - x.max(axis=-1, keepdims=True)).astype(np.float64))  # x - max rounded as numpy does
        np.testing.assert_allclose(_post.softmax(x), exact / exact.sum(axis=-1, keepdims=True), rtol=1e-6, atol=1e-30)
    x = np.zeros((6, 1500), np.float32)
    x[0, [700, 1200]] = 5  # equal maxima in two blocks: the first
    x[1, 1400], x[1, 3] = 9, 8
    x[2, :], x[2, 1000] = -np.inf, 1
    x[3, 0], x[3, 999] = -0.0, 0.0  # -0.0 == 0.0: the first
    x[3, 1:999], x[3, 1000:] = -1, -1
    x[4, 900], x[4, 600] = np.nan, 7
    x[5, :] = -1e30
    same(_post.argmax(x), np.argmax(x, axis=-1))
    same(_post.argmax(x), np.array([700, 1400, 1000, 0, 900, 0]))
    logp = -np.abs(rng.normal(0, 5, (8, 6625))).astype(np.float32)  # log-probabilities: all negative
    logp[3, 4000] = logp[3, 100] = -1e-6
    same(_post.argmax(logp), np.argmax(logp, axis=-1))
    close(_post.softmax(logp), _post.softmax_reference(logp))
    out = _post.softmax(x)
    close(out, _post.softmax_reference(x))
    assert np.isnan(out[4]).all() and out[2, 1000] == 1 and (np.delete(out[2], 1000) == 0).all()
    tiny = np.array([[0, -80, -87, -88, -100, -np.inf]], np.float32)  # down to underflow
    np.testing.assert_allclose(_post.softmax(tiny), np.exp(tiny.astype(np.float64)) / np.exp(tiny.astype(np.float64)).sum(),
                               rtol=1e-6, atol=1e-38)


@fuzz
@given(data=st.data(), start=st.booleans(),
       thresholds=st.lists(st.sampled_from([0.0, 0.3, 0.4, 0.5, 0.7, 1.0]), min_size=2, max_size=2, unique=True))
def test_threshold_hysteresis(data: st.DataObject, start: bool, thresholds: list[float]) -> None:
    off, on = sorted(thresholds)
    shape = data.draw(st.sampled_from([(data.draw(st.integers(0, 50)),), (data.draw(st.integers(0, 30)), 1),
                                       (data.draw(st.integers(0, 20)), 3)]))
    values = st.one_of(st.sampled_from([0.0, 0.3, 0.4, 0.5, 0.7, 1.0, np.nan]), st.floats(0, 1, width=32))
    scores = data.draw(hnp.arrays(data.draw(st.sampled_from([np.float32, np.float64])), shape, elements=values))
    same(_post.threshold_hysteresis(scores, on, off, start),
         _post.threshold_hysteresis_reference(scores, on, off, start))


def test_threshold_hysteresis_edge_cases() -> None:
    s = np.array([0.5, 0.7, 0.5, 0.41, 0.4, 0.5, np.nan, 0.9, np.nan], np.float32)
    same(_post.threshold_hysteresis(s, 0.7, 0.4), np.array([0, 1, 1, 1, 0, 0, 0, 1, 1], bool))
    same(_post.threshold_hysteresis(s[:1], 0.7, 0.4, start=True), np.array([True]))
    same(_post.threshold_hysteresis(np.zeros((0, 1), np.float32), 0.7, 0.4), np.zeros((0, 1), bool))
    with pytest.raises(ops.OpParamsError, match="must be below on"):
        _post.threshold_hysteresis(s, 0.4, 0.4)


@st.composite
def boxes_and_scores(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Boxes on a coarse grid (ties, touching edges, exact IoU values and degenerate boxes
    come up) or anywhere, and scores with ties."""
    n = draw(st.integers(0, 40))
    if draw(st.booleans()):
        corners = draw(hnp.arrays(np.int8, (n, 4), elements=st.integers(0, 6))).astype(np.float32)
    else:
        corners = draw(hnp.arrays(np.float32, (n, 4), elements=st.floats(0, 100, width=32)))
    if draw(st.booleans()):  # mostly well-formed: x2 >= x1, y2 >= y1
        corners = np.concatenate([np.minimum(corners[:, :2], corners[:, 2:]),
                                  np.maximum(corners[:, :2], corners[:, 2:])], axis=1)
    scores = draw(hnp.arrays(np.float32, (n,), elements=st.sampled_from([0.1, 0.5, 0.9]) | st.floats(0, 1, width=32)))
    return corners, scores


@fuzz
@given(bs=boxes_and_scores(), iou=st.sampled_from([0.0, 0.25, 0.5, 1.0]) | st.floats(0, 1),
       score_threshold=st.none() | st.sampled_from([0.1, 0.5, 0.9]))
def test_nms(bs: tuple[np.ndarray, np.ndarray], iou: float, score_threshold: float | None) -> None:
    boxes, scores = bs
    keep = _post.nms(boxes, scores, iou, score_threshold)
    same(keep, _post.nms_reference(boxes, scores, iou, score_threshold))
    assert (np.diff(scores[keep]) <= 0).all()


def test_nms_against_torchvision() -> None:
    torch, tv_ops = pytest.importorskip("torch"), pytest.importorskip("torchvision.ops")
    rng = np.random.default_rng(5)
    xy = rng.uniform(0, 500, (1000, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (1000, 2)).astype(np.float32)], axis=1)
    scores = rng.random(1000).astype(np.float32)
    same(_post.nms(boxes, scores, 0.5), tv_ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy())


def test_nms_edge_cases() -> None:
    box = [0, 0, 10, 10]
    # Identical boxes: the first of the highest scores stays.
    same(_post.nms(np.array([box, box, box], np.float32), np.array([0.5, 0.9, 0.9], np.float32), 0.5), np.array([1]))
    # IoU exactly at the threshold does not suppress (strictly greater, as torchvision).
    half = np.array([box, [0, 0, 10, 5]], np.float32)
    same(_post.nms(half, np.array([0.9, 0.8], np.float32), 0.5), np.array([0, 1]))
    same(_post.nms(half, np.array([0.9, 0.8], np.float32), 0.49), np.array([0]))
    # Degenerate boxes (points, lines, inverted) overlap nothing: all kept, none suppress.
    degenerate = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 0, 10], [10, 10, 0, 0], box], np.float32)
    same(_post.nms(degenerate, np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32), 0.0), np.arange(5))
    # The score threshold is compared in the scores' precision.
    same(_post.nms(np.array([box], np.float32), np.array([0.7], np.float32), 0.5, score_threshold=0.7), np.array([0]))
    same(_post.nms(np.array([box], np.float32), np.array([0.69], np.float32), 0.5, score_threshold=0.7),
         np.zeros(0, np.int64))
    same(_post.nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5), np.zeros(0, np.int64))
    with pytest.raises(ops.OpInputError, match="finite"):
        _post.nms(np.array([[0, 0, np.nan, 1]]), np.array([1.0]), 0.5)
    with pytest.raises(ops.OpInputError, match=r"boxes \[N, 4\] and scores \[N\]"):
        _post.nms(np.zeros((3, 4)), np.zeros(2), 0.5)


@fuzz
@given(data=st.data(), dtype=st.sampled_from([np.int8, np.uint8]),
       shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=8),
       scale=st.floats(1e-6, 1e3))
def test_dequantize_int8(data: st.DataObject, dtype: type, shape: tuple[int, ...], scale: float) -> None:
    q = data.draw(hnp.arrays(dtype, shape))
    info = np.iinfo(dtype)
    zero_point = data.draw(st.integers(int(info.min), int(info.max)))
    same(_post.dequantize_int8(q, scale, zero_point), _post.dequantize_int8_reference(q, scale, zero_point))


def test_dequantize_edge_cases() -> None:
    same(_post.dequantize_int8(np.array([-128, 0, 127], np.int8), 0.5, -1), np.array([-63.5, 0.5, 64], np.float32))
    with pytest.raises(ops.OpInputError, match="zero_point 200 is outside int8"):
        _post.dequantize_int8(np.zeros(2, np.int8), 0.5, 200)
    with pytest.raises(ops.OpInputError, match="int8 or uint8"):
        _post.dequantize_int8(np.zeros(2, np.int16), 0.5)


# -- registry and pipelines -------------------------------------------------------------------------


def test_registry_names() -> None:
    assert {"image.resize", "image.letterbox", "image.normalize", "image.bgr_to_rgb", "signal.frame", "signal.rms",
            "signal.kurtosis", "signal.crest_factor", "signal.band_energies", "signal.vibration_features",
            "post.softmax", "post.topk", "post.argmax", "post.threshold_hysteresis", "post.nms",
            "post.dequantize_int8"} <= set(ops.OPS)
    assert all(name == op.name for name, op in ops.OPS.items())


def test_registry_ops_take_manifest_params() -> None:
    img = np.random.default_rng(2).integers(0, 256, (2, 30, 40, 3), np.uint8)
    same(ops.OPS["image.resize"](img, height=16, width=20), _image.resize_reference(img, 16, 20))
    same(ops.OPS["image.letterbox"](img, height=32, width=32, pad=0), _image.letterbox_reference(img, 32, 32, 0)[0])
    x = ops.run_pipeline([("image.bgr_to_rgb", {}), ("image.letterbox", {"height": 32, "width": 32}),
                          ("image.normalize", {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})], img)
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32
    dets = np.array([[0, 0, 10, 10, 0.9, 3], [1, 1, 10, 10, 0.8, 3], [20, 20, 30, 30, 0.7, 1]], np.float32)
    same(ops.OPS["post.nms"](dets, iou_threshold=0.5), dets[[0, 2]])
    index, value = ops.run_pipeline([("post.softmax", {}), ("post.topk", {"k": 2})], np.array([[1.0, 3.0, 2.0]]))
    same(index, np.array([[1, 2]]))
    same(ops.OPS["post.dequantize_int8"](np.array([3], np.int8), scale=0.5), np.array([1.5], np.float32))
    assert ops.OPS["signal.frame"](np.zeros((3, 4096), np.float32), length=2048, hop=1024).shape == (9, 2048)


def test_bad_manifests_are_refused_with_what_to_fix() -> None:
    with pytest.raises(ops.UnknownOp, match="unknown op 'signal.fft'; the ops are: audio.log_mel, image.bgr_to_gray"):
        ops.pipeline([("signal.fft", {})])
    cases = [
        ("signal.frame", {}, "'length': is required"),
        ("signal.frame", {"length": 2048, "step": 512}, "'step': is not a parameter of this op; it takes length, hop"),
        ("signal.frame", {"length": True}, "must be an integer >= 1, not True"),
        ("signal.frame", {"length": 0}, "must be an integer >= 1, not 0"),
        ("signal.frame", {"length": 8, "window": "hanning"}, "must be one of 'rect', 'hann', 'hamming'"),
        ("signal.vibration_features", {"rate": 12800, "bands": [[500, 0]]}, "0 <= lo < hi"),
        ("signal.vibration_features", {"rate": -1, "bands": [[0, 1]]}, "must be a finite number > 0"),
        ("post.threshold_hysteresis", {"on": 0.4, "off": 0.7}, "'off': must be below on"),
        ("post.nms", {"iou_threshold": 1.5}, "<= 1"),
        ("image.normalize", {"std": [1, 0]}, "greater than 0"),
        ("post.softmax", [("k", 1)], "must be a mapping"),
    ]
    for name, params, message in cases:
        with pytest.raises(ops.OpParamsError, match=message) as info:
            ops.pipeline([(name, params)])
        assert str(info.value).startswith(f"op {name!r}") and str(info.value).endswith("fix the model's manifest")
    with pytest.raises(ops.PipelineError, match="'post.topk' gives several arrays.*'post.argmax' follows it"):
        ops.pipeline([("post.topk", {"k": 1}), ("post.argmax", {})])
    with pytest.raises(ops.OpInputError, match="'image.resize' cannot take its input: images must be uint8"):
        ops.run_pipeline([("image.resize", {"height": 2, "width": 2})], np.zeros((4, 4, 3)))
    for error in (ops.UnknownOp, ops.OpParamsError, ops.PipelineError, ops.OpInputError):
        assert issubclass(error, ops.OpsError)


def test_demo_model_runs_through_its_manifest_ops() -> None:
    """The demo bundle's pre ops, its ONNX model and its post op, as the accelerator driver
    chains them: a signal in, the model's features, an anomaly state per frame out."""
    import onnxruntime

    from services.modelstore import Bundle

    bundle = Bundle.load("services/modelstore/demo/vibration-anomaly-1.0.0.ebm")
    pre = ops.pipeline([(s.op, s.params) for s in bundle.manifest.pre])
    post = ops.pipeline([(s.op, s.params) for s in bundle.manifest.post])
    rng = np.random.default_rng(4)
    frames = np.concatenate([simulate(6, False, rng), simulate(6, True, rng)])
    signal = frames.reshape(-1)  # one long recording, 12 frames
    x = pre(signal)
    close(x, features(frames))
    close(pre(frames), features(frames))  # a batch of one-frame signals: [N, 2048] -> [N, 7]
    session = onnxruntime.InferenceSession(bundle.files["full.onnx"], providers=["CPUExecutionProvider"])
    anomaly = session.run(None, {"features": x})[0]
    state = post(anomaly)
    assert state.shape == (12, 1) and state.dtype == bool
    same(state, _post.threshold_hysteresis_reference(anomaly, 0.7, 0.4))
    assert not state[:6].any() and state[6:].all()
