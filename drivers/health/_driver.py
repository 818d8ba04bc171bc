"""The health driver: publishes the device's state on ``health.<name>`` every interval.

Readings come from /proc and /sys/class/thermal.  For tests and demos the temperature can
be simulated: the setting ``thermal_profile = [[0, 45], [10, 85], [30, 50]]`` (seconds since
start, °C; linearly interpolated, the last value held), or set at run time with ``Simulate``
(only when ``simulated = true`` or a profile is given).
"""

from __future__ import annotations

import time
from typing import Annotated

import anyio
import msgspec

from protocols.health import Health, Simulate, Simulated
from services import Context, Forbidden, Service, Settings, run

from ._readers import read_cpu_load, read_memory, read_temperature

__all__ = ["HealthDriver", "HealthSettings", "Health", "Simulate", "Simulated"]


class HealthSettings(Settings):
    """``[services.<name>.settings]`` of a health driver."""

    #: seconds between readings published on ``health.<name>``
    interval: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    #: allow ``Simulate`` (a temperature set at run time), for tests and demos
    simulated: bool = False
    #: a simulated temperature: [seconds since start, °C] points, interpolated, the last held
    thermal_profile: list[tuple[Annotated[float, msgspec.Meta(ge=0)], float]] = []


def _interpolate(points: list[tuple[float, float]], t: float) -> float:
    if t <= points[0][0]:
        return points[0][1]
    for (t0, c0), (t1, c1) in zip(points, points[1:]):
        if t0 <= t <= t1:
            return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1
    return points[-1][1]


class HealthDriver(Service):
    name = "health"
    Request = Simulate
    Reply = Simulated
    Settings = HealthSettings
    publishes = ["health.*"]

    async def setup(self) -> None:
        self.profile = sorted(self.settings.thermal_profile)
        self.simulation_allowed = self.settings.simulated or bool(self.profile)
        self.override: float | None = None
        self.started = time.monotonic()

    def reading(self) -> Health:
        available, total = read_memory()
        temperature, simulated = read_temperature(), False
        if self.override is not None:
            temperature, simulated = self.override, True
        elif self.profile:
            temperature, simulated = _interpolate(self.profile, time.monotonic() - self.started), True
        return Health(cpu_load=round(read_cpu_load(), 3), memory_available=available, memory_total=total,
                      temperature_c=temperature, simulated=simulated)

    async def handle(self, req: Simulate, ctx: Context) -> Simulated:
        if not self.simulation_allowed:
            raise Forbidden("temperature simulation is off (the driver's setting simulated = true turns it on)")
        self.override = req.temperature_c
        await self.bus.publish(f"health.{self.bus.name}", self.reading())
        return Simulated(temperature_c=req.temperature_c)

    async def main(self) -> None:
        while True:
            await self.bus.publish(f"health.{self.bus.name}", self.reading())
            await anyio.sleep(self.settings.interval)


def main() -> None:
    run(HealthDriver)
