"""The text ops (drivers/ops/_text.py) against their numpy references, their edge cases and
errors, and the whole OCR chain on the real PaddleOCR models as rapidocr ships them.

Boxes, pixels, labels and widths must be equal to the references'; a CTC confidence (a mean
summed in another order) within ``rtol=1e-5``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from drivers.ops import OpInputError, OpParamsError
from drivers.ops import _image, _text

fuzz = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    np.testing.assert_array_equal(a, b)


def same_all(got: tuple[np.ndarray, ...], want: tuple[np.ndarray, ...]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        same(a, b)


# -- strategies -------------------------------------------------------------------------------------

#: map values around the usual thresholds (0.3 binarises, 0.6 keeps a box), ties included
LEVELS = np.array([0.0, 0.05, 0.2, 0.3, 0.31, 0.5, 0.6, 0.61, 0.8, 0.95, 1.0], np.float32)


@st.composite
def level_maps(draw: st.DrawFn) -> np.ndarray:
    """Small maps of arbitrary levels: many regions, touching at corners, with ties."""
    shape = (draw(st.integers(1, 14)), draw(st.integers(1, 14)))
    picks = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, len(LEVELS) - 1)))
    return LEVELS[picks]


@st.composite
def text_maps(draw: st.DrawFn) -> np.ndarray:
    """A detector-like map: low background, a few filled rotated rectangles (text lines)."""
    h, w = draw(st.integers(4, 48)), draw(st.integers(4, 64))
    noise = draw(hnp.arrays(np.uint8, (h, w), elements=st.integers(0, 25)))
    prob = noise.astype(np.float32) / 100
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(draw(st.integers(1, 4))):
        cx, cy = draw(st.floats(-2, w + 2)), draw(st.floats(-2, h + 2))
        half_u, half_v = draw(st.floats(1, 30)), draw(st.floats(1, 8))
        angle = draw(st.floats(-math.pi, math.pi))
        level = draw(st.sampled_from([0.35, 0.6, 0.7, 0.9, 0.9, 1.0]))
        u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
        v = (yy - cy) * math.cos(angle) - (xx - cx) * math.sin(angle)
        prob[(np.abs(u) <= half_u) & (np.abs(v) <= half_v)] = level
    return prob


db_params = st.fixed_dictionaries({
    "thresh": st.sampled_from([0.3, 0.5, 0.0]),
    "box_thresh": st.sampled_from([0.0, 0.3, 0.6, 0.9]),
    "unclip_ratio": st.sampled_from([0.0, 1.5, 2.0]),
    "max_candidates": st.sampled_from([1, 2, 1000]),
    "min_size": st.sampled_from([0.0, 1.0, 3.0]),
})


@st.composite
def quads(draw: st.DrawFn, h: int, w: int) -> np.ndarray:
    """Boxes on (and a little off) an h x w image: rectangles at any angle, arbitrary
    quadrilaterals (convex or not), and degenerate ones (a point, a line)."""
    kind = draw(st.sampled_from(["rect", "any", "point", "line"]))
    coord = st.floats(-3, max(w, h) + 3, allow_nan=False, width=32)
    if kind == "rect":
        cx, cy = draw(st.floats(0, w)), draw(st.floats(0, h))
        half_u, half_v = draw(st.floats(0.5, max(w, h) / 2)), draw(st.floats(0.5, max(w, h) / 2))
        a = draw(st.floats(-math.pi, math.pi))
        e, n = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
        c = np.array([cx, cy])
        return np.array([c - half_u * e - half_v * n, c + half_u * e - half_v * n,
                         c + half_u * e + half_v * n, c - half_u * e + half_v * n])
    if kind == "point":
        p = [draw(coord), draw(coord)]
        return np.array([p, p, p, p])
    if kind == "line":
        a, b = np.array([draw(coord), draw(coord)]), np.array([draw(coord), draw(coord)])
        return np.array([a, b, b, a])
    return np.array([[draw(coord), draw(coord)] for _ in range(4)])


@st.composite
def crop_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    h, w, c = draw(st.integers(1, 20)), draw(st.integers(1, 24)), draw(st.sampled_from([1, 3]))
    image = draw(hnp.arrays(np.uint8, (h, w, c)))
    boxes = np.array([draw(quads(h, w)) for _ in range(draw(st.integers(0, 3)))]).reshape(-1, 4, 2)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return image, boxes.astype(dtype), draw(st.integers(1, 12)), draw(st.integers(1, 40)), draw(st.integers(0, 255))


@st.composite
def pad_cases(draw: st.DrawFn) -> tuple[object, int, int, int]:
    c = draw(st.sampled_from([1, 3, 4]))
    form = draw(st.sampled_from(["hwc", "nhwc", "list"]))
    if form == "list":
        images: object = [draw(hnp.arrays(np.uint8, (draw(st.integers(1, 30)), draw(st.integers(1, 60)), c)))
                          for _ in range(draw(st.integers(1, 3)))]
    else:
        shape = (draw(st.integers(1, 30)), draw(st.integers(1, 60)), c)
        images = draw(hnp.arrays(np.uint8, shape if form == "hwc" else (draw(st.integers(0, 3)), *shape)))
    return images, draw(st.integers(1, 16)), draw(st.integers(1, 48)), draw(st.integers(0, 255))


@st.composite
def softmax_outputs(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """Recogniser-like scores [N, T, C]: a few levels, so ties and repeats are common."""
    n, t, c = draw(st.integers(0, 4)), draw(st.integers(0, 30)), draw(st.integers(1, 12))
    levels = np.array([0.0, 0.1, 0.25, 0.5, 0.9], draw(st.sampled_from([np.float32, np.float64])))
    picks = draw(hnp.arrays(np.uint8, (n, t, c), elements=st.integers(0, len(levels) - 1)))
    return levels[picks], draw(st.integers(0, c - 1))


# -- db_boxes ---------------------------------------------------------------------------------------


def rect_map(h: int, w: int, x0: int, y0: int, x1: int, y1: int, level: float = 0.9) -> np.ndarray:
    prob = np.zeros((h, w), np.float32)
    prob[y0:y1 + 1, x0:x1 + 1] = level
    return prob


@fuzz
@given(st.one_of(level_maps(), text_maps()), db_params)
def test_db_boxes_matches_reference(prob: np.ndarray, params: dict) -> None:
    got = _text.db_boxes(prob, **params)
    same_all(got, _text.db_boxes_reference(prob, **params))
    boxes, scores = got
    h, w = prob.shape
    assert len(boxes) <= params["max_candidates"]
    assert (boxes[..., 0] >= 0).all() and (boxes[..., 0] <= w - 1).all()
    assert (boxes[..., 1] >= 0).all() and (boxes[..., 1] <= h - 1).all()
    assert (scores >= np.float32(params["box_thresh"]) - 1e-6).all() and (scores <= 1).all()


def test_db_boxes_with_many_regions_runs_and_seeds() -> None:
    """Past the kernel's first allocations (64 regions, 1,024 runs and pending seeds), which
    the small maps above never reach."""
    rng = np.random.default_rng(3)
    speckle = np.where(rng.random((120, 120)) < 0.2, LEVELS[rng.integers(0, len(LEVELS), (120, 120))], 0)
    speckle = speckle.astype(np.float32)  # ~1,000 regions and ~2,000 runs
    comb = np.zeros((12, 2400), np.float32)
    comb[2, :] = 0.9  # a bar with 1,200 teeth: ~1,200 seeds pending at once
    comb[3:10, ::2] = 0.9
    for prob in (speckle, comb):
        for params in ({"min_size": 0.0, "box_thresh": 0.0}, {"max_candidates": 50}, {}):
            same_all(_text.db_boxes(prob, **params), _text.db_boxes_reference(prob, **params))
    assert len(_text.db_boxes(speckle, min_size=0.0, box_thresh=0.0, max_candidates=5000)[0]) > 64
    (box,), _ = _text.db_boxes(comb, unclip_ratio=0.0, box_thresh=0.5)  # half the pixels are teeth
    np.testing.assert_allclose(box, [[0, 2], [2399, 2], [2399, 9], [0, 9]])


def test_db_boxes_of_an_upright_rectangle() -> None:
    # Pixel centres x 20..59, y 10..19: a 39 x 9 rectangle, unclipped by 39*9*1.5/96 on each side.
    boxes, scores = _text.db_boxes(rect_map(40, 100, 20, 10, 59, 19))
    d = 39 * 9 * 1.5 / (2 * (39 + 9))
    want = np.array([[[20 - d, 10 - d], [59 + d, 10 - d], [59 + d, 19 + d], [20 - d, 19 + d]]], np.float32)
    np.testing.assert_allclose(boxes, want, atol=1e-4)
    np.testing.assert_allclose(scores, [0.9], rtol=1e-6)
    assert boxes.dtype == np.float32 and scores.dtype == np.float32


@pytest.mark.parametrize("shape", [(30, 80), (1, 30, 80), (1, 1, 30, 80)])
def test_db_boxes_takes_a_map_with_or_without_batch_axes(shape: tuple[int, ...]) -> None:
    prob = rect_map(30, 80, 10, 5, 70, 20).reshape(shape)
    same_all(_text.db_boxes(prob), _text.db_boxes(prob.reshape(30, 80)))
    assert len(_text.db_boxes(prob)[0]) == 1


def test_db_boxes_of_a_rotated_line() -> None:
    h, w = 120, 200
    yy, xx = np.mgrid[0:h, 0:w]
    a = math.radians(20)
    u = (xx - 100) * math.cos(a) + (yy - 60) * math.sin(a)
    v = (yy - 60) * math.cos(a) - (xx - 100) * math.sin(a)
    prob = np.where((np.abs(u) < 60) & (np.abs(v) < 10), 0.9, 0.0).astype(np.float32)
    (box,), _ = _text.db_boxes(prob)
    top, side = box[1] - box[0], box[3] - box[0]
    assert math.degrees(math.atan2(top[1], top[0])) == pytest.approx(20, abs=1.5)
    # ~119 x 19 between pixel centres, unclipped by ~13 on each side
    assert np.linalg.norm(top) == pytest.approx(119 + 2 * 13.2, abs=2)
    assert np.linalg.norm(side) == pytest.approx(19 + 2 * 13.2, abs=2)
    assert top[0] * side[1] - top[1] * side[0] > 0  # clockwise on the screen (y down)


def test_db_boxes_of_an_empty_map_is_no_box() -> None:
    for prob in (np.zeros((64, 64), np.float32), np.full((10, 10), 0.3, np.float32), np.zeros((0, 5), np.float32)):
        boxes, scores = _text.db_boxes(prob)
        assert boxes.shape == (0, 4, 2) and scores.shape == (0,)
        assert boxes.dtype == np.float32 and scores.dtype == np.float32
        same_all((boxes, scores), _text.db_boxes_reference(prob))


def test_db_boxes_at_the_border_are_clipped_to_the_map() -> None:
    prob = rect_map(40, 60, 0, 0, 59, 9)  # the whole top band, touching three edges
    (box,), _ = _text.db_boxes(prob)
    np.testing.assert_array_equal(box[0], [0, 0])
    np.testing.assert_array_equal(box[2, 0], 59)
    assert 9 < box[2, 1] < 20


def test_db_boxes_degenerate_regions() -> None:
    prob = np.zeros((20, 30), np.float32)
    prob[5, 5] = 0.9  # one pixel: a rectangle of no size
    prob[10, 10:20] = 0.9  # one row: no height
    assert len(_text.db_boxes(prob)[0]) == 0  # under min_size (3)
    boxes, scores = _text.db_boxes(prob, min_size=0, unclip_ratio=0.0)
    same_all((boxes, scores), _text.db_boxes_reference(prob, min_size=0, unclip_ratio=0.0))
    assert len(boxes) == 0  # unclipped by nothing, both still under min_size + 2
    boxes, _ = _text.db_boxes(prob, min_size=0, unclip_ratio=0.0, box_thresh=0.0)
    assert len(boxes) == 0


def test_db_boxes_keeps_the_largest_candidates() -> None:
    prob = np.zeros((40, 100), np.float32)
    prob[5:15, 5:20] = 0.9  # small
    prob[5:15, 30:90] = 0.9  # large
    prob[25:35, 5:50] = 0.9  # middle
    boxes, _ = _text.db_boxes(prob, max_candidates=2)
    assert len(boxes) == 2
    assert boxes[0, 0, 0] > 20 and boxes[1, 0, 1] > 15  # the large one, then the middle one below it


def test_db_boxes_come_in_reading_order() -> None:
    prob = np.zeros((60, 120), np.float32)
    prob[8:16, 70:110] = 0.9  # right, 2 rows higher: same line
    prob[10:18, 5:50] = 0.9  # left
    prob[35:45, 5:30] = 0.9  # next line
    boxes, _ = _text.db_boxes(prob)
    assert boxes[0, 0, 1] > boxes[1, 0, 1]  # the left box's top is lower, but it is read first
    assert boxes[0, 0, 0] < 5 and boxes[1, 0, 0] > 60 and boxes[2, 0, 1] > 25


def test_db_boxes_threshold_in_float32() -> None:
    prob = rect_map(20, 40, 5, 5, 30, 12, level=0.3)  # float32(0.3) is not above 0.3 in float32
    assert len(_text.db_boxes(prob, thresh=0.3, box_thresh=0.0)[0]) == 0


@pytest.mark.parametrize("prob, words", [
    (np.zeros((10, 10), np.int32), "float32, not int32"),
    (np.zeros((2, 10, 10), np.float32), "one map at a time"),
    (np.zeros((1, 3, 10, 10), np.float32), "one map at a time"),
    (np.zeros(10, np.float32), "1-D"),
    (np.full((4, 4), np.nan, np.float32), "NaN"),
])
def test_db_boxes_refuses_what_is_not_a_map(prob: np.ndarray, words: str) -> None:
    with pytest.raises(OpInputError, match=words) as info:
        _text.db_boxes(prob)
    assert info.value.op == "text.db_boxes"


@pytest.mark.parametrize("param, value", [("max_candidates", 0), ("unclip_ratio", -1.0), ("min_size", -1.0),
                                          ("thresh", float("nan")), ("max_candidates", 2.5)])
def test_db_boxes_refuses_bad_parameters(param: str, value: float) -> None:
    with pytest.raises(OpParamsError, match=param):
        _text.db_boxes(np.zeros((4, 4), np.float32), **{param: value})


def test_scale_boxes() -> None:
    boxes = np.array([[[10, 20], [50, 20], [50, 30], [10, 30]], [[0, 0], [99, 0], [99, 49], [0, 49]]], np.float32)
    got = _text.scale_boxes(boxes, (50, 100), (100, 400))
    np.testing.assert_allclose(got[0], [[40, 40], [200, 40], [200, 60], [40, 60]])
    assert got.dtype == np.float32 and got[..., 0].max() <= 399 and got[..., 1].max() <= 99
    assert _text.scale_boxes(np.zeros((0, 4, 2)), (5, 5), (10, 10)).shape == (0, 4, 2)
    with pytest.raises(OpInputError, match="text.scale_boxes"):
        _text.scale_boxes(np.zeros((3, 4)), (5, 5), (10, 10))
    with pytest.raises(OpParamsError, match="from_hw"):
        _text.scale_boxes(boxes, (0, 5), (10, 10))


# -- crop_rotated -----------------------------------------------------------------------------------


@fuzz
@given(crop_cases())
def test_crop_rotated_matches_reference(case: tuple) -> None:
    image, boxes, height, width, pad = case
    crops, widths = _text.crop_rotated(image, boxes, height, width, pad)
    same_all((crops, widths), _text.crop_rotated_reference(image, boxes, height, width, pad))
    assert crops.shape == (len(boxes), height, width, image.shape[2]) and widths.dtype == np.int32
    assert ((widths >= 1) & (widths <= width)).all()
    for crop, used in zip(crops, widths):
        assert (crop[:, used:] == pad).all()


def solved_homography(p: np.ndarray, cw: int, ch: int) -> np.ndarray:
    """The map from the crop's corners to the box's by the 8x8 linear system (as
    cv2.getPerspectiveTransform sets it up), to hold the closed form to."""
    a, b = np.zeros((8, 8)), np.zeros(8)
    for i, ((x, y), (u, v)) in enumerate(zip([(0, 0), (cw, 0), (cw, ch), (0, ch)], p)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * i], b[2 * i + 1] = u, v
    return np.append(np.linalg.solve(a, b), 1.0).reshape(3, 3)


@fuzz
@given(st.lists(st.floats(0, 60, allow_nan=False), min_size=8, max_size=8), st.integers(1, 80), st.integers(1, 80))
def test_closed_form_homography_maps_the_corners(coords: list[float], cw: int, ch: int) -> None:
    p = np.array(coords).reshape(4, 2)
    m = np.empty((3, 3))
    _text._homography(p, cw, ch, m)
    same(m, _text._homography_reference(p, cw, ch))
    edges = np.roll(p, -1, axis=0) - p
    turns = edges[:, 0] * np.roll(edges[:, 1], -1) - edges[:, 1] * np.roll(edges[:, 0], -1)
    corners = np.array([[0, 0, 1], [cw, 0, 1], [cw, ch, 1], [0, ch, 1]], np.float64) @ m.T
    mapped = corners[:, :2] / corners[:, 2:]
    if (turns > 1.0).all() or (turns < -1.0).all():  # clearly convex: the corners land on the box's
        np.testing.assert_allclose(mapped, p, atol=1e-6)
        flat = np.abs(p[0] - p[1] + p[2] - p[3]).max() <= _text._FLAT
        if not flat:
            np.testing.assert_allclose(m, solved_homography(p, cw, ch), rtol=1e-6, atol=1e-9)
    else:  # otherwise the first, second and fourth corners fix an affine map
        np.testing.assert_allclose(mapped[[0, 1, 3]], p[[0, 1, 3]], atol=1e-6)


def test_a_rotated_rectangle_in_float32_is_mapped_affinely() -> None:
    a, c = 0.3, np.array([40.0, 30.0])
    e, n = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
    rect = np.array([c - 20 * e - 6 * n, c + 20 * e - 6 * n, c + 20 * e + 6 * n, c - 20 * e + 6 * n], np.float32)
    assert np.abs(rect[0] - rect[1] + rect[2] - rect[3]).max() > 0  # not exactly a parallelogram once rounded
    m = np.empty((3, 3))
    _text._homography(rect.astype(np.float64), 40, 12, m)
    assert (m[2] == [0.0, 0.0, 1.0]).all()
    trapezoid = np.array([[10, 10], [50, 10], [45, 30], [15, 30]], np.float64)
    _text._homography(trapezoid, 40, 20, m)
    assert m[2, 0] != 0.0 or m[2, 1] != 0.0


def test_crop_rotated_is_within_one_of_opencv() -> None:
    """The warp against cv2.warpPerspective (bilinear, edges replicated) on a smooth image, for
    rotated rectangles (some off the image's edge) and a trapezoid; each crop asked for at its
    own size, so that the resize after the warp copies it."""
    cv2 = pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless) is not installed: nothing to compare "
                                            "against; the numpy reference is checked above")
    yy, xx = np.mgrid[0:120, 0:160].astype(np.float64)
    image = np.stack([128 + 100 * np.sin(xx / 9) * np.cos(yy / 7), 2 * xx * 0.7 + yy * 0.3,
                      128 + 90 * np.cos((xx + yy) / 11)], axis=-1).round().astype(np.uint8)
    boxes = []
    for a, (cx, cy), (hu, hv) in [(0.0, (60, 50), (30, 9)), (0.2, (80, 60), (40, 12)), (-0.7, (70, 60), (35, 15)),
                                  (1.1, (20, 100), (30, 10)), (0.05, (150, 10), (25, 8))]:
        e, n = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
        c = np.array([cx, cy], np.float64)
        boxes.append([c - hu * e - hv * n, c + hu * e - hv * n, c + hu * e + hv * n, c - hu * e + hv * n])
    boxes.append([[30, 20], [120, 25], [110, 70], [40, 60]])
    for p in np.array(boxes, np.float32):
        cw = max(int(max(np.linalg.norm(p[0] - p[1]), np.linalg.norm(p[2] - p[3]))), 1)
        ch = max(int(max(np.linalg.norm(p[0] - p[3]), np.linalg.norm(p[1] - p[2]))), 1)
        m = cv2.getPerspectiveTransform(p, np.array([[0, 0], [cw, 0], [cw, ch], [0, ch]], np.float32))
        want = cv2.warpPerspective(image, m, (cw, ch), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        assert ch < 1.5 * cw
        crops, widths = _text.crop_rotated(image, p[None], height=ch, width=cw)
        assert widths.tolist() == [cw]
        assert np.abs(crops[0].astype(int) - want).max() <= 1, p


def gradient_image(h: int = 60, w: int = 80) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 3 % 256, yy * 4 % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)


def test_crop_of_an_upright_box_is_the_pixels_inside() -> None:
    image = gradient_image()
    box = np.array([[[10, 5], [50, 5], [50, 25], [10, 25]]], np.float32)  # 40 x 20
    crops, widths = _text.crop_rotated(image, box, height=20, width=64, pad=7)
    assert widths.tolist() == [40]
    same(crops[0, :, :40], image[5:25, 10:50])
    assert (crops[0, :, 40:] == 7).all()


def test_crop_of_a_tall_box_is_turned_upright() -> None:
    image = gradient_image()
    box = np.array([[[30, 10], [40, 10], [40, 50], [30, 50]]], np.float32)  # 10 wide, 40 high: a vertical line
    crops, widths = _text.crop_rotated(image, box, height=10, width=64)
    assert widths.tolist() == [40]
    same(crops[0, :, :40], np.rot90(image[10:50, 30:40]))
    not_tall = np.array([[[30, 10], [40, 10], [40, 24], [30, 24]]], np.float32)  # 14 / 10 < 1.5: stays
    crops, widths = _text.crop_rotated(image, not_tall, height=14, width=64)
    same(crops[0, :, :10], image[10:24, 30:40])


def test_crop_of_a_rotated_box_reads_along_it() -> None:
    image = np.full((100, 100, 1), 255, np.uint8)
    image[40:60, 20:80] = 0  # a dark bar; the box around it, turned 90 degrees (corners from the bottom-left)
    box = np.array([[[20, 59], [20, 40], [79, 40], [79, 59]]], np.float32)
    crops, widths = _text.crop_rotated(image, box, height=59, width=32)
    assert crops.shape == (1, 59, 32, 1) and widths.tolist() == [32]  # 59 x 19 upright: 19 / 59 too narrow
    crops, widths = _text.crop_rotated(image, box, height=19, width=100)
    assert widths.tolist() == [59] and (crops[0, :, :59] == 0).all()


def test_crop_of_degenerate_and_no_boxes() -> None:
    image = gradient_image()
    point = np.array([[[20, 20]] * 4], np.float32)
    line = np.array([[[10, 10], [60, 40], [60, 40], [10, 10]]], np.float32)
    for boxes in (point, line, np.zeros((0, 4, 2), np.float32)):
        got = _text.crop_rotated(image, boxes, 16, 32)
        same_all(got, _text.crop_rotated_reference(image, boxes, 16, 32))
        assert got[0].shape == (len(boxes), 16, 32, 3)
    crops, _ = _text.crop_rotated(image, point, 4, 8)
    assert (crops[0, :, :1] == image[20, 20]).all()


@pytest.mark.parametrize("image, boxes, words", [
    (np.zeros((10, 10, 3), np.float32), np.zeros((1, 4, 2)), "uint8 HWC"),
    (np.zeros((10, 10), np.uint8), np.zeros((1, 4, 2)), "uint8 HWC"),
    (np.zeros((2, 10, 10, 3), np.uint8), np.zeros((1, 4, 2)), "one image"),
    (np.zeros((10, 10, 3), np.uint8), np.zeros((1, 4)), r"\[K, 4, 2\]"),
    (np.zeros((10, 10, 3), np.uint8), np.full((1, 4, 2), np.nan), "NaN"),
    (np.zeros((10, 10, 3), np.uint8), np.array([[[0, 0], [1e9, 0], [1e9, 5], [0, 5]]]), "must lie on the image"),
])
def test_crop_rotated_refuses_bad_input(image: np.ndarray, boxes: np.ndarray, words: str) -> None:
    with pytest.raises(OpInputError, match=words) as info:
        _text.crop_rotated(image, boxes)
    assert info.value.op == "text.crop_rotated"


def test_crop_rotated_refuses_bad_parameters() -> None:
    for kw in ({"height": 0}, {"width": -1}, {"pad": 256}):
        with pytest.raises(OpParamsError, match=next(iter(kw))):
            _text.crop_rotated(np.zeros((5, 5, 3), np.uint8), np.zeros((0, 4, 2)), **kw)


# -- resize_pad -------------------------------------------------------------------------------------


@fuzz
@given(pad_cases())
def test_resize_pad_matches_reference(case: tuple) -> None:
    images, height, width, pad = case
    out, widths = _text.resize_pad(images, height, width, pad)
    same_all((out, widths), _text.resize_pad_reference(images, height, width, pad))
    sizes = [img.shape[:2] for img in (images if isinstance(images, list) else
                                       (images if images.ndim == 4 else [images]))]
    assert out.shape[0] == len(sizes) and out.shape[1:3] == (height, width)
    for img_out, (h, w), used in zip(out, sizes, widths):
        assert used == max(1, min(math.ceil(height * w / h), width))
        assert (img_out[:, used:] == pad).all()


def test_resize_pad_keeps_the_aspect() -> None:
    image = gradient_image(24, 100)
    out, widths = _text.resize_pad(image, 48, 320, pad=255)
    assert widths.tolist() == [200] and out.shape == (1, 48, 320, 3)
    same(out[0, :, :200], _image.resize(image, 48, 200))
    assert (out[0, :, 200:] == 255).all()
    out, widths = _text.resize_pad(gradient_image(10, 1000), 48, 320)
    assert widths.tolist() == [320]  # too wide: squeezed to the width


def test_resize_pad_is_within_one_of_opencv() -> None:
    cv2 = pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless) is not installed: nothing to compare "
                                            "against; the numpy reference is checked above")
    rng = np.random.default_rng(7)
    for h, w in [(37, 211), (100, 48), (13, 700), (48, 48), (200, 300)]:
        image = rng.integers(0, 256, (h, w, 3), np.uint8)
        out, (used,) = _text.resize_pad(image, 48, 320)
        want = cv2.resize(image, (int(used), 48), interpolation=cv2.INTER_LINEAR)
        assert np.abs(out[0, :, :used].astype(int) - want).max() <= 1


@pytest.mark.parametrize("images, words", [
    (np.zeros((10, 10, 3), np.float32), "uint8"),
    (np.zeros((10, 10), np.uint8), "HWC or NHWC"),
    ([np.zeros((5, 5, 3), np.uint8), np.zeros((5, 5, 1), np.uint8)], "different channel counts"),
    ([np.zeros((1, 5, 5, 3), np.uint8)], "must hold HWC images"),
    ([], "empty sequence"),
    (np.zeros((0, 5, 3), np.uint8), "nothing to resize"),
])
def test_resize_pad_refuses_bad_input(images: object, words: str) -> None:
    with pytest.raises(OpInputError, match=words) as info:
        _text.resize_pad(images, 48, 320)
    assert info.value.op == "image.resize_pad"


# -- CTC ----------------------------------------------------------------------------------------------


@fuzz
@given(softmax_outputs())
def test_ctc_greedy_matches_reference(case: tuple[np.ndarray, int]) -> None:
    probs, blank = case
    labels, lengths, confidence = _text.ctc_greedy(probs, blank)
    want_labels, want_lengths, want_confidence = _text.ctc_greedy_reference(probs, blank)
    same(labels, want_labels)
    same(lengths, want_lengths)
    assert confidence.dtype == np.float32
    np.testing.assert_allclose(confidence, want_confidence, rtol=1e-5)
    for row, n in zip(labels, lengths):
        assert (row[n:] == -1).all() and (row[:n] != blank).all()


def one_hot(path: list[int], classes: int, p: float = 0.9) -> np.ndarray:
    out = np.full((len(path), classes), (1 - p) / (classes - 1), np.float32)
    out[np.arange(len(path)), path] = p
    return out


def test_ctc_greedy_collapses_repeats_and_drops_blanks() -> None:
    probs = np.stack([one_hot([1, 1, 0, 1, 2, 2, 0, 0, 3], 5), one_hot([0] * 9, 5)])
    labels, lengths, confidence = _text.ctc_greedy(probs)
    assert lengths.tolist() == [4, 0]
    assert labels[0, :4].tolist() == [1, 1, 2, 3] and (labels[0, 4:] == -1).all() and (labels[1] == -1).all()
    np.testing.assert_allclose(confidence, [0.9, 0.0], rtol=1e-6)
    vocabulary = ["a", "b", "c", "d"]
    assert _text.labels_to_text(labels, lengths, vocabulary) == ["aabc", ""]
    # A blank that is the last class (as some models put it): the vocabulary lists the others.
    labels, lengths, _ = _text.ctc_greedy(one_hot([0, 4, 1, 1], 5)[None], blank=4)
    assert _text.labels_to_text(labels, lengths, vocabulary, blank=4) == ["ab"]


def test_ctc_greedy_of_no_steps() -> None:
    labels, lengths, confidence = _text.ctc_greedy(np.zeros((2, 0, 7), np.float32))
    assert labels.shape == (2, 0) and lengths.tolist() == [0, 0] and confidence.tolist() == [0, 0]


@pytest.mark.parametrize("probs, blank, error, words", [
    (np.zeros((4, 7), np.float32), 0, OpInputError, r"\[N, T, C\]"),
    (np.zeros((1, 4, 7), np.int64), 0, OpInputError, "int64"),
    (np.zeros((1, 4, 0), np.float32), 0, OpInputError, "no classes"),
    (np.zeros((1, 4, 7), np.float32), 7, OpParamsError, "blank"),
])
def test_ctc_greedy_refuses_bad_input(probs: np.ndarray, blank: int, error: type, words: str) -> None:
    with pytest.raises(error, match=words) as info:
        _text.ctc_greedy(probs, blank)
    assert info.value.op == "text.ctc_greedy"


def test_labels_to_text_names_a_short_vocabulary() -> None:
    labels, lengths, _ = _text.ctc_greedy(one_hot([3, 0, 5], 6)[None])
    with pytest.raises(OpInputError, match="vocabulary of 4 characters") as info:
        _text.labels_to_text(labels, lengths, ["a", "b", "c", "d"])
    assert info.value.op == "text.labels_to_text"
    with pytest.raises(OpInputError, match="the vocabulary has 4 characters but the model scores 6 classes"):
        _text.labels_to_text(labels[:, :1], np.array([1], np.int32), ["a", "b", "c", "d"], classes=6)
    assert _text.labels_to_text(labels, lengths, list("abcde"), classes=6) == ["ce"]
    with pytest.raises(OpInputError, match="lengths"):
        _text.labels_to_text(labels, np.array([9], np.int32), list("abcde"))


def test_vocabulary_from_metadata() -> None:
    text = "a\nb\r\n\u3000\n中\n"
    assert _text.vocabulary_from_metadata(text) == ["a", "b", "\u3000", "中", " "]
    assert _text.vocabulary_from_metadata(text, space=False) == ["a", "b", "\u3000", "中"]
    assert _text.vocabulary_from_metadata("a\nb") == ["a", "b", " "]


# -- the real models --------------------------------------------------------------------------------


def render(text: str, size: int = 40) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (640, 160), "white")
    ImageDraw.Draw(image).text((30, 40), text, fill="black", font=ImageFont.load_default(size=size))
    return np.asarray(image)


def test_reads_rendered_text_with_the_real_ppocr_models(real_model) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("PIL.ImageFont")
    detector = ort.InferenceSession(str(real_model("ppocr-det")), providers=["CPUExecutionProvider"])
    recogniser = ort.InferenceSession(str(real_model("ppocr-rec")), providers=["CPUExecutionProvider"])
    text = "EDGEBUS 2026"
    rgb = render(text)
    h, w = rgb.shape[:2]

    # The detector: both sides a multiple of 32, ImageNet mean and std, NCHW.
    x = _image.normalize(_image.resize(rgb, round(h / 32) * 32, round(w / 32) * 32),
                         (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))[None]
    prob = detector.run(None, {detector.get_inputs()[0].name: x})[0]
    assert prob.shape == (1, 1, *x.shape[2:])
    # A wider margin than PaddleOCR's 1.5: on a tight crop this model drops the space.
    boxes, scores = _text.db_boxes(prob, thresh=0.3, box_thresh=0.6, unclip_ratio=2.5)
    assert len(boxes) == 1 and scores[0] > 0.8, (boxes, scores)
    boxes = _text.scale_boxes(boxes, prob.shape[-2:], (h, w))
    (x0, y0), (x1, y1) = boxes[0].min(axis=0), boxes[0].max(axis=0)
    assert x0 < 40 and y0 < 50 and x1 > 250 and y1 > 70  # around the text drawn at (30, 40)

    # The recogniser: 48 high, (x / 255 - 0.5) / 0.5, padded with mid-grey (0 once normalised, as PaddleOCR pads).
    crops, widths = _text.crop_rotated(rgb, boxes, height=48, width=320, pad=128)
    probs = recogniser.run(None, {recogniser.get_inputs()[0].name: _image.normalize(crops, 0.5, 0.5)})[0]
    assert probs.shape[0] == 1 and probs.shape[2] == 6625
    vocabulary = _text.vocabulary_from_metadata(recogniser.get_modelmeta().custom_metadata_map["character"])
    assert len(vocabulary) == 6624
    labels, lengths, confidence = _text.ctc_greedy(probs)
    assert _text.labels_to_text(labels, lengths, vocabulary, classes=probs.shape[2]) == [text]
    assert confidence[0] > 0.9
