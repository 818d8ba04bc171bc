"""Spawning, watching, restarting and stopping service processes.

Every service is a fresh interpreter (or any command) in its own process group, with a
clean environment, stdin from /dev/null, stdout/stderr captured and re-emitted as
structured log lines, and one inherited descriptor: a pipe holding its bus credential.
The kernel reaps every child itself (``waitpid(-1)`` on SIGCHLD), so orphans re-parented
to it (as PID 1 or as a child subreaper) are reaped too, and so are the kernel's own helper
processes (``run_helper``).

Each service has a *keeper* task that starts it once what it requires is ready, waits for
its READY (never a timer), and acts on its restart policy when it exits: OTP restart types,
back-off, restart intensity and the one_for_one / rest_for_one strategies, decided by the
pure functions of _restart.py.

The supervisor runs on the event loop and tells the router (another thread) what it must
know by messages only (``tell_router``): each service's status whenever it changes, exits,
audit records.
"""

from __future__ import annotations

import enum
import errno
import grp
import json
import marshal
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import anyio
import anyio.abc

from protocols import ServiceStatus
from protocols.runtime import EXIT_CONFIG, get_logger

from ._boundary import Audit, Command, ServiceExited, ServiceRemoved, ServiceUpdate
from ._cgroup import Cgroups
from ._config import ServiceConfig, SystemConfig, dependency_order
from ._exceptions import SpawnError
from ._restart import Ended, History, Intent, also_restart, decide

__all__ = ["Supervisor", "State", "ManagedService", "describe_status"]

log = get_logger(component="supervisor")
_child_log = get_logger()

EXEC_WRAPPER = str(Path(__file__).with_name("_exec.py"))


class State(str, enum.Enum):
    CONFIGURED = "configured"
    #: Not started yet: a service it requires is not ready.
    WAITING = "waiting"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    #: Exited; restarts after its back-off delay.
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
        #: Unix time at which it entered its state.
        self.since = time.time()
        self.pid = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.last_exit = ""
        self.ready = anyio.Event()
        self.exited = anyio.Event()
        self.exited.set()  # nothing running yet
        self.changed = anyio.Event()
        self.exit_status: int | None = None
        #: Restarts within the window and the current back-off (see _restart).
        self.history = History()
        self.keeper: anyio.CancelScope | None = None
        #: Set when the current keeper task has finished (none running: set).
        self.keeper_done = anyio.Event()
        self.keeper_done.set()
        #: Processes started so far: lets start() wait for *its* start's outcome.
        self.spawns = 0
        #: The operator (or shutdown, or a reload) stopped it: its exit means "stopped".
        self.stop_requested = False
        #: Set before the supervisor itself stops the process to restart it (rest_for_one,
        #: an operator's restart): that exit is neither a crash nor counted.
        self.restart_requested = False
        #: Why the supervisor itself killed the current process (start timeout, hung).
        self.kill_reason = ""
        #: The credential of the current incarnation (each spawn gets a new one).
        self.credential = ""

    @property
    def running(self) -> bool:
        return not self.exited.is_set()

    def status(self) -> ServiceStatus:
        return ServiceStatus(
            name=self.name, state=self.state.value, pid=self.pid, managed=True,
            requires=list(self.spec.requires), restarts=self.restarts,
            uptime=round(time.monotonic() - self.started_at, 3) if self.pid and self.started_at else 0.0,
            last_exit=self.last_exit, since=round(self.since, 3), command=command_line(self.spec),
        )

    def update(self, previous: State | None = None, detail: str = "") -> ServiceUpdate:
        """Its status for the router (``previous``: the state it changed from)."""
        return ServiceUpdate(self.status(), started_at=self.started_at,
                             previous=previous.value if previous is not None else "", detail=detail)


class Supervisor:
    """Starts the configured services in dependency order and keeps them running."""

    def __init__(
        self,
        config: SystemConfig,
        *,
        endpoint: str,
        run_dir: str,
        state_dir: str,
        config_dir: str = "",
        issue_credential: Callable[[str, ServiceConfig], str],
        tell_router: Callable[[Command], None] = lambda command: None,
        on_spawn: Callable[[str, list[str], ServiceConfig], None] = lambda name, argv, spec: None,
        cgroups: Cgroups | None = None,
    ) -> None:
        """``tell_router`` takes what the router must know (service statuses, exits, audit
        records): the router's ``submit``.  ``issue_credential`` registers a fresh credential
        for a spawn; ``on_spawn`` measures what is about to run."""
        self._on_spawn = on_spawn
        self._tell_router = tell_router
        self.config = config
        self.endpoint = endpoint
        self.run_dir = run_dir
        self.state_dir = state_dir
        self.config_dir = config_dir or os.getcwd()
        self._issue_credential = issue_credential
        self.cgroups = cgroups
        self.services: dict[str, ManagedService] = {
            name: ManagedService(name, spec) for name, spec in config.services.items() if spec.managed and spec.enabled
        }
        for svc in self.services.values():
            tell_router(svc.update())
        self._by_pid: dict[int, ManagedService] = {}
        #: The kernel's own short-lived helper processes (run_helper), by pid.
        self._helpers: dict[int, _Helper] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self.shutting_down = False
        #: Set when a critical service exceeded its restart intensity: the kernel gives up.
        self.fatal = anyio.Event()
        self.fatal_reason = ""

    # -- state ------------------------------------------------------------------------------

    def _audit(self, kind: str, svc: ManagedService, detail: str) -> None:
        self._tell_router(Audit(kind, svc.name, detail))

    def _fail(self, svc: ManagedService, detail: str) -> None:
        self._set_state(svc, State.FAILED, detail)
        self._audit("service-failed", svc, detail)

    def _set_state(self, svc: ManagedService, state: State, detail: str = "", *, pid: int | None = None,
                   quiet: bool = False) -> None:
        """Move ``svc`` to ``state``; its pid becomes ``pid`` (a new process), stays (the
        process runs) or becomes 0 (it has exited), in the same step, and the router is
        told: it never sees an exited process's pid gone while its state still says ready,
        or a new process's pid beside the old one's state.  ``quiet``: logged at debug
        level (a stop logs one line of its own when it is over)."""
        previous = svc.state
        svc.pid = pid if pid is not None else svc.pid if svc.running else 0
        svc.state = state
        if previous == state:
            self._tell_router(svc.update())  # (counters may have changed)
            return
        svc.since = time.time()
        changed, svc.changed = svc.changed, anyio.Event()
        changed.set()
        (log.debug if quiet else log.info)("service_state", service=svc.name, state=state.value,
                                           previous=previous.value, pid=svc.pid or None, detail=detail or None)
        self._tell_router(svc.update(previous, detail))

    def status(self, name: str) -> ServiceStatus | None:
        svc = self.services.get(name)
        return svc.status() if svc else None

    async def wait_state(self, name: str, *states: State) -> ServiceStatus:
        svc = self.services[name]
        while svc.state not in states:
            await svc.changed.wait()
        return svc.status()

    def mark_ready(self, name: str) -> None:
        svc = self.services.get(name)
        if svc is not None and svc.state == State.STARTING and svc.running:
            self._set_state(svc, State.READY)
            svc.ready.set()

    def peer_gone(self, name: str, why: str, credential: str, silent: bool) -> None:
        """The router lost a managed service's connection.  If it went silent (missed
        heartbeats) while its process still runs, the service is hung: it is killed, then
        restarted.  A Bye or a new session is the service's own business.

        ``credential`` tells which process it was: a connection of an earlier, already
        exited incarnation must not stop the one that replaced it."""
        svc = self.services.get(name)
        if (not silent or svc is None or not svc.running or self.shutting_down or svc.restart_requested
                or svc.credential != credential
                or svc.state in (State.STOPPING, State.STOPPED) or self._tg is None):
            return
        log.warning("service_unresponsive", service=name, pid=svc.pid, reason=why)
        svc.kill_reason = f"hung: {why}"
        self._tg.start_soon(self._terminate, svc, svc.kill_reason)

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reap children and keep every service running until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self._reaper)
            for name in dependency_order(self.config):
                if name in self.services:
                    self._start_keeper(self.services[name])
            task_status.started()

    def _start_keeper(self, svc: ManagedService) -> None:
        assert self._tg is not None
        if svc.keeper is None:
            svc.stop_requested = False
            svc.history = History(svc.history.times)  # a new keeper backs off afresh
            svc.keeper = anyio.CancelScope()
            svc.keeper_done = anyio.Event()
            self._tg.start_soon(self._keep, svc, svc.keeper)

    async def wait_all_ready(self) -> None:
        for svc in list(self.services.values()):
            await svc.ready.wait()

    async def _reaper(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(signal.SIGCHLD) as signals:
            task_status.started()
            self.reap()
            async for _ in signals:
                self.reap()

    def reap(self) -> None:
        """Collect every exited child (orphans included); dispatch the managed ones."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            svc = self._by_pid.pop(pid, None)
            if svc is None:
                helper = self._helpers.pop(pid, None)
                if helper is not None:
                    helper.status = status
                    helper.exited.set()
                continue  # (or an orphan re-parented to us: reaped, nothing more to do)
            if svc.popen is not None:
                svc.popen.returncode = os.waitstatus_to_exitcode(status)
            svc.exit_status = status
            svc.exited.set()

    async def run_helper(self, argv: list[str], timeout: float) -> tuple[int, str]:
        """Run a helper process of the kernel's own to its end: (exit code, its stderr).
        The reaper collects every child, so the kernel's helpers go through it too (a
        process started by other means would be reaped from under its waiter).  Raises
        TimeoutError after ``timeout`` seconds, the helper killed."""
        env = dict(os.environ)
        popen = subprocess.Popen(_wrapped({"argv": argv}, env), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, close_fds=True, env=env)
        helper = self._helpers[popen.pid] = _Helper()  # before the reaper can run: no race
        assert popen.stderr is not None
        err = b""
        try:
            with anyio.fail_after(timeout):
                async for chunk in _chunks(popen.stderr.fileno()):
                    err = (err + chunk)[-65536:]
                await helper.exited.wait()
        finally:
            popen.stderr.close()
            if not helper.exited.is_set():
                popen.kill()  # reaped by the reaper
        popen.returncode = os.waitstatus_to_exitcode(helper.status)
        return popen.returncode, err.decode(errors="replace")

    async def _keep(self, svc: ManagedService, scope: anyio.CancelScope) -> None:
        """Start ``svc`` once its requirements are ready; restart it per its policy."""
        spec = svc.spec
        try:
            with scope:
                attempt = 0
                while not self.shutting_down:
                    waiting = [d for d in spec.requires if d in self.services and not self.services[d].ready.is_set()]
                    if waiting:
                        self._set_state(svc, State.WAITING, f"waiting for {', '.join(waiting)} to be ready")
                    for dep in spec.requires:
                        if dep in self.services:
                            await self.services[dep].ready.wait()
                    try:
                        await self._spawn(svc)
                    except SpawnError as exc:
                        log.error("spawn_failed", service=svc.name, error=str(exc))
                        self._fail(svc, str(exc))
                        return
                    except Exception as exc:  # cgroup, measurement...: this service fails, not the kernel
                        log.exception("spawn_failed", service=svc.name)
                        self._fail(svc, f"cannot start: {type(exc).__name__}: {exc}")
                        return
                    if attempt:
                        self._audit("service-restarted", svc, f"pid {svc.pid}, restart {svc.restarts}")
                    attempt += 1
                    timed_out = False
                    with anyio.move_on_after(spec.start_timeout):
                        async with anyio.create_task_group() as race:
                            async def first(event: anyio.Event) -> None:
                                await event.wait()
                                race.cancel_scope.cancel()
                            race.start_soon(first, svc.ready)
                            race.start_soon(first, svc.exited)
                    if not svc.ready.is_set() and svc.running:
                        timed_out = True
                        log.error("start_timeout", service=svc.name, timeout=spec.start_timeout)
                        svc.kill_reason = f"did not say READY within {spec.start_timeout:g}s"
                        await self._terminate(svc, svc.kill_reason)
                    await svc.exited.wait()
                    if self.shutting_down:
                        return
                    if svc.restart_requested:
                        svc.restart_requested = False
                        svc.restarts += 1
                        continue
                    status = svc.exit_status or 0
                    ended = Ended(code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                                  ran_for=time.monotonic() - svc.started_at, timed_out=timed_out,
                                  description=svc.last_exit)
                    if svc.kill_reason:
                        self._audit("service-killed", svc, f"{svc.kill_reason}; {svc.last_exit}")
                    elif ended.code != 0:
                        self._audit("service-crashed", svc, svc.last_exit)
                    decision = decide(spec, ended, svc.history, time.monotonic())
                    svc.history = decision.history
                    match decision.intent:
                        case Intent.STOP:
                            self._set_state(svc, State.STOPPED, decision.reason)
                            return
                        case Intent.FAIL:
                            self._fail(svc, decision.reason)
                            return
                        case Intent.GIVE_UP:
                            self._fail(svc, decision.reason)
                            self.give_up(f"critical service {svc.name!r} failed: {decision.reason}")
                            return
                        case Intent.RESTART | Intent.BACKOFF:
                            svc.restarts += 1
                            self._set_state(svc, State.BACKOFF, decision.reason)
                            self._restart_with(svc)
                            await anyio.sleep(decision.delay)
        finally:
            if svc.keeper is scope:
                svc.keeper = None
                svc.keeper_done.set()

    def give_up(self, reason: str) -> None:
        if not self.fatal.is_set():
            log.error("supervisor_gives_up", reason=reason)
            self.fatal_reason = reason
            self.fatal.set()

    def _also_restart(self, name: str) -> list[str]:
        """The managed services that restart with ``name`` under the strategy, in start order."""
        requires = {n: s.spec.requires for n, s in self.services.items()}
        return also_restart(self.config.supervisor.strategy, name, requires, dependency_order(self.config))

    def _restart_with(self, svc: ManagedService) -> None:
        """rest_for_one: everything that requires ``svc`` stops now and starts again once
        ``svc`` is ready again (its keeper waits for that)."""
        assert self._tg is not None
        for name in reversed(self._also_restart(svc.name)):
            dep = self.services[name]
            if dep.running:
                dep.restart_requested = True
                self._tg.start_soon(self._terminate, dep, f"{svc.name!r}, which it requires, restarted")

    # -- spawning ---------------------------------------------------------------------------

    def _environment(self, svc: ManagedService) -> dict[str, str]:
        env = {k: os.environ[k] for k in svc.spec.pass_environment if k in os.environ}
        env.setdefault("PATH", os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"))
        env.update(svc.spec.environment)
        env.update(
            EDGEBUS_SERVICE=svc.name,
            EDGEBUS_BUS=self.endpoint,
            EDGEBUS_RUN_DIR=self.run_dir,
            EDGEBUS_STATE_DIR=self.state_dir,
            EDGEBUS_CONFIG_DIR=self.config_dir,
            EDGEBUS_LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
        )
        if "EDGEBUS_LOG_LEVEL" in os.environ and "EDGEBUS_LOG_LEVEL" not in env:
            env["EDGEBUS_LOG_LEVEL"] = os.environ["EDGEBUS_LOG_LEVEL"]
        return env

    def _isolation(self, svc: ManagedService, argv: list[str]) -> dict[str, Any]:
        """The exec wrapper's spec: limits, cgroup, user (_exec.py)."""
        spec, limits = svc.spec, svc.spec.limits
        exec_spec: dict[str, Any] = {"argv": argv, "rlimits": {}}
        rlimits = exec_spec["rlimits"]
        memory = limits.memory_bytes()
        if self.cgroups is not None and (memory is not None or limits.cpu_quota is not None):
            exec_spec["cgroup"] = str(self.cgroups.create(svc.name, limits))
        elif memory is not None:
            rlimits["RLIMIT_AS"] = memory
        for field, name in (("open_files", "RLIMIT_NOFILE"), ("cpu_seconds", "RLIMIT_CPU"), ("core_size", "RLIMIT_CORE")):
            if getattr(limits, field) is not None:
                rlimits[name] = getattr(limits, field)
        if limits.nice is not None:
            exec_spec["nice"] = limits.nice
        if limits.cpu_affinity:
            exec_spec["cpus"] = limits.cpu_affinity
        if spec.user or spec.group:
            if os.geteuid() != 0:
                log.warning("user_switch_skipped", service=svc.name, user=spec.user, group=spec.group,
                            reason="the kernel is not root; the service runs as the kernel's user")
            else:
                try:
                    if spec.user:
                        pw = pwd.getpwnam(spec.user)
                        exec_spec["uid"], exec_spec["gid"] = pw.pw_uid, pw.pw_gid
                    if spec.group:
                        exec_spec["gid"] = grp.getgrnam(spec.group).gr_gid
                except KeyError as exc:
                    raise SpawnError(svc.name, argv, f"unknown user or group {exc.args[0]!r}") from None
        return exec_spec

    async def _spawn(self, svc: ManagedService) -> None:
        assert self._tg is not None
        argv = command_line(svc.spec)
        self._on_spawn(svc.name, argv, svc.spec)
        env = self._environment(svc)
        cwd = svc.spec.working_directory or self.state_dir
        _check_executable(svc.name, argv, env["PATH"], cwd)
        command = _wrapped(self._isolation(svc, argv), env)
        credential = svc.credential = self._issue_credential(svc.name, svc.spec)
        cred_r, cred_w = os.pipe()
        try:
            os.write(cred_w, credential.encode())
        finally:
            os.close(cred_w)
        env["EDGEBUS_CREDENTIAL_FD"] = str(cred_r)
        if svc.ready.is_set():  # (normally already renewed at the last exit; dependents
            svc.ready = anyio.Event()  # may be waiting on the unset one: keep it)
        svc.exited = anyio.Event()
        svc.exit_status = None
        try:
            popen = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, cwd=cwd, pass_fds=(cred_r,), close_fds=True, process_group=0,
            )
        except OSError as exc:
            svc.exited.set()
            raise SpawnError(svc.name, argv, exc.strerror or str(exc)) from exc
        finally:
            os.close(cred_r)
        svc.popen = popen
        svc.spawns += 1
        svc.kill_reason = ""
        svc.started_at = time.monotonic()
        self._by_pid[popen.pid] = svc
        self._set_state(svc, State.STARTING, pid=popen.pid)
        self._tg.start_soon(self._pump, svc, popen.stdout, "stdout")
        self._tg.start_soon(self._pump, svc, popen.stderr, "stderr")
        self._tg.start_soon(self._watch_exit, svc, svc.exited)

    async def _watch_exit(self, svc: ManagedService, exited: anyio.Event) -> None:
        await exited.wait()
        status = svc.exit_status or 0
        svc.last_exit = describe_status(status)
        pid = svc.pid  # cleared with the state the keeper (or the stop below) moves it to
        # The service's group may still hold children: none of them survives it.
        _killpg(pid, signal.SIGKILL)
        if self.cgroups is not None:
            self.cgroups.remove(svc.name)
        # Dependents that restart must wait for the *next* READY.
        if svc.ready.is_set():
            svc.ready = anyio.Event()
        stopped = self.shutting_down or svc.stop_requested
        expected = svc.state == State.STOPPING or svc.restart_requested
        # (a stop logs its own line when it is over: see stop())
        (log.debug if stopped else log.info if expected else log.warning)(
            "service_exited", service=svc.name, pid=pid, status=svc.last_exit)
        self._tell_router(ServiceExited(svc.name, svc.last_exit))
        if stopped:
            self._set_state(svc, State.STOPPED, svc.last_exit, quiet=True)
        # otherwise the keeper decides: restart (backoff), stopped (transient) or failed

    async def _pump(self, svc: ManagedService, stream: Any, name: str) -> None:
        """Re-emit a child's output as structured lines bound to the child's name."""
        buf = b""
        try:
            async for chunk in _chunks(stream.fileno()):
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
            stream.close()

    # -- stopping ---------------------------------------------------------------------------

    async def _terminate(self, svc: ManagedService, reason: str, *, quiet: bool = False) -> str:
        """Stop signal to the process group, grace period, then SIGKILL of the group.
        Returns why SIGKILL was needed ("" if it was not).  ``quiet``: part of a stop,
        which logs one line of its own when it is over."""
        if not svc.running:
            return ""
        pid = svc.pid
        sig = signal.Signals[svc.spec.stop_signal]
        if not svc.restart_requested:
            self._set_state(svc, State.STOPPING, reason, quiet=quiet)
        (log.debug if quiet else log.info)("service_stop", service=svc.name, pid=pid, signal=sig.name, reason=reason)
        _killpg(pid, sig)
        with anyio.move_on_after(svc.spec.stop_timeout):
            await svc.exited.wait()
        if not svc.running:
            return ""
        killed = f"still running {svc.spec.stop_timeout:g}s after {sig.name}: SIGKILL"
        if not quiet:
            log.warning("service_kill", service=svc.name, pid=pid, reason=killed)
        _killpg(pid, signal.SIGKILL)
        await svc.exited.wait()
        return killed

    async def stop(self, name: str, reason: str = "requested") -> ServiceStatus:
        """Stop a service and keep it stopped (until ``start``): its keeper is gone and
        its process group is dead when this returns."""
        svc = self.services[name]
        svc.stop_requested = True
        if svc.keeper is not None:
            svc.keeper.cancel()
        previous, pid, began, killed = svc.state, svc.pid, time.monotonic(), ""
        was_running = svc.running
        with anyio.CancelScope(shield=True):
            if svc.running:
                self._set_state(svc, State.STOPPING, reason, quiet=True)
                killed = await self._terminate(svc, reason, quiet=True)
            await svc.keeper_done.wait()
        self._set_state(svc, State.STOPPED, svc.last_exit or reason, quiet=True)
        if previous != State.STOPPED:
            # The whole stop in one line: the state, the signal and the process's end.
            fields: dict[str, Any] = {"service": name, "reason": reason, "previous": previous.value}
            if was_running:
                fields.update(pid=pid, signal=svc.spec.stop_signal, status=svc.last_exit,
                              took=round(time.monotonic() - began, 3))
            if killed:
                log.warning("service_stopped", **fields, killed=killed)
            else:
                log.info("service_stopped", **fields)
        return svc.status()

    async def start(self, name: str) -> ServiceStatus:
        """Start a stopped or failed service, and the stopped services it requires; return
        the outcome of this start: ready, or the state its keeper ended in (failed, or
        stopped for a service that exited)."""
        svc = self.services[name]
        spawns = svc.spawns
        for dep in svc.spec.requires:  # like systemd's Requires=: pull in what it needs
            if dep in self.services and self.services[dep].keeper is None:
                self.services[dep].history = History()
                self._start_keeper(self.services[dep])
        if svc.keeper is None:
            svc.history = History()
            self._start_keeper(svc)
        elif svc.state == State.READY:
            return svc.status()
        while not ((svc.spawns > spawns and svc.state == State.READY) or svc.keeper_done.is_set()):
            await svc.changed.wait()
        return svc.status()

    async def restart(self, name: str) -> ServiceStatus:
        """Stop and start; under rest_for_one the services requiring it restart too."""
        cascade = self._also_restart(name)
        for dep in reversed(cascade):
            await self.stop(dep, f"{name!r}, which it requires, restarts")
        await self.stop(name, "restart requested")
        self.services[name].restarts += 1
        status = await self.start(name)
        for dep in cascade:
            self.services[dep].restarts += 1
            self._start_keeper(self.services[dep])  # each waits for `name` to be ready
        return status

    async def stop_all(self) -> None:
        """Stop every service, dependents before what they depend on."""
        self.shutting_down = True
        for name in reversed(dependency_order(self.config)):
            if name in self.services:
                await self.stop(name, "shutdown")

    # -- reload -----------------------------------------------------------------------------

    async def apply(self, new: SystemConfig) -> dict[str, list[str]]:
        """Move to ``new``: stop removed services, restart changed ones, start new ones,
        leave the rest untouched.  ``new`` has already been validated."""
        old_specs = {n: s.spec for n, s in self.services.items()}
        new_specs = {n: s for n, s in new.services.items() if s.managed and s.enabled}
        removed = [n for n in old_specs if n not in new_specs]
        added = [n for n in new_specs if n not in old_specs]
        changed = [n for n in new_specs if n in old_specs and new_specs[n] != old_specs[n]]
        unchanged = [n for n in new_specs if n in old_specs and n not in changed]
        order = dependency_order(self.config)
        for name in reversed(order):
            if name in removed or name in changed:
                await self.stop(name, "configuration reloaded")
        for name in removed:
            del self.services[name]
            self._tell_router(ServiceRemoved(name))
        self.config = new
        for name in changed:  # the same object: dependents may be waiting on its events
            self.services[name].spec = new_specs[name]
            self.services[name].history = History()
        for name in added:
            self.services[name] = ManagedService(name, new_specs[name])
            self._tell_router(self.services[name].update())
        for name in dependency_order(new):
            if name in added or name in changed:
                self._start_keeper(self.services[name])
        log.info("config_applied", added=added, removed=removed, restarted=changed, unchanged=len(unchanged))
        return {"started": added, "stopped": removed, "restarted": changed, "unchanged": unchanged}


def command_line(spec: ServiceConfig) -> list[str]:
    """The argv a service runs with (``{python}``: the kernel's interpreter)."""
    return [sys.executable if a == "{python}" else a for a in spec.command]


def _wrapped(spec: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The command that starts ``spec["argv"]`` through the exec wrapper (_exec.py), which
    applies the isolation ``spec`` names and PR_SET_PDEATHSIG: the process dies with the
    kernel.  Adds the spec to ``env``.  (Call from the event loop's thread: the death
    signal follows the thread that forks.)"""
    # The wrapper's Python may coerce the C locale by adding LC_CTYPE (PEP 538): the
    # process's environment must stay exactly what was given.
    spec["unset"] = [k for k in ("LC_CTYPE",) if k not in env]
    spec["fail_status"] = EXIT_CONFIG  # restarting cannot fix isolation settings
    spec["parent"] = os.getpid()
    env["EDGEBUS_EXEC_SPEC"] = marshal.dumps(spec).hex()
    return [sys.executable, "-I", "-S", EXEC_WRAPPER]


def _check_executable(name: str, argv: list[str], path: str, cwd: str) -> None:
    """Refuse a command that cannot run, as exec would (the wrapper execs it later, where
    the failure would only show as an exit status)."""
    program = os.path.join(cwd, argv[0]) if os.sep in argv[0] else shutil.which(argv[0], path=path)
    if program is None or not os.path.exists(program):
        raise SpawnError(name, argv, os.strerror(errno.ENOENT))
    if os.path.isdir(program) or not os.access(program, os.X_OK):
        raise SpawnError(name, argv, os.strerror(errno.EACCES))


class _Helper:
    __slots__ = ("exited", "status")

    def __init__(self) -> None:
        self.exited = anyio.Event()
        self.status = 0


async def _chunks(fd: int) -> AsyncIterator[bytes]:
    """What a pipe gives until its end, read without blocking the event loop."""
    os.set_blocking(fd, False)
    while True:
        await anyio.wait_readable(fd)
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            return
        yield chunk


def _killpg(pgid: int, sig: int) -> None:
    if pgid <= 1:
        return
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:  # pragma: no cover - would be a kernel bug
        log.error("kill_failed", pgid=pgid, signal=sig, errno=errno.errorcode.get(exc.errno or 0))


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
