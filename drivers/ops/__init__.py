"""Pre- and post-processing ops: numba kernels that a model's manifest names, run around the
ONNX Runtime call in the accelerator driver.

``OPS`` maps each name a manifest may use to its ``Op``: its parameters, what it takes and
gives (dtypes, layout, a shape rule).  A manifest's ops form chains around the model
(PROTOCOL.md 11.2): ``check_chains(manifest)`` walks pre -> model -> post without running
anything and gives the ``Contract`` (the tensors a client sends and can receive) or raises
ChainError naming the op that cannot run; ``build_chains(manifest, assets)`` gives the
``Chains`` a driver runs on its batches (``chains.pre(inputs)``, ``chains.post(outputs)``).
The layouts are a camera's and a model's: images uint8 NHWC in, float32 NCHW out; a signal
``[samples]`` or a batch ``[N, samples]``; scores ``[N, ...]``.  The demo vibration model's
manifest, for instance::

    pre:  signal.frame {length: 2048}
          signal.vibration_features {rate: 12800, bands: [[0, 500], [500, 1500], [1500, 4000], [4000, 6400]]}
    post: post.threshold_hysteresis {on: 0.7, off: 0.4}

takes float32 signals ``[N, samples]`` under the model input's name ``features`` and gives the
model's ``anomaly`` and ``threshold_hysteresis`` (bool ``[N, 1]``).

``pipeline(steps)`` is the older form, one list of ``(name, params)`` as a function of one
array (the scheduler's fallback rule uses it): an op whose result is empty raises
OpInputError naming it, the shape it was given and what it takes, and ``Pipeline.rows``
holds a batch to one row out per row in.

Importing this package imports neither numba nor numpy: the declarations and the checks are
pure Python (the model store and the scheduler check contracts), and each kernel's module is
imported the first time an op of it runs (or when one of its functions, e.g.
``drivers.ops.resize``, or its family, ``drivers.ops.image``, is asked for).  Each kernel is
compiled on first use and cached next to its module (numba ``cache=True``); a driver calls its
ops once on a dummy input before serving to take that cost then.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterable, Mapping

from ._catalog import OPS, vocabulary
from ._chain import Chain, ChainError, Chains, Contract, Step, build_chains, check_chains, texts
from ._exceptions import OpInputError, OpParamsError, OpsError, PipelineError, UnknownOp
from ._registry import Op, Pipeline, TensorType, bands, boolean, choice, integer, number, numbers, resource
from ._runner import ModelRunner, RunFailed, RunInputError, fetch_model

__all__ = [
    "image", "post", "signal", "audio", "detect", "text",
    "OPS", "Op", "Pipeline", "pipeline", "run_pipeline", "TensorType",
    "check_chains", "build_chains", "Contract", "Chains", "Chain", "Step", "texts", "vocabulary",
    "ModelRunner", "RunInputError", "RunFailed", "fetch_model",
    "OpsError", "UnknownOp", "OpParamsError", "PipelineError", "OpInputError", "ChainError",
    "resize", "letterbox", "letterbox_geometry", "normalize", "to_model", "bgr_to_rgb", "rgb_to_gray", "bgr_to_gray",
    "frame", "rms", "kurtosis", "crest_factor", "band_energies", "vibration_features",
    "softmax", "topk", "argmax", "threshold_hysteresis", "nms", "dequantize_int8",
]

#: each op family's module, with its numpy references (imported on first use: numba loads)
_FAMILIES = {"image": "_image", "post": "_post", "signal": "_signal", "audio": "_audio", "detect": "_detect",
             "text": "_text"}
#: the kernels' functions, by the module that defines them
_KERNELS = {
    "_image": ("resize", "letterbox", "letterbox_geometry", "normalize", "to_model", "bgr_to_rgb", "rgb_to_gray",
               "bgr_to_gray"),
    "_signal": ("frame", "rms", "kurtosis", "crest_factor", "band_energies", "vibration_features"),
    "_post": ("softmax", "topk", "argmax", "threshold_hysteresis", "nms", "dequantize_int8"),
}
_WHERE = {name: module for module, names in _KERNELS.items() for name in names}


def __getattr__(name: str) -> Any:
    """The kernels' modules and functions, imported when first asked for."""
    module = _FAMILIES.get(name) or _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = importlib.import_module(f"{__name__}.{module}")
    if name in _WHERE:
        value = getattr(value, name)
    globals()[name] = value
    return value


def pipeline(steps: Iterable[tuple[str, Mapping[str, Any]]]) -> Pipeline:
    """The ops ``steps`` names, parameters checked, as one function of the input array.

    Raises UnknownOp, OpParamsError or PipelineError for a manifest that cannot run."""
    return Pipeline(OPS, steps)


def run_pipeline(steps: Iterable[tuple[str, Mapping[str, Any]]], x: Any) -> Any:
    """Apply the ops ``steps`` names to ``x`` in order (``pipeline(steps)(x)``)."""
    return Pipeline(OPS, steps)(x)
