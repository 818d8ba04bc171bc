"""Measured start: what the kernel ran, hashed and chained like a TPM PCR extend.

For each service it starts the kernel hashes the code (the executable, and for
``python -m pkg.mod`` every file of the top-level package that holds the module) and the
service's config section, and extends ``pcr = sha256(pcr || sha256(code || config))``.
A restart of identical code and config extends nothing; a change shows in the PCR.  The
security service signs the log and PCR into an attestation report that a fleet server
verifies offline (``edgebus attest verify``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import time
from pathlib import Path

import msgspec

from protocols import Measurement, Measurements

from ._config import ServiceConfig

__all__ = ["MeasurementLog", "code_digest", "extend", "ZERO_PCR"]

ZERO_PCR = "00" * 32


def extend(pcr: str, digest: str) -> str:
    return hashlib.sha256(bytes.fromhex(pcr) + bytes.fromhex(digest)).hexdigest()


def _files_of(argv: list[str]) -> list[Path]:
    files: list[Path] = []
    exe = shutil.which(argv[0]) if argv else None
    if exe:
        files.append(Path(exe).resolve())
    if len(argv) > 2 and argv[1] == "-m":
        top = argv[2].split(".")[0]
        spec = importlib.util.find_spec(top)
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                files.extend(sorted(p for p in Path(location).rglob("*.py")))
        elif spec is not None and spec.origin:
            files.append(Path(spec.origin))
    elif len(argv) > 1 and Path(argv[1]).is_file():
        files.append(Path(argv[1]).resolve())  # an interpreter running a script
    return files


_cache: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    digest = _cache.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = _cache[key] = h.hexdigest()
    return digest


def code_digest(argv: list[str]) -> str:
    """sha256 over (path, sha256 of content) of every file the command runs."""
    h = hashlib.sha256()
    for path in _files_of(argv):
        try:
            h.update(f"{path}\0{_file_digest(path)}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()


class MeasurementLog:
    def __init__(self) -> None:
        self.pcr = ZERO_PCR
        self.log: list[Measurement] = []
        self._last: dict[str, str] = {}
        # Read from the router thread: one immutable snapshot, replaced in one assignment,
        # so a reader never sees a log that does not match its PCR.
        self._snapshot = Measurements(pcr=self.pcr, log=[])

    def measure(self, service: str, argv: list[str], spec: ServiceConfig) -> Measurement | None:
        """Measure a start; extend the PCR when this service's code or config is new."""
        code = code_digest(argv)
        config = hashlib.sha256(msgspec.json.encode(spec)).hexdigest()
        digest = hashlib.sha256(bytes.fromhex(code) + bytes.fromhex(config)).hexdigest()
        if self._last.get(service) == digest:
            return None
        self._last[service] = digest
        entry = Measurement(service=service, code=code, config=config, digest=digest,
                            argv=[os.path.basename(argv[0]), *argv[1:]] if argv else [], time=time.time())
        self.log.append(entry)
        self.pcr = extend(self.pcr, digest)
        self._snapshot = Measurements(pcr=self.pcr, log=list(self.log))
        return entry

    def snapshot(self) -> Measurements:
        return self._snapshot
