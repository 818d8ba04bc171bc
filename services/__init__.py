"""The edgebus service SDK: connect to the bus, serve typed requests, call, publish,
subscribe; and the system services built with it (one subpackage each)."""

from ._bus import BusClient, Incoming, Subscription, connect, endpoint_for_run_dir, read_credential
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
    SettingsError,
    error_from_wire,
)
from ._files import atomic_write
from ._settings import Settings, config_dir, decode_settings, service_class
from protocols.runtime import EXIT_BUS, EXIT_CONFIG, configure_logging, get_logger
from ._service import Context, Service, run, serve
from ._shm import SharedRegion

__all__ = [
    "BusClient", "Incoming", "Subscription", "connect", "endpoint_for_run_dir", "read_credential",
    "BusError", "ConnectError", "ConnectionLost", "RemoteError", "Forbidden", "Unauthenticated",
    "UnknownDestination", "UnknownType", "BadMessage", "DeadlineExceeded", "Unavailable",
    "Overloaded", "Rejected", "InternalError", "error_from_wire",
    "configure_logging", "get_logger", "SettingsError", "Settings", "config_dir", "decode_settings",
    "service_class", "atomic_write",
    "Service", "Context", "run", "serve", "EXIT_BUS", "EXIT_CONFIG", "SharedRegion",
]
