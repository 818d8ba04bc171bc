"""The scheduler (``python -m services.scheduler``): queues, priorities, deadlines, dynamic
batching, placement across accelerator drivers, graceful degradation, sensor pipelines."""

from protocols.scheduler import Alert, Degradation, Detection, GetSchedule, Infer, InferResult, Schedule
from ._scheduler import Scheduler

__all__ = ["Alert", "Degradation", "Detection", "GetSchedule", "Infer", "InferResult", "Schedule", "Scheduler"]
