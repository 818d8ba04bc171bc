"""The model store's settings: ``[services.modelstore.settings]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

from services import Settings

from ._trial import TrialRule

__all__ = ["ModelStoreSettings"]


class ModelStoreSettings(Settings):
    #: versions of a model kept when a new one is installed (the active, previous and split
    #: ones are always kept)
    keep: Annotated[int, msgspec.Meta(ge=1)] = 3
    #: the trial gate (PROTOCOL.md 11.5): a version in trial is compared with the version it
    #: replaced over the same windows of this many seconds,
    trial_window_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: in the windows where each served at least this many requests,
    trial_window_min_requests: Annotated[int, msgspec.Meta(ge=1)] = 20
    #: once each has served this many requests in such windows;
    trial_min_requests: Annotated[int, msgspec.Meta(ge=1)] = 200
    #: its error rate may exceed the baseline's by at most this (a fraction: 0.02 is 2 points),
    trial_max_error_increase: Annotated[float, msgspec.Meta(ge=0)] = 0.02
    #: as a one-sided two-proportion z-test shows with this confidence;
    trial_confidence: Annotated[float, msgspec.Meta(ge=0.5, lt=1)] = 0.95
    #: its p95 latency may be at most this times the baseline's,
    trial_max_p95_ratio: Annotated[float, msgspec.Meta(gt=0)] = 1.2
    #: in each of this many consecutive compared windows (above it in each: it fails);
    trial_windows: Annotated[int, msgspec.Meta(ge=1)] = 3
    #: a trial still undecided after this many seconds is rolled back
    trial_max_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    #: a directory whose ``*.ebm`` bundles are installed and activated at start, for each
    #: model the store holds no version of (relative: to the config file's directory)
    preload: Path | None = None
    #: preload the demo bundles shipped with the service (the default configuration does)
    preload_demo: bool = False

    def __post_init__(self) -> None:
        if self.trial_max_s <= self.trial_window_s:
            raise ValueError(f"trial_max_s ({self.trial_max_s:g}) must exceed trial_window_s "
                             f"({self.trial_window_s:g}): a trial decides on windows that have ended")

    def trial_rule(self) -> TrialRule:
        return TrialRule(min_requests=self.trial_min_requests, window_min_requests=self.trial_window_min_requests,
                         windows=self.trial_windows, confidence=self.trial_confidence,
                         max_error_increase=self.trial_max_error_increase, max_p95_ratio=self.trial_max_p95_ratio,
                         max_s=self.trial_max_s)
