"""Metrics every service keeps: counters, gauges, histograms, in Prometheus' model.

The SDK counts requests and their latency per type, and the process's CPU time and RSS;
a service adds its own (``self.metrics.histogram(...)``).  Every interval the SDK
publishes a snapshot on ``metrics.<service>`` (a topic each service may always publish
its own metrics on); the telemetry service aggregates them and serves ``/metrics``.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from typing import Iterable

from protocols.telemetry import MetricFamily, Sample

__all__ = ["Metrics", "Counter", "Gauge", "Histogram", "DEFAULT_BUCKETS"]

DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _Family:
    kind = ""

    def __init__(self, name: str, help: str, labels: Iterable[str]) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)

    def _key(self, values: tuple[str, ...]) -> tuple[str, ...]:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {values}")
        return values


class Counter(_Family):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, value: float = 1.0) -> None:
        values = self.values
        if labels in values:  # (checked when first seen: one dict update per call after that)
            values[labels] += value
        else:
            values[self._key(labels)] = value

    def samples(self) -> list[Sample]:
        return [Sample(name=self.name + "_total", labels=dict(zip(self.labels, k)), value=v)
                for k, v in self.values.items()]


class Gauge(_Family):
    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def set(self, value: float, *labels: str) -> None:
        self.values[self._key(labels)] = float(value)

    def samples(self) -> list[Sample]:
        return [Sample(name=self.name, labels=dict(zip(self.labels, k)), value=v) for k, v in self.values.items()]


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (), buckets: Iterable[float] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self.values: dict[tuple[str, ...], list[float]] = {}  # counts per bucket, +Inf, sum

    def observe(self, value: float, *labels: str) -> None:
        counts = self.values.get(labels)
        if counts is None:
            counts = self.values[self._key(labels)] = [0.0] * (len(self.buckets) + 2)
        counts[bisect_left(self.buckets, value)] += 1
        counts[-1] += value

    def samples(self) -> list[Sample]:
        out = []
        for key, counts in self.values.items():
            labels = dict(zip(self.labels, key))
            cumulative = 0.0
            for bound, n in zip((*self.buckets, float("inf")), counts[:-1]):
                cumulative += n
                out.append(Sample(name=self.name + "_bucket", labels={**labels, "le": _fmt(bound)}, value=cumulative))
            out.append(Sample(name=self.name + "_count", labels=labels, value=cumulative))
            out.append(Sample(name=self.name + "_sum", labels=labels, value=counts[-1]))
        return out


def _fmt(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class Metrics:
    """One registry per process, created by the SDK."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}
        self.requests = self.counter("edgebus_requests", "Requests handled, by type and outcome", ("type", "outcome"))
        self.request_seconds = self.histogram("edgebus_request_seconds", "Time to answer a request", ("type",))
        self.cpu = self.gauge("process_cpu_seconds", "CPU time used by this process (user+system)")
        self.rss = self.gauge("process_resident_memory_bytes", "Resident memory of this process")

    def _add(self, family: _Family) -> _Family:
        existing = self._families.get(family.name)
        if existing is not None:
            if type(existing) is not type(family) or existing.labels != family.labels:
                raise ValueError(f"metric {family.name} already exists as a {existing.kind} with labels {existing.labels}")
            return existing
        self._families[family.name] = family
        return family

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        return self._add(Counter(name, help, labels))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Gauge:
        return self._add(Gauge(name, help, labels))  # type: ignore[return-value]

    def histogram(self, name: str, help: str, labels: Iterable[str] = (),
                  buckets: Iterable[float] = DEFAULT_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help, labels, buckets))  # type: ignore[return-value]

    def snapshot(self) -> list[MetricFamily]:
        self._sample_process()
        return [MetricFamily(name=f.name, kind=f.kind, help=f.help, samples=f.samples())
                for f in self._families.values()]

    def _sample_process(self) -> None:
        try:
            fields = open("/proc/self/stat").read().rsplit(") ", 1)[1].split()
            self.cpu.set((int(fields[11]) + int(fields[12])) / _TICKS)
            self.rss.set(int(open("/proc/self/statm").read().split()[1]) * _PAGE)
        except (OSError, IndexError, ValueError):
            pass

