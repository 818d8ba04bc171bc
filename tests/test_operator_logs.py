"""Operator experience (issue 15): logs per service, a telemetry port in use, quiet by default.

Each on a real system: `edgebus boot` with its services, the kernel's JSON log, busctl.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from kernel import ConfigError, default_config_text, parse_config
from protocols import GetLogs, GetService, LogRecord, LogRecords, ServiceStatus, StopService
from protocols.scheduler import Detection
from protocols.telemetry import GetMetrics, GetUplink, MetricsText, UplinkState
from services import UnknownDestination

from conftest import BIN, System, free_port, wait_for

pytestmark = pytest.mark.anyio

GREETER = '["{python}", "-m", "services.examples.greeter"]'


def log_records(system: System) -> list[dict[str, Any]]:
    """The kernel's JSON log, one dict per line."""
    return [msgspec.json.decode(line) for line in system.log().splitlines() if line.startswith("{")]


# -- logs per service --------------------------------------------------------------------------

LOGS = f"""
[logs]
lines_per_service = 30

[services.greeter]
command = {GREETER}

[services.chatty]
command = ["sh", "-c", "for i in $(seq 1 100); do echo line $i; done; echo 'oops: something on stderr' >&2; exec sleep 300"]
start_timeout = 300

[services.crasher]
command = ["sh", "-c", "echo 'cannot open /etc/crasher.conf: No such file or directory' >&2; exit 1"]
max_restarts = 1
backoff_initial = 0.05
"""


async def test_the_kernel_keeps_each_services_logs_and_says_why_one_failed(make_system) -> None:
    system: System = make_system(LOGS)
    await system.wait_ready("greeter")
    await system.wait_until(lambda s: s["crasher"].state == "failed")
    async with system.client() as bus:
        # why crasher failed: its own stderr and the kernel's lines about it, in one place
        logs = await bus.call("kernel", GetLogs(services=["crasher"]), LogRecords)
        assert logs.records and all(r.service == "crasher" for r in logs.records)
        output = [r for r in logs.records if r.event == "output"]
        assert [r.fields for r in output] == [
            {"stream": "stderr", "line": "cannot open /etc/crasher.conf: No such file or directory"}] * 2
        kernel = [(r.component, r.event, r.fields.get("state")) for r in logs.records if r.component]
        assert ("supervisor", "service_exited", None) in kernel
        assert ("supervisor", "service_state", "failed") == kernel[-1]
        seqs = [r.seq for r in logs.records]
        assert seqs == sorted(seqs) and logs.last >= seqs[-1]

        # the ring holds lines_per_service records: chatty's 100 lines and more, the newest 30 kept
        # (stdout and stderr are two pipes read by two tasks: wait for the end of both)
        wait_for(lambda: "oops: something on stderr" in (text := system.log()) and '"line 100"' in text, 10,
                 "chatty's output")
        chatty = await bus.call("kernel", GetLogs(services=["chatty"]), LogRecords)
        lines = [r.fields.get("line") for r in chatty.records]
        assert len(chatty.records) == 30 and chatty.lines_per_service == 30
        # the newest 30 of its 101 records, whichever of its two pipes the kernel read first:
        # stdout's lines in order up to line 100, and the stderr line if it came among the last
        out = [line for line in lines if line != "oops: something on stderr"]
        first = 100 - len(out) + 1
        assert out == [f"line {i}" for i in range(first, 101)] and first in (71, 72)

        # -n, --since and a cursor
        newest = await bus.call("kernel", GetLogs(services=["chatty", "crasher"], lines=5), LogRecords)
        merged = await bus.call("kernel", GetLogs(services=["chatty", "crasher"]), LogRecords)
        assert newest.records == merged.records[-5:] and len(merged.records) == len(logs.records) + 30
        assert (await bus.call("kernel", GetLogs(since=time.time() + 3600), LogRecords)).records == []
        later = await bus.call("kernel", GetLogs(services=["chatty", "crasher"], after=merged.records[-3].seq), LogRecords)
        assert later.records == merged.records[-2:]
        everything = await bus.call("kernel", GetLogs(), LogRecords)
        assert {"kernel", "greeter", "chatty", "crasher"} <= {r.service for r in everything.records}
        with pytest.raises(UnknownDestination, match="nosuch"):
            await bus.call("kernel", GetLogs(services=["nosuch"]), LogRecords)

        # since when, what command, how much memory
        greeter = await bus.call("kernel", GetService(name="greeter"), ServiceStatus)
        assert greeter.state == "ready" and 0 < time.time() - greeter.since < 60
        assert greeter.command[-2:] == ["-m", "services.examples.greeter"]
        assert greeter.memory > 5 << 20  # a Python interpreter's resident memory
        failed = await bus.call("kernel", GetService(name="crasher"), ServiceStatus)
        assert failed.memory == 0 and 0 < time.time() - failed.since < 60

        # following: kernel.logs.<service> carries each record as it is kept
        async with bus.subscribe("kernel.logs.greeter") as sub:
            await bus.call("kernel", StopService(name="greeter"), ServiceStatus, timeout=30)
            with anyio.fail_after(10):
                while True:
                    event = (await sub.receive()).decode(LogRecord)
                    assert event.service == "greeter"
                    if event.event == "service_stopped":
                        break
            assert event.component == "supervisor" and event.seq > merged.last

    # Filtering the kernel's JSON log by service finds the kernel's own lines about it too,
    # and none of them names a service in another field.
    records = log_records(system)
    about = [r for r in records if r.get("service") == "crasher" and r.get("component") == "supervisor"]
    assert {"service_state", "service_exited"} <= {r["event"] for r in about}
    assert not [r for r in records if r.get("component") in ("supervisor", "router", "kernel")
                and ({"name", "peer", "principal", "sender"} & r.keys())]


def test_the_log_book_bounds_what_it_keeps() -> None:
    """The rings themselves (kernel/_logs.py, a plain class): per-service bounds, the rings
    of names that are not configured, a reload's new bound, long and odd fields."""
    from kernel._logs import FIELD_LIMIT, OTHER_RINGS, LogBook

    book = LogBook(3, known=["a"])
    for i in range(5):
        book.sink({"service": "a", "event": f"e{i}", "level": "info", "timestamp": "x", "n": i})
    for i in range(OTHER_RINGS + 5):
        book.sink({"service": f"busctl.{i}", "event": "denied", "level": "warning"})
    book.sink({"event": "kernel_line", "component": "kernel", "path": Path("/x"), "big": 2**70,
               "text": "y" * (FIELD_LIMIT + 10), "nested": {"k": [1, (2, 3)]}, "none": None})
    a = book.query(["a"])
    assert [r.event for r in a.records] == ["e2", "e3", "e4"] and a.records[0].fields == {"n": 2}
    assert a.last == 5 + OTHER_RINGS + 5 + 1
    names = book.names()
    assert "busctl.0" not in names and f"busctl.{OTHER_RINGS + 4}" in names and {"a", "kernel"} <= set(names)
    (kernel,) = book.query(["kernel"]).records
    assert kernel.component == "kernel" and kernel.fields["path"] == "/x" and kernel.fields["big"] == str(2**70)
    assert kernel.fields["text"].endswith("... [10 more characters]") and kernel.fields["nested"] == {"k": [1, [2, 3]]}
    assert "none" not in kernel.fields
    book.configure(2, known=["a", "b"])
    assert [r.event for r in book.query(["a"]).records] == ["e3", "e4"] and book.query(["b"]).records == []
    with pytest.raises(KeyError):
        book.query(["busctl.0"])


def test_lines_per_service_is_validated() -> None:
    assert parse_config("[logs]\nlines_per_service = 50\n").logs.lines_per_service == 50
    assert parse_config("").logs.lines_per_service == 1000
    for bad in ("0", "1000001", '"many"'):
        with pytest.raises(ConfigError, match="logs.lines_per_service"):
            parse_config(f"[logs]\nlines_per_service = {bad}\n")


# -- telemetry: a port in use ------------------------------------------------------------------

async def test_a_second_system_on_the_same_telemetry_port_keeps_its_telemetry(make_system) -> None:
    port = free_port()
    config = f"""
[services.telemetry]
command = ["{{python}}", "-m", "services.telemetry"]
capabilities = ["subscribe:metrics.*", "subscribe:alerts.*", "subscribe:samples.*", "subscribe:security.checkpoint",
                "call:kernel.ListServices", "publish:telemetry.*"]
settings = {{ http = "127.0.0.1:{port}" }}
"""
    first: System = make_system(config)
    await first.wait_ready("telemetry")
    second: System = make_system(config)
    await second.wait_ready("telemetry")
    address = f"127.0.0.1:{port}"
    # the first serves /metrics; the second says once why it does not, and serves the bus
    body = await anyio.to_thread.run_sync(
        lambda: urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode())
    assert "edgebus_" in body
    async with second.client() as bus:
        state = await bus.call("telemetry", GetUplink(), UplinkState)
        assert state.http == "" and state.http_error == f"cannot listen on {address}: Address already in use"
        assert "# TYPE" in (await bus.call("telemetry", GetMetrics(), MetricsText)).text
        status = await bus.call("kernel", GetService(name="telemetry"), ServiceStatus)
        assert status.state == "ready" and status.restarts == 0
    async with first.client() as bus:
        first_state = await bus.call("telemetry", GetUplink(), UplinkState)
        assert first_state.http == f"http://{address}/metrics" and first_state.http_error == ""
    naming = [r for r in log_records(second) if address in msgspec.json.encode(r).decode()]
    assert [(r["service"], r["level"], r["event"]) for r in naming] == [
        ("telemetry", "error", "metrics_http_unavailable")], naming
    assert "Traceback" not in second.log()


# -- quiet by default --------------------------------------------------------------------------

async def test_busctl_sessions_and_stops_are_quiet_and_a_waiting_service_says_so(make_system) -> None:
    system: System = make_system(f"""
[services.base]
command = {GREETER}
settings = {{ setup_delay = 3.0 }}
[services.top]
command = {GREETER}
requires = ["base"]
""")
    # while base gets ready, top waits for it: 'waiting', not 'backoff'
    services = await system.wait_until(lambda s: s["top"].state == "waiting", timeout=10)
    assert services["base"].state == "starting"
    await system.wait_ready("base", "top")
    waiting = [r for r in log_records(system) if r.get("service") == "top" and r["event"] == "service_state"]
    assert waiting[0]["state"] == "waiting" and waiting[0]["detail"] == "waiting for base to be ready"

    # (a service's own "service_ready" line may reach the kernel's log after its READY)
    wait_for(lambda: sum('"event": "service_ready"' in line for line in system.log().splitlines()) == 2, 10,
             "both greeters' service_ready lines")
    before = len(system.log().splitlines())
    for _ in range(3):
        system.busctl("list", check=True)
    assert system.log().splitlines()[before:] == []  # busctl's sessions: debug level

    system.busctl("stop", "top", check=True)
    new = [msgspec.json.decode(line) for line in system.log().splitlines()[before:]]
    assert [(r["service"], r["event"], r["level"]) for r in new] == [("top", "service_stopped", "info")], new
    stopped = new[0]
    assert stopped["component"] == "supervisor" and stopped["previous"] == "ready"
    assert stopped["status"] == "exited with status 0" and stopped["signal"] == "SIGTERM" and stopped["took"] < 5
    assert system.stop() == 0
    shutdown = [msgspec.json.decode(line) for line in system.log().splitlines()[before + 1:]]
    assert [(r["service"], r["event"]) for r in shutdown] == [
        ("kernel", "kernel_shutdown"), ("base", "service_stopped"), ("kernel", "kernel_stopped")]


# -- the first boot: no warnings while numba compiles --------------------------------------------

async def test_the_first_boot_of_the_default_system_has_no_warning(make_system, tmp_path: Path) -> None:
    """A cold numba cache (a first boot without make's warm-up): the accelerator driver
    compiles its ops before it says READY and the scheduler starts after it, so no request
    times out and no line is a warning."""
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    config = default_config_text()
    for service in ("accel-cpu", "scheduler"):
        config = config.replace(f"[services.{service}]\n", f'[services.{service}]\npass_environment = ["NUMBA_CACHE_DIR"]\n')
    config = config.replace('http = "127.0.0.1:9464"', f'http = "127.0.0.1:{free_port()}"')
    config = config.replace("fault_at = 20.0", "")  # (the demo's bearing fault raises an alert: a warning)
    system: System = make_system(config, env={"NUMBA_CACHE_DIR": str(cache)})
    await system.wait_ready("accel-cpu", "scheduler", "vibration", "telemetry", timeout=90)
    async with system.client() as bus:
        async with bus.subscribe("results.vibration") as results:
            with anyio.fail_after(30):
                for _ in range(6):  # three seconds of the pipeline at 2 frames/s
                    (await results.receive()).decode(Detection)
    assert any(cache.rglob("*.nbi")), "the driver did not compile into the given cache"
    records = log_records(system)
    assert [r for r in records if r["level"] not in ("debug", "info")] == []
    warmed = [r for r in records if r["event"] == "ops_warmed"]
    assert warmed and warmed[0]["service"] == "accel-cpu"


# -- busctl logs and status --------------------------------------------------------------------

BUSCTL_LOGS = f"""
[services.greeter]
command = {GREETER}

[services.crasher]
command = ["sh", "-c", "echo 'cannot open /etc/crasher.conf: No such file or directory' >&2; exit 1"]
max_restarts = 1
backoff_initial = 0.05
"""


class _Lines:
    """A process's stdout read line by line, each read bounded in time (os.read and select:
    no buffered reader hides lines from select)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc, self.fd, self.buf = proc, proc.stdout.fileno(), b""

    def until(self, done: Any, timeout: float) -> list[dict[str, Any]]:
        """JSON lines until ``done(record)``, failing after ``timeout``."""
        got: list[dict[str, Any]] = []
        end = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                got.append(json.loads(line))
                if done(got[-1]):
                    return got
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"timed out; read so far: {got}")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"busctl ended ({self.proc.wait()}); read so far: {got}")
            self.buf += chunk


async def test_busctl_logs_and_status_show_why_a_service_failed(make_system) -> None:
    system: System = make_system(BUSCTL_LOGS)
    await system.wait_ready("greeter")
    await system.wait_until(lambda s: s["crasher"].state == "failed")

    human = system.busctl("logs", "crasher", check=True).stdout.splitlines()
    assert sum(line.endswith(" crasher stderr: cannot open /etc/crasher.conf: No such file or directory")
               for line in human) == 2, human
    assert "crasher[supervisor] info service_state state=failed" in human[-1]
    records = [json.loads(line) for line in system.busctl("logs", "-o", "json", "crasher", check=True).stdout.splitlines()]
    assert len(records) == len(human) and {r["service"] for r in records} == {"crasher"}
    assert set(records[0]) == {"seq", "time", "service", "level", "event", "component", "fields"}
    assert system.busctl("logs", "crasher", "-n", "3", check=True).stdout.splitlines() == human[-3:]
    assert system.busctl("logs", "crasher", "--since", "1h", check=True).stdout.splitlines() == human
    assert system.busctl("logs", "crasher", "--since", str(int(time.time()) + 3600), check=True).stdout == ""
    both = system.busctl("logs", "greeter", "crasher", check=True).stdout.splitlines()
    assert set(human) < set(both) and any(" greeter[supervisor] " in line for line in both)
    missing = system.busctl("logs", "nosuch")
    assert missing.returncode == 4 and "no service named 'nosuch'" in missing.stderr
    bad = system.busctl("logs", "--since", "soon")
    assert bad.returncode == 2 and "'soon' is not a time" in bad.stderr

    # status: since when, command, memory, and the last 10 lines
    status = system.busctl("status", "greeter", check=True).stdout.splitlines()
    detail = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in status[:status.index("")])}
    assert detail["state"] == "ready" and detail["since"].endswith("s ago)")
    assert detail["command"].endswith("python -m services.examples.greeter")
    assert detail["memory"].endswith("M")
    tail = status[status.index("") + 1:]
    assert tail == system.busctl("logs", "greeter", "-n", "10", check=True).stdout.splitlines() and tail
    doc = json.loads(system.busctl("status", "crasher", "-o", "json", check=True).stdout)
    assert doc["state"] == "failed" and doc["memory"] == 0 and doc["command"][0] == "sh"
    assert 0 < len(doc["logs"]) <= 10 and doc["logs"][-1]["fields"]["state"] == "failed"

    # -f: what is logged from now on, as it comes
    follower = subprocess.Popen([str(BIN / "busctl"), "logs", "-f", "-o", "json", "greeter", "--run-dir",
                                 str(system.run_dir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        lines = _Lines(follower)
        history = lines.until(lambda r: True, 10)  # subscribed once it prints
        system.busctl("stop", "greeter", check=True)
        followed = lines.until(lambda r: r["event"] == "service_stopped", 10)
        assert {r["service"] for r in followed} == {"greeter"}
        assert min(r["seq"] for r in followed) > history[0]["seq"]
    finally:
        follower.terminate()
        follower.wait(10)
