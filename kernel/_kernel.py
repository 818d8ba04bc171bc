"""``edgebus boot``: the kernel process.  Router and supervisor in one anyio task group."""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
from pathlib import Path

import anyio

from services import get_logger

from ._caps import CapabilitySet
from ._config import SystemConfig
from ._exceptions import KernelError
from ._router import Principal, Router
from ._supervisor import Supervisor

__all__ = ["Kernel", "default_dirs", "EXIT_OK", "EXIT_ERROR", "EXIT_CONFIG"]

log = get_logger(component="kernel")

#: Exit codes of ``edgebus boot``.
EXIT_OK = 0        # clean shutdown after SIGTERM/SIGINT
EXIT_ERROR = 1     # the kernel could not start (run dir locked, bus cannot bind...)
EXIT_CONFIG = 78   # the config is invalid (EX_CONFIG)

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
    def __init__(self, config: SystemConfig, run_dir: Path, state_dir: Path, source: str = "") -> None:
        self.config = config
        self.source = source
        self.run_dir = run_dir
        self.state_dir = state_dir
        self.endpoint = f"ipc://{run_dir / 'bus.sock'}"
        self._lock_fd: int | None = None
        principals = [Principal("operator", CapabilitySet(config.operator.capabilities), shared=True)]
        for name, spec in config.services.items():
            if not spec.managed and spec.enabled:
                principals.append(Principal(name, CapabilitySet(spec.capabilities)))
        self.supervisor = Supervisor(
            config, endpoint=self.endpoint, run_dir=str(run_dir), state_dir=str(state_dir),
            issue_credential=self._issue_credential, on_state=self._state_changed,
            on_exit=self._service_exited,
        )
        self.router = Router(
            self.endpoint, config.bus, principals,
            known_services=[n for n, s in config.services.items() if s.enabled],
            on_ready=self.supervisor.mark_ready, on_gone=self.supervisor.peer_gone,
            status=self.supervisor.status,
        )

    # The supervisor runs on the event loop; the router in its own thread.  Everything the
    # supervisor asks of the router is queued with submit() and runs in the router thread,
    # in order, before the router handles its next message.

    def _issue_credential(self, name: str, capabilities: list[str]) -> str:
        principal = Principal(name, CapabilitySet(capabilities))
        self.router.submit(self.router.add_principal, principal)
        return principal.credential

    def _state_changed(self, name: str, state: str, previous: str, pid: int, detail: str) -> None:
        self.router.submit(self.router.service_state_changed, name, state, previous, pid, detail)

    def _service_exited(self, name: str, why: str) -> None:
        # Answer its pending requests with `unavailable` now, not after missed heartbeats.
        self.router.submit(self.router.disconnect_name, name, f"process {why}")

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
        creds = self.run_dir / "credentials"
        creds.mkdir(mode=0o700, exist_ok=True)
        os.chmod(creds, 0o700)
        for stale in creds.iterdir():
            stale.unlink()
        for principal in self.router.principals():
            _write_private(creds / principal.name, principal.credential)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        self.prepare()
        subreaper = _become_subreaper()
        log.info("kernel_starting", pid=os.getpid(), run_dir=str(self.run_dir), state_dir=str(self.state_dir),
                 config=self.source, endpoint=self.endpoint, subreaper=subreaper)
        try:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async with anyio.create_task_group() as tg:
                    await tg.start(self.router.serve)
                    await tg.start(self.supervisor.run)
                    task_status.started()
                    tg.start_soon(self._announce_ready)
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            log.warning("reload_unsupported", detail="config reload arrives with the full supervisor")
                            continue
                        log.info("kernel_shutdown", signal=signal.Signals(signum).name)
                        break
                    with anyio.CancelScope(shield=True):
                        await self.supervisor.stop_all()
                    tg.cancel_scope.cancel()
        finally:
            self._cleanup()
        log.info("kernel_stopped")
        return 0

    async def _announce_ready(self) -> None:
        await self.supervisor.wait_all_ready()
        log.info("system_ready", services=sorted(self.supervisor.services))

    def _cleanup(self) -> None:
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


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
