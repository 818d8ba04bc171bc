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

from protocols import DecodeError
from protocols.shm import RegionCache, RegionError, place_or_pack, region_view
from drivers.ops import ModelRunner, RunFailed, RunInputError, fetch_model
from services import BadMessage, Context, InternalError, Service, run

from ._settings import AccelSettings
from protocols.modelstore import Manifest

from protocols.accel import Describe, Device, Load, Loaded, Request, Reply, Run, RunResult

__all__ = ["AcceleratorDriver"]


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
        self.models: dict[tuple[str, str, str], ModelRunner] = {}
        self._loading: dict[tuple[str, str, str], anyio.Event] = {}
        #: clients' shared-memory regions the scheduler named, open (bounded: least recent closed)
        self.shm = RegionCache(int(self.settings.max_region_mb * 2**20), int(self.settings.max_region_mb * 2**20))
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

    async def _model(self, name: str, version: str, variant: str) -> ModelRunner:
        key = (name, version, variant)
        while key not in self.models:
            if key in self._loading:  # someone is loading it: wait for that
                await self._loading[key].wait()
                continue
            self._loading[key] = done = anyio.Event()
            try:
                data, manifest, assets = await fetch_model(self.bus.request, name, version, variant)
                self.models[key] = await anyio.to_thread.run_sync(self._session, data, manifest, assets)
                self.log.info("model_loaded", model=name, version=version, variant=variant,
                              providers=self.models[key].providers)
            finally:
                del self._loading[key]
                done.set()
        return self.models[key]

    def _session(self, data: bytes, manifest: Manifest, assets: dict[str, bytes]) -> ModelRunner:
        runner = ModelRunner(data, manifest, assets, self.providers, self.threads)
        fell = [p for p in self.providers if p not in runner.providers]
        if fell:
            self.log.warning("provider_fallback", requested=self.providers, used=runner.providers,
                             detail="ONNX Runtime silently fell back; this session runs on " + ", ".join(runner.providers))
        return runner

    async def _run(self, req: Run, ctx: Context) -> tuple[RunResult, list]:
        m = await self._model(req.model, req.version, req.variant)
        # named as the scheduler checked them against the model's contract; a tensor in a
        # client's shared-memory region is read where the client wrote it
        inputs = {t.name: self._region_view(t, req.regions) if t.region else ctx.tensor(t) for t in req.inputs}

        def compute() -> tuple[dict[str, Any], tuple[float, float, float]]:
            return m.run(inputs, raw=req.raw, features=req.features, outputs=req.outputs)

        try:
            if m.quick:  # microseconds of work: a thread hand-off would cost more than it
                outputs, (pre_ms, run_ms, post_ms) = compute()
            else:
                outputs, (pre_ms, run_ms, post_ms) = await anyio.to_thread.run_sync(compute)
        except RunInputError as exc:  # said as the client should read it
            raise BadMessage(str(exc)) from exc
        except RunFailed as exc:
            raise InternalError(str(exc)) from exc
        except Exception as exc:  # an op's kernel failing some other way: a bug, said as one
            raise InternalError(f"{req.model}: {type(exc).__name__}: {str(exc)[:400]}") from exc
        # into the client's region when it asked and they fit; else frames of our (ORT's or the
        # ops' new) arrays, never written again
        buf = self._region(req.out_region, req.regions) if req.out_region else None
        descs, frames = place_or_pack(outputs, req.out_region, buf, req.out_offset, req.out_end)
        return RunResult(outputs=descs, compute_ms=run_ms, pre_ms=pre_ms, post_ms=post_ms), frames

    def _region(self, name: str, regions: dict[str, int]) -> Any:
        if name not in regions:
            raise BadMessage(f"region {name!r} is not among the run's regions")
        try:
            return self.shm.get(name, regions[name])
        except RegionError as exc:
            raise BadMessage(str(exc)) from None

    def _region_view(self, desc: Any, regions: dict[str, int]) -> Any:
        try:
            return region_view(desc, self._region(desc.region, regions))
        except DecodeError as exc:
            raise BadMessage(str(exc)) from None

    def _describe(self) -> Device:
        from drivers.health import read_cpu_load, read_memory, read_temperature

        return Device(kind="cpu" if self.providers == ["CPUExecutionProvider"] else self.providers[0],
                      providers=self.providers, threads=self.threads, memory_bytes=read_memory()[0],
                      load=read_cpu_load(), temperature_c=read_temperature(),
                      sessions=[f"{n} {v} {var}" for n, v, var in self.models])


def main() -> None:
    run(AcceleratorDriver)
