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
    "MessageEncoder",
    "omit_defaults",
    "tag_of",
    "check_tag",
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


# -- leaving out defaults ---------------------------------------------------------------------
#
# msgspec's ``omit_defaults`` leaves a field out only when its value *is* the default object
# (or an empty list/dict/set for a factory default).  A value computed at run time that equals
# the default -- ``1.0`` read from a config, ``64 * 1024 * 1024`` computed, ``0.0`` from
# arithmetic -- is another object, and was encoded.  PROTOCOL.md 3.1 says every field equal
# to its default is left out, so before encoding, ``omit_defaults`` puts the default object
# itself back into each such field (a value equal to it: nothing a receiver can tell).

#: Per Struct type: ``None`` when nothing in it needs this; else (the fields whose default a
#: computed value can equal without being it, the fields that may hold such Structs).
_PLANS: dict[type, tuple[tuple[tuple[str, Any], ...], tuple[str, ...]] | None] = {}
_SAFE_INTS = range(-5, 257)  # CPython's cached small ints: a computed one is the default itself


def _needs_replacing(default: Any) -> bool:
    if default is None or isinstance(default, (bool, enum.Enum)):
        return False
    if isinstance(default, int):
        return default not in _SAFE_INTS
    if isinstance(default, (str, bytes)):
        return len(default) > 0  # the empty ones are singletons
    return isinstance(default, (float, tuple, frozenset))


def _may_hold_structs(t: Any) -> bool:
    from msgspec import inspect as mi

    match t:
        case mi.StructType():
            return True
        case mi.ListType() | mi.SetType() | mi.FrozenSetType() | mi.VarTupleType():
            return _may_hold_structs(t.item_type)
        case mi.TupleType():
            return any(map(_may_hold_structs, t.item_types))
        case mi.DictType():
            return _may_hold_structs(t.value_type)
        case mi.UnionType():
            return any(map(_may_hold_structs, t.types))
        case _:
            return False


def _plan(cls: type) -> tuple[tuple[tuple[str, Any], ...], tuple[str, ...]] | None:
    from msgspec import inspect as mi

    fields, defaults = cls.__struct_fields__, cls.__struct_defaults__  # type: ignore[attr-defined]
    with_default = zip(fields[len(fields) - len(defaults):], defaults)
    scalars = tuple((name, default) for name, default in with_default
                    if cls.__struct_config__.omit_defaults and _needs_replacing(default))  # type: ignore[attr-defined]
    try:
        info = mi.type_info(cls)
        nested = tuple(f.name for f in info.fields if _may_hold_structs(f.type))  # type: ignore[attr-defined]
    except (NameError, TypeError):  # annotations it cannot resolve: look into every field
        nested = tuple(fields)
    plan = (scalars, nested) if scalars or nested else None
    _PLANS[cls] = plan
    return plan


def omit_defaults(msg: Any) -> Any:
    """``msg`` (a Struct, and the Structs inside it) with every field that equals its default
    holding the default object itself, so that ``omit_defaults`` leaves it out; returned."""
    plan = _PLANS.get(type(msg), _UNPLANNED)
    if plan is _UNPLANNED:
        plan = _plan(type(msg)) if isinstance(msg, msgspec.Struct) else None
    if plan is not None:
        _apply(msg, plan)
    return msg


_UNPLANNED: Any = object()
_force_setattr = msgspec.structs.force_setattr


def _apply(msg: Any, plan: tuple[tuple[tuple[str, Any], ...], tuple[str, ...]]) -> None:
    scalars, nested = plan
    for name, default in scalars:
        value = getattr(msg, name)
        if value is not default and value == default and (
                type(value) is type(default) or (type(default) is float and type(value) is int)):
            _force_setattr(msg, name, default)
    for name in nested:
        value = getattr(msg, name)
        if isinstance(value, msgspec.Struct):
            omit_defaults(value)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                if isinstance(item, msgspec.Struct):
                    omit_defaults(item)
        elif isinstance(value, dict):
            for item in value.values():
                if isinstance(item, msgspec.Struct):
                    omit_defaults(item)


class MessageEncoder:
    """The msgpack encoder of every message: leaves out each field equal to its default
    (``omit_defaults`` above), then encodes.  Built once per socket, like msgspec's."""

    __slots__ = ("_encode",)

    def __init__(self) -> None:
        self._encode = msgspec.msgpack.Encoder().encode

    def encode(self, obj: Any) -> bytes:
        if type(obj) is Header:  # every message has one: its only such field, inline
            deadline = obj.deadline
            if deadline == 0.0 and deadline is not _NO_DEADLINE:
                _force_setattr(obj, "deadline", _NO_DEADLINE)
            return self._encode(obj)
        plan = _PLANS.get(type(obj), _UNPLANNED)
        if plan is not None:
            omit_defaults(obj)
        return self._encode(obj)


#: The Header's default deadline object (the one msgspec compares against).
_NO_DEADLINE = Header.__struct_defaults__[
    Header.__struct_fields__.index("deadline") - len(Header.__struct_fields__) + len(Header.__struct_defaults__)]


def tag_of(body: Any) -> str | None:
    """The ``type`` key of an encoded body (frame 2), without decoding the rest; None when
    the body is not a msgpack map with a string ``type``."""
    try:
        value = msgspec.msgpack.decode(body, type=_Tagged)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return value.type or None


def check_tag(header_type: str, body: Any) -> None:
    """PROTOCOL.md 3.3: the body's tag must be the header's type; TypeMismatch if not (a
    body without a tag is a DecodeError)."""
    tag = tag_of(body)
    if tag is None:
        raise DecodeError(f"body of {header_type!r}", "it is not a map with a string 'type' (the tag)")
    if tag != header_type:
        raise TypeMismatch(header_type, tag)


class _Tagged(msgspec.Struct):
    """A body read only for its tag (other keys ignored)."""

    type: str = ""


class Codec:
    """One encoder and one header decoder, built once per socket.

    ``pack`` builds the frame list; ``unpack`` validates the layout and decodes the header,
    leaving the body to the typed decoder of whoever handles that message type.
    """

    __slots__ = ("_enc", "_hdr", "max_size")

    def __init__(self, max_size: int = 64 * 1024 * 1024) -> None:
        self._enc = MessageEncoder()
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
