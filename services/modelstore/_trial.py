"""The trial gate: whether a version in trial is committed, rolled back, or still waited on.

A trial compares the version in trial with its baseline (the version it replaced) over the
SAME windows of time: the reports (``ReportHealth``) the store receives are put in windows of
``trial_window_s`` seconds counted from the activation, one ``Sample`` per version and
window, so the two versions are compared under the same load (both serve side by side when
traffic is split between them).  ``decide`` is the rule, a pure function of the closed
windows and the trial's age: the same windows give the same decision, whatever the order
of the reports within a window (a Sample is a sum, a histogram sum and a maximum).

The rule (PROTOCOL.md 11.5), on the windows in which each version served at least
``window_min_requests`` requests (the compared windows):

1. evidence: each version served at least ``min_requests`` requests in compared windows,
   else wait;
2. errors: error rates p_t (trial) and p_b (baseline) pooled over the compared windows,
   d = p_t - p_b, se = sqrt(p_t(1-p_t)/n_t + p_b(1-p_b)/n_b), z the one-sided normal
   quantile of ``confidence``: worse when d - z*se > ``max_error_increase`` (the trial's
   error rate is higher by more than the margin, with that confidence), not worse when
   d + z*se <= ``max_error_increase``, else undecided;
3. latency: in each of the last ``windows`` compared windows, the trial's p95 against
   ``max_p95_ratio`` times the baseline's: all within it, not worse; all above it, worse;
   fewer windows or mixed, undecided;
4. worse on either: roll back; not worse on both: commit; else wait, and once the trial is
   ``max_s`` old, roll back: a version is kept on evidence, never by default.

A trial of a variant (``Activate`` with ``variant``) is the same rule on the reports about two
variants of the active version: the variant in trial against the baseline variant (the one
that served the version until then), each report counted by its ``variant``.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Literal, Sequence

import msgspec

from protocols.modelstore import ReportHealth

__all__ = ["Sample", "TrialRule", "Decision", "decide", "Trial"]


class Sample(msgspec.Struct):
    """What one version served in one window: the sum of its reports."""

    requests: int = 0
    errors: int = 0
    #: the sum of the reports' latency histograms (ReportHealth.latency_hist)
    latency_hist: dict[int, int] = {}
    #: the largest p95_ms among the reports that carry no histogram (older reporters)
    p95_max_ms: float = 0.0

    def add(self, report: ReportHealth) -> None:
        self.requests += max(report.requests, 0)
        self.errors += min(max(report.errors, 0), max(report.requests, 0))
        if report.latency_hist:
            hist = self.latency_hist
            for k, n in report.latency_hist.items():
                if n > 0:
                    hist[k] = hist.get(k, 0) + n
        elif report.requests > 0:
            self.p95_max_ms = max(self.p95_max_ms, report.p95_ms)

    def p95_ms(self) -> float:
        """The window's p95: the upper bound of the histogram bucket holding the 95th
        percentile of its requests (and at least the p95 of any report without histogram);
        0.0 when no latency was reported."""
        p95 = self.p95_max_ms
        hist = self.latency_hist
        total = sum(hist.values())
        if total:
            rank, seen = math.ceil(0.95 * total), 0
            for k in sorted(hist):
                seen += hist[k]
                if seen >= rank:
                    p95 = max(p95, ReportHealth.bucket_ms(k))
                    break
        return p95


class TrialRule(msgspec.Struct, frozen=True, kw_only=True):
    """The trial gate's parameters (the model store's settings ``trial_*``)."""

    min_requests: int = 200
    window_min_requests: int = 20
    windows: int = 3
    confidence: float = 0.95
    max_error_increase: float = 0.02
    max_p95_ratio: float = 1.2
    max_s: float = 3600.0


class Decision(msgspec.Struct, frozen=True):
    verdict: Literal["wait", "commit", "rollback"]
    #: why: the evidence for a commit or a rollback, what is missing while waiting
    reason: str


def _rate(errors: int, requests: int) -> float:
    return errors / requests if requests else 0.0


def decide(windows: Sequence[tuple[Sample, Sample]], age_s: float, rule: TrialRule, *,
           of: str = "versions") -> Decision:
    """The decision on a trial from its closed windows, oldest first, each (trial, baseline),
    and its age in seconds.  Pure: no clock, no state.  ``of``: what is compared ("versions",
    "variants"), for the reason's words."""
    compared = [(t, b) for t, b in windows
                if t.requests >= rule.window_min_requests and b.requests >= rule.window_min_requests]
    n_t = sum(t.requests for t, _ in compared)
    n_b = sum(b.requests for _, b in compared)
    worse: list[str] = []
    fine: list[str] = []
    waiting: list[str] = []
    if n_t < rule.min_requests or n_b < rule.min_requests:
        waiting.append(f"{n_t} requests of the trial and {n_b} of the baseline in {len(compared)} windows where "
                       f"both served at least {rule.window_min_requests}; it needs {rule.min_requests} of each")
        if not any(b.requests for _, b in windows) and any(t.requests for t, _ in windows):
            waiting.append(f"the baseline served nothing beside the trial: a trial compares the two {of} "
                           "serving side by side (split traffic between them)")
    else:
        p_t = _rate(sum(t.errors for t, _ in compared), n_t)
        p_b = _rate(sum(b.errors for _, b in compared), n_b)
        d = p_t - p_b
        se = math.sqrt(p_t * (1 - p_t) / n_t + p_b * (1 - p_b) / n_b)
        z = NormalDist().inv_cdf(rule.confidence)
        errors = f"error rate {p_t:.2%} of {n_t} requests against {p_b:.2%} of {n_b}"
        if d - z * se > rule.max_error_increase:
            worse.append(f"{errors}: higher by more than {rule.max_error_increase:.2%} "
                         f"(confidence {rule.confidence:g})")
        elif d + z * se <= rule.max_error_increase:
            fine.append(errors)
        else:
            waiting.append(f"{errors}: not yet known to be within {rule.max_error_increase:.2%} "
                           f"(confidence {rule.confidence:g})")
        last = compared[-rule.windows:]
        if len(last) < rule.windows:
            waiting.append(f"p95 compared in {len(last)} windows; it needs {rule.windows}")
        else:
            p95s = [(t.p95_ms(), b.p95_ms()) for t, b in last]
            over = [(pt, pb) for pt, pb in p95s if pt and pb and pt > rule.max_p95_ratio * pb]
            pt, pb = max(p95s, key=lambda p: p[0] / p[1] if p[0] and p[1] else 0.0)
            latency = f"p95 {pt:.1f} ms against {pb:.1f} ms"
            if len(over) == len(last):
                worse.append(f"{latency}: above {rule.max_p95_ratio:g}x the baseline's in each of the last "
                             f"{len(last)} windows")
            elif not over:
                fine.append(f"{latency} (the highest ratio of the last {len(last)} windows, within "
                            f"{rule.max_p95_ratio:g}x)")
            else:
                waiting.append(f"p95 above {rule.max_p95_ratio:g}x the baseline's in {len(over)} of the last "
                               f"{len(last)} windows")
    if worse:
        return Decision("rollback", "; ".join(worse))
    if not waiting:
        return Decision("commit", "; ".join(fine))
    if age_s >= rule.max_s:
        return Decision("rollback", f"undecided after {age_s:.0f} s: " + "; ".join(waiting))
    return Decision("wait", "; ".join(waiting))


class Trial:
    """A trial's windows: each report about the version in trial or its baseline is added to
    the window of its arrival time (``now``, the store's monotonic clock).

    A trial of a variant (``variant`` set; ``version`` and ``baseline`` are then the same
    version) counts the reports about ``variant`` of that version against those about
    ``baseline_variant``; reports about the version as a whole (no variant) are not counted.
    A trial of a version counts every report about either version, whatever its variant."""

    def __init__(self, version: str, baseline: str, started: float, window_s: float, *, variant: str = "",
                 baseline_variant: str = "") -> None:
        self.version, self.baseline, self.started, self.window_s = version, baseline, started, window_s
        self.variant, self.baseline_variant = variant, baseline_variant
        self.windows: dict[int, tuple[Sample, Sample]] = {}

    def index(self, now: float) -> int:
        return max(int((now - self.started) // self.window_s), 0)

    def side(self, report: ReportHealth) -> int | None:
        """0 for a report about the trial, 1 about the baseline, None about neither."""
        if self.variant:
            if report.version != self.version or not report.variant:
                return None
            return 0 if report.variant == self.variant else 1 if report.variant == self.baseline_variant else None
        return 0 if report.version == self.version else 1 if report.version == self.baseline else None

    def add(self, report: ReportHealth, now: float) -> bool:
        """Count the report; False when it is about neither version (variant)."""
        side = self.side(report)
        if side is None:
            return False
        pair = self.windows.setdefault(self.index(now), (Sample(), Sample()))
        pair[side].add(report)
        return True

    def closed(self, now: float) -> list[tuple[Sample, Sample]]:
        """The windows that ended before ``now``, oldest first."""
        current = self.index(now)
        return [self.windows[i] for i in sorted(self.windows) if i < current]

    def decide(self, now: float, rule: TrialRule) -> Decision:
        return decide(self.closed(now), now - self.started, rule, of="variants" if self.variant else "versions")
