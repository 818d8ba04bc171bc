"""Pre- and post-processing ops: numba kernels that a model's manifest names, run around the
ONNX Runtime call in the accelerator driver.

``OPS`` maps each name a manifest may use to its ``Op``; ``pipeline(manifest.pre)`` (a list
of ``(name, params)``) checks every name and parameter once and gives a function of the
input array, and ``run_pipeline`` does both in one call.  The ops work on batches as a
model takes them: images NHWC in, NCHW out; a signal ``[samples]`` or a batch of them
``[N, samples]`` framed into ``[frames, length]``; per-frame features ``[frames, 7]``;
scores ``[N, ...]``.  The demo vibration model's manifest, for instance::

    pre:  signal.frame {length: 2048}
          signal.vibration_features {rate: 12800, bands: [[0, 500], [500, 1500], [1500, 4000], [4000, 6400]]}
    post: post.threshold_hysteresis {on: 0.7, off: 0.4}

A pipeline never answers with nothing: an op whose result is empty raises OpInputError
naming it, the shape it was given and what it takes (``post.nms`` alone may keep no
detection), and ``Pipeline.rows`` holds a batch to one row out per row in, as the
scheduler's batches need.

Each kernel is compiled on first use and cached next to its module (numba ``cache=True``);
a driver calls its pipelines once on a dummy input before serving to take that cost then.
Importing this package imports numba: only the processes that run models should.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from . import _image, _post, _signal
from . import _image as image, _post as post, _signal as signal  # each family with its numpy references
from ._exceptions import OpInputError, OpParamsError, OpsError, PipelineError, UnknownOp
from ._image import (
    bgr_to_gray,
    bgr_to_rgb,
    letterbox,
    letterbox_geometry,
    normalize,
    resize,
    rgb_to_gray,
)
from ._post import argmax, dequantize_int8, nms, softmax, threshold_hysteresis, topk
from ._registry import Op, Pipeline, bands, boolean, choice, integer, number, numbers
from ._signal import band_energies, crest_factor, frame, kurtosis, rms, vibration_features

__all__ = [
    "image", "post", "signal",
    "OPS", "Op", "Pipeline", "pipeline", "run_pipeline",
    "OpsError", "UnknownOp", "OpParamsError", "PipelineError", "OpInputError",
    "resize", "letterbox", "letterbox_geometry", "normalize", "bgr_to_rgb", "rgb_to_gray", "bgr_to_gray",
    "frame", "rms", "kurtosis", "crest_factor", "band_energies", "vibration_features",
    "softmax", "topk", "argmax", "threshold_hysteresis", "nms", "dequantize_int8",
]

_size = {"height": integer(lo=1), "width": integer(lo=1)}
_windows = choice(*_signal.WINDOWS)


def _takes_frames(p: Mapping[str, Any]) -> str:
    length = p["length"]
    hop = p.get("hop", length)
    return (f"signals of at least {length} samples, [samples] or [N, samples] (one frame per signal: "
            f"{length} to {length + hop - 1} samples, e.g. [N, {length}])")


def _images(p: Mapping[str, Any]) -> str:
    return "uint8 images, HWC or NHWC"


def _signals(p: Mapping[str, Any]) -> str:
    return "real-valued frames [..., samples] of at least one sample"


#: Every op a manifest may name.
OPS: dict[str, Op] = {op.name: op for op in [
    Op("image.resize", _image.resize, required=_size, takes=_images),
    Op("image.letterbox", _image.letterbox_image, required=_size, optional={"pad": integer(0, 255)},
       takes=_images),
    Op("image.normalize", _image.normalize,
       optional={"mean": numbers(), "std": numbers(above=0), "scale": boolean}),
    Op("image.bgr_to_rgb", _image.bgr_to_rgb),
    Op("image.rgb_to_bgr", _image.bgr_to_rgb),
    Op("image.rgb_to_gray", _image.rgb_to_gray),
    Op("image.bgr_to_gray", _image.bgr_to_gray),
    Op("signal.frame", _signal.frame, required={"length": integer(lo=1)},
       optional={"hop": integer(lo=1), "window": _windows}, takes=_takes_frames),
    Op("signal.rms", _signal.rms, takes=_signals),
    Op("signal.kurtosis", _signal.kurtosis, takes=_signals),
    Op("signal.crest_factor", _signal.crest_factor, takes=_signals),
    Op("signal.band_energies", _signal.band_energies, required={"rate": number(above=0), "bands": bands},
       optional={"window": _windows}, takes=_signals),
    Op("signal.vibration_features", _signal.vibration_features, required={"rate": number(above=0), "bands": bands},
       takes=_signals),
    Op("post.softmax", _post.softmax),
    Op("post.topk", _post.topk, required={"k": integer(lo=1)}, last=True),
    Op("post.argmax", _post.argmax),
    Op("post.threshold_hysteresis", _post.threshold_hysteresis, required={"on": number(), "off": number()},
       optional={"start": boolean}, relate=lambda p: _post.check_hysteresis(p["on"], p["off"])),
    Op("post.nms", _post.nms_rows, required={"iou_threshold": number(0, 1)},
       optional={"score_threshold": number()}, may_be_empty=True),  # no detection kept: an answer
    Op("post.dequantize_int8", _post.dequantize_int8, required={"scale": number(above=0)},
       optional={"zero_point": integer(-128, 255)}),
]}


def pipeline(steps: Iterable[tuple[str, Mapping[str, Any]]]) -> Pipeline:
    """The ops ``steps`` names, parameters checked, as one function of the input array.

    Raises UnknownOp, OpParamsError or PipelineError for a manifest that cannot run."""
    return Pipeline(OPS, steps)


def run_pipeline(steps: Iterable[tuple[str, Mapping[str, Any]]], x: np.ndarray) -> Any:
    """Apply the ops ``steps`` names to ``x`` in order (``pipeline(steps)(x)``)."""
    return Pipeline(OPS, steps)(x)
