"""The model bundle: one file holding a signed manifest and the model files.

Layout: a zip archive (stored, not compressed: ONNX files barely compress) with

* ``manifest.json``: the ``Manifest`` (``protocols.modelstore``, msgspec JSON), which lists every model file with
  its sha256 and size: the signature covers the files through it (the OpenSSF
  model-signing idea);
* ``signature.json``: ``{"key_id", "public_key", "signature"}``, ed25519 over the exact
  bytes of manifest.json;
* the model files, e.g. ``full.onnx`` and ``int8.onnx``.

Offline tools (``edgebus model pack|sign|verify|inspect|quantize``) and the store use
this module; verification against a trust store is the store's (the security service's).
"""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from pathlib import Path
from typing import Any

import msgspec

from protocols.modelstore import Manifest, ManifestError, Variant

from ._exceptions import BundleError, TamperedBundle, UnsignedBundle

__all__ = ["Signature", "Bundle", "MANIFEST", "SIGNATURE"]

MANIFEST = "manifest.json"
SIGNATURE = "signature.json"


class Signature(msgspec.Struct):
    key_id: str
    public_key: str
    signature: str


class Bundle:
    """A bundle in memory: manifest bytes, signature, file contents."""

    def __init__(self, manifest_bytes: bytes, files: dict[str, bytes], signature: Signature | None = None) -> None:
        self.manifest_bytes = manifest_bytes
        try:
            self.manifest = msgspec.json.decode(manifest_bytes, type=Manifest)
            self.manifest.check()
        except (msgspec.DecodeError, msgspec.ValidationError, ManifestError) as exc:
            raise BundleError(f"manifest.json: {exc}") from exc
        self.files = files
        self.signature = signature

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def create(cls, manifest: Manifest, files: dict[str, bytes]) -> "Bundle":
        missing = sorted(v.file for v in manifest.variants.values() if v.file not in files)
        if missing:
            raise BundleError(f"the manifest's variants name file(s) {missing} that were not given")
        manifest.variants = {
            name: Variant(file=v.file, sha256=hashlib.sha256(files[v.file]).hexdigest(), size=len(files[v.file]),
                          description=v.description)
            for name, v in manifest.variants.items()
        }
        manifest.created = manifest.created or time.time()
        return cls(msgspec.json.encode(manifest), files)

    def sign(self, private_key: Any) -> None:
        """Sign with an ed25519 private key (cryptography's Ed25519PrivateKey)."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.signature = Signature(key_id=hashlib.sha256(public).hexdigest()[:16], public_key=public.hex(),
                                   signature=private_key.sign(self.manifest_bytes).hex())

    # -- files ----------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            z.writestr(MANIFEST, self.manifest_bytes)
            if self.signature is not None:
                z.writestr(SIGNATURE, msgspec.json.encode(self.signature))
            for name in sorted(self.files):
                z.writestr(name, self.files[name])
        return buf.getvalue()

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> "Bundle":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                names = set(z.namelist())
                if MANIFEST not in names:
                    raise BundleError("it has no manifest.json")
                manifest_bytes = z.read(MANIFEST)
                signature = None
                if SIGNATURE in names:
                    try:
                        signature = msgspec.json.decode(z.read(SIGNATURE), type=Signature)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        raise BundleError(f"signature.json: {exc}") from exc
                files = {n: z.read(n) for n in names - {MANIFEST, SIGNATURE}}
        except (zipfile.BadZipFile, OSError, KeyError) as exc:
            raise BundleError(f"not a bundle archive: {exc}") from exc
        return cls(manifest_bytes, files, signature)

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        try:
            return cls.from_bytes(Path(path).read_bytes())
        except OSError as exc:
            raise BundleError(f"cannot read {path}: {exc.strerror}") from exc

    # -- verification ---------------------------------------------------------------------------

    def check_files(self) -> None:
        """Every file the manifest lists is there with its signed digest, and no other."""
        listed = {v.file: v for v in self.manifest.variants.values()}
        for name, variant in listed.items():
            data = self.files.get(name)
            if data is None:
                raise TamperedBundle(f"{name} (missing)")
            if len(data) != variant.size or hashlib.sha256(data).hexdigest() != variant.sha256:
                raise TamperedBundle(name)
        extra = set(self.files) - set(listed)
        if extra:
            raise TamperedBundle(f"unlisted file(s) {sorted(extra)}")

    def check_signature_with(self, public_key: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if self.signature is None:
            raise UnsignedBundle()
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(bytes.fromhex(self.signature.signature),
                                                                  self.manifest_bytes)
        except (InvalidSignature, ValueError):
            return False
        return True
