"""The edgebus wire protocol: frame layout, headers, and every message type.

The bus's own types are re-exported here; each system channel has its module, one tagged
union per channel: ``protocols.security``, ``protocols.modelstore``, ``protocols.scheduler``,
``protocols.accel``, ``protocols.sensors``, ``protocols.health``.  The language-neutral
specification is ``protocols/PROTOCOL.md``.
"""

from ._exceptions import DecodeError, FrameError, ProtocolError, TypeMismatch, VersionError
from ._messages import *  # noqa: F401,F403  (the message types; __all__ is explicit there)
from ._messages import __all__ as _message_names
from ._tensors import dtype_name, pack_tensors, unpack_tensor
from ._wire import (
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    SIGNATURE,
    BodyDecoder,
    Codec,
    Header,
    Kind,
    MessageEncoder,
    body_tag,
    check_signature,
    check_tag,
    omit_defaults,
    tag_of,
)

__all__ = [
    "ProtocolError", "FrameError", "VersionError", "DecodeError", "TypeMismatch",
    "PROTOCOL_MAJOR", "PROTOCOL_MINOR", "SIGNATURE", "Kind", "Header", "Codec", "BodyDecoder",
    "body_tag", "check_signature", "dtype_name", "pack_tensors", "unpack_tensor",
    "MessageEncoder", "omit_defaults", "tag_of", "check_tag",
    *_message_names,
]
