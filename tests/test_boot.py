"""`edgebus boot` as a whole: the default system, shutdown, config errors, crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import anyio
import msgspec
import pytest

from protocols import ListServices, ServiceList
from services import Unavailable
from services.examples.greeter import Greet, Greeting, Sleep

from conftest import BIN, System, alive, children, group, proc_comm, wait_for

pytestmark = pytest.mark.anyio


async def test_default_system_boots_and_stops_cleanly(make_system) -> None:
    system: System = make_system(None)
    listing = await system.wait_ready("greeter")
    pids = [s.pid for s in listing.services if s.pid]
    assert pids and all(alive(p) for p in pids)
    out = system.busctl("call", "greeter", "Greet", '{"who": "operator"}', check=True).stdout
    assert "hello, operator" in out
    assert (system.run_dir / "state").is_dir()
    assert system.stop() == 0
    assert not any(alive(p) for p in pids)
    assert not (system.run_dir / "bus.sock").exists()
    log = system.log()
    # every child line is re-emitted as a structured line carrying the service name
    lines = [msgspec.json.decode(line) for line in log.splitlines() if line.startswith("{")]
    assert any(r.get("service") == "greeter" and r.get("event") == "service_ready" for r in lines)
    assert all("service" in r for r in lines)


def test_invalid_config_exits_78_naming_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[services.a]\ncommand = ["true"]\ncapabilities = "call:*"\n')
    proc = subprocess.run([str(BIN / "edgebus"), "boot", "--config", str(bad), "--run-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78
    assert str(bad) in proc.stderr and "services.a.capabilities" in proc.stderr


def test_a_second_kernel_on_the_same_run_dir_is_refused(make_system) -> None:
    system: System = make_system(None)
    proc = subprocess.run([str(BIN / "edgebus"), "boot", "--run-dir", str(system.run_dir)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "another edgebus kernel is running" in proc.stderr


CRASH_CONFIG = """
[bus]
heartbeat_interval = 0.2

[services.greeter]
command = ["{python}", "-m", "services.examples.greeter"]

[services.dependent]
command = ["{python}", "-m", "services.examples.greeter"]
requires = ["greeter"]

[services.client]
capabilities = ["call:greeter.*", "call:dependent.*", "call:kernel.*", "subscribe:kernel.*"]
"""


async def test_a_killed_service_fails_its_pending_requests_and_comes_back(make_system) -> None:
    system: System = make_system(CRASH_CONFIG)
    listing = await system.wait_ready("greeter", "dependent")
    old = {s.name: s.pid for s in listing.services}
    async with system.client("client") as bus:
        sub = await bus.subscribe("kernel.services")
        failed: list[BaseException] = []
        async with anyio.create_task_group() as tg:
            async def slow_call() -> None:
                try:
                    await bus.call("greeter", Sleep(seconds=30), timeout=20)
                except Unavailable as exc:
                    failed.append(exc)
            tg.start_soon(slow_call)
            # kill once the request is pending at the greeter
            with anyio.fail_after(5):
                while True:
                    st = await bus.call("kernel", ListServices(), ServiceList)
                    if next(s for s in st.services if s.name == "greeter").pending:
                        break
                    await anyio.sleep(0.01)
            killed_at = time.monotonic()
            os.kill(old["greeter"], signal.SIGKILL)
            # meanwhile the bus keeps routing for the others
            assert (await bus.call("dependent", Greet(who="meanwhile"), Greeting, timeout=5)).text == "hello, meanwhile"
        assert failed and "went away" in str(failed[0])
        assert time.monotonic() - killed_at < 2
        with anyio.fail_after(15):
            while True:
                st = await bus.call("kernel", ListServices(), ServiceList)
                g = next(s for s in st.services if s.name == "greeter")
                if g.state == "ready" and g.pid != old["greeter"]:
                    break
                await sub.receive()
        assert g.restarts == 1 and "SIGKILL" in g.last_exit
        assert (await bus.call("greeter", Greet(who="again"), Greeting, timeout=5)).text == "hello, again"
        dep = next(s for s in st.services if s.name == "dependent")
        assert dep.pid == old["dependent"] and dep.state == "ready"  # untouched
    assert system.stop() == 0


STUBBORN = """
[services.stubborn]
command = ["sh", "-c", "trap '' TERM; sleep 300 & sleep 300 & wait"]
stop_timeout = 0.5
start_timeout = 60
"""


def test_stop_kills_the_whole_process_group_after_the_grace_period(make_system) -> None:
    system: System = make_system(STUBBORN)
    kernel_pid = system.proc.pid

    leader = wait_for(lambda: [p for p in children(kernel_pid) if alive(p)], 10, "the stubborn service to start")[0]
    pgid = os.getpgid(leader)
    wait_for(lambda: len([p for p in group(pgid)]) >= 3, 10, "the stubborn service's children")
    start = time.monotonic()
    assert system.stop() == 0
    assert time.monotonic() - start < 5
    assert group(pgid) == []
    stopped = [msgspec.json.decode(line) for line in system.log().splitlines() if '"service_stopped"' in line]
    assert [(r["service"], r["level"], r["killed"]) for r in stopped] == [
        ("stubborn", "warning", "still running 0.5s after SIGTERM: SIGKILL")]


HELPERS = Path(__file__).resolve().parent / "helpers"


async def test_a_hung_service_is_killed_and_restarted(make_system) -> None:
    system: System = make_system(f"""
[bus]
heartbeat_interval = 0.2
heartbeat_liveness = 3

[services.hung]
command = ["{{python}}", "{HELPERS / 'hung_service.py'}"]
stop_timeout = 1.0
""")
    first = next(s for s in (await system.wait_ready("hung")).services if s.name == "hung")
    async with system.client() as bus:
        sub = await bus.subscribe("kernel.services")
        with anyio.fail_after(15):
            while True:
                st = await bus.call("kernel", ListServices(), ServiceList)
                hung = next(s for s in st.services if s.name == "hung")
                if hung.state == "ready" and hung.pid != first.pid:
                    break
                await sub.receive()
    assert hung.restarts == 1
    assert not alive(first.pid)
    assert "service_unresponsive" in system.log()


async def test_exit_78_is_a_permanent_failure_and_is_not_restarted(make_system) -> None:
    system: System = make_system("""
[services.broken]
command = ["{python}", "-c", "import sys; sys.exit(78)"]
""")
    async with system.client() as bus:
        sub = await bus.subscribe("kernel.services")
        with anyio.fail_after(15):
            while True:
                st = await bus.call("kernel", ListServices(), ServiceList)
                broken = next(s for s in st.services if s.name == "broken")
                if broken.state == "failed":
                    break
                await sub.receive()
    assert broken.restarts == 0 and "78" in broken.last_exit


def test_not_pid1_it_is_a_subreaper_and_reaps_orphans(make_system) -> None:
    system: System = make_system("""
[services.orphaner]
command = ["sh", "-c", "for i in $(seq 10); do setsid sleep 0.5 & done; sleep 0.1; exit 0"]
restart = "temporary"
""")
    kernel = system.proc.pid

    def orphans() -> list[int]:  # sleeps whose parent is the kernel, zombies included
        return [pid for pid in children(kernel) if proc_comm(pid) == "sleep"]

    # re-parented to the kernel (not to init) once their shell exited...
    adopted = wait_for(lambda: len(orphans()) == 10 and orphans(), 10, "the orphans to be adopted by the kernel")
    assert len(adopted) == 10
    # ...and reaped by it when they exit: no zombie is left behind
    wait_for(lambda: not orphans(), 10, "the kernel to reap the orphans")
    assert system.stop() == 0
