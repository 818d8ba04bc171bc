"""Supervisor benchmark: boot time, restart latency, memory.

    python -m tools.bench_supervisor [--boots 5] [--kills 10] [--out bench-results/supervisor.json]

* boot:     from exec of ``edgebus boot`` (default config) to every service ready, as seen
            by a client on the bus (event-driven: kernel.services), median of ``--boots``;
* restart:  kill -9 of a service to its replacement being ready, median of ``--kills``,
            side by side with that service's own start-up (spawn to READY, from the
            kernel's state events) in the same run: the difference is the supervisor's
            cost (detection, reaping, spawn);
* memory:   RSS and PSS of the kernel and of the whole default system after boot.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio

from protocols import ListServices, ServiceList, ServiceStateChanged
from services import connect
from tools._benchkit import boot, stop, write_results

BENCH_CONFIG = """
[services.greeter]
command = ["{python}", "-m", "services.examples.greeter"]
capabilities = ["publish:example.*"]
# Each kill is the first crash in its window (kills are 0.3 s apart), so this measures
# the restart path itself, not the back-off that repeated crashes get.
restart_window = 0.2
max_restarts = 1000
"""


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    return rss, pss


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


async def _wait_all_ready(endpoint: str, credential: str, names: set[str] | None = None) -> list[Any]:
    async with connect("bench", endpoint=endpoint, credential=credential) as bus:
        sub = await bus.subscribe("kernel.services")
        while True:
            st = await bus.call("kernel", ListServices(), ServiceList)
            if st.services and all(s.state == "ready" for s in st.services if names is None or s.name in names):
                return st.services
            await sub.receive()


def _boot(config: str | None) -> tuple[subprocess.Popen[bytes], Path, float]:
    t0 = time.perf_counter()
    proc, tmp = boot(config)
    return proc, tmp, t0


async def measure_restarts(kills: int) -> dict[str, Any]:
    proc, tmp, _ = _boot(BENCH_CONFIG)
    endpoint, cred = f"ipc://{tmp / 'run' / 'bus.sock'}", (tmp / "run" / "credentials" / "operator").read_text()
    try:
        await _wait_all_ready(endpoint, cred)
        latencies, startups = [], []
        async with connect("bench", endpoint=endpoint, credential=cred) as bus:
            sub = await bus.subscribe("kernel.services")
            for _ in range(kills):
                st = await bus.call("kernel", ListServices(), ServiceList)
                pid = next(s.pid for s in st.services if s.name == "greeter")
                killed = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                starting = None
                while True:
                    ev = (await sub.receive()).decode(ServiceStateChanged)
                    if ev.name != "greeter":
                        continue
                    if ev.state == "starting":
                        starting = time.perf_counter()
                    if ev.state == "ready" and starting is not None:
                        ready = time.perf_counter()
                        break
                latencies.append(ready - killed)
                startups.append(ready - starting)
                await anyio.sleep(0.3)
        return {"restart_ms": statistics.median(latencies) * 1e3,
                "service_startup_ms": statistics.median(startups) * 1e3,
                "supervisor_overhead_ms": statistics.median(a - b for a, b in zip(latencies, startups)) * 1e3,
                "runs": {"restart_ms": [x * 1e3 for x in latencies], "startup_ms": [x * 1e3 for x in startups]}}
    finally:
        stop(proc)


def measure_boot(boots: int) -> dict[str, Any]:
    times, memory = [], []
    for _ in range(boots):
        proc, tmp, t0 = _boot(None)
        endpoint = f"ipc://{tmp / 'run' / 'bus.sock'}"
        cred = (tmp / "run" / "credentials" / "operator").read_text()
        anyio.run(_wait_all_ready, endpoint, cred)
        times.append(time.perf_counter() - t0)
        kernel_rss, kernel_pss = _memory(proc.pid)
        total_rss = total_pss = 0
        for pid in _descendants(proc.pid):
            try:
                rss, pss = _memory(pid)
            except OSError:
                continue
            total_rss += rss
            total_pss += pss
        memory.append((kernel_rss, kernel_pss, total_rss, total_pss))
        stop(proc)
    med = [statistics.median(m[i] for m in memory) / 2**20 for i in range(4)]
    return {"boot_to_ready_ms": statistics.median(times) * 1e3, "runs_ms": [t * 1e3 for t in times],
            "kernel_rss_mib": med[0], "kernel_pss_mib": med[1], "system_rss_mib": med[2], "system_pss_mib": med[3]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_supervisor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--out", default="bench-results/supervisor.json")
    args = parser.parse_args(argv)
    boot = measure_boot(args.boots)
    restart = anyio.run(measure_restarts, args.kills)
    print(f"boot to every default service ready: {boot['boot_to_ready_ms']:.0f} ms (median of {args.boots}; "
          f"target 2000 ms)")
    print(f"restart, kill -9 to replacement ready: {restart['restart_ms']:.0f} ms (median of {args.kills}); "
          f"the service's own start-up {restart['service_startup_ms']:.0f} ms; supervisor overhead "
          f"{restart['supervisor_overhead_ms']:.1f} ms (target: restart within 500 ms plus start-up)")
    print(f"kernel: RSS {boot['kernel_rss_mib']:.1f} MiB, PSS {boot['kernel_pss_mib']:.1f} MiB (target RSS <= 40 MiB); "
          f"whole default system: RSS {boot['system_rss_mib']:.1f} MiB, PSS {boot['system_pss_mib']:.1f} MiB")
    write_results(args.out, {"boot": boot, "restart": restart, "params": vars(args)})


if __name__ == "__main__":
    main()
