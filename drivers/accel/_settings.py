"""An accelerator driver's settings: ``[services.<name>.settings]``."""

from __future__ import annotations

from typing import Annotated

import msgspec

from services import Settings

__all__ = ["AccelSettings"]


class AccelSettings(Settings):
    #: ONNX Runtime execution providers to use, in order of preference (those
    #: ``onnxruntime.get_available_providers()`` lacks are skipped with a warning); empty: CPU
    providers: list[str] = []
    #: ``intra_op_num_threads`` of each session; 0: half the CPUs
    threads: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: run every pre/post op once before serving, so that numba's compilation (seconds per
    #: op with a cold cache) is not paid by the first requests
    warm_ops: bool = True
    #: clients' shared-memory regions kept open at once, in MiB (least recently used closed)
    max_region_mb: Annotated[float, msgspec.Meta(gt=0)] = 512.0
