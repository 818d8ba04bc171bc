"""Sensor drivers: publish tensor frames on ``sensor.<name>`` at their configured rate.

``python -m drivers.sensors vibration``: the simulated accelerometer.  Settings:
``EDGEBUS_SENSOR_RATE`` (frames per second, default 5), ``EDGEBUS_SENSOR_FAULT_AT``
(seconds after start when a bearing fault appears; empty: never),
``EDGEBUS_SENSOR_FAULT_SEVERITY`` (default 1.5).
"""

from __future__ import annotations

import os
import sys
import time

import anyio
import msgspec

from protocols import Tensor, pack_tensors
from services import Service, run

from ._vibration import RATE, VibrationSimulator

__all__ = ["VibrationSensor", "SensorFrame"]


class SensorFrame(msgspec.Struct, tag=True, omit_defaults=True):
    """One frame: the samples are raw frame 0, described by ``tensor``."""

    seq: int
    time: float
    sample_rate: float
    tensor: Tensor
    #: ground truth, for demos and tests of the simulated sensor
    fault: float = 0.0


class VibrationSensor(Service):
    name = "vibration"
    publishes = ["sensor.*"]

    async def setup(self) -> None:
        self.rate = float(os.environ.get("EDGEBUS_SENSOR_RATE", "5"))
        fault_at = os.environ.get("EDGEBUS_SENSOR_FAULT_AT", "")
        self.fault_at = float(fault_at) if fault_at else None
        self.severity = float(os.environ.get("EDGEBUS_SENSOR_FAULT_SEVERITY", "1.5"))
        self.sim = VibrationSimulator(seed=int(os.environ.get("EDGEBUS_SENSOR_SEED", "0")))
        self.topic = f"sensor.{self.bus.name}"

    async def main(self) -> None:
        started = time.monotonic()
        period = 1.0 / self.rate
        seq = 0
        next_at = started
        announced = False
        while True:
            elapsed = time.monotonic() - started
            fault = self.severity if self.fault_at is not None and elapsed >= self.fault_at else 0.0
            if fault and not announced:
                announced = True
                self.log.info("fault_injected", severity=fault, after_s=round(elapsed, 1))
            descs, frames = pack_tensors([self.sim.frame(fault)])
            await self.bus.publish(self.topic, SensorFrame(seq=seq, time=time.time(), sample_rate=RATE,
                                                           tensor=descs[0], fault=fault), frames=frames)
            seq += 1
            next_at += period
            await anyio.sleep(max(0.0, next_at - time.monotonic()))


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "vibration"
    if kind != "vibration":
        sys.exit(f"unknown sensor kind {kind!r}; available: vibration")
    run(VibrationSensor)
