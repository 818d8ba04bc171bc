"""cgroup v2 memory and CPU limits, where the cgroup filesystem allows them.

Layout, as container inits do it: the kernel moves itself into ``<its cgroup>/kernel``
(the "no internal processes" rule), enables the memory and cpu controllers for its
cgroup's children, and gives each service ``<its cgroup>/svc-<name>`` with memory.max and
cpu.max.  The exec wrapper joins that cgroup before exec, so every process of the service
is accounted and limited from its first instruction.
"""

from __future__ import annotations

import os
from pathlib import Path

from protocols.runtime import get_logger

from ._config import Limits

__all__ = ["Cgroups"]

log = get_logger(component="cgroups")

CPU_PERIOD_US = 100_000


class Cgroups:
    def __init__(self, base: Path) -> None:
        self.base = base

    @classmethod
    def detect(cls, mount: str = "/sys/fs/cgroup") -> tuple["Cgroups | None", str]:
        """The manager, or None and the reason limits must fall back to rlimits."""
        root = Path(mount)
        if not (root / "cgroup.controllers").exists():
            return None, f"{mount} is not a cgroup v2 (unified) hierarchy"
        try:
            entry = next(line for line in Path("/proc/self/cgroup").read_text().splitlines()
                         if line.startswith("0::"))
        except (OSError, StopIteration):
            return None, "this process has no cgroup v2 membership"
        base = root / entry[3:].lstrip("/")
        try:
            available = (base / "cgroup.controllers").read_text().split()
        except OSError as exc:
            return None, f"cannot read {base}/cgroup.controllers: {exc.strerror}"
        missing = {"memory", "cpu"} - set(available)
        if missing:
            return None, f"controllers {sorted(missing)} are not delegated to {base}"
        if not os.access(base, os.W_OK):
            return None, f"{base} is not writable"
        return cls(base), ""

    def prepare(self) -> None:
        leaf = self.base / "kernel"
        leaf.mkdir(exist_ok=True)
        (leaf / "cgroup.procs").write_text(str(os.getpid()))
        (self.base / "cgroup.subtree_control").write_text("+memory +cpu")

    def create(self, service: str, limits: Limits) -> Path:
        path = self.base / f"svc-{service}"
        path.mkdir(exist_ok=True)
        memory = limits.memory_bytes()
        (path / "memory.max").write_text(str(memory) if memory is not None else "max")
        quota = limits.cpu_quota
        (path / "cpu.max").write_text(f"{int(quota * CPU_PERIOD_US)} {CPU_PERIOD_US}" if quota else "max")
        return path

    def remove(self, service: str) -> None:
        try:
            (self.base / f"svc-{service}").rmdir()
        except OSError:
            pass  # still populated (a straggler being killed) or already gone
