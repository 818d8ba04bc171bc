"""Every message type the bus itself defines, one tagged union per channel.

Channels:

* ``Control``: handshake and liveness between a peer and the kernel (header kind CONTROL).
* ``KernelRequest``: the kernel's own API, addressed to the destination ``"kernel"``.
* ``KernelReply``: what the kernel answers to those.
* ``KernelEvent``: what the kernel publishes (``kernel.services``, ``kernel.monitor``).
* ``Error``: the body of every message of kind ERROR.

New fields always get defaults, so older peers keep decoding newer messages.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

__all__ = [
    "ErrorCode", "Error",
    "Hello", "Welcome", "Ready", "Heartbeat", "Bye", "Subscribe", "Unsubscribe", "Subscribed",
    "Control", "ControlReply",
    "ListServices", "GetService", "Introspect", "ListCapabilities", "Monitor", "StopMonitor",
    "StartService", "StopService", "RestartService", "Reload", "Grant", "Revoke", "Reset", "Enroll",
    "ListEnrollments", "GetMeasurements", "KernelRequest",
    "ServiceStatus", "ServiceList", "Interface", "CapabilityEntry", "CapabilityTable", "Monitoring", "Reloaded",
    "Measurement", "Measurements", "Granted", "EnrollmentEntry", "Enrollments", "KernelReply",
    "Traffic", "ServiceStateChanged", "AuditEvent", "KernelEvent",
    "GetLogs", "LogRecord", "LogRecords",
    "Tensor",
]


class ErrorCode(str, enum.Enum):
    FORBIDDEN = "forbidden"
    UNAUTHENTICATED = "unauthenticated"
    UNKNOWN_DESTINATION = "unknown-destination"
    UNKNOWN_TYPE = "unknown-type"
    BAD_MESSAGE = "bad-message"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    OVERLOADED = "overloaded"
    #: Understood, but refused given the state of things (e.g. an invalid config on reload).
    REJECTED = "rejected"
    INTERNAL = "internal"


class Error(msgspec.Struct, tag=True, omit_defaults=True):
    code: ErrorCode
    message: str
    #: For ``forbidden``: the capability the sender lacks, e.g. ``call:modelstore.Activate``.
    capability: str = ""


# --- control channel -------------------------------------------------------------------


class Hello(msgspec.Struct, tag=True, omit_defaults=True):
    """First message of every peer.  Answered by a REPLY carrying ``Welcome`` or an ERROR."""

    service: str
    #: Secret handed to the service at spawn (see PROTOCOL.md "Credentials").
    credential: str = ""
    pid: int = 0
    #: Request types this peer serves; empty for a pure client.
    types: list[str] = []
    #: JSON Schema (msgspec.json.schema) of the request union and of the replies.
    schema: dict[str, Any] = {}
    reply_schema: dict[str, Any] = {}
    #: Topics this peer publishes on (informational, shown by introspection).
    publishes: list[str] = []
    minor: int = 0


class Welcome(msgspec.Struct, tag=True, omit_defaults=True):
    #: The name the kernel authenticated; the peer's messages are stamped with it.
    name: str
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3
    max_message_size: int = 64 * 1024 * 1024
    minor: int = 0
    #: The service's settings table from the system config (``[services.<name>.settings]``),
    #: as the config has it; the service decodes it into its own type.
    settings: dict[str, Any] = {}


class Ready(msgspec.Struct, tag=True):
    """The peer finished its own initialisation and serves requests from now on."""


class Heartbeat(msgspec.Struct, tag=True):
    pass


class Bye(msgspec.Struct, tag=True, omit_defaults=True):
    reason: str = ""


class Subscribe(msgspec.Struct, tag=True):
    #: Topic prefixes; each needs a ``subscribe:`` capability covering it.
    topics: list[str]


class Unsubscribe(msgspec.Struct, tag=True):
    topics: list[str]


class Subscribed(msgspec.Struct, tag=True):
    topics: list[str]


Control = Hello | Ready | Heartbeat | Bye | Subscribe | Unsubscribe
ControlReply = Welcome | Subscribed


# --- the kernel's API (destination "kernel") ---------------------------------------------


class ListServices(msgspec.Struct, tag=True):
    pass


class GetService(msgspec.Struct, tag=True):
    name: str


class Introspect(msgspec.Struct, tag=True):
    name: str


class ListCapabilities(msgspec.Struct, tag=True, omit_defaults=True):
    #: One service, or every one when empty.
    name: str = ""


class Monitor(msgspec.Struct, tag=True, omit_defaults=True):
    """Copy a summary of routed traffic to the caller as ``Traffic`` events.

    Filters are exact names (``message_type`` is the header type) except ``topic``, which is a prefix.  Empty means any.
    ``service`` matches the sender or the destination.
    """

    service: str = ""
    message_type: str = ""
    topic: str = ""


class StopMonitor(msgspec.Struct, tag=True):
    pass


class StartService(msgspec.Struct, tag=True):
    """Start a stopped or failed service; answered when it is ready (or failed)."""

    name: str


class StopService(msgspec.Struct, tag=True):
    """Stop a service (stop signal, grace, SIGKILL of its group) and keep it stopped."""

    name: str


class RestartService(msgspec.Struct, tag=True):
    """Stop then start; under rest_for_one, the services requiring it restart too."""

    name: str


class Reload(msgspec.Struct, tag=True):
    """Re-read the config file (as SIGHUP does); an invalid one changes nothing."""


class Grant(msgspec.Struct, tag=True, omit_defaults=True):
    """Add a capability to a principal at run time (only the security service may).
    ``name`` must be a principal: a configured service or ``operator``."""

    name: str
    capability: str
    #: Unix time after which the grant no longer counts; 0 means never.  Finite, >= 0.
    expires: float = 0.0


class Revoke(msgspec.Struct, tag=True):
    """Withdraw a capability, granted or configured (only the security service may)."""

    name: str
    capability: str


class Reset(msgspec.Struct, tag=True):
    """Withdraw the run-time grant or revocation of exactly ``capability``: the principal is
    back to what its configuration says (only the security service may)."""

    name: str
    capability: str


class Enroll(msgspec.Struct, tag=True, omit_defaults=True):
    """Let a CurveZMQ public key (Z85) connect over tcp as ``name``; empty key: unenroll.
    A run-time decision: it wins over the key the configuration enrols for ``name`` until
    reset (``reset``: withdraw it, the configuration's key applies again).  Sessions open
    with a key no longer enrolled end at once.  Only the security service may."""

    name: str
    public_key: str = ""
    reset: bool = False


class ListEnrollments(msgspec.Struct, tag=True, omit_defaults=True):
    """The CURVE enrolment of each service that may connect over tcp (one, or all when
    empty), with where its key comes from."""

    name: str = ""


class GetLogs(msgspec.Struct, tag=True, omit_defaults=True):
    """The log records the kernel keeps of some services (every one when ``services`` is
    empty), oldest first: each service's own log lines and captured output, and the
    kernel's lines about it (``service`` ``kernel``: the kernel's other lines)."""

    services: list[str] = []
    #: At most this many records, the newest; 0: every one kept.
    lines: int = 0
    #: Only records logged at or after this Unix time; 0: any.
    since: float = 0.0
    #: Only records after this sequence number (``LogRecords.last`` of an earlier answer).
    after: int = 0


class GetMeasurements(msgspec.Struct, tag=True):
    """The measurement log of what the kernel started (for attestation)."""


KernelRequest = (ListServices | GetService | Introspect | ListCapabilities | Monitor | StopMonitor
                 | StartService | StopService | RestartService | Reload | Grant | Revoke | Reset | Enroll
                 | ListEnrollments | GetMeasurements | GetLogs)



class ServiceStatus(msgspec.Struct, tag=True):
    name: str
    #: configured (not started) | starting | ready | stopping | stopped | failed |
    #: backoff | connected (a peer the kernel did not start)
    state: str
    pid: int = 0
    connected: bool = False
    managed: bool = False
    types: list[str] = []
    requires: list[str] = []
    capabilities: list[str] = []
    subscriptions: list[str] = []
    restarts: int = 0
    uptime: float = 0.0
    last_exit: str = ""
    requests_in: int = 0
    requests_out: int = 0
    events_out: int = 0
    denied: int = 0
    pending: int = 0
    #: Messages to it the kernel could not deliver (its queue was full): events and
    #: heartbeats dropped, and answers lost when its session ended for not reading them.
    dropped: int = 0
    #: Unix time at which it entered its current state (0: unknown, e.g. a peer the kernel
    #: did not start).
    since: float = 0.0
    #: The command the kernel runs it with (``{python}`` replaced); empty for other peers.
    command: list[str] = []
    #: Resident memory of its process in bytes (/proc), read when asked; 0 when not running.
    memory: int = 0


class ServiceList(msgspec.Struct, tag=True):
    services: list[ServiceStatus]


class Interface(msgspec.Struct, tag=True, omit_defaults=True):
    name: str
    types: list[str] = []
    schema: dict[str, Any] = {}
    reply_schema: dict[str, Any] = {}
    publishes: list[str] = []


class CapabilityEntry(msgspec.Struct, tag=True, omit_defaults=True):
    """One pattern of a principal and where it comes from."""

    capability: str
    #: ``config`` (the configuration), ``grant`` (a run-time grant) or ``revocation`` (a
    #: run-time revocation: a deny pattern, listed with ``!`` in ``table``)
    origin: str
    #: For a grant: the Unix time at which it lapses; 0: never.
    expires: float = 0.0


class CapabilityTable(msgspec.Struct, tag=True, omit_defaults=True):
    #: service name -> capability patterns (revoked ones prefixed ``!``)
    table: dict[str, list[str]]
    #: principal name -> every configured pattern, run-time grant and revocation, with its
    #: origin and expiry (also for a configured service not started yet that has run-time ones)
    entries: dict[str, list[CapabilityEntry]] = {}


class Monitoring(msgspec.Struct, tag=True):
    topic: str = "kernel.monitor"


class Reloaded(msgspec.Struct, tag=True):
    started: list[str] = []
    stopped: list[str] = []
    restarted: list[str] = []
    unchanged: list[str] = []


class Measurement(msgspec.Struct, tag=True, omit_defaults=True):
    """One measured start: sha256 of the service's code and of its config section."""

    service: str
    code: str
    config: str
    #: sha256(code digest || config digest): what was extended into the PCR.
    digest: str
    argv: list[str] = []
    time: float = 0.0


class Measurements(msgspec.Struct, tag=True):
    #: Extended like a TPM PCR: pcr' = sha256(pcr || digest), from 32 zero bytes.
    pcr: str
    log: list[Measurement]


class Granted(msgspec.Struct, tag=True):
    name: str
    capabilities: list[str]


class EnrollmentEntry(msgspec.Struct, tag=True, omit_defaults=True):
    """The CURVE enrolment of one service configured without a ``command``."""

    name: str
    #: The key in force (Z85), empty when none is.
    public_key: str = ""
    #: Where it comes from: ``config`` (the configuration's ``curve_public_key``),
    #: ``enrolment`` (enrolled at run time) or ``unenrolment`` (unenrolled at run time, the
    #: configuration's key withdrawn); empty when neither enrols one.  Run-time decisions
    #: win over the configuration until reset (``busctl security reset NAME``).
    origin: str = ""
    #: The key the configuration enrols for it (what a reset brings back), if any.
    config_key: str = ""
    #: A session is open with the key in force.
    connected: bool = False


class Enrollments(msgspec.Struct, tag=True):
    entries: list[EnrollmentEntry]


# --- logs (GetLogs, kernel.logs.<service>) ----------------------------------------------------


class LogRecord(msgspec.Struct, tag=True, omit_defaults=True):
    """One log line the kernel kept: in ``LogRecords``, and published on
    ``kernel.logs.<service>`` as it is logged."""

    #: Increases by one with every record the kernel keeps, across services.
    seq: int
    #: Unix time.
    time: float
    #: The service the line is about (its own lines, or the kernel's about it).
    service: str
    #: debug | info | warning | error | critical
    level: str
    event: str
    #: The part of the program that logged it: supervisor, router or kernel for the
    #: kernel's lines about the service; a service's own lines may name one of theirs (the
    #: SDK's ``bus``), its other output none.
    component: str = ""
    #: The line's other fields.  Output that is not a JSON log line is event ``output``
    #: with fields ``stream`` (stdout|stderr) and ``line``.
    fields: dict[str, Any] = {}


class LogRecords(msgspec.Struct, tag=True, omit_defaults=True):
    records: list[LogRecord]
    #: The newest record's sequence number, kept or not by this selection: the cursor for
    #: ``GetLogs.after``.
    last: int = 0
    #: How many records the kernel keeps per service (``[logs] lines_per_service``).
    lines_per_service: int = 0
    #: Matching records left out (the oldest) to keep the answer under 8 MiB.
    omitted: int = 0


KernelReply = (ServiceList | ServiceStatus | Interface | CapabilityTable | Monitoring | Reloaded
               | Measurements | Granted | LogRecords | Enrollments)


class Traffic(msgspec.Struct, tag=True, omit_defaults=True):
    """One routed (or refused) message, as seen by the kernel."""

    time: float
    kind: str
    message_type: str
    sender: str
    dest: str = ""
    id: int = 0
    size: int = 0
    frames: int = 0
    #: Empty when delivered; otherwise the error code the kernel answered with.
    outcome: str = ""
    #: The message's msgpack body (frame 2) when it is at most 4096 bytes, else empty.
    body: bytes = b""
    #: The length of that body, shown or not.
    body_size: int = 0
    #: For an error message: the code it carries.
    error: str = ""


class ServiceStateChanged(msgspec.Struct, tag=True, omit_defaults=True):
    name: str
    state: str
    previous: str = ""
    pid: int = 0
    detail: str = ""


class AuditEvent(msgspec.Struct, tag=True, omit_defaults=True):
    """What the kernel reports for the audit log, on ``kernel.audit``."""

    #: denied | authentication-failed | service-crashed | service-restarted |
    #: service-failed | granted | revoked | reset | grant-expired | enrolled | unenrolled |
    #: enrolment-reset | audit-records-lost
    kind: str
    subject: str
    detail: str = ""
    capability: str = ""
    time: float = 0.0


KernelEvent = Traffic | ServiceStateChanged | AuditEvent | LogRecord


# --- tensors -------------------------------------------------------------------------------


class Tensor(msgspec.Struct, omit_defaults=True, array_like=False):
    """Describes one raw frame that carries a tensor's bytes (C order, little-endian).

    ``frame`` indexes the raw frames that follow the body (0 is the first after the body).
    ``name`` is the model's name for the tensor (an input or output of its contract);
    unnamed tensors are taken in the contract's order.  With ``region``, the bytes are in
    that shared-memory region of the sender's, from byte ``offset``, and ``frame`` is not
    used (``protocols.shm``, PROTOCOL.md 3.6).
    """

    dtype: str
    shape: list[int]
    frame: int = 0
    name: str = ""
    region: str = ""
    offset: int = 0
