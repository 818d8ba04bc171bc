"""The trust store: ed25519 public keys allowed to sign model bundles (role ``model``) or
fleet deployment documents (role ``fleet``); a key has one role, and a signature counts only
for its key's role.

Keys come from the configuration (the security service's ``trusted_keys`` setting), which
cannot be removed at run time, and from ``busctl trust add``, kept in ``trust.json``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import msgspec

from services import atomic_write

from ._keys import key_id, verify_ed25519
from protocols.security import TrustedKey

__all__ = ["TrustStore", "parse_public_key", "ROLES"]

#: what a trusted key may sign: model bundles, or fleet deployment documents
ROLES = ("model", "fleet")


def parse_public_key(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError(f"{text[:20]!r}... is not hex; an ed25519 public key is 64 hex characters") from None
    if len(raw) != 32:
        raise ValueError(f"an ed25519 public key is 32 bytes (64 hex characters), got {len(raw)} bytes")
    return raw


class TrustStore:
    def __init__(self, path: Path, configured: Iterable[tuple[str, str] | tuple[str, str, str]] = ()) -> None:
        """``configured``: (label, hex public key[, role]) from the configuration."""
        self.path = path
        self.keys: dict[str, TrustedKey] = {}
        for label, hexkey, *role in configured:
            raw = parse_public_key(hexkey)
            self.keys[key_id(raw)] = TrustedKey(key_id=key_id(raw), public_key=raw.hex(), label=label, source="config",
                                                role=role[0] if role else "model")
        if path.exists():
            for k in msgspec.json.decode(path.read_bytes(), type=list[TrustedKey]):
                self.keys.setdefault(k.key_id, k)

    def _save(self) -> None:
        runtime = [k for k in self.keys.values() if k.source == "runtime"]
        atomic_write(self.path, msgspec.json.encode(runtime))

    def add(self, public_key: str, label: str = "", role: str = "model") -> TrustedKey:
        raw = parse_public_key(public_key)
        kid = key_id(raw)
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if kid in self.keys and self.keys[kid].role != role:
            raise ValueError(f"key {kid} is trusted already, with role {self.keys[kid].role}; a key has one role: "
                             "remove it first")
        key = self.keys.get(kid) or TrustedKey(key_id=kid, public_key=raw.hex(), label=label, role=role)
        self.keys[kid] = key
        self._save()
        return key

    def remove(self, kid: str) -> TrustedKey:
        key = self.keys.get(kid)
        if key is None:
            raise KeyError(kid)
        if key.source == "config":
            raise PermissionError(f"key {kid} comes from the configuration; remove it there")
        del self.keys[kid]
        self._save()
        return key

    def verify(self, data: bytes, signature: bytes, kid: str = "", role: str = "model") -> TrustedKey | None:
        candidates = [self.keys[kid]] if kid in self.keys else ([] if kid else list(self.keys.values()))
        for key in (k for k in candidates if k.role == role):
            if verify_ed25519(bytes.fromhex(key.public_key), signature, data):
                return key
        return None
