"""The model store's channel."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["Install", "Activate", "Rollback", "Remove", "Split", "ListModels", "InspectModel", "GetModel",
           "Resolve", "ReportHealth", "Request", "Installed", "ModelState", "ModelList", "ModelManifest",
           "ModelBytes", "Resolved", "HealthRecorded", "Reply", "ModelEvent"]


class Install(msgspec.Struct, tag=True):
    """Install a bundle; its bytes are raw frame 0."""


class Activate(msgspec.Struct, tag=True):
    name: str
    version: str


class Rollback(msgspec.Struct, tag=True):
    name: str


class Remove(msgspec.Struct, tag=True):
    name: str
    version: str


class Split(msgspec.Struct, tag=True):
    """A/B or canary weights: {"1.2.0": 90, "1.3.0": 10}; empty: back to the active version."""

    name: str
    weights: dict[str, float]


class ListModels(msgspec.Struct, tag=True):
    pass


class InspectModel(msgspec.Struct, tag=True, omit_defaults=True):
    name: str
    version: str = ""


class GetModel(msgspec.Struct, tag=True, omit_defaults=True):
    """The model bytes (decrypted in memory) as raw frame 0: for accelerator drivers."""

    name: str
    version: str = ""
    variant: str = "full"


class Resolve(msgspec.Struct, tag=True, omit_defaults=True):
    """Which version serves this request key (sticky under a split)."""

    name: str
    key: str = ""


class ReportHealth(msgspec.Struct, tag=True, omit_defaults=True):
    """Serving health of one version since the last report (from scheduler or telemetry)."""

    name: str
    version: str
    requests: int
    errors: int = 0
    p95_ms: float = 0.0


Request = (Install | Activate | Rollback | Remove | Split | ListModels | InspectModel | GetModel | Resolve
           | ReportHealth)


class Installed(msgspec.Struct, tag=True):
    name: str
    version: str
    key_id: str
    variants: list[str]


class ModelState(msgspec.Struct, tag=True, omit_defaults=True):
    name: str
    versions: list[str]
    active: str = ""
    previous: str = ""
    #: the version in trial (it is also the active one) until its health gates commit it
    trial: str = ""
    split: dict[str, float] = {}


class ModelList(msgspec.Struct, tag=True):
    models: list[ModelState]


class ModelManifest(msgspec.Struct, tag=True):
    manifest: dict[str, Any]
    key_id: str


class ModelBytes(msgspec.Struct, tag=True):
    name: str
    version: str
    variant: str
    sha256: str
    manifest: dict[str, Any]


class Resolved(msgspec.Struct, tag=True):
    name: str
    version: str


class HealthRecorded(msgspec.Struct, tag=True, omit_defaults=True):
    name: str
    version: str
    #: "trial", "committed" or "rolled-back" when the report decided a trial
    verdict: str = ""


Reply = (Installed | ModelState | ModelList | ModelManifest | ModelBytes | Resolved | HealthRecorded)


class ModelEvent(msgspec.Struct, tag=True, omit_defaults=True):
    """On modelstore.installed|activated|committed|rolledback|removed|split."""

    name: str
    version: str = ""
    previous: str = ""
    detail: str = ""
