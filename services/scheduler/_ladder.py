"""The degradation ladder: level 0 runs the full model, 1 the manifest's smaller variant,
2 its rule-based fallback (computed in the scheduler with the numba ops, no ONNX Runtime).

Once per interval: under pressure (the drivers are hot, or too many requests are queued)
the ladder steps down one level; when the pressure is gone (cool again, and the queues
below half the overload depth) it climbs back one level.  Between the two it holds.
"""

from __future__ import annotations

import numpy as np

from protocols.modelstore import Manifest
from services import BadMessage

__all__ = ["Ladder", "Step", "variant_for", "fallback", "SMALLER", "TOP"]

#: the lowest level
TOP = 2
#: variant names that count as "smaller", in order of preference
SMALLER = ("small", "int8")


class Step:
    """A move of the ladder."""

    __slots__ = ("level", "previous", "reason")

    def __init__(self, level: int, previous: int, reason: str) -> None:
        self.level, self.previous, self.reason = level, previous, reason

    def __repr__(self) -> str:
        return f"Step({self.previous} -> {self.level}: {self.reason})"


class Ladder:
    def __init__(self, hot_c: float, cool_c: float, overload_depth: int) -> None:
        self.hot_c, self.cool_c, self.overload_depth = hot_c, cool_c, overload_depth
        self.level = 0
        #: why it is under pressure now ("" when it is not)
        self.pressure = ""

    def step(self, temperature: float | None, depth: int) -> Step | None:
        """One interval, given the drivers' temperature (None: not known to be hot) and the
        requests queued in all.  Returns the move, if the level changes."""
        reasons = []
        if temperature is not None and temperature >= self.hot_c:
            reasons.append(f"temperature {temperature:.0f} °C >= {self.hot_c:.0f}")
        if depth >= self.overload_depth:
            reasons.append(f"{depth} requests queued >= {self.overload_depth}")
        self.pressure = "; ".join(reasons)
        calm = (temperature is None or temperature <= self.cool_c) and depth < self.overload_depth // 2
        if reasons and self.level < TOP:
            return self._move(self.level + 1, self.pressure)
        if calm and self.level > 0:
            return self._move(self.level - 1, "pressure ended")
        return None

    def _move(self, level: int, reason: str) -> Step:
        step = Step(level, self.level, reason)
        self.level = level
        return step


def variant_for(manifest: Manifest | None, level: int) -> str:
    """What runs at ``level``: "full", a smaller variant the manifest has, or "fallback"
    (only when the manifest declares one); a level the manifest cannot honour runs the
    next better thing it has."""
    if manifest is None:
        return "full"
    if level >= 2 and manifest.fallback is not None:
        return "fallback"
    if level >= 1:
        for smaller in SMALLER:
            if smaller in manifest.variants:
                return smaller
    return "full"


def fallback(manifest: Manifest, x: np.ndarray) -> list[np.ndarray]:
    """The manifest's rule on a batch of inputs: its pre ops (the numba kernels, imported
    only here) give the features, the rule thresholds one of them."""
    rule = manifest.fallback
    if rule is None:
        raise ValueError(f"{manifest.name} {manifest.version} declares no fallback rule")
    names = list(manifest.reference)  # the features, in column order
    features = x
    if manifest.pre:
        from drivers.ops import OpsError, pipeline

        pre = pipeline([(op.op, op.params) for op in manifest.pre])
        try:  # one row of features per row of the batch, as the accelerator drivers hold it
            features = pre.rows(x)
        except OpsError as exc:
            raise BadMessage(f"{manifest.name}: input 0 does not fit the pre ops ({' -> '.join(pre.names)}): "
                             f"{exc}") from exc
    column = features[..., names.index(rule.feature)] if rule.feature in names else features[..., 0]
    out = np.where(column > rule.threshold, rule.above, rule.below).astype(np.float32)
    return [out.reshape(-1, 1)]
