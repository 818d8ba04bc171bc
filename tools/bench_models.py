"""Real models through the bus: what the path adds, and what batching per model buys.

    python -m tools.bench_models [--runs 3] [--out bench-results/models.json]

The models are real ones as they ship in wheels on the package index (fetched by
``tools.fetch_models``): PP-OCRv4's text-direction classifier (a literal -1 batch
dimension), detector and recogniser from rapidocr-onnxruntime, and silero-vad (a recurrent
model: its state is batched along axis 1, its sample rate is a scalar).  Each is packed as
a user would (`edgebus model pack`, the contract read from the graph, the spec overriding
silero's batch axes) and installed into a throwaway system with one driver of one thread.

* added latency (batch 1): direct ``session.run`` in this process (one intra-op thread, as
  the driver) and through the bus (client -> scheduler -> driver and back), interleaved
  model by model in each run: p50 of both, their difference and ratio, and the outputs
  compared bit for bit;
* throughput at concurrency 32 with batching ``auto`` (the default: batches only where they
  cost less per row, measured on the device) against ``off`` (one request a run), in
  separate systems booted alternately: the target is auto >= off for every model.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from protocols import pack_tensors
from services.scheduler import GetSchedule, Infer, InferResult, Schedule
from tools._benchkit import boot, client, inference_config, install, pack_signed, stop, write_results

#: name -> (model to fetch, pack spec, input maker, latency requests, throughput requests)
CASES: dict[str, tuple[str, dict[str, Any], Any, int, int]] = {
    "text-cls": ("ppocr-cls", {}, lambda rng: {"x": rng.standard_normal((1, 3, 48, 192)).astype(np.float32)}, 300, 1500),
    "text-det": ("ppocr-det", {}, lambda rng: {"x": rng.random((1, 3, 320, 320), dtype=np.float32)}, 60, 160),
    "text-rec": ("ppocr-rec", {}, lambda rng: {"x": rng.standard_normal((1, 3, 48, 320)).astype(np.float32)}, 60, 200),
    "vad": ("silero-vad", {"inputs": {"state": {"batch_axis": 1}}, "outputs": {"stateN": {"batch_axis": 1}}},
            lambda rng: {"input": (rng.standard_normal((1, 512)) * 0.1).astype(np.float32),
                         "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}, 1000, 4000),
}


def _config(pub: str, batching: str) -> str:
    return inference_config(pub, f"""
batching = "{batching}"
max_batch = 16
max_delay_ms = 0
max_queue = 4096
health_report_s = 3600""")


async def _bus_latency(tmp: Path, model: str, inputs: dict[str, np.ndarray], n: int,
                       expected: list[np.ndarray]) -> tuple[list[float], bool]:
    descs, frames = pack_tensors(inputs)
    exact = True
    async with client(tmp) as bus:
        for i in range(min(20, n)):
            incoming = await bus.request("scheduler", Infer(model=model, tensors=descs), frames=frames, timeout=60)
            if i == 0:
                result = incoming.decode(InferResult)
                got = [np.asarray(incoming.tensor(t)) for t in result.outputs]
                exact = len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await bus.request("scheduler", Infer(model=model, tensors=descs), frames=frames, timeout=60)
            times.append(time.perf_counter() - t0)
    return times, exact


def _direct(session: Any, inputs: dict[str, np.ndarray], n: int) -> list[float]:
    for _ in range(min(20, n)):
        session.run(None, inputs)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        session.run(None, inputs)
        times.append(time.perf_counter() - t0)
    return times


async def _throughput(tmp: Path, model: str, inputs: dict[str, np.ndarray], total: int,
                      concurrency: int = 32) -> tuple[float, str]:
    descs, frames = pack_tensors(inputs)
    async with client(tmp) as bus:
        async def run(count: int) -> float:
            remaining = count

            async def worker() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await bus.request("scheduler", Infer(model=model, tensors=descs), frames=frames, timeout=120)

            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(concurrency):
                    tg.start_soon(worker)
            return count / (time.perf_counter() - t0)

        await run(max(64, total // 4))  # warm: sessions, and auto's first measurements
        rate = await run(total)
        schedule = await bus.call("scheduler", GetSchedule(), Schedule)
    decision = next((m.batching for m in schedule.models if m.model == model), "")
    return rate, decision


def main(argv: list[str] | None = None) -> None:
    import onnxruntime as ort
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from tools.fetch_models import ModelUnavailable, model_path

    parser = argparse.ArgumentParser(prog="bench_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every request count (0.2: a quick look)")
    parser.add_argument("--models", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default="bench-results/models.json")
    args = parser.parse_args(argv)
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    tmp = Path(tempfile.mkdtemp(prefix="edgebus-bench-models-"))
    rng = np.random.default_rng(3)
    bundles, inputs, sessions = {}, {}, {}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    for name in args.models:
        fetch, spec, make, _, _ = CASES[name]
        try:
            path = model_path(fetch)
        except ModelUnavailable as exc:
            raise SystemExit(f"bench_models: {exc}") from None
        bundles[name] = pack_signed(path, name, spec, key, tmp)
        inputs[name] = make(rng)
        sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    count = lambda n: max(10, int(n * args.scale))  # noqa: E731

    lat: dict[str, dict[str, list[float]]] = {m: {"direct": [], "bus": []} for m in args.models}
    exact: dict[str, bool] = {m: True for m in args.models}
    rates: dict[str, dict[str, list[float]]] = {m: {"auto": [], "off": []} for m in args.models}
    decisions: dict[str, list[str]] = {m: [] for m in args.models}
    for run in range(args.runs):
        for mode in (("auto", "off") if run % 2 == 0 else ("off", "auto")):
            proc, sys_tmp = boot(_config(pub, mode))
            try:
                anyio.run(install, sys_tmp, bundles)
                for name in args.models:
                    _, _, _, n_lat, n_tp = CASES[name]
                    if mode == "off":  # latency at batch 1 (nothing else running): direct, then the bus
                        lat[name]["direct"].extend(_direct(sessions[name], inputs[name], count(n_lat)))
                        expected = sessions[name].run(None, inputs[name])
                        times, same = anyio.run(_bus_latency, sys_tmp, name, inputs[name], count(n_lat), expected)
                        lat[name]["bus"].extend(times)
                        exact[name] = exact[name] and same
                    rate, decision = anyio.run(_throughput, sys_tmp, name, inputs[name], count(n_tp))
                    rates[name][mode].append(rate)
                    if mode == "auto":
                        decisions[name].append(decision)
            finally:
                stop(proc)
            print(f"run {run + 1}/{args.runs} ({mode}) done", flush=True)

    results: dict[str, Any] = {}
    print(f"\n{'model':10} {'direct p50':>11} {'bus p50':>9} {'added':>9} {'x':>6} {'exact':>6} "
          f"{'auto req/s':>11} {'off req/s':>10} {'auto/off':>9}  auto's decision")
    for name in args.models:
        d, b = statistics.median(lat[name]["direct"]) * 1e3, statistics.median(lat[name]["bus"]) * 1e3
        auto, off = statistics.median(rates[name]["auto"]), statistics.median(rates[name]["off"])
        results[name] = {"direct_p50_ms": d, "bus_p50_ms": b, "added_p50_ms": b - d, "bit_exact": exact[name],
                         "auto_rps": auto, "off_rps": off, "auto_over_off": auto / off,
                         "auto_runs": rates[name]["auto"], "off_runs": rates[name]["off"], "decisions": decisions[name]}
        print(f"{name:10} {d:9.2f}ms {b:7.2f}ms {b - d:7.2f}ms {b / d:6.1f} {str(exact[name]):>6} "
              f"{auto:11.0f} {off:10.0f} {auto / off:9.2f}  {decisions[name][-1] if decisions[name] else ''}")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
