"""The audit log: append-only, hash-chained, with signed checkpoints, rotated across files.

Files ``audit-000001.log``, ``audit-000002.log``... hold one JSON record per line
(``AuditRecord``).  Each record holds the previous record's hash, so editing a byte,
deleting, reordering or inserting records breaks the chain at that point, and
``verify`` names the first bad record.  Every ``checkpoint_every`` records a checkpoint
record carries the device key's ed25519 signature over the hash before it, so the chain
up to a checkpoint cannot be rewritten without the device key.

Durability: a record is one ``write`` of a whole line to a file opened O_APPEND, and a
batch is fsynced before it is acknowledged.  A line torn by a power cut (no final
newline) was never acknowledged; it is cut off at open, and the chain goes on from the
last whole record.  Rotation starts a new file whose first record chains to the last one
of the previous file.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator

import msgspec

from ._exceptions import AuditLogError
from ._keys import verify_ed25519
from protocols.security import AuditRecord, AuditVerdict

__all__ = ["AuditLog", "verify_log", "GENESIS"]

GENESIS = "0" * 64
_FILE = re.compile(r"^audit-(\d{6})\.log$")
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(AuditRecord)


def record_hash(record: AuditRecord) -> str:
    import hashlib

    return hashlib.sha256(_enc.encode(msgspec.structs.replace(record, hash=""))).hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if _FILE.match(p.name))


class AuditLog:
    def __init__(self, directory: Path, sign: Callable[[bytes], bytes], *, max_bytes: int = 1 << 20,
                 checkpoint_every: int = 100) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = directory
        self._sign = sign
        self.max_bytes = max_bytes
        self.checkpoint_every = checkpoint_every
        self.seq = 0
        self.last_hash = GENESIS
        self._since_checkpoint = 0
        self._fd = -1
        self._size = 0
        self._recover()

    def _recover(self) -> None:
        files = _files(self.directory)
        if not files:
            self._open(self.directory / "audit-000001.log")
            return
        last = files[-1]
        data = last.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            os.truncate(last, cut)  # a torn, never acknowledged record
            data = data[:cut]
        lines = data.splitlines()
        if not lines and len(files) > 1:
            lines = files[-2].read_bytes().splitlines()
        if lines:
            try:
                rec = _dec.decode(lines[-1])
            except msgspec.DecodeError as exc:
                raise AuditLogError(str(last), f"last record does not decode ({exc}); run busctl audit verify") from exc
            self.seq, self.last_hash = rec.seq, rec.hash
            self._since_checkpoint = 0 if rec.kind == "checkpoint" else 1
        self._open(last)

    def _open(self, path: Path) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditLogError(str(path), exc.strerror or str(exc)) from exc
        self.path = path
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        n = int(_FILE.match(self.path.name).group(1)) + 1  # type: ignore[union-attr]
        self._open(self.directory / f"audit-{n:06d}.log")

    def append(self, kind: str, subject: str, *, detail: str = "", capability: str = "", by: str = "",
               when: float | None = None, sync: bool = True) -> AuditRecord:
        record = self._write(AuditRecord(seq=self.seq + 1, time=when or time.time(), kind=kind, subject=subject,
                                         prev=self.last_hash, detail=detail, capability=capability, by=by))
        self._since_checkpoint += 1
        if self._since_checkpoint >= self.checkpoint_every:
            self.checkpoint(sync=False)
        if sync:
            self.sync()
        return record

    def checkpoint(self, sync: bool = True) -> AuditRecord | None:
        """Sign the chain up to here with the device key."""
        if self._since_checkpoint == 0:
            return None
        signed = self.last_hash
        record = self._write(AuditRecord(seq=self.seq + 1, time=time.time(), kind="checkpoint", subject="device",
                                         prev=signed, detail=signed,
                                         signature=self._sign(bytes.fromhex(signed)).hex()))
        self._since_checkpoint = 0
        if sync:
            self.sync()
        return record

    def _write(self, record: AuditRecord) -> AuditRecord:
        record.hash = record_hash(record)
        line = _enc.encode(record) + b"\n"
        if self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            raise AuditLogError(str(self.path), f"write failed: {exc.strerror}") from exc
        if written != len(line):
            raise AuditLogError(str(self.path), f"short write ({written} of {len(line)} bytes); disk full?")
        self._size += written
        self.seq, self.last_hash = record.seq, record.hash
        return record

    def sync(self) -> None:
        os.fsync(self._fd)

    def tail(self, n: int) -> list[AuditRecord]:
        out: list[AuditRecord] = []
        for path in reversed(_files(self.directory)):
            lines = path.read_bytes().splitlines()
            for line in reversed(lines):
                try:
                    out.append(_dec.decode(line))
                except msgspec.DecodeError:
                    continue
                if len(out) >= n:
                    return out[::-1]
        return out[::-1]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _records(directory: Path) -> Iterator[tuple[str, int, bytes]]:
    for path in _files(directory):
        for lineno, line in enumerate(path.read_bytes().split(b"\n"), 1):
            if line:
                yield path.name, lineno, line


def verify_log(directory: Path, public_key: bytes) -> AuditVerdict:
    """Walk every file in order; stop at the first record that breaks the chain."""
    files = _files(directory)
    expected_seq, prev, count, checkpoints = 1, GENESIS, 0, 0
    for name, lineno, line in _records(directory):
        where = f"{name} line {lineno} (seq {expected_seq} expected)"
        try:
            rec = _dec.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return AuditVerdict(ok=False, records=count, files=len(files), checkpoints=checkpoints, where=where,
                                problem=f"not a valid record (edited?): {exc}")
        where = f"{name} line {lineno} (seq {rec.seq})"
        if rec.seq != expected_seq:
            return AuditVerdict(ok=False, records=count, files=len(files), checkpoints=checkpoints, where=where,
                                problem=f"sequence jumps from {expected_seq - 1} to {rec.seq}: "
                                        "records were removed or reordered")
        if rec.prev != prev:
            return AuditVerdict(ok=False, records=count, files=len(files), checkpoints=checkpoints, where=where,
                                problem="does not chain to the record before it (inserted, reordered, "
                                        "or the one before was changed)")
        if record_hash(rec) != rec.hash:
            return AuditVerdict(ok=False, records=count, files=len(files), checkpoints=checkpoints, where=where,
                                problem="its content does not match its hash: the record was edited")
        if rec.kind == "checkpoint":
            if rec.detail != rec.prev:
                return AuditVerdict(ok=False, records=count, files=len(files), checkpoints=checkpoints,
                                    where=where, problem="checkpoint signs a hash other than the record before it")
            if not verify_ed25519(public_key, bytes.fromhex(rec.signature or "00"), bytes.fromhex(rec.detail or "00")):
                return AuditVerdict(ok=False, records=count, files=len(files), checkpoints=checkpoints,
                                    where=where, problem="checkpoint signature is not the device key's")
            checkpoints += 1
        prev, expected_seq, count = rec.hash, expected_seq + 1, count + 1
    return AuditVerdict(ok=True, records=count, files=len(files), checkpoints=checkpoints)
