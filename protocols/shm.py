"""Shared-memory tensors: megabytes that never travel through the bus (PROTOCOL.md 3.6).

A *region* is a POSIX shared-memory object, ``/dev/shm/<name>``, that a client creates
(mode 0600, ``name`` = ``edgebus-`` and 1 to 64 of ``[A-Za-z0-9._-]``) and maps with the
scheduler (``MapRegion``: the kernel checks that the client holds ``call:scheduler.MapRegion``;
the scheduler opens the file without following links, checks that it is a regular file of
the scheduler's own user and of the size said, within its bounds per client, and keeps it
for that client alone).  A ``Tensor`` then names the region and the offset of its bytes
(``region``, ``offset``) instead of a frame; ``Infer.out_region`` asks for the outputs to be
written into the client's region too.  The scheduler hands a region on to the driver that
computes a request (by name: the driver opens it with the same checks), so a camera's image
is read where the client wrote it, by the process that runs the model.  Everything else
(descriptors, results, errors) still goes through the bus and its capability checks; the
socket path (tensor frames) stays for every peer and every request that does not use a region.

The client owns its region: it must not change a tensor's bytes until the request's answer
has come, and it unlinks the region when it is done (``services.SharedRegion`` does, and
unmaps it at the scheduler).

This module is the layout both ends share: names, opening with the checks, tensor views
with bounds checks, and placing arrays at aligned offsets.  numpy is imported lazily.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

from ._exceptions import DecodeError
from ._messages import Tensor
from ._tensors import checked_layout, dtype_name, pack_tensors

__all__ = ["SHM_DIR", "ALIGN", "RegionError", "check_region_name", "create_region", "open_region",
           "region_view", "place_tensors", "place_or_pack", "address_of", "RegionCache"]

#: where POSIX shared memory lives on Linux (shm_open's names)
SHM_DIR = Path("/dev/shm")
#: tensors placed in a region start at multiples of this (a cache line; any dtype's alignment)
ALIGN = 64
_NAME = re.compile(r"edgebus-[A-Za-z0-9._-]{1,64}")


class RegionError(ValueError):
    """A region that cannot be used: its name, its file, its size or a tensor's bounds."""


def check_region_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name.endswith((".", "..")):
        raise RegionError(f"region name {name[:80]!r} is not 'edgebus-' and 1 to 64 of A-Z a-z 0-9 . _ -")
    return name


def create_region(name: str, size: int) -> mmap.mmap:
    """Create ``/dev/shm/<name>`` (mode 0600, it must not exist) of ``size`` bytes, mapped."""
    check_region_name(name)
    if size <= 0:
        raise RegionError(f"a region of {size} bytes holds nothing")
    fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    except BaseException:
        os.unlink(SHM_DIR / name)
        raise
    finally:
        os.close(fd)


def open_region(name: str, size: int | None, max_size: int, inode: int = 0) -> tuple[mmap.mmap, int]:
    """Map an existing region read-write (the mapping and its file's inode), checked: a regular file (no link followed), owned
    by this process's user, not group/other writable, of ``size`` bytes (any when None) and
    at most ``max_size``, and the file ``inode`` (when not 0: the one the scheduler mapped,
    not a new file under the same name).  Raises RegionError saying which check failed."""
    check_region_name(name)
    try:
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RegionError(f"region {name!r} does not exist (create it in {SHM_DIR} first)") from None
    except OSError as exc:  # ELOOP: a symbolic link; EACCES...
        raise RegionError(f"region {name!r} cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RegionError(f"region {name!r} is not a regular file")
        if st.st_uid != os.geteuid():
            raise RegionError(f"region {name!r} belongs to uid {st.st_uid}, not to this user ({os.geteuid()})")
        if st.st_mode & 0o022:
            raise RegionError(f"region {name!r} is writable by others (mode {st.st_mode & 0o777:o}); create it 0600")
        if inode and st.st_ino != inode:
            raise RegionError(f"region {name!r} is another file than the one mapped (created again?)")
        if size is not None and st.st_size != size:
            raise RegionError(f"region {name!r} holds {st.st_size} bytes, not the {size} said")
        if not 0 < st.st_size <= max_size:
            raise RegionError(f"region {name!r} holds {st.st_size} bytes; regions hold 1 to {max_size}")
        return mmap.mmap(fd, st.st_size), st.st_ino
    finally:
        os.close(fd)


def address_of(buf: Any) -> int:
    """The address of a mapping's first byte (to tell which region an array lies in)."""
    import numpy as np

    return int(np.frombuffer(buf, np.uint8, count=1).__array_interface__["data"][0])


def region_view(desc: Tensor, buf: Any, writable: bool = False) -> Any:
    """The numpy view of ``desc``'s bytes in the mapped region ``buf`` (read-only unless
    ``writable``).  Raises DecodeError for a descriptor that does not fit the region."""
    import numpy as np


    dtype, count = checked_layout(desc)
    end = desc.offset + count * dtype.itemsize
    if desc.offset < 0 or end > len(buf):
        raise DecodeError("tensor", f"{desc.dtype}{desc.shape} at offset {desc.offset} of region {desc.region!r} "
                                    f"ends at byte {end}, past its {len(buf)}")
    if desc.offset % dtype.itemsize:
        raise DecodeError("tensor", f"offset {desc.offset} in region {desc.region!r} is not a multiple of "
                                    f"{dtype.itemsize} ({desc.dtype})")
    view = np.frombuffer(buf, dtype=dtype, count=count, offset=desc.offset).reshape(desc.shape)
    if not writable:
        view.flags.writeable = False
    return view


def place_tensors(arrays: Mapping[str, Any], region: str, buf: Any, start: int, end: int) -> list[Tensor] | None:
    """Copy ``arrays`` into the mapped region ``buf`` from ``start`` (aligned to ALIGN) up to
    ``end``; their descriptors, or None when they do not all fit (nothing is promised
    then about the bytes from ``start`` on).  An array already at its place is not copied."""
    import numpy as np

    end = min(end, len(buf))
    base = address_of(buf)
    offset = -(-start // ALIGN) * ALIGN
    descs: list[Tensor] = []
    for name, arr in arrays.items():
        a = np.asarray(arr)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if offset + a.nbytes > end:
            return None
        target = np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=offset).reshape(a.shape)
        if not (a.flags.c_contiguous and a.__array_interface__["data"][0] == base + offset):
            target[...] = a
        descs.append(Tensor(dtype=dtype_name(a.dtype), shape=list(a.shape), name=name, region=region, offset=offset))
        offset = -(-(offset + a.nbytes) // ALIGN) * ALIGN
    return descs


def place_or_pack(arrays: Mapping[str, Any], region: str, buf: Any, start: int, end: int) -> tuple[list[Tensor], list[Any]]:
    """Outputs to send: placed in the region ``buf`` (``place_tensors``; no frames) when one
    is given and they fit, else as zero-copy frames (``pack_tensors(zero_copy=True)``: the
    sender never writes these arrays again)."""
    if buf is not None:
        placed = place_tensors(arrays, region, buf, start, end)
        if placed is not None:
            return placed, []

    return pack_tensors(arrays, zero_copy=True)


class RegionCache:
    """Regions opened by name (a driver's: the scheduler names them), least recently used
    closed past ``max_bytes`` in all."""

    def __init__(self, max_bytes: int, max_size: int) -> None:
        self.max_bytes = max_bytes
        self.max_size = max_size
        self._open: OrderedDict[str, tuple[int, mmap.mmap]] = OrderedDict()
        self._bytes = 0

    def get(self, name: str, inode: int) -> mmap.mmap:
        """The region ``name`` whose file is ``inode`` (reopened when the name now names another)."""
        found = self._open.get(name)
        if found is not None and found[0] == inode:
            self._open.move_to_end(name)
            return found[1]
        self.forget(name)
        buf, _ = open_region(name, None, self.max_size, inode)
        self._open[name] = (inode, buf)
        self._bytes += len(buf)
        while self._bytes > self.max_bytes and len(self._open) > 1:
            _, (_, old) = self._open.popitem(last=False)
            self._bytes -= len(old)  # (unmapped when the last view of it is gone)
        return buf

    def forget(self, name: str) -> None:
        found = self._open.pop(name, None)
        if found is not None:
            self._bytes -= len(found[1])
