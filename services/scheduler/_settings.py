"""The scheduler's settings: the config's ``[services.scheduler.settings]`` table.

    [services.scheduler.settings]
    max_batch = 16
    drivers = [{ name = "accel-cpu", health = "health" }]

    [services.scheduler.settings.models.text-detector]
    batching = "off"

    [[services.scheduler.settings.pipelines]]
    source = "sensor.vibration"
    model = "vibration-anomaly"
    rate = 2

    [services.scheduler.settings.graphs.ocr]      # Infer(model="ocr") runs the whole graph
    ...

A graph's tables (``graphs.NAME``: inputs, outputs, stages) are shown in full, an OCR chain,
at the top of ``services/scheduler/_graphs.py``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from services import Settings

__all__ = ["SchedulerSettings", "DriverSettings", "PipelineSettings", "ModelSettings", "GraphSettings",
           "StageSettings"]

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class DriverSettings(Settings):
    """An accelerator driver the scheduler places batches on."""

    #: its service name (a `[services.<name>]` running drivers.accel)
    name: str
    #: the health driver whose readings (`health.<health>`) are this driver's temperature:
    #: the one that watches the same chip or board
    health: str = "health"


class PipelineSettings(Settings):
    """A sensor pipeline: frames from ``source`` through ``model``, with hysteresis."""

    #: the sensor's topic, e.g. "sensor.vibration"
    source: str
    model: str
    #: at most this many frames per second go to the model; the rest are skipped
    rate: Positive = 1.0
    #: where detections are published (default `results.<model>`)
    result: str = ""
    #: where alert changes are published (default `alerts.<model>`)
    alerts: str = ""
    #: the score that raises the alert, and the one that clears it
    on: float = 0.7
    off: float = 0.4
    #: seconds one frame may take through the model
    timeout: Positive = 2.0
    #: feed the frames as the chunks of one stream of the model (a recurrent one, whose
    #: manifest declares states), e.g. a microphone through a voice-activity model; give a
    #: rate at least the sensor's frame rate, or chunks are skipped
    stream: bool = False
    #: the stream's parameters (the model's inputs without a batch axis), e.g. { sr = 16000 }
    parameters: dict[str, float] = {}
    #: what each frame publishes: "score", a Detection of the first output's first value (and
    #: alerts); "outputs", a PipelineResult of the model's or graph's outputs, its text ones
    #: decoded (an OCR graph's text: what a person reads on results.*), no alerts
    publish: Literal["score", "outputs"] = "score"

    def __post_init__(self) -> None:
        if self.off > self.on:
            raise ValueError(f"off ({self.off:g}) must not exceed on ({self.on:g}): the alert clears below it")


Batching = Literal["auto", "on", "off"]
#: where a model runs: "auto" in the scheduler's own process once measured to take at most
#: inline_max_ms on a CPU driver (see _inline), "on" there always, "off" on the drivers only
Inline = Literal["auto", "on", "off"]


class ModelSettings(Settings):
    """One model's batching and lane, over the scheduler's defaults (``[services.scheduler.settings.models.NAME]``)."""

    #: "auto": batch while it costs less per row than a run of one, measured on this device;
    #: "on": always up to max_batch; "off": one request per run
    batching: Batching | None = None
    max_batch: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_delay_ms: NonNegative | None = None
    #: run it in the scheduler's own process (inline lane): "auto", "on", "off"
    inline: Inline | None = None


class StageSettings(Settings):
    """One stage of a graph: a model (through the scheduler's queues and batches) or an op (in
    the scheduler).  Its ``inputs`` map each of the stage's inputs to a graph tensor: a graph
    input (``"image"``) or a stage's output (``"det.db_boxes.boxes"``: stage, then the output's
    name).  See ``_graphs`` for the whole format."""

    name: str
    #: an installed model (its inputs are the model's)...
    model: str = ""
    #: ... or an op of the scheduler's (``_graphs.GRAPH_OPS``: "crop"), with its ``params``
    op: str = ""
    inputs: dict[str, str] = {}
    params: dict[str, Any] = {}
    #: run once per item of this tensor (a padded [N, K, ...] tensor: each row's first
    #: ``counts[n]`` of K; or items already): all of a request's items as one batch
    for_each: str = ""
    #: the items per row of ``for_each`` (int [N]); default: its sibling ``<...>.counts`` when
    #: the stage that gives it has one (db_boxes.boxes -> db_boxes.counts), else all K
    counts: str = ""
    #: a model's version to run ("": the active one, or the A/B split's pick)
    version: str = ""


class GraphSettings(Settings):
    """A pipeline: ``Infer(model=<its name>)`` runs its stages, in dependency order, and answers
    with ``outputs`` (graph tensors by the names the client gets them under)."""

    inputs: Annotated[list[str], msgspec.Meta(min_length=1)]
    outputs: Annotated[dict[str, str], msgspec.Meta(min_length=1)]
    stages: Annotated[list[StageSettings], msgspec.Meta(min_length=1)]


def _default_drivers() -> list[DriverSettings]:
    return [DriverSettings(name="accel-cpu")]


class SchedulerSettings(Settings):
    #: every model's batching unless ``models`` says otherwise: "auto" measures per model
    #: whether batches cost less per row than runs of one (and batches only then), "on"
    #: batches up to max_batch, "off" runs one request at a time
    batching: Batching = "auto"
    #: requests per batch at most
    max_batch: Annotated[int, msgspec.Meta(ge=1)] = 16
    #: how long a batch waits for more requests once its first is there (0: not at all)
    max_delay_ms: NonNegative = 0.0
    #: requests queued per model before new ones are answered `overloaded`
    max_queue: Annotated[int, msgspec.Meta(ge=1)] = 256
    #: deadline (s) of a request whose caller gave none
    default_timeout: Positive = 10.0
    #: a driver at or above hot_c is avoided, and when every driver is, the ladder steps down;
    #: it climbs back when they are at or below cool_c
    hot_c: float = 80.0
    cool_c: float = 70.0
    #: requests queued in all (0: three quarters of max_queue) that step the ladder down
    overload_depth: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: seconds between two steps of the degradation ladder
    step_s: Positive = 1.0
    #: seconds between serving-health reports to the model store (its trial gates)
    health_report_s: Positive = 5.0
    #: models of microseconds run in the scheduler's own process, sparing the two bus hops to
    #: a driver and back: "auto" once a model's run of one measured at most inline_max_ms on
    #: CPU drivers, "on" every model (on the CPU), "off" none (see services/scheduler/_inline.py)
    inline: Inline = "auto"
    inline_max_ms: NonNegative = 0.5
    #: shared-memory regions (protocols.shm) a client may map at once, and their bytes in all
    max_regions: Annotated[int, msgspec.Meta(ge=0)] = 8
    max_region_mb: NonNegative = 256.0
    #: at least one; a batch goes to one of them
    drivers: Annotated[list[DriverSettings], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=_default_drivers)
    pipelines: list[PipelineSettings] = []
    #: per model (by name): its batching, over the defaults above
    models: dict[str, ModelSettings] = {}
    #: streams open at once (OpenStream beyond: `overloaded`), and the seconds without a chunk
    #: after which a stream is closed (unless it asked for its own)
    max_streams: Annotated[int, msgspec.Meta(ge=1)] = 1024
    stream_idle_s: Positive = 60.0
    #: pipelines by name (``Infer(model=NAME)`` runs one): stages of models and ops, checked
    #: here (names, references, cycles) and against the models' contracts when first run
    graphs: dict[str, GraphSettings] = {}

    def batching_of(self, model: str) -> tuple[Batching, int, float]:
        """``model``'s batching mode, max batch and max delay (seconds)."""
        own = self.models.get(model) or ModelSettings()
        return (own.batching or self.batching, own.max_batch or self.max_batch,
                (self.max_delay_ms if own.max_delay_ms is None else own.max_delay_ms) / 1000)

    def inline_of(self, model: str) -> Inline:
        """``model``'s inline mode."""
        own = self.models.get(model)
        return (own.inline if own is not None else None) or self.inline

    def __post_init__(self) -> None:
        if self.cool_c > self.hot_c:
            raise ValueError(f"cool_c ({self.cool_c:g}) must not exceed hot_c ({self.hot_c:g})")
        names = [d.name for d in self.drivers]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"drivers names {', '.join(twice)} more than once")
        if self.graphs:
            from ._graphs import check_graph  # (it imports these settings)

            for name, graph in self.graphs.items():
                check_graph(name, graph)

    @property
    def overload_at(self) -> int:
        """The queue depth that counts as overload."""
        return self.overload_depth or self.max_queue * 3 // 4
