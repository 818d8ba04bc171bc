"""The supervisor: restart policies, readiness, reload, isolation and limits."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import msgspec
import pytest

from protocols import ServiceStateChanged
from services.examples.greeter import Greet, Greeting

from conftest import System, alive, children, proc_comm, wait_for

pytestmark = pytest.mark.anyio

GREETER = '["{python}", "-m", "services.examples.greeter"]'


async def states(system: System) -> dict[str, object]:
    return await system.services()


async def wait_until(system: System, predicate, timeout: float = 20):
    return await system.wait_until(predicate, timeout)


async def test_dependents_start_only_after_their_dependencies_are_ready(make_system) -> None:
    system: System = make_system(f"""
[services.base]
command = {GREETER}
settings = {{ setup_delay = 1.0 }}
[services.middle]
command = {GREETER}
requires = ["base"]
[services.top]
command = {GREETER}
requires = ["middle"]
""")
    async with system.client() as bus:
        sub = await bus.subscribe("kernel.services")
        events: list[ServiceStateChanged] = []
        with anyio.fail_after(20):
            while not any(e.name == "top" and e.state == "ready" for e in events):
                incoming = await sub.receive()
                events.append(incoming.decode(ServiceStateChanged))
    # may have missed base's early events; what follows must be in order
    order = [(e.name, e.state) for e in events if e.state in ("starting", "ready")]
    assert order.index(("middle", "starting")) > order.index(("base", "ready"))
    assert order.index(("top", "starting")) > order.index(("middle", "ready"))


async def test_rest_for_one_restarts_dependents_and_spares_the_rest(make_system) -> None:
    system: System = make_system(f"""
[supervisor]
strategy = "rest_for_one"
[services.base]
command = {GREETER}
[services.dependent]
command = {GREETER}
requires = ["base"]
[services.bystander]
command = {GREETER}
""")
    before = {n: s.pid for n, s in (await system.wait_ready("base", "dependent", "bystander")).services
              and (await states(system)).items()}
    os.kill(before["base"], signal.SIGKILL)
    after = await wait_until(system, lambda s: all(s[n].state == "ready" for n in before)
                             and s["base"].pid != before["base"] and s["dependent"].pid != before["dependent"])
    assert after["bystander"].pid == before["bystander"]
    assert after["base"].restarts == 1 and after["dependent"].restarts == 1 and after["bystander"].restarts == 0


async def test_a_crash_loop_is_marked_failed_and_the_rest_keeps_running(make_system) -> None:
    system: System = make_system(f"""
[services.crasher]
command = ["sh", "-c", "exit 3"]
max_restarts = 3
restart_window = 30
backoff_initial = 0.05
backoff_max = 0.1
[services.greeter]
command = {GREETER}
""")
    # (the crash loop may well be over before the greeter's interpreter has started)
    services = await wait_until(system, lambda s: s["crasher"].state == "failed" and s["greeter"].state == "ready")
    assert services["crasher"].restarts == 3
    assert "restarts within" in system.log() and "exited with status 3" in services["crasher"].last_exit
    async with system.client() as bus:
        assert (await bus.call("greeter", Greet(who="still"), Greeting, timeout=5)).text == "hello, still"
    assert system.stop() == 0


def test_a_critical_crash_loop_makes_boot_exit_2(make_system) -> None:
    system: System = make_system(f"""
[services.heart]
command = ["sh", "-c", "exit 1"]
critical = true
max_restarts = 2
backoff_initial = 0.05
[services.greeter]
command = {GREETER}
""")
    wait_for(lambda: system.proc.poll() is not None, 30, "edgebus boot to give up")
    assert system.proc.returncode == 2
    assert "kernel_gives_up" in system.log() and "critical service 'heart' failed" in system.log()


async def test_restart_types(make_system) -> None:
    system: System = make_system("""
[services.transient-ok]
command = ["sh", "-c", "exit 0"]
restart = "transient"
[services.temporary-bad]
command = ["sh", "-c", "exit 9"]
restart = "temporary"
[services.transient-bad]
command = ["sh", "-c", "exit 9"]
restart = "transient"
max_restarts = 1
backoff_initial = 0.05
""")
    services = await wait_until(system, lambda s: s["transient-ok"].state == "stopped"
                                and s["temporary-bad"].state == "stopped" and s["transient-bad"].state == "failed")
    assert services["transient-ok"].restarts == 0 and services["temporary-bad"].restarts == 0
    assert services["transient-bad"].restarts == 1


async def test_a_service_that_never_says_ready_is_killed_at_its_start_timeout(make_system) -> None:
    system: System = make_system("""
[services.mute]
command = ["sleep", "300"]
start_timeout = 0.5
max_restarts = 0
""")
    start = time.monotonic()
    services = await wait_until(system, lambda s: s["mute"].state == "failed")
    assert time.monotonic() - start < 10
    assert "start_timeout" in system.log() and "SIGTERM" in services["mute"].last_exit


async def test_busctl_stop_start_restart_and_wait(make_system) -> None:
    system: System = make_system(f"""
[services.greeter]
command = {GREETER}
""")
    assert system.busctl("wait", "greeter", "--state", "ready", "--timeout", "20").returncode == 0
    pid = (await states(system))["greeter"].pid
    out = system.busctl("stop", "greeter", check=True).stdout
    assert "state stopped" in out and not alive(pid)
    assert system.busctl("wait", "greeter", "--state", "ready", "--deadline", "0.5").returncode == 6  # timeout
    out = system.busctl("start", "greeter", "--json", check=True).stdout
    started = msgspec.json.decode(out)
    assert started["state"] == "ready" and started["pid"] != pid
    out = msgspec.json.decode(system.busctl("restart", "greeter", "--json", check=True).stdout)
    assert out["state"] == "ready" and out["pid"] != started["pid"]
    bad = system.busctl("stop", "nosuch")
    assert bad.returncode == 4 and "nosuch" in bad.stderr  # no such service


async def test_reload_restarts_only_what_changed_and_rejects_a_broken_config(make_system) -> None:
    base = f"""
[services.keep]
command = {GREETER}
[services.change]
command = {GREETER}
[services.drop]
command = {GREETER}
"""
    system: System = make_system(base)
    before = {n: s.pid for n, s in (await system.wait_ready("keep", "change", "drop")).services and
              (await states(system)).items()}
    # a broken config: nothing changes, and the reason is given
    system.config_path.write_text(base + '[services.change]\ncomand = ["x"]\n')
    bad = system.busctl("reload")
    assert bad.returncode == 1 and "system.toml" in bad.stderr and "unchanged" in bad.stderr
    os.kill(system.proc.pid, signal.SIGHUP)
    wait_for(lambda: system.log().count("reload_rejected") >= 2, 10, "the SIGHUP reload to be rejected")
    assert {n: s.pid for n, s in (await states(system)).items()} == before
    # a good one: change one, drop one, add one
    system.config_path.write_text(f"""
[services.keep]
command = {GREETER}
[services.change]
command = {GREETER}
settings = {{ tick_interval = 7.0 }}
[services.new]
command = {GREETER}
""")
    os.kill(system.proc.pid, signal.SIGHUP)
    after = await wait_until(system, lambda s: "drop" not in s and s.get("new") is not None
                             and s["new"].state == "ready" and s["change"].state == "ready"
                             and s["change"].pid != before["change"])
    assert after["keep"].pid == before["keep"]
    assert not alive(before["drop"])
    out = msgspec.json.decode(system.busctl("reload", "--json", check=True).stdout)
    assert out["restarted"] == [] and out["started"] == [] and sorted(out["unchanged"]) == ["change", "keep", "new"]


async def test_isolation_and_limits(make_system) -> None:
    system: System = make_system("""
[services.boxed]
command = ["sleep", "300"]
start_timeout = 300
environment = { VISIBLE = "yes" }
pass_environment = ["EDGEBUS_TEST_PASSED"]
limits = { open_files = 123, cpu_seconds = 1000, core_size = 0, nice = 7, cpu_affinity = [0], memory = "512M" }
""", env={"EDGEBUS_TEST_PASSED": "1", "EDGEBUS_TEST_NOT_PASSED": "1"})
    pid = wait_for(lambda: _child_named(system.proc.pid, "sleep"), 10, "the boxed service")
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert _limit(limits, "Max open files") == "123"
    assert _limit(limits, "Max cpu time") == "1000"
    assert _limit(limits, "Max core file size") == "0"
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    assert int(stat[16]) == 7  # nice
    status = Path(f"/proc/{pid}/status").read_text()
    assert "Cpus_allowed_list:\t0\n" in status
    environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if kv)
    assert environ["VISIBLE"] == "yes" and environ["EDGEBUS_TEST_PASSED"] == "1"
    assert "EDGEBUS_TEST_NOT_PASSED" not in environ and "EDGEBUS_EXEC_SPEC" not in environ
    assert set(environ) <= {"PATH", "VISIBLE", "EDGEBUS_TEST_PASSED", "EDGEBUS_SERVICE", "EDGEBUS_BUS",
                            "EDGEBUS_RUN_DIR", "EDGEBUS_STATE_DIR", "EDGEBUS_CONFIG_DIR", "EDGEBUS_LOG_FORMAT",
                            "EDGEBUS_LOG_LEVEL",
                            "PYTHONUNBUFFERED", "EDGEBUS_CREDENTIAL_FD"}
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    fds = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
    assert fds == [0, 1, 2, int(environ["EDGEBUS_CREDENTIAL_FD"])], fds
    assert os.getpgid(pid) == pid  # its own process group
    assert Path(os.readlink(f"/proc/{pid}/cwd")) == system.run_dir / "state"
    if "cgroups_unavailable" in system.log():  # cgroup v2 not delegated here: rlimit fallback
        assert _limit(limits, "Max address space") == str(512 * 1024 * 1024)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs a root kernel")
def test_user_and_group_when_root(make_system) -> None:
    system: System = make_system("""
[services.nobody]
command = ["sleep", "300"]
start_timeout = 300
user = "nobody"
working_directory = "/"
""")
    pid = wait_for(lambda: _child_named(system.proc.pid, "sleep"), 10, "the service")
    import pwd

    uid = pwd.getpwnam("nobody").pw_uid
    status = Path(f"/proc/{pid}/status").read_text()
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status


def _limit(text: str, name: str) -> str:
    line = next(line for line in text.splitlines() if line.startswith(name))
    return line[len(name):].split()[0]


def _child_named(ppid: int, comm: str) -> int | None:
    return next((pid for pid in children(ppid) if proc_comm(pid) == comm and alive(pid)), None)


async def test_a_service_that_says_bye_and_exits_78_is_failed_not_killed(make_system, tmp_path: Path) -> None:
    script = tmp_path / "gives_up.py"
    script.write_text(
        "from services import Service, run\n"
        "class GivesUp(Service):\n"
        "    name = 'gives-up'\n"
        "    async def setup(self):\n"
        "        raise SystemExit(78)  # e.g. its model is missing: restarting cannot help\n"
        "run(GivesUp)\n")
    system: System = make_system(f"""
[services.gives-up]
command = ["{{python}}", "{script}"]
""")
    services = await wait_until(system, lambda s: s["gives-up"].state == "failed")
    assert services["gives-up"].last_exit == "exited with status 78"
    assert services["gives-up"].restarts == 0


async def test_reload_fixing_a_dependency_lets_its_waiting_dependent_start(make_system) -> None:
    broken = f"""
[services.base]
command = ["/nonexistent/binary"]
[services.top]
command = {GREETER}
requires = ["base"]
"""
    system: System = make_system(broken)
    await wait_until(system, lambda s: s["base"].state == "failed" and s["top"].state == "waiting")
    system.config_path.write_text(broken.replace('["/nonexistent/binary"]', GREETER))
    out = msgspec.json.decode(system.busctl("reload", "--json", check=True).stdout)
    assert out["restarted"] == ["base"]
    await system.wait_ready("base", "top")


async def test_start_pulls_in_stopped_dependencies_and_reports_ready(make_system) -> None:
    system: System = make_system(f"""
[services.base]
command = {GREETER}
settings = {{ setup_delay = 0.5 }}
[services.top]
command = {GREETER}
requires = ["base"]
""")
    await system.wait_ready("base", "top")
    system.busctl("stop", "top", check=True)
    system.busctl("stop", "base", check=True)
    started = msgspec.json.decode(system.busctl("start", "top", "--json", check=True).stdout)
    assert started["state"] == "ready"  # base was started first, as top requires it
    services = await states(system)
    assert services["base"].state == "ready" and services["top"].state == "ready"


async def test_listservices_never_shows_a_state_without_its_pid(make_system) -> None:
    """A ready service's pid is never 0 and a restarting one's is: state and pid change
    together, also while a reader in the router thread asks in the middle of a restart."""
    system: System = make_system(f"""
[services.greeter]
command = {GREETER}
max_restarts = 50
restart_window = 60
backoff_initial = 0.01
backoff_max = 0.02
""")
    from protocols import ListServices, ServiceList

    seen: list[tuple[str, int]] = []
    pid = (await system.wait_ready("greeter")).services[0].pid
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            async with system.client() as bus:
                while True:
                    listing = await bus.call("kernel", ListServices(), ServiceList)
                    seen.extend((s.state, s.pid) for s in listing.services if s.name == "greeter")
        tg.start_soon(watch)
        for _ in range(8):
            os.kill(pid, signal.SIGKILL)
            pid = (await system.wait_restarted("greeter", pid)).pid
        tg.cancel_scope.cancel()
    running = [(state, p) for state, p in seen if state in ("starting", "ready", "stopping")]
    assert running and all(p for _, p in running), [s for s in seen if not s[1]]
    assert all(not p for state, p in seen if state in ("backoff", "stopped", "failed")), seen
    assert {"backoff", "ready"} <= {state for state, _ in seen}
    assert system.stop() == 0
