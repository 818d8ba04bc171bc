"""Inference benchmark: what the bus path adds over a direct ``session.run``; dynamic batching.

    python -m tools.bench_inference [--n 2000] [--out bench-results/inference.json]

* added latency: three models, each run directly with ONNX Runtime in this process and
  through the bus (client -> scheduler -> accelerator driver -> back, two hops through the
  kernel each way), interleaved run by run: p50 and p99 of both and their difference, for
  a tiny model (a 4x4 MatMul, 16 B in), a 1 ms model (a [48, 1024] x [1024, 1024] MatMul,
  192 KiB in and out) and a model with megabyte tensors (a channel mean of a [1, 3, 320,
  320] float32 image: 1.2 MB in, 0.4 MB out);
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
from services import SharedRegion, connect
from services.scheduler import Infer
from tools._benchkit import (boot, channel_mean_onnx, client, inference_config, install, matmul_onnx, stop,
                             write_results)


def _config(pub: str, max_batch: int, inline: str = "auto") -> str:
    return inference_config(pub, f"max_batch = {max_batch}\nmax_delay_ms = 0\nmax_queue = 4096\ninline = \"{inline}\"")


def _bundle(name: str, model: bytes, n: int | None, key, in_shape: list | None = None,
            out_shape: list | None = None) -> bytes:
    import msgspec

    from services.modelstore import Bundle, Manifest

    manifest = msgspec.convert({"name": name, "version": "1.0.0", "created": 1.0,
                                "inputs": [{"name": "x", "dtype": "float32", "shape": in_shape or [None, n]}],
                                "outputs": [{"name": "y", "dtype": "float32", "shape": out_shape or [None, n]}],
                                "variants": {"full": {"file": "full.onnx", "sha256": "", "size": 0}}}, Manifest)
    b = Bundle.create(manifest, {"full.onnx": model})
    b.sign(key)
    return b.to_bytes()


async def _latency(tmp: Path, model: str, x: np.ndarray, n: int) -> list[float]:
    descs, frames = pack_tensors([x])
    async with client(tmp) as bus:
        for _ in range(min(200, n)):
            await bus.request("scheduler", Infer(model=model, tensors=descs), frames=frames)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await bus.request("scheduler", Infer(model=model, tensors=descs), frames=frames)
            times.append(time.perf_counter() - t0)
    return times


async def _latency_shm(tmp: Path, model: str, x: np.ndarray, n: int) -> list[float]:
    """As _latency, the input written once into a shared-memory region of the client's (as a
    camera writing there would) and the outputs written into it: no megabytes on the bus."""
    async with client(tmp) as bus:
        async with SharedRegion(bus, 2 * x.nbytes + (1 << 20)) as region:
            descs = region.put({"x": x})
            infer = Infer(model=model, tensors=descs, out_region=region.name, out_offset=x.nbytes + 4096)
            for _ in range(min(200, n)):
                await bus.request("scheduler", infer)
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                await bus.request("scheduler", infer)
                times.append(time.perf_counter() - t0)
    return times


def _direct(session, x: np.ndarray, n: int) -> list[float]:
    for _ in range(min(200, n)):
        session.run(None, {"x": x})
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return times


async def _throughput(tmp: Path, x: np.ndarray, total: int, concurrency: int = 32) -> float:
    descs, frames = pack_tensors([x])
    async with client(tmp) as bus:
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
    parser.add_argument("--inline", choices=("auto", "on", "off"), default="auto",
                        help="the scheduler's inline lane (auto: small models run in the scheduler)")
    parser.add_argument("--out", default="bench-results/inference.json")
    args = parser.parse_args(argv)
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    small, wide, mid, image = matmul_onnx(4), matmul_onnx(256, 1), matmul_onnx(1024, 3), channel_mean_onnx()
    bundles = {"small": _bundle("small", small, 4, key), "wide": _bundle("wide", wide, 256, key),
               "mid": _bundle("mid", mid, 1024, key),
               "image": _bundle("image", image, None, key, [None, 3, None, None], [None, 1, None, None])}
    rng = np.random.default_rng(2)
    x_wide = rng.standard_normal((1, 256)).astype(np.float32)
    #: name -> (model bytes, input, requests per run)
    cases = {"small": (small, np.ones((1, 4), dtype=np.float32), args.n),
             "mid": (mid, rng.standard_normal((48, 1024)).astype(np.float32), max(50, args.n // 4)),
             "image": (image, rng.random((1, 3, 320, 320), dtype=np.float32), max(50, args.n // 8))}

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # as the benchmark's driver (threads = 1)
    sessions = {name: ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
                for name, (model, _, _) in cases.items()}

    results: dict = {"latency": {name: {"direct": [], "bus": []} for name in (*cases, "image-shm")},
                     "throughput": {"batched": [], "unbatched": []}}
    for run in range(args.runs):
        for mode in (("batched", "unbatched") if run % 2 == 0 else ("unbatched", "batched")):
            proc, tmp = boot(_config(pub, 16 if mode == "batched" else 1, args.inline))
            try:
                anyio.run(install, tmp, bundles)
                if mode == "batched":  # direct and through the bus, one after the other per model
                    for name, (_, x, n) in cases.items():
                        results["latency"][name]["direct"].extend(_direct(sessions[name], x, n))
                        results["latency"][name]["bus"].extend(anyio.run(_latency, tmp, name, x, n))
                        if name == "image":  # the same model, its tensors in shared memory
                            results["latency"]["image-shm"]["direct"].extend(_direct(sessions[name], x, n))
                            results["latency"]["image-shm"]["bus"].extend(anyio.run(_latency_shm, tmp, name, x, n))
                results["throughput"][mode].append(anyio.run(_throughput, tmp, x_wide, args.throughput_n))
            finally:
                stop(proc)
    pct = lambda v, q: sorted(v)[min(len(v) - 1, int(len(v) * q))] * 1e6  # noqa: E731
    added: dict[str, dict[str, float]] = {}
    for name, times in results["latency"].items():
        row = {f"{side}_{q}_us": pct(times[side], p) for side in ("direct", "bus") for q, p in (("p50", .5), ("p99", .99))}
        row["added_p50_ms"] = (row["bus_p50_us"] - row["direct_p50_us"]) / 1e3
        row["added_p99_ms"] = (row["bus_p99_us"] - row["direct_p99_us"]) / 1e3
        added[name] = row
    results["latency"] = added
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

    targets = {"small": (0.4, 0.8), "mid": (None, None), "image": (1.0, None), "image-shm": (1.0, None)}
    labels = {"small": "tiny model (4x4 MatMul, 16 B in)", "mid": "1 ms model (48x1024 @ 1024x1024, 192 KiB in/out)",
              "image": "MB tensors (1.2 MB in / 0.4 MB out)",
              "image-shm": "MB tensors in shared memory (services.SharedRegion)"}
    print(f"{'model':50} {'direct p50':>10} {'bus p50':>9} {'added p50':>10} {'added p99':>10} {'bus/direct':>10}")
    for name, row in added.items():
        t50, t99 = targets[name]
        note = " ".join(f"(target {label} {t} ms)" for label, t in (("p50", t50), ("p99", t99)) if t is not None)
        print(f"{labels[name]:50} {row['direct_p50_us'] / 1e3:8.2f}ms {row['bus_p50_us'] / 1e3:7.2f}ms "
              f"{row['added_p50_ms']:8.2f}ms {row['added_p99_ms']:8.2f}ms "
              f"{row['bus_p50_us'] / row['direct_p50_us']:9.1f}x {note}")
    print(f"concurrency 32, 256x256 MatMul: batched {batched:.0f} req/s, unbatched {unbatched:.0f} req/s "
          f"({batched / unbatched:.2f}x; target 2x)")
    print(f"first inference after boot (demo system, numba cache warm): {first_ms:.0f} ms")
    write_results(args.out, {**results, "batching_ratio": batched / unbatched, "first_inference_ms": first_ms})

if __name__ == "__main__":
    main()
