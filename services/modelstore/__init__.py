"""The model store (``python -m services.modelstore``): signed, encrypted, versioned model
bundles with atomic activation, trial and rollback, and A/B splits.

The manifest types are the wire types of ``protocols.modelstore``, re-exported here for
the bundle API's users."""

from protocols.modelstore import (
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

from ._bundle import Bundle, Signature
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
    "Bundle", "Fallback", "FeatureStats", "Manifest", "OpSpec", "Provenance", "Signature", "TensorSpec",
    "Variant", "ManifestError", "parse_version", "pick_version",
    "BundleError", "DowngradeRefused", "ModelLoadError", "ModelStoreError", "NoSuchModel", "TamperedBundle",
    "UnknownSigner", "UnsignedBundle",
]
