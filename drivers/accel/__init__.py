"""Accelerator drivers (``python -m drivers.accel``): ONNX Runtime execution providers
behind the bus, running pre-op, session.run, post-op pipelines on batches."""

from ._driver import AcceleratorDriver
from ._settings import AccelSettings
from protocols.accel import Describe, Device, Load, Loaded, Run, RunResult

__all__ = ["AcceleratorDriver", "AccelSettings", "Describe", "Device", "Load", "Loaded", "Run", "RunResult"]
