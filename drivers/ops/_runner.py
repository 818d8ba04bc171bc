"""A model between its ops: one ONNX Runtime session with the manifest's pre and post chains.

The accelerator driver runs every model through one of these, and the scheduler runs
the models it keeps in its own process (its inline lane for models of microseconds, where
two bus hops would cost many times the model) through the same code, so that a result
does not depend on where it was computed.  ONNX Runtime (and numba, when the model has
ops) are imported when the first runner is built, never by importing this module.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Awaitable, Callable, Mapping, Sequence

from protocols.accel import FEATURES
from protocols.modelstore import AssetBytes, GetAsset, GetModel, Manifest, ModelBytes

from ._chain import build_chains
from ._exceptions import OpsError

__all__ = ["ModelRunner", "RunInputError", "RunFailed", "Timings", "fetch_model"]


class RunInputError(ValueError):
    """The inputs do not fit the model or its ops (the caller's mistake: bad-message)."""


class RunFailed(RuntimeError):
    """The model or its ops failed on inputs that fit them (internal)."""


Timings = tuple[float, float, float]  # pre ops, model, post ops (milliseconds)


async def fetch_model(request: Callable[..., Awaitable[Any]], name: str, version: str,
                      variant: str) -> tuple[bytes, Manifest, dict[str, bytes]]:
    """A model's bytes (decrypted by the model store, kept in memory only), its manifest and
    the assets its ops read ("asset:NAME" parameters), through ``request`` (a bus client's
    ``request``: the model store's GetModel and GetAsset)."""
    incoming = await request("modelstore", GetModel(name=name, version=version, variant=variant), timeout=60)
    manifest = incoming.decode(ModelBytes).manifest
    data = bytes(incoming.frames[0].buffer)
    assets: dict[str, bytes] = {}
    if manifest.pre or manifest.post:
        from ._chain import check_chains

        for asset in check_chains(manifest).assets:
            got = await request("modelstore", GetAsset(name=name, asset=asset, version=manifest.version), timeout=60)
            got.decode(AssetBytes)
            assets[asset] = bytes(got.frames[0].buffer)
    return data, manifest, assets


class ModelRunner:
    """``ModelRunner(data, manifest, assets, providers, threads)``: the session (its
    providers actually used in ``providers``) and the chains built and checked once; then
    ``run(inputs)`` on a whole batch, by input name."""

    def __init__(self, data: bytes, manifest: Manifest, assets: Mapping[str, bytes], providers: Sequence[str],
                 threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1  # batches arrive one at a time
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(data, opts, providers=list(providers))
        self.manifest = manifest
        #: the providers ONNX Runtime actually uses (it falls back to CPU silently)
        self.providers: list[str] = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        #: seconds its last run took (pre ops, model, post ops; 0 before the first)
        self.last_s = 0.0
        #: this thread's CPU seconds in each of the last five runs (see ``cpu_s``)
        self._cpu_runs: deque[float] = deque(maxlen=5)
        #: the manifest's chains (None without ops: numba stays unimported)
        self.chains: Any = build_chains(manifest, dict(assets)) if (manifest.pre or manifest.post) else None

    @property
    def cpu_s(self) -> float:
        """The CPU seconds of a run, the median of the last five (0 before the first): what
        running it on an event loop holds the loop for (unlike ``last_s``, not inflated by
        waits for the GIL in a worker thread beside a busy loop, nor moved by one slow run:
        a collection, a fault)."""
        runs = self._cpu_runs
        return sorted(runs)[len(runs) // 2] if runs else 0.0

    @property
    def quick(self) -> bool:
        """Its runs take under 0.5 ms of CPU: callers may run it where they are, without a
        thread."""
        return 0.0 < self.cpu_s < 0.5e-3

    def run(self, inputs: Mapping[str, Any], *, raw: bool = False, features: bool = False,
            outputs: Sequence[str] = ()) -> tuple[dict[str, Any], Timings]:
        """The outputs by name (the model's and its post ops'; only ``outputs`` when it names
        some, plus the model input under FEATURES when ``features``) and the timings.  With
        ``raw``, the ops are skipped.  Raises RunInputError or RunFailed."""
        ops = self.chains is not None and not raw
        name = self.manifest.name
        c0 = time.thread_time()
        t0 = time.perf_counter()
        feed = inputs
        if ops:
            try:
                feed = self.chains.pre(inputs)
            except OpsError as exc:
                raise RunInputError(f"{name}: an input does not fit its pre ops: {exc}") from exc
        t1 = time.perf_counter()
        try:
            got = dict(zip(self.output_names, self.session.run(None, feed)))
        except Exception as exc:  # ORT's own errors: wrong dtype/shape, a failing kernel...
            text = str(exc)
            message = f"{name}: {text.splitlines()[0][:400] if text else type(exc).__name__}"
            if "INVALID_ARGUMENT" in text or "Unexpected input" in text or "data type" in text:
                raise RunInputError(message) from exc
            raise RunFailed(message) from exc
        t2 = time.perf_counter()
        if ops:
            try:
                got = self.chains.post(got)
            except OpsError as exc:
                raise RunInputError(f"{name}: its post ops cannot take what the model gave: {exc}") from exc
        if features:
            got[FEATURES] = feed[self.input_names[0]]
        t3 = time.perf_counter()
        self.last_s = t3 - t0
        self._cpu_runs.append(time.thread_time() - c0)
        if outputs:
            unknown = [n for n in outputs if n not in got]
            if unknown:
                raise RunInputError(f"{name} gives no output {', '.join(map(repr, unknown))}; it gives "
                                    f"{', '.join(map(repr, got))}")
            got = {n: got[n] for n in (*outputs, *([FEATURES] if features else []))}
        return got, ((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)
