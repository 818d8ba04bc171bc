"""The telemetry channel: metric snapshots services publish on ``metrics.<service>``, and
the telemetry service's requests."""

from __future__ import annotations

import msgspec

from ._messages import Tensor

__all__ = ["Sample", "MetricFamily", "MetricsSnapshot", "FeatureSamples", "DriftEvent", "GetMetrics", "GetUplink", "Request", "MetricsText",
           "UplinkState", "Reply"]


class Sample(msgspec.Struct, omit_defaults=True):
    name: str
    value: float
    labels: dict[str, str] = {}


class MetricFamily(msgspec.Struct, omit_defaults=True):
    name: str
    #: counter | gauge | histogram
    kind: str
    help: str = ""
    samples: list[Sample] = []


class MetricsSnapshot(msgspec.Struct, tag=True):
    """Every interval, each service's registry, on metrics.<service>."""

    service: str
    time: float
    families: list[MetricFamily]


class FeatureSamples(msgspec.Struct, tag=True):
    """A batch's model-input features (raw frame 0), on samples.<model>, for drift detection."""

    model: str
    version: str
    tensor: Tensor


class DriftEvent(msgspec.Struct, tag=True, omit_defaults=True):
    """On telemetry.drift: a model version's drift level against its reference, on a change
    only: ``raise`` when it goes to warn or alert (or between them), ``clear`` when it is back
    to ok, and ``repeat`` while it stays at warn or alert, at most every ``drift_repeat``
    seconds (a telemetry setting)."""

    model: str
    version: str
    #: the features at warn or alert, each with its latest window's psi, ks, p_value and
    #: level (none in a clear)
    features: list[dict]
    #: ok | warn | alert: the level now
    level: str = "alert"
    #: raise | repeat | clear
    change: str = "raise"
    #: the level before (the same in a repeat)
    previous: str = "ok"
    #: when the version entered this level (Unix time)
    since: float = 0.0
    #: windows evaluated so far
    windows: int = 0


class GetMetrics(msgspec.Struct, tag=True):
    """The aggregated metrics of every service, in the Prometheus text format."""


class GetUplink(msgspec.Struct, tag=True):
    """The store-and-forward uplink's state."""


Request = GetMetrics | GetUplink


class MetricsText(msgspec.Struct, tag=True):
    text: str


class UplinkState(msgspec.Struct, tag=True, omit_defaults=True):
    """The uplink and its outbox.  The counters (sent, bytes_sent, dropped,
    raw_sensor_bytes) persist in the outbox's database and all count from
    ``counting_since``: they compare like with like across restarts of telemetry and of
    the sensors."""

    enabled: bool
    connected: bool = False
    queued: int = 0
    #: the payload bytes queued
    queued_bytes: int = 0
    #: the outbox's files on disk (database and WAL): what ``outbox_max_bytes`` bounds
    outbox_disk_bytes: int = 0
    sent: int = 0
    bytes_sent: int = 0
    #: messages the outbox's bounds dropped, by priority (0 summary .. 3 alert)
    dropped: dict[int, int] = {}
    #: what the sensors produced (the increases of their metrics): against bytes_sent, the saving
    raw_sensor_bytes: int = 0
    #: when the counters started counting (Unix time; the outbox database's creation)
    counting_since: float = 0.0
    #: where the Prometheus endpoint serves ``/metrics`` (empty: no HTTP) ...
    http: str = ""
    #: ... and, when the ``http`` setting's address could not be had, why (the metrics
    #: are then on the bus only)
    http_error: str = ""


Reply = MetricsText | UplinkState
