"""Dynamic batching: requests for the same model, version and priority whose inputs stack
into one tensor (same shape past the batch axis) share a batch of up to ``max_batch``.

A batch forms while every driver slot is busy: requests that arrive meanwhile join it.
With a slot free, the first request leaves at once, or after ``max_delay`` when that is
set: low latency when idle, big batches under load.
"""

from __future__ import annotations

import time

import anyio
import numpy as np

from ._queueing import Job, ModelQueue

__all__ = ["stackable", "take", "form_batch", "stack", "split", "misfit", "undefined"]


def stackable(first: Job, job: Job) -> bool:
    """Whether ``job`` may join the batch that ``first`` opened."""
    return (job.version == first.version and job.priority == first.priority
            and [a.shape[1:] for a in job.arrays] == [a.shape[1:] for a in first.arrays])


def take(queue: ModelQueue, batch: list[Job], max_batch: int, now: float) -> bool:
    """Move jobs from the head of ``queue`` into ``batch`` (expired ones are answered and
    dropped) while they stack and it has room.  True when it stopped only because the queue
    ran dry: more may join if the batch waits."""
    while len(batch) < max_batch:
        job = queue.head()
        if job is None:
            return True
        if not stackable(batch[0], job):
            return False
        queue.pop()
        if not queue.expire(job, now):
            batch.append(job)
    return False


async def form_batch(queue: ModelQueue, max_batch: int, max_delay: float) -> list[Job]:
    """The next batch of ``queue`` (empty when every queued job had expired)."""
    first = queue.pop_live(time.time())
    if first is None:
        return []
    batch = [first]
    end = time.monotonic() + max_delay
    while take(queue, batch, max_batch, time.time()):
        remaining = end - time.monotonic()
        if remaining <= 0:
            break
        with anyio.move_on_after(remaining):
            await queue.wait()
    return batch


def stack(batch: list[Job]) -> list[np.ndarray]:
    """Each input of the batch as one tensor: the jobs' rows along axis 0, in order.  A batch
    of one is its job's own arrays (views of the frames it arrived in): no copy."""
    if len(batch) == 1:
        return list(batch[0].arrays)
    return [np.concatenate([j.arrays[i] for j in batch]) for i in range(len(batch[0].arrays))]


def misfit(batch: list[Job], outputs: list[np.ndarray]) -> str:
    """Why ``outputs`` cannot be split among ``batch`` ("" when they can): the first output
    (the model's) must hold one row per input row, none left over, none missing."""
    rows = sum(len(job.arrays[0]) for job in batch)
    if not outputs:
        return f"no output for {rows} input row(s)"
    first = outputs[0]
    if np.ndim(first) == 0 or len(first) != rows:
        return f"output 0 has shape {list(np.shape(first))} for {rows} input row(s); it needs one row per input row"
    return ""


def undefined(job: Job) -> str:
    """Where the model gave NaN for this job's rows ("" when nowhere): a result no caller
    can use, so it is answered as an error, not as a score."""
    for i, out in enumerate(job.outputs):
        if out.dtype.kind == "f" and out.size and np.isnan(out.min()):  # (NaN propagates; no temporary)
            rows = np.flatnonzero(np.isnan(out.reshape(len(out), -1)).any(axis=1)) if out.ndim else np.array([0])
            return f"output {i} is NaN for input row(s) {rows[:8].tolist()}"
    return ""


def split(batch: list[Job], outputs: list[np.ndarray]) -> None:
    """Give each job its rows of every output (views, not copies)."""
    offset = 0
    for job in batch:
        n = len(job.arrays[0])
        job.outputs = [o[offset:offset + n] for o in outputs]
        offset += n
