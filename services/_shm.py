"""A client's shared-memory region for tensors (``protocols.shm``, PROTOCOL.md 3.6).

    async with SharedRegion(bus, 8 << 20) as region:          # created, mapped with the scheduler
        x = region.array((1, 3, 320, 320), "float32")          # write the camera's image here...
        tensors = region.describe({"x": x})                    # ...or region.put({"x": image})
        incoming = await bus.request("scheduler", Infer(model="det", tensors=tensors,
                                                        out_region=region.name, out_offset=OUT))
        result = incoming.decode(InferResult)
        y = region.tensor(result.outputs[0], incoming)         # in the region (or a frame)

Megabytes then never cross the bus: the scheduler and the driver read the image where it
was written and the driver writes the outputs where the client asked.  Leaving the ``async
with`` unmaps the region at the scheduler and unlinks it.  Do not change a tensor's bytes
while a request that names them is in flight.
"""

from __future__ import annotations

import os
import secrets
from typing import Any, Mapping, Sequence

import anyio

from protocols import Tensor, unpack_tensor
from protocols.scheduler import MapRegion, RegionMapped, RegionUnmapped, UnmapRegion
from protocols.shm import SHM_DIR, address_of, create_region, place_tensors, region_view

from ._exceptions import BusError

__all__ = ["SharedRegion"]


class SharedRegion:
    """``size`` bytes of shared memory, created by this client and mapped with ``service``
    (the scheduler).  ``name`` is chosen at random unless given."""

    def __init__(self, bus: Any, size: int, *, service: str = "scheduler", name: str = "") -> None:
        self.bus = bus
        self.size = size
        self.service = service
        self.name = name or f"edgebus-{os.getpid()}-{secrets.token_hex(6)}"
        self.buf: Any = None
        self._base = 0

    async def __aenter__(self) -> SharedRegion:
        self.buf = create_region(self.name, self.size)
        self._base = address_of(self.buf)
        try:
            await self.bus.call(self.service, MapRegion(name=self.name, size=self.size), RegionMapped)
        except BaseException:
            self._unlink()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.bus.call(self.service, UnmapRegion(name=self.name), RegionUnmapped)
        except BusError:  # (the scheduler restarted, or the bus is closing: nothing to unmap)
            pass
        finally:
            self._unlink()

    def _unlink(self) -> None:
        try:
            os.unlink(SHM_DIR / self.name)
        except FileNotFoundError:
            pass

    def array(self, shape: Sequence[int], dtype: Any, offset: int = 0) -> Any:
        """A writable numpy array in the region, from byte ``offset``."""
        import numpy as np

        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        if offset < 0 or offset % dt.itemsize or offset + count * dt.itemsize > self.size:
            raise ValueError(f"{dt.name}{list(shape)} at offset {offset} does not fit region {self.name!r} "
                             f"({self.size} bytes) aligned")
        return np.frombuffer(self.buf, dtype=dt, count=count, offset=offset).reshape(shape)

    def put(self, arrays: Mapping[str, Any], offset: int = 0) -> list[Tensor]:
        """Copy ``arrays`` (named) into the region from ``offset``; their descriptors."""
        descs = place_tensors(arrays, self.name, self.buf, offset, self.size)
        if descs is None:
            raise ValueError(f"the tensors do not fit region {self.name!r} from offset {offset} ({self.size} bytes)")
        return descs

    def describe(self, arrays: Mapping[str, Any]) -> list[Tensor]:
        """Descriptors of arrays that already lie in the region (made with ``array``)."""
        descs = []
        for name, a in arrays.items():
            start = a.__array_interface__["data"][0] - self._base
            if not a.flags.c_contiguous or start < 0 or start + a.nbytes > self.size:
                raise ValueError(f"tensor {name!r} is not a contiguous array in region {self.name!r}; put() it")
            descs.append(Tensor(dtype=a.dtype.name, shape=list(a.shape), name=name, region=self.name, offset=start))
        return descs

    def tensor(self, desc: Tensor, incoming: Any = None) -> Any:
        """An output: a read-only view in the region, or of its frame in ``incoming``."""
        if desc.region:
            if desc.region != self.name:
                raise ValueError(f"tensor {desc.name!r} is in region {desc.region!r}, not {self.name!r}")
            return region_view(desc, self.buf)
        return unpack_tensor(desc, incoming.frames)
