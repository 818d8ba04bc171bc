"""The model store (``python -m services.modelstore``): signed, encrypted, versioned model
bundles with atomic activation, trial and rollback, and A/B splits.

The manifest types are the wire types of ``protocols.modelstore``, re-exported here for
the bundle API's users."""

from protocols.modelstore import (
    Asset,
    Fallback,
    FeatureStats,
    Manifest,
    ManifestError,
    OpSpec,
    Provenance,
    TensorSpec,
    Variant,
    parse_version,
    pick_version,
)

from ._bundle import LIMITS, Bundle, Graph, Limits, Signature, check_graph, read_graph
from ._exceptions import (
    BundleError,
    DowngradeRefused,
    ModelLoadError,
    ModelStoreError,
    NoSuchModel,
    TamperedBundle,
    UnknownSigner,
    UnsignedBundle,
)
from ._service import ModelStoreService
from ._settings import ModelStoreSettings

__all__ = [
    "ModelStoreService", "ModelStoreSettings",
    "Bundle", "Graph", "read_graph", "check_graph", "Limits", "LIMITS", "Asset", "Fallback", "FeatureStats", "Manifest", "OpSpec", "Provenance", "Signature", "TensorSpec",
    "Variant", "ManifestError", "parse_version", "pick_version",
    "BundleError", "DowngradeRefused", "ModelLoadError", "ModelStoreError", "NoSuchModel", "TamperedBundle",
    "UnknownSigner", "UnsignedBundle",
]
