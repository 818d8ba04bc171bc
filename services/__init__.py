"""The edgebus service SDK: connect to the bus, serve typed requests, call, publish,
subscribe; and the system services built with it (one subpackage each)."""

from ._bus import BusClient, Incoming, connect, endpoint_for_run_dir, read_credential
from ._exceptions import (
    BadMessage,
    BusError,
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    Forbidden,
    InternalError,
    Overloaded,
    Rejected,
    RemoteError,
    Unauthenticated,
    Unavailable,
    UnknownDestination,
    UnknownType,
    error_from_wire,
)
from ._logging import configure_logging, get_logger
from ._service import EXIT_BUS, EXIT_CONFIG, Context, Service, run, serve

__all__ = [
    "BusClient", "Incoming", "connect", "endpoint_for_run_dir", "read_credential",
    "BusError", "ConnectError", "ConnectionLost", "RemoteError", "Forbidden", "Unauthenticated",
    "UnknownDestination", "UnknownType", "BadMessage", "DeadlineExceeded", "Unavailable",
    "Overloaded", "Rejected", "InternalError", "error_from_wire",
    "configure_logging", "get_logger",
    "Service", "Context", "run", "serve", "EXIT_BUS", "EXIT_CONFIG",
]
