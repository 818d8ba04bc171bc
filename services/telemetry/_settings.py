"""The telemetry service's settings: ``[services.telemetry.settings]``."""

from __future__ import annotations

from typing import Annotated

import msgspec

from services import Settings

from ._uplink import UplinkSettings

__all__ = ["TelemetrySettings", "UplinkSettings"]


class TelemetrySettings(Settings):
    #: this device's name upstream: MQTT topics ``edgebus/<device_id>/...``, message ids
    device_id: Annotated[str, msgspec.Meta(min_length=1, pattern="^[^/#+]+$")] = "edgebus"
    #: ``host:port`` of the Prometheus endpoint (``/metrics``); empty: no HTTP
    http: Annotated[str, msgspec.Meta(pattern=r"^$|^[^:]*:\d+$")] = "127.0.0.1:9464"
    #: seconds between the condensed metrics sent upstream
    summary_interval: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    #: feature rows in a drift window, and new rows between evaluations
    drift_window: Annotated[int, msgspec.Meta(ge=10)] = 200
    drift_every: Annotated[int, msgspec.Meta(ge=1)] = 50
    #: seconds between reminders while a model version stays at drift warn or alert (a
    #: telemetry.drift event is raised when the level changes, and cleared on recovery)
    drift_repeat: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    #: the outbox's bounds, over which it drops the lowest priority, oldest first (alerts last):
    #: bytes ON DISK (its files: the database and its WAL, so the payloads plus SQLite's
    #: overhead; freed space is given back to the file system), age (seconds), and the share
    #: of its disk to keep free (it drops until the share is restored; when even an empty
    #: outbox could not restore it, it does not grow)
    outbox_max_bytes: Annotated[int, msgspec.Meta(ge=1 << 16)] = 64 << 20
    outbox_max_age: Annotated[float, msgspec.Meta(gt=0)] = 7 * 86400.0
    outbox_min_free_share: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.05
    #: ``[services.telemetry.settings.uplink]``: store-and-forward to MQTT; absent: off
    uplink: UplinkSettings | None = None
