"""``busctl logs [-f] [-n N] [--since T] [SERVICE...]``: the log records the kernel keeps of
each service (its own lines, its output, the kernel's lines about it; GetLogs), as
journalctl shows a unit's; ``-f`` follows them (``kernel.logs.<service>`` events).  Also
the tail and the state's details that ``busctl status NAME`` shows.

Human view, one record a line (a multi-line field, such as a traceback, on the lines that
follow, indented)::

    2026-11-30 01:30:45.123 greeter[supervisor] info service_state state=ready previous=starting pid=4242
    2026-11-30 01:30:47.456 crasher stderr: cannot open /etc/crasher.conf

``-o json``: one JSON document a record (JSON lines), every field: ``seq``, ``time``,
``service``, ``level``, ``event``, ``component``, ``fields``.
"""

from __future__ import annotations

import argparse
import datetime
import re
import time
from typing import Any, Callable

from protocols import GetLogs, LogRecord, LogRecords, ServiceStatus
from services import BusClient

from ._busctl_output import Output, plain

__all__ = ["cmd_logs", "add_logs_verb", "parse_since", "record_text", "status_details", "status_tail",
           "show_status_tail", "STATUS_LINES"]

#: How many of a service's records ``busctl status`` ends with.
STATUS_LINES = 10
#: Records shown before following, without -n (as journalctl -f).
FOLLOW_LINES = 10

_LEVEL_COLOURS = {"warning": "yellow", "error": "red", "critical": "red", "debug": "dim"}
_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600,
          "d": 86400, "day": 86400, "w": 604800, "week": 604800}
_AGO = re.compile(r"^-?\s*(\d+(?:\.\d+)?)\s*([a-z]*?)s?(?:\s+ago)?$")


def parse_since(text: str, now: float | None = None) -> float:
    """A time as the operator writes it, as a Unix time: ``10m``, ``-10m``, ``2 hours ago``
    (s, m, h, d, w; a bare number is seconds ago), ``today``, ``yesterday``, ``now``,
    ``HH:MM[:SS]`` (today), an ISO date and time (``2026-11-30 14:05``, local time unless it
    names a zone), or a Unix time (9 digits or more).  ValueError says what it takes."""
    now = time.time() if now is None else now
    original = text.strip()
    t = original.lower()
    if t == "now":
        return now
    if t in ("today", "yesterday"):
        midnight = datetime.datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0)
        return (midnight - datetime.timedelta(days=t == "yesterday")).timestamp()
    if re.fullmatch(r"\d{9,}(\.\d*)?", t):  # a Unix time
        return float(t)
    m = _AGO.match(t)
    if m and (m.group(2) or "s") in _UNITS:
        return now - float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?", t):
        original = f"{datetime.datetime.fromtimestamp(now).date().isoformat()} {t}"
    try:
        return datetime.datetime.fromisoformat(original).timestamp()
    except ValueError:
        raise ValueError(f"{text!r} is not a time: give e.g. 10m (ago), '2 hours ago', today, 14:05, "
                         "or 2026-11-30 14:05:00") from None


def _value(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if (not value or any(c in value for c in " '\"=")) else value
    return str(plain(value)).replace("'", '"') if isinstance(value, (list, dict)) else str(value)


def _stamp(t: float) -> str:
    moment = datetime.datetime.fromtimestamp(t)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def record_text(r: LogRecord, out: Output) -> str:
    """One record as a person reads it (multi-line fields after it, indented)."""
    who = f"{r.service}[{r.component}]" if r.component not in ("", r.service) else r.service
    level = out.paint(r.level, _LEVEL_COLOURS.get(r.level, ""))
    if r.event == "output" and not r.component and set(r.fields) <= {"stream", "line"}:
        return f"{_stamp(r.time)} {who} {out.paint(str(r.fields.get('stream', 'output')), 'dim')}: {r.fields.get('line', '')}"
    inline, below = [], []
    for key, value in r.fields.items():
        if isinstance(value, str) and "\n" in value:
            below.append(f"    {key}:\n" + "\n".join(f"      {ln}" for ln in value.rstrip("\n").splitlines()))
        else:
            inline.append(f"{key}={_value(value)}")
    text = " ".join([f"{_stamp(r.time)} {who} {level} {r.event}", *inline])
    return "\n".join([text, *below])


def _show(records: list[LogRecord], out: Output, *, flush: bool = False) -> None:
    for r in records:
        if out.json:
            out.emit(r, flush=flush)
        else:
            out.line(record_text(r, out), flush=flush)


async def cmd_logs(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    from ._busctl_commands import UsageError

    if args.lines is not None and args.lines < 0:
        raise UsageError(f"-n {args.lines}: give a number of lines >= 0")
    try:
        since = parse_since(args.since) if args.since else 0.0
    except ValueError as exc:
        raise UsageError(f"--since {exc}") from None
    services = list(dict.fromkeys(args.services))
    # -n N: the newest N (-n 0: none, as journalctl's); without -n: every one kept, or with
    # -f the last FOLLOW_LINES
    history = args.lines != 0
    if args.lines is None:
        lines = FOLLOW_LINES if args.follow else 0
    else:
        lines = args.lines or 1  # (-n 0 asks for the cursor only)
    ask = GetLogs(services=services, lines=lines, since=since)
    if not args.follow:
        answer = await bus.call("kernel", ask, LogRecords, timeout=args.deadline)
        _show(answer.records if history else [], out)
        return 0
    # Subscribe first, then ask for the history: nothing logged in between is missed, and
    # what came both ways (seq <= the answer's last) is shown once.
    topics = [f"kernel.logs.{s}" for s in services] or ["kernel.logs."]
    async with bus.subscribe(*topics) as sub:
        answer = await bus.call("kernel", ask, LogRecords, timeout=args.deadline)
        _show(answer.records if history else [], out, flush=True)
        last = answer.last
        async for event in sub:
            record = event.decode(LogRecord)
            if record.seq <= last or (services and record.service not in services):
                continue
            last = record.seq
            _show([record], out, flush=True)
    return 0


def add_logs_verb(verb: Callable[..., argparse.ArgumentParser]) -> None:
    """``logs`` on busctl's parser (``verb(name, func, help)`` makes a verb's parser)."""
    p = verb("logs", cmd_logs, "the log records the kernel keeps of services (their lines, output, and the "
                               "kernel's lines about them), oldest first; -f follows")
    p.add_argument("services", nargs="*", metavar="SERVICE",
                   help="only these services ('kernel': the kernel's other lines; default: every one)"
                   ).complete = "service"  # type: ignore[attr-defined]
    p.add_argument("-f", "--follow", action="store_true",
                   help=f"go on printing records as they are logged, until ^C (shows the last {FOLLOW_LINES} "
                        "first, unless -n)")
    p.add_argument("-n", "--lines", type=int, metavar="N",
                   help=f"only the newest N records (default: every one kept; with -f, the last {FOLLOW_LINES})")
    p.add_argument("--since", metavar="TIME",
                   help="only records from TIME on: 10m (ago), '2 hours ago', today, 14:05, 2026-11-30 14:05:00")


# -- busctl status NAME --------------------------------------------------------------------------

def _size(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.1f}{unit}" if unit != "B" else f"{n}B"
        n /= 1024  # type: ignore[assignment]
    return f"{n}B"


def _ago(seconds: float) -> str:
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}min {s % 60}s ago"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}min ago"
    return f"{s // 86400} days {s % 86400 // 3600}h ago"


def status_details(s: ServiceStatus) -> dict[str, str]:
    """How ``busctl status`` shows ``since``, ``command`` and ``memory``."""
    shown = {}
    if s.since:
        shown["since"] = f"{_stamp(s.since)[:19]} ({_ago(time.time() - s.since)})"
    if s.command:
        shown["command"] = " ".join(_value(a) if " " in a else a for a in s.command)
    if s.memory:
        shown["memory"] = _size(s.memory)
    return shown


async def status_tail(bus: BusClient, name: str, deadline: float) -> list[LogRecord]:
    """The last STATUS_LINES records of ``name``."""
    answer = await bus.call("kernel", GetLogs(services=[name], lines=STATUS_LINES), LogRecords, timeout=deadline)
    return answer.records


def show_status_tail(records: list[LogRecord], out: Output) -> None:
    out.line()
    if not records:
        out.line(out.paint("(no log records kept)", "dim"))
    for r in records:
        out.line(record_text(r, out))
