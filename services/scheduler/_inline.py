"""The inline lane: models of microseconds run in the scheduler's own process.

Through a driver a request crosses the bus twice more each way (scheduler -> kernel ->
driver and back): with Python at both ends and ZeroMQ's I/O threads between, about four
thread wake-ups a hop, 0.3-0.6 ms on a 2-core device, many times what a small model costs
(a 4x4 MatMul: 10 us; a voice-activity frame: 0.2 ms).  For such a model the scheduler
loads it itself (``drivers.ops.ModelRunner``: the session and the manifest's ops, the code
the driver runs, so the result is the same bits) and runs it where it is, on the CPU, one
intra-op thread: on its event loop when a run takes under ``ON_LOOP_S``, else in a worker
thread (the loop goes on serving meanwhile).

* ``auto`` (the default): a model goes inline once its driver's time for a run of one row
  (pre ops, model, post ops: the batch tuner's average) is at most ``inline_max_ms``, and
  only when the drivers it would go to are CPU drivers (a model placed on a GPU stays
  there); it goes back to the drivers when its runs grow past twice that.  ``on``: every
  run of the model (on the CPU).  ``off``: never.  Per model: ``models.NAME.inline``.
* A stream's chunks stay on the driver they are pinned to; the rule-based fallback
  variant is the scheduler's anyway.
* The model is loaded in the background the first time it qualifies (GetModel, decrypted in
  memory only, as the driver does); requests go to the drivers meanwhile, and when it cannot
  be loaded here (say, an op this process cannot build) they go on doing so, said once.
* What this trades: a model running here shares the scheduler's process, so a crash in
  ONNX Runtime would restart the scheduler rather than a driver.  Only small CPU models
  qualify, which exercise nothing a driver's CPU session would not; ``inline = "off"``
  keeps every model behind its driver.

The decision is a pure function (``decide_inline``); the lane holds the runners (at most
``MAX_RUNNERS``, least recently used evicted).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Literal

import anyio

from protocols.accel import Describe, Device
from protocols.modelstore import Manifest
from services import BadMessage, BusError, InternalError

if TYPE_CHECKING:
    from drivers.ops import ModelRunner

__all__ = ["InlineLane", "decide_inline", "MAX_RUNNERS"]

#: models kept loaded in the scheduler at once
MAX_RUNNERS = 16
#: a model whose runs take less than this (CPU seconds, ModelRunner.cpu_s) runs on the event
#: loop; longer ones in a worker thread, so the loop keeps serving other requests meanwhile
ON_LOOP_S = 0.1e-3

Key = tuple[str, str, str]  # model, version, variant


def decide_inline(mode: Literal["auto", "on", "off"], alone_s: float | None, max_ms: float, cpu: bool,
                  inline_now: bool) -> bool:
    """Whether a model's next run goes inline: from its mode, its measured seconds for a
    run of one (None: not measured yet), the limit, whether its drivers are CPU drivers,
    and whether it runs inline now (it leaves only past twice the limit: no flapping)."""
    if mode == "off":
        return False
    if mode == "on":
        return True
    if alone_s is None or not cpu:
        return False
    return alone_s * 1e3 <= (2 * max_ms if inline_now else max_ms)


class InlineLane:
    """The scheduler's own runners.  ``runner(key)``: the loaded runner, or None (then it
    starts loading it in ``tg`` and the caller goes to a driver)."""

    def __init__(self, bus: Any, log: Any, drivers: list[str]) -> None:
        self._bus = bus
        self._log = log
        self._drivers = drivers
        self._runners: OrderedDict[Key, ModelRunner] = OrderedDict()
        self._loading: set[Key] = set()
        #: models this process could not load: they stay on the drivers
        self._refused: set[Key] = set()
        #: whether every driver runs on the CPU (None: not asked yet)
        self._cpu: bool | None = None
        self._asking = False
        #: models that ran inline last time (for decide_inline's hysteresis)
        self.inline: set[str] = set()

    def cpu(self, tg: Any) -> bool:
        """Whether the drivers are CPU drivers (False until they said so: asked once, in ``tg``)."""
        if self._cpu is None and not self._asking:
            self._asking = True
            tg.start_soon(self._ask_drivers)
        return bool(self._cpu)

    async def _ask_drivers(self) -> None:
        kinds = []
        try:
            for name in self._drivers:
                kinds.append((await self._bus.call(name, Describe(), Device, timeout=10)).kind)
            self._cpu = all(kind == "cpu" for kind in kinds)
        except BusError as exc:  # not asked again: an accelerator that cannot say stays in charge
            self._cpu = False
            self._log.info("inline_lane_off", reason=f"a driver did not describe itself: {exc}")

    def runner(self, key: Key, tg: Any) -> ModelRunner | None:
        found = self._runners.get(key)
        if found is not None:
            self._runners.move_to_end(key)
            return found
        if key not in self._loading and key not in self._refused:
            self._loading.add(key)
            tg.start_soon(self._load, key)
        return None

    async def _load(self, key: Key) -> None:
        model, version, variant = key
        try:
            from drivers.ops import fetch_model

            data, manifest, assets = await fetch_model(self._bus.request, model, version, variant)
            runner = await anyio.to_thread.run_sync(_build, data, manifest, assets)
        except Exception as exc:  # it runs on the drivers, as before; said once
            self._refused.add(key)
            self._log.warning("inline_load_failed", model=model, version=version, variant=variant,
                              error=f"{type(exc).__name__}: {exc}")
            return
        finally:
            self._loading.discard(key)
        self._runners[key] = runner
        while len(self._runners) > MAX_RUNNERS:
            self._runners.popitem(last=False)
        self._log.info("inline_loaded", model=model, version=version, variant=variant)

    def retain(self, installed: dict[str, list[str]]) -> None:
        """Close the runners of versions no longer installed (``installed``: model -> its
        versions), and forget that they could not be loaded (a version installed again may)."""
        for key in [k for k in self._runners if k[1] not in installed.get(k[0], ())]:
            del self._runners[key]
        self._refused = {k for k in self._refused if k[1] in installed.get(k[0], ())}

    async def run(self, runner: ModelRunner, inputs: dict[str, Any], features: bool,
                  outputs: list[str]) -> tuple[dict[str, Any], float]:
        """The outputs and the run's milliseconds (pre ops, model, post ops)."""
        from drivers.ops import RunFailed, RunInputError

        def compute() -> tuple[dict[str, Any], tuple[float, float, float]]:
            return runner.run(inputs, features=features, outputs=outputs)

        try:
            # (on the event loop only when it holds it for less than a thread hand-off would cost)
            got, (pre, run, post) = compute() if runner.cpu_s < ON_LOOP_S else await anyio.to_thread.run_sync(compute)
        except RunInputError as exc:
            raise BadMessage(str(exc)) from exc
        except RunFailed as exc:
            raise InternalError(str(exc)) from exc
        return got, pre + run + post


def _build(data: bytes, manifest: Manifest, assets: dict[str, bytes]) -> ModelRunner:
    from drivers.ops import ModelRunner

    return ModelRunner(data, manifest, assets, ["CPUExecutionProvider"], threads=1)
