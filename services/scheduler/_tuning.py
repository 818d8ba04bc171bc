"""Batching per model: a policy from the settings, and for ``auto`` a measurement on this
device of what batching buys.

Batching is not free: on a CPU, a large image model may run a batch of 8 slower than 8 runs
of one (its working set leaves the cache, its threads already fill the cores), while a
small model runs 16 rows in little more than the time of one.  ``auto`` (the default)
measures both per model while it serves: the seconds per row of a batch of one and of
larger batches (moving averages of the driver's time on a run: pre ops, model, post ops;
not the round trip, which under load also holds the scheduler's own waits), plus the least
round trip beyond it seen (the bus hops a batch shares among its rows).  Batches form up to ``max_batch`` while
they cost less per row than a batch of one, and stay at one otherwise.  One batch in
``PROBE_EVERY`` goes the other way, so a decision follows the load and the device (a
batch of one under load; a small batch, ``PROBE_BATCH``, when it was off), never stuck on a
first guess.

The decision is a pure function of the two averages (``decide``); counting lives in
``BatchTuner``.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["BatchTuner", "decide", "PROBE_EVERY", "PROBE_BATCH", "MARGIN"]

#: one batch in this many probes the size the tuner did not choose
PROBE_EVERY = 32
#: the size of a probe batch while batching is off
PROBE_BATCH = 4
#: batching stays on while a row in a batch costs at most this share of a row alone (a clear
#: gain: the two are measured under different load, and batches add waiting)
MARGIN = 0.85
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
    compute, round_trip)`` when it has run."""

    __slots__ = ("mode", "max_batch", "max_delay", "_alone", "_batched", "_rows", "_batches", "_overhead")

    def __init__(self, mode: Mode, max_batch: int, max_delay: float = 0.0) -> None:
        self.mode = mode
        self.max_batch = max_batch
        #: seconds a batch waits for more requests once its first is there (the model's setting)
        self.max_delay = max_delay
        self._alone = _Average()
        self._batched = _Average()
        self._rows = _Average()  # rows of a batched run
        self._batches = 0
        #: the least time a run cost beyond the driver's own (the bus hops): what a batch shares
        self._overhead = float("inf")

    def _costs(self) -> tuple[float | None, float | None]:
        """Seconds per row alone and in batches, the run's overhead shared among its rows."""
        alone, batched, rows = self._alone.get(), self._batched.get(), self._rows.get()
        overhead = 0.0 if self._overhead == float("inf") else self._overhead
        return (None if alone is None else alone + overhead,
                None if batched is None or rows is None else batched + overhead / rows)

    @property
    def batching(self) -> bool | None:
        """The current decision (None while ``auto`` is still measuring)."""
        if self.mode != "auto":
            return self.mode == "on" and self.max_batch > 1
        return decide(*self._costs())

    @property
    def alone(self) -> float | None:
        """The driver's seconds for a run of one row (a moving average; None: too few yet)."""
        return self._alone.get()

    def limit(self) -> int:
        """Requests the next batch may hold."""
        if self.mode == "off" or self.max_batch == 1:
            return 1
        if self.mode == "on":
            return self.max_batch
        self._batches += 1
        probe = self._batches % PROBE_EVERY == 0
        on = self.batching
        if on is None:  # measuring: small batches as load allows; under load, every 4th alone
            return 1 if self._alone.get() is None and self._batches % 4 == 0 else \
                min(self.max_batch, 2 * PROBE_BATCH)
        if not probe:
            return self.max_batch if on else 1
        # the other way, once: alone when batching, a small batch when not (a batch of 16 of
        # a model that batches badly would cost more than the probe is worth)
        return 1 if on else min(self.max_batch, PROBE_BATCH)

    def record(self, rows: int, compute: float, round_trip: float | None = None) -> None:
        """A run of ``rows`` rows in all took the driver ``compute`` seconds (pre ops, model,
        post ops), and ``round_trip`` seconds from dispatch to results."""
        if rows <= 0 or compute <= 0:  # (measured in every mode: the inline lane reads it too)
            return
        if rows == 1:
            self._alone.add(compute)
        else:
            self._batched.add(compute / rows)
            self._rows.add(rows)
        if round_trip is not None and round_trip >= compute:
            self._overhead = min(self._overhead, round_trip - compute)

    def describe(self) -> str:
        alone, batched = self._costs()
        ms = lambda v: "?" if v is None else f"{v * 1e3:.3f} ms"  # noqa: E731
        state = {None: "measuring", True: f"up to {self.max_batch}", False: "off"}[self.batching]
        return f"{self.mode}: {state} (per row alone {ms(alone)}, batched {ms(batched)})"
