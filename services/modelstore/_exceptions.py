"""Errors of the model store and of bundle handling.

Hierarchy::

    ModelStoreError
    ├── BundleError             the file is not a readable bundle
    │   ├── BadEntry            an entry is not one a bundle may hold (name, method, layout)
    │   ├── BundleTooLarge      over a size limit (manifest, total, compression ratio, directory)
    │   ├── GraphMismatch       the manifest's inputs/outputs contradict a model's graph
    │   ├── UnsignedBundle      it carries no signature
    │   ├── TamperedBundle      a file or the manifest does not match what was signed
    │   └── UnknownSigner       the signature does not verify with any trusted key
    ├── DowngradeRefused        its version is not newer than one the store holds
    ├── ModelLoadError          ONNX Runtime cannot load the model
    └── NoSuchModel             the name or version is not in the store
"""

from __future__ import annotations

__all__ = ["ModelStoreError", "BundleError", "BadEntry", "BundleTooLarge", "GraphMismatch", "UnsignedBundle", "TamperedBundle", "UnknownSigner",
           "DowngradeRefused", "ModelLoadError", "NoSuchModel"]


class ModelStoreError(Exception):
    pass


class BundleError(ModelStoreError):
    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(f"bad bundle: {problem}")


class BadEntry(BundleError):
    """An archive entry a bundle may not hold: a name that is not exactly one of the
    manifest's files (``..``, absolute, backslash, duplicate, unlisted), an encrypted or
    unsupported entry."""


class BundleTooLarge(BundleError):
    """Over a limit the store reads bundles within: what, how much, and the limit."""


class GraphMismatch(BundleError):
    """The manifest declares inputs or outputs that a model's graph contradicts."""


class UnsignedBundle(BundleError):
    def __init__(self) -> None:
        super().__init__("it is not signed; sign it with `edgebus model sign BUNDLE --key KEY`")


class TamperedBundle(BundleError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} does not match what was signed: the bundle was altered after signing")


class UnknownSigner(BundleError):
    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        super().__init__(f"signed by key {key_id}, which is not in the trust store "
                         "(busctl trust add PUBLIC_KEY) or does not match the signature")


class DowngradeRefused(ModelStoreError):
    def __init__(self, name: str, version: str, newest: str) -> None:
        super().__init__(f"{name} {version} is not newer than {newest}, which the store already holds; "
                         "bump the version")


class ModelLoadError(ModelStoreError):
    def __init__(self, name: str, variant: str, detail: str) -> None:
        super().__init__(f"ONNX Runtime cannot load {name} ({variant}): {detail}")


class NoSuchModel(ModelStoreError):
    def __init__(self, name: str, version: str = "") -> None:
        super().__init__(f"no model {name}{' ' + version if version else ''} in the store")
