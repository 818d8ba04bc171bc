"""Batching per model: a policy from the settings, and for ``auto`` a measurement on this
device of what batching buys.

Batching is not free: on a CPU, a large image model may run a batch of 8 slower than 8 runs
of one (its working set leaves the cache, its threads already fill the cores), while a
small model runs 16 rows in little more than the time of one.  ``auto`` (the default)
measures both per model while it serves: the seconds per row of a batch of one and of
larger batches (moving averages of the time a batch takes from dispatch to results, the
bus hops included: what throughput depends on).  Batches form up to ``max_batch`` while
they cost less per row than a batch of one, and stay at one otherwise.  One batch in
``PROBE_EVERY`` goes the other way, so a decision follows the load and the device (a
batch of one under load; a larger batch when it was off), never stuck on a first guess.

The decision is a pure function of the two averages (``decide``); counting lives in
``BatchTuner``.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["BatchTuner", "decide", "PROBE_EVERY", "MARGIN"]

#: one batch in this many probes the size the tuner did not choose
PROBE_EVERY = 32
#: batching stays on while a row in a batch costs at most this share of a row alone
MARGIN = 0.95
#: samples of each kind before the first decision
MIN_SAMPLES = 3

Mode = Literal["auto", "on", "off"]


def decide(alone: float | None, batched: float | None) -> bool | None:
    """Whether to batch, from the seconds per row alone and in batches (None: unknown yet)."""
    if alone is None or batched is None:
        return None
    return batched <= alone * MARGIN


class _Average:
    __slots__ = ("value", "count")

    def __init__(self) -> None:
        self.value = 0.0
        self.count = 0

    def add(self, x: float) -> None:
        self.count += 1
        self.value = x if self.count == 1 else 0.8 * self.value + 0.2 * x

    def get(self) -> float | None:
        return self.value if self.count >= MIN_SAMPLES else None


class BatchTuner:
    """The batch limit of one model: ``limit()`` before forming a batch, ``record(rows,
    seconds)`` when it has run."""

    __slots__ = ("mode", "max_batch", "_alone", "_batched", "_batches")

    def __init__(self, mode: Mode, max_batch: int) -> None:
        self.mode = mode
        self.max_batch = max_batch
        self._alone = _Average()
        self._batched = _Average()
        self._batches = 0

    @property
    def batching(self) -> bool | None:
        """The current decision (None while ``auto`` is still measuring)."""
        if self.mode != "auto":
            return self.mode == "on" and self.max_batch > 1
        return decide(self._alone.get(), self._batched.get())

    def limit(self) -> int:
        """Requests the next batch may hold."""
        if self.mode == "off" or self.max_batch == 1:
            return 1
        if self.mode == "on":
            return self.max_batch
        self._batches += 1
        probe = self._batches % PROBE_EVERY == 0
        on = self.batching
        if on is None:  # measuring: batch as load allows; under load, every 4th batch alone
            return 1 if self._alone.get() is None and self._batches % 4 == 0 else self.max_batch
        return (1 if on else self.max_batch) if probe else (self.max_batch if on else 1)

    def record(self, rows: int, seconds: float) -> None:
        """A batch of ``rows`` rows in all took ``seconds`` (a row alone, or a batch)."""
        if rows <= 0 or self.mode != "auto":
            return
        (self._alone if rows == 1 else self._batched).add(seconds / rows)

    def describe(self) -> str:
        alone, batched = self._alone.get(), self._batched.get()
        ms = lambda v: "?" if v is None else f"{v * 1e3:.3f} ms"  # noqa: E731
        state = {None: "measuring", True: f"up to {self.max_batch}", False: "off"}[self.batching]
        return f"{self.mode}: {state} (per row alone {ms(alone)}, batched {ms(batched)})"
