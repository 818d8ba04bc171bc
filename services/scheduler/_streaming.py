"""Serving streams (see ``_streams`` for what a stream is): OpenStream, chunks, resets and
re-pinning when a driver stops, idle expiry, and the streams that sensor pipelines feed.

``Streaming`` works through the scheduler it belongs to: a chunk becomes a Job pinned to
the stream's driver and goes through the scheduler's queues and batches like any request.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Sequence

import anyio
import numpy as np

from protocols import Tensor, pack_tensors
from protocols.scheduler import (
    STREAM_EVENTS, Infer, InferResult, OpenStream, StreamClosed, StreamOpened, StreamReset, StreamResult,
)
from services import BadMessage, BusError, Context, Unavailable

from ._pipelines import Pipeline
from ._placement import PinnedDriverLost
from ._queueing import Job
from ._streams import Stream, Streams

if TYPE_CHECKING:
    from ._service import Scheduler

__all__ = ["Streaming"]


class Streaming:
    """The scheduler's open streams and what serves them."""

    def __init__(self, scheduler: Scheduler, registry: Streams) -> None:
        self.scheduler = scheduler
        self.registry = registry

    def close(self, stream_id: str, sender: str) -> StreamClosed:
        stream = self.registry.get(stream_id, sender)
        self.registry.close(stream)
        return StreamClosed(stream=stream.id, chunks=stream.seq, reason="closed")

    async def open(self, req: OpenStream, ctx: Context) -> StreamOpened:
        version, manifest, plan, _ = await self.scheduler._prepare(req.model, req.version, req.key, "")
        driver = self._driver()
        stream = self.registry.create(req.model, version, manifest, plan, ctx.sender, req.tensors,
                                      [ctx.tensor(t) for t in req.tensors], driver, req.topic, req.outputs,
                                      req.idle_s)
        self.scheduler.log.info("stream_opened", stream=stream.id, model=req.model, version=version, driver=driver,
                                owner=ctx.sender)
        return StreamOpened(stream=stream.id, model=req.model, version=version, driver=driver or "",
                            inputs=stream.chunk_inputs, idle_s=stream.idle_s)

    def _driver(self, avoid: str = "") -> str | None:
        """The ready driver holding the fewest streams (None while none is ready)."""
        now = time.monotonic()
        ready = [d for d in self.scheduler.drivers if d.up(now) and d.name != avoid] or \
                [d for d in self.scheduler.drivers if d.up(now)]
        if not ready:
            return None
        return min(ready, key=lambda d: (self.registry.load(d.name), d.in_flight)).name

    async def chunk(self, req: Infer, ctx: Context) -> tuple[InferResult, list]:
        """One chunk of a stream: the stream's state and parameters with the chunk's inputs,
        on the stream's driver; the next state kept, the other outputs answered."""
        stream = self.registry.get(req.stream, ctx.sender)
        arrays = [ctx.tensor(t) for t in req.tensors]
        deadline = ctx.deadline or time.time() + self.scheduler.settings.default_timeout
        return await self.run(stream, req.tensors, arrays, req.priority, deadline, req.variant)

    async def run(self, stream: Stream, descs: Sequence[Tensor], arrays: list[np.ndarray], priority: int,
                  deadline: float, variant: str = "") -> tuple[InferResult, list]:
        """A chunk of ``stream`` (its inputs ``arrays``, described by ``descs``): its result,
        with the stream's next state kept; a stream whose driver is gone starts over on
        another one (once) and says so."""
        async with stream.lock:  # chunks of one stream: one at a time, in order
            manifest = await self.scheduler._manifest(stream.model, stream.version)
            for attempt in range(2):
                if stream.driver is None or not self._driver_up(stream.driver):
                    await self._repin(stream, f"driver {stream.driver} is not running" if stream.driver
                                      else "", avoid=stream.driver or "")
                job = Job(stream.model, stream.version, stream.bind(descs, arrays), priority, deadline,
                          stream.plan, variant)
                job.pin = stream.driver
                try:
                    await self.scheduler._run(job, manifest)
                    break
                except PinnedDriverLost as exc:
                    if attempt:
                        raise Unavailable(f"stream {stream.id}: {exc}") from None
                    await self._repin(stream, str(exc), avoid=exc.driver)
            assert job.result is not None
            outputs = stream.advance(job.outputs)
            job.result.seq, job.result.reset, stream.reset = stream.seq, stream.reset, ""
            out_descs, frames = pack_tensors(outputs)  # (copies: the state kept may share their batch)
            job.result.outputs = out_descs
            if stream.topic:
                result = StreamResult(stream=stream.id, model=stream.model, version=stream.version, seq=stream.seq,
                                      outputs=out_descs, reset=job.result.reset)
                await self.scheduler.bus.publish(stream.topic, result, frames=frames)
        return job.result, frames

    def _driver_up(self, name: str) -> bool:
        now = time.monotonic()
        return any(d.name == name and d.up(now) for d in self.scheduler.drivers)

    async def _repin(self, stream: Stream, reason: str, avoid: str = "") -> None:
        """Pin ``stream`` to another driver; with ``reason``, its state is reset (and said so)."""
        stream.driver = self._driver(avoid)
        if reason:
            await self._reset(stream, reason)

    async def _reset(self, stream: Stream, reason: str) -> None:
        stream.restart(reason)
        self.scheduler.log.warning("stream_reset", stream=stream.id, model=stream.model, reason=reason,
                                   driver=stream.driver)
        await self._announce(stream, StreamReset(stream=stream.id, model=stream.model, reason=reason, seq=stream.seq))

    async def _announce(self, stream: Stream, event: StreamReset | StreamClosed) -> None:
        """``event`` on STREAM_EVENTS and on the stream's own topic, if it has one."""
        for topic in (STREAM_EVENTS, stream.topic):
            if topic:
                with contextlib.suppress(BusError):
                    await self.scheduler.bus.publish(topic, event)

    async def driver_lost(self, name: str, state: str) -> None:
        """A driver stopped: the streams it held start over on another one."""
        for stream in self.registry.pinned_to(name):
            await self._repin(stream, f"driver {name} is {state}", avoid=name)

    async def expire(self) -> None:
        """Close idle streams, every second, for the scheduler's life."""
        while True:
            await anyio.sleep(1.0)
            for stream in self.registry.idle(time.monotonic()):
                self.registry.close(stream)
                self.scheduler.log.info("stream_expired", stream=stream.id, model=stream.model, chunks=stream.seq)
                await self._announce(stream, StreamClosed(stream=stream.id, chunks=stream.seq, reason="idle"))

    async def for_pipeline(self, pipeline: Pipeline) -> Stream:
        """The stream a stream pipeline feeds (opened at its first frame, again after it
        expired), its parameters from the pipeline's settings in the contract's dtypes."""
        async with pipeline.opening:
            stream = pipeline.stream
            if stream is not None and stream.id in self.registry.open:
                return stream
            version, manifest, plan, _ = await self.scheduler._prepare(pipeline.model, "", pipeline.source, "")
            specs = {s.name: s for s in plan.inputs}
            names = list(pipeline.settings.parameters)
            unknown = [n for n in names if n not in specs]
            if unknown:
                raise BadMessage(f"pipeline {pipeline.source}: {pipeline.model} has no input "
                                 f"{', '.join(map(repr, unknown))} (its inputs: {', '.join(specs)})")
            arrays = [np.array(v, dtype=specs[n].dtype) for n, v in pipeline.settings.parameters.items()]
            descs = [Tensor(dtype=specs[n].dtype, shape=[], frame=i, name=n) for i, n in enumerate(names)]
            pipeline.stream = self.registry.create(pipeline.model, version, manifest, plan, "scheduler", descs,
                                                   arrays, self._driver(), "", (), 0.0)
            self.scheduler.log.info("pipeline_stream_opened", source=pipeline.source, model=pipeline.model,
                                    stream=pipeline.stream.id)
            return pipeline.stream
