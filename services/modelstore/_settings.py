"""The model store's settings: ``[services.modelstore.settings]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

from services import Settings

__all__ = ["ModelStoreSettings"]


class ModelStoreSettings(Settings):
    #: versions of a model kept when a new one is installed (the active, previous and split
    #: ones are always kept)
    keep: Annotated[int, msgspec.Meta(ge=1)] = 3
    #: requests reported for a version in trial before its health gates decide
    trial_min_requests: Annotated[int, msgspec.Meta(ge=1)] = 50
    #: a trial fails when its error rate exceeds the previous version's by more than this
    #: (a fraction: 0.02 is 2 points),
    trial_max_error_increase: Annotated[float, msgspec.Meta(ge=0)] = 0.02
    #: or when its p95 latency exceeds the previous version's times this
    trial_max_p95_ratio: Annotated[float, msgspec.Meta(gt=0)] = 1.5
    #: a directory whose ``*.ebm`` bundles are installed and activated at start, for each
    #: model the store holds no version of (relative: to the config file's directory)
    preload: Path | None = None
    #: preload the demo bundles shipped with the service (the default configuration does)
    preload_demo: bool = False
