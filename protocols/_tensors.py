"""Tensors travel as raw frames after the body, described in the body by ``Tensor``.

numpy is imported lazily: only processes that actually handle tensors pay for it.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

from ._exceptions import DecodeError
from ._messages import Tensor

__all__ = ["pack_tensors", "unpack_tensor", "dtype_name", "DTYPES", "ZERO_COPY_MIN"]

#: From this size on, ``pack_tensors(..., zero_copy=True)`` hands a tensor's memory to ZeroMQ
#: instead of copying it; below it a copy costs less than the bookkeeping (pyzmq's default
#: ``copy_threshold`` is the same 64 KiB).
ZERO_COPY_MIN = 1 << 16

#: The dtypes a tensor frame may carry (PROTOCOL.md, "Raw frames and tensors").
DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "float16", "float32", "float64")


def pack_tensors(arrays: Sequence[Any] | Mapping[str, Any], first_frame: int = 0, *,
                 zero_copy: bool = False) -> tuple[list[Tensor], list[Any]]:
    """Describe ``arrays`` and return the buffers to send after the body, without copying
    arrays that are already C-contiguous.  A mapping packs named tensors (``{"x": image}``),
    a sequence unnamed ones (taken in the model's order).

    The socket copies each buffer when it is sent, so the caller may change its arrays the
    moment the send returns.  ``zero_copy=True`` skips that copy for tensors of
    ``ZERO_COPY_MIN`` bytes or more: ZeroMQ reads their memory while it sends, after the
    send call has returned, so the caller promises never to write to those arrays again (a
    view of a received frame, which is read-only, or a result the caller made and hands
    over).  A scheduler forwarding tensors or a driver answering with a model's outputs
    does; a client sending its camera's buffer must not."""
    import numpy as np

    frame_of = None
    if zero_copy:
        import zmq

        frame_of = zmq.Frame

    descs: list[Tensor] = []
    buffers: list[Any] = []
    named = isinstance(arrays, Mapping)
    for i, (name, arr) in enumerate(arrays.items() if named else zip(itertools.repeat(""), arrays)):
        a = np.asarray(arr)
        kind = dtype_name(a.dtype)
        if kind not in DTYPES:
            raise ValueError(f"dtype {kind!r} cannot travel as a tensor frame; use one of {', '.join(DTYPES)}")
        if not a.flags.c_contiguous:  # (ascontiguousarray would turn a 0-d array 1-d)
            a = a.copy(order="C")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        descs.append(Tensor(dtype=kind, shape=list(a.shape), frame=first_frame + i, name=name))
        buf = memoryview(a.reshape(-1)).cast("B") if a.size else b""
        buffers.append(frame_of(buf, copy=False) if frame_of is not None and a.nbytes >= ZERO_COPY_MIN else buf)
    return descs, buffers


def unpack_tensor(desc: Tensor, raw: Sequence[Any]) -> Any:
    """A read-only numpy view over the frame ``desc`` points at (no copy)."""
    import numpy as np

    if desc.region:
        raise DecodeError("tensor", f"is in shared-memory region {desc.region!r}; map regions with the scheduler "
                                    "(MapRegion), which alone reads them")
    if not 0 <= desc.frame < len(raw):
        raise DecodeError("tensor", f"frame {desc.frame} does not exist ({len(raw)} raw frames)")
    dtype, count = checked_layout(desc)
    frame = raw[desc.frame]
    buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    expected = dtype.itemsize * count
    if len(buf) != expected:
        raise DecodeError(
            "tensor",
            f"frame {desc.frame} holds {len(buf)} bytes but {desc.dtype}{desc.shape} needs {expected}",
        )
    return np.frombuffer(buf, dtype=dtype).reshape(desc.shape)


def checked_layout(desc: Tensor) -> tuple[Any, int]:
    """``desc``'s little-endian numpy dtype and element count; DecodeError for a dtype not
    in DTYPES or a shape that is not a tensor's (PROTOCOL.md 3.4), wherever its bytes are."""
    import numpy as np

    if desc.dtype not in DTYPES:
        raise DecodeError("tensor", f"dtype {desc.dtype!r} is not one of {', '.join(DTYPES)}")
    if len(desc.shape) > 32 or any(d < 0 or d > 1 << 40 for d in desc.shape):
        raise DecodeError("tensor", f"shape {desc.shape} is not a tensor shape (0..2^40 per dimension, 32 at most)")
    count = 1
    for d in desc.shape:
        count *= d
    dtype = _little.get(desc.dtype)
    if dtype is None:
        dtype = _little[desc.dtype] = np.dtype(desc.dtype).newbyteorder("<")
    return dtype, count


# numpy builds a dtype's name, and a dtype from a name, anew at every use (microseconds
# each, several per tensor): both are looked up here once per dtype.
_names: dict[Any, str] = {}
_little: dict[str, Any] = {}


def dtype_name(dtype: Any) -> str:
    """``dtype.name``, looked up once per dtype."""
    name = _names.get(dtype)
    if name is None:
        name = _names[dtype] = dtype.name
    return name
