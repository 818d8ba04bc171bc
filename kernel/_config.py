"""The system config: TOML decoded straight into msgspec Structs.

Unknown keys and wrong types are errors that name the file and the key.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import signal
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from protocols.runtime import validation_key

from ._caps import CapabilitySet
from ._exceptions import CapabilityError, ConfigError

__all__ = [
    "BusConfig", "OperatorConfig", "ServiceConfig", "SystemConfig", "SupervisorConfig", "LogsConfig", "Limits",
    "parse_size",
    "load_config", "default_config_text", "config_dir", "SERVICE_NAME",
]

SERVICE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
RESERVED_NAMES = frozenset({"kernel", "operator"})
#: The most log records kept per service that a config may ask for.
LINES_PER_SERVICE_MAX = 100_000


class BusConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Seconds between heartbeats, both directions.
    heartbeat_interval: float = 1.0
    #: A peer silent for this many intervals is declared dead.
    heartbeat_liveness: int = 3
    #: Largest message (all frames together) the kernel accepts, in bytes.
    max_message_size: int = 64 * 1024 * 1024
    #: Messages queued towards one peer before further requests get ``overloaded``.
    queue_limit: int = 1000
    #: Requests outstanding at one destination before further ones get ``overloaded``.
    max_pending: int = 10000
    #: Upper bound on the life of a request that carries no deadline, seconds.
    request_timeout: float = 300.0
    #: Optional tcp endpoint for peers on other hosts, e.g. "tcp://0.0.0.0:7450".  It only
    #: speaks CurveZMQ (never NULL); peers authenticate with an enrolled public key.
    tcp_endpoint: str = ""


class OperatorConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What busctl (holding the operator credential in the run directory) may do."""

    capabilities: list[str] = msgspec.field(
        default_factory=lambda: ["call:*", "publish:*", "subscribe:*"]
    )


class Limits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Resource limits of one service; an absent key leaves the kernel's own value."""

    #: Bytes (or "512M", "2G"): cgroup v2 memory.max where available, else RLIMIT_AS.
    memory: int | str | None = None
    #: CPU share in cores (0.5 = half a core): cgroup v2 cpu.max; no rlimit equivalent.
    cpu_quota: float | None = None
    #: RLIMIT_NOFILE.
    open_files: int | None = None
    #: RLIMIT_CPU, seconds of CPU time.
    cpu_seconds: int | None = None
    #: RLIMIT_CORE, bytes (0 disables core dumps).
    core_size: int | None = None
    #: Scheduling niceness, -20 (first) .. 19 (last).
    nice: int | None = None
    #: CPUs the service may run on.
    cpu_affinity: list[int] | None = None

    def memory_bytes(self) -> int | None:
        return parse_size(self.memory) if self.memory is not None else None

    def any(self) -> bool:
        return any(getattr(self, f) is not None for f in self.__struct_fields__)


def parse_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", value, re.I)
    if not m:
        raise ValueError(f"{value!r} is not a size; write bytes or a number with K, M, G or T")
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")


class SupervisorConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: one_for_one: a crash restarts that service only.  rest_for_one: it also restarts
    #: every service that requires it (directly or not), once it is ready again.
    strategy: Literal["one_for_one", "rest_for_one"] = "one_for_one"


class LogsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What the kernel keeps of each service's log lines, for ``busctl logs`` (GetLogs)."""

    #: Records kept per service (its own lines and output, and the kernel's lines about
    #: it), the oldest forgotten first; the kernel's other lines are kept as ``kernel``.
    lines_per_service: int = 1000


class ServiceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: argv; ``{python}`` is replaced by the kernel's interpreter.  Empty: the kernel does
    #: not start this service, it connects on its own with the credential the kernel writes
    #: to ``<run-dir>/credentials/<name>`` (mode 0600).  A relative program path (one with a
    #: ``/``, such as ``bin/sensor``) or script (``{python} svc.py``) is taken from the
    #: config file's directory.
    command: list[str] = []
    #: The service's own settings (``[services.<name>.settings]``), delivered to it in
    #: Welcome.  Their type is the service's: ``edgebus config check`` and a reload check
    #: them against it; the kernel only carries them.
    settings: dict[str, Any] = {}
    capabilities: list[str] = []
    #: Services that must be ready before this one starts.
    requires: list[str] = []
    #: Variables set in the service's (otherwise clean) environment.
    environment: dict[str, str] = {}
    #: Names of the kernel's own variables passed through unchanged.
    pass_environment: list[str] = []
    #: Relative to the config file's directory.  Empty: the state directory.
    working_directory: str = ""
    #: Seconds from spawn to READY before the start counts as failed.
    start_timeout: float = 30.0
    stop_signal: str = "SIGTERM"
    #: Seconds between the stop signal and SIGKILL of the service's process group.
    stop_timeout: float = 10.0
    enabled: bool = True
    #: OTP restart types: permanent (always restarted), transient (restarted unless it
    #: exited 0), temporary (never restarted).
    restart: Literal["permanent", "transient", "temporary"] = "permanent"
    #: Restart intensity: more than max_restarts restarts within restart_window seconds
    #: marks the service failed; for a critical service the whole system shuts down and
    #: `edgebus boot` exits 2.
    max_restarts: int = 5
    restart_window: float = 60.0
    critical: bool = False
    #: Back-off between restarts: the first crash in a restart window restarts at once,
    #: the next ones after backoff_initial, doubling up to backoff_max.
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    #: Run as this user and group (only when the kernel runs as root).
    user: str = ""
    group: str = ""
    limits: Limits = msgspec.field(default_factory=Limits)
    #: For a service connecting over tcp: its CurveZMQ public key (40 Z85 characters).
    curve_public_key: str = ""

    @property
    def managed(self) -> bool:
        return bool(self.command)


class SystemConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    bus: BusConfig = msgspec.field(default_factory=BusConfig)
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    operator: OperatorConfig = msgspec.field(default_factory=OperatorConfig)
    logs: LogsConfig = msgspec.field(default_factory=LogsConfig)
    services: dict[str, ServiceConfig] = {}


def default_config_text() -> str:
    return importlib.resources.files("kernel").joinpath("default.toml").read_text()


def config_dir(path: str | Path | None) -> Path:
    """Where relative paths in a config resolve: the file's directory (for the built-in
    default, the current directory)."""
    return Path(path).resolve().parent if path is not None else Path.cwd()


def load_config(path: str | Path | None = None) -> tuple[SystemConfig, str]:
    """Read and validate a config file (the built-in default when ``path`` is None).

    Returns the config and the source name used in messages.  Relative paths in it
    (``command`` programs, ``working_directory``) are resolved against its directory.
    """
    if path is None:
        source, text = "<built-in default>", default_config_text()
    else:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(source, "", f"cannot read the file: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(source, "", f"not UTF-8 text: {exc}") from exc
    return parse_config(text, source, config_dir(path)), source


def parse_config(text: str, source: str = "<string>", base_dir: Path | None = None) -> SystemConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"not valid TOML: {exc}") from exc
    services = raw.pop("services", {})
    if not isinstance(services, dict):
        raise ConfigError(source, "services", "must be a table of [services.<name>] sections")
    config = _convert(raw, SystemConfig, source, "")
    # Each service separately, so an error names the service (msgspec says "[...]").
    config.services = {
        name: _convert(body, ServiceConfig, source, f"services.{name}") for name, body in services.items()
    }
    _validate(config, source)
    if base_dir is not None:
        for svc in config.services.values():
            _resolve_paths(svc, base_dir)
    return config


def _resolve_paths(svc: ServiceConfig, base: Path) -> None:
    """The program (a path with a ``/``), the script of a ``{python} script.py`` command,
    and the working directory are taken from the config file's directory."""
    argv = svc.command
    if argv and "/" in argv[0] and not os.path.isabs(argv[0]):
        argv[0] = str(base / argv[0])
    if len(argv) > 1 and argv[0] == "{python}" and argv[1].endswith(".py") and not os.path.isabs(argv[1]):
        argv[1] = str(base / argv[1])
    if svc.working_directory and not os.path.isabs(svc.working_directory):
        svc.working_directory = str(base / svc.working_directory)


def _convert(raw: object, type_: type, source: str, prefix: str):  # type: ignore[no-untyped-def]
    try:
        return msgspec.convert(raw, type_)
    except msgspec.ValidationError as exc:
        raise ConfigError(source, *validation_key(exc, prefix)) from exc


def _validate(config: SystemConfig, source: str) -> None:
    bus = config.bus
    for key, value, low in (
        ("bus.heartbeat_interval", bus.heartbeat_interval, 0.01),
        ("bus.heartbeat_liveness", bus.heartbeat_liveness, 1),
        ("bus.max_message_size", bus.max_message_size, 1024),
        ("bus.queue_limit", bus.queue_limit, 1),
        ("bus.max_pending", bus.max_pending, 1),
        ("bus.request_timeout", bus.request_timeout, 0.01),
    ):
        if value < low:
            raise ConfigError(source, key, f"must be at least {low}, got {value}")
    if not 1 <= config.logs.lines_per_service <= LINES_PER_SERVICE_MAX:
        raise ConfigError(source, "logs.lines_per_service",
                          f"must be between 1 and {LINES_PER_SERVICE_MAX}, got {config.logs.lines_per_service}")
    _check_caps(config.operator.capabilities, source, "operator.capabilities")
    if bus.tcp_endpoint and not bus.tcp_endpoint.startswith("tcp://"):
        raise ConfigError(source, "bus.tcp_endpoint", "must be a tcp:// endpoint, e.g. tcp://0.0.0.0:7450")
    names = set(config.services)
    for name, svc in config.services.items():
        key = f"services.{name}"
        if not SERVICE_NAME.match(name) or name in RESERVED_NAMES:
            raise ConfigError(
                source, key,
                "a service name is 1-63 of a-z, 0-9, '_' and '-', starting with a letter, "
                f"and not one of {sorted(RESERVED_NAMES)}",
            )
        _check_caps(svc.capabilities, source, f"{key}.capabilities")
        for dep in svc.requires:
            if dep not in names:
                raise ConfigError(source, f"{key}.requires", f"requires unknown service {dep!r}")
            if svc.managed and not config.services[dep].managed:
                raise ConfigError(source, f"{key}.requires",
                                  f"{dep!r} is configured without a command (an external service: it connects on its "
                                  "own); a service the kernel starts can only require services it starts")
        try:
            signal.Signals[svc.stop_signal]
        except KeyError:
            raise ConfigError(source, f"{key}.stop_signal", f"unknown signal {svc.stop_signal!r}") from None
        for field in ("start_timeout", "stop_timeout", "restart_window", "backoff_initial", "backoff_max"):
            if getattr(svc, field) <= 0:
                raise ConfigError(source, f"{key}.{field}", "must be positive")
        if svc.max_restarts < 0:
            raise ConfigError(source, f"{key}.max_restarts", "must be 0 or more")
        _validate_limits(svc.limits, source, f"{key}.limits")
        if svc.curve_public_key and len(svc.curve_public_key) != 40:
            raise ConfigError(source, f"{key}.curve_public_key",
                              "a CurveZMQ public key is 40 Z85 characters (zmq.curve_keypair)")
    cycle = _find_cycle({n: s.requires for n, s in config.services.items()})
    if cycle:
        raise ConfigError(source, "services", "dependency cycle: " + " -> ".join(cycle))


def _validate_limits(limits: Limits, source: str, key: str) -> None:
    try:
        memory = limits.memory_bytes()
    except ValueError as exc:
        raise ConfigError(source, f"{key}.memory", str(exc)) from None
    if memory is not None and memory < 1024 * 1024:
        raise ConfigError(source, f"{key}.memory", f"{memory} bytes is too small to start a process (at least 1M)")
    for field in ("open_files", "cpu_seconds", "core_size"):
        value = getattr(limits, field)
        if value is not None and value < 0:
            raise ConfigError(source, f"{key}.{field}", "must be 0 or more")
    if limits.cpu_quota is not None and limits.cpu_quota <= 0:
        raise ConfigError(source, f"{key}.cpu_quota", "must be a positive number of cores")
    if limits.nice is not None and not -20 <= limits.nice <= 19:
        raise ConfigError(source, f"{key}.nice", "must be between -20 and 19")
    if limits.cpu_affinity is not None:
        cpus = os.cpu_count() or 1
        bad = [c for c in limits.cpu_affinity if not 0 <= c < cpus]
        if bad or not limits.cpu_affinity:
            raise ConfigError(source, f"{key}.cpu_affinity", f"CPUs must be listed from 0 to {cpus - 1}")


def _check_caps(patterns: list[str], source: str, key: str) -> None:
    for i, pattern in enumerate(patterns):
        try:
            CapabilitySet([pattern])
        except CapabilityError as exc:
            raise CapabilityError(pattern, exc.reason, source=source, key=f"{key}[{i}]") from None


def _find_cycle(graph: dict[str, list[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for n in graph:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def dependency_order(config: SystemConfig) -> list[str]:
    """Enabled services, each after everything it requires."""
    order: list[str] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in config.services[name].requires:
            add(dep)
        order.append(name)

    for name in config.services:
        add(name)
    return order
