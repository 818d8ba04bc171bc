"""Many real-time streams of a recurrent audio model through the bus, as clients would send them.

    python -m tools.bench_streams [--streams 25 50 100] [--seconds 20] [--modes auto on-0 on-2]
                                  [--max-batch 128] [--procs 1] [--out bench-results/streams.json]

The target (issue 14): 100 concurrent real-time streams of a recurrent audio model with 32 ms
chunks: every chunk answered, p99 chunk latency < 30 ms, no chunk late by more than one chunk
period.

The model is silero-vad as it ships in its wheel (``tools.fetch_models``), packed with its
state pair declared (``state`` -> ``stateN``, batched along axis 1) and its sample rate a
parameter of each stream; one driver of one ONNX Runtime thread, as ``tools.bench_models``.
Each stream is opened through the SDK (``services.connect``, one connection per client
process, an anyio task per stream) and sends its next 512-sample chunk on its own real-time
schedule: chunk k of stream i is due at t0 + i/N + k periods (start times spread over one
period); a stream sends a chunk when it is due, or at once when the answer to its previous
chunk came after that. For each size and batching mode (``auto``, the default; ``on`` with
max_delay_ms 0 and 2) a fresh system is booted and, after a warm-up (not counted), every
chunk is recorded: sent, answered (or the error), latency (sent to answered), how late it
was answered (answered later than one period after it was due), the batch it ran in; the
scheduler's mean batch (GetSchedule), the client's own lag (sent after it was due) and the
CPU each process used, to tell a slow client from a slow system.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from protocols import pack_tensors
from services import BusError, RemoteError, connect
from services.scheduler import (
    CloseStream, GetSchedule, Infer, InferResult, OpenStream, Schedule, StreamOpened,
)
from tools._benchkit import boot, install, pack_signed, stop, write_results
from tools.bench_models import _config

RATE = 16000
CHUNK = 512  # 32 ms at 16 kHz
PERIOD = CHUNK / RATE
#: chunks of signal a stream loops over
LOOP = 32
#: silero-vad's state pair: the scheduler keeps ``state`` between chunks
VAD_SPEC = {"inputs": {"state": {"batch_axis": 1}}, "outputs": {"stateN": {"batch_axis": 1}},
            "states": [{"input": "state", "output": "stateN"}]}
#: batching mode name -> (batching, max_delay_ms)
MODES = {"auto": ("auto", 0.0), "on-0": ("on", 0.0), "on-2": ("on", 2.0), "off": ("off", 0.0)}


def _signals(n: int, seed: int) -> np.ndarray:
    """LOOP chunks (about a second) of a different signal per stream (a tone, noise,
    silence... at several levels), float32 [n, LOOP * CHUNK]; a stream loops over its own."""
    rng = np.random.default_rng(seed)
    t = np.arange(LOOP * CHUNK) / RATE
    out = np.empty((n, t.size), np.float32)
    for i in range(n):
        tone = np.sin(2 * np.pi * (120 + 17 * i) * t) * (0.05 + 0.1 * (i % 3))
        out[i] = tone + rng.standard_normal(t.size) * 0.02 * (i % 4)
    return out


def _sample_cpu(pids: dict[str, int], start_wall: float, end_wall: float, into: dict[str, float]) -> None:
    """Each process's CPU share (1.0: one core) from ``start_wall`` to ``end_wall`` (time.time()s),
    the counted part of a run; this process's own as ``client`` (the in-process client)."""
    time.sleep(max(start_wall - time.time(), 0.0))
    pids = {**pids, "client": os.getpid()}  # (client processes' pids are in by now)
    before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    machine0 = _machine_busy()
    t0 = time.monotonic()
    time.sleep(max(end_wall - time.time(), 0.0))
    elapsed = time.monotonic() - t0
    for name, pid in pids.items():
        c0, c1 = before[name], _cpu_seconds(pid)
        if c0 is not None and c1 is not None and elapsed > 0:
            into[name] = (c1 - c0) / elapsed
    machine1 = _machine_busy()
    if machine0 is not None and machine1 is not None and elapsed > 0:
        into["machine"] = (machine1 - machine0) / elapsed  # every process on it, others' included


def _machine_busy() -> float | None:
    """CPU seconds every core spent busy so far (Linux /proc/stat: all but idle and iowait)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float | None:
    """The user + system CPU seconds of ``pid`` so far (Linux /proc), None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- one client process --------------------------------------------------------------------------


async def _client(run_dir: str, first: int, count: int, total: int, start_wall: float, seconds: float,
                  warmup: float, seed: int) -> dict[str, Any]:
    """Streams ``first`` .. ``first + count - 1`` of ``total``: open them, send each one's
    chunks on its schedule from ``start_wall`` (a time.time()) for ``warmup + seconds``,
    close them. Returns each counted chunk's record."""
    credential = (Path(run_dir) / "credentials" / "operator").read_text()
    signals = _signals(count, seed + first)
    #: [stream, k, due, sent, answered or None, batch, error, queue_ms, compute_ms, total_ms]
    records: list[list[Any]] = []
    async with connect(f"bench-{first}", run_dir=run_dir, credential=credential) as bus:
        descs, frames = pack_tensors({"sr": np.array(RATE, np.int64)})
        opened = []
        for _ in range(count):
            incoming = await bus.request("scheduler", OpenStream(model="vad", tensors=descs), frames=frames,
                                         timeout=30)
            opened.append(incoming.decode(StreamOpened).stream)
        t0 = time.monotonic() + (start_wall - time.time())  # the shared start, on this process's clock
        chunks = int((warmup + seconds) / PERIOD)
        counted_from = int(warmup / PERIOD)

        async def stream(j: int) -> None:
            i = first + j
            offset = t0 + i * PERIOD / total  # start times spread over one period
            sig = signals[j]
            for k in range(chunks):
                due = offset + k * PERIOD
                await anyio.sleep_until(due)
                at = (k % LOOP) * CHUNK
                cdescs, cframes = pack_tensors([sig[None, at:at + CHUNK]])
                sent = time.monotonic()
                answered, error, result = None, "", None
                try:
                    reply = await bus.request("scheduler", Infer(model="vad", tensors=cdescs, stream=opened[j]),
                                              frames=cframes, timeout=5)
                    answered = time.monotonic()
                    result = reply.decode(InferResult)
                except (RemoteError, BusError) as exc:
                    error = type(exc).__name__
                if k >= counted_from:
                    times = (result.queue_ms, result.compute_ms, result.total_ms) if result else (0.0, 0.0, 0.0)
                    records.append([i, k, due - t0, sent - t0, None if answered is None else answered - t0,
                                    result.batch if result else 0, error, *times])

        async with anyio.create_task_group() as tg:
            for j in range(count):
                tg.start_soon(stream, j)
        for sid in opened:
            try:
                await bus.request("scheduler", CloseStream(stream=sid), timeout=10)
            except (RemoteError, BusError):
                pass
    return {"records": records}


def _worker(argv: list[str]) -> None:
    """``--worker JSON``: one client process of several; its result as JSON on stdout."""
    job = json.loads(argv[0])
    result = anyio.run(lambda: _client(**job))
    sys.stdout.write(json.dumps(result))


# -- one system, one size --------------------------------------------------------------------------


async def _schedule(run_dir: Path) -> tuple[Schedule, dict[str, int]]:
    from protocols import ListServices, ServiceList

    credential = (run_dir / "credentials" / "operator").read_text()
    async with connect("bench", run_dir=run_dir, credential=credential) as bus:
        schedule = await bus.call("scheduler", GetSchedule(), Schedule)
        listing = await bus.call("kernel", ListServices(), ServiceList)
    return schedule, {s.name: s.pid for s in listing.services if s.pid}


def _measure(run_dir: Path, kernel_pid: int, streams: int, procs: int, seconds: float, warmup: float,
             seed: int) -> dict[str, Any]:
    """Run ``streams`` real-time streams from ``procs`` client processes; the figures."""
    _, pids = anyio.run(_schedule, run_dir)
    pids["kernel"] = kernel_pid
    start_wall = time.time() + 1.0 + 0.02 * streams  # time to open every stream first
    shares = [streams // procs + (1 if p < streams % procs else 0) for p in range(procs)]
    firsts = [sum(shares[:p]) for p in range(procs)]
    cpu: dict[str, float] = {}
    sampler = threading.Thread(target=_sample_cpu, args=(pids, start_wall + warmup, start_wall + warmup + seconds, cpu),
                               daemon=True)
    sampler.start()
    if procs == 1:
        results = [anyio.run(lambda: _client(str(run_dir), 0, streams, streams, start_wall, seconds, warmup, seed))]
    else:
        workers = [subprocess.Popen([sys.executable, "-m", "tools.bench_streams", "--worker", json.dumps(
            {"run_dir": str(run_dir), "first": f, "count": c, "total": streams, "start_wall": start_wall,
             "seconds": seconds, "warmup": warmup, "seed": seed})], stdout=subprocess.PIPE)
            for f, c in zip(firsts, shares) if c]
        pids.update({f"client-{i}": w.pid for i, w in enumerate(workers)})
        results = []
        for w in workers:
            out, _ = w.communicate(timeout=seconds + warmup + 120)
            if w.returncode != 0:
                raise SystemExit(f"bench_streams: a client process failed ({w.returncode})")
            results.append(json.loads(out))
    sampler.join()
    schedule, _ = anyio.run(_schedule, run_dir)
    records = [r for res in results for r in res["records"]]
    answered = [r for r in records if r[4] is not None]
    latency = np.array([r[4] - r[3] for r in answered]) * 1e3
    lateness = np.array([r[4] - r[2] for r in answered]) * 1e3
    lag = np.array([r[3] - r[2] for r in records]) * 1e3
    errors: dict[str, int] = {}
    for r in records:
        if r[6]:
            errors[r[6]] = errors.get(r[6], 0) + 1
    queue = np.array([r[7] for r in answered])
    compute = np.array([r[8] for r in answered])
    outside = latency - np.array([r[9] for r in answered])  # the bus both ways and the client
    vad = next((m for m in schedule.models if m.model == "vad"), None)
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else None  # noqa: E731
    return {
        "streams": streams, "procs": procs, "seconds": seconds,
        "sent": len(records), "answered": len(answered), "errors": errors,
        "latency_ms": {"p50": pct(latency, 50), "p99": pct(latency, 99), "max": float(latency.max()) if len(latency)
                       else None},
        "late_over_one_period": int((lateness > PERIOD * 1e3).sum()) + (len(records) - len(answered)),
        "lateness_ms": {"p99": pct(lateness, 99), "max": float(lateness.max()) if len(lateness) else None},
        "client_send_lag_ms": {"p50": pct(lag, 50), "p99": pct(lag, 99), "max": float(lag.max()) if len(lag) else None},
        "where_p50_ms": {"scheduler_queue": pct(queue, 50), "compute": pct(compute, 50),
                         "bus_and_client": pct(outside, 50)},
        "where_p99_ms": {"scheduler_queue": pct(queue, 99), "compute": pct(compute, 99),
                         "bus_and_client": pct(outside, 99)},
        "mean_batch_scheduler": vad.mean_batch if vad else None,
        "batching": vad.batching if vad else "",
        "mean_batch_seen": float(np.mean([r[5] for r in answered])) if answered else None,
        "client_cpu": cpu.get("client", 0.0) if procs == 1 else
        sum(v for k, v in cpu.items() if k.startswith("client-")),
        "cpu": {k: v for k, v in cpu.items() if not k.startswith("client")},
    }


def _line(mode: str, r: dict[str, Any]) -> str:
    f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    lat, w = r["latency_ms"], r["where_p50_ms"]
    cpu = " ".join(f"{k} {v * 100:.0f}%" for k, v in sorted(r["cpu"].items()) if v >= 0.02 and k != "machine")
    cpu += f" (machine {r['cpu'].get('machine', 0) * 100:.0f}% of {(os.cpu_count() or 1) * 100}%)"
    ok = r["answered"] == r["sent"] and (lat["p99"] or 1e9) < 30 and r["late_over_one_period"] == 0
    return (f"{mode:5} {r['streams']:>7} {r['procs']:>5} {r['sent']:>7} {r['answered']:>8} {f(lat['p50']):>7} "
            f"{f(lat['p99']):>7} {f(lat['max']):>7} {r['late_over_one_period']:>6} "
            f"{f(r['mean_batch_scheduler']):>6} {f(r['mean_batch_seen']):>6} {f(r['client_send_lag_ms']['p99']):>8} "
            f"{f(w['scheduler_queue']):>6} {f(w['compute']):>6} {f(w['bus_and_client']):>6} "
            f"{r['client_cpu'] * 100:>5.0f}%  {'yes' if ok else 'no ':3}  {cpu}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(argv[1:])
        return
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from tools.fetch_models import ModelUnavailable, model_path

    parser = argparse.ArgumentParser(prog="bench_streams", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[25, 50, 100],
                        help="sizes to run (default 25 50 100)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds counted per run (default 20)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds first streamed and not counted (default 2)")
    parser.add_argument("--modes", nargs="+", default=["auto", "on-0", "on-2"], choices=list(MODES),
                        help="batching: auto (the default), on-0 / on-2 (on, max_delay_ms 0 / 2), off")
    parser.add_argument("--max-batch", type=int, default=128,
                        help="the scheduler's max_batch (default 128: 100 streams need batches of 30 and more; "
                             "its own default, 16, caps them)")
    parser.add_argument("--procs", type=int, default=1, help="client processes sharing the streams (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-results/streams.json")
    args = parser.parse_args(argv)
    if min(args.streams) < 1 or args.procs < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--streams and --procs take numbers >= 1, --seconds > 0, --warmup >= 0")
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    try:
        path = model_path("silero-vad")
    except ModelUnavailable as exc:
        raise SystemExit(f"bench_streams: {exc}") from None
    tmp = Path(tempfile.mkdtemp(prefix="edgebus-bench-streams-"))
    bundle = pack_signed(path, "vad", VAD_SPEC, key, tmp)

    results: list[dict[str, Any]] = []
    print(f"{'mode':5} {'streams':>7} {'procs':>5} {'sent':>7} {'answered':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'max ms':>7} {'late':>6} {'batch':>6} {'seen':>6} {'lag p99':>8} {'queue':>6} {'comp':>6} {'bus':>6} "
          f"{'client':>6}  {'ok':3}  cpu", flush=True)
    for mode in args.modes:
        batching, delay = MODES[mode]
        for n in args.streams:
            config = _config(pub, batching).replace("max_delay_ms = 0", f"max_delay_ms = {delay:g}") \
                .replace("max_batch = 16", f"max_batch = {args.max_batch}")
            proc, sys_tmp = boot(config)
            try:
                anyio.run(install, sys_tmp, {"vad": bundle})
                r = _measure(sys_tmp / "run", proc.pid, n, args.procs, args.seconds, args.warmup, args.seed)
            finally:
                stop(proc)
            r["mode"], r["max_batch"] = mode, args.max_batch
            results.append(r)
            print(_line(mode, r), flush=True)
    print("\nlate: chunks answered more than one period (32 ms) after they were due, or never; batch: the "
          "scheduler's mean batch; seen: the mean batch of the counted chunks; lag: a chunk sent after it was due "
          "(the client's own delay); queue, comp, bus: p50 of a chunk's wait in the scheduler, its run on the driver "
          "and the rest of its latency (the bus both ways, the client); client: the client processes' CPU (100% = "
          "one core); cpu: the system's processes' and the whole machine's over the counted seconds; ok: the "
          "target held")
    write_results(args.out, {"period_ms": PERIOD * 1e3, "target": "every chunk answered, p99 < 30 ms, none late "
                             "by more than one period", "cores": os.cpu_count(), "load_before": os.getloadavg(),
                             "runs": results})


if __name__ == "__main__":
    main()
