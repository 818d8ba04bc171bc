"""Errors raised while encoding or decoding bus frames.

Hierarchy::

    ProtocolError
    ├── FrameError          the multipart layout is wrong (frame count, signature, size)
    ├── VersionError        the peer speaks an incompatible major protocol version
    └── DecodeError         a header or body does not decode into its msgspec type
        └── TypeMismatch    the body's tag disagrees with the header's type
"""

from __future__ import annotations

__all__ = ["ProtocolError", "FrameError", "VersionError", "DecodeError", "TypeMismatch"]


class ProtocolError(Exception):
    """Base class: a message that does not follow protocols/PROTOCOL.md."""


class FrameError(ProtocolError):
    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(f"malformed message: {problem}")


class VersionError(ProtocolError):
    def __init__(self, got: int, supported: int) -> None:
        self.got = got
        self.supported = supported
        super().__init__(
            f"protocol major version {got} is not supported (this side speaks {supported}); "
            "upgrade the older peer"
        )


class DecodeError(ProtocolError):
    def __init__(self, part: str, detail: str) -> None:
        self.part = part
        self.detail = detail
        super().__init__(f"{part} does not decode: {detail}")


class TypeMismatch(DecodeError):
    def __init__(self, header_type: str, body_type: str) -> None:
        self.header_type = header_type
        self.body_type = body_type
        ProtocolError.__init__(
            self,
            f"body is a {body_type!r} but the header says {header_type!r}; they must agree",
        )
        self.part = "body"
        self.detail = str(self)
