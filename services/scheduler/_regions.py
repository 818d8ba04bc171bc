"""Clients' shared-memory regions (``protocols.shm``, PROTOCOL.md 3.6), per client.

A client maps a region it created (``MapRegion``); its tensors may then name it.  Each
client's regions are its own: a tensor naming a region is looked up among its sender's
(the kernel stamps the sender), so no client reads or writes through another's.  Bounded
per client: ``max_regions`` regions of ``max_bytes`` in all.  A batch of one whose inputs
all lie in regions goes to the driver as region references (the driver opens the region
by name, checked against the inode mapped here); the outputs are written where the client
asked (by the driver when it can, else copied here), or come back as frames.
"""

from __future__ import annotations

import mmap
from typing import Any

from protocols import Tensor
from protocols.scheduler import RegionMapped
from protocols.shm import RegionError, address_of, open_region, region_view
from services import BadMessage, Overloaded

__all__ = ["Regions", "Mapped"]


class Mapped:
    __slots__ = ("name", "buf", "inode", "base", "size")

    def __init__(self, name: str, buf: mmap.mmap, inode: int) -> None:
        self.name, self.buf, self.inode = name, buf, inode
        self.base = address_of(buf)
        self.size = len(buf)


class Regions:
    def __init__(self, max_regions: int, max_bytes: int) -> None:
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self._peers: dict[str, dict[str, Mapped]] = {}

    def map(self, peer: str, name: str, size: int) -> RegionMapped:
        own = self._peers.setdefault(peer, {})
        if name not in own:
            if len(own) >= self.max_regions:
                raise Overloaded(f"{peer} has {len(own)} regions mapped, the most a client may; unmap one "
                                 "(UnmapRegion) first")
            held = sum(m.size for m in own.values())
            if held + size > self.max_bytes:
                raise Overloaded(f"{peer} would hold {held + size} bytes in regions; a client may hold "
                                 f"{self.max_bytes}")
            try:
                buf, inode = open_region(name, size, self.max_bytes)
            except RegionError as exc:
                raise BadMessage(str(exc)) from None
            own[name] = Mapped(name, buf, inode)
        elif own[name].size != size:
            raise BadMessage(f"region {name!r} is mapped with {own[name].size} bytes, not {size}")
        return RegionMapped(name=name, size=size, regions=len(own), max_regions=self.max_regions,
                            max_bytes=self.max_bytes)

    def unmap(self, peer: str, name: str) -> None:
        own = self._peers.get(peer, {})
        if own.pop(name, None) is None:
            raise BadMessage(f"region {name!r} is not mapped for {peer}")
        if not own:
            del self._peers[peer]

    def get(self, peer: str, name: str) -> Mapped:
        found = self._peers.get(peer, {}).get(name)
        if found is None:
            raise BadMessage(f"region {name!r} is not mapped for {peer}; map it first (MapRegion)")
        return found

    def view(self, peer: str, desc: Tensor) -> Any:
        """The read-only view of a tensor in one of ``peer``'s regions; bad-message if it is not one."""
        from protocols import DecodeError

        try:
            return region_view(desc, self.get(peer, desc.region).buf)
        except DecodeError as exc:
            raise BadMessage(str(exc)) from None

    def locate(self, peer: str, array: Any) -> tuple[Mapped, int] | None:
        """The region of ``peer``'s that holds all of ``array`` (C-contiguous), and its offset."""
        own = self._peers.get(peer)
        if not own or not array.flags.c_contiguous:
            return None
        start = array.__array_interface__["data"][0]
        for mapped in own.values():
            if mapped.base <= start and start + array.nbytes <= mapped.base + mapped.size:
                return mapped, start - mapped.base
        return None
