"""The health channel: what health drivers publish on ``health.<name>``, and simulation."""

from __future__ import annotations

import msgspec

__all__ = ["Health", "Simulate", "Simulated"]


class Health(msgspec.Struct, tag=True, omit_defaults=True):
    cpu_load: float
    memory_available: int
    memory_total: int
    temperature_c: float | None = None
    simulated: bool = False


class Simulate(msgspec.Struct, tag=True, omit_defaults=True):
    temperature_c: float | None = None


class Simulated(msgspec.Struct, tag=True, omit_defaults=True):
    temperature_c: float | None = None
