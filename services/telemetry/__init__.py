"""The telemetry service (``python -m services.telemetry``): metrics of every service,
served in the Prometheus text format, drift detection, and a store-and-forward MQTT uplink."""

from ._outbox import Outbox, OutboxFull
from ._prometheus import render
from ._service import TelemetryService
from ._settings import TelemetrySettings, UplinkSettings

__all__ = ["TelemetryService", "TelemetrySettings", "UplinkSettings", "Outbox", "OutboxFull", "render"]
