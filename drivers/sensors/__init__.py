"""Sensor drivers (``python -m drivers.sensors``): publish frames on sensor.<name>; the
settings' ``kind`` says which sensor (vibration, replay, camera)."""

from ._driver import (
    CameraSettings,
    ReplaySettings,
    SensorDriver,
    SensorFrame,
    SensorSettings,
    VibrationSettings,
    load_recording,
)
from ._vibration import FRAME, RATE, VibrationSimulator

__all__ = ["SensorDriver", "SensorSettings", "VibrationSettings", "ReplaySettings", "CameraSettings", "SensorFrame",
           "load_recording", "VibrationSimulator", "FRAME", "RATE"]
