"""System-health drivers (``python -m drivers.health``): CPU, memory, thermal zones, and a
simulated thermal profile for tests."""

from ._driver import Health, HealthDriver, HealthSettings, Simulate, Simulated
from ._readers import read_cpu_load, read_memory, read_temperature

__all__ = ["Health", "HealthDriver", "HealthSettings", "Simulate", "Simulated", "read_cpu_load", "read_memory", "read_temperature"]
