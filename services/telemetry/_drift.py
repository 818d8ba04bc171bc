"""Drift detection against a model's reference statistics (from its manifest).

Per model and version, per feature, a sliding window of the latest values is compared with
the reference every ``every`` new samples:

* PSI over the reference's bins (warn at 0.1, alert at 0.2 by default, as Evidently and
  most practice use): sum (p - q) * ln(p / q) with both shares floored at 1e-4;
* the Kolmogorov-Smirnov statistic against the reference CDF (piecewise linear over the
  bin edges), with the asymptotic p-value, and a Bonferroni correction over the features
  (a feature moved if p < alpha / features).

A feature is at the alert level when its PSI reaches the alert threshold or its KS test
rejects; drift is reported (an event naming the features that moved) when a feature stays
there two evaluations in a row, which keeps single-window flukes out; warnings only show in
the metrics.
"""

from __future__ import annotations

import math
from collections import deque

import msgspec
import numpy as np

__all__ = ["DriftDetector", "FeatureDrift", "psi", "ks_statistic", "ks_pvalue"]


class FeatureDrift(msgspec.Struct, omit_defaults=True):
    feature: str
    psi: float
    ks: float
    p_value: float
    #: ok | warn | alert
    level: str = "ok"


def psi(reference: np.ndarray, observed: np.ndarray, floor: float = 1e-4) -> float:
    p = np.maximum(observed, floor)
    q = np.maximum(reference, floor)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((p - q) * np.log(p / q)))


def ks_statistic(values: np.ndarray, edges: np.ndarray, proportions: np.ndarray) -> float:
    """sup |F_n - F_ref|, F_ref linear inside each reference bin."""
    cdf_edges = np.concatenate([[0.0], np.cumsum(proportions)])
    x = np.sort(values)
    ref = np.interp(x, edges, cdf_edges, left=0.0, right=1.0)
    n = len(x)
    empirical_hi = np.arange(1, n + 1) / n
    empirical_lo = np.arange(0, n) / n
    return float(max(np.max(np.abs(empirical_hi - ref)), np.max(np.abs(ref - empirical_lo))))


def ks_pvalue(d: float, n: int) -> float:
    """Asymptotic one-sample KS p-value (Kolmogorov distribution, Stephens' correction)."""
    if n <= 0:
        return 1.0
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    if lam < 0.2:
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return float(min(max(2 * total, 0.0), 1.0))


class _Feature:
    def __init__(self, name: str, edges: list[float], proportions: list[float], count: int, window: int) -> None:
        self.name = name
        self.edges = np.asarray(edges, dtype=np.float64)
        self.proportions = np.asarray(proportions, dtype=np.float64)
        self.count = count
        self.values: deque[float] = deque(maxlen=window)
        #: consecutive windows at the alert level
        self.streak = 0

    def evaluate(self, warn: float, alert: float, alpha: float) -> FeatureDrift:
        x = np.fromiter(self.values, dtype=np.float64)
        inner = np.clip(x, self.edges[0], self.edges[-1])  # out-of-range values count in the end bins
        counts, _ = np.histogram(inner, bins=self.edges)
        observed = counts / max(len(x), 1)
        value = psi(self.proportions, observed)
        d = ks_statistic(x, self.edges, self.proportions)
        n = len(x)
        # the reference is a sample too: a two-sample test's effective size
        n_eff = n * self.count // (n + self.count) if self.count else n
        p = ks_pvalue(d, n_eff)
        level = "alert" if value >= alert or p < alpha else ("warn" if value >= warn else "ok")
        return FeatureDrift(feature=self.name, psi=round(value, 4), ks=round(d, 4), p_value=p, level=level)


class DriftDetector:
    """One model version's detector: feed feature rows, get a verdict every ``every`` rows."""

    def __init__(self, reference: dict, *, window: int = 200, every: int = 50, warn: float = 0.1,
                 alert: float = 0.2, alpha: float = 0.01) -> None:
        self.features = [_Feature(name, stats["bins"], stats["proportions"], int(stats.get("count", 0)), window)
                         for name, stats in reference.items() if stats.get("bins") and stats.get("proportions")]
        self.window, self.every = window, every
        self.warn, self.alert = warn, alert
        #: Bonferroni over the features
        self.alpha = alpha / max(len(self.features), 1)
        self.pending = 0
        self.windows = 0
        self.last: list[FeatureDrift] = []

    def add(self, rows: np.ndarray) -> list[FeatureDrift] | None:
        """Add feature rows [N, features]; returns the features that moved when a window
        is evaluated and something moved, else None."""
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
        moved: list[FeatureDrift] | None = None
        for row in rows:
            for feature, value in zip(self.features, row):
                feature.values.append(float(value))
            self.pending += 1
            if self.pending >= self.every and len(self.features[0].values) >= self.window:
                self.pending = 0
                self.windows += 1
                self.last = [f.evaluate(self.warn, self.alert, self.alpha) for f in self.features]
                for feature, result in zip(self.features, self.last):
                    feature.streak = feature.streak + 1 if result.level == "alert" else 0
                # drift is reported when a feature stays at the alert level two windows in a row
                alerts = [r for f, r in zip(self.features, self.last) if f.streak >= 2]
                if alerts:
                    moved = alerts
        return moved
