"""Every op a manifest may name: its parameters, what it takes and what it gives.

The declarations only: each op's kernel is named ``"module:function"`` and imported the
first time the op runs, so the model store and the scheduler check a manifest's chains
(``check_chains``) without importing numba or numpy.

Layouts, as a camera and a model give them: images are uint8 ``[N, H, W, C]`` (or one HWC
image) until ``image.normalize`` / ``image.to_tensor`` make float32 ``[N, C, H, W]``;
signals are ``[N, samples]`` (or one ``[samples]``); scores ``[N, ...]``.  An op on a batch
keeps one row out per row in along axis 0 (its output keeps the batch axis) unless its rule
says otherwise (``signal.frame`` cutting several frames from a signal, ``post.nms``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ._exceptions import OpParamsError
from ._registry import (
    Dim,
    Mismatch,
    Op,
    Ref,
    TensorType,
    Takes,
    bands,
    boolean,
    choice,
    integer,
    number,
    numbers,
    resource,
)

__all__ = ["OPS", "vocabulary"]

#: dtypes of real numbers, float32 first (what a client sends to a chain that starts with the op)
REAL = ("float32", "float64", "float16", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
FLOATS = ("float32", "float64", "float16")
_WINDOWS = ("rect", "hann", "hamming")  # _signal.WINDOWS


def _float(dtype: str) -> str:
    """The dtype a float op gives: float64 stays, everything else computes into float32."""
    return "float64" if dtype == "float64" else "float32"


def _out(x: TensorType, dtype: str, shape: Sequence[Dim]) -> TensorType:
    """An op's output that keeps the input's rows: batched on axis 0 if the input is and the
    output has an axis."""
    shape = tuple(shape)
    return TensorType(dtype, shape, 0 if x.batch == 0 and shape else None)


def _prod(dims: Sequence[Dim]) -> Dim:
    n = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        n *= d
    return n


def _nonempty_last(x: TensorType, what: str) -> None:
    if x.shape and x.shape[-1] == 0:
        raise Mismatch(f"its last axis is empty: {what}")


# -- images -----------------------------------------------------------------------------------------


def _image_template(params: Mapping[str, Any]) -> TensorType:
    return TensorType("uint8", ("~N", "~H", "~W", "~C"), 0)


_IMAGES = Takes(("uint8",), "uint8 images, HWC or NHWC", ranks=(3, 4), template=_image_template)
_COLOUR = Takes(("uint8",), "uint8 images of 3 or 4 channels (alpha kept), HWC or NHWC", ranks=(3, 4),
                template=lambda p: TensorType("uint8", ("~N", "~H", "~W", 3), 0))
_SIZE = {"height": integer(lo=1), "width": integer(lo=1)}


def _image_batch(x: TensorType) -> int | None:
    """The batch axis an image op keeps: NHWC's, none for one HWC image (its axis 0 is H)."""
    return x.batch if x.rank == 4 else None


def _resized(x: TensorType, p: Mapping[str, Any], res: Any) -> TensorType:
    *lead, h, w, c = x.shape
    if 0 in (h, w):
        raise Mismatch(f"an image of {h}x{w} pixels has nothing to resize")
    return TensorType("uint8", (*lead, p["height"], p["width"], c), _image_batch(x))


def _resize_padded(x: TensorType, p: Mapping[str, Any], res: Any) -> TensorType:
    n = x.shape[0] if x.rank == 4 else 1
    return TensorType("uint8", (n, p["height"], p["width"], x.shape[-1]), _image_batch(x))


def _channel_values(p: Mapping[str, Any], c: Dim) -> None:
    if isinstance(c, int):
        for name in ("mean", "std"):
            if name in p and len(p[name]) not in (1, c):
                raise Mismatch(f"{name} has {len(p[name])} values for images of {c} channels")


def _to_chw(x: TensorType, p: Mapping[str, Any], res: Any) -> TensorType:
    *lead, h, w, c = x.shape
    _channel_values(p, c)
    return TensorType("float32", (*lead, c, h, w), _image_batch(x))


def _to_model(x: TensorType, p: Mapping[str, Any], res: Any) -> TensorType:
    *lead, h, w, c = x.shape
    if 0 in (h, w):
        raise Mismatch(f"an image of {h}x{w} pixels has nothing to resize")
    if p.get("swap_rb", False) and isinstance(c, int) and c not in (3, 4):
        raise Mismatch(f"images of {c} channels have no red and blue to swap")
    _channel_values(p, c)
    return TensorType("float32", (*lead, c, p["height"], p["width"]), _image_batch(x))


def _colour(channels: Callable[[Dim], Dim]) -> Callable[..., TensorType]:
    def rule(x: TensorType, p: Mapping[str, Any], res: Any) -> TensorType:
        c = x.shape[-1]
        if isinstance(c, int) and c not in (3, 4):
            raise Mismatch(f"images of {c} channels have no red and blue")
        return TensorType("uint8", (*x.shape[:-1], channels(c)), _image_batch(x))
    return rule


# -- signals and audio ------------------------------------------------------------------------------


def _signal_template(params: Mapping[str, Any]) -> TensorType:
    return TensorType("float32", ("~N", "~S"), 0)


def _takes_frames(p: Mapping[str, Any]) -> str:
    length = p["length"]
    hop = p.get("hop", length)
    return (f"real signals of at least {length} samples, [samples] or [N, samples] (one frame per signal: "
            f"{length} to {length + hop - 1} samples, e.g. [N, {length}])")


def _framed(x: TensorType, p: Mapping[str, Any], res: Any) -> TensorType:
    length = p["length"]
    hop = p.get("hop", length)
    *lead, s = x.shape
    frames: Dim = None
    if isinstance(s, int):
        if s < length:
            raise Mismatch(f"signals of {s} samples are shorter than a frame of {length}")
        frames = 1 + (s - length) // hop
    dtype = _float(x.dtype)
    if x.batch == 0 and len(lead) == 1 and frames in (1, None):  # one frame per signal (checked as it runs)
        return TensorType(dtype, (lead[0], length), 0)
    return TensorType(dtype, (_prod([*lead, frames]), length), None)


_SIGNALS = Takes(REAL, "real-valued frames [..., samples] of at least one sample", template=_signal_template)


def _statistics(columns: Callable[[Mapping[str, Any]], int | None]) -> Callable[..., TensorType]:
    def rule(x: TensorType, p: Mapping[str, Any], res: Any) -> TensorType:
        _nonempty_last(x, "frames of no samples have no statistics")
        n = columns(p)
        return _out(x, "float32", (*x.shape[:-1], *(() if n is None else (n,))))
    return rule


def _optional_number(value: Any) -> float | None:
    return None if value is None else number(above=0)(value)


def _norm(value: Any) -> str | None:
    if value not in ("slaney", None):
        raise ValueError(f"must be 'slaney' or null (none), not {value!r}")
    return value


def _mel_relate(p: dict[str, Any]) -> None:
    rate = p.get("rate", 16000.0)
    fmin, fmax = p.get("fmin", 0.0), p.get("fmax")
    if not fmin < rate / 2:
        raise OpParamsError("audio.log_mel", "fmin", f"must be below rate / 2 = {rate / 2:g}, not {fmin:g}")
    if fmax is not None and not fmin < fmax <= rate / 2:
        raise OpParamsError("audio.log_mel", "fmax", f"must be above fmin={fmin:g} and at most rate / 2 = "
                                                     f"{rate / 2:g}, not {fmax:g}")


def _log_mel(x: TensorType, p: Mapping[str, Any], res: Any) -> TensorType:
    n_fft, hop = p.get("n_fft", 400), p.get("hop", 160)
    pad = n_fft // 2 if p.get("center", True) else 0
    s = x.shape[-1]
    frames: Dim = None
    if isinstance(s, int):
        if s == 0 or s + 2 * pad < n_fft:
            raise Mismatch(f"signals of {s} samples are shorter than n_fft={n_fft}" +
                           ("" if pad else " (center=false does not pad them)"))
        frames = 1 + (s + 2 * pad - n_fft) // hop
    n = x.shape[0] if x.rank == 2 else 1
    return TensorType("float32", (n, p.get("n_mels", 80), frames), x.batch if x.rank == 2 else None)


# -- scores and detections --------------------------------------------------------------------------

_SCORES = Takes(REAL, "real scores [..., classes]")


def _softmax(x: TensorType, p: Mapping[str, Any], res: Any) -> TensorType:
    _nonempty_last(x, "no scores to choose from")
    return _out(x, _float(x.dtype), x.shape)


def _topk(x: TensorType, p: Mapping[str, Any], res: Any) -> tuple[TensorType, TensorType]:
    k, n = p["k"], x.shape[-1]
    if isinstance(n, int) and k > n:
        raise Mismatch(f"k={k} is more than the {n} scores of the last axis")
    return _out(x, "int64", (*x.shape[:-1], k)), _out(x, _float(x.dtype), (*x.shape[:-1], k))


def _argmax(x: TensorType, p: Mapping[str, Any], res: Any) -> TensorType:
    _nonempty_last(x, "no scores to choose from")
    return _out(x, "int64", x.shape[:-1])


def _nms(x: TensorType, p: Mapping[str, Any], res: Any) -> TensorType:
    c = x.shape[1]
    if isinstance(c, int) and c < 5:
        raise Mismatch(f"detections of {c} columns have no score (x1, y1, x2, y2, score, ...)")
    return TensorType(x.dtype, (None, c), None)  # the detections kept: rows of nothing in particular


def _takes_yolo(p: Mapping[str, Any]) -> str:
    first = 5 if p.get("objectness", False) else 4
    shape = f"[N, {first} + C, A]" if p.get("layout", "anchors_last") == "anchors_last" else f"[N, A, {first} + C]"
    return f"float predictions {shape} ({p.get('layout', 'anchors_last')}) with at least one class"


def _decode_yolo(x: TensorType, p: Mapping[str, Any], res: Any) -> tuple[TensorType, TensorType]:
    first = 5 if p.get("objectness", False) else 4
    channels = x.shape[1] if p.get("layout", "anchors_last") == "anchors_last" else x.shape[2]
    if isinstance(channels, int) and channels <= first:
        raise Mismatch(f"{channels} channels leave no class score after the {first} of a box")
    n = x.shape[0]
    return (_out(x, "float32", (n, p.get("max_detections", 300), 6)), _out(x, "int32", (n,)))


# -- text -------------------------------------------------------------------------------------------


def _db_boxes(x: TensorType, p: Mapping[str, Any], res: Any) -> tuple[TensorType, TensorType, TensorType]:
    if x.rank == 4 and isinstance(x.shape[1], int) and x.shape[1] != 1:
        raise Mismatch(f"{x.shape[1]} maps per image, not 1")
    n, k = x.shape[0], p.get("max_candidates", 1000)
    return _out(x, "float32", (n, k, 4, 2)), _out(x, "float32", (n, k)), _out(x, "int32", (n,))


def vocabulary(value: Any, space: bool = True) -> list[str]:
    """A vocabulary as ``text.ctc_greedy`` reads it: a text of one entry a line (only ``\\n``
    and ``\\r\\n`` end a line; a PaddleOCR recogniser's ``character`` metadata, a dictionary
    file), or a list of entries, with ``" "`` appended as the last class if ``space``
    (``_text.vocabulary_from_metadata``'s rule, without its numba module)."""
    if isinstance(value, str):
        lines = value.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        entries = [line[:-1] if line.endswith("\r") else line for line in lines]
    else:
        entries = list(value)
    return entries + [" "] if space else entries


def _ctc(x: TensorType, p: Mapping[str, Any], res: Callable[[Any], str | None]) -> tuple[TensorType, TensorType]:
    n, steps, classes = x.shape
    blank = p.get("blank", 0)
    if isinstance(classes, int) and blank >= classes:
        raise Mismatch(f"the blank {blank} is not one of its {classes} classes")
    value = p["vocabulary"]
    text = res(value) if isinstance(value, Ref) else value
    length: Dim = None
    if text is not None:
        vocab = vocabulary(text, p.get("space", True))
        if isinstance(classes, int) and len(vocab) < classes - 1:
            raise OpParamsError("text.ctc_greedy", "vocabulary", (
                f"{value} has {len(vocab)} entries{' (with the space appended)' if p.get('space', True) else ''} "
                f"but the model scores {classes} classes, {classes - 1} besides the blank {blank}: is it the "
                "model's vocabulary, one entry a line?"))
        widest = max(map(len, vocab), default=0)
        length = steps if widest == 1 else steps * widest if isinstance(steps, int) else None
    return _out(x, "uint32", (n, length)), _out(x, "float32", (n,))


#: Every op a manifest may name.
OPS: dict[str, Op] = {op.name: op for op in [
    # images: uint8 HWC / NHWC as a camera gives them, to the float32 NCHW a model takes
    Op("image.resize", "_image:resize", required=_SIZE, takes=_IMAGES, gives=_resized),
    Op("image.letterbox", "_image:letterbox_image", required=_SIZE, optional={"pad": integer(0, 255)},
       takes=_IMAGES, gives=_resized),
    Op("image.resize_pad", "_adapters:resize_pad_images", required=_SIZE, optional={"pad": integer(0, 255)},
       takes=_IMAGES, gives=_resize_padded),
    Op("image.normalize", "_image:normalize",
       optional={"mean": numbers(), "std": numbers(above=0), "scale": boolean}, takes=_IMAGES, gives=_to_chw),
    Op("image.to_tensor", "_adapters:to_tensor", optional={"scale": boolean}, takes=_IMAGES, gives=_to_chw),
    # resize or letterbox + swap_rb + normalize in one pass (bit for bit the three ops)
    Op("image.to_model", "_image:to_model", required=_SIZE,
       optional={"mean": numbers(), "std": numbers(above=0), "scale": boolean, "letterbox": boolean,
                 "pad": integer(0, 255), "swap_rb": boolean}, takes=_IMAGES, gives=_to_model),
    Op("image.bgr_to_rgb", "_image:bgr_to_rgb", takes=_COLOUR, gives=_colour(lambda c: c)),
    Op("image.rgb_to_bgr", "_image:bgr_to_rgb", takes=_COLOUR, gives=_colour(lambda c: c)),
    Op("image.rgb_to_gray", "_image:rgb_to_gray", takes=_COLOUR, gives=_colour(lambda c: 1)),
    Op("image.bgr_to_gray", "_image:bgr_to_gray", takes=_COLOUR, gives=_colour(lambda c: 1)),
    # signals and audio
    Op("signal.frame", "_signal:frame", required={"length": integer(lo=1)},
       optional={"hop": integer(lo=1), "window": choice(*_WINDOWS)},
       takes=Takes(REAL, _takes_frames, template=_signal_template), gives=_framed),
    Op("signal.rms", "_signal:rms", takes=_SIGNALS, gives=_statistics(lambda p: None)),
    Op("signal.kurtosis", "_signal:kurtosis", takes=_SIGNALS, gives=_statistics(lambda p: None)),
    Op("signal.crest_factor", "_signal:crest_factor", takes=_SIGNALS, gives=_statistics(lambda p: None)),
    Op("signal.band_energies", "_signal:band_energies", required={"rate": number(above=0), "bands": bands},
       optional={"window": choice(*_WINDOWS)}, takes=_SIGNALS, gives=_statistics(lambda p: len(p["bands"]))),
    Op("signal.vibration_features", "_signal:vibration_features", required={"rate": number(above=0), "bands": bands},
       takes=_SIGNALS, gives=_statistics(lambda p: 3 + len(p["bands"]))),
    Op("audio.log_mel", "_audio:log_mel",
       optional={"rate": number(above=0), "n_fft": integer(2, 1 << 16), "hop": integer(lo=1),
                 "n_mels": integer(1, 1 << 12), "fmin": number(lo=0), "fmax": _optional_number,
                 "window": choice("hann", "hamming", "rect"), "center": boolean, "power": number(above=0),
                 "log": choice("ln", "log10", "db"), "floor": number(above=0), "norm": _norm,
                 "mel_scale": choice("slaney", "htk"), "pad_mode": choice("reflect", "constant")},
       relate=_mel_relate,
       takes=Takes(("float32", "float64"), "float samples [samples] or signals [N, samples] (PCM as float in "
                   "[-1, 1])", ranks=(1, 2), template=_signal_template),
       gives=_log_mel),
    # scores and detections
    Op("post.softmax", "_post:softmax", takes=_SCORES, gives=_softmax),
    Op("post.topk", "_post:topk", required={"k": integer(lo=1)}, takes=_SCORES, gives=_topk,
       parts=("indices", "values")),
    Op("post.argmax", "_post:argmax", takes=_SCORES, gives=_argmax),
    Op("post.threshold_hysteresis", "_post:threshold_hysteresis", required={"on": number(), "off": number()},
       optional={"start": boolean}, relate=lambda p: _check_hysteresis(p["on"], p["off"]),
       takes=Takes(REAL, "real scores [N, ...], N frames in time order"),
       gives=lambda x, p, res: _out(x, "bool", x.shape)),
    Op("post.nms", "_post:nms_rows", required={"iou_threshold": number(0, 1)},
       optional={"score_threshold": number()}, may_be_empty=True,  # no detection kept: an answer
       takes=Takes(REAL, "detections [K, 5+] (x1, y1, x2, y2, score, ...)", ranks=(2,)), gives=_nms),
    Op("post.dequantize_int8", "_post:dequantize_int8", required={"scale": number(above=0)},
       optional={"zero_point": integer(-128, 255)},
       takes=Takes(("int8", "uint8"), "int8 or uint8 values", min_rank=0),
       gives=lambda x, p, res: _out(x, "float32", x.shape)),
    Op("post.decode_yolo", "_detect:decode_yolo_batch",
       optional={"score_threshold": number(), "iou_threshold": number(0, 1), "max_detections": integer(lo=1),
                 "layout": choice("anchors_last", "anchors_first"), "objectness": boolean,
                 "class_agnostic": boolean, "max_candidates": integer(lo=1)},
       takes=Takes(FLOATS, _takes_yolo, ranks=(3,)), gives=_decode_yolo, parts=("detections", "counts")),
    # text
    Op("text.db_boxes", "_adapters:db_boxes_batch",
       optional={"thresh": number(), "box_thresh": number(), "unclip_ratio": number(lo=0),
                 "max_candidates": integer(lo=1), "min_size": number(lo=0)},
       takes=Takes(FLOATS, "a DB text detector's probability maps, float [N, 1, H, W] or [N, H, W]", ranks=(3, 4)),
       gives=_db_boxes, parts=("boxes", "scores", "counts")),
    Op("text.ctc_greedy", "_adapters:ctc_text", required={"vocabulary": resource},
       optional={"blank": integer(lo=0), "space": boolean},
       takes=Takes(FLOATS, "a recogniser's scores [N, T, C] (batch, steps, classes)", ranks=(3,)),
       gives=_ctc, parts=("text", "confidence"), prepare="_adapters:prepare_ctc"),
]}


def _check_hysteresis(on: float, off: float) -> None:
    """The thresholds must leave a band between them, or a score could both switch on and off
    (``_post.check_hysteresis``, without its numba module)."""
    if not off < on:
        raise OpParamsError("post.threshold_hysteresis", "off", f"must be below on ({off} is not below {on})")
