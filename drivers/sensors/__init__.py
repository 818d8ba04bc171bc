"""Sensor drivers (``python -m drivers.sensors KIND``): publish frames on sensor.<name>."""

from ._driver import CameraSensor, ReplaySensor, SensorFrame, VibrationSensor, load_recording
from ._vibration import FRAME, RATE, VibrationSimulator

__all__ = ["SensorFrame", "VibrationSensor", "ReplaySensor", "CameraSensor", "load_recording",
           "VibrationSimulator", "FRAME", "RATE"]
