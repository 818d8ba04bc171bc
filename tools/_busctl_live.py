"""busctl's live commands: ``monitor`` (the traffic the kernel routes, with bodies),
``pub`` and ``sub`` (events from and to the shell, capability-checked like any peer's),
and ``top`` (services, message rates, CPU, memory, queues; ``q`` quits)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import anyio
import msgspec

from protocols import CapabilityTable, ListCapabilities, ListServices, Monitor, ServiceList, Traffic
from services import BusClient, Forbidden, RemoteError

from ._busctl_commands import UsageError, parse_metrics, read_json_object, uptime_text
from ._busctl_output import Output, decode_body, shorten

__all__ = ["cmd_monitor", "cmd_pub", "cmd_sub", "cmd_top", "kernel_uptime"]

_RUNNING = ("starting", "ready", "stopping", "connected")


def _stamp(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def _body_text(body: Any) -> str:
    """A decoded body on one line, without its type tag (shown in its own column)."""
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k != "type"}
        if isinstance(body.get("text"), list) and body["text"]:  # text a model read (PipelineResult):
            body = {"text": body.pop("text"), **body}              # first, where a cut line still shows it
    return json.dumps(body, ensure_ascii=False)


# -- monitor ------------------------------------------------------------------------------------


def _traffic(t: Traffic) -> dict[str, Any]:
    """One monitor record as it is shown: the outcome is ``ok``, the code the kernel refused
    the message with, or the code an error message carries."""
    return {"time": t.time, "kind": t.kind, "message_type": t.message_type, "sender": t.sender,
            "dest": t.dest, "id": t.id, "size": t.size, "frames": t.frames,
            "outcome": t.outcome or t.error or "ok", "refused": bool(t.outcome),
            "body": decode_body(t.body), "body_size": t.body_size}


_MONITOR_HEAD = (f"{'TIME':<12}  {'KIND':<7} {'TYPE':<18} {'SENDER':<14}    {'DEST':<18} {'ID':<5} {'BYTES':<6} "
                 f"{'OUTCOME':<12} BODY")


async def cmd_monitor(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    if args.limit < 0:
        raise UsageError(f"--limit {args.limit}: give a number of messages >= 1 (0: no limit)")
    decoder = msgspec.msgpack.Decoder(Traffic)
    seen = 0
    async with bus.receive_unsolicited("kernel.monitor") as sub:
        await bus.call("kernel", Monitor(service=args.service or "", message_type=args.type or "",
                                         topic=args.topic or ""), timeout=args.deadline)
        if not out.json:
            out.line(out.paint(_MONITOR_HEAD, "bold"), flush=True)
        async for incoming in sub:
            if incoming.type != "Traffic" or incoming.sender != "kernel":
                continue
            rec = _traffic(decoder.decode(incoming.body))
            if out.json:
                out.emit(rec, flush=True)
            else:
                out.line(_monitor_line(rec, out, args.full), flush=True)
            seen += 1
            if args.limit and seen >= args.limit:
                break
    return 0


def _monitor_line(rec: dict[str, Any], out: Output, full: bool) -> str:
    """One message a line: the body cut to the terminal's width unless ``full``.  OUTCOME is
    ``ok``, the code the kernel refused a request or event with, or an error's code."""
    head = (f"{_stamp(rec['time'])}  {rec['kind']:<7} {rec['message_type']:<18} {rec['sender']:<14} -> "
            f"{rec['dest'] or '-':<18} {rec['id']:<5} {rec['size']:<6} ")
    outcome = f"{rec['outcome']:<12} "
    if rec["body"] is not None:
        body = _body_text(rec["body"])
    elif rec["body_size"]:
        body = f"({rec['body_size']} bytes: larger than the 4 KiB a monitor is shown)"
    else:
        body = ""
    if not full:
        body = shorten(body, max(out.width - len(head) - len(outcome), 24))
    return head + out.paint(outcome, "green" if rec["outcome"] == "ok" else "red") + body


# -- pub and sub --------------------------------------------------------------------------------


async def _may_publish(bus: BusClient, topic: str) -> str:
    """The capability this client lacks to publish on ``topic`` ("" when it has it, or when
    its table cannot be read: the kernel checks anyway)."""
    from kernel import CapabilitySet

    try:
        table = await bus.call("kernel", ListCapabilities(name="operator"), CapabilityTable, timeout=5)
    except RemoteError:
        return ""
    patterns = table.table.get("operator")
    if patterns is None:
        return ""
    caps = CapabilitySet([p for p in patterns if not p.startswith("!")],
                         denied=[p[1:] for p in patterns if p.startswith("!")])
    return "" if caps.allows("publish", topic) else f"publish:{topic}"


async def cmd_pub(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    body = read_json_object(args.body, "event body", '{"n": 1}')
    body.pop("type", None)
    if not args.type.isidentifier():
        raise UsageError(f"{args.type!r} is not a message type name (letters, digits and _, e.g. Tick)")
    missing = await _may_publish(bus, args.topic)
    if missing:
        raise Forbidden(f"the operator may not publish on {args.topic!r}", capability=missing, sender="kernel")
    names = list(body)
    event_type = msgspec.defstruct(args.type, [(f"f{i}", object) for i in range(len(names))], tag=args.type,
                                   rename={f"f{i}": name for i, name in enumerate(names)})
    await bus.publish(args.topic, event_type(*body.values()))
    if out.json:
        out.emit({"topic": args.topic, "type": args.type, "body": {"type": args.type, **body}})
    else:
        out.line(f"published {args.type} on {args.topic}")
    return 0


async def cmd_sub(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    if args.limit < 0:
        raise UsageError(f"--limit {args.limit}: give a number of events >= 1 (0: no limit)")
    seen = 0
    async with bus.subscribe(*args.prefixes) as sub:
        if not out.json:
            out.line(out.paint(f"{'TIME':<12}  {'TOPIC':<24} {'TYPE':<20} {'SENDER':<16} BODY", "bold"), flush=True)
        async for ev in sub:
            rec = {"time": time.time(), "topic": ev.header.dest, "type": ev.type, "sender": ev.sender,
                   "body": decode_body(ev.body), "frames": len(ev.frames)}
            if out.json:
                out.emit(rec, flush=True)
            else:
                head = f"{_stamp(rec['time'])}  {rec['topic']:<24} {rec['type']:<20} {rec['sender']:<16} "
                body = _body_text(rec["body"]) + (f" (+{rec['frames']} raw frames)" if rec["frames"] else "")
                out.line(head + (body if args.full else shorten(body, max(out.width - len(head), 24))), flush=True)
            seen += 1
            if args.limit and seen >= args.limit:
                break
    return 0


# -- top ----------------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _proc_cpu_rss(pid: int) -> tuple[float, int] | None:
    """CPU seconds and resident bytes of a local process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK, rss_pages * _PAGE


def kernel_uptime(pid: int) -> float | None:
    """Seconds since the local process ``pid`` started, or None."""
    try:
        start = int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]) / _TICK
        return float(Path("/proc/uptime").read_text().split()[0]) - start
    except (OSError, IndexError, ValueError):
        return None


class _Sample(msgspec.Struct):
    at: float
    services: list[Any]
    counts: dict[str, int]
    cpu: dict[str, float]
    rss: dict[str, float]
    queued: dict[str, float]


async def _sample(bus: BusClient, args: argparse.Namespace) -> _Sample:
    from protocols.telemetry import GetMetrics, MetricsText

    listing = await bus.call("kernel", ListServices(), ServiceList, timeout=args.deadline)
    try:
        text = (await bus.call("telemetry", GetMetrics(), MetricsText, timeout=min(args.deadline, 2.0))).text
    except RemoteError:  # no telemetry service (or not running): what the kernel and /proc say
        text = ""
    metrics = {f["name"]: f for f in parse_metrics(text)}

    def per_service(name: str) -> dict[str, float]:
        sums: dict[str, float] = {}
        for s in metrics.get(name, {}).get("samples", []):
            svc = s["labels"].get("service", "")
            if s["value"] is not None:
                sums[svc] = sums.get(svc, 0.0) + s["value"]
        return sums

    cpu, rss = per_service("process_cpu_seconds"), per_service("process_resident_memory_bytes")
    for s in listing.services:
        local = _proc_cpu_rss(s.pid) if s.pid and s.state in _RUNNING else None
        if local is not None:  # fresher than the telemetry's last scrape
            cpu[s.name], rss[s.name] = local
    counts = {s.name: s.requests_in + s.requests_out + s.events_out for s in listing.services}
    return _Sample(time.monotonic(), listing.services, counts, cpu, rss,
                   per_service("edgebus_inference_queue_depth"))


def _frame(before: _Sample, now: _Sample, uptime: float | None) -> dict[str, Any]:
    dt = max(now.at - before.at, 1e-9)
    rows = []
    for s in now.services:
        running = s.state in _RUNNING and bool(s.pid)
        was = before.counts.get(s.name)
        rate = (now.counts[s.name] - was) / dt if was is not None else None
        cpu = None
        if running and s.name in now.cpu and s.name in before.cpu:
            cpu = max(now.cpu[s.name] - before.cpu[s.name], 0.0) / dt * 100
        rows.append({"name": s.name, "state": s.state, "pid": s.pid or None, "msg_per_s": rate,
                     "cpu_percent": cpu, "rss_bytes": int(now.rss[s.name]) if running and s.name in now.rss else None,
                     "pending": s.pending, "queued": int(now.queued[s.name]) if s.name in now.queued else None,
                     "denied": s.denied})
    return {"time": time.time(), "kernel_uptime": uptime, "services": rows}


def _draw(frame: dict[str, Any], out: Output, keys: bool) -> None:
    rows = frame["services"]
    running = sum(1 for r in rows if r["state"] in _RUNNING)
    failed = sum(1 for r in rows if r["state"] == "failed")
    up = frame["kernel_uptime"]
    head = (f"busctl top  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(frame['time']))}  "
            f"kernel up {uptime_text(up) if up is not None else '?'}  "
            f"{len(rows)} services: {running} running" + (f", {failed} failed" if failed else "")
            + ("  (q quits)" if keys else ""))

    def num(v: float | None, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    table = out.table(
        [(r["name"], r["state"], r["pid"] or "", num(r["msg_per_s"], ".0f"),
          "" if r["cpu_percent"] is None else f"{r['cpu_percent']:.0f}%",
          "" if r["rss_bytes"] is None else f"{r['rss_bytes'] / 2**20:.0f}M", r["pending"], num(r["queued"], "d"),
          r["denied"]) for r in rows],
        ("NAME", "STATE", "PID", "MSG/S", "CPU", "RSS", "PENDING", "QUEUED", "DENIED"), styles={1: out.state})
    clear = "\033[H\033[J" if out.tty else ""
    out.stream.write(clear + head + "\n\n" + table + "\n")
    out.stream.flush()


@contextlib.contextmanager
def _keyboard() -> Iterator[int | None]:
    """Standard input in cbreak mode (keys arrive one by one, unechoed; ^C still
    interrupts) while it is a terminal; the terminal is restored on the way out."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _read_key(fd: int, timeout: float) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 64) if ready else b""


async def _pause(fd: int | None, seconds: float) -> bool:
    """Wait ``seconds``; True when ``q`` was pressed meanwhile."""
    if fd is None:
        await anyio.sleep(seconds)
        return False
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        keys = await anyio.to_thread.run_sync(_read_key, fd, min(left, 0.1))
        if b"q" in keys or b"Q" in keys:
            return True
    return False


async def cmd_top(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    """A live view; the first frame already has rates (two samples are taken first)."""
    if not args.interval > 0:
        raise UsageError(f"--interval {args.interval:g}: give seconds > 0")
    if args.iterations < 0:
        raise UsageError(f"--iterations {args.iterations}: give a number >= 1 (0: until q or ^C)")
    kernel_pid = getattr(args, "kernel_pid", None)
    shown = 0
    with _keyboard() as fd:
        before = await _sample(bus, args)
        if await _pause(fd, min(args.interval, 0.5)):
            return 0
        while True:
            now = await _sample(bus, args)
            frame = _frame(before, now, kernel_uptime(kernel_pid) if kernel_pid else None)
            if out.json:
                out.emit(frame, flush=True)
            else:
                _draw(frame, out, fd is not None)
            shown += 1
            if args.iterations and shown >= args.iterations:
                return 0
            before = now
            if await _pause(fd, args.interval):
                return 0
