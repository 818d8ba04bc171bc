"""The scheduler's channel."""

from __future__ import annotations

import msgspec

from ._messages import Tensor

__all__ = ["Infer", "GetSchedule", "MapRegion", "UnmapRegion", "RegionMapped", "RegionUnmapped", "OpenStream",
           "CloseStream", "Request", "InferResult", "StageTime",
           "StreamOpened", "StreamClosed", "ModelQueue", "DriverState", "Schedule", "Reply",
           "Degradation", "Detection", "PipelineResult", "Alert", "StreamResult", "StreamReset", "STREAM_EVENTS"]

#: the topic every stream's resets and expiries are published on (also on its own topic, if any)
STREAM_EVENTS = "scheduler.streams"


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
    #: a stream opened with OpenStream: ``tensors`` are this chunk's inputs alone; the
    #: stream's state and parameters are the scheduler's (``model`` is the stream's)
    stream: str = ""
    #: write the outputs into this shared-memory region of the sender's (mapped with
    #: MapRegion), from byte ``out_offset``; the result's tensors then name it (those that do
    #: not fit come as frames)
    out_region: str = ""
    out_offset: int = 0


class MapRegion(msgspec.Struct, tag=True):
    """Map the sender's shared-memory region ``/dev/shm/<name>`` of ``size`` bytes for its
    tensors (``Tensor.region``; ``protocols.shm``).  Bounded per sender (regions, bytes)."""

    name: str
    size: int


class UnmapRegion(msgspec.Struct, tag=True):
    name: str


class RegionMapped(msgspec.Struct, tag=True):
    name: str
    size: int
    #: regions (and bytes) the sender has mapped now, and at most
    regions: int
    max_regions: int
    max_bytes: int


class RegionUnmapped(msgspec.Struct, tag=True):
    name: str


class GetSchedule(msgspec.Struct, tag=True):
    pass


class OpenStream(msgspec.Struct, tag=True, omit_defaults=True):
    """Open a stateful stream of ``model`` (one whose manifest declares ``states``): the
    scheduler keeps each state tensor between chunks, starting from its initial value.
    ``tensors`` (raw frames) are the stream's parameters: the model's inputs without a
    batch axis that are not state (a sample rate), fixed for the stream's life."""

    model: str
    tensors: list[Tensor] = []
    version: str = ""
    key: str = ""
    #: also publish each chunk's result (StreamResult) here, e.g. "results.vad.mic-1"
    topic: str = ""
    #: the outputs each chunk sends back (and publishes), by name; empty: all but the states
    outputs: list[str] = []
    #: seconds without a chunk after which the stream is closed (0: the scheduler's setting)
    idle_s: float = 0.0


class CloseStream(msgspec.Struct, tag=True):
    stream: str


Request = Infer | GetSchedule | OpenStream | CloseStream | MapRegion | UnmapRegion


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
    #: a stream's chunk: its number (from 1), and why its state was reset before it ("": it
    #: was not; e.g. "driver accel-0 stopped")
    seq: int = 0
    reset: str = ""
    #: a pipeline: each stage's time, in the order they finished
    stages: list["StageTime"] = []


class StageTime(msgspec.Struct, omit_defaults=True):
    """One stage of a pipeline run: its name, its model (or op), the items it ran on (a
    fan-out stage: one per item) and its time."""

    stage: str
    model: str = ""
    items: int = 1
    ms: float = 0.0


class StreamOpened(msgspec.Struct, tag=True, omit_defaults=True):
    stream: str
    model: str
    version: str
    #: the driver that holds it (chunks of one stream run there, in order)
    driver: str = ""
    #: what each chunk carries: the model's inputs that are neither state nor parameters
    inputs: list[str] = []
    idle_s: float = 0.0


class StreamClosed(msgspec.Struct, tag=True, omit_defaults=True):
    """The answer to CloseStream, and an event when a stream expires (reason "idle")."""

    stream: str
    chunks: int = 0
    reason: str = ""


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
    #: its runs go to no driver: the scheduler runs it in its own process (its inline lane)
    inline: bool = False


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


Reply = InferResult | Schedule | StreamOpened | StreamClosed | RegionMapped | RegionUnmapped


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


class PipelineResult(msgspec.Struct, tag=True, omit_defaults=True, kw_only=True):
    """A sensor pipeline's outputs (``publish = "outputs"``), on its result topic: one per
    frame run, the model's or graph's outputs as raw frames (as in InferResult) and, ahead of
    them, the strings of its text outputs (uint32 code points, zero-padded: an OCR graph's
    ``text``) decoded, one per row or item, empty ones left out."""

    source: str
    model: str
    #: the model's version, or a graph's models' ("det=1.0.0 rec=1.0.0")
    version: str
    seq: int
    text: list[str] = []
    outputs: list[Tensor]
    level: int = 0


class Alert(msgspec.Struct, tag=True, omit_defaults=True):
    """On alerts.<...> when a pipeline's alert state changes."""

    model: str
    source: str
    state: str  # raised | cleared
    score: float
    seq: int = 0


class StreamResult(msgspec.Struct, tag=True, omit_defaults=True):
    """A stream's chunk result, on the stream's topic (raw frames as in InferResult)."""

    stream: str
    model: str
    version: str
    seq: int
    outputs: list[Tensor]
    reset: str = ""


class StreamReset(msgspec.Struct, tag=True, omit_defaults=True):
    """A stream's state went back to its initial value (on STREAM_EVENTS and its topic); the
    stream goes on, the next chunk's result says so too (InferResult.reset)."""

    stream: str
    model: str
    reason: str
    #: chunks it had run before
    seq: int = 0
