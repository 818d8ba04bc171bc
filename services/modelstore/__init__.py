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

__all__ = [
    "Bundle", "Fallback", "FeatureStats", "Manifest", "OpSpec", "Provenance", "Signature", "TensorSpec",
    "Variant", "parse_version",
    "BundleError", "DowngradeRefused", "ModelLoadError", "ModelStoreError", "NoSuchModel", "TamperedBundle",
    "UnknownSigner", "UnsignedBundle",
]
