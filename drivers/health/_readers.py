"""Readers of the machine's state: CPU load, memory, thermal zones."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["read_cpu_load", "read_memory", "read_temperature"]


def read_cpu_load() -> float:
    """1-minute load average per CPU (1.0 = every core busy)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


def read_memory() -> tuple[int, int]:
    """(available, total) bytes from /proc/meminfo."""
    info: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return 0, 0
    return info.get("MemAvailable", 0), info.get("MemTotal", 0)


def read_temperature(root: str = "/sys/class/thermal") -> float | None:
    """The hottest thermal zone in °C, or None where the machine exposes none."""
    temps = []
    for zone in Path(root).glob("thermal_zone*/temp"):
        try:
            temps.append(int(zone.read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    return max(temps) if temps else None
