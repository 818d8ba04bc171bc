"""The model store (``python -m services.modelstore``): signed, encrypted, versioned model
bundles with atomic activation, trial and rollback, and A/B splits."""

from ._bundle import (
    Bundle,
    Fallback,
    FeatureStats,
    Manifest,
    OpSpec,
    Provenance,
    Signature,
    TensorSpec,
    Variant,
    parse_version,
)
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
    "Variant", "parse_version",
    "BundleError", "DowngradeRefused", "ModelLoadError", "ModelStoreError", "NoSuchModel", "TamperedBundle",
    "UnknownSigner", "UnsignedBundle",
]
