"""Queueing: admission, per-model priority queues (earliest deadline first within a
priority), and deadlines.

* A request is admitted when its inputs fit the model's manifest and its queue has room
  (``max_queue``; ``overloaded`` otherwise).
* Priority 0 leaves first; within a priority the earliest deadline, then arrival order.
* A job whose deadline passes before its batch could finish (the queue's moving average of
  a batch's time at the driver) is answered ``timeout`` from the queue and never computed.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from typing import Iterator

import anyio
import numpy as np

from protocols.modelstore import Manifest
from protocols.scheduler import InferResult
from services import BadMessage, DeadlineExceeded, Overloaded, RemoteError

__all__ = ["Job", "ModelQueue", "check_inputs", "check_priority"]

_seq = itertools.count()


class Job:
    """One request waiting for its batch; ``done`` is set with ``result`` or ``error``."""

    __slots__ = ("model", "version", "arrays", "priority", "deadline", "seq", "done", "result", "error",
                 "enqueued", "cancelled", "outputs")

    def __init__(self, model: str, version: str, arrays: list[np.ndarray], priority: int, deadline: float) -> None:
        self.model, self.version, self.arrays = model, version, arrays
        #: deadline: wall-clock seconds (the bus header's), 0 for none
        self.priority, self.deadline, self.seq = priority, deadline, next(_seq)
        self.done = anyio.Event()
        self.result: InferResult | None = None
        self.error: RemoteError | None = None
        self.enqueued = time.monotonic()
        #: its caller stopped waiting (cancelled at the deadline): skipped when its turn comes
        self.cancelled = False
        self.outputs: list[np.ndarray] = []

    def key(self) -> tuple[int, float, int]:
        return (self.priority, self.deadline or math.inf, self.seq)

    def fail(self, error: RemoteError) -> None:
        self.error = error
        self.done.set()


class ModelQueue:
    """The queue of one model, with its counters (what ``GetSchedule`` reports)."""

    def __init__(self, model: str, max_queue: int) -> None:
        self.model = model
        self.max_queue = max_queue
        self._heap: list[tuple[tuple[int, float, int], Job]] = []
        self._ready = anyio.Event()
        self.served = self.expired = self.failed = self.batches = self.batched = self.late = 0
        #: moving average of a batch's time at the driver: a job that cannot finish before
        #: its deadline is expired instead of being computed late
        self.batch_seconds = 0.0

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Job]:
        """The jobs in the order they leave."""
        return iter(job for _, job in sorted(self._heap))

    def admit(self, job: Job) -> None:
        """Queue ``job``, or raise Overloaded when the queue is full."""
        if len(self._heap) >= self.max_queue:
            raise Overloaded(f"{self.model} has {len(self._heap)} requests queued (the scheduler's max_queue "
                             "setting); retry later or raise it")
        heapq.heappush(self._heap, (job.key(), job))
        self._ready.set()

    def head(self) -> Job | None:
        return self._heap[0][1] if self._heap else None

    def pop(self) -> Job:
        return heapq.heappop(self._heap)[1]

    async def wait(self) -> None:
        """Until a job is queued."""
        while not self._heap:
            self._ready = anyio.Event()
            await self._ready.wait()

    def expire(self, job: Job, now: float) -> bool:
        """True (and the job answered) when ``job`` must not be run: its caller gave up, or
        its deadline passes before a batch could finish (``now``: wall-clock seconds)."""
        if job.cancelled:
            self.expired += 1
            return True
        if job.deadline and job.deadline <= now + self.batch_seconds:
            self.expired += 1
            job.fail(DeadlineExceeded(f"{job.model}: the deadline passes before it could be computed; not run"))
            return True
        return False

    def pop_live(self, now: float) -> Job | None:
        """The next job that may still run (expiring the others on the way), or None."""
        while self._heap:
            job = self.pop()
            if not self.expire(job, now):
                return job
        return None

    def batch_took(self, seconds: float) -> None:
        self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * seconds


#: dtype -> its name (numpy computes ``dtype.name`` in Python on every access)
_dtype_names: dict[np.dtype, str] = {}


def _dtype_name(dtype: np.dtype) -> str:
    name = _dtype_names.get(dtype)
    if name is None:
        name = _dtype_names[dtype] = dtype.name
    return name


def all_finite(a: np.ndarray) -> bool:
    """No NaN and no infinity in ``a``, without the temporary ``np.isfinite(a)`` would
    allocate (a pass of min and max: NaN propagates through both, and an infinity is one of
    them)."""
    if not a.size:
        return True
    return bool(np.isfinite(a.min()) and np.isfinite(a.max()))


def check_priority(priority: int) -> None:
    if not 0 <= priority <= 2:
        raise BadMessage(f"priority {priority} is not 0 (high), 1 (normal) or 2 (low)")


def check_inputs(model: str, manifest: Manifest, arrays: list[np.ndarray]) -> None:
    """Refuse (BadMessage) inputs that do not fit the manifest, before they are queued."""
    if not arrays:
        raise BadMessage(f"{model}: no input tensor")
    for a in arrays:
        if a.ndim == 0 or len(a) == 0:
            raise BadMessage(f"{model}: inputs are batches: axis 0 is the batch, got shape {list(a.shape)}")
        if len(a) != len(arrays[0]):
            raise BadMessage(f"{model}: inputs disagree on the batch size")
        if a.dtype.kind == "f" and not all_finite(a):
            raise BadMessage(f"{model}: input contains NaN or infinity")
    if manifest.pre:
        if arrays[0].dtype != np.float32:
            raise BadMessage(f"{model}: its pre ops take float32 frames, got {arrays[0].dtype}")
        return
    if len(arrays) != len(manifest.inputs):
        raise BadMessage(f"{model} takes {len(manifest.inputs)} input(s), got {len(arrays)}")
    for a, spec in zip(arrays, manifest.inputs):
        if _dtype_name(a.dtype) != spec.dtype:
            raise BadMessage(f"{model}: input {spec.name!r} is {spec.dtype}, got {a.dtype.name}")
        shape = spec.shape
        if len(a.shape) != len(shape) or any(d is not None and d != s for d, s in zip(shape, a.shape)):
            raise BadMessage(f"{model}: input {spec.name!r} has shape {shape}, got {list(a.shape)}")
