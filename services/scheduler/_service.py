"""The scheduler service: wires queueing, batching, placement, the degradation ladder and
the sensor pipelines to the bus.

* Requests: ``Infer`` (admitted into the model's queue, answered when its batch is back)
  and ``GetSchedule``.
* Versions come from the model store: the active one, or the A/B split's pick for the
  request key (``protocols.modelstore.pick_version``, sticky per key); variants too, when the
  request names none and the ladder is at level 0 (``ModelState.variant``: the variant
  split's sticky pick, the variant in trial, the version's default variant).
* Subscriptions, each consumed by its own task: ``modelstore.`` (the model list changed),
  ``health.`` (each health source's readings go to the drivers it watches), and one per
  pipeline's sensor topic.
* Serving health per model version and variant goes to the model store for its trial gates.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Sequence

import anyio
import numpy as np

from protocols import ListServices, ServiceList, ServiceStateChanged, Tensor, dtype_name, pack_tensors
from protocols.accel import FEATURES, Run, RunResult
from protocols.health import Health
from protocols.modelstore import (
    HealthRecorded,
    InspectModel,
    ListModels,
    Manifest,
    ModelList,
    ModelManifest,
    ModelState,
    ReportHealth,
    pick_version,
)
from protocols.scheduler import (
    Alert,
    CloseStream,
    Degradation,
    Detection,
    GetSchedule,
    Infer,
    InferResult,
    MapRegion,
    ModelQueue as QueueState,
    OpenStream,
    RegionUnmapped,
    UnmapRegion,
    Reply,
    Request,
    Schedule,
)
from protocols.sensors import SensorFrame
from protocols.shm import place_or_pack
from protocols.telemetry import FeatureSamples
from services import (
    BadMessage,
    BusError,
    Context,
    Forbidden,
    Incoming,
    InternalError,
    RemoteError,
    Service,
    Subscription,
    Unavailable,
    UnknownDestination,
    run,
)

from ._batching import form_batch, misfit, split, stack, undefined, wanted_outputs
from ._contract import Plan
from ._ladder import Ladder, fallback, variant_for
from ._graphs import Graphs
from ._inline import InlineLane, decide_inline
from ._pipelines import Pipeline
from ._placement import Driver, apply_health, run_pinned, run_with_failover, thermal_pressure
from ._queueing import Job, ModelQueue, check_priority
from ._regions import Regions
from ._streaming import Streaming
from ._streams import Streams
from ._tuning import BatchTuner
from ._settings import SchedulerSettings

__all__ = ["Scheduler"]


class _Served:
    """Serving health of one variant of a model version since the last report."""

    __slots__ = ("requests", "errors", "latencies_ms")

    def __init__(self) -> None:
        self.requests = self.errors = 0
        self.latencies_ms: list[float] = []


class Scheduler(Service):
    name = "scheduler"
    Settings = SchedulerSettings
    Request = Request
    Reply = Reply
    publishes = ["scheduler.*", "alerts.*", "results.*", "samples.*"]
    max_concurrency = 256

    settings: SchedulerSettings

    async def setup(self) -> None:
        s = self.settings
        self.drivers = [Driver.from_settings(d) for d in s.drivers]
        self.pipelines = [Pipeline(p) for p in s.pipelines]
        self.graphs = Graphs(self, s.graphs)  # (their ops' kernels load after READY: main())
        self.ladder = Ladder(s.hot_c, s.cool_c, s.overload_at)
        self.queues: dict[str, ModelQueue] = {}
        #: per model: its batches in flight, at most one per driver
        self.slots: dict[str, anyio.Semaphore] = {}
        self.manifests: dict[tuple[str, str], Manifest] = {}
        #: each model version's contract (what clients send and get), built from its manifest
        self.plans: dict[tuple[str, str], Plan] = {}
        #: per model: its batching (limit measured when "auto", and delay), from the settings once
        self.tuners: dict[str, BatchTuner] = {}
        self.models: dict[str, ModelState] = {}
        self.streaming = Streaming(self, Streams(s.max_streams, s.stream_idle_s))
        self.inline = InlineLane(self.bus, self.log, [d.name for d in self.drivers])
        self.regions = Regions(s.max_regions, int(s.max_region_mb * 2**20))
        self.served: dict[tuple[str, str, str], _Served] = {}
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
        self.m_errors = m.counter("edgebus_inference_errors_total", "Requests answered with an error by the model's run",
                                  ("model", "version"))
        self.m_level = m.gauge("edgebus_degradation_level", "0 full, 1 smaller variant, 2 rule-based fallback")
        self.m_level.set(0)
        await self._refresh_models()
        # subscribed before READY, so no event after it is missed; consumed in main()
        self._subscriptions = contextlib.AsyncExitStack()
        self._models_sub = await self._subscribe("modelstore.")
        self._health_sub = await self._subscribe("health.")
        self._drivers_sub = await self._watch_drivers()
        self._pipeline_subs = [(p, await self._subscribe(p.source)) for p in self.pipelines]
        self._tg_started = anyio.Event()

    async def _subscribe(self, prefix: str) -> Subscription | None:
        try:
            return await self._subscriptions.enter_async_context(self.bus.subscribe(prefix))
        except Forbidden as exc:  # runs without it; says what is missing
            self.log.warning("subscription_refused", prefix=prefix, reason=str(exc))
            return None

    async def teardown(self) -> None:
        await self._subscriptions.aclose()

    async def main(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._tg_started.set()
            if self._models_sub is not None:
                tg.start_soon(self._model_events, self._models_sub)
            if self._health_sub is not None:
                tg.start_soon(self._health_events, self._health_sub)
            if self._drivers_sub is not None:
                tg.start_soon(self._driver_events, self._drivers_sub)
            for pipeline, sub in self._pipeline_subs:
                if sub is not None:
                    tg.start_soon(self._sensor_frames, pipeline, sub)
            tg.start_soon(self.graphs.warm)  # (in a thread, off the boot's path: numba loads in ~0.5 s)
            tg.start_soon(self._ladder_steps)
            tg.start_soon(self._report_health)
            tg.start_soon(self.streaming.expire)

    # -- requests ----------------------------------------------------------------------------------

    async def handle(self, req: Request, ctx: Context) -> Reply | tuple[Reply, list]:
        match req:
            case GetSchedule():
                return self._schedule()
            case Infer(stream=""):
                arrays = [self.regions.view(ctx.sender, t) if t.region else ctx.tensor(t) for t in req.tensors]
                out = None
                if req.out_region:
                    self.regions.get(ctx.sender, req.out_region)  # (mapped: else bad-message now)
                    out = (req.out_region, req.out_offset)
                return await self.infer(req.model, arrays, req.version, req.priority, req.key,
                                        ctx.deadline or time.time() + self.settings.default_timeout,
                                        req.tensors, req.variant, req.outputs, ctx.sender, out)
            case Infer():
                return await self.streaming.chunk(req, ctx)
            case OpenStream():
                return await self.streaming.open(req, ctx)
            case CloseStream(stream=stream_id):
                return self.streaming.close(stream_id, ctx.sender)
            case MapRegion(name=name, size=size):
                return self.regions.map(ctx.sender, name, size)
            case UnmapRegion(name=name):
                self.regions.unmap(ctx.sender, name)
                return RegionUnmapped(name=name)

    async def infer(self, model: str, arrays: list[np.ndarray], version: str, priority: int, key: str,
                    deadline: float, descs: Sequence[Tensor] = (), variant: str = "",
                    outputs: Sequence[str] = (), owner: str = "",
                    out: tuple[str, int] | None = None) -> tuple[InferResult, list]:
        """Run ``model`` on ``arrays`` (described by ``descs``: named, or unnamed in the
        contract's order) and answer with its outputs (only those named in ``outputs``): in
        the region ``out`` names (region, offset) of ``owner``'s, or as frames."""
        if model in self.graphs:  # a pipeline: its stages, each through here (_graphs)
            return await self.graphs.infer(model, arrays, version, priority, key, deadline, descs, variant, outputs)
        version, manifest, plan, variant = await self._prepare(model, version, key, variant)
        inputs = plan.bind(descs, arrays)
        wanted = plan.wanted(outputs) if outputs else None
        check_priority(priority)
        job = Job(model, version, inputs, priority, deadline, plan, variant)
        job.want = frozenset(wanted) if wanted else None
        job.owner, job.out = owner, out
        await self._run(job, manifest)
        assert job.result is not None
        given = job.outputs if wanted is None else {name: job.outputs[name] for name in wanted}
        if out is not None:  # where the client asked (the driver may have written them there already)
            region = self.regions.get(owner, out[0])
            out_descs, frames = place_or_pack(given, region.name, region.buf, out[1], region.size)
        else:
            out_descs, frames = pack_tensors(given, zero_copy=True)  # views of the driver's frames
        job.result.outputs = out_descs
        return job.result, frames

    async def _prepare(self, model: str, version: str, key: str, variant: str) -> tuple[str, Manifest, Plan, str]:
        """The version and variant serving a request, its manifest and contract."""
        if not version and model not in self.models:
            await self._refresh_models()  # installed a moment ago: its event may still be on its way
        version, picked = self._resolve(model, key, version)
        manifest = await self._manifest(model, version)
        plan = self._plan(model, version, manifest)
        if variant and variant not in manifest.variants:
            raise BadMessage(f"{model} {version} has no variant {variant!r}; it has "
                             f"{', '.join(map(repr, manifest.variants))}")
        if not variant and picked != "full" and not self.ladder.level and picked in manifest.variants:
            variant = picked  # the store's variant split, trial or default (under pressure: the ladder's)
        return version, manifest, plan, variant

    async def _run(self, job: Job, manifest: Manifest) -> None:
        """Queue ``job`` (or take it to a driver at once when the model is idle) and wait
        for its result; raises its error."""
        model = job.model
        if not self._tg_started.is_set():  # (waiting on a set Event would still cost a loop pass)
            await self._tg_started.wait()
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = ModelQueue(model, self.settings.max_queue)
            self.tuners[model] = BatchTuner(*self.settings.batching_of(model))
            self.slots[model] = anyio.Semaphore(len(self.drivers))
            self._tg.start_soon(self._batcher, queue)
        slots = self.slots[model]
        if not len(queue) and slots.value and self.tuners[model].max_delay <= 0:
            # idle (nothing queued, a driver slot free, no batching delay): the batch it would
            # form is this job alone, leaving at once; this task takes it to the driver itself,
            # without the batcher's hand-off, a task per batch and an Event to wake it
            slots.acquire_nowait()
            if queue.expire(job, time.time()):
                slots.release()
            else:
                level = self.ladder.level
                await self._dispatch(queue, job.variant or variant_for(manifest, level), level, [job], slots)
        else:
            queue.admit(job)
            try:
                await job.wait_done()
            finally:
                job.cancelled = True  # if we were cancelled (deadline), the batcher skips it
        if job.error is not None:
            raise job.error

    # -- models ------------------------------------------------------------------------------------

    async def _refresh_models(self) -> None:
        try:
            listing = await self.bus.call("modelstore", ListModels(), ModelList, timeout=10)
        except BusError as exc:
            self.log.warning("modelstore_unreachable", error=str(exc))
            return
        self.models = {m.name: m for m in listing.models}
        self.inline.retain({m.name: m.versions for m in listing.models})

    def _resolve(self, model: str, key: str, version: str = "") -> tuple[str, str]:
        """The version serving a request (``version`` when it names one, else the split's sticky
        pick for ``key`` or the active version) and the variant the model store gives it
        (``ModelState.variant``: the variant split's pick, the variant in trial, the default)."""
        state = self.models.get(model)
        if version:
            return version, "full" if state is None else state.variant(version, key)
        if state is None:
            raise UnknownDestination(f"no model {model!r} in the model store")
        if state.split:
            version = pick_version(model, key, state.split)
        elif not state.active:
            raise Unavailable(f"{model} has no active version; activate one (busctl model activate)")
        else:
            version = state.active
        return version, state.variant(version, key)

    def _plan(self, model: str, version: str, manifest: Manifest) -> Plan:
        plan = self.plans.get((model, version))
        if plan is None:
            try:
                plan = self.plans[(model, version)] = Plan.of(model, manifest)
            except ValueError as exc:  # ops that cannot run (an old bundle's): said, never a traceback
                raise Unavailable(f"{model} {version}: its ops cannot run: {exc}") from None
        return plan

    async def _manifest(self, model: str, version: str) -> Manifest:
        cached = self.manifests.get((model, version))
        if cached is None:
            try:
                reply = await self.bus.call("modelstore", InspectModel(name=model, version=version), ModelManifest)
            except UnknownDestination:
                raise UnknownDestination(f"no model {model} {version} in the model store") from None
            cached = self.manifests[(model, version)] = reply.manifest
        return cached

    # -- batching and dispatch ---------------------------------------------------------------------

    async def _batcher(self, queue: ModelQueue) -> None:
        # batches in flight per model: one per driver (acquired here or by an idle-path caller
        # in infer, released by _dispatch)
        slots = self.slots[queue.model]
        tuner = self.tuners[queue.model]
        while True:
            await queue.wait()
            await slots.acquire()
            batch = await form_batch(queue, tuner.limit(), tuner.max_delay)
            if not batch:
                slots.release()
                continue
            level = self.ladder.level
            variant = batch[0].variant or variant_for(self.manifests.get((queue.model, batch[0].version)), level)
            self._tg.start_soon(self._dispatch, queue, variant, level, batch, slots)

    async def _dispatch(self, queue: ModelQueue, variant: str, level: int, batch: list[Job],
                        slots: anyio.Semaphore) -> None:
        model, version = queue.model, batch[0].version
        started = time.monotonic()
        try:
            outputs, driver, compute_ms = await self._compute(model, version, variant, batch)
            problem = misfit(batch, outputs)
            if problem:  # never split misaligned rows among the callers, nor answer nothing as ok
                raise InternalError(f"{model} {version} ({variant}) on {driver}: {problem}; not answered as a result")
        except Exception as exc:  # every client gets an answer, whatever broke
            if not isinstance(exc, RemoteError):
                self.log.exception("batch_failed", model=model)
            elif isinstance(exc, InternalError):
                self.log.error("batch_failed", model=model, error=str(exc))
            error = exc if isinstance(exc, RemoteError) else InternalError(f"{type(exc).__name__}: {exc}")
            for job in batch:
                job.fail(error)
            queue.failed += len(batch)
            self._record(model, version, len(batch), len(batch), time.monotonic() - started, variant)
            return
        finally:
            slots.release()
        now = time.monotonic()
        split(batch, outputs)
        undefined_for = 0
        for job in batch:
            problem = undefined(job)
            if problem:  # NaN is no score: that caller is told, the others keep their results
                undefined_for += 1
                job.fail(BadMessage(f"{model} {version}: {problem}; the model or its pre ops are undefined for "
                                    "this input (e.g. a statistic of a constant signal)"))
                continue
            job.result = InferResult(model=model, version=version, variant=variant, outputs=[], level=level,
                                     driver=driver, batch=len(batch), queue_ms=(started - job.enqueued) * 1e3,
                                     compute_ms=compute_ms, total_ms=(now - job.enqueued) * 1e3)
            job.set_done()
        queue.batches += 1
        queue.batched += len(batch)
        queue.served += len(batch) - undefined_for
        queue.failed += undefined_for
        queue.late += sum(1 for job in batch if job.cancelled)
        queue.batch_took(now - started)
        # (the driver's time, not the round trip: under load the scheduler's own waits would
        # make a run of one look slower than it is)
        self.tuners[model].record(sum(job.rows for job in batch), compute_ms / 1e3, now - started)
        self.m_batch.observe(len(batch), model)
        self.m_depth.set(len(queue), model)
        for job in batch:
            self.m_queue.observe(started - job.enqueued, model, version)
            self.m_compute.observe(now - started, model, version)
            self.m_total.observe(now - job.enqueued, model, version)
        self._record(model, version, len(batch), undefined_for, now - started, variant)

    async def _compute(self, model: str, version: str, variant: str,
                       batch: list[Job]) -> tuple[dict[str, np.ndarray], str, float]:
        """The batch's outputs by name, the driver that computed them and its compute time."""
        inputs = stack(batch)
        manifest = self.manifests[(model, version)]
        if variant == "fallback":  # (its ops were compiled for writable arrays; a frame's view is not)
            x = next(iter(inputs.values()))
            x = x if x.flags.writeable else x.copy()
            return dict(zip([s.name for s in manifest.outputs], fallback(manifest, x))), "scheduler", 0.0
        # the input features, for drift detection (not for the clients)
        features = bool(manifest.pre and manifest.reference)
        runner = self._inline_runner(model, version, variant) if batch[0].pin is None else None
        if runner is not None:  # a model of microseconds: here, sparing the hops to a driver
            outputs, took_ms = await self.inline.run(runner, inputs, features, wanted_outputs(batch) or [])
            where = "scheduler"
        else:
            outputs, where, took_ms = await self._on_driver(model, version, variant, batch, inputs, features)
        if features:
            fdescs, fframes = pack_tensors([outputs.pop(FEATURES)])
            await self.bus.publish(f"samples.{model}", FeatureSamples(model=model, version=version,
                                                                      tensor=fdescs[0]), frames=fframes)
        return outputs, where, took_ms

    async def _on_driver(self, model: str, version: str, variant: str, batch: list[Job],
                         inputs: dict[str, np.ndarray], features: bool) -> tuple[dict[str, np.ndarray], str, float]:
        """The batch run by a driver: its outputs, the driver's name and its time on the batch."""
        run = self._shared(batch[0], inputs) if len(batch) == 1 and batch[0].owner else None
        if run is None:
            descs, frames = pack_tensors(inputs, zero_copy=True)  # the clients' frames, or their stack
            run = Run(model=model, version=version, inputs=descs)
        else:  # the client's regions, named: the driver reads (and writes) them where they are
            frames = []
        run.variant, run.features, run.outputs = variant, features, wanted_outputs(batch) or []

        async def send(driver: Driver) -> Any:
            return await self.bus.request(driver.name, run, frames=frames, deadline=deadline)

        def failed(driver: Driver, exc: Exception) -> None:
            self.log.warning("driver_failed", driver=driver.name, model=model, error=str(exc))

        deadline = max(j.deadline for j in batch)
        pin = batch[0].pin
        if pin is None:
            incoming, driver = await run_with_failover(self.drivers, self.settings.hot_c, deadline, model, send, failed)
        else:  # a stream's chunks run where the stream is pinned, or fail (and it is reset there)
            incoming, driver = await run_pinned(self.drivers, pin, send, failed)
        result = incoming.decode(RunResult)
        outputs = {t.name: self.regions.view(batch[0].owner, t) if t.region else incoming.tensor(t)
                   for t in result.outputs}
        # the driver's whole work on the batch: its pre ops, the model, its post ops
        return outputs, driver.name, result.pre_ms + result.compute_ms + result.post_ms

    def _shared(self, job: Job, inputs: dict[str, np.ndarray]) -> Run | None:
        """A Run naming the client's regions for a job whose inputs all lie in them (None:
        some do not, they go as frames), with its outputs' region when it asked for one."""
        descs, regions = [], {}
        for name, array in inputs.items():
            found = self.regions.locate(job.owner, array)
            if found is None:
                return None
            mapped, offset = found
            regions[mapped.name] = mapped.inode
            descs.append(Tensor(dtype=dtype_name(array.dtype), shape=list(array.shape), name=name, region=mapped.name,
                                offset=offset))
        run = Run(model=job.model, version=job.version, inputs=descs, regions=regions)
        if job.out is not None:
            mapped = self.regions.get(job.owner, job.out[0])
            regions[mapped.name] = mapped.inode
            run.out_region, run.out_offset, run.out_end = mapped.name, job.out[1], mapped.size
        return run

    def _inline_runner(self, model: str, version: str, variant: str) -> Any:
        """The scheduler's own runner of this model when it runs inline (_inline), else None."""
        mode = self.settings.inline_of(model)
        if mode == "off":
            return None
        lane = self.inline
        go = decide_inline(mode, self.tuners[model].alone, self.settings.inline_max_ms,
                           mode == "on" or lane.cpu(self._tg), model in lane.inline)
        runner = lane.runner((model, version, variant), self._tg) if go else None
        if runner is None:
            lane.inline.discard(model)
        else:
            lane.inline.add(model)
        return runner

    # -- the ladder --------------------------------------------------------------------------------

    async def _ladder_steps(self) -> None:
        while True:
            await anyio.sleep(self.settings.step_s)
            depth = sum(len(q) for q in self.queues.values())
            step = self.ladder.step(thermal_pressure(self.drivers, time.monotonic()), depth)
            if step is not None:
                self.m_level.set(step.level)
                self.log.warning("degradation", level=step.level, previous=step.previous, reason=step.reason)
                await self.bus.publish("scheduler.degradation", Degradation(level=step.level, previous=step.previous,
                                                                            reason=step.reason))

    # -- events: model store, health, sensors ------------------------------------------------------

    async def _model_events(self, sub: Subscription) -> None:
        async for _ in sub:
            await self._refresh_models()

    async def _health_events(self, sub: Subscription) -> None:
        async for incoming in sub:
            if incoming.type != "Health":
                continue
            reading = incoming.decode(Health)
            # the sender is stamped by the kernel: the health driver that measured it
            apply_health(self.drivers, incoming.sender, reading.temperature_c)

    async def _watch_drivers(self) -> Subscription | None:
        """Which drivers the kernel reports ready (kernel.services, then ListServices, so no
        change is missed): the scheduler starts beside its drivers, and while none is ready
        requests wait (until their deadline) and pipelines skip their frames, quietly.
        Without the capabilities, every driver is taken as ready and tried."""
        try:
            sub = await self._subscriptions.enter_async_context(self.bus.subscribe("kernel.services"))
            listing = await self.bus.call("kernel", ListServices(), ServiceList, timeout=10)
        except (Forbidden, RemoteError):
            return None
        states = {st.name: st.state for st in listing.services}
        for d in self.drivers:
            d.ready = states.get(d.name) == "ready"
        return sub

    async def _driver_events(self, sub: Subscription) -> None:
        async for incoming in sub:
            if incoming.type != "ServiceStateChanged":
                continue
            change = incoming.decode(ServiceStateChanged)
            for d in self.drivers:
                if d.name == change.name:
                    was, d.ready = d.ready, change.state == "ready"
                    if was and not d.ready:
                        await self.streaming.driver_lost(d.name, change.state)

    async def _sensor_frames(self, pipeline: Pipeline, sub: Subscription) -> None:
        waiting = False
        async for incoming in sub:
            if incoming.header.dest != pipeline.source or incoming.type != "SensorFrame":
                continue
            if not any(d.ready for d in self.drivers):  # (starting beside them: not a failure)
                if not waiting:
                    self.log.debug("pipeline_waiting_for_driver", source=pipeline.source)
                waiting = True
                continue
            waiting = False
            if not pipeline.admit(time.monotonic()):
                continue  # over the pipeline's rate: this frame is skipped
            self._tg.start_soon(self._run_pipeline, pipeline, incoming)

    async def _run_pipeline(self, pipeline: Pipeline, incoming: Incoming) -> None:
        if self.graphs.loading(pipeline.model):  # its ops' kernels (compiling, if numba's cache is cold)
            return
        frame = incoming.decode(SensorFrame)
        samples = incoming.tensor(frame.tensor).copy()
        model = pipeline.model
        deadline = time.time() + pipeline.settings.timeout
        try:
            if pipeline.settings.stream:  # each frame the next chunk of the pipeline's own stream
                result, frames = await self.streaming.run(await self.streaming.for_pipeline(pipeline), (),
                                                          [samples[None, :]], 1, deadline)
            else:
                result, frames = await self.infer(model, [samples[None, :]], "", 1, pipeline.source, deadline)
        except UnknownDestination as exc:  # its model (or a graph's) is not installed: said once
            if not pipeline.missing:
                self.log.info("pipeline_model_missing", model=model, source=pipeline.source, error=str(exc))
            pipeline.missing = str(exc)
            return
        except RemoteError as exc:
            self.log.warning("pipeline_failed", model=model, source=pipeline.source, error=str(exc))
            return
        pipeline.missing = ""
        if pipeline.settings.publish == "outputs":
            await self.bus.publish(pipeline.result_topic, pipeline.outputs(frame.seq, result, frames), frames=frames)
            return
        score = float(np.asarray(frames[0]).view(np.float32).reshape(-1)[0]) if frames else 0.0
        changed = pipeline.score(score)
        await self.bus.publish(pipeline.result_topic, Detection(model=model, version=result.version,
                                                                source=pipeline.source, seq=frame.seq, score=score,
                                                                alert=pipeline.alert, level=result.level))
        if changed is not None:
            state = "raised" if changed else "cleared"
            self.log.warning("alert", model=model, source=pipeline.source, state=state, score=round(score, 3))
            await self.bus.publish(pipeline.alerts_topic, Alert(model=model, source=pipeline.source, state=state,
                                                                score=score, seq=frame.seq))

    # -- health reports for the model store's trial gates ------------------------------------------

    def _record(self, model: str, version: str, n: int, errors: int, seconds: float, variant: str = "") -> None:
        entry = self.served.setdefault((model, version, variant), _Served())
        entry.requests += n
        entry.errors += errors
        if errors:
            self.m_errors.inc(model, version, value=errors)
        entry.latencies_ms.extend([seconds * 1e3] * n)

    async def _report_health(self) -> None:
        while True:
            await anyio.sleep(self.settings.health_report_s)
            served, self.served = self.served, {}
            for (model, version, variant), s in served.items():
                p95 = float(np.percentile(s.latencies_ms, 95)) if s.latencies_ms else 0.0
                try:
                    await self.bus.call("modelstore", ReportHealth(
                        name=model, version=version, requests=s.requests, errors=s.errors, p95_ms=p95,
                        latency_hist=ReportHealth.histogram(s.latencies_ms), variant=variant), HealthRecorded)
                except BusError as exc:
                    self.log.warning("health_report_failed", error=str(exc))

    def _schedule(self) -> Schedule:
        now = time.monotonic()
        return Schedule(
            level=self.ladder.level, pressure=self.ladder.pressure,
            models=[QueueState(model=m, depth=len(q), served=q.served, expired=q.expired, failed=q.failed,
                               late=q.late, batches=q.batches,
                               mean_batch=round(q.batched / q.batches, 2) if q.batches else 0.0,
                               batching=self.tuners[m].describe() if m in self.tuners else "",
                               inline=m in self.inline.inline)
                    for m, q in sorted(self.queues.items())],
            drivers=[d.state(now) for d in self.drivers])


def main() -> None:
    run(Scheduler)
