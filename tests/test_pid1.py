"""`edgebus boot` as PID 1 of a PID namespace (``unshare --pid --fork --mount-proc``),
the way a container runs it.  Mirrors tini's and dumb-init's own checks: zombies reaped,
orphans reaped, signals turned into an orderly shutdown, stubborn groups killed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest


from conftest import BIN, System, children, proc_comm, proc_stat, wait_for

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace needs root here"),
]

GREETER = '["{python}", "-m", "services.examples.greeter"]'


class Pid1System(System):
    """System started inside a new PID namespace; ``pid1`` is its PID 1, seen from here."""

    def __init__(self, tmp: Path, config: str) -> None:
        self.tmp = tmp
        self.run_dir = tmp / "run"
        self.log_path = tmp / "kernel.log"
        self.config_path = tmp / "system.toml"
        self.config_path.write_text(config)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", str(BIN / "edgebus"), "boot",
             "--config", str(self.config_path), "--run-dir", str(self.run_dir)],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "EDGEBUS_LOG_FORMAT": "json"},
            start_new_session=True)
        self.endpoint = f"ipc://{self.run_dir / 'bus.sock'}"
        self.pid1 = wait_for(lambda: children(self.proc.pid), 10, "PID 1 of the namespace")[0]

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM to PID 1 itself; unshare exits with its status."""
        os.kill(self.pid1, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            self._log.close()
        return code


def _zombies_of(ppid: int) -> list[int]:
    return [p for p in children(ppid) if (proc_stat(p) or ["?"])[0] == "Z"]


@pytest.fixture
def pid1_system(tmp_path: Path):
    systems: list[Pid1System] = []

    def make(config: str) -> Pid1System:
        directory = tmp_path / f"ns{len(systems)}"
        directory.mkdir()
        s = Pid1System(directory, config)
        systems.append(s)
        s.wait_bus()
        return s

    yield make
    for s in systems:
        s.kill()


async def test_pid1_reaps_zombies_and_orphans(pid1_system) -> None:
    # The service leaves 100 children in its group and 20 orphans in their own sessions
    # (setsid), then exits; all are re-parented to PID 1 or killed with the group.
    system: Pid1System = pid1_system(f"""
[services.spawner]
command = ["sh", "-c", "for i in $(seq 100); do sleep 0.2 & done; for i in $(seq 20); do setsid sleep 0.5 & done; exit 0"]
restart = "transient"
[services.greeter]
command = {GREETER}
""")
    await system.wait_ready("greeter")
    orphans_gone = lambda: not any((proc_stat(p) or ["", ""])[0] != "Z" and p != system.pid1
                                   for p in children(system.pid1) if proc_comm(p) == "sleep")
    wait_for(orphans_gone, 10, "the orphaned sleeps to finish")
    wait_for(lambda: not _zombies_of(system.pid1), 5, "PID 1 to reap every zombie")
    assert _zombies_of(system.pid1) == []
    assert system.stop() == 0


async def test_sigterm_to_pid1_stops_in_reverse_order_and_exits_0(pid1_system) -> None:
    system: Pid1System = pid1_system(f"""
[services.a]
command = {GREETER}
[services.b]
command = {GREETER}
requires = ["a"]
[services.c]
command = {GREETER}
requires = ["b"]
""")
    await system.wait_ready("a", "b", "c")
    start = time.monotonic()
    assert system.stop() == 0
    assert time.monotonic() - start < 10
    stops = [line for line in system.log().splitlines() if '"service_stopped"' in line]
    order = [next(n for n in "abc" if f'"service": "{n}"' in line) for line in stops]
    assert order == ["c", "b", "a"]
    assert not [p for p in children(system.pid1)]


def test_a_service_ignoring_sigterm_is_killed_with_its_group_as_pid1(pid1_system) -> None:
    system: Pid1System = pid1_system("""
[services.stubborn]
command = ["sh", "-c", "trap '' TERM; sleep 300 & sleep 300 & wait"]
stop_timeout = 0.5
start_timeout = 60
""")
    leader = wait_for(lambda: [p for p in children(system.pid1) if proc_comm(p) == "sh"], 10, "the stubborn service")[0]
    wait_for(lambda: len(children(leader)) >= 2, 10, "its two children")
    group = [leader, *children(leader)]
    start = time.monotonic()
    assert system.stop() == 0
    assert time.monotonic() - start < 5
    assert all(proc_stat(p) is None for p in group)
    assert '"killed": "still running 0.5s after SIGTERM: SIGKILL"' in system.log()
