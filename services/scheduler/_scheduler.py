"""The scheduler: queues, priorities, deadlines, dynamic batching, placement, degradation.

* Per-model queues ordered by priority (0 first), earliest deadline first within one.
  A request whose deadline has passed when it would be batched is answered ``timeout``
  and never computed late; admission control bounds each queue (``overloaded``).
* Dynamic batching: a batch takes up to ``max_batch`` requests for the same model,
  version and variant, waiting at most ``max_delay`` for more once the first is there.
* Placement: the accelerator driver with the fewest batches in flight among those up and
  not hot; a driver that fails mid-batch (unavailable, gone) is marked down for a moment
  and the batch goes to another driver, or to the restarted one, until the deadline.
* Degradation ladder under thermal pressure (health events) or overload (queue depth):
  full model, then the manifest's smaller variant, then its rule-based fallback (computed
  here with the numba ops, without ONNX Runtime); each step is published on
  ``scheduler.degradation`` and climbs back one step per interval when pressure ends.
* A/B: versions come from the model store's split (sticky per request key).
* Sensor pipelines from config: frames from a topic, at most ``rate`` per second, through
  a model, with hysteresis on the score; detections and alert changes are published.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import os
import time
from typing import Any

import anyio
import numpy as np

from protocols.accel import Run, RunResult
from protocols.health import Health
from protocols.sensors import SensorFrame
from protocols.telemetry import FeatureSamples
from protocols import pack_tensors
from services import (
    BadMessage,
    BusError,
    Context,
    DeadlineExceeded,
    Forbidden,
    InternalError,
    Overloaded,
    RemoteError,
    Service,
    Unavailable,
    UnknownDestination,
    run,
)
from protocols.modelstore import InspectModel, ListModels, ModelList, ModelManifest, ReportHealth, HealthRecorded
from services.modelstore._service import pick_version

from protocols.scheduler import (
    Alert,
    Degradation,
    Detection,
    DriverState,
    GetSchedule,
    Infer,
    InferResult,
    ModelQueue,
    Reply,
    Request,
    Schedule,
)

__all__ = ["Scheduler"]

_seq = itertools.count()


class _Job:
    __slots__ = ("model", "version", "arrays", "priority", "deadline", "seq", "done", "result", "error",
                 "enqueued", "cancelled", "outputs")

    def __init__(self, model: str, version: str, arrays: list[np.ndarray], priority: int, deadline: float) -> None:
        self.model, self.version, self.arrays = model, version, arrays
        self.priority, self.deadline, self.seq = priority, deadline, next(_seq)
        self.done = anyio.Event()
        self.result: InferResult | None = None
        self.error: RemoteError | None = None
        self.enqueued = time.monotonic()
        self.cancelled = False
        self.outputs: list[np.ndarray] = []

    def key(self) -> tuple[int, float, int]:
        return (self.priority, self.deadline or math.inf, self.seq)


class _Queue:
    def __init__(self) -> None:
        self.heap: list[tuple[tuple[int, float, int], _Job]] = []
        self.ready = anyio.Event()
        self.served = self.expired = self.failed = self.batches = self.batched = self.late = 0
        #: moving average of a batch's time at the driver: a job that cannot finish before
        #: its deadline is expired instead of being computed late
        self.batch_seconds = 0.0

    def push(self, job: _Job) -> None:
        heapq.heappush(self.heap, (job.key(), job))
        self.ready.set()


class _Driver:
    def __init__(self, name: str) -> None:
        self.name = name
        self.in_flight = 0
        self.down_until = 0.0
        self.batches = 0
        self.temperature: float | None = None


class Scheduler(Service):
    name = "scheduler"
    Request = Request
    Reply = Reply
    publishes = ["scheduler.*", "alerts.*", "results.*", "samples.*"]
    max_concurrency = 256

    async def setup(self) -> None:
        env = os.environ.get
        self.max_batch = int(env("EDGEBUS_SCHEDULER_MAX_BATCH", "16"))
        self.max_delay = float(env("EDGEBUS_SCHEDULER_MAX_DELAY_MS", "0")) / 1000
        self.max_queue = int(env("EDGEBUS_SCHEDULER_MAX_QUEUE", "256"))
        self.default_timeout = float(env("EDGEBUS_SCHEDULER_DEFAULT_TIMEOUT", "10"))
        self.hot_c, self.cool_c = float(env("EDGEBUS_SCHEDULER_HOT_C", "80")), float(env("EDGEBUS_SCHEDULER_COOL_C", "70"))
        self.overload_depth = int(env("EDGEBUS_SCHEDULER_OVERLOAD_DEPTH", str(self.max_queue * 3 // 4)))
        self.step_interval = float(env("EDGEBUS_SCHEDULER_STEP_S", "1.0"))
        self.drivers = [_Driver(n) for n in env("EDGEBUS_SCHEDULER_DRIVERS", "accel-cpu").split(",") if n]
        self.pipelines = json.loads(env("EDGEBUS_SCHEDULER_PIPELINES", "[]"))
        self.queues: dict[str, _Queue] = {}
        self.manifests: dict[tuple[str, str], dict] = {}
        self.models: dict[str, Any] = {}
        self.level = 0
        self.pressure = ""
        self.temperature: dict[str, float] = {}
        self.stats: dict[tuple[str, str], list[Any]] = {}  # (model, version) -> [requests, errors, latencies]
        m = self.metrics
        self.m_queue = m.histogram("edgebus_inference_queue_seconds", "Time queued before its batch left",
                                   ("model", "version"))
        self.m_compute = m.histogram("edgebus_inference_compute_seconds", "Time of its batch at the driver",
                                     ("model", "version"))
        self.m_total = m.histogram("edgebus_inference_total_seconds", "Time from arrival to result",
                                   ("model", "version"))
        self.m_batch = m.histogram("edgebus_inference_batch_size", "Requests per batch", ("model",),
                                   buckets=(1, 2, 4, 8, 16, 32, 64))
        self.m_depth = m.gauge("edgebus_inference_queue_depth", "Requests waiting", ("model",))
        self.m_level = m.gauge("edgebus_degradation_level", "0 full, 1 smaller variant, 2 rule-based fallback")
        self.m_level.set(0)
        await self._refresh_models()
        await self.bus.subscribe("modelstore.")
        for prefix in ("health.", *{p["source"] for p in self.pipelines}):
            try:
                await self.bus.subscribe(prefix)
            except Forbidden as exc:  # runs without it; says what is missing
                self.log.warning("subscription_refused", prefix=prefix, reason=str(exc))
        self._tg_started = anyio.Event()

    # -- requests ----------------------------------------------------------------------------------

    async def handle(self, req: Request, ctx: Context) -> Reply:
        match req:
            case GetSchedule():
                return self._schedule()
            case Infer():
                arrays = [ctx.tensor(t) for t in req.tensors]
                result = await self.infer(req.model, arrays, req.version, req.priority, req.key,
                                          ctx.deadline or time.time() + self.default_timeout)
                return result

    async def infer(self, model: str, arrays: list[np.ndarray], version: str, priority: int, key: str,
                    deadline: float) -> tuple[InferResult, list]:
        if not version and model not in self.models:
            await self._refresh_models()  # installed a moment ago: its event may still be on its way
        version = version or self._resolve(model, key)
        manifest = await self._manifest(model, version)
        self._validate(model, manifest, arrays)
        if not 0 <= priority <= 2:
            raise BadMessage(f"priority {priority} is not 0 (high), 1 (normal) or 2 (low)")
        await self._tg_started.wait()
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = _Queue()
            self._tg.start_soon(self._batcher, model, queue)
        if len(queue.heap) >= self.max_queue:
            raise Overloaded(f"{model} has {len(queue.heap)} requests queued (EDGEBUS_SCHEDULER_MAX_QUEUE)")
        job = _Job(model, version, arrays, priority, deadline)
        queue.push(job)
        try:
            await job.done.wait()
        finally:
            job.cancelled = True  # if we were cancelled (deadline), the batcher skips it
        if job.error is not None:
            raise job.error
        assert job.result is not None
        descs, frames = pack_tensors(job.outputs)
        job.result.outputs = descs
        return job.result, frames

    def _validate(self, model: str, manifest: dict, arrays: list[np.ndarray]) -> None:
        if not arrays:
            raise BadMessage(f"{model}: no input tensor")
        for a in arrays:
            if a.ndim == 0 or len(a) == 0:
                raise BadMessage(f"{model}: inputs are batches: axis 0 is the batch, got shape {list(a.shape)}")
            if len(a) != len(arrays[0]):
                raise BadMessage(f"{model}: inputs disagree on the batch size")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise BadMessage(f"{model}: input contains NaN or infinity")
        if manifest.get("pre"):
            if arrays[0].dtype != np.float32:
                raise BadMessage(f"{model}: its pre ops take float32 frames, got {arrays[0].dtype}")
            return
        inputs = manifest.get("inputs", [])
        if len(arrays) != len(inputs):
            raise BadMessage(f"{model} takes {len(inputs)} input(s), got {len(arrays)}")
        for a, spec in zip(arrays, inputs):
            if a.dtype.name != spec["dtype"]:
                raise BadMessage(f"{model}: input {spec['name']!r} is {spec['dtype']}, got {a.dtype.name}")
            shape = spec["shape"]
            if len(a.shape) != len(shape) or any(d is not None and d != s for d, s in zip(shape, a.shape)):
                raise BadMessage(f"{model}: input {spec['name']!r} has shape {shape}, got {list(a.shape)}")

    # -- models ------------------------------------------------------------------------------------

    async def _refresh_models(self) -> None:
        try:
            listing = await self.bus.call("modelstore", ListModels(), ModelList, timeout=10)
        except BusError as exc:
            self.log.warning("modelstore_unreachable", error=str(exc))
            return
        self.models = {m.name: m for m in listing.models}

    def _resolve(self, model: str, key: str) -> str:
        state = self.models.get(model)
        if state is None:
            raise UnknownDestination(f"no model {model!r} in the model store")
        if state.split:
            return pick_version(model, key, state.split)
        if not state.active:
            raise Unavailable(f"{model} has no active version")
        return state.active

    async def _manifest(self, model: str, version: str) -> dict:
        cached = self.manifests.get((model, version))
        if cached is None:
            try:
                reply = await self.bus.call("modelstore", InspectModel(name=model, version=version), ModelManifest)
            except UnknownDestination:
                raise UnknownDestination(f"no model {model} {version} in the model store") from None
            cached = self.manifests[(model, version)] = reply.manifest
        return cached

    # -- batching and dispatch ---------------------------------------------------------------------

    async def main(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._tg_started.set()
            tg.start_soon(self._events)
            tg.start_soon(self._ladder)
            tg.start_soon(self._report_health)

    async def _batcher(self, model: str, queue: _Queue) -> None:
        # batches in flight per model: one per driver (acquired here, released by _dispatch)
        limiter = anyio.Semaphore(max(1, len(self.drivers)))
        while True:
            while not queue.heap:
                queue.ready = anyio.Event()
                await queue.ready.wait()
            # A batch forms while every driver slot is busy: requests that arrive meanwhile
            # join it.  With a slot free, the first request leaves at once (plus the
            # optional max_delay window): low latency when idle, big batches under load.
            await limiter.acquire()
            if not queue.heap:
                limiter.release()
                continue
            _, first = heapq.heappop(queue.heap)
            if self._expired(first, queue):
                limiter.release()
                continue
            level = self.level
            variant = self._variant(model, first.version, level)
            batch = [first]
            batch_end = time.monotonic() + self.max_delay
            while len(batch) < self.max_batch:
                if not queue.heap:
                    remaining = batch_end - time.monotonic()
                    if remaining <= 0:
                        break
                    queue.ready = anyio.Event()
                    with anyio.move_on_after(remaining):
                        await queue.ready.wait()
                    continue
                _, job = queue.heap[0]
                if (job.version != first.version or job.priority != first.priority
                        or [a.shape[1:] for a in job.arrays] != [a.shape[1:] for a in first.arrays]):
                    break  # only requests that stack into one tensor share a batch
                heapq.heappop(queue.heap)
                if not self._expired(job, queue):
                    batch.append(job)
            self._tg.start_soon(self._dispatch, model, variant, level, batch, queue, limiter)

    def _expired(self, job: _Job, queue: _Queue) -> bool:
        """A job whose deadline passed (or whose caller gave up at it) is answered, not run."""
        if job.cancelled:
            queue.expired += 1
            return True
        if job.deadline and job.deadline <= time.time() + queue.batch_seconds:
            queue.expired += 1
            job.error = DeadlineExceeded(f"{job.model}: the deadline passes before it could be computed; not run")
            job.done.set()
            return True
        return False

    def _variant(self, model: str, version: str, level: int) -> str:
        variants = self.manifests.get((model, version), {}).get("variants", {})
        if level >= 2 and self.manifests.get((model, version), {}).get("fallback"):
            return "fallback"
        if level >= 1:
            for smaller in ("small", "int8"):
                if smaller in variants:
                    return smaller
        return "full"

    async def _dispatch(self, model: str, variant: str, level: int, batch: list[_Job], queue: _Queue,
                        limiter: anyio.Semaphore) -> None:
        try:
            started = time.monotonic()
            version = batch[0].version
            # axis 0 is the batch: one batch of all the requests' rows
            stacked = [np.concatenate([j.arrays[i] for j in batch]) for i in range(len(batch[0].arrays))]
            sizes = [len(j.arrays[0]) for j in batch]
            try:
                if variant == "fallback":
                    outputs, driver, compute_ms = self._fallback(model, version, stacked[0]), "scheduler", 0.0
                else:
                    manifest = self.manifests.get((model, version), {})
                    want = bool(manifest.get("pre") and manifest.get("reference"))
                    outputs, driver, compute_ms = await self._run_on_driver(model, version, variant, stacked,
                                                                          max(j.deadline for j in batch), want)
                    if want:  # the input features, for drift detection, not for the clients
                        descs, frames = pack_tensors([outputs.pop()])
                        await self.bus.publish(f"samples.{model}", FeatureSamples(model=model, version=version,
                                                                                  tensor=descs[0]), frames=frames)
            except Exception as exc:  # every client gets an answer, whatever broke
                error = exc if isinstance(exc, RemoteError) else InternalError(f"{type(exc).__name__}: {exc}")
                if not isinstance(exc, RemoteError):
                    self.log.exception("batch_failed", model=model)
                for job in batch:
                    job.error = error
                    job.done.set()
                queue.failed += len(batch)
                self._record(model, version, len(batch), len(batch), time.monotonic() - started)
                return
            queue.batches += 1
            queue.batched += len(batch)
            offset = 0
            now = time.monotonic()
            for job, n in zip(batch, sizes):
                job.outputs = [o[offset:offset + n] for o in outputs]
                offset += n
                job.result = InferResult(model=model, version=version, variant=variant, outputs=[], level=level,
                                         driver=driver, batch=len(batch),
                                         queue_ms=(started - job.enqueued) * 1e3, compute_ms=compute_ms,
                                         total_ms=(now - job.enqueued) * 1e3)
                job.done.set()
            queue.served += len(batch)
            queue.late += sum(1 for job in batch if job.cancelled)
            self.m_batch.observe(len(batch), model)
            self.m_depth.set(len(queue.heap), model)
            for job in batch:
                self.m_queue.observe(started - job.enqueued, model, version)
                self.m_compute.observe(now - started, model, version)
                self.m_total.observe(now - job.enqueued, model, version)
            queue.batch_seconds = 0.8 * queue.batch_seconds + 0.2 * (now - started)
            self._record(model, version, len(batch), 0, now - started)
        finally:
            limiter.release()

    async def _run_on_driver(self, model: str, version: str, variant: str, arrays: list[np.ndarray],
                             deadline: float, features: bool = False) -> tuple[list[np.ndarray], str, float]:
        descs, frames = pack_tensors(arrays)
        last: Exception | None = None
        while time.time() < deadline:
            driver = self._place()
            if driver is None:
                await anyio.sleep(0.05)  # every driver is down: wait for a restart, until the deadline
                continue
            driver.in_flight += 1
            try:
                incoming = await self.bus.request(driver.name, Run(model=model, version=version, variant=variant,
                                                                   inputs=descs, features=features),
                                                  frames=frames, deadline=deadline)
            except (Unavailable, UnknownDestination) as exc:
                driver.down_until = time.monotonic() + 0.5
                last = exc
                self.log.warning("driver_failed", driver=driver.name, model=model, error=str(exc))
                continue
            finally:
                driver.in_flight -= 1
            driver.batches += 1
            result = incoming.decode(RunResult)
            return [incoming.tensor(t) for t in result.outputs], driver.name, result.compute_ms
        raise DeadlineExceeded(f"{model}: no accelerator driver answered before the deadline"
                               + (f" (last error: {last})" if last else ""))

    def _place(self) -> _Driver | None:
        now = time.monotonic()
        candidates = [d for d in self.drivers if d.down_until <= now]
        if not candidates:
            return None
        cool = [d for d in candidates if (d.temperature or 0) < self.hot_c] or candidates
        return min(cool, key=lambda d: d.in_flight)

    def _fallback(self, model: str, version: str, x: np.ndarray) -> list[np.ndarray]:
        """The manifest's rule: a threshold on one feature, computed with the pre ops here."""
        manifest = self.manifests[(model, version)]
        rule = manifest["fallback"]
        names = list(manifest.get("reference", {}))  # feature names, in column order
        features = x
        if manifest.get("pre"):
            from drivers.ops import run_pipeline

            features = run_pipeline([(op["op"], op.get("params", {})) for op in manifest["pre"]], x)
        column = features[..., names.index(rule["feature"])] if rule["feature"] in names else features[..., 0]
        out = np.where(column > rule["threshold"], rule.get("above", 1), rule.get("below", 0)).astype(np.float32)
        return [out.reshape(-1, 1)]

    # -- pressure and the ladder ---------------------------------------------------------------------

    async def _ladder(self) -> None:
        while True:
            await anyio.sleep(self.step_interval)
            hottest = max(self.temperature.values(), default=None)
            depth = sum(len(q.heap) for q in self.queues.values())
            reasons = []
            if hottest is not None and hottest >= self.hot_c:
                reasons.append(f"temperature {hottest:.0f} °C >= {self.hot_c:.0f}")
            if depth >= self.overload_depth:
                reasons.append(f"{depth} requests queued >= {self.overload_depth}")
            calm = (hottest is None or hottest <= self.cool_c) and depth < self.overload_depth // 2
            if reasons and self.level < 2:
                await self._set_level(self.level + 1, "; ".join(reasons))
            elif calm and self.level > 0:
                await self._set_level(self.level - 1, "pressure ended")
            self.pressure = "; ".join(reasons)

    async def _set_level(self, level: int, reason: str) -> None:
        previous, self.level = self.level, level
        self.m_level.set(level)
        self.log.warning("degradation", level=level, previous=previous, reason=reason)
        await self.bus.publish("scheduler.degradation", Degradation(level=level, previous=previous, reason=reason))

    # -- events: model store, health, sensors ------------------------------------------------------

    async def _events(self) -> None:
        pipelines = {p["source"]: dict(p, last=0.0, alert=False) for p in self.pipelines}
        async for incoming in self.bus.events:
            topic = incoming.header.dest
            if topic.startswith("modelstore."):
                await self._refresh_models()
                continue
            if topic.startswith("health.") and incoming.type == "Health":
                h = incoming.decode(Health)
                if h.temperature_c is not None:
                    self.temperature[incoming.sender] = h.temperature_c
                for d in self.drivers:
                    d.temperature = max(self.temperature.values(), default=None)
                continue
            pipeline = pipelines.get(topic)
            if pipeline is not None and incoming.type == "SensorFrame":
                now = time.monotonic()
                if now - pipeline["last"] < 1.0 / pipeline.get("rate", 1.0):
                    continue  # over the pipeline's rate: this frame is skipped
                pipeline["last"] = now
                frame = incoming.decode(SensorFrame)
                self._tg.start_soon(self._run_pipeline, pipeline, frame, incoming.tensor(frame.tensor).copy())

    async def _run_pipeline(self, pipeline: dict, frame: SensorFrame, samples: np.ndarray) -> None:
        model = pipeline["model"]
        try:
            result, frames = await self.infer(model, [samples[None, :]], "", 1, pipeline["source"],
                                              time.time() + pipeline.get("timeout", 2.0))
        except RemoteError as exc:
            self.log.warning("pipeline_failed", model=model, source=pipeline["source"], error=str(exc))
            return
        score = float(np.asarray(frames[0]).view(np.float32).reshape(-1)[0]) if frames else 0.0
        on, off = pipeline.get("on", 0.7), pipeline.get("off", 0.4)
        alert = pipeline["alert"]
        if not alert and score >= on:
            alert = True
        elif alert and score <= off:
            alert = False
        result_topic = pipeline.get("result", f"results.{model}")
        await self.bus.publish(result_topic, Detection(model=model, version=result.version, source=pipeline["source"],
                                                       seq=frame.seq, score=score, alert=alert, level=result.level))
        if alert != pipeline["alert"]:
            pipeline["alert"] = alert
            alert_topic = pipeline.get("alerts", f"alerts.{model}")
            self.log.warning("alert", model=model, source=pipeline["source"], state="raised" if alert else "cleared",
                             score=round(score, 3))
            await self.bus.publish(alert_topic, Alert(model=model, source=pipeline["source"],
                                                      state="raised" if alert else "cleared", score=score, seq=frame.seq))

    # -- health reports for the model store's trial gates ------------------------------------------

    def _record(self, model: str, version: str, n: int, errors: int, seconds: float) -> None:
        entry = self.stats.setdefault((model, version), [0, 0, []])
        entry[0] += n
        entry[1] += errors
        entry[2].extend([seconds * 1e3] * n)

    async def _report_health(self) -> None:
        while True:
            await anyio.sleep(float(os.environ.get("EDGEBUS_SCHEDULER_HEALTH_REPORT_S", "5")))
            stats, self.stats = self.stats, {}
            for (model, version), (n, errors, latencies) in stats.items():
                p95 = float(np.percentile(latencies, 95)) if latencies else 0.0
                try:
                    await self.bus.call("modelstore", ReportHealth(name=model, version=version, requests=n,
                                                                   errors=errors, p95_ms=p95), HealthRecorded)
                except BusError as exc:
                    self.log.warning("health_report_failed", error=str(exc))

    def _schedule(self) -> Schedule:
        now = time.monotonic()
        return Schedule(
            level=self.level, pressure=self.pressure,
            models=[ModelQueue(model=m, depth=len(q.heap), served=q.served, expired=q.expired, failed=q.failed,
                               late=q.late,
                               batches=q.batches, mean_batch=round(q.batched / q.batches, 2) if q.batches else 0.0)
                    for m, q in sorted(self.queues.items())],
            drivers=[DriverState(name=d.name, in_flight=d.in_flight, up=d.down_until <= now, batches=d.batches,
                                 temperature_c=d.temperature) for d in self.drivers])


def main() -> None:
    run(Scheduler)
