"""The scheduler (``python -m services.scheduler``): queues, priorities, deadlines, dynamic
batching, placement across accelerator drivers, graceful degradation, sensor pipelines.

Modules by job: ``_queueing`` (admission, priority/EDF queues, deadlines), ``_batching``,
``_placement`` (driver choice by load and temperature, failover), ``_ladder`` (the
degradation ladder and the manifest's fallback rule), ``_pipelines`` (sensor pipelines),
``_contract`` (a model's contract and batch axes), ``_tuning`` (batching per model),
``_streams`` (stateful streams), ``_streaming`` (serving them), ``_graphs`` (pipelines as graphs),
``_inline`` (models of microseconds run in the scheduler's own process),
``_settings`` (``SchedulerSettings``), ``_service`` (the Service that wires them)."""

from protocols.scheduler import (
    STREAM_EVENTS, Alert, CloseStream, Degradation, Detection, GetSchedule, Infer, InferResult, OpenStream,
    PipelineResult, Schedule, StageTime, StreamClosed, StreamOpened, StreamReset, StreamResult,
)

from ._inline import decide_inline
from ._service import Scheduler
from ._settings import DriverSettings, PipelineSettings, SchedulerSettings

__all__ = ["Alert", "Degradation", "Detection", "GetSchedule", "Infer", "InferResult", "Schedule", "Scheduler",
           "SchedulerSettings", "DriverSettings", "PipelineSettings", "OpenStream", "CloseStream", "StreamOpened",
           "StreamClosed", "StreamResult", "StreamReset", "StageTime", "PipelineResult", "STREAM_EVENTS",
           "decide_inline"]
