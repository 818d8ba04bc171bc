"""The scheduler's channel."""

from __future__ import annotations

import msgspec

from ._messages import Tensor

__all__ = ["Infer", "GetSchedule", "Request", "InferResult", "ModelQueue", "DriverState", "Schedule", "Reply",
           "Degradation", "Detection", "Alert"]


class Infer(msgspec.Struct, tag=True, omit_defaults=True):
    """Run ``model`` on the tensors (raw frames).  The deadline is the header's."""

    model: str
    tensors: list[Tensor]
    #: empty: the active version, or the A/B split's pick for ``key``
    version: str = ""
    #: 0 high, 1 normal, 2 low
    priority: int = 1
    #: sticky A/B assignment key (a device, a user, a session...)
    key: str = ""
    #: the model's variant to run ("int8", "small"...); empty: the degradation ladder's
    variant: str = ""
    #: the outputs to send back, by name; empty: all of them
    outputs: list[str] = []


class GetSchedule(msgspec.Struct, tag=True):
    pass


Request = Infer | GetSchedule


class InferResult(msgspec.Struct, tag=True, omit_defaults=True):
    model: str
    version: str
    #: full | small | int8 | fallback
    variant: str
    outputs: list[Tensor]
    #: degradation level it ran at: 0 full, 1 smaller variant, 2 rule-based fallback
    level: int = 0
    driver: str = ""
    batch: int = 1
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    total_ms: float = 0.0


class ModelQueue(msgspec.Struct, tag=True, omit_defaults=True):
    model: str
    depth: int
    served: int = 0
    expired: int = 0
    failed: int = 0
    #: computed, but its caller had given up by then (its deadline passed during compute)
    late: int = 0
    batches: int = 0
    mean_batch: float = 0.0
    #: its batching policy and what it measured, e.g. "auto: up to 16 (per row alone 0.210 ms, batched 0.051 ms)"
    batching: str = ""


class DriverState(msgspec.Struct, tag=True, omit_defaults=True):
    name: str
    in_flight: int = 0
    up: bool = True
    batches: int = 0
    temperature_c: float | None = None


class Schedule(msgspec.Struct, tag=True, omit_defaults=True):
    level: int
    pressure: str
    models: list[ModelQueue] = []
    drivers: list[DriverState] = []


Reply = InferResult | Schedule


class Degradation(msgspec.Struct, tag=True, omit_defaults=True):
    """On scheduler.degradation whenever the ladder moves."""

    level: int
    previous: int
    reason: str


class Detection(msgspec.Struct, tag=True, omit_defaults=True):
    """A sensor pipeline's result, on its result topic."""

    model: str
    version: str
    source: str
    seq: int
    score: float
    alert: bool
    level: int = 0


class Alert(msgspec.Struct, tag=True, omit_defaults=True):
    """On alerts.<...> when a pipeline's alert state changes."""

    model: str
    source: str
    state: str  # raised | cleared
    score: float
    seq: int = 0
