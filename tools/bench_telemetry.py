"""Telemetry benchmark: metric ingestion while inference runs; the outbox; telemetry's RSS.

    python -m tools.bench_telemetry [--seconds 5] [--out bench-results/telemetry.json]

* ingestion: a load generator publishes metric snapshots (200 samples each) at ``--rate``
  samples per second (20,000) to the telemetry service, which counts what it ingested; a client
  measures inference round trips (the 4x4 model through scheduler and driver).  Inference
  p99 is measured with and without the load, alternating, in the same run;
* outbox: durable writes per second (SQLite WAL, synchronous FULL, 200-byte messages);
* telemetry's RSS after the load.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import anyio
import numpy as np

from protocols import ListServices, ServiceList, pack_tensors
from protocols.modelstore import Activate, Install, Installed, ModelState
from protocols.scheduler import Infer
from protocols.telemetry import MetricFamily, MetricsSnapshot, Sample
from services import connect
from services.telemetry import Outbox
from tools._benchkit import boot, matmul_onnx, stop, write_results
from tools.bench_inference import _bundle, _config


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def outbox_throughput(n: int = 2000) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        box = Outbox(Path(tmp) / "o.db")
        payload = b"x" * 200
        t0 = time.perf_counter()
        for _ in range(n):
            box.put("summary", payload, 0)
        rate = n / (time.perf_counter() - t0)
        box.close()
    return rate


async def run(args: argparse.Namespace) -> dict:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    config = _config(pub, 16) + """
[services.telemetry]
command = ["{python}", "-m", "services.telemetry"]
capabilities = ["subscribe:metrics.*", "call:kernel.ListServices"]
environment = { EDGEBUS_METRICS_INTERVAL = "0.5" }
settings = { http = "" }
[services.loadgen]
capabilities = ["publish:metrics.loadgen"]
"""
    proc, tmp = boot(config)
    try:
        cred = (tmp / "run" / "credentials" / "operator").read_text()
        async with connect("bench", run_dir=tmp / "run", credential=cred) as bus, \
                connect("loadgen", run_dir=tmp / "run", credential=(tmp / "run/credentials/loadgen").read_text()) as gen:
            sub = await bus.subscribe("kernel.services")
            while True:
                st = await bus.call("kernel", ListServices(), ServiceList)
                if st.services and all(s.state == "ready" for s in st.services if s.managed):
                    break
                await sub.receive()
            installed = (await bus.request("modelstore", Install(), frames=[_bundle("small", matmul_onnx(4), 4, key)],
                                           timeout=120)).decode(Installed)
            await bus.call("modelstore", Activate(name=installed.name, version=installed.version), ModelState)
            telemetry_pid = next(s.pid for s in st.services if s.name == "telemetry")
            descs, frames = pack_tensors([np.ones((1, 4), dtype=np.float32)])
            snapshot = MetricsSnapshot(service="loadgen", time=time.time(), families=[
                MetricFamily(name=f"load_metric_{i}", kind="gauge",
                             samples=[Sample(name=f"load_metric_{i}", labels={"k": str(j)}, value=float(j))
                                      for j in range(20)]) for i in range(10)])
            per_snapshot = 200

            async def latencies(seconds: float) -> list[float]:
                out, end = [], time.monotonic() + seconds
                while time.monotonic() < end:
                    t0 = time.perf_counter()
                    await bus.request("scheduler", Infer(model="small", tensors=descs), frames=frames)
                    out.append(time.perf_counter() - t0)
                return out

            async def ingested() -> float:
                from protocols.telemetry import GetMetrics, MetricsText

                text = (await bus.call("telemetry", GetMetrics(), MetricsText)).text
                return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                           if line.startswith("edgebus_telemetry_samples_ingested_total{"))

            quiet_p99, loaded_p99, rates = [], [], []
            await latencies(1.0)  # warm
            for _ in range(args.runs):
                quiet = sorted(await latencies(args.seconds))
                quiet_p99.append(quiet[int(len(quiet) * 0.99)])
                before, t0 = await ingested(), time.monotonic()
                published = 0
                async with anyio.create_task_group() as tg:
                    async def load() -> None:  # the target rate, paced
                        nonlocal published
                        start = time.monotonic()
                        end = start + args.seconds
                        period = per_snapshot / args.rate
                        n = 0
                        while time.monotonic() < end:
                            await gen.publish("metrics.loadgen", snapshot)
                            published += per_snapshot
                            n += 1
                            await anyio.sleep(max(0.0, start + n * period - time.monotonic()))
                    tg.start_soon(load)
                    loaded = sorted(await latencies(args.seconds))
                await anyio.sleep(1.5)  # the telemetry's own metrics interval reports the count
                rates.append((await ingested() - before) / (time.monotonic() - t0 - 1.5))
                loaded_p99.append(loaded[int(len(loaded) * 0.99)])
            rss = _rss(telemetry_pid)
    finally:
        stop(proc)
    return {"quiet_p99_ms": statistics.median(quiet_p99) * 1e3, "loaded_p99_ms": statistics.median(loaded_p99) * 1e3,
            "ingested_per_s": statistics.median(rates), "telemetry_rss_mib": rss / 2**20,
            "outbox_writes_per_s": outbox_throughput()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_telemetry", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=20000, help="metric samples per second to ingest")
    parser.add_argument("--out", default="bench-results/telemetry.json")
    args = parser.parse_args(argv)
    r = anyio.run(run, args)
    change = (r["loaded_p99_ms"] - r["quiet_p99_ms"]) / r["quiet_p99_ms"] * 100
    print(f"metric samples ingested: {r['ingested_per_s']:.0f}/s (target 20,000/s)")
    print(f"inference p99: {r['quiet_p99_ms']:.2f} ms quiet, {r['loaded_p99_ms']:.2f} ms under ingestion "
          f"({change:+.1f}%; target under 5%)")
    print(f"outbox durable writes: {r['outbox_writes_per_s']:.0f}/s; telemetry RSS {r['telemetry_rss_mib']:.1f} MiB")
    write_results(args.out, {**r, "p99_change_percent": change})


if __name__ == "__main__":
    main()
