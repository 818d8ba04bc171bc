"""Spawning, watching and stopping service processes.

Every service is a fresh interpreter (or any command) in its own process group, with a
clean environment, stdin from /dev/null, stdout/stderr captured and re-emitted as
structured log lines, and one inherited descriptor: a pipe holding its bus credential.
The kernel reaps every child itself (``waitpid(-1)`` on SIGCHLD), so orphans re-parented
to it are reaped too.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable

import anyio
import anyio.abc

from protocols import ServiceStatus
from services import get_logger

from ._config import ServiceConfig, SystemConfig, dependency_order
from ._exceptions import SpawnError

__all__ = ["Supervisor", "State", "ManagedService", "describe_status", "EXIT_PERMANENT_FAILURE"]

#: A service exiting with this status (EX_CONFIG) is not restarted: it reported that
#: restarting cannot help (bad configuration, missing model...).
EXIT_PERMANENT_FAILURE = 78

log = get_logger(component="supervisor")
_child_log = get_logger()


class State(str, enum.Enum):
    CONFIGURED = "configured"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    BACKOFF = "backoff"
    FAILED = "failed"


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class ManagedService:
    def __init__(self, name: str, spec: ServiceConfig) -> None:
        self.name = name
        self.spec = spec
        self.state = State.CONFIGURED
        self.pid = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.last_exit = ""
        self.ready = anyio.Event()
        self.exited = anyio.Event()
        self.exit_status: int | None = None

    def status(self) -> ServiceStatus:
        return ServiceStatus(
            name=self.name, state=self.state.value, pid=self.pid, managed=True,
            requires=list(self.spec.requires), restarts=self.restarts,
            uptime=round(time.monotonic() - self.started_at, 3) if self.pid and self.started_at else 0.0,
            last_exit=self.last_exit,
        )


class Supervisor:
    """Starts the configured services in dependency order and keeps them running."""

    def __init__(
        self,
        config: SystemConfig,
        *,
        endpoint: str,
        run_dir: str,
        state_dir: str,
        issue_credential: Callable[[str, list[str]], str],
        on_state: Callable[[str, str, str, int, str], None] = lambda *a: None,
        on_exit: Callable[[str, str], None] = lambda name, why: None,
    ) -> None:
        self.config = config
        self.endpoint = endpoint
        self.run_dir = run_dir
        self.state_dir = state_dir
        self._issue_credential = issue_credential
        self._on_state = on_state
        self._on_exit = on_exit
        self.services: dict[str, ManagedService] = {
            name: ManagedService(name, spec)
            for name, spec in config.services.items()
            if spec.managed and spec.enabled
        }
        self._by_pid: dict[int, ManagedService] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self.shutting_down = False
        self.orphans_reaped = 0

    # -- state ------------------------------------------------------------------------------

    def _set_state(self, svc: ManagedService, state: State, detail: str = "") -> None:
        previous = svc.state
        if previous == state:
            return
        svc.state = state
        log.info("service_state", name=svc.name, state=state.value, previous=previous.value,
                 pid=svc.pid or None, detail=detail or None)
        self._on_state(svc.name, state.value, previous.value, svc.pid, detail)

    def status(self, name: str) -> ServiceStatus | None:
        svc = self.services.get(name)
        return svc.status() if svc else None

    def peer_gone(self, name: str, why: str) -> None:
        """The router lost a managed service's connection (Bye, or heartbeats stopped)
        while its process may still run: a hung service is killed, then restarted."""
        svc = self.services.get(name)
        if (svc is None or not svc.pid or svc.exited.is_set() or self.shutting_down
                or svc.state in (State.STOPPING, State.STOPPED) or self._tg is None):
            return
        log.warning("service_unresponsive", name=name, pid=svc.pid, reason=why)
        self._tg.start_soon(self._terminate, svc, f"its bus connection was lost ({why})")

    def mark_ready(self, name: str) -> None:
        svc = self.services.get(name)
        if svc is not None and svc.state == State.STARTING:
            self._set_state(svc, State.READY)
            svc.ready.set()

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reap children and keep every service running until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self._reaper)
            for name in dependency_order(self.config):
                if name in self.services:
                    tg.start_soon(self._keep, self.services[name], tg)
            task_status.started()

    async def wait_all_ready(self) -> None:
        for svc in self.services.values():
            await svc.ready.wait()

    async def _reaper(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(signal.SIGCHLD) as signals:
            task_status.started()
            self.reap()
            async for _ in signals:
                self.reap()

    def reap(self) -> None:
        """Collect every exited child; dispatch managed ones, count orphans."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            svc = self._by_pid.pop(pid, None)
            if svc is None:
                self.orphans_reaped += 1
                continue
            if svc.popen is not None:
                svc.popen.returncode = os.waitstatus_to_exitcode(status)
            svc.exit_status = status
            svc.exited.set()

    async def _keep(self, svc: ManagedService, tg: anyio.abc.TaskGroup) -> None:
        """Start ``svc`` once its requirements are ready; restart it when it exits."""
        backoff = 0.5
        while not self.shutting_down:
            for dep in svc.spec.requires:
                if dep in self.services:
                    await self.services[dep].ready.wait()
            try:
                await self._spawn(svc, tg)
            except SpawnError as exc:
                log.error("spawn_failed", name=svc.name, error=str(exc))
                self._set_state(svc, State.FAILED, str(exc))
                return
            with anyio.move_on_after(svc.spec.start_timeout):
                async with anyio.create_task_group() as race:
                    async def first(event: anyio.Event) -> None:
                        await event.wait()
                        race.cancel_scope.cancel()
                    race.start_soon(first, svc.ready)
                    race.start_soon(first, svc.exited)
            if not svc.ready.is_set() and not svc.exited.is_set():
                log.error("start_timeout", name=svc.name, timeout=svc.spec.start_timeout)
                await self._terminate(svc, "did not say READY within its start timeout")
            await svc.exited.wait()
            ran_for = time.monotonic() - svc.started_at
            if self.shutting_down or svc.state == State.STOPPING:
                return
            if svc.exit_status is not None and os.WIFEXITED(svc.exit_status) \
                    and os.WEXITSTATUS(svc.exit_status) == EXIT_PERMANENT_FAILURE:
                self._set_state(svc, State.FAILED,
                                f"{svc.last_exit}: permanent failure (exit {EXIT_PERMANENT_FAILURE}), not restarted")
                return
            self._set_state(svc, State.BACKOFF, svc.last_exit)
            if ran_for > 10.0:
                backoff = 0.5
            svc.restarts += 1
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def _environment(self, svc: ManagedService) -> dict[str, str]:
        env = {k: os.environ[k] for k in svc.spec.pass_environment if k in os.environ}
        env.setdefault("PATH", os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"))
        env.update(svc.spec.environment)
        env.update(
            EDGEBUS_SERVICE=svc.name,
            EDGEBUS_BUS=self.endpoint,
            EDGEBUS_RUN_DIR=self.run_dir,
            EDGEBUS_STATE_DIR=self.state_dir,
            EDGEBUS_LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
        )
        for key in ("EDGEBUS_LOG_LEVEL",):
            if key in os.environ and key not in env:
                env[key] = os.environ[key]
        return env

    async def _spawn(self, svc: ManagedService, tg: anyio.abc.TaskGroup) -> None:
        argv = [sys.executable if a == "{python}" else a for a in svc.spec.command]
        credential = self._issue_credential(svc.name, svc.spec.capabilities)
        cred_r, cred_w = os.pipe()
        try:
            os.write(cred_w, credential.encode())
        finally:
            os.close(cred_w)
        env = self._environment(svc)
        env["EDGEBUS_CREDENTIAL_FD"] = str(cred_r)
        cwd = svc.spec.working_directory or self.state_dir
        svc.ready = anyio.Event()
        svc.exited = anyio.Event()
        svc.exit_status = None
        try:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, cwd=cwd, pass_fds=(cred_r,), close_fds=True, process_group=0,
            )
        except OSError as exc:
            raise SpawnError(svc.name, argv, exc.strerror or str(exc)) from exc
        finally:
            os.close(cred_r)
        svc.popen = popen
        svc.pid = popen.pid
        svc.started_at = time.monotonic()
        self._by_pid[popen.pid] = svc
        self._set_state(svc, State.STARTING)
        tg.start_soon(self._pump, svc, popen.stdout, "stdout")
        tg.start_soon(self._pump, svc, popen.stderr, "stderr")
        tg.start_soon(self._watch_exit, svc, svc.exited)

    async def _watch_exit(self, svc: ManagedService, exited: anyio.Event) -> None:
        await exited.wait()
        status = svc.exit_status or 0
        svc.last_exit = describe_status(status)
        pid, svc.pid = svc.pid, 0
        # The service's group may still hold children: none of them survives it.
        _killpg(pid, signal.SIGKILL)
        stopping = self.shutting_down or svc.state == State.STOPPING
        level = "info" if stopping else "warning"
        getattr(log, level)("service_exited", name=svc.name, pid=pid, status=svc.last_exit)
        self._on_exit(svc.name, svc.last_exit)
        if stopping:
            self._set_state(svc, State.STOPPED, svc.last_exit)

    async def _pump(self, svc: ManagedService, stream: object, name: str) -> None:
        """Re-emit a child's output as structured lines bound to the child's name."""
        fd = stream.fileno()  # type: ignore[attr-defined]
        os.set_blocking(fd, False)
        buf = b""
        try:
            while True:
                await anyio.wait_readable(fd)
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    _emit(svc.name, name, line)
                if len(buf) > 65536:
                    _emit(svc.name, name, buf)
                    buf = b""
            if buf:
                _emit(svc.name, name, buf)
        finally:
            stream.close()  # type: ignore[attr-defined]

    # -- stopping ---------------------------------------------------------------------------

    async def _terminate(self, svc: ManagedService, reason: str) -> None:
        """Stop signal to the process group, grace period, then SIGKILL of the group."""
        if not svc.pid or svc.exited.is_set():
            return
        pid = svc.pid
        sig = signal.Signals[svc.spec.stop_signal]
        log.info("service_stop", name=svc.name, pid=pid, signal=sig.name, reason=reason)
        _killpg(pid, sig)
        with anyio.move_on_after(svc.spec.stop_timeout):
            await svc.exited.wait()
        if not svc.exited.is_set():
            log.warning("service_kill", name=svc.name, pid=pid,
                        reason=f"still running {svc.spec.stop_timeout:g}s after {sig.name}")
            _killpg(pid, signal.SIGKILL)
            await svc.exited.wait()

    async def stop(self, name: str, reason: str = "requested") -> None:
        svc = self.services[name]
        if svc.pid and not svc.exited.is_set():
            self._set_state(svc, State.STOPPING, reason)
            await self._terminate(svc, reason)
            await anyio.lowlevel.checkpoint()
        self._set_state(svc, State.STOPPED, svc.last_exit)

    async def stop_all(self) -> None:
        """Stop every service, dependents before what they depend on."""
        self.shutting_down = True
        for name in reversed(dependency_order(self.config)):
            if name in self.services:
                await self.stop(name, "shutdown")


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:  # pragma: no cover - would be a kernel bug
        log.error("kill_failed", pgid=pgid, signal=sig, errno=errno.errorcode.get(exc.errno))


def _emit(service: str, stream: str, line: bytes) -> None:
    text = line.decode(errors="replace").rstrip("\r")
    if not text:
        return
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if isinstance(record, dict) and "event" in record:
        record["service"] = service
        record.pop("timestamp", None)
        level = str(record.pop("level", "info"))
        event = str(record.pop("event"))
        method = getattr(_child_log, level, _child_log.info)
        method(event, **record)
    else:
        _child_log.info("output", service=service, stream=stream, line=text)
