"""The telemetry service (``python -m services.telemetry``): metrics of every service,
served in the Prometheus text format.  (Drift detection and the MQTT uplink: to come.)"""

from ._outbox import Outbox
from ._prometheus import render
from ._service import TelemetryService

__all__ = ["TelemetryService", "Outbox", "render"]
