"""Dynamic batching: requests for the same model, version, variant and priority whose
inputs stack (each input the same shape but for its batch axis, each input without a batch
axis equal: a parameter of the run) share a batch of up to ``max_batch`` rows' requests.
A model whose contract makes it unbatchable (``Plan.batchable``) runs one request a time.

A batch forms while every driver slot is busy: requests that arrive meanwhile join it.
With a slot free, the first request leaves at once, or after ``max_delay`` when that is
set: low latency when idle, big batches under load.
"""

from __future__ import annotations

import time

import anyio
import numpy as np

from ._queueing import Job, ModelQueue

__all__ = ["stackable", "take", "form_batch", "stack", "split", "misfit", "undefined", "wanted_outputs"]


def stackable(first: Job, job: Job) -> bool:
    """Whether ``job`` may join the batch that ``first`` opened."""
    if job.version != first.version or job.priority != first.priority or job.variant != first.variant \
            or job.pin != first.pin or not first.plan.batchable or job.plan is not first.plan:
        return False
    for name, axis in first.plan.axes.items():
        a, b = first.inputs[name], job.inputs[name]
        if axis is None:
            if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b):
                return False
        elif a.shape[:axis] != b.shape[:axis] or a.shape[axis + 1:] != b.shape[axis + 1:]:
            return False
    return True


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


def stack(batch: list[Job]) -> dict[str, np.ndarray]:
    """Each input of the batch as one tensor: the jobs' rows along its batch axis, in order
    (an input without one is the first job's, equal in all).  A batch of one is its job's
    own arrays (views of the frames it arrived in): no copy."""
    first = batch[0]
    if len(batch) == 1:
        return first.inputs
    return {name: first.inputs[name] if axis is None else
            np.concatenate([j.inputs[name] for j in batch], axis=axis)
            for name, axis in first.plan.axes.items()}


def misfit(batch: list[Job], outputs: dict[str, np.ndarray]) -> str:
    """Why ``outputs`` cannot be split among ``batch`` ("" when they can): every output the
    contract gives a batch axis must hold one row per input row along it, none left over,
    none missing; none may be missing."""
    plan = batch[0].plan
    rows = sum(job.rows for job in batch)
    wanted = wanted_outputs(batch)
    for name, axis in plan.out_axes.items():
        if wanted is not None and name not in wanted:
            continue
        out = outputs.get(name)
        if out is None:
            return f"no output {name!r} (it gave {', '.join(map(repr, outputs)) or 'nothing'})"
        if axis is None:
            continue
        if out.ndim <= axis or out.shape[axis] != rows:
            return (f"output {name!r} has shape {list(out.shape)} for {rows} input row(s); it needs one row per "
                    f"input row on axis {axis}")
    return ""


def wanted_outputs(batch: list[Job]) -> list[str] | None:
    """The outputs a batch must bring back: the union of what its jobs want (None: all)."""
    if any(job.want is None for job in batch):
        return None
    return sorted(frozenset().union(*(job.want for job in batch)))  # type: ignore[arg-type]


def undefined(job: Job) -> str:
    """Where the model gave NaN for this job's rows ("" when nowhere): a result no caller
    can use, so it is answered as an error, not as a score."""
    for name, out in job.outputs.items():
        if out.dtype.kind == "f" and out.size and np.isnan(out.min()):  # (NaN propagates; no temporary)
            axis = job.plan.out_axes.get(name)
            if axis is None or out.ndim <= axis:
                return f"output {name!r} is NaN"
            rows = np.flatnonzero(np.isnan(np.moveaxis(out, axis, 0).reshape(out.shape[axis], -1)).any(axis=1))
            return f"output {name!r} is NaN for input row(s) {rows[:8].tolist()}"
    return ""


def split(batch: list[Job], outputs: dict[str, np.ndarray]) -> None:
    """Give each job its rows of every output along the output's batch axis (views, not
    copies); an output without one (a batch of one) whole."""
    if len(batch) == 1:
        batch[0].outputs = outputs
        return
    out_axes = batch[0].plan.out_axes
    offset = 0
    for job in batch:
        n = job.rows
        job.outputs = {name: o if out_axes.get(name) is None else
                       o[(slice(None),) * out_axes[name] + (slice(offset, offset + n),)]
                       for name, o in outputs.items()}
        offset += n
