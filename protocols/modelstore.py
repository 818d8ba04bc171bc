"""The model store's channel, and the model manifest: the contract of a model bundle.

The manifest is a wire type: the model store keeps it, the scheduler, the accelerator
drivers and telemetry read it (``InspectModel``, ``GetModel``), the offline tools write
it.  Like every message it tolerates fields it does not know (a newer device's manifest
still decodes on an older one) and is strict on the types of the fields it knows.  A
bundle's signature covers the exact bytes of its ``manifest.json``, so a manifest read
from a bundle is never re-encoded for verification.

``pick_version`` is the A/B rule, shared by the store (``Resolve``) and the scheduler: a
pure function of the model, the request key and the split's weights.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import msgspec

__all__ = ["Install", "Activate", "Rollback", "Remove", "Split", "ListModels", "InspectModel", "GetModel",
           "Resolve", "ReportHealth", "Request", "Installed", "ModelState", "ModelList", "ModelManifest",
           "ModelBytes", "Resolved", "HealthRecorded", "Reply", "ModelEvent",
           "Manifest", "TensorSpec", "OpSpec", "Variant", "Fallback", "FeatureStats", "Provenance",
           "ManifestError", "parse_version", "pick_version"]


# -- the manifest ------------------------------------------------------------------------------

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class ManifestError(ValueError):
    """A manifest that decodes but breaks a rule (name, version, variants)."""


def parse_version(version: str) -> tuple[int, int, int, tuple[Any, ...]]:
    """Semantic version as a sortable key (a pre-release sorts before its release).

    Raises ManifestError for a version that is not MAJOR.MINOR.PATCH[-pre][+build]."""
    m = _SEMVER.match(version)
    if not m:
        raise ManifestError(f"version {version!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    pre = m.group(4)
    pre_key: tuple[Any, ...] = (1,) if pre is None else (0, *((0, int(p)) if p.isdigit() else (1, p)
                                                            for p in pre.split(".")))
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), pre_key


class TensorSpec(msgspec.Struct, omit_defaults=True):
    """A named input or output of the model graph."""

    name: str
    #: numpy's name of the element type: "float32", "int64", "uint8"...
    dtype: str
    #: one entry per axis: its size, or None for a dynamic one (the batch axis)
    shape: list[int | None]


class OpSpec(msgspec.Struct, omit_defaults=True):
    """A pre- or post-processing op (a numba kernel in drivers/, by name) and its parameters.

    The parameters are JSON values; each op's registry entry checks them when the chain is
    built (at install and load), so they stay untyped here."""

    op: str
    params: dict[str, Any] = {}


class Variant(msgspec.Struct, omit_defaults=True):
    """One model file of the bundle; the signature covers it through ``sha256`` and ``size``."""

    file: str
    sha256: str
    size: int
    #: e.g. "int8 dynamic quantisation of full"
    description: str = ""


class Fallback(msgspec.Struct, omit_defaults=True):
    """The rule-based path used when no model can run: a threshold on one input feature
    (named as in ``reference``, whose keys are the features in column order)."""

    feature: str
    threshold: float
    #: output when feature > threshold, and otherwise
    above: float = 1
    below: float = 0


class FeatureStats(msgspec.Struct, omit_defaults=True):
    """Reference statistics of one input or output feature, for drift detection."""

    mean: float
    std: float
    #: Histogram bin edges and reference proportions (for PSI).
    bins: list[float] = []
    proportions: list[float] = []
    #: how many samples the statistics come from (the KS test treats it as a two-sample test)
    count: int = 0


class Provenance(msgspec.Struct, omit_defaults=True):
    training_data_sha256: str = ""
    source_revision: str = ""
    tools: dict[str, str] = {}


class Manifest(msgspec.Struct, omit_defaults=True):
    """A model bundle's ``manifest.json``.  The field order is the encoding's: changing it
    changes the bytes new bundles sign (old bundles keep theirs)."""

    name: str
    version: str
    created: float
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    #: by variant name: "full" always; "small", "int8"... for the degradation ladder
    variants: dict[str, Variant]
    author: str = ""
    description: str = ""
    pre: list[OpSpec] = []
    post: list[OpSpec] = []
    fallback: Fallback | None = None
    #: by feature name, in the column order of the model's input features
    reference: dict[str, FeatureStats] = {}
    provenance: Provenance = msgspec.field(default_factory=Provenance)

    def check(self) -> None:
        """The rules beyond types; raises ManifestError naming what to fix."""
        if not _NAME.match(self.name):
            raise ManifestError(f"model name {self.name!r} must be 1-63 of a-z, 0-9, '_' and '-'")
        parse_version(self.version)
        if "full" not in self.variants:
            raise ManifestError("a bundle needs a 'full' variant")
        if self.fallback is not None and self.reference and self.fallback.feature not in self.reference:
            raise ManifestError(f"the fallback's feature {self.fallback.feature!r} is not one of the reference's "
                                f"features {list(self.reference)}")


def pick_version(name: str, key: str, weights: dict[str, float]) -> str:
    """Sticky weighted choice among a split's versions: the same key always lands on the
    same version; weights need not sum to 100 and a weight <= 0 is never picked."""
    total = sum(w for w in weights.values() if w > 0)
    point = int.from_bytes(hashlib.sha256(f"{name}\0{key}".encode()).digest()[:8], "big") / 2**64 * total
    for version in sorted(weights, key=parse_version):
        w = weights[version]
        if w <= 0:
            continue
        if point < w:
            return version
        point -= w
    return max(weights, key=parse_version)


# -- requests ----------------------------------------------------------------------------------


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
    manifest: Manifest
    key_id: str


class ModelBytes(msgspec.Struct, tag=True):
    name: str
    version: str
    variant: str
    sha256: str
    manifest: Manifest


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
