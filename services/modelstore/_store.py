"""Storage: encrypted content-addressed blobs, per-version manifests, one atomic state file.

Layout under ``<state>/modelstore/``::

    datakey.sealed              the data key, sealed by the security service (master key)
    blobs/<sha256>              model and asset files, AES-256-GCM under the data key (nonce || ct)
    models/<name>/<version>/    manifest.json + signature.json, as signed
    state.json                  active / previous / trial / split and variant state per model

Every write is write-temp, fsync, rename, fsync-directory: a crash at any instant leaves
the old or the new state.  Blobs and manifests are written before ``state.json`` refers
to them, so state never points at something missing; what a crash leaves unreferenced is
swept at start.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocols.modelstore import Manifest, parse_version
from services import atomic_write

from ._bundle import Bundle, Signature, bundle_files
from ._exceptions import ModelStoreError, NoSuchModel

__all__ = ["Store", "ModelRecord", "StoreState"]


class ModelRecord(msgspec.Struct, omit_defaults=True):
    active: str = ""
    previous: str = ""
    trial: str = ""
    split: dict[str, float] = {}
    #: the active version's variant split and variant in trial (cleared when it changes)
    variant_split: dict[str, float] = {}
    variant_trial: str = ""
    #: by version: its default variant when not "full" (kept across activations)
    default_variants: dict[str, str] = {}


class StoreState(msgspec.Struct):
    models: dict[str, ModelRecord] = {}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    def __init__(self, root: Path, data_key: bytes, fault: "callable | None" = None) -> None:  # type: ignore[valid-type]
        self.root = root
        self.blobs = root / "blobs"
        self.models_dir = root / "models"
        for d in (root, self.blobs, self.models_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._aes = AESGCM(data_key)
        self._fault = fault or (lambda point: None)
        self.state = (msgspec.json.decode((root / "state.json").read_bytes(), type=StoreState)
                      if (root / "state.json").exists() else StoreState())
        self._sweep()

    # -- reading --------------------------------------------------------------------------------

    def versions(self, name: str) -> list[str]:
        d = self.models_dir / name
        if not d.is_dir():
            return []
        found = [v.name for v in d.iterdir() if (v / "manifest.json").exists() and not v.name.endswith(".tmp")]
        return sorted(found, key=parse_version)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and self.versions(p.name))

    def manifest(self, name: str, version: str) -> tuple[Manifest, Signature]:
        d = self.models_dir / name / version
        if not (d / "manifest.json").exists():
            raise NoSuchModel(name, version)
        return (msgspec.json.decode((d / "manifest.json").read_bytes(), type=Manifest),
                msgspec.json.decode((d / "signature.json").read_bytes(), type=Signature))

    def read_file(self, sha256: str) -> bytes:
        """Decrypt a blob in memory and check it is what the manifest signed."""
        blob = (self.blobs / sha256).read_bytes()
        try:
            data = self._aes.decrypt(blob[:12], blob[12:], sha256.encode())
        except InvalidTag as exc:
            raise ModelStoreError(f"blob {sha256[:12]} does not decrypt: corrupted, or another data key") from exc
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ModelStoreError(f"blob {sha256[:12]} decrypts to other content")
        return data

    def record(self, name: str) -> ModelRecord:
        return self.state.models.get(name) or ModelRecord()

    # -- writing ---------------------------------------------------------------------------------

    def add(self, bundle: Bundle) -> None:
        m = bundle.manifest
        for file, entry in bundle_files(m).items():  # models and assets alike
            path = self.blobs / entry.sha256
            if not path.exists():
                nonce = os.urandom(12)
                atomic_write(path, nonce + self._aes.encrypt(nonce, bundle.files[file], entry.sha256.encode()))
        self._fault("install:blobs-written")
        final = self.models_dir / m.name / m.version
        tmp = final.with_name(m.version + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, mode=0o700)
        (tmp / "manifest.json").write_bytes(bundle.manifest_bytes)
        (tmp / "signature.json").write_bytes(msgspec.json.encode(bundle.signature))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        self._fault("install:manifest-staged")
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        self._fault("install:manifest-written")

    def commit(self, state: StoreState) -> None:
        atomic_write(self.root / "state.json", msgspec.json.encode(state),
                     before_rename=lambda: self._fault("state-tmp-written"))
        self.state = state

    def remove_version(self, name: str, version: str) -> None:
        shutil.rmtree(self.models_dir / name / version, ignore_errors=True)
        self._sweep()

    def _sweep(self) -> None:
        """Remove staging leftovers and blobs no manifest refers to (after a crash)."""
        referenced: set[str] = set()
        for name_dir in self.models_dir.iterdir():
            for version_dir in name_dir.iterdir():
                if version_dir.name.endswith(".tmp"):
                    shutil.rmtree(version_dir, ignore_errors=True)
                    continue
                try:
                    manifest = msgspec.json.decode((version_dir / "manifest.json").read_bytes(), type=Manifest)
                except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                    shutil.rmtree(version_dir, ignore_errors=True)
                    continue
                referenced.update(v.sha256 for v in manifest.variants.values())
                referenced.update(a.sha256 for a in manifest.assets.values())
        for blob in self.blobs.iterdir():
            if blob.name not in referenced:
                blob.unlink()
        # State never names a version that is gone (it is written last, but be strict).
        for name, rec in list(self.state.models.items()):
            have = set(self.versions(name))
            if rec.active and rec.active not in have:
                raise ModelStoreError(f"state.json names {name} {rec.active} as active, but it is not in the store")
            rec.split = {v: w for v, w in rec.split.items() if v in have}
            rec.default_variants = {v: d for v, d in rec.default_variants.items() if v in have}
