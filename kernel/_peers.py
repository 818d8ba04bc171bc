"""Who is on the bus: principals (what a credential authenticates), connected peers, and
the requests routed to them and not yet answered."""

from __future__ import annotations

import collections
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from protocols import Hello

from ._caps import CapabilitySet

__all__ = ["Principal", "Peer", "Pending", "RouterStatistics"]


@dataclass(eq=False)
class Principal:
    """Who a credential authenticates: a configured service, or the operator role."""

    name: str
    caps: CapabilitySet
    #: Several peers may hold this credential at once (busctl); each gets ``name.N``.
    shared: bool = False
    credential: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    #: The configured capabilities; ``caps`` adds run-time grants and removes revocations.
    base: tuple[str, ...] = ()
    #: A service the kernel does not start: it may be enrolled to connect over CURVE.
    external: bool = False
    #: The service's settings table from the config, handed over in Welcome.
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.base:
            self.base = self.caps.patterns


class Peer:
    """One authenticated connection."""

    __slots__ = (
        "identity", "name", "principal", "types", "hello", "ready", "last_seen", "cache", "calls",
        "subscriptions", "pending", "denials", "requests_in", "requests_out", "events_out",
        "denied", "dropped", "backlog", "backlog_bytes",
    )

    def __init__(self, identity: bytes, name: str, principal: Principal, hello: Hello) -> None:
        self.identity = identity
        self.name = name
        self.principal = principal
        self.hello = hello
        self.types = frozenset(hello.types)
        self.ready = False
        self.last_seen = time.monotonic()
        #: (kind, action, target) -> allowed; cleared whenever the capability table changes.
        self.cache: dict[tuple[int, str, str], bool] = {}
        #: (service, type) -> allowed, for requests: the per-message check is one lookup.
        self.calls: dict[tuple[str, str], bool] = {}
        self.subscriptions: set[str] = set()
        #: Requests routed to this peer and not yet answered.  (Which ones is found by a
        #: scan of the pending table when the peer goes away: rare, so the hot path only
        #: keeps a count.)
        self.pending = 0
        #: capability -> times denied (for rate-limited logging and auditing)
        self.denials: dict[str, int] = {}
        self.requests_in = self.requests_out = self.events_out = self.denied = self.dropped = 0
        #: Answers (replies, errors) that did not fit in its queue, in order, each with its
        #: size in bytes, and their total (-1: overflowed, the session ends): delivered as
        #: it reads (RouterCore._flush_backlogs).
        self.backlog: collections.deque[tuple[list[Any], int]] = collections.deque()
        self.backlog_bytes = 0

    def forget_permissions(self) -> None:
        """Drop the cached capability checks (the principal's capabilities changed)."""
        self.cache.clear()
        self.calls.clear()


class Pending(msgspec.Struct, gc=False):
    """A request routed to ``target`` and not yet answered, under the kernel's own id.

    A msgspec Struct: slotted and built in C, it costs the hot path no more than the tuple
    it replaced.  (``gc=False`` is safe: it refers to peers, which never refer back.)"""

    requester: Peer
    #: The requester's own id for it, put back on the reply.
    request_id: int
    target: Peer
    #: Monotonic time at which the requester is answered ``timeout``.
    expires: float
    type: str


@dataclass
class RouterStatistics:
    peers: int
    pending: int
    routed: int
    denied: int
    malformed: int
    stray_replies: int
    dropped_events: int
    #: Peers with answers waiting in the kernel (their queue was full), and sessions ended
    #: because such a backlog overflowed.
    backlogged: int = 0
    overflowed: int = 0
