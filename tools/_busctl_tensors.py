"""What ``busctl infer`` sends and shows: tensors read from files and the command line, fitted
to a model's contract, and outputs shown to a person (small ones in full, large ones
summarised, text decoded) or as JSON.

Pure functions of arrays and specs, no bus: ``busctl infer`` (``_busctl_commands.cmd_infer``)
puts them together."""

from __future__ import annotations

import re
import wave
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from protocols import pack_tensors
from protocols.modelstore import TensorSpec, show_shape

__all__ = [
    "FORMATS", "InputError", "load_input", "read_wav", "split_input", "parse_value", "fit_input",
    "contract_spec", "name_inputs", "is_text", "is_boxes", "decode_text", "summarise", "show_output", "output_json",
    "SHOW_IN_FULL", "JSON_IN_FULL",
]

#: What ``--input`` reads, for the messages that refuse a file.
FORMATS = ("a .npy array (numpy.save, no pickled objects), an image Pillow reads (PNG, JPEG, BMP...: "
           "uint8 [H, W, 3] RGB) or a .wav file (8, 16, 24 or 32-bit integer PCM: float32 [samples] in [-1, 1], "
           "the first channel)")
#: Outputs of at most this many elements are printed in full (more: a summary).
SHOW_IN_FULL = 20
#: ... and in JSON, their values are given up to this many elements (more: the summary).
JSON_IN_FULL = 10_000
#: A float output whose last axis has at least this many entries is taken for class scores.
MIN_CLASSES = 10
TOP_K = 5

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:\-]*")


class InputError(ValueError):
    """A file or value on the command line that cannot be sent: busctl exits 2 with it."""


# -- reading inputs ------------------------------------------------------------------------------


def split_input(text: str) -> tuple[str, str]:
    """``--input [NAME=]FILE`` as (name, file); name "" when none is given.  A name is what
    comes before the first ``=`` when it looks like a tensor name (no ``/``), so a file whose
    name holds ``=`` is given with its directory: ``./a=b.npy``."""
    name, sep, path = text.partition("=")
    if sep and _NAME.fullmatch(name) and path:
        return name, path
    if sep and not name:
        raise InputError(f"--input {text!r}: the name before '=' is empty (NAME=FILE, or FILE alone)")
    return "", text


def load_input(path: str) -> np.ndarray:
    """The tensor in the file ``path``, whatever its suffix: a .npy array, a WAVE file or an
    image (told apart by their first bytes).  InputError names the file and the formats."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            head = f.read(12)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}; --input takes {FORMATS}") from exc
    if head.startswith(b"\x93NUMPY"):
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {path} as a .npy array: {exc}") from exc
        if not isinstance(arr, np.ndarray):
            raise InputError(f"cannot read {path}: it holds several arrays; give one .npy file per input")
        what = ".npy array"
    elif head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        arr, what = read_wav(p), ".wav file"
    else:
        arr, what = _read_image(p), "image"
    try:
        pack_tensors([arr])
    except ValueError as exc:
        raise InputError(f"cannot send {path} ({what}): {exc}") from None
    return arr


def read_wav(path: str | Path) -> np.ndarray:
    """A PCM WAVE file as float32 samples in [-1, 1] (shape [samples]): 8-bit (unsigned),
    16, 24 or 32-bit (signed) integers, the first channel of several.  Not resampled: the
    file's rate is the model's to match."""
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, n = w.getsampwidth(), w.getnchannels(), w.getnframes()
            data = w.readframes(n)
    except (OSError, EOFError, wave.Error) as exc:
        hint = " (IEEE float samples: convert them to integer PCM, or save a .npy)" if "format: 3" in str(exc) else ""
        raise InputError(f"cannot read {path} as a .wav file: {exc}{hint}; --input takes {FORMATS}") from exc
    frames = len(data) // (width * channels)
    raw = np.frombuffer(data[: frames * width * channels], dtype=np.uint8).reshape(frames, channels, width)[:, 0]
    match width:
        case 1:
            return ((raw[:, 0].astype(np.float32) - 128.0) / 128.0).astype(np.float32)
        case 2 | 4:
            ints = np.ascontiguousarray(raw).view(f"<i{width}")[:, 0]
            return (ints.astype(np.float64) / float(1 << (8 * width - 1))).astype(np.float32)
        case 3:
            padded = np.zeros((frames, 4), dtype=np.uint8)
            padded[:, 1:] = raw  # the 24 bits in the top of a little-endian int32
            return (padded.view("<i4")[:, 0].astype(np.float64) / float(1 << 31)).astype(np.float32)
        case _:
            raise InputError(f"cannot read {path}: {8 * width}-bit samples; --input takes {FORMATS}")


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        raise InputError(f"cannot read {path}: it is none of the formats --input takes: {FORMATS}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read {path} as an image: {exc}; --input takes {FORMATS}") from exc


def parse_value(text: str, spec: TensorSpec | None = None) -> tuple[str, np.ndarray]:
    """``--value NAME=NUMBER[:DTYPE]`` as (name, array): a scalar, of DTYPE, else of the
    input's dtype in the contract, else int64 for a whole number and float32 for another;
    shaped as the contract's input when that holds exactly one element ([] or [1])."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise InputError(f"--value {text!r} is not NAME=NUMBER[:DTYPE] (e.g. sr=16000:int64)")
    number, _, dtype = rest.partition(":")
    try:
        value: int | float = int(number)
    except ValueError:
        try:
            value = float(number)
        except ValueError:
            raise InputError(f"--value {text!r}: {number!r} is not a number") from None
    dtype = dtype or (spec.dtype if spec is not None else ("int64" if isinstance(value, int) else "float32"))
    try:
        kind = np.dtype(dtype).kind
    except TypeError:
        raise InputError(f"--value {text!r}: {dtype!r} is not a dtype (int64, float32...)") from None
    if kind in "iub" and not isinstance(value, int):
        raise InputError(f"--value {text!r}: {number} is not a whole number, and {dtype} takes one")
    try:
        arr = np.array(value, dtype=dtype)
    except OverflowError:
        raise InputError(f"--value {text!r}: {number} does not fit {dtype}") from None
    if spec is not None and all(isinstance(d, int) for d in spec.shape) and int(np.prod(spec.shape)) == 1:
        arr = arr.reshape([int(d) for d in spec.shape])  # type: ignore[arg-type]
    try:
        pack_tensors([arr])
    except ValueError as exc:
        raise InputError(f"--value {text!r}: {exc}") from None
    return name, arr


def fit_input(arr: np.ndarray, spec: TensorSpec | None, *, force_batch: bool = False) -> np.ndarray:
    """``arr`` as the contract's input ``spec`` takes it: a batch axis of 1 added where the
    array has one axis fewer than the spec and the spec has a batch axis (``force_batch``:
    whatever its rank; at axis 0 without a spec), floats cast to the spec's float type.
    Anything else is left for the scheduler to judge (its bad-message names the input)."""
    axis = spec.batch() if spec is not None else 0
    if axis is not None and (force_batch or (spec is not None and arr.ndim == len(spec.shape) - 1)):
        arr = np.expand_dims(arr, min(axis, arr.ndim))
    if spec is not None and arr.dtype.kind == "f" and spec.dtype.startswith("float") and arr.dtype.name != spec.dtype:
        arr = arr.astype(spec.dtype)
    return arr


# -- showing outputs -----------------------------------------------------------------------------


def is_text(name: str, arr: np.ndarray) -> bool:
    """Text travels as uint32 Unicode code points, [..., L], zero-padded; an output says it
    is text by its name."""
    return arr.dtype == np.uint32 and arr.ndim >= 1 and "text" in name.lower()


def decode_text(arr: np.ndarray) -> Any:
    """The strings of a text tensor: [L] one string, [N, L] a list of N, deeper nested lists."""
    length = arr.shape[-1]
    if length == 0:
        return np.full(arr.shape[:-1], "", dtype=object).tolist() if arr.ndim > 1 else ""
    codes = np.ascontiguousarray(arr, dtype="<u4")
    if codes.size and int(codes.max()) > 0x10FFFF:
        raise ValueError("holds values that are not Unicode code points")
    return codes.view(f"<U{length}")[..., 0].tolist()


def is_boxes(name: str, arr: np.ndarray) -> bool:
    """Boxes as four (x, y) corners, [..., 4, 2] (a text detector's, a graph's crops'); an
    output says it is boxes by its name."""
    return arr.dtype.kind in "fiu" and arr.ndim >= 3 and arr.shape[-2:] == (4, 2) and "box" in name.lower()


def _scores(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "f" and arr.ndim >= 1 and arr.shape[-1] >= MIN_CLASSES


def summarise(arr: np.ndarray) -> dict[str, Any]:
    """min, max and mean of ``arr`` (None for none: it is empty) and, when its last axis
    looks like class scores, the top-5 of its first row as [index, value] pairs."""
    if not arr.size:
        return {"min": None, "max": None, "mean": None}
    wide = arr.astype(np.float64) if arr.dtype.kind in "biu" else arr
    out: dict[str, Any] = {"min": _num(wide.min()), "max": _num(wide.max()), "mean": _num(wide.mean(dtype=np.float64))}
    if _scores(arr):
        row = arr.reshape(-1, arr.shape[-1])[0]
        top = np.argsort(-row, kind="stable")[:TOP_K]
        out["top"] = [[int(i), _num(row[i])] for i in top]
    return out


def _num(x: Any) -> int | float:
    x = x.item() if hasattr(x, "item") else x
    return x if isinstance(x, int) else float(x)


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.6g}" if isinstance(x, float) else str(x)


def show_output(name: str, arr: np.ndarray, width: int = 160) -> list[str]:
    """The lines a person sees for one output: ``name: dtype [shape]`` then its values,
    its strings, or a summary."""
    head = f"{name or '(unnamed)'}: {arr.dtype.name} {show_shape(list(arr.shape))}"
    if is_text(name, arr):
        try:
            text = decode_text(arr)
        except ValueError:
            pass
        else:
            rows = [text] if isinstance(text, str) else list(np.asarray(text, dtype=object).reshape(-1))
            lines = [f"{head} text"] + [f"  {row!r}" for row in rows[:SHOW_IN_FULL]]
            if len(rows) > SHOW_IN_FULL:
                lines.append(f"  ... {len(rows) - SHOW_IN_FULL} more")
            return lines
    if is_boxes(name, arr) and 0 < arr.size <= SHOW_IN_FULL * 8:  # (more: padded, summarised below)
        one = all(d == 1 for d in arr.shape[:-3])  # (one request: number the boxes alone)
        where = [str(i[-1]) if one else str(list(i)) for i in np.ndindex(*arr.shape[:-2])]
        return [head] + [f"  box {w}: " + " ".join(f"({x:.0f}, {y:.0f})" for x, y in box.tolist())
                         for w, box in zip(where, arr.reshape(-1, 4, 2))]
    if arr.size <= SHOW_IN_FULL:
        values = np.array2string(arr, separator=", ", threshold=SHOW_IN_FULL + 1, max_line_width=max(width - 4, 40))
        return [f"{head} {values}" if "\n" not in values else head] + \
            ([f"  {line}" for line in values.splitlines()] if "\n" in values else [])
    s = summarise(arr)
    lines = [f"{head} min {_fmt(s['min'])} max {_fmt(s['max'])} mean {_fmt(s['mean'])}"]
    if "top" in s:
        where = "" if arr.ndim == 1 else " of row " + "[" + ", ".join("0" for _ in arr.shape[:-1]) + "]"
        lines.append(f"  top {len(s['top'])}{where}: " + ", ".join(f"{i} ({_fmt(v)})" for i, v in s["top"]))
    return lines


def output_json(name: str, arr: np.ndarray) -> dict[str, Any]:
    """One output in ``-o json``: dtype, shape and its values (up to JSON_IN_FULL elements),
    else its summary; a text output's strings as ``text``."""
    out: dict[str, Any] = {"dtype": arr.dtype.name, "shape": list(arr.shape)}
    if is_text(name, arr):
        try:
            out["text"] = decode_text(arr)
            return out
        except ValueError:
            pass
    if arr.size <= JSON_IN_FULL:
        out["values"] = arr.tolist()
    else:
        out["summary"] = summarise(arr)
    return out


def contract_spec(specs: Sequence[TensorSpec], name: str) -> TensorSpec | None:
    return next((s for s in specs if s.name == name), None)


def name_inputs(given: Sequence[tuple[str, Any]], specs: Sequence[TensorSpec], model: str) -> dict[str, Any]:
    """The inputs by name: the unnamed ones take the contract's inputs, in its order, that
    no input names."""
    named = {n for n, _ in given if n}
    free = [s.name for s in specs if s.name not in named]
    unnamed = sum(1 for n, _ in given if not n)
    if unnamed > len(free):
        takes = ", ".join(f"{s.name!r} {s.describe()}" for s in specs) or "none"
        raise InputError(f"{unnamed} unnamed input(s), but {model} has {len(free)} input(s) left to fill: it takes "
                         f"{takes}; give each --input as NAME=FILE")
    out: dict[str, Any] = {}
    it = iter(free)
    for n, arr in given:
        key = n or next(it)
        if key in out:
            raise InputError(f"input {key!r} is given twice")
        out[key] = arr
    return out
