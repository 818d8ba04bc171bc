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
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from services import Settings

__all__ = ["SchedulerSettings", "DriverSettings", "PipelineSettings", "ModelSettings"]

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

    def __post_init__(self) -> None:
        if self.off > self.on:
            raise ValueError(f"off ({self.off:g}) must not exceed on ({self.on:g}): the alert clears below it")


Batching = Literal["auto", "on", "off"]


class ModelSettings(Settings):
    """One model's batching, over the scheduler's defaults (``[services.scheduler.settings.models.NAME]``)."""

    #: "auto": batch while it costs less per row than a run of one, measured on this device;
    #: "on": always up to max_batch; "off": one request per run
    batching: Batching | None = None
    max_batch: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_delay_ms: NonNegative | None = None


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

    def batching_of(self, model: str) -> tuple[Batching, int, float]:
        """``model``'s batching mode, max batch and max delay (seconds)."""
        own = self.models.get(model) or ModelSettings()
        return (own.batching or self.batching, own.max_batch or self.max_batch,
                (self.max_delay_ms if own.max_delay_ms is None else own.max_delay_ms) / 1000)

    def __post_init__(self) -> None:
        if self.cool_c > self.hot_c:
            raise ValueError(f"cool_c ({self.cool_c:g}) must not exceed hot_c ({self.hot_c:g})")
        names = [d.name for d in self.drivers]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"drivers names {', '.join(twice)} more than once")

    @property
    def overload_at(self) -> int:
        """The queue depth that counts as overload."""
        return self.overload_depth or self.max_queue * 3 // 4
