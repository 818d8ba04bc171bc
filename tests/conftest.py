"""Fixtures: real `edgebus boot` processes in throwaway run directories."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import anyio
import msgspec
import pytest
import zmq

from protocols import Codec, Header, Hello, Kind, ListServices, ServiceList
from services import connect

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(PY).parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll a cheap predicate (file exists, process exited) until true or fail naming it."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- processes, as /proc shows them --------------------------------------------------------


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def processes() -> list[tuple[int, list[str]]]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat is not None:
                out.append((int(entry.name), stat))
    return out


def children(ppid: int) -> list[int]:
    """Processes whose parent is ``ppid``, zombies included."""
    return [pid for pid, stat in processes() if int(stat[1]) == ppid]


def group(pgid: int) -> list[int]:
    """Live processes of a process group."""
    return [pid for pid, stat in processes() if int(stat[2]) == pgid and stat[0] != "Z"]


class System:
    """One running kernel (``edgebus boot``) with its run directory and log."""

    def __init__(self, tmp: Path, config: str | None, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.run_dir = tmp / "run"
        self.log_path = tmp / "kernel.log"
        argv = [str(BIN / "edgebus"), "boot", "--run-dir", str(self.run_dir)]
        if config is not None:
            self.config_path = tmp / "system.toml"
            self.config_path.write_text(config)
            argv += ["--config", str(self.config_path)]
        self._log = open(self.log_path, "wb")
        full_env = {**os.environ, "EDGEBUS_LOG_FORMAT": "json", **(env or {})}
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)
        self.endpoint = f"ipc://{self.run_dir / 'bus.sock'}"

    def credential(self, name: str) -> str:
        path = self.run_dir / "credentials" / name
        wait_for(path.exists, 10, f"credential file {path}")
        return path.read_text()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_bus(self, timeout: float = 10) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"edgebus boot exited with {self.proc.returncode}:\n{self.log()}")
            return (self.run_dir / "bus.sock").exists() and (self.run_dir / "credentials" / "operator").exists()
        wait_for(up, timeout, "the bus socket")

    def client(self, name: str = "operator", **kw: Any) -> Any:
        label = "test" if name == "operator" else name
        return connect(label, endpoint=self.endpoint, credential=self.credential(name), **kw)

    async def wait_ready(self, *names: str, timeout: float = 20) -> ServiceList:
        """Wait until every named service reports state ``ready`` (event-driven via
        kernel.services, with a ListServices after subscribing so nothing is missed)."""
        async with self.client() as bus:
            sub = await bus.subscribe("kernel.services")
            with anyio.fail_after(timeout):
                while True:
                    listing = await bus.call("kernel", ListServices(), ServiceList)
                    states = {s.name: s.state for s in listing.services}
                    if all(states.get(n) == "ready" for n in names):
                        return listing
                    await sub.receive()

    async def services(self) -> dict[str, Any]:
        async with self.client() as bus:
            st = await bus.call("kernel", ListServices(), ServiceList)
        return {x.name: x for x in st.services}

    async def wait_until(self, predicate: Any, timeout: float = 20) -> dict[str, Any]:
        """Re-check ``predicate(services by name)`` at every kernel.services event."""
        async with self.client() as bus:
            sub = await bus.subscribe("kernel.services")
            with anyio.fail_after(timeout):
                while True:
                    st = await bus.call("kernel", ListServices(), ServiceList)
                    services = {x.name: x for x in st.services}
                    if predicate(services):
                        return services
                    await sub.receive()

    async def wait_restarted(self, name: str, old_pid: int, timeout: float = 20) -> Any:
        """Until ``name`` runs again under another pid and is ready."""
        return (await self.wait_until(lambda s: s[name].state == "ready" and s[name].pid != old_pid, timeout))[name]

    def busctl(self, *args: str, timeout: float = 20, check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(BIN / "busctl"), *args, "--run-dir", str(self.run_dir)],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"busctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError(f"edgebus boot did not stop within {timeout}s:\n{self.log()[-3000:]}")
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._log.close()


@pytest.fixture
def make_system(tmp_path: Path) -> Iterator[Any]:
    systems: list[System] = []

    def make(config: str | None, env: dict[str, str] | None = None, sub: str = "") -> System:
        d = tmp_path / (sub or f"sys{len(systems)}")
        d.mkdir()
        system = System(d, config, env)
        systems.append(system)
        system.wait_bus()
        return system

    yield make
    for s in systems:
        s.kill()


class RawPeer:
    """A hand-driven DEALER speaking the wire format directly, for the tests that need to
    send what the SDK never would (spoofed senders, stray replies, garbage)."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.codec = Codec()
        self.ids = 1000

    def send(self, header: Header, body: Any, raw: list[bytes] | None = None) -> None:
        self.sock.send_multipart(self.codec.pack(header, body, raw or []))

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 5.0) -> tuple[Header, Any, list[bytes]]:
        """The next message other than the kernel's heartbeats."""
        end = time.monotonic() + timeout
        while True:
            if not self.sock.poll(max(int((end - time.monotonic()) * 1000), 0)):
                raise AssertionError(f"no message within {timeout}s")
            header, body, raw = self.codec.unpack(self.sock.recv_multipart())
            if not (header.kind == Kind.CONTROL and header.type == "Heartbeat"):
                return header, body, raw

    def recv_error(self, timeout: float = 5.0) -> Any:
        from protocols import Error

        header, body, _ = self.recv(timeout)
        assert header.kind == Kind.ERROR, header
        return msgspec.msgpack.decode(body, type=Error)

    def hello(self, name: str, credential: str, **kw: Any) -> Any:
        from protocols import Welcome

        self.send(Header(kind=Kind.CONTROL, type="Hello", id=1), Hello(service=name, credential=credential, **kw))
        header, body, _ = self.recv()
        assert header.kind == Kind.REPLY, msgspec.msgpack.decode(body)
        return msgspec.msgpack.decode(body, type=Welcome)

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture
def raw_peer() -> Iterator[Any]:
    peers: list[RawPeer] = []

    def make(endpoint: str) -> RawPeer:
        p = RawPeer(endpoint)
        peers.append(p)
        return p

    yield make
    for p in peers:
        p.close()
