"""The Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

from protocols.telemetry import MetricFamily

__all__ = ["render"]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render(families_by_service: dict[str, list[MetricFamily]]) -> str:
    """One family per metric name across services, each sample labelled with its service."""
    merged: dict[str, tuple[MetricFamily, list[tuple[str, object]]]] = {}
    for service, families in sorted(families_by_service.items()):
        for family in families:
            entry = merged.setdefault(family.name, (family, []))
            entry[1].extend((service, s) for s in family.samples)
    lines = []
    for name, (family, samples) in sorted(merged.items()):
        exposed = name + "_total" if family.kind == "counter" else name  # counters are exposed as *_total
        lines.append(f"# HELP {exposed} {_escape(family.help)}")
        lines.append(f"# TYPE {exposed} {family.kind}")
        for service, sample in samples:
            labels = {"service": service, **sample.labels}  # type: ignore[attr-defined]
            text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            lines.append(f"{sample.name}{{{text}}} {_number(sample.value)}")  # type: ignore[attr-defined]
    return "\n".join(lines) + "\n"
