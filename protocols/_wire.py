"""The multipart frame layout shared by every peer on the bus.

A message is ``[signature, header, body, *raw]`` (a ROUTER adds the peer's routing
identity in front).  See PROTOCOL.md for the language-neutral description.
"""

from __future__ import annotations

import enum
from typing import Any, Sequence

import msgspec

from ._exceptions import DecodeError, FrameError, TypeMismatch, VersionError

__all__ = [
    "PROTOCOL_MAJOR",
    "PROTOCOL_MINOR",
    "SIGNATURE",
    "Kind",
    "Header",
    "Codec",
]

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 0
#: Frame 0 of every message: ASCII "EB", then the major and minor protocol version.
SIGNATURE = b"EB" + bytes((PROTOCOL_MAJOR, PROTOCOL_MINOR))


class Kind(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    ERROR = 3
    EVENT = 4
    CONTROL = 5


class Header(msgspec.Struct, omit_defaults=True, rename={
    "kind": "k", "type": "t", "dest": "d", "id": "i", "deadline": "dl", "sender": "s",
}):
    """Frame 1.  Short keys keep it small; unknown keys are ignored (version skew)."""

    kind: Kind
    #: The message type: the body's tag (``"Echo"``, ``"Hello"``, ``"Error"``...).
    type: str
    #: A request's destination service, or an event's topic; empty otherwise.
    dest: str = ""
    #: Correlation id chosen by the requester; a reply or error carries it back.
    id: int = 0
    #: Absolute deadline, seconds since the Unix epoch; 0 means none.
    deadline: float = 0.0
    #: The authenticated sender, stamped by the kernel.  Whatever a sender puts here is
    #: overwritten, so receivers may trust it.
    sender: str = ""


def body_tag(msg: msgspec.Struct) -> str:
    """The tag value of a tagged Struct (the class name unless the class says otherwise)."""
    return type(msg).__struct_config__.tag  # type: ignore[return-value]


class Codec:
    """One encoder and one header decoder, built once per socket.

    ``pack`` builds the frame list; ``unpack`` validates the layout and decodes the header,
    leaving the body to the typed decoder of whoever handles that message type.
    """

    __slots__ = ("_enc", "_hdr", "max_size")

    def __init__(self, max_size: int = 64 * 1024 * 1024) -> None:
        self._enc = msgspec.msgpack.Encoder()
        self._hdr = msgspec.msgpack.Decoder(Header)
        self.max_size = max_size

    def encode(self, obj: Any) -> bytes:
        return self._enc.encode(obj)

    def pack(self, header: Header, body: msgspec.Struct | bytes, raw: Sequence[Any] = ()) -> list[Any]:
        enc = self._enc.encode
        body_bytes = body if isinstance(body, (bytes, bytearray, memoryview)) else enc(body)
        return [SIGNATURE, enc(header), body_bytes, *raw]

    def unpack(self, frames: Sequence[Any]) -> tuple[Header, Any, list[Any]]:
        """Split ``[signature, header, body, *raw]``; raise a ProtocolError naming the fault."""
        n = len(frames)
        if n < 3:
            raise FrameError(
                f"expected at least 3 frames (signature, header, body), got {len(frames)}"
            )
        if frames[0] != SIGNATURE:  # (the common case costs one comparison)
            check_signature(frames[0])
        total = len(frames[0]) + len(frames[1]) + len(frames[2]) if n == 3 else sum(map(len, frames))
        if total > self.max_size:
            raise FrameError(f"message of {total} bytes exceeds the limit of {self.max_size} bytes")
        try:
            header = self._hdr.decode(frames[1])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DecodeError("header", str(exc)) from exc
        return header, frames[2], list(frames[3:]) if n > 3 else []


def check_signature(sig: Any) -> None:
    sig = bytes(sig)
    if len(sig) != 4 or sig[:2] != b"EB":
        raise FrameError(f"frame 0 must be the 4-byte signature 45 42 <major> <minor>, got {sig[:8].hex(' ')!r}")
    if sig[2] != PROTOCOL_MAJOR:
        raise VersionError(sig[2], PROTOCOL_MAJOR)


class BodyDecoder:
    """A typed decoder for one channel's tagged union, checked against the header type."""

    __slots__ = ("_dec",)

    def __init__(self, union: Any) -> None:
        self._dec = msgspec.msgpack.Decoder(union)

    def decode(self, header_type: str, body: Any) -> Any:
        try:
            msg = self._dec.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DecodeError(f"body of {header_type!r}", str(exc)) from exc
        tag = body_tag(msg)
        if tag != header_type:
            raise TypeMismatch(header_type, tag)
        return msg
