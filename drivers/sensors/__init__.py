"""Sensor drivers (``python -m drivers.sensors KIND``): publish frames on sensor.<name>."""

from ._driver import SensorFrame, VibrationSensor
from ._vibration import FRAME, RATE, VibrationSimulator

__all__ = ["SensorFrame", "VibrationSensor", "VibrationSimulator", "FRAME", "RATE"]
