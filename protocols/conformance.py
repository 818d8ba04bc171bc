"""The conformance service: what a peer under test serves so that ``edgebus conformance``
can drive it through the real kernel (PROTOCOL.md, appendix "Conformance").

The peer is a service named ``conformance`` (its name comes from ``EDGEBUS_SERVICE``) that
serves the requests below; a peer in any language implements the same maps.
"""

from __future__ import annotations

import msgspec

from ._messages import Tensor

__all__ = [
    "SERVICE", "TOPICS", "DENIED", "Echo", "Sleep", "Publish", "Listen", "Received", "Fail",
    "Request", "Echoed", "Slept", "Published", "Listening", "Seen", "Notes", "Reply", "Note", "TYPES",
]

#: The name the suite configures for the peer under test.
SERVICE = "conformance"
#: The topics the peer may publish and subscribe to (``publish:``/``subscribe:conformance.*``).
TOPICS = "conformance."
#: A prefix the peer holds no capability for.
DENIED = "private."


class Echo(msgspec.Struct, tag=True, omit_defaults=True):
    """Answered ``Echoed`` with the same text and tensors, and the same raw frames; a tensor
    that breaks section 3.4 is answered ``bad-message``."""

    text: str = ""
    tensors: list[Tensor] = []


class Sleep(msgspec.Struct, tag=True):
    """Answered ``Slept`` after ``seconds``, or ``timeout`` when the deadline comes first."""

    seconds: float


class Publish(msgspec.Struct, tag=True, omit_defaults=True):
    """Publish a ``Note`` with ``text`` on ``topic``, then answer ``Published``."""

    topic: str
    text: str = ""


class Listen(msgspec.Struct, tag=True):
    """Subscribe (control ``Subscribe``) to ``topics``; answered ``Listening`` with the
    kernel's ``Subscribed.topics``, or the kernel's error (code and capability) as is."""

    topics: list[str]


class Received(msgspec.Struct, tag=True):
    """Answered ``Notes``: the ``Note`` events received since the last ``Received``."""


class Fail(msgspec.Struct, tag=True, omit_defaults=True):
    """Answered with an error of ``code`` (any code of section 12) and ``message``."""

    code: str
    message: str = ""


class Echoed(msgspec.Struct, tag=True, omit_defaults=True):
    text: str = ""
    tensors: list[Tensor] = []
    #: the requester, as the kernel stamped it
    sender: str = ""


class Slept(msgspec.Struct, tag=True):
    seconds: float


class Published(msgspec.Struct, tag=True):
    topic: str


class Listening(msgspec.Struct, tag=True):
    topics: list[str]


class Seen(msgspec.Struct, omit_defaults=True):
    """One event received: its topic, its stamped sender and its ``Note.text``."""

    topic: str
    sender: str
    text: str = ""


class Notes(msgspec.Struct, tag=True):
    notes: list[Seen]


class Note(msgspec.Struct, tag=True, omit_defaults=True):
    """The event the suite and the peer publish to each other."""

    text: str = ""


Request = Echo | Sleep | Publish | Listen | Received | Fail
Reply = Echoed | Slept | Published | Listening | Notes
#: The request types the peer must list in ``Hello.types``.
TYPES = ("Echo", "Sleep", "Publish", "Listen", "Received", "Fail")
