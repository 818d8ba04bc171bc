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

from protocols.scheduler import InferResult
from services import BadMessage, DeadlineExceeded, Overloaded, RemoteError

from ._contract import Plan

__all__ = ["Job", "ModelQueue", "check_priority"]

_seq = itertools.count()


class Job:
    """One request waiting for its batch; ``set_done()`` once ``result`` or ``error`` is
    there, which ``wait_done()`` waits for."""

    __slots__ = ("model", "version", "inputs", "priority", "deadline", "seq", "done", "_done", "result", "error",
                 "enqueued", "cancelled", "outputs", "plan", "variant", "rows", "pin", "want", "owner", "out")

    def __init__(self, model: str, version: str, inputs: dict[str, np.ndarray], priority: int, deadline: float,
                 plan: Plan, variant: str = "") -> None:
        self.model, self.version, self.inputs, self.plan = model, version, inputs, plan
        #: the variant the caller asked for ("": the ladder's)
        self.variant = variant
        #: its rows of the batch (along each input's batch axis)
        self.rows = plan.rows(inputs)
        #: the driver it must run on (a stream's), or None: any
        self.pin: str | None = None
        #: the outputs its caller wants (None: all); the batch brings back the union of its jobs'
        self.want: frozenset[str] | None = None
        #: its caller (whose shared-memory regions its tensors may name), and the region and
        #: offset its outputs go to (None: frames)
        self.owner = ""
        self.out: tuple[str, int] | None = None
        #: deadline: wall-clock seconds (the bus header's), 0 for none
        self.priority, self.deadline, self.seq = priority, deadline, next(_seq)
        self.done = False
        #: made by the first wait_done() before done: a job taken to a driver by its own
        #: caller (the idle path) is never waited for, and an Event costs microseconds
        self._done: anyio.Event | None = None
        self.result: InferResult | None = None
        self.error: RemoteError | None = None
        self.enqueued = time.monotonic()
        #: its caller stopped waiting (cancelled at the deadline): skipped when its turn comes
        self.cancelled = False
        #: its part of the batch's outputs, by name
        self.outputs: dict[str, np.ndarray] = {}

    def key(self) -> tuple[int, float, int]:
        return (self.priority, self.deadline or math.inf, self.seq)

    def set_done(self) -> None:
        self.done = True
        if self._done is not None:
            self._done.set()

    async def wait_done(self) -> None:
        if not self.done:
            if self._done is None:
                self._done = anyio.Event()
            await self._done.wait()

    def fail(self, error: RemoteError) -> None:
        self.error = error
        self.set_done()


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


def check_priority(priority: int) -> None:
    if not 0 <= priority <= 2:
        raise BadMessage(f"priority {priority} is not 0 (high), 1 (normal) or 2 (low)")
