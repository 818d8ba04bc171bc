"""Errors the kernel reports to the person running it.

Hierarchy::

    KernelError
    ├── ConfigError         the system config is unreadable or invalid (file and key named)
    │   └── CapabilityError a capability pattern does not parse
    ├── BindError           the bus endpoint cannot be bound (run dir, permissions, in use)
    └── SpawnError          a service's command cannot be started
"""

from __future__ import annotations

__all__ = ["KernelError", "ConfigError", "CapabilityError", "BindError", "SpawnError"]


class KernelError(Exception):
    """Base class for everything the kernel raises on purpose."""


class ConfigError(KernelError):
    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f" at {key}" if key else ""
        super().__init__(f"invalid config {source}{where}: {problem}")


class CapabilityError(ConfigError):
    def __init__(self, pattern: str, problem: str, *, source: str = "<capabilities>", key: str = "") -> None:
        self.pattern = pattern
        self.reason = problem
        super().__init__(source, key, f"capability {pattern!r} {problem}")


class BindError(KernelError):
    def __init__(self, endpoint: str, reason: str) -> None:
        self.endpoint = endpoint
        super().__init__(f"cannot bind the bus on {endpoint}: {reason}")


class SpawnError(KernelError):
    def __init__(self, service: str, command: list[str], reason: str) -> None:
        self.service = service
        self.command = command
        super().__init__(f"cannot start service {service!r} ({' '.join(command)}): {reason}")
