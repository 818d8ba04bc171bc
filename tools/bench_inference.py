"""Inference benchmark: what the bus path adds over a direct ``session.run``; dynamic batching.

    python -m tools.bench_inference [--n 2000] [--out bench-results/inference.json]

* added latency: the same small model (a 4x4 MatMul, batch 1) and input, run directly with
  ONNX Runtime in this process, and through the bus (client -> scheduler -> accelerator
  driver -> back, two hops through the kernel each way): p50 and p99 of both, and their
  difference;
* dynamic batching: requests/s at concurrency 32 on a batchable model (a 256x256 MatMul)
  with batching (max batch 16, formed while the driver is busy) against without (max batch
  1), same run;
* first inference after boot: from exec of ``edgebus boot`` to the first answered Infer of
  the demo vibration model (numba's cache warm from the earlier runs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import anyio
import numpy as np

from protocols import pack_tensors
from services import connect
from protocols.modelstore import Activate, Install, ModelState
from services.scheduler import Infer
from tools._benchkit import boot, matmul_onnx, stop, write_results


def _config(pub: str, max_batch: int) -> str:
    return f"""
[services.security]
command = ["{{python}}", "-m", "services.security"]
capabilities = ["call:kernel.Grant", "call:kernel.Revoke", "call:kernel.Enroll", "call:kernel.GetMeasurements", "subscribe:kernel.audit"]
settings = {{ trusted_keys = [{{ label = "bench", public_key = "{pub}" }}] }}
[services.modelstore]
command = ["{{python}}", "-m", "services.modelstore"]
requires = ["security"]
capabilities = ["call:security.VerifySignature", "call:security.Seal", "call:security.Unseal", "call:security.AuditAppend", "publish:modelstore.*"]
[services.accel-cpu]
command = ["{{python}}", "-m", "drivers.accel"]
requires = ["modelstore"]
capabilities = ["call:modelstore.GetModel"]
settings = {{ threads = 1 }}
[services.scheduler]
command = ["{{python}}", "-m", "services.scheduler"]
requires = ["modelstore"]
capabilities = ["call:modelstore.*", "call:accel-*", "subscribe:modelstore.*", "subscribe:health.*", "publish:scheduler.*"]
settings = {{ max_batch = {max_batch}, max_delay_ms = 0, max_queue = 4096 }}
"""


def _bundle(name: str, model: bytes, n: int, key) -> bytes:
    import msgspec

    from services.modelstore import Bundle, Manifest

    manifest = msgspec.convert({"name": name, "version": "1.0.0", "created": 1.0,
                                "inputs": [{"name": "x", "dtype": "float32", "shape": [None, n]}],
                                "outputs": [{"name": "y", "dtype": "float32", "shape": [None, n]}],
                                "variants": {"full": {"file": "full.onnx", "sha256": "", "size": 0}}}, Manifest)
    b = Bundle.create(manifest, {"full.onnx": model})
    b.sign(key)
    return b.to_bytes()


async def _prepare(tmp: Path, bundles: list[bytes]) -> None:
    from protocols import ListServices, ServiceList

    async with connect("bench", run_dir=tmp / "run", credential=(tmp / "run/credentials/operator").read_text()) as bus:
        sub = await bus.subscribe("kernel.services")
        while True:
            st = await bus.call("kernel", ListServices(), ServiceList)
            if st.services and all(s.state == "ready" for s in st.services):
                break
            await sub.receive()
        for b in bundles:
            installed = await bus.request("modelstore", Install(), frames=[b], timeout=120)
            from protocols.modelstore import Installed

            i = installed.decode(Installed)
            await bus.call("modelstore", Activate(name=i.name, version=i.version), ModelState)


async def _latency(tmp: Path, x: np.ndarray, n: int) -> list[float]:
    descs, frames = pack_tensors([x])
    async with connect("bench", run_dir=tmp / "run", credential=(tmp / "run/credentials/operator").read_text()) as bus:
        for _ in range(200):
            await bus.request("scheduler", Infer(model="small", tensors=descs), frames=frames)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await bus.request("scheduler", Infer(model="small", tensors=descs), frames=frames)
            times.append(time.perf_counter() - t0)
    return times


async def _throughput(tmp: Path, x: np.ndarray, total: int, concurrency: int = 32) -> float:
    descs, frames = pack_tensors([x])
    async with connect("bench", run_dir=tmp / "run", credential=(tmp / "run/credentials/operator").read_text()) as bus:
        for _ in range(50):
            await bus.request("scheduler", Infer(model="wide", tensors=descs), frames=frames)
        remaining = total
        t0 = time.perf_counter()

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await bus.request("scheduler", Infer(model="wide", tensors=descs), frames=frames, timeout=30)

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        return total / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    import onnxruntime as ort
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    parser = argparse.ArgumentParser(prog="bench_inference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--throughput-n", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="bench-results/inference.json")
    args = parser.parse_args(argv)
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    small, wide = matmul_onnx(4), matmul_onnx(256, 1)
    bundles = [_bundle("small", small, 4, key), _bundle("wide", wide, 256, key)]
    x_small = np.ones((1, 4), dtype=np.float32)
    x_wide = np.random.default_rng(2).standard_normal((1, 256)).astype(np.float32)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(small, opts, providers=["CPUExecutionProvider"])
    for _ in range(200):
        session.run(None, {"x": x_small})
    direct = []
    for _ in range(args.n):
        t0 = time.perf_counter()
        session.run(None, {"x": x_small})
        direct.append(time.perf_counter() - t0)

    results: dict = {"direct_us": {}, "bus_us": {}, "throughput": {"batched": [], "unbatched": []}}
    bus_runs: list[list[float]] = []
    for run in range(args.runs):
        for mode in (("batched", "unbatched") if run % 2 == 0 else ("unbatched", "batched")):
            proc, tmp = boot(_config(pub, 16 if mode == "batched" else 1))
            try:
                anyio.run(_prepare, tmp, bundles)
                if mode == "batched":
                    bus_runs.append(anyio.run(_latency, tmp, x_small, args.n))
                results["throughput"][mode].append(anyio.run(_throughput, tmp, x_wide, args.throughput_n))
            finally:
                stop(proc)
    bus = sorted(t for run in bus_runs for t in run)
    direct.sort()
    pct = lambda v, q: v[min(len(v) - 1, int(len(v) * q))] * 1e6  # noqa: E731
    results["direct_us"] = {"p50": pct(direct, 0.5), "p99": pct(direct, 0.99)}
    results["bus_us"] = {"p50": pct(bus, 0.5), "p99": pct(bus, 0.99)}
    batched, unbatched = (statistics.median(results["throughput"][m]) for m in ("batched", "unbatched"))

    # first inference after boot, numba cache warm (the demo system)
    t0 = time.perf_counter()
    proc, tmp = boot(None)
    first_ms = None
    try:
        from drivers.sensors import VibrationSimulator

        frame = VibrationSimulator().frame()[None, :]

        async def first() -> None:
            descs, frames = pack_tensors([frame])
            cred = tmp / "run/credentials/operator"
            while not cred.exists():
                await anyio.sleep(0.01)
            async with connect("bench", run_dir=tmp / "run", credential=cred.read_text()) as bus:
                while True:
                    try:
                        await bus.request("scheduler", Infer(model="vibration-anomaly", tensors=descs), frames=frames,
                                          timeout=5)
                        return
                    except Exception:
                        await anyio.sleep(0.01)

        anyio.run(first)
        first_ms = (time.perf_counter() - t0) * 1e3
    finally:
        stop(proc)

    added = results["bus_us"]["p50"] - results["direct_us"]["p50"]
    print(f"direct session.run: p50 {results['direct_us']['p50']:.0f} us, p99 {results['direct_us']['p99']:.0f} us")
    print(f"through the bus:    p50 {results['bus_us']['p50']:.0f} us, p99 {results['bus_us']['p99']:.0f} us "
          f"(added at p50: {added / 1000:.2f} ms; target 0.4 ms)")
    print(f"concurrency 32, 256x256 MatMul: batched {batched:.0f} req/s, unbatched {unbatched:.0f} req/s "
          f"({batched / unbatched:.2f}x; target 2x)")
    print(f"first inference after boot (demo system, numba cache warm): {first_ms:.0f} ms")
    write_results(args.out, {**results, "added_p50_ms": added / 1000, "batching_ratio": batched / unbatched,
                            "first_inference_ms": first_ms})


if __name__ == "__main__":
    main()
