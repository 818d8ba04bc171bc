"""Placement: which accelerator driver runs a batch, and failover when it fails.

* Each driver's temperature is the last reading of its own health source (the health
  driver its settings name), never another's.
* A batch goes to the driver with the fewest batches in flight among those up and not
  hot; when every up driver is hot, among all that are up.
* A driver that fails mid-batch (unavailable, gone) is marked down for a moment and the
  batch goes to another driver, or to the restarted one, until the deadline.
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable, Sequence, TypeVar

import anyio

from protocols.scheduler import DriverState
from services import DeadlineExceeded, Unavailable, UnknownDestination

from ._settings import DriverSettings

__all__ = ["Driver", "place", "apply_health", "thermal_pressure", "run_with_failover", "run_pinned", "DOWN_FOR",
           "PinnedDriverLost"]

#: seconds a driver that failed a batch is left out of placement
DOWN_FOR = 0.5

T = TypeVar("T")


class PinnedDriverLost(Unavailable):
    """A batch pinned to one driver (a stream's) could not run there: that driver is not
    running, or failed it.  The batch is not moved (its state lived there)."""

    def __init__(self, driver: str, message: str) -> None:
        super().__init__(message)
        self.driver = driver


class Driver:
    def __init__(self, name: str, health: str = "health") -> None:
        self.name = name
        #: the health source whose readings are this driver's
        self.health = health
        self.in_flight = 0
        self.down_until = 0.0
        self.batches = 0
        self.temperature: float | None = None
        #: ready as the kernel reports it (kernel.services); without those reports, assumed
        self.ready = True

    @classmethod
    def from_settings(cls, s: DriverSettings) -> Driver:
        return cls(s.name, s.health)

    def up(self, now: float) -> bool:
        return self.ready and self.down_until <= now

    def mark_down(self, now: float) -> None:
        self.down_until = now + DOWN_FOR

    def state(self, now: float) -> DriverState:
        return DriverState(name=self.name, in_flight=self.in_flight, up=self.up(now), batches=self.batches,
                           temperature_c=self.temperature)


def place(drivers: Sequence[Driver], now: float, hot_c: float) -> Driver | None:
    """The driver for the next batch, or None when every driver is down."""
    candidates = [d for d in drivers if d.up(now)]
    if not candidates:
        return None
    cool = [d for d in candidates if d.temperature is None or d.temperature < hot_c] or candidates
    return min(cool, key=lambda d: d.in_flight)


def apply_health(drivers: Sequence[Driver], source: str, temperature: float | None) -> list[Driver]:
    """A reading from health source ``source``: the temperature of the drivers it watches
    (a reading without a temperature leaves theirs as it was).  Returns those drivers."""
    watched = [d for d in drivers if d.health == source]
    if temperature is not None:
        for d in watched:
            d.temperature = temperature
    return watched


def thermal_pressure(drivers: Sequence[Driver], now: float) -> float | None:
    """The temperature the degradation ladder weighs: the coolest driver that is up (all
    of them when none is), since placement already avoids the hot ones while a cool one
    remains.  None when one of them has no reading (not known to be hot) or there is none."""
    pool = [d for d in drivers if d.up(now)] or list(drivers)
    temps = [d.temperature for d in pool]
    if not temps or any(t is None for t in temps):
        return None
    return min(t for t in temps if t is not None)


async def _attempt(driver: Driver, send: Callable[[Driver], Awaitable[T]],
                   on_failure: Callable[[Driver, Exception], None]) -> T:
    """``send`` the batch to ``driver``, counted in flight; a driver that answers
    Unavailable/UnknownDestination is marked down (and ``on_failure`` told) before the error
    goes on."""
    driver.in_flight += 1
    try:
        result = await send(driver)
    except (Unavailable, UnknownDestination) as exc:
        driver.mark_down(time.monotonic())
        on_failure(driver, exc)
        raise
    finally:
        driver.in_flight -= 1
    driver.batches += 1
    return result


async def run_with_failover(drivers: Sequence[Driver], hot_c: float, deadline: float, what: str,
                            send: Callable[[Driver], Awaitable[T]],
                            on_failure: Callable[[Driver, Exception], None] = lambda d, e: None) -> tuple[T, Driver]:
    """``send`` the batch to a placed driver; on Unavailable/UnknownDestination mark that
    driver down and place again, until ``deadline`` (wall-clock).  Waits while every
    driver is down (a restart is coming).  Raises DeadlineExceeded naming the last error."""
    last: Exception | None = None
    while time.time() < deadline:
        driver = place(drivers, time.monotonic(), hot_c)
        if driver is None:
            await anyio.sleep(0.05)  # every driver is down: wait for a restart, until the deadline
            continue
        try:
            return await _attempt(driver, send, on_failure), driver
        except (Unavailable, UnknownDestination) as exc:
            last = exc
    raise DeadlineExceeded(f"{what}: no accelerator driver answered before the deadline"
                           + (f" (last error: {last})" if last else ""))


async def run_pinned(drivers: Sequence[Driver], name: str, send: Callable[[Driver], Awaitable[T]],
                     on_failure: Callable[[Driver, Exception], None] = lambda d, e: None) -> tuple[T, Driver]:
    """``send`` the batch to driver ``name`` and nowhere else: PinnedDriverLost when it is
    not up or fails the batch (marked down, as run_with_failover does)."""
    driver = next((d for d in drivers if d.name == name), None)
    if driver is None or not driver.up(time.monotonic()):
        raise PinnedDriverLost(name, f"driver {name} is not running")
    try:
        return await _attempt(driver, send, on_failure), driver
    except (Unavailable, UnknownDestination) as exc:
        raise PinnedDriverLost(name, f"driver {name} failed: {exc}") from None
