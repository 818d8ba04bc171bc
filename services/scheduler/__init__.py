"""The scheduler (``python -m services.scheduler``): queues, priorities, deadlines, dynamic
batching, placement across accelerator drivers, graceful degradation, sensor pipelines.

Modules by job: ``_queueing`` (admission, priority/EDF queues, deadlines), ``_batching``,
``_placement`` (driver choice by load and temperature, failover), ``_ladder`` (the
degradation ladder and the manifest's fallback rule), ``_pipelines`` (sensor pipelines),
``_settings`` (``SchedulerSettings``), ``_service`` (the Service that wires them)."""

from protocols.scheduler import Alert, Degradation, Detection, GetSchedule, Infer, InferResult, Schedule

from ._service import Scheduler
from ._settings import DriverSettings, PipelineSettings, SchedulerSettings

__all__ = ["Alert", "Degradation", "Detection", "GetSchedule", "Infer", "InferResult", "Schedule", "Scheduler",
           "SchedulerSettings", "DriverSettings", "PipelineSettings"]
