"""``edgebus boot``: the kernel process.  Router and supervisor in one anyio task group."""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import signal
import sys
from pathlib import Path

import anyio

from protocols.runtime import (
    EXIT_GAVE_UP,
    EXIT_OK,
    add_log_sink,
    endpoint_for_run_dir,
    get_logger,
    remove_log_sink,
)

import msgspec
import zmq
from zmq.auth.thread import ThreadAuthenticator

from protocols import (
    Error,
    ErrorCode,
    GetLogs,
    LogRecord,
    Reload,
    Reloaded,
    RestartService,
    StartService,
    StopService,
)

from ._caps import CapabilitySet
from ._cgroup import Cgroups
from ._attest import MeasurementLog
from ._boundary import (
    AddPrincipal,
    Audit,
    EnrollKey,
    FinishOperation,
    OperationRequested,
    PeerGone,
    PeerReady,
    PublishEvent,
    RemovePrincipal,
    SetKnownServices,
)
from ._config import ServiceConfig, SystemConfig, config_dir, load_config
from ._core import Summary
from ._exceptions import ConfigError, KernelError
from ._logs import LogBook
from ._handshakes import monitor_handshakes, watch_handshakes
from ._router import ZAP_DOMAIN, Principal, Router
from ._supervisor import Supervisor

__all__ = ["Kernel", "default_dirs"]

log = get_logger(component="kernel")

PR_SET_CHILD_SUBREAPER = 36


def default_dirs(run_dir: str | None, state_dir: str | None) -> tuple[Path, Path]:
    """Container conventions for root, per-user directories otherwise; ``--run-dir`` alone
    puts the state under ``DIR/state`` so one directory holds a whole throwaway system."""
    if run_dir is None:
        if os.geteuid() == 0:
            run = Path("/run/edgebus")
        else:
            base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/edgebus-{os.getuid()}"
            run = Path(base) / "edgebus"
        if state_dir is None:
            state = (Path("/var/lib/edgebus") if os.geteuid() == 0 else
                     Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state") / "edgebus")
        else:
            state = Path(state_dir)
    else:
        run = Path(run_dir)
        state = Path(state_dir) if state_dir else run / "state"
    return run.resolve(), state.resolve()


def _become_subreaper() -> bool:
    """When not PID 1, orphans of our services are re-parented to us, so we reap them."""
    if os.getpid() == 1:
        return True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Kernel:
    def __init__(self, config: SystemConfig, run_dir: Path, state_dir: Path, source: str = "",
                 config_path: str | None = None) -> None:
        self.config = config
        self.source = source
        #: Re-read on SIGHUP / busctl reload (None: the built-in default).
        self.config_path = config_path
        self._tg: anyio.abc.TaskGroup | None = None
        self.run_dir = run_dir
        self.state_dir = state_dir
        self.endpoint = endpoint_for_run_dir(run_dir)
        self._lock_fd: int | None = None
        self.cgroups, why = Cgroups.detect()
        self._cgroup_note = why
        self.measurements = MeasurementLog()
        #: Each service's recent log records (busctl logs), fed by every line logged here.
        self.logs = LogBook(config.logs.lines_per_service, known=config.services)
        self._auth: ThreadAuthenticator | None = None
        #: The router socket's failed CURVE handshakes (see _handshakes), with a tcp endpoint.
        self._handshakes: zmq.Socket | None = None
        #: The operator and external services, by name; managed ones get a fresh credential
        #: at each spawn instead.
        self.principals = self._static_principals(config, {})
        # The router runs in its own thread and the supervisor on the event loop.  They
        # exchange messages only (see _boundary): the supervisor's go through
        # router.submit, the router's come back through router.notices (_serve_notices).
        self.router = Router(
            self.endpoint, config.bus, list(self.principals.values()),
            known_services=[n for n, s in config.services.items() if s.enabled], supervised=True,
            measurements=self.measurements.snapshot, enrolled=self._config_enrolment(config),
        )
        self._config_enrolled = self._config_enrolment(config)
        self.supervisor = Supervisor(
            config, endpoint=self.endpoint, run_dir=str(run_dir), state_dir=str(state_dir),
            config_dir=str(config_dir(config_path)), issue_credential=self._issue_credential,
            tell_router=self.router.submit, on_spawn=self._measure, cgroups=self.cgroups,
        )

    @staticmethod
    def _config_enrolment(config: SystemConfig) -> dict[str, str]:
        return {s.curve_public_key: n for n, s in config.services.items()
                if s.curve_public_key and s.enabled and not s.managed}

    def _measure(self, name: str, argv: list[str], spec: ServiceConfig) -> None:
        entry = self.measurements.measure(name, argv, spec)
        if entry is not None:
            log.info("measured", service=name, digest=entry.digest, pcr=self.measurements.pcr)

    @staticmethod
    def _static_principals(config: SystemConfig, current: dict[str, Principal]) -> dict[str, Principal]:
        """The operator and the external services (credentials kept across reloads)."""
        wanted = {"operator": (config.operator.capabilities, True, {})}
        for name, spec in config.services.items():
            if not spec.managed and spec.enabled:
                wanted[name] = (spec.capabilities, False, spec.settings)
        result = {}
        for name, (caps, shared, settings) in wanted.items():
            old = current.get(name)
            result[name] = Principal(name, CapabilitySet(caps), shared=shared, external=not shared, settings=settings,
                                     **({"credential": old.credential} if old else {}))
        return result

    def _issue_credential(self, name: str, spec: ServiceConfig) -> str:
        principal = Principal(name, CapabilitySet(spec.capabilities), settings=spec.settings)
        self.router.submit(AddPrincipal(principal))
        return principal.credential

    async def _serve_notices(self) -> None:
        """What the router reports: peers ready and gone, operations to carry out."""
        assert self.router.notices is not None and self._tg is not None
        async for notice in self.router.notices:
            try:
                match notice:
                    case PeerReady(name=name):
                        self.supervisor.mark_ready(name)
                    case PeerGone(name=name, why=why, credential=credential, silent=silent):
                        self.supervisor.peer_gone(name, why, credential, silent)
                    case OperationRequested(request=request, identity=identity, request_id=request_id):
                        self._tg.start_soon(self._run_operation, request, identity, request_id)
            except Exception:  # a bug in handling one notice must not stop the kernel
                log.exception("notice_failed", notice=type(notice).__name__)

    def prepare(self) -> None:
        """Create the directories, take the run-dir lock, write external credentials."""
        for d in (self.run_dir, self.state_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_path = self.run_dir / "kernel.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise KernelError(f"another edgebus kernel is running with run directory {self.run_dir}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        sock = self.run_dir / "bus.sock"
        if sock.exists():
            sock.unlink()  # stale: we hold the lock, so no kernel owns it
        if self.config.bus.tcp_endpoint:
            self._start_curve()
        # Bind before the credentials appear: a client that finds its credential finds
        # the bus listening too.
        self.router.bind()
        if self.config.bus.tcp_endpoint:
            self._handshakes = monitor_handshakes(self.router._sock)  # before the router thread owns it
        creds = self.run_dir / "credentials"
        creds.mkdir(mode=0o700, exist_ok=True)
        os.chmod(creds, 0o700)
        self._write_credentials()

    def _write_credentials(self) -> None:
        """The operator's and external services' credentials, mode 0600 in a 0700 dir."""
        creds = self.run_dir / "credentials"
        for stale in creds.iterdir():
            if stale.name not in self.principals:
                stale.unlink()
        for name, principal in self.principals.items():
            _write_private(creds / name, principal.credential)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or until a critical service fails (exit 2)."""
        add_log_sink(self.logs.sink)
        try:
            return await self._run(task_status=task_status)
        finally:
            self.logs.publish = None
            remove_log_sink(self.logs.sink)

    def _publish_log(self, record: LogRecord) -> None:
        """Follow the logs: each record on kernel.logs.<service> (busctl logs -f)."""
        self.router.submit(PublishEvent(f"kernel.logs.{record.service}", record))

    async def _run(self, *, task_status: anyio.abc.TaskStatus[None]) -> int:
        try:
            self.prepare()
            if self.cgroups is not None:
                self.cgroups.prepare()
        except BaseException:
            self._cleanup()
            raise
        subreaper = _become_subreaper()
        log.info("kernel_starting", pid=os.getpid(), run_dir=str(self.run_dir), state_dir=str(self.state_dir),
                 config=self.source, endpoint=self.endpoint, subreaper=subreaper,
                 cgroups=str(self.cgroups.base) if self.cgroups else None)
        if self.cgroups is None and any(s.limits.memory is not None or s.limits.cpu_quota is not None
                                        for s in self.config.services.values()):
            log.warning("cgroups_unavailable", reason=self._cgroup_note,
                        fallback="memory limits use RLIMIT_AS; cpu_quota is not enforced")
        code = EXIT_OK
        try:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    tg.start_soon(self._serve_notices)
                    await tg.start(self.router.serve)
                    self.logs.publish = self._publish_log
                    if self._handshakes is not None:
                        tg.start_soon(watch_handshakes, self._handshakes, self.router.submit)
                    await tg.start(self.supervisor.run)
                    task_status.started()
                    tg.start_soon(self._announce_ready)
                    stop = anyio.Event()

                    async def on_fatal() -> None:
                        await self.supervisor.fatal.wait()
                        stop.set()

                    async def on_signals() -> None:
                        async for signum in signals:
                            if signum == signal.SIGHUP:
                                tg.start_soon(self._reload_on_signal)
                                continue
                            log.info("kernel_shutdown", signal=signal.Signals(signum).name)
                            stop.set()
                            return

                    tg.start_soon(on_fatal)
                    tg.start_soon(on_signals)
                    await stop.wait()
                    if self.supervisor.fatal.is_set():
                        code = EXIT_GAVE_UP
                        log.error("kernel_gives_up", reason=self.supervisor.fatal_reason, exit_code=code)
                    with anyio.CancelScope(shield=True):
                        await self.supervisor.stop_all()
                    self.logs.publish = None
                    tg.cancel_scope.cancel()
        finally:
            self._cleanup()
        log.info("kernel_stopped", exit_code=code)
        return code

    # -- reload and operations -----------------------------------------------------------------

    async def reload(self) -> Reloaded:
        """Re-read the config; apply it if valid, otherwise change nothing and say why."""
        try:
            new, source = load_config(self.config_path)
            await _check_settings(self.supervisor, self.config_path)
        except ConfigError as exc:
            log.error("reload_rejected", error=str(exc), detail="the running system is unchanged")
            raise
        if new.bus != self.config.bus:
            log.warning("reload_bus_settings_ignored", detail="[bus] changes take effect at the next boot")
            new.bus = self.config.bus
        self.config = new
        router = self.router
        previous, self.principals = self.principals, self._static_principals(new, self.principals)
        for name in previous.keys() - self.principals.keys():
            router.submit(RemovePrincipal(name))
        for principal in self.principals.values():
            router.submit(AddPrincipal(principal))
        router.submit(SetKnownServices(frozenset(n for n, s in new.services.items() if s.enabled)))
        enrolment = self._config_enrolment(new)
        for name in set(self._config_enrolled.values()) - set(enrolment.values()):
            router.submit(EnrollKey(name, ""))  # its key left the config
        for key, name in enrolment.items():
            router.submit(EnrollKey(name, key))
        self._config_enrolled = enrolment
        self.logs.configure(new.logs.lines_per_service, new.services)
        result = await self.supervisor.apply(new)
        self._write_credentials()
        log.info("reload_applied", config=source, **result)
        return Reloaded(**result)

    async def _reload_on_signal(self) -> None:
        try:
            await self.reload()
        except ConfigError:
            pass  # logged by reload; the running system is unchanged
        except Exception:
            log.exception("reload_failed")

    async def _run_operation(self, msg: msgspec.Struct, identity: bytes, request_id: int) -> None:
        result: msgspec.Struct
        try:
            match msg:
                case StartService(name=name):
                    result = await self.supervisor.start(name)
                case StopService(name=name):
                    result = await self.supervisor.stop(name, "requested on the bus")
                case RestartService(name=name):
                    result = await self.supervisor.restart(name)
                case Reload():
                    result = await self.reload()
                case GetLogs(services=services, lines=lines, since=since, after=after):
                    result = self.logs.query(services, lines, since, after)
                case _:
                    result = Error(code=ErrorCode.UNKNOWN_TYPE, message=f"not an operation: {type(msg).__name__}")
        except ConfigError as exc:
            result = Error(code=ErrorCode.REJECTED, message=f"{exc}; the running system is unchanged")
        except KeyError as exc:
            result = Error(code=ErrorCode.UNKNOWN_DESTINATION, message=f"no service named {exc.args[0]!r}")
        except Exception as exc:  # the operation failed; the kernel goes on
            log.exception("operation_failed", operation=type(msg).__name__)
            result = Error(code=ErrorCode.INTERNAL, message=f"{type(msg).__name__} failed: {type(exc).__name__}: {exc}")
        self.router.submit(FinishOperation(identity, request_id, result))

    async def _announce_ready(self) -> None:
        await self.supervisor.wait_all_ready()
        log.info("system_ready", services=sorted(self.supervisor.services))

    def _start_curve(self) -> None:
        """The CURVE server key (kept in the state dir, 0600; public half published in the
        run dir) and the ZAP handler that admits only enrolled client keys."""
        keydir = self.state_dir / "kernel"
        keydir.mkdir(mode=0o700, exist_ok=True)
        secret_file, public_file = keydir / "curve.key", keydir / "curve.pub"
        if secret_file.exists():
            secret = secret_file.read_bytes().strip()
            public = zmq.curve_public(secret)
        else:
            public, secret = zmq.curve_keypair()
            _write_private(secret_file, secret.decode())
            public_file.write_bytes(public)
        (self.run_dir / "bus.curve.pub").write_bytes(public)
        self.router.curve_secret_key = secret
        router = self.router
        refused = Summary()  # used by the ZAP thread only

        class Enrolled:
            def callback(self, domain: str, key: bytes) -> bool:
                allowed = key.decode() in router.enrolled
                if not allowed:  # this runs in the ZAP thread: log, and queue the audit
                    # (summarised: the 1st, 10th, 100th... of each key and of all; so is the audit)
                    count = refused.count(key)
                    if count:
                        log.warning("authentication_failed", mechanism="CURVE", key=key.decode()[:8] + "...",
                                    reason="public key not enrolled", count=count, total=refused.total)
                    router.submit(Audit("authentication-failed", "tcp peer",
                                        f"CURVE key {key.decode()} is not enrolled"))
                return allowed

        self._auth = ThreadAuthenticator(zmq.Context.instance(), log=_ZapLog())
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=Enrolled())

    def _cleanup(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        sock = self.run_dir / "bus.sock"
        if sock.exists():
            sock.unlink()
        creds = self.run_dir / "credentials"
        if creds.exists():
            for f in creds.iterdir():
                f.unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


_CHECK_TIMEOUT = 60.0
_CHECK_ERROR = re.compile(r"^edgebus: invalid config (.*?)(?: at (\S+))?: (.*)$", re.S)


async def _check_settings(supervisor: Supervisor, path: str | None) -> None:
    """Every service's settings against its declared type: the kernel does not import the
    services, so ``edgebus config check`` does it in a process of its own."""
    if path is None:
        return  # the built-in default, checked by the test suite
    argv = [sys.executable, "-m", "tools.edgebus", "config", "check", "--quiet", path]
    try:
        code, stderr = await supervisor.run_helper(argv, _CHECK_TIMEOUT)
    except TimeoutError:
        raise ConfigError(path, "", f"checking the services' settings took over {_CHECK_TIMEOUT:g}s") from None
    if code != 0:
        text = stderr.strip() or f"exit status {code}"
        m = _CHECK_ERROR.match(text)
        if m:
            raise ConfigError(m.group(1), m.group(2) or "", m.group(3))
        raise ConfigError(path, "", f"checking the services' settings failed: {text[-2000:]}")


class _ZapLog:
    """pyzmq's authenticator logs through a logging.Logger; route the useful part to ours."""

    def debug(self, *args: object, **kw: object) -> None:
        pass

    info = debug

    def warning(self, msg: str, *args: object, **kw: object) -> None:
        log.warning("zap", detail=msg % args if args else msg)

    error = warning
    exception = warning


def _write_private(path: Path, text: str) -> None:
    """Write ``path`` mode 0600, atomically: a reader never sees it empty or half written."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
