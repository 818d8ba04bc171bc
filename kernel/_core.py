"""What every part of the router shares: the socket, the peer tables, the counters, and the
one way the kernel sends an answer.

The router is one object (``Router``, in _router.py) assembled from a part per job, each in
its own module and each a subclass of ``RouterCore``:

=================  ==========================================================================
_routing.py        the hot path: requests, replies, the pending table, expiry, flow control
_session.py        Hello/Welcome, credentials and CURVE identities, heartbeats, disconnects
_pubsub.py         subscriptions, the topic cache, publishing, kernel events, audit, monitors
_policy.py         principals, run-time grants and revocations, CURVE enrolment
_api.py            the kernel's own request API and the service statuses it reports
_router.py         the socket's lifecycle, the router thread, commands from the event loop
=================  ==========================================================================

Parts call each other through ``self`` (one flat object: the hot path pays no extra call or
attribute hop for the split).
"""

from __future__ import annotations

import ctypes
import functools
import time
from typing import Any

import msgspec
import zmq

from protocols import SIGNATURE, Error, ErrorCode, Header, Kind, MessageEncoder, body_tag
from protocols.transport import send_frames
from protocols.runtime import get_logger

from ._boundary import Mailbox, Notice
from ._config import BusConfig
from ._peers import Peer

log = get_logger(component="router")

REQUEST, REPLY, ERROR, EVENT, CONTROL = (int(k) for k in Kind)
KIND_NAMES = {int(k): k.name.lower() for k in Kind}
#: The sender name the kernel stamps on what it says itself.
KERNEL = "kernel"
#: The security service: the only one that may change the policy, the one the kernel's audit
#: backlog is handed to, and the one CURVE peers wait for after the kernel starts.
SECURITY = "security"
#: Per-peer caches (capability checks, denial counts) are cleared when they reach this size.
CACHE_LIMIT = 4096
NOBLOCK = int(zmq.NOBLOCK)
#: Sessions ended before the memory they freed is handed back to the system.
TRIM_AFTER = 64


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent elsewhere (musl)
    except (OSError, AttributeError):
        return None

#: More than a header can grow when the kernel stamps it: a sender name (at most 63
#: characters, plus ".N" for a shared credential's client) and an id of up to 9 bytes.
STAMP_ROOM = 256


def worth_logging(count: int) -> bool:
    """Rate limit for repeated warnings: the 1st, 10th, 100th, 1000th, then every 10000th."""
    return count in (1, 10, 100, 1000) or count % 10000 == 0


class Summary:
    """Counts a repeated refusal per source (a connection, a claimed name) and in all, and
    says which occurrences are worth a log line or an audit record: the 1st, 10th, 100th...
    of all, and of each source while sources' lines stay within ``budget`` a minute.  So
    input nobody authenticated cannot fill the disk, however many connections send it."""

    __slots__ = ("total", "_counts", "_budget", "_window_end", "_lines")

    def __init__(self, budget: int = 10) -> None:
        self.total = 0
        self._counts: dict[Any, int] = {}
        self._budget = budget
        self._window_end = 0.0
        self._lines = 0

    def count(self, source: Any) -> int:
        """Count one occurrence from ``source``: its count from that source if it is worth
        reporting, else 0."""
        self.total += 1
        counts = self._counts
        n = counts.get(source, 0) + 1
        if n == 1 and len(counts) >= CACHE_LIMIT:
            counts.clear()  # bounded: a flood of sources only resets the per-source counts
        counts[source] = n
        if worth_logging(self.total):
            return n
        if not worth_logging(n):
            return 0
        now = time.monotonic()
        if now >= self._window_end:
            self._window_end, self._lines = now + 60.0, 0
        self._lines += 1
        return n if self._lines <= self._budget else 0

    def forget(self, source: Any) -> None:
        self._counts.pop(source, None)


class RouterCore:
    """The shared state; see the module's docstring for the parts."""

    def _init_core(self, endpoint: str, config: BusConfig, ctx: zmq.Context, supervised: bool) -> None:
        self.endpoint = endpoint
        self.config = config
        self._ctx = ctx
        self._sock: zmq.Socket | None = None
        #: ROUTER identity -> peer, for every authenticated connection.
        self._peers: dict[bytes, Peer] = {}
        #: Service name -> peer (services only: shared credentials' clients are not named).
        self._by_name: dict[str, Peer] = {}
        #: Leaves out every field equal to its default, as PROTOCOL.md 3.1 says (msgspec alone
        #: would keep a computed one: a Welcome's heartbeat_interval read from the config).
        self._enc = MessageEncoder()
        #: What the router tells its supervisor; None when it runs without one.
        self.notices: Mailbox[Notice] | None = Mailbox() if supervised else None
        self._routed = self._denied = self._malformed = self._stray = self._dropped_events = 0
        self._unanswered = 0
        #: Malformed messages, by connection; Hellos refused for their credential, by
        #: connection; authentication-failed audit records, by claimed name.
        self._rejections = Summary()
        self._auth_failures = Summary()
        self._audit_failures = Summary()
        #: RCVTIMEO of the router socket while no backlog waits: the tick's period, in ms.
        self._idle_timeout = max(int(min(config.heartbeat_interval, 0.1) * 1000), 1)
        #: The size limit applies to messages as forwarded.  Stamping the sender and
        #: rewriting the id grow a header by less than STAMP_ROOM bytes: only a message that
        #: close to the limit has its forwarded size computed.
        self._max_size = config.max_message_size
        self._stamp_free_size = self._max_size - STAMP_ROOM
        #: Peers with answers waiting in their backlog (ROUTER identity -> peer).
        self._backlogged: dict[bytes, Peer] = {}
        #: A backlog beyond either bound ends the peer's session (it does not read).
        self._backlog_limit = max(10 * config.queue_limit, 10000)
        self._backlog_bytes_limit = max(2 * config.max_message_size, 64 * 1024 * 1024)
        #: Peers whose backlog overflowed: their sessions end at the next flush.
        self._overflowed: list[tuple[Peer, str]] = []
        self._overflows = 0
        #: Sessions ended since the last _trim_memory, and when the next is due (0: none).
        self._ended_since_trim = 0
        self._trim_at = 0.0

    def _notify(self, notice: Notice) -> None:
        if self.notices is not None:
            self.notices.put(notice)

    # -- sending ---------------------------------------------------------------------------

    def _sendv(self, parts: list[Any]) -> None:
        send_frames(self._sock, parts, NOBLOCK)  # type: ignore[arg-type]

    def _send(self, parts: list[Any], to: Peer | None = None) -> bool:
        """Deliver an event (or a monitor's record) ``parts``: a full queue drops it (counted
        in ``to.dropped``), a dead connection disconnects ``to``."""
        try:
            self._sendv(parts)
            return True
        except zmq.Again:
            if to is not None:
                self._count_drop(to)
            return False
        except zmq.ZMQError as exc:
            if to is not None and to.identity in self._peers:
                self.disconnect(to, f"send failed: {exc.strerror}")
            return False

    def _deliver(self, parts: list[Any], to: Peer) -> None:
        """Deliver an answer (a reply or error) ``parts`` to ``to``: never dropped.  When its
        queue is full the answer waits in its backlog, sent as it reads (_flush_backlogs)."""
        try:
            self._sendv(parts)
        except zmq.Again:
            self._hold(to, parts)
        except zmq.ZMQError as exc:
            if to.identity in self._peers:
                self.disconnect(to, f"send failed: {exc.strerror}")

    def _hold(self, to: Peer, parts: list[Any]) -> None:
        if self._peers.get(to.identity) is not to:
            return  # its session has ended: nothing is owed to it any more
        if to.backlog_bytes < 0:  # overflowed: the session ends at the next flush
            self._count_drop(to)
            return
        size = 0
        for p in parts[1:]:
            size += len(p)
        if not to.backlog:
            if not self._backlogged and self._sock is not None:
                self._sock.setsockopt(zmq.RCVTIMEO, 1)  # wake up often to flush (see run)
            self._backlogged[to.identity] = to
        to.backlog.append((list(parts), size))
        to.backlog_bytes += size
        if len(to.backlog) > self._backlog_limit or to.backlog_bytes > self._backlog_bytes_limit:
            why = (f"it does not read its messages: {len(to.backlog)} answers ({to.backlog_bytes} bytes) "
                   f"waited beyond its queue of bus.queue_limit = {self.config.queue_limit} messages")
            self._overflows += 1
            self._count_drop(to)
            to.dropped += len(to.backlog) - 1
            to.backlog.clear()
            to.backlog_bytes = -1
            self._overflowed.append((to, why))
            log.warning("peer_backlog_overflow", service=to.name, reason=why)

    def _flush_backlogs(self) -> None:
        """Send what waits in the backlogs, as far as each peer's queue takes it; end the
        sessions of the peers whose backlog overflowed."""
        while self._overflowed:
            peer, why = self._overflowed.pop()
            self._backlogged.pop(peer.identity, None)
            self.disconnect(peer, why)
        sendv = self._sendv
        for identity, peer in list(self._backlogged.items()):
            backlog = peer.backlog
            try:
                while backlog:
                    parts, size = backlog[0]
                    sendv(parts)
                    backlog.popleft()
                    peer.backlog_bytes -= size
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                self.disconnect(peer, f"send failed: {exc.strerror}")  # (forgets its backlog)
            self._backlogged.pop(identity, None)
        if not self._backlogged and self._sock is not None:
            self._sock.setsockopt(zmq.RCVTIMEO, self._idle_timeout)

    def _forget(self, peer: Peer) -> None:
        """``peer``'s session ended: what waited for it goes (its requests are forgotten), and
        so does what the core counted of its connection.  After many sessions ended, the
        memory they freed goes back to the system (_trim_memory)."""
        if self._backlogged.pop(peer.identity, None) is not None or peer.backlog:
            peer.backlog.clear()
            peer.backlog_bytes = 0
        self._rejections.forget(peer.identity)
        self._auth_failures.forget(peer.identity)
        self._ended_since_trim += 1
        if self._ended_since_trim >= TRIM_AFTER and not self._trim_at:
            # a second later: libzmq frees a connection's buffers in its own thread
            self._trim_at = time.monotonic() + 1.0

    def _trim_memory(self) -> None:
        """Hand the memory freed by ended sessions back to the system.  Each connection
        costs libzmq some 30 KiB of buffers in its I/O thread's malloc arena, and Python its
        tables; freed, they stay in the arenas (a thousand idle connections, closed, left
        the kernel 27 MiB larger) until malloc_trim returns their pages.  A few ms, at most
        once per TRIM_AFTER ended sessions."""
        self._trim_at = 0.0
        self._ended_since_trim = 0
        trim = _malloc_trim()
        if trim is not None:
            trim(0)

    def _count_drop(self, to: Peer) -> None:
        to.dropped += 1
        self._dropped_events += 1
        if worth_logging(to.dropped):
            log.warning("peer_queue_full", service=to.name, dropped=to.dropped, limit=self.config.queue_limit)

    def answer(self, to: Peer | bytes, request: Header | int, body: msgspec.Struct) -> None:
        """Answer a message from the kernel itself: with ``body`` as the reply, or as an
        ERROR when it is an ``Error``.  The one way the kernel answers anything.

        ``to`` is the peer, or the bare identity of a connection that has not said Hello.
        ``request`` is the header of the message answered (monitors then see a refusal) or,
        for an answer given later, its id.  A peer whose queue is full gets it from its
        backlog once it reads (or its session ends when that overflows); a peer gone gets
        nothing."""
        peer, identity = (None, to) if isinstance(to, bytes) else (to, to.identity)
        hdr = request if isinstance(request, Header) else None
        if isinstance(body, Error):
            reply = Header(kind=Kind.ERROR, type="Error", id=hdr.id if hdr else request, sender=KERNEL)
        else:
            reply = Header(kind=Kind.REPLY, type=body_tag(body), id=hdr.id if hdr else request, sender=KERNEL)
        parts = [identity, SIGNATURE, self._enc.encode(reply), self._enc.encode(body)]
        try:
            self._sendv(parts)
        except zmq.Again:
            if peer is not None:
                self._hold(peer, parts)
            else:
                self._unanswered += 1  # a connection that has not said Hello and does not read
        except zmq.ZMQError:
            pass
        if hdr is not None and peer is not None and isinstance(body, Error) and self._monitors:
            self._observe(hdr, peer.name, hdr.dest, (), outcome=body.code.value)

    def _authentication_failed(self, identity: bytes, claimed: str, reason: str, **fields: Any) -> None:
        """Log and audit a Hello refused for its credential: the 1st, 10th, 100th... of each
        connection and of all, with the count (see Summary); the audit records likewise
        (_audit).  Nobody can fill the disk without logging in."""
        count = self._auth_failures.count(identity)
        if count:
            log.warning("authentication_failed", claimed=claimed, reason=reason, connection=identity.hex(),
                        count=count, total=self._auth_failures.total, **fields)
        self._audit("authentication-failed", claimed or "?", detail=reason)

    def _too_large_stamped(self, size: int) -> str:
        return (f"message of {size} bytes as forwarded (with the sender stamped) exceeds the bus limit of "
                f"{self._max_size} bytes; keep messages {STAMP_ROOM} bytes under the limit")

    def _reject(self, identity: bytes, hdr: Header | None, code: ErrorCode, message: str) -> None:
        """A message the router cannot process: answer if possible, and log it (the 1st,
        10th, 100th... of each connection, with the count: see Summary)."""
        peer = self._peers.get(identity)
        count = self._rejections.count(identity)
        if count:
            who = {"service": peer.name} if peer else {"connection": identity.hex()}
            log.warning("message_rejected", **who, code=code.value, problem=message, type=hdr.type if hdr else None,
                        count=count, total=self._rejections.total)
        # Errors are never answered with errors, or two confused peers would loop.
        if hdr is None or hdr.kind != ERROR:
            self.answer(peer or identity, hdr.id if hdr else 0, Error(code=code, message=message))

    # -- capabilities ------------------------------------------------------------------------

    def _allowed(self, peer: Peer, kind: int, action: str, target: str) -> bool:
        key = (kind, action, target)
        ok = peer.cache.get(key)
        if ok is None:
            if len(peer.cache) >= CACHE_LIMIT:  # a peer inventing topics cannot grow it
                peer.cache.clear()
            ok = peer.cache[key] = peer.principal.caps.allows(action, target)
        return ok

    def _deny(self, peer: Peer, hdr: Header, capability: str) -> None:
        """Answer forbidden; log and audit it (the 1st, 10th, 100th... denial of the same
        capability for the same peer: a flood cannot flood the log)."""
        peer.denied += 1
        self._denied += 1
        count = peer.denials[capability] = peer.denials.get(capability, 0) + 1
        if len(peer.denials) > CACHE_LIMIT:
            peer.denials.clear()
        if worth_logging(count):
            kind = KIND_NAMES.get(hdr.kind)
            log.warning("denied", service=peer.name, capability=capability, kind=kind,
                        type=hdr.type, dest=hdr.dest, count=count)
            self._audit("denied", peer.name, capability=capability,
                        detail=f"{kind} {hdr.type} to {hdr.dest}" + (f" ({count} times so far)" if count > 1 else ""))
        self.answer(peer, hdr, Error(code=ErrorCode.FORBIDDEN, capability=capability,
                                     message=f"{peer.name!r} lacks the capability {capability!r}"))
