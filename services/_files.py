"""Crash-safe file writes for the services that keep state."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write"]


def atomic_write(path: Path, data: bytes, *, before_rename: Callable[[], None] | None = None) -> None:
    """Write a private (0600) file so that a crash at any instant leaves the old content or
    the new one: write a temporary file, fsync it, rename it over ``path``, fsync the
    directory.  ``before_rename`` is a hook for crash tests."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
