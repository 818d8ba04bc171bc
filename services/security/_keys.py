"""Device keys: the ed25519 device key (signs audit checkpoints and attestation reports)
and the device master key (wraps the model store's data keys).

Both live in ``<state>/security/`` with mode 0600, created on first start.  This is the
``FileKeyStore``; a TPM or secure element plugs in behind the same four operations
(``sign``, ``public_key``, ``seal``, ``unseal``): the master key would be a TPM-resident
AES key (TPM2_Create under the storage root key, optionally bound to the PCRs the kernel
measures) and seal/unseal would be TPM2_EncryptDecrypt calls, so the key never reaches
this process's memory.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ._exceptions import KeyFileError, SealError

__all__ = ["FileKeyStore", "key_id", "verify_ed25519", "SEAL_MAGIC"]

SEAL_MAGIC = b"EBS1"


def key_id(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


def verify_ed25519(public_key: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def _read_private(path: Path, size: int) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(str(path), "missing") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(str(path), f"mode {stat.S_IMODE(st.st_mode):o} lets others read it; chmod 600")
    data = path.read_bytes()
    if len(data) != size:
        raise KeyFileError(str(path), f"holds {len(data)} bytes, expected {size}")
    return data


def _create_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class FileKeyStore:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = directory
        device, master = directory / "device.key", directory / "master.key"
        if not device.exists():
            _create_private(device, Ed25519PrivateKey.generate().private_bytes_raw())
        if not master.exists():
            _create_private(master, AESGCM.generate_key(bit_length=256))
        self._device = Ed25519PrivateKey.from_private_bytes(_read_private(device, 32))
        self._master = AESGCM(_read_private(master, 32))
        self.public_key = self._device.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        (directory / "device.pub").write_text(self.public_key.hex() + "\n")

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self._device.sign(data)

    def seal(self, key: bytes, context: str = "") -> bytes:
        nonce = os.urandom(12)
        return SEAL_MAGIC + nonce + self._master.encrypt(nonce, key, context.encode())

    def unseal(self, blob: bytes, context: str = "") -> bytes:
        if len(blob) < 4 + 12 + 16 or blob[:4] != SEAL_MAGIC:
            raise SealError("not a sealed blob (bad magic or too short)")
        try:
            return self._master.decrypt(blob[4:16], blob[16:], context.encode())
        except InvalidTag:
            raise SealError("authentication failed: sealed by another master key, tampered, "
                            "or a different context") from None
