"""The sensor channel: what sensor drivers publish on ``sensor.<name>``."""

from __future__ import annotations

import msgspec

from ._messages import Tensor

__all__ = ["SensorFrame"]


class SensorFrame(msgspec.Struct, tag=True, omit_defaults=True):
    """One frame: the samples are raw frame 0, described by ``tensor``."""

    seq: int
    time: float
    sample_rate: float
    tensor: Tensor
    #: ground truth, for demos and tests of the simulated sensor
    fault: float = 0.0
