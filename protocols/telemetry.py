"""The telemetry channel: metric snapshots services publish on ``metrics.<service>``, and
the telemetry service's requests."""

from __future__ import annotations

import msgspec

__all__ = ["Sample", "MetricFamily", "MetricsSnapshot", "GetMetrics", "Request", "MetricsText", "Reply"]


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


class GetMetrics(msgspec.Struct, tag=True):
    """The aggregated metrics of every service, in the Prometheus text format."""


Request = GetMetrics


class MetricsText(msgspec.Struct, tag=True):
    text: str


Reply = MetricsText
