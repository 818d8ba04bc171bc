"""Sensor pipelines: frames from a sensor topic, at most ``rate`` per second, through a
model; each score is a detection, and the alert follows it with hysteresis (raised at
``on`` or above, cleared at ``off`` or below).  A stream pipeline (``stream = true``) feeds
each frame as the next chunk of one stream of a recurrent model (a microphone through a
voice-activity model), its parameters from ``parameters``.  A pipeline with ``publish =
"outputs"`` publishes each frame's outputs instead (``PipelineResult``: its text decoded),
e.g. a camera through an OCR graph."""

from __future__ import annotations

import math
from typing import Any

import anyio

from protocols import Tensor, unpack_tensor
from protocols.scheduler import InferResult, PipelineResult

from ._settings import PipelineSettings

__all__ = ["Pipeline"]


class Pipeline:
    def __init__(self, settings: PipelineSettings) -> None:
        self.settings = settings
        self.source = settings.source
        self.model = settings.model
        self.result_topic = settings.result or f"results.{settings.model}"
        self.alerts_topic = settings.alerts or f"alerts.{settings.model}"
        self.alert = False
        self._last = -math.inf
        #: a stream pipeline's stream (a _streams.Stream), opened at its first frame
        self.stream: Any = None
        self.opening = anyio.Lock()
        #: why its model is not there, said once (info) until a frame runs again
        self.missing = ""

    def admit(self, now: float) -> bool:
        """Whether a frame arriving at ``now`` (monotonic seconds) goes to the model, or is
        skipped as over the pipeline's rate."""
        if now - self._last < 1.0 / self.settings.rate:
            return False
        self._last = now
        return True

    def score(self, value: float) -> bool | None:
        """Feed one score; the new alert state when it changes, else None."""
        if not self.alert and value >= self.settings.on:
            self.alert = True
            return True
        if self.alert and value <= self.settings.off:
            self.alert = False
            return False
        return None

    def outputs(self, seq: int, result: InferResult, frames: list[Any]) -> PipelineResult:
        """The event of a frame's outputs (``publish = "outputs"``), sent with ``frames``."""
        return PipelineResult(source=self.source, model=self.model, version=result.version, seq=seq,
                              text=decoded_text(result.outputs, frames), outputs=result.outputs,
                              level=result.level)


def decoded_text(descs: list[Tensor], frames: list[Any]) -> list[str]:
    """The strings of the text outputs (uint32 code points ``[..., L]``, zero-padded), one
    per row or item, the empty ones left out."""
    from drivers.ops import texts

    found: list[str] = []
    for desc in descs:
        if desc.dtype == "uint32" and desc.shape and all(desc.shape):  # (no items: nothing read)
            codes = unpack_tensor(desc, frames)
            found += [t for t in texts(codes.reshape(-1, desc.shape[-1])) if t]
    return found
