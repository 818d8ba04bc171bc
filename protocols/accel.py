"""The accelerator driver's channel."""

from __future__ import annotations

import msgspec

from ._messages import Tensor

__all__ = ["FEATURES", "Run", "Load", "Describe", "Request", "RunResult", "Loaded", "Device", "Reply"]


#: The name of the extra output a Run with ``features`` gives: the pre ops' output.
FEATURES = "edgebus.features"


class Run(msgspec.Struct, tag=True, omit_defaults=True):
    """Run a model on a batch: pre ops, session.run, post ops.  Inputs are raw frames
    described by ``inputs``, named as in the model's contract (what clients send: the
    model's inputs, in the form its pre chains take them); outputs come back named: the
    model's outputs, then what its post chains add."""

    model: str
    version: str
    inputs: list[Tensor]
    variant: str = "full"
    #: skip the manifest's pre/post ops (the caller already did them)
    raw: bool = False
    #: also return the pre ops' output (the model's input features) as the last output
    features: bool = False
    #: the outputs to send back, by name (the model's or its post chains'); empty: all
    outputs: list[str] = []
    #: the shared-memory regions the inputs name (``Tensor.region``), each with the inode of
    #: the file the scheduler mapped (a file created again under the name is refused)
    regions: dict[str, int] = {}
    #: write the outputs into this region (one of ``regions``) between these offsets; those
    #: that do not fit come as frames
    out_region: str = ""
    out_offset: int = 0
    out_end: int = 0


class Load(msgspec.Struct, tag=True, omit_defaults=True):
    """Fetch a model from the model store and create its session now (warm-up)."""

    model: str
    version: str
    variant: str = "full"


class Describe(msgspec.Struct, tag=True):
    pass


Request = Run | Load | Describe


class RunResult(msgspec.Struct, tag=True, omit_defaults=True):
    outputs: list[Tensor]
    compute_ms: float = 0.0
    pre_ms: float = 0.0
    post_ms: float = 0.0


class Loaded(msgspec.Struct, tag=True, omit_defaults=True):
    model: str
    version: str
    variant: str
    #: providers ONNX Runtime actually uses for this session
    providers: list[str] = []
    #: requested providers it fell back from (silent CPU fallback made visible)
    fell_back_from: list[str] = []
    load_ms: float = 0.0


class Device(msgspec.Struct, tag=True, omit_defaults=True):
    kind: str
    providers: list[str]
    threads: int
    memory_bytes: int = 0
    load: float = 0.0
    temperature_c: float | None = None
    sessions: list[str] = []


Reply = RunResult | Loaded | Device
