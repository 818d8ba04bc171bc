"""Byte-exact test vectors for the wire protocol (protocols/PROTOCOL.md, "Test vectors").

``VECTORS`` maps a name to ``(header, body, raw)``: the ``protocols.Header`` of frame 1, the
body Struct of frame 2, and the raw frames 3.. that follow it.  ``Codec().pack(header, body,
raw)`` must give exactly the frames documented in PROTOCOL.md, and decoding those frames
(header with ``Decoder(Header)``, body with ``Decoder(type(body))``) must give these objects
back.  Every value is fixed, so the bytes never change.  A float-typed field holds a float
(``factor=2.0``, never ``2``: msgspec would encode the int as an integer), as section 18's
decoded forms show it with a decimal point; test_protocol_vectors compares number kinds.

The example system: a service ``calc`` (serves ``Add`` and ``Scale``, publishes on
``calc.stats``) and a client ``app``.  This module holds data only, no tests.
"""

from __future__ import annotations

import msgspec

from protocols import (
    Bye,
    Error,
    ErrorCode,
    GetService,
    Header,
    Heartbeat,
    Hello,
    Kind,
    Ready,
    Subscribe,
    Subscribed,
    Tensor,
    Welcome,
)

__all__ = ["Add", "Sum", "Scale", "Stats", "CREDENTIAL", "DEADLINE", "TENSOR_BYTES", "VECTORS"]


# -- the application types the vectors use (what a real service would define) ---------------


class Add(msgspec.Struct, tag=True):
    a: int
    b: int


class Sum(msgspec.Struct, tag=True):
    value: int


class Scale(msgspec.Struct, tag=True):
    """Multiply a tensor by ``factor``; the tensor's bytes travel in raw frame ``x.frame``."""

    factor: float
    x: Tensor


class Stats(msgspec.Struct, tag=True):
    served: int


#: A stand-in for the 43-character token the kernel issues (``secrets.token_urlsafe(32)``).
CREDENTIAL = "edgebus-test-credential-0123456789abcdefXYZ"

#: 2023-11-14T22:13:20.25Z; exactly representable as a float64.
DEADLINE = 1700000000.25

#: float32 [[1.0, 2.5], [-3.0, 0.5]], little-endian, C order (struct.pack("<4f", ...)).
TENSOR_BYTES = bytes([
    0x00, 0x00, 0x80, 0x3F,  # 1.0
    0x00, 0x00, 0x20, 0x40,  # 2.5
    0x00, 0x00, 0x40, 0xC0,  # -3.0
    0x00, 0x00, 0x00, 0x3F,  # 0.5
])

_K = "kernel"

VECTORS: dict[str, tuple[Header, msgspec.Struct, list[bytes]]] = {
    # --- handshake ------------------------------------------------------------------------
    "hello": (
        Header(kind=Kind.CONTROL, type="Hello", id=1),
        Hello(service="calc", credential=CREDENTIAL, pid=4242, types=["Add", "Scale"]),
        [],
    ),
    "welcome": (
        # The kernel's default bus config: every Welcome field but the name is a default.
        Header(kind=Kind.REPLY, type="Welcome", id=1, sender=_K),
        Welcome(name="calc"),
        [],
    ),
    "welcome_custom": (
        Header(kind=Kind.REPLY, type="Welcome", id=1, sender=_K),
        Welcome(name="calc", heartbeat_interval=0.5, heartbeat_liveness=5,
                max_message_size=16 * 1024 * 1024),
        [],
    ),
    "error_unauthenticated": (
        Header(kind=Kind.ERROR, type="Error", id=1, sender=_K),
        Error(code=ErrorCode.UNAUTHENTICATED,
              message="this credential belongs to 'calc', not 'app'"),
        [],
    ),
    "ready": (
        Header(kind=Kind.CONTROL, type="Ready"),
        Ready(),
        [],
    ),
    # --- liveness -------------------------------------------------------------------------
    "heartbeat": (
        Header(kind=Kind.CONTROL, type="Heartbeat"),
        Heartbeat(),
        [],
    ),
    "heartbeat_kernel": (
        Header(kind=Kind.CONTROL, type="Heartbeat", sender=_K),
        Heartbeat(),
        [],
    ),
    "bye": (
        Header(kind=Kind.CONTROL, type="Bye"),
        Bye(reason="SIGTERM"),
        [],
    ),
    # --- subscriptions --------------------------------------------------------------------
    "subscribe": (
        Header(kind=Kind.CONTROL, type="Subscribe", id=2),
        Subscribe(topics=["calc."]),
        [],
    ),
    "subscribed": (
        Header(kind=Kind.REPLY, type="Subscribed", id=2, sender=_K),
        Subscribed(topics=["calc."]),
        [],
    ),
    # --- a request, as sent and as delivered; its reply, as sent and as delivered ----------
    "request": (
        Header(kind=Kind.REQUEST, type="Add", dest="calc", id=7, deadline=DEADLINE),
        Add(a=2, b=3),
        [],
    ),
    "request_routed": (
        Header(kind=Kind.REQUEST, type="Add", dest="calc", id=1042, deadline=DEADLINE, sender="app"),
        Add(a=2, b=3),
        [],
    ),
    "reply": (
        Header(kind=Kind.REPLY, type="Sum", id=1042),
        Sum(value=5),
        [],
    ),
    "reply_routed": (
        Header(kind=Kind.REPLY, type="Sum", id=7, sender="calc"),
        Sum(value=5),
        [],
    ),
    # --- errors from the kernel -----------------------------------------------------------
    "error_forbidden": (
        Header(kind=Kind.ERROR, type="Error", id=7, sender=_K),
        Error(code=ErrorCode.FORBIDDEN, message="'app' lacks the capability 'call:calc.Add'",
              capability="call:calc.Add"),
        [],
    ),
    "error_timeout": (
        Header(kind=Kind.ERROR, type="Error", id=7, sender=_K),
        Error(code=ErrorCode.TIMEOUT, message="'calc' did not answer 'Add' before the deadline"),
        [],
    ),
    # --- an event, as delivered to a subscriber -------------------------------------------
    "event": (
        Header(kind=Kind.EVENT, type="Stats", dest="calc.stats", sender="calc"),
        Stats(served=12),
        [],
    ),
    # --- the kernel's API -----------------------------------------------------------------
    "kernel_get_service": (
        Header(kind=Kind.REQUEST, type="GetService", dest="kernel", id=3, deadline=DEADLINE),
        GetService(name="calc"),
        [],
    ),
    # --- a request carrying one tensor ----------------------------------------------------
    "request_tensor": (
        Header(kind=Kind.REQUEST, type="Scale", dest="calc", id=8, deadline=DEADLINE),
        Scale(factor=2.0, x=Tensor(dtype="float32", shape=[2, 2], frame=0)),
        [TENSOR_BYTES],
    ),
}
