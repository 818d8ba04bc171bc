"""Drift detection against a model's reference statistics (from its manifest).

Per model and version, per feature, a sliding window of the latest values is compared with
the reference every ``every`` new samples:

* PSI over the reference's bins (warn at 0.1, alert at 0.2 by default, as Evidently and
  most practice use): sum (p - q) * ln(p / q) with both shares floored at 1e-4; a window
  of n rows against a reference of N has a PSI of about (1/n + 1/N) * chi2(bins - 1) with
  no drift at all, so neither threshold is taken below that noise's (Bonferroni-corrected)
  ``alpha`` quantile: with 10 bins, 200 rows and 7 features, 0.15;
* the Kolmogorov-Smirnov statistic against the reference CDF (piecewise linear over the
  bin edges), with the asymptotic p-value, and a Bonferroni correction over the features
  (a feature moved if p < alpha / features).

A window puts a feature at the alert level when its PSI reaches the alert threshold or its
KS test rejects, at the warn level when its PSI reaches the warn threshold.  A feature's
level changes only when two evaluations in a row agree (both above it: up to the lower of
the two; both below it: down to the higher of the two), which keeps single-window flukes
out; a model version's level is its features' highest.

Events follow the level, not the windows (``DriftAlarm``): one when it changes (entering
warn or alert, and a clear when it is back to ok), and while it stays at warn or alert a
reminder at most every ``repeat`` seconds.
"""

from __future__ import annotations

import math
from collections import deque
from statistics import NormalDist

import msgspec
import numpy as np

__all__ = ["DriftDetector", "DriftAlarm", "FeatureDrift", "LEVELS", "psi", "ks_statistic", "ks_pvalue"]

#: drift levels, in order
LEVELS = ("ok", "warn", "alert")


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


def chi2_quantile(p: float, k: int) -> float:
    """The p-quantile of chi-square with k degrees of freedom (Wilson-Hilferty)."""
    z = NormalDist().inv_cdf(p)
    return k * max(1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k)), 0.0) ** 3


class _Feature:
    def __init__(self, name: str, edges: list[float], proportions: list[float], count: int, window: int,
                 persist: int = 2) -> None:
        self.name = name
        self.edges = np.asarray(edges, dtype=np.float64)
        self.proportions = np.asarray(proportions, dtype=np.float64)
        self.count = count
        self.window = window
        self.values: deque[float] = deque(maxlen=window)
        #: the level (an index into LEVELS), and the latest windows' (as many as it takes
        #: to see a whole window of new rows, two at least)
        self.level = 0
        self.recent: deque[int] = deque(maxlen=persist)

    def settle(self, window_level: int) -> None:
        """Move the level when the recent windows all agree on a side of it."""
        self.recent.append(window_level)
        if len(self.recent) < (self.recent.maxlen or 1):
            return
        low, high = min(self.recent), max(self.recent)
        if low > self.level:
            self.level = low
        elif high < self.level:
            self.level = high

    def noise(self, alpha: float) -> float:
        """The PSI a full window reaches with probability ``alpha`` without any drift."""
        bins = len(self.proportions)
        if bins < 2:
            return 0.0
        return (1 / self.window + (1 / self.count if self.count else 0.0)) * chi2_quantile(1 - alpha, bins - 1)

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
        floor = self.noise(alpha)
        level = "alert" if value >= max(alert, floor) or p < alpha else ("warn" if value >= max(warn, floor) else "ok")
        return FeatureDrift(feature=self.name, psi=round(value, 4), ks=round(d, 4), p_value=p, level=level)


class DriftDetector:
    """One model version's detector: feed feature rows, get a verdict every ``every`` rows."""

    def __init__(self, reference: dict, *, window: int = 200, every: int = 50, warn: float = 0.1,
                 alert: float = 0.2, alpha: float = 0.01) -> None:
        #: windows that must agree before a level changes: a whole window of new rows, two at least
        self.persist = max(2, math.ceil(window / every))
        self.features = [_Feature(name, stats["bins"], stats["proportions"], int(stats.get("count", 0)), window,
                                  self.persist)
                         for name, stats in reference.items() if stats.get("bins") and stats.get("proportions")]
        self.window, self.every = window, every
        self.warn, self.alert = warn, alert
        #: Bonferroni over the features
        self.alpha = alpha / max(len(self.features), 1)
        self.pending = 0
        self.windows = 0
        self.last: list[FeatureDrift] = []

    def add(self, rows: np.ndarray) -> list[FeatureDrift] | None:
        """Add feature rows [N, features]; when a window is evaluated and features are at the
        alert level, returns them, else None."""
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
                    feature.settle(LEVELS.index(result.level))
                alerts = [r for f, r in zip(self.features, self.last) if f.level == 2]
                moved = alerts or None
        return moved

    @property
    def level(self) -> str:
        """The model version's level: its features' highest."""
        return LEVELS[max((f.level for f in self.features), default=0)]

    def at_level(self) -> list[FeatureDrift]:
        """The latest window's results of the features at warn or alert, with their level."""
        return [msgspec.structs.replace(r, level=LEVELS[f.level]) for f, r in zip(self.features, self.last) if f.level]


class DriftAlarm:
    """Events from a level that is re-evaluated every window: on a change (``raise`` when it
    goes to warn or alert, ``clear`` back to ok), and ``repeat`` at most every ``repeat``
    seconds while it stays at warn or alert."""

    def __init__(self, repeat: float) -> None:
        self.repeat = repeat
        self.level = "ok"
        self.since = 0.0
        self._last = -math.inf

    def update(self, level: str, now: float) -> tuple[str, str] | None:
        """The new level after a window; returns (what, previous level) when an event is
        due: what is raise, clear or repeat."""
        previous = self.level
        if level != previous:
            self.level, self.since, self._last = level, now, now
            return ("clear" if level == "ok" else "raise"), previous
        if level != "ok" and now - self._last >= self.repeat:
            self._last = now
            return "repeat", previous
        return None
