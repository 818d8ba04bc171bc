"""An accelerator driver: one ONNX Runtime device behind the bus.

Execution providers: CPU always; CUDA, TensorRT, OpenVINO, CoreML and the rest when
``onnxruntime.get_available_providers()`` has them (the ``providers`` setting picks, in
order).  After a session is created the providers actually in use are checked, so a
silent fallback to CPU is reported (``Loaded.fell_back_from``, a warning), never hidden.

Sessions are created from model bytes fetched from the model store (``GetModel``: the
model is decrypted only in memory; for the same reason the optimised graph is not cached
on disk).  Options are deliberate: ``intra_op_num_threads`` from the driver's share of the
CPUs (the ``threads`` setting), one inter-op thread (batches arrive one at a time),
all graph optimisations, memory pattern and arena on.

A Run applies the manifest's pre ops (numba kernels in drivers.ops), session.run, then the
post ops, on a whole batch; tensors arrive and leave as zero-copy frames, named as in the
model's contract.  The pre chains must give one row of the model's input per input row
(``drivers.ops.Chains.pre``): an input they make nothing of, or several rows of, is answered
bad-message naming it and what the ops take, never an empty or misaligned result.
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio

from protocols import pack_tensors
from services import BadMessage, Context, InternalError, RemoteError, Service, run

from ._settings import AccelSettings
from protocols.modelstore import AssetBytes, GetAsset, GetModel, Manifest, ModelBytes

from protocols.accel import FEATURES, Describe, Device, Load, Loaded, Request, Reply, Run, RunResult

__all__ = ["AcceleratorDriver"]


class _Model:
    def __init__(self, session: Any, manifest: Manifest, providers: list[str], assets: dict[str, bytes]) -> None:
        self.session = session
        self.manifest = manifest
        self.providers = providers
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        #: its last run took under 0.5 ms: run it on the event loop, not in a worker thread
        self.quick = False
        #: the manifest's pre and post chains, ops and parameters checked once, here, at load
        self.chains: Any = None
        #: what a failing op raises (empty when the model has no ops: numba stays unimported)
        self.op_errors: tuple[type[Exception], ...] = ()
        if manifest.pre or manifest.post:
            from drivers.ops import OpsError, build_chains

            self.chains = build_chains(manifest, assets)
            self.op_errors = (OpsError,)


class AcceleratorDriver(Service):
    name = "accel-cpu"
    Settings = AccelSettings
    Request = Request
    Reply = Reply
    max_concurrency = 4

    async def setup(self) -> None:
        import onnxruntime as ort

        self.ort = ort
        available = ort.get_available_providers()
        wanted = self.settings.providers or ["CPUExecutionProvider"]
        missing = [p for p in wanted if p not in available]
        if missing:
            self.log.warning("providers_unavailable", wanted=missing, available=available)
        self.providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        self.threads = self.settings.threads or max(1, (os.cpu_count() or 2) // 2)
        self.models: dict[tuple[str, str, str], _Model] = {}
        self._loading: dict[tuple[str, str, str], anyio.Event] = {}
        if self.settings.warm_ops:
            await self._warm_ops()
        self.log.info("accelerator_ready", providers=self.providers, threads=self.threads)

    async def _warm_ops(self) -> None:
        """Compile the ops (or load them from numba's cache) before READY: see _warm."""
        from ._warm import warm

        started = time.perf_counter()
        try:
            count = await anyio.to_thread.run_sync(warm)
        except Exception as exc:  # a broken op must not stop the driver: its models fail, and say why
            self.log.warning("ops_not_warmed", error=f"{type(exc).__name__}: {exc}")
            return
        took = time.perf_counter() - started
        # (seconds: numba's cache was cold, e.g. a first start without `make`'s warm-up)
        (self.log.info if took > 2 else self.log.debug)("ops_warmed", ops=count, seconds=round(took, 2))

    async def handle(self, req: Request, ctx: Context) -> Reply | tuple[Reply, list]:
        match req:
            case Describe():
                return self._describe()
            case Load(model=name, version=version, variant=variant):
                started = time.perf_counter()
                m = await self._model(name, version, variant)
                return Loaded(model=name, version=version, variant=variant, providers=m.providers,
                              fell_back_from=[p for p in self.providers if p not in m.providers],
                              load_ms=(time.perf_counter() - started) * 1e3)
            case Run():
                return await self._run(req, ctx)

    async def _model(self, name: str, version: str, variant: str) -> _Model:
        key = (name, version, variant)
        while key not in self.models:
            if key in self._loading:  # someone is loading it: wait for that
                await self._loading[key].wait()
                continue
            self._loading[key] = done = anyio.Event()
            try:
                incoming = await self.bus.request("modelstore", GetModel(name=name, version=version, variant=variant),
                                                  timeout=60)
                meta = incoming.decode(ModelBytes)
                data = bytes(incoming.frames[0].buffer)
                assets = await self._assets(meta.manifest)
                self.models[key] = await anyio.to_thread.run_sync(self._session, data, meta.manifest, assets)
                self.log.info("model_loaded", model=name, version=version, variant=variant,
                              providers=self.models[key].providers)
            finally:
                del self._loading[key]
                done.set()
        return self.models[key]

    async def _assets(self, manifest: Manifest) -> dict[str, bytes]:
        """The bundle's assets its ops read ("asset:NAME" parameters), from the model store."""
        if not (manifest.pre or manifest.post):
            return {}
        from drivers.ops import check_chains

        names = check_chains(manifest).assets
        found: dict[str, bytes] = {}
        for name in names:
            incoming = await self.bus.request("modelstore", GetAsset(name=manifest.name, asset=name,
                                                                     version=manifest.version), timeout=60)
            incoming.decode(AssetBytes)
            found[name] = bytes(incoming.frames[0].buffer)
        return found

    def _session(self, data: bytes, manifest: Manifest, assets: dict[str, bytes]) -> _Model:
        ort = self.ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(data, opts, providers=self.providers)
        used = session.get_providers()
        fell = [p for p in self.providers if p not in used]
        if fell:
            self.log.warning("provider_fallback", requested=self.providers, used=used,
                             detail="ONNX Runtime silently fell back; this session runs on " + ", ".join(used))
        return _Model(session, manifest, used, assets)

    async def _run(self, req: Run, ctx: Context) -> tuple[RunResult, list]:
        m = await self._model(req.model, req.version, req.variant)
        # named as the scheduler checked them against the model's contract
        inputs = {t.name: ctx.tensor(t) for t in req.inputs}  # a malformed descriptor answers bad-message
        ops = m.chains is not None and not req.raw

        def compute() -> tuple[dict[str, Any], float, float, float]:
            t0 = time.perf_counter()
            feed = inputs
            if ops:
                try:
                    feed = m.chains.pre(inputs)
                except m.op_errors as exc:
                    raise BadMessage(f"{req.model}: an input does not fit its pre ops: {exc}") from exc
            t1 = time.perf_counter()
            outputs = dict(zip(m.output_names, m.session.run(None, feed)))
            t2 = time.perf_counter()
            if ops:
                try:
                    outputs = m.chains.post(outputs)
                except m.op_errors as exc:
                    raise BadMessage(f"{req.model}: its post ops cannot take what the model gave: {exc}") from exc
            if req.features:
                outputs[FEATURES] = feed[m.input_names[0]]
            t3 = time.perf_counter()
            return outputs, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3

        try:
            if m.quick:  # microseconds of work: a thread hand-off would cost more than it
                outputs, pre_ms, run_ms, post_ms = compute()
            else:
                outputs, pre_ms, run_ms, post_ms = await anyio.to_thread.run_sync(compute)
            m.quick = (pre_ms + run_ms + post_ms) < 0.5
        except RemoteError:  # bad-message from the ops, said as the client should read it
            raise
        except Exception as exc:  # ORT's errors: wrong dtype/shape, NaN checks...
            message = str(exc).splitlines()[0][:400]
            if "INVALID_ARGUMENT" in str(exc) or "Unexpected input" in str(exc) or "data type" in str(exc):
                raise BadMessage(f"{req.model}: {message}") from exc
            raise InternalError(f"{req.model}: {message}") from exc
        if req.outputs:  # only what the scheduler's callers asked for travels back
            unknown = [n for n in req.outputs if n not in outputs]
            if unknown:
                raise BadMessage(f"{req.model} gives no output {', '.join(map(repr, unknown))}; it gives "
                                 f"{', '.join(map(repr, outputs))}")
            outputs = {n: outputs[n] for n in (*req.outputs, *([FEATURES] if req.features else []))}
        descs, frames = pack_tensors(outputs, zero_copy=True)  # ours (ORT's or the ops' new arrays), never written again
        return RunResult(outputs=descs, compute_ms=run_ms, pre_ms=pre_ms, post_ms=post_ms), frames

    def _describe(self) -> Device:
        from drivers.health import read_cpu_load, read_memory, read_temperature

        return Device(kind="cpu" if self.providers == ["CPUExecutionProvider"] else self.providers[0],
                      providers=self.providers, threads=self.threads, memory_bytes=read_memory()[0],
                      load=read_cpu_load(), temperature_c=read_temperature(),
                      sessions=[f"{n} {v} {var}" for n, v, var in self.models])


def main() -> None:
    run(AcceleratorDriver)
