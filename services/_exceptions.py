"""Errors a service or client sees on the bus.

Hierarchy::

    BusError
    ├── ConnectError           the kernel cannot be reached, or refused the Hello
    ├── ConnectionLost         the kernel went silent or closed the connection
    └── RemoteError            an ERROR came back (from the kernel or the called service)
        ├── Forbidden          (forbidden; .capability names what is missing)
        ├── Unauthenticated
        ├── UnknownDestination
        ├── UnknownType
        ├── BadMessage
        ├── DeadlineExceeded   (timeout; also raised locally when a call's deadline passes)
        ├── Unavailable
        ├── Overloaded
        ├── Rejected           (understood, refused given the state: an invalid config to reload)
        └── InternalError

Not a bus error: ``SettingsError``, the service's settings do not decode (the service
exits 78, naming the key).

A handler raises a RemoteError subclass to answer with that code; any other exception
becomes ``internal`` (and is logged with its traceback), and the service keeps running.
"""

from __future__ import annotations

from protocols import Error, ErrorCode

__all__ = [
    "BusError", "ConnectError", "ConnectionLost", "RemoteError", "Forbidden", "Unauthenticated",
    "UnknownDestination", "UnknownType", "BadMessage", "DeadlineExceeded", "Unavailable",
    "Overloaded", "Rejected", "InternalError", "error_from_wire", "lone_exception", "SettingsError",
]


class SettingsError(Exception):
    """The settings table of a service does not decode into its declared type."""

    def __init__(self, service: str, key: str, problem: str) -> None:
        self.service = service
        self.key = key
        self.problem = problem
        super().__init__(f"invalid settings of {service or 'this service'!r} at {key}: {problem}")


class BusError(Exception):
    """Base class of every bus error."""


class ConnectError(BusError):
    def __init__(self, endpoint: str, reason: str) -> None:
        self.endpoint = endpoint
        self.reason = reason
        super().__init__(f"cannot join the bus at {endpoint}: {reason}")


class ConnectionLost(BusError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"lost the connection to the kernel: {reason}")


class RemoteError(BusError):
    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, capability: str = "", sender: str = "") -> None:
        self.message = message
        self.capability = capability
        self.sender = sender
        super().__init__(f"{self.code.value}: {message}")

    def to_wire(self) -> Error:
        return Error(code=self.code, message=self.message, capability=self.capability)


class Forbidden(RemoteError):
    code = ErrorCode.FORBIDDEN


class Unauthenticated(RemoteError):
    code = ErrorCode.UNAUTHENTICATED


class UnknownDestination(RemoteError):
    code = ErrorCode.UNKNOWN_DESTINATION


class UnknownType(RemoteError):
    code = ErrorCode.UNKNOWN_TYPE


class BadMessage(RemoteError):
    code = ErrorCode.BAD_MESSAGE


class DeadlineExceeded(RemoteError):
    code = ErrorCode.TIMEOUT


class Unavailable(RemoteError):
    code = ErrorCode.UNAVAILABLE


class Overloaded(RemoteError):
    code = ErrorCode.OVERLOADED


class Rejected(RemoteError):
    code = ErrorCode.REJECTED


class InternalError(RemoteError):
    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[RemoteError]] = {
    cls.code: cls
    for cls in (Forbidden, Unauthenticated, UnknownDestination, UnknownType, BadMessage,
                DeadlineExceeded, Unavailable, Overloaded, Rejected, InternalError)
}


def lone_exception(group: BaseExceptionGroup) -> BaseException | None:
    """The single exception inside (possibly nested) one-member groups, else None."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


def error_from_wire(err: Error, sender: str = "") -> RemoteError:
    return _BY_CODE.get(err.code, InternalError)(err.message, capability=err.capability, sender=sender)
