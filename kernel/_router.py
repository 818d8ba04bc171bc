"""The bus router: one ROUTER socket, every message authenticated, checked and stamped.

The hot path (``_route``) is deliberately plain: decode the header, look up the peer,
check the capability through a per-peer cache, stamp sender and correlation id, and
forward the body and tensor frames untouched (zero-copy ``zmq.Frame`` objects).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import os
import secrets
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import anyio
import msgspec
import zmq

from protocols.transport import send_frames
from protocols import (
    PROTOCOL_MINOR,
    AuditEvent,
    Enroll,
    GetMeasurements,
    Grant,
    Granted,
    Measurements,
    Revoke,
    SIGNATURE,
    BodyDecoder,
    Bye,
    CapabilityTable,
    Control,
    DecodeError,
    Error,
    ErrorCode,
    GetService,
    Header,
    Heartbeat,
    Hello,
    Interface,
    Introspect,
    Kind,
    KernelRequest,
    ListCapabilities,
    ListServices,
    Monitor,
    Monitoring,
    ProtocolError,
    Ready,
    Reload,
    RestartService,
    ServiceList,
    ServiceStateChanged,
    ServiceStatus,
    StartService,
    StopMonitor,
    StopService,
    Subscribe,
    Subscribed,
    Traffic,
    Unsubscribe,
    Welcome,
    body_tag,
    check_signature,
)
from protocols.runtime import get_logger

from ._caps import CapabilitySet, parse_capability
from ._config import SERVICE_NAME, BusConfig
from ._exceptions import BindError, CapabilityError

__all__ = ["Router", "Principal", "RouterStatistics"]

log = get_logger(component="router")

_REQ, _REPLY, _ERR, _EVENT, _CTRL = (int(k) for k in Kind)
_KIND_NAMES = {int(k): k.name.lower() for k in Kind}
_KERNEL = "kernel"
_SECURITY = "security"
ZAP_DOMAIN = "edgebus"
_WAKE_IDENTITY = b"edgebus-kernel-wake"
_NOBLOCK = int(zmq.NOBLOCK)
#: Per-peer capability caches are cleared when they reach this size.
_CACHE_LIMIT = 4096
_CONTROL_TYPES = frozenset(t.__struct_config__.tag for t in typing.get_args(Control))
_KERNEL_TYPES = frozenset(t.__struct_config__.tag for t in typing.get_args(KernelRequest))


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
    __slots__ = (
        "identity", "name", "principal", "types", "hello", "ready", "last_seen", "cache", "calls",
        "subscriptions", "pending", "denials", "requests_in", "requests_out", "events_out",
        "denied", "dropped",
    )

    def __init__(self, identity: bytes, name: str, principal: Principal, hello: Hello) -> None:
        self.identity = identity
        self.name = name
        self.principal = principal
        self.hello = hello
        self.types = frozenset(hello.types)
        self.ready = False
        self.last_seen = time.monotonic()
        #: (kind, target) -> allowed; cleared whenever the capability table changes.
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


@dataclass
class RouterStatistics:
    peers: int
    pending: int
    routed: int
    denied: int
    malformed: int
    stray_replies: int
    dropped_events: int


class Router:
    """Routes messages between peers.  Owned and run by the kernel.

    ``on_ready(name)`` and ``on_gone(name)`` tell the supervisor about readiness and
    disconnection; ``status(name)`` lets the kernel API describe managed services.
    """

    def __init__(
        self,
        endpoint: str,
        config: BusConfig,
        principals: Iterable[Principal],
        *,
        known_services: Iterable[str] = (),
        on_ready: Callable[[str], None] = lambda name: None,
        on_gone: Callable[[str, str, str, bool], None] = lambda name, why, credential, silent: None,
        status: Callable[[str], ServiceStatus | None] = lambda name: None,
        operate: Callable[[msgspec.Struct, bytes, int], None] | None = None,
        measurements: Callable[[], Measurements] | None = None,
        enrolled: dict[str, str] | None = None,
        ctx: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.config = config
        self._ctx = ctx or zmq.Context.instance()
        self._peers: dict[bytes, Peer] = {}
        self._by_name: dict[str, Peer] = {}
        self._topic_cache: dict[str, list[Peer]] = {}
        self._grants: dict[str, dict[str, float]] = {}
        self._revoked: dict[str, set[str]] = {}
        self._grant_expiry: list[tuple[float, str, str]] = []
        self._principals: dict[str, Principal] = {}
        self._by_principal_name: dict[str, Principal] = {}
        for p in principals:
            self.add_principal(p)
        self.known_services = set(known_services)
        self._on_ready = on_ready
        self._on_gone = on_gone
        self._status = status
        self._operate = operate
        #: kernel id -> (requester, requester's id, target, expiry (monotonic), type)
        #: CurveZMQ public key (Z85) -> principal name, for peers on the tcp endpoint.
        self.enrolled: dict[str, str] = dict(enrolled or {})
        #: The CURVE server secret key (Z85) for the tcp endpoint.
        self.curve_secret_key: bytes | None = None
        self._measurements = measurements
        self._audit_backlog: collections.deque[AuditEvent] = collections.deque(maxlen=10000)
        self._audit_dropped = 0
        self._sig_frame: Any = None
        self._pending: dict[int, tuple[Peer, int, Peer, float, str]] = {}
        self._request_timeout = config.request_timeout
        self._max_pending = config.max_pending
        self._expiry: list[tuple[float, int]] = []
        self._ids = itertools.count(1)
        self._shared_ids = itertools.count(1)
        self._monitors: dict[bytes, Monitor] = {}
        self._enc = msgspec.msgpack.Encoder()
        self._hdr = msgspec.msgpack.Decoder(Header)
        self._control = BodyDecoder(Control)
        self._kernel_api = BodyDecoder(KernelRequest)
        self._routed = self._denied = self._malformed = self._stray = self._dropped_events = 0
        self._sock: zmq.Socket | None = None
        self._waker: zmq.Socket | None = None
        self._wake_endpoint = f"inproc://edgebus-router-{id(self):x}"
        self._commands: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._running = False
        #: True while _run runs in a worker thread of serve()'s event loop.
        self._loop_thread = False
        self._next_beat = 0.0
        self._beat_header = self._enc.encode(Header(kind=Kind.CONTROL, type="Heartbeat", sender=_KERNEL))
        self._beat_body = self._enc.encode(Heartbeat())

    # -- principals and capabilities -------------------------------------------------------

    def add_principal(self, principal: Principal) -> None:
        """Register (or replace) a principal.  Peers connected with the same credential
        take its new capabilities; a new credential (a respawned service) leaves the old
        incarnation's connection with what it had until it goes."""
        old = self._by_principal_name.pop(principal.name, None)
        if old is not None:
            self._principals.pop(old.credential, None)
        self._principals[principal.credential] = principal
        self._by_principal_name[principal.name] = principal
        self._apply_policy(principal)
        for peer in self._peers.values():
            if peer.principal.name == principal.name and peer.principal.credential == principal.credential:
                peer.principal = principal
                peer.cache.clear()
                peer.calls.clear()
        self._topic_cache.clear()

    # -- run-time policy: grants, revocations, enrolment (from the security service) ----

    def _apply_policy(self, principal: Principal) -> None:
        now = time.time()
        grants = self._grants.get(principal.name, {})
        revoked = self._revoked.get(principal.name, set())
        live = [cap for cap, expires in grants.items() if not expires or expires > now]
        principal.caps = CapabilitySet((*principal.base, *live), denied=revoked)
        for peer in self._peers.values():
            if peer.principal is principal:
                peer.cache.clear()
                peer.calls.clear()
        self._topic_cache.clear()

    def grant(self, name: str, capability: str, expires: float = 0.0) -> None:
        self._grants.setdefault(name, {})[capability] = expires
        self._revoked.get(name, set()).discard(capability)
        if expires:
            heapq.heappush(self._grant_expiry, (expires, name, capability))
        if name in self._by_principal_name:
            self._apply_policy(self._by_principal_name[name])

    def revoke(self, name: str, capability: str) -> None:
        self._grants.get(name, {}).pop(capability, None)
        self._revoked.setdefault(name, set()).add(capability)
        if name in self._by_principal_name:
            self._apply_policy(self._by_principal_name[name])

    def _expire_grants(self) -> None:
        now = time.time()
        heap = self._grant_expiry
        while heap and heap[0][0] <= now:
            expires, name, capability = heapq.heappop(heap)
            if self._grants.get(name, {}).get(capability) == expires:
                del self._grants[name][capability]
                log.info("grant_expired", principal=name, capability=capability)
                self._audit("grant-expired", name, capability=capability)
                if name in self._by_principal_name:
                    self._apply_policy(self._by_principal_name[name])

    def enroll(self, name: str, public_key: str) -> None:
        """Bind a CurveZMQ public key (Z85) to a principal, or unbind with an empty key."""
        enrolled = {k: v for k, v in self.enrolled.items() if v != name}
        if public_key:
            enrolled[public_key] = name
        self.enrolled = enrolled  # one assignment: the ZAP thread reads it without a lock

    def remove_principal(self, name: str) -> None:
        """Revoke a credential: its peer is disconnected and it cannot say Hello again."""
        principal = self._by_principal_name.pop(name, None)
        if principal is not None:
            self._principals.pop(principal.credential, None)
            for peer in [p for p in self._peers.values() if p.principal is principal]:
                self.disconnect(peer, "its credential was revoked")

    def set_known_services(self, names: list[str]) -> None:
        """Configured service names (after a reload): requests to others get
        unknown-destination, to these but not connected unavailable."""
        self.known_services = set(names)

    def capability_table(self) -> dict[str, list[str]]:
        return {name: p.caps.describe() for name, p in sorted(self._by_principal_name.items())}

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, self.config.queue_limit)
        sock.setsockopt(zmq.RCVHWM, max(self.config.queue_limit * 10, 10000))
        # A hard ceiling for a single frame: libzmq disconnects a peer that exceeds it.
        # The per-message check in _route sits well below and answers with a clear error.
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_size * 2)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, max(int(min(self.config.heartbeat_interval, 0.1) * 1000), 1))
        endpoint = self.endpoint
        try:
            sock.bind(endpoint)
            sock.bind(self._wake_endpoint)
            if self.config.tcp_endpoint:
                # Security options are taken per listener at bind time: the ipc endpoint
                # above stays NULL (file permissions and credentials guard it); the tcp one
                # is CURVE only, each handshake checked by the ZAP handler (enrolled keys).
                if self.curve_secret_key is None:
                    raise BindError(self.config.tcp_endpoint, "no CURVE server key was given to the router")
                endpoint = self.config.tcp_endpoint
                sock.setsockopt(zmq.CURVE_SERVER, 1)
                sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve_secret_key)
                sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
                sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise BindError(endpoint, exc.strerror) from exc
        except BindError:
            sock.close(0)
            raise
        if self.endpoint.startswith("ipc://"):
            os.chmod(self.endpoint[len("ipc://"):], 0o600)
        self._sock = sock
        self._waker = self._ctx.socket(zmq.DEALER)
        self._waker.setsockopt(zmq.IDENTITY, _WAKE_IDENTITY)
        self._waker.setsockopt(zmq.LINGER, 0)
        self._waker.connect(self._wake_endpoint)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Route until cancelled.  Reports started once the socket is bound.

        Routing runs in a dedicated thread that blocks in libzmq (GIL released), so a
        message costs no event-loop wake-up; the event loop keeps the supervisor."""
        if self._sock is None:
            self.bind()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stop_when_cancelled)
                task_status.started()
                self._loop_thread = True
                try:
                    await anyio.to_thread.run_sync(self._run)
                finally:
                    self._loop_thread = False
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                self.close()

    async def _stop_when_cancelled(self) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            self._running = False
            self._wake()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._waker is not None:
            self._waker.close(0)
            self._waker = None

    # -- commands from the supervisor's thread -----------------------------------------------

    def post(self, func: Callable[..., Any], *args: Any) -> None:
        """Like submit, from any other thread (the ZAP handler's): no wake-up, so it runs
        within one tick (0.1 s) or at the next message."""
        self._commands.append((func, args))

    def submit(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func(*args)`` in the router thread (the only thread that may touch the
        socket or the routing tables).  Non-blocking; call from the event-loop thread."""
        self._commands.append((func, args))
        self._wake()

    def _wake(self) -> None:
        if self._waker is not None:
            try:
                self._waker.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # already full of wake-ups: the router will look at the queue anyway

    def _run_commands(self) -> None:
        commands = self._commands
        while commands:
            func, args = commands.popleft()
            try:
                func(*args)
            except Exception:
                log.exception("router_command_failed", command=getattr(func, "__name__", repr(func)))

    def _notify(self, func: Callable[..., Any], *args: Any) -> None:
        """Call back into the supervisor, on the event loop's thread (when the router
        runs without one, as in unit tests, directly)."""
        try:
            if self._loop_thread:
                anyio.from_thread.run_sync(func, *args)
            else:
                func(*args)
        except Exception:
            log.exception("callback_failed", callback=getattr(func, "__name__", repr(func)))

    # -- the router thread ---------------------------------------------------------------------

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        recv = sock.recv
        route = self._route
        commands = self._commands
        interval = self.config.heartbeat_interval
        tick_every = min(interval, 0.1)
        next_tick = 0.0
        self._running = True
        while self._running:
            if commands:
                self._run_commands()
            try:
                # identity, signature, header, body as bytes; tensor frames stay zmq.Frame
                # objects, forwarded without Python ever touching their bytes.  The
                # signature's Frame is kept: its metadata names a CURVE peer (User-Id).
                frame = recv(0, copy=False)
                parts: list[Any] | None = [frame.bytes]
                while frame.more:
                    frame = recv(0, copy=False)
                    n = len(parts)
                    if n == 1:
                        self._sig_frame = frame
                    parts.append(frame.bytes if n < 4 else frame)
            except zmq.Again:  # RCVTIMEO: time for the tick
                parts = None
            except zmq.ContextTerminated:
                return
            if parts is not None:
                try:
                    route(parts)
                except Exception:  # a bug must not take the bus down; it is logged loudly
                    self._malformed += 1
                    log.exception("router_internal_error", frames=len(parts))
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + tick_every
                try:
                    self._tick(now)
                except Exception:
                    log.exception("router_internal_error", during="tick")

    def _tick(self, now: float) -> None:
        self._expire(now)
        if self._grant_expiry:
            self._expire_grants()
        if now < self._next_beat:
            return
        interval = self.config.heartbeat_interval
        self._next_beat = now + interval
        limit = interval * self.config.heartbeat_liveness
        for peer in list(self._peers.values()):
            if now - peer.last_seen > limit:
                self.disconnect(peer, f"no heartbeat for {now - peer.last_seen:.1f}s", silent=True)
            else:
                self._send([peer.identity, SIGNATURE, self._beat_header, self._beat_body], peer)

    # -- the hot path ----------------------------------------------------------------------

    def _route(self, parts: list[Any]) -> None:
        identity = parts[0]
        if len(parts) < 4:
            if identity == _WAKE_IDENTITY:
                return
            self._malformed += 1
            self._reject(identity, None, ErrorCode.BAD_MESSAGE,
                         f"expected at least 3 frames (signature, header, body), got {len(parts) - 1}")
            return
        sig = parts[1]
        if sig != SIGNATURE:
            try:
                check_signature(sig)  # a different minor version is fine
            except ProtocolError as exc:
                self._malformed += 1
                self._reject(identity, None, ErrorCode.BAD_MESSAGE, str(exc))
                return
        try:
            hdr = self._hdr.decode(parts[2])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._malformed += 1
            self._reject(identity, None, ErrorCode.BAD_MESSAGE, f"header does not decode: {exc}")
            return
        size = len(sig) + len(parts[2]) + len(parts[3])
        if len(parts) > 4:
            for p in parts[4:]:
                size += len(p)
        if size > self.config.max_message_size:
            self._malformed += 1
            self._reject(identity, hdr, ErrorCode.BAD_MESSAGE,
                         f"message of {size} bytes exceeds the bus limit of "
                         f"{self.config.max_message_size} bytes")
            return
        peer = self._peers.get(identity)
        if peer is None:
            if hdr.kind == _CTRL and hdr.type == "Hello":
                self._hello(identity, hdr, parts[3])
            else:
                self._malformed += 1
                self._reject(identity, hdr, ErrorCode.BAD_MESSAGE,
                             "this peer has not said Hello; send Hello before anything else")
            return
        peer.last_seen = now = time.monotonic()
        kind = hdr.kind
        if kind == _REQ:
            self._request(peer, hdr, parts, now)
        elif kind == _REPLY or kind == _ERR:
            self._reply(peer, hdr, parts)
        elif kind == _EVENT:
            self._publish(peer, hdr, parts)
        else:
            self._control_message(peer, hdr, parts[3])

    def _allowed(self, peer: Peer, kind: int, action: str, target: str) -> bool:
        key = (kind, action, target)
        ok = peer.cache.get(key)
        if ok is None:
            if len(peer.cache) >= _CACHE_LIMIT:  # a peer inventing topics cannot grow it
                peer.cache.clear()
            ok = peer.cache[key] = peer.principal.caps.allows(action, target)
        return ok

    def _request(self, peer: Peer, hdr: Header, parts: list[Any], now: float) -> None:
        dest = hdr.dest
        typ = hdr.type
        ok = peer.calls.get((dest, typ))
        if ok is None:
            if len(peer.calls) >= _CACHE_LIMIT:
                peer.calls.clear()
            ok = peer.calls[(dest, typ)] = peer.principal.caps.allows("call", f"{dest}.{typ}")
        if not ok:
            self._deny(peer, hdr, f"call:{dest}.{typ}")
            return
        peer.requests_out += 1
        if dest == _KERNEL:
            self._kernel_request(peer, hdr, parts[3])
            return
        target = self._by_name.get(dest)
        if target is None or not target.ready:
            if target is None and dest not in self.known_services:
                self._answer(peer, hdr, ErrorCode.UNKNOWN_DESTINATION,
                             f"no service named {dest!r} is configured or connected")
            else:
                self._answer(peer, hdr, ErrorCode.UNAVAILABLE,
                             f"service {dest!r} is not ready (not running, starting or restarting); retry later")
            return
        if typ not in target.types:
            self._answer(peer, hdr, ErrorCode.UNKNOWN_TYPE,
                         f"service {dest!r} does not serve {typ!r}; it serves {', '.join(sorted(target.types)) or 'nothing'}")
            return
        if hdr.deadline:
            if not math.isfinite(hdr.deadline):
                self._answer(peer, hdr, ErrorCode.BAD_MESSAGE,
                             f"deadline {hdr.deadline!r} is not a finite number of seconds since the epoch")
                return
            remaining = hdr.deadline - time.time()
            if remaining <= 0:
                self._answer(peer, hdr, ErrorCode.TIMEOUT,
                             f"the deadline passed {-remaining * 1000:.1f} ms before the request reached the kernel")
                return
            expires = now + min(remaining, self._request_timeout)
        else:
            expires = now + self._request_timeout
        if target.pending >= self._max_pending:
            self._answer(peer, hdr, ErrorCode.OVERLOADED,
                         f"service {dest!r} has {target.pending} requests outstanding (bus.max_pending)")
            return
        orig = hdr.id
        kid = next(self._ids)
        hdr.id = kid
        hdr.sender = peer.name
        parts[0] = target.identity
        parts[2] = self._enc.encode(hdr)
        try:
            self._sendv(parts)
        except zmq.Again:
            hdr.id = orig
            self._answer(peer, hdr, ErrorCode.OVERLOADED,
                         f"service {dest!r} has {self.config.queue_limit} messages queued (bus.queue_limit)")
            return
        except zmq.ZMQError:
            hdr.id = orig
            self.disconnect(target, "its connection is gone")
            self._answer(peer, hdr, ErrorCode.UNAVAILABLE, f"service {dest!r} disconnected")
            return
        self._routed += 1
        target.requests_in += 1
        self._pending[kid] = (peer, orig, target, expires, typ)
        heapq.heappush(self._expiry, (expires, kid))
        target.pending += 1
        if self._monitors:
            hdr.id = orig  # monitors see the requester's id, as on the reply
            self._observe(hdr, peer.name, dest, parts)

    def _reply(self, peer: Peer, hdr: Header, parts: list[zmq.Frame]) -> None:
        kid = hdr.id
        pending = self._pending.get(kid)
        if pending is None or pending[2] is not peer:
            # Late (already timed out) or never asked for: a reply is only delivered to
            # the requester of an outstanding request.
            self._stray += 1
            if _worth_logging(self._stray):
                log.warning("reply_dropped", count=self._stray, sender=peer.name, id=kid, type=hdr.type,
                            reason="no outstanding request with this id for this sender "
                                   "(it timed out, its requester left, or it was never sent)")
            return
        del self._pending[kid]
        peer.pending -= 1
        requester = pending[0]
        hdr.id = pending[1]
        hdr.sender = peer.name
        hdr.dest = ""
        parts[0] = requester.identity
        parts[2] = self._enc.encode(hdr)
        self._send(parts, requester)
        self._routed += 1
        if self._monitors:
            self._observe(hdr, peer.name, requester.name, parts)

    def _publish(self, peer: Peer, hdr: Header, parts: list[zmq.Frame]) -> None:
        topic = hdr.dest
        # Every peer may report its own metrics (metrics.<its name>): no capability needed.
        if not (topic.startswith("metrics.") and topic[8:] == peer.name) and \
                not self._allowed(peer, _EVENT, "publish", topic):
            self._deny(peer, hdr, f"publish:{topic}")
            return
        peer.events_out += 1
        hdr.sender = peer.name
        hdr.id = 0
        parts[2] = self._enc.encode(hdr)
        subscribers = self._topic_cache.get(topic)
        if subscribers is None:
            subscribers = self._subscribers(topic)
        for sub in subscribers:
            parts[0] = sub.identity
            self._send(parts, sub)
        self._routed += 1
        if self._monitors:
            self._observe(hdr, peer.name, topic, parts)

    def _subscribers(self, topic: str) -> list[Peer]:
        subs = [
            p for p in self._peers.values()
            if any(topic.startswith(prefix) for prefix in p.subscriptions)
            and self._allowed(p, _EVENT, "subscribe", topic)
        ]
        if len(self._topic_cache) > 10000:
            self._topic_cache.clear()
        self._topic_cache[topic] = subs
        return subs

    def _sendv(self, parts: list[Any]) -> None:
        send_frames(self._sock, parts, _NOBLOCK)  # type: ignore[arg-type]

    def _send(self, parts: list[Any], to: Peer | None = None) -> bool:
        try:
            self._sendv(parts)
            return True
        except zmq.Again:
            if to is not None:
                to.dropped += 1
                self._dropped_events += 1
                if _worth_logging(to.dropped):
                    log.warning("peer_queue_full", peer=to.name, dropped=to.dropped,
                                limit=self.config.queue_limit)
            return False
        except zmq.ZMQError as exc:
            if to is not None and to.identity in self._peers:
                self.disconnect(to, f"send failed: {exc.strerror}")
            return False

    # -- errors ------------------------------------------------------------------------------

    def _answer(self, peer: Peer, hdr: Header, code: ErrorCode, message: str, capability: str = "") -> None:
        """Answer ``hdr`` (a message from ``peer``) with an ERROR from the kernel."""
        self._send_error(peer.identity, hdr.id, code, message, capability)
        if self._monitors:
            self._observe(hdr, peer.name, hdr.dest, (), outcome=code.value)

    def _send_error(self, identity: bytes, request_id: int, code: ErrorCode, message: str,
                    capability: str = "") -> None:
        err_hdr = Header(kind=Kind.ERROR, type="Error", id=request_id, sender=_KERNEL)
        body = Error(code=code, message=message, capability=capability)
        try:
            self._sendv([identity, SIGNATURE, self._enc.encode(err_hdr), self._enc.encode(body)])
        except zmq.ZMQError:
            pass  # the peer is gone or flooded; nothing more can be said to it

    def _reject(self, identity: bytes, hdr: Header | None, code: ErrorCode, message: str) -> None:
        """A message the router cannot process: answer if possible, and always log."""
        peer = self._peers.get(identity)
        log.warning("message_rejected", peer=peer.name if peer else identity.hex(),
                    code=code.value, problem=message,
                    type=hdr.type if hdr else None)
        # Errors are never answered with errors, or two confused peers would loop.
        if hdr is None or hdr.kind != _ERR:
            self._send_error(identity, hdr.id if hdr else 0, code, message)

    def _deny(self, peer: Peer, hdr: Header, capability: str) -> None:
        """Answer forbidden; log and audit it (the 1st, 10th, 100th... denial of the same
        capability for the same peer: a flood cannot flood the log)."""
        peer.denied += 1
        self._denied += 1
        count = peer.denials[capability] = peer.denials.get(capability, 0) + 1
        if len(peer.denials) > _CACHE_LIMIT:
            peer.denials.clear()
        if _worth_logging(count):
            log.warning("denied", peer=peer.name, capability=capability, kind=_KIND_NAMES.get(hdr.kind),
                        type=hdr.type, dest=hdr.dest, count=count)
            self._audit("denied", peer.name, capability=capability,
                        detail=f"{_KIND_NAMES.get(hdr.kind)} {hdr.type} to {hdr.dest}"
                               + (f" ({count} times so far)" if count > 1 else ""))
        self._answer(peer, hdr, ErrorCode.FORBIDDEN,
                     f"{peer.name!r} lacks the capability {capability!r}", capability)

    # -- handshake and control ---------------------------------------------------------------

    def _hello(self, identity: bytes, hdr: Header, body: bytes) -> None:
        try:
            hello = self._control.decode(hdr.type, body)
        except DecodeError as exc:
            self._reject(identity, hdr, ErrorCode.BAD_MESSAGE, str(exc))
            return
        curve_key = self._curve_user_id()
        if curve_key:
            # Authenticated by CurveZMQ (ZAP admitted only enrolled keys): the key names it.
            enrolled_as = self.enrolled.get(curve_key, "")
            principal = self._by_principal_name.get(enrolled_as)
            reason = f"CURVE key {curve_key[:8]}... is not enrolled (any more)"
            advice = "the CURVE key this connection uses is no longer enrolled; enrol it again"
        else:
            principal = self._principals.get(hello.credential) if hello.credential else None
            reason = "missing credential" if not hello.credential else "unknown credential"
            advice = ("Hello carries no valid credential; use the credential the kernel gave this "
                      "service (EDGEBUS_CREDENTIAL_FD or <run-dir>/credentials/)")
        if principal is None:
            log.warning("authentication_failed", claimed=hello.service, pid=hello.pid, reason=reason)
            self._audit("authentication-failed", hello.service or "?", detail=reason)
            self._send_error(identity, hdr.id, ErrorCode.UNAUTHENTICATED, advice)
            return
        if principal.shared:
            if hello.service and not _valid_label(hello.service):
                self._send_error(identity, hdr.id, ErrorCode.BAD_MESSAGE,
                                 f"client label {hello.service!r} must be 1-63 of a-z, 0-9, '_' and '-'")
                return
            name = f"{hello.service or principal.name}.{next(self._shared_ids)}"
        else:
            name = principal.name
            if hello.service and hello.service != name:
                log.warning("authentication_failed", claimed=hello.service, credential_of=name)
                self._audit("authentication-failed", hello.service, detail=f"presented the credential of {name!r}")
                self._send_error(identity, hdr.id, ErrorCode.UNAUTHENTICATED,
                                 f"this credential belongs to {name!r}, not {hello.service!r}")
                return
            old = self._by_name.get(name)
            if old is not None:
                self.disconnect(old, "replaced by a new connection with the same credential")
        peer = Peer(identity, name, principal, hello)
        self._peers[identity] = peer
        if not principal.shared:
            self._by_name[name] = peer
        welcome = Welcome(
            name=name,
            heartbeat_interval=self.config.heartbeat_interval,
            heartbeat_liveness=self.config.heartbeat_liveness,
            max_message_size=self.config.max_message_size,
            minor=PROTOCOL_MINOR,
            settings=principal.settings,
        )
        self._send([identity, SIGNATURE,
                    self._enc.encode(Header(kind=Kind.REPLY, type="Welcome", id=hdr.id, sender=_KERNEL)),
                    self._enc.encode(welcome)])
        log.info("peer_connected", peer=name, pid=hello.pid, types=sorted(peer.types))

    def _curve_user_id(self) -> str:
        frame = self._sig_frame
        if frame is None:
            return ""
        try:
            return frame.get("User-Id") or ""
        except zmq.ZMQError:  # no such property: not a ZAP-authenticated connection
            return ""

    def _control_message(self, peer: Peer, hdr: Header, body: bytes) -> None:
        if hdr.type not in _CONTROL_TYPES:
            self._reject(peer.identity, hdr, ErrorCode.UNKNOWN_TYPE,
                         f"unknown control message {hdr.type!r}; known: {', '.join(sorted(_CONTROL_TYPES))}")
            return
        try:
            msg = self._control.decode(hdr.type, body)
        except DecodeError as exc:
            self._reject(peer.identity, hdr, ErrorCode.BAD_MESSAGE, str(exc))
            return
        match msg:
            case Heartbeat():
                pass
            case Ready():
                if not peer.ready:
                    peer.ready = True
                    log.info("peer_ready", peer=peer.name)
                    self._notify(self._on_ready, peer.name)
            case Subscribe(topics=topics):
                for topic in topics:
                    if not peer.principal.caps.covers_prefix("subscribe", topic):
                        self._deny(peer, hdr, f"subscribe:{topic}*")
                        return
                peer.subscriptions.update(topics)
                self._topic_cache.clear()
                if (self._audit_backlog and peer.name == _SECURITY and not peer.principal.shared
                        and any("kernel.audit".startswith(t) for t in topics)):
                    self._flush_audit_backlog(peer)
                self._reply_to(peer, hdr, Subscribed(topics=sorted(peer.subscriptions)))
            case Unsubscribe(topics=topics):
                peer.subscriptions.difference_update(topics)
                self._topic_cache.clear()
                self._reply_to(peer, hdr, Subscribed(topics=sorted(peer.subscriptions)))
            case Bye(reason=reason):
                self.disconnect(peer, f"said bye: {reason}" if reason else "said bye")
            case Hello():
                # A peer that restarted its session on the same socket: start afresh.
                self.disconnect(peer, "sent a new Hello")
                self._hello(peer.identity, hdr, body)

    def _reply_to(self, peer: Peer, hdr: Header, body: msgspec.Struct) -> None:
        self._kernel_reply(peer, hdr.id, body)

    def _kernel_reply(self, peer: Peer, request_id: int, body: msgspec.Struct) -> None:
        self._send([peer.identity, SIGNATURE,
                    self._enc.encode(Header(kind=Kind.REPLY, type=body_tag(body), id=request_id, sender=_KERNEL)),
                    self._enc.encode(body)], peer)

    # -- the kernel's own API ----------------------------------------------------------------

    def _kernel_request(self, peer: Peer, hdr: Header, body: bytes) -> None:
        if hdr.type not in _KERNEL_TYPES:
            self._answer(peer, hdr, ErrorCode.UNKNOWN_TYPE,
                         f"the kernel does not serve {hdr.type!r}; it serves {', '.join(sorted(_KERNEL_TYPES))}")
            return
        try:
            msg = self._kernel_api.decode(hdr.type, body)
        except DecodeError as exc:
            self._answer(peer, hdr, ErrorCode.BAD_MESSAGE, str(exc))
            return
        match msg:
            case ListServices():
                self._reply_to(peer, hdr, ServiceList(services=self.statuses()))
            case GetService(name=name) | Introspect(name=name) if not self._exists(name):
                self._answer(peer, hdr, ErrorCode.UNKNOWN_DESTINATION, f"no service named {name!r}")
            case GetService(name=name):
                self._reply_to(peer, hdr, self.status(name))
            case Introspect(name=name):
                target = self._by_name.get(name)
                if target is None:
                    self._answer(peer, hdr, ErrorCode.UNAVAILABLE,
                                 f"service {name!r} is not connected; its interface is known once it says Hello")
                    return
                h = target.hello
                self._reply_to(peer, hdr, Interface(name=name, types=sorted(h.types), schema=h.schema,
                                                    reply_schema=h.reply_schema, publishes=h.publishes))
            case ListCapabilities(name=name):
                table = self.capability_table()
                if name:
                    if name not in table:
                        self._answer(peer, hdr, ErrorCode.UNKNOWN_DESTINATION, f"no principal named {name!r}")
                        return
                    table = {name: table[name]}
                self._reply_to(peer, hdr, CapabilityTable(table=table))
            case Monitor():
                self._monitors[peer.identity] = msg
                self._reply_to(peer, hdr, Monitoring())
            case StopMonitor():
                self._monitors.pop(peer.identity, None)
                self._reply_to(peer, hdr, Monitoring())
            case Grant() | Revoke() | Enroll() if peer.name != _SECURITY or peer.principal.shared:
                self._audit("denied", peer.name, detail=f"{hdr.type}: only the security service changes the policy")
                self._answer(peer, hdr, ErrorCode.FORBIDDEN,
                             f"{hdr.type}: only the security service changes the policy; "
                             f"ask it (busctl caps grant|revoke, busctl security enroll)")
            case Grant(name=name, capability=cap) | Revoke(name=name, capability=cap) \
                    if not _parses(cap):
                self._answer(peer, hdr, ErrorCode.BAD_MESSAGE, f"not a capability: {cap!r}")
            case Grant(name=name, capability=cap, expires=expires):
                self.grant(name, cap, expires)
                log.info("granted", principal=name, capability=cap, expires=expires or None)
                self._audit("granted", name, capability=cap,
                            detail=f"until {expires:.0f}" if expires else "without expiry")
                self._reply_to(peer, hdr, self._granted(name))
            case Revoke(name=name, capability=cap):
                self.revoke(name, cap)
                log.info("revoked", principal=name, capability=cap)
                self._audit("revoked", name, capability=cap)
                self._reply_to(peer, hdr, self._granted(name))
            case Enroll(name=name, public_key=key) if key and not getattr(
                    self._by_principal_name.get(name), "external", False):
                self._answer(peer, hdr, ErrorCode.UNKNOWN_DESTINATION,
                             f"no external service named {name!r} is configured; add [services.{name}] "
                             "(without a command) to the config before enrolling its key")
            case Enroll(name=name, public_key=key):
                self.enroll(name, key)
                self._audit("enrolled" if key else "unenrolled", name, detail=key)
                self._reply_to(peer, hdr, self._granted(name))
            case GetMeasurements():
                if self._measurements is None:
                    self._answer(peer, hdr, ErrorCode.UNAVAILABLE, "this kernel keeps no measurement log")
                else:
                    self._reply_to(peer, hdr, self._measurements())
            case StartService(name=name) | StopService(name=name) | RestartService(name=name) \
                    if self._status(name) is None:
                self._answer(peer, hdr, ErrorCode.UNKNOWN_DESTINATION,
                             f"no service named {name!r} is started by the kernel")
            case StartService() | StopService() | RestartService() | Reload() if self._operate is None:
                self._answer(peer, hdr, ErrorCode.UNAVAILABLE, "this router has no supervisor to operate on")
            case StartService() | StopService() | RestartService() | Reload():
                # Supervisor work takes time: it runs on the event loop and answers later
                # through finish_operation; this thread goes on routing meanwhile.
                self._notify(self._operate, msg, peer.identity, hdr.id)

    def _granted(self, name: str) -> Granted:
        principal = self._by_principal_name.get(name)
        return Granted(name=name, capabilities=principal.caps.describe() if principal else [])

    def finish_operation(self, identity: bytes, request_id: int, result: msgspec.Struct) -> None:
        """Answer a kernel operation (router thread, via submit)."""
        peer = self._peers.get(identity)
        if peer is None:
            return  # the requester left meanwhile
        if isinstance(result, Error):
            self._send_error(identity, request_id, result.code, result.message)
        elif isinstance(result, ServiceStatus):
            self._kernel_reply(peer, request_id, self.status(result.name))
        else:
            self._kernel_reply(peer, request_id, result)

    def _exists(self, name: str) -> bool:
        return name in self._by_name or name in self.known_services

    def status(self, name: str) -> ServiceStatus:
        st = self._status(name) or ServiceStatus(name=name, state="configured")
        peer = self._by_name.get(name)
        principal = self._by_principal_name.get(name)
        if principal is not None:
            st.capabilities = principal.caps.describe()
        if peer is not None:
            st.connected = True
            if not st.managed:
                st.state = "ready" if peer.ready else "connected"
                st.pid = peer.hello.pid
            st.types = sorted(peer.types)
            st.subscriptions = sorted(peer.subscriptions)
            st.requests_in, st.requests_out = peer.requests_in, peer.requests_out
            st.events_out, st.denied, st.pending = peer.events_out, peer.denied, peer.pending
        return st

    def statuses(self) -> list[ServiceStatus]:
        return [self.status(n) for n in sorted(self.known_services | set(self._by_name))]

    # -- monitoring --------------------------------------------------------------------------

    def _observe(self, hdr: Header, sender: str, dest: str, parts: Any, outcome: str = "") -> None:
        kind = _KIND_NAMES.get(hdr.kind, "?")
        record = None
        for identity, flt in list(self._monitors.items()):
            if flt.service and flt.service not in (sender, dest):
                continue
            if flt.message_type and flt.message_type != hdr.type:
                continue
            if flt.topic and not (hdr.kind == _EVENT and dest.startswith(flt.topic)):
                continue
            mon = self._peers.get(identity)
            if mon is None or sender == mon.name or dest == mon.name:
                continue  # never report a monitor's own traffic back to it
            if record is None:
                size = sum(len(p) for p in parts[1:]) if parts else 0
                record = self._enc.encode(Traffic(
                    time=time.time(), kind=kind, message_type=hdr.type, sender=sender, dest=dest,
                    id=hdr.id, size=size, frames=max(len(parts) - 4, 0), outcome=outcome))
                ev_hdr = self._enc.encode(Header(kind=Kind.EVENT, type="Traffic", dest="kernel.monitor",
                                                 sender=_KERNEL))
            self._send([identity, SIGNATURE, ev_hdr, record], mon)

    def _audit(self, kind: str, subject: str, *, capability: str = "", detail: str = "") -> None:
        """An audit record for the security service, published on kernel.audit.  While
        nobody subscribes (the security service starting or restarting) records wait in
        a bounded buffer and are delivered to the next subscriber."""
        event = AuditEvent(kind=kind, subject=subject, capability=capability, detail=detail, time=time.time())
        if not (self._topic_cache.get("kernel.audit") or self._subscribers("kernel.audit")):
            if len(self._audit_backlog) == self._audit_backlog.maxlen:
                self._audit_dropped += 1
            self._audit_backlog.append(event)
            return
        self.publish_kernel_event("kernel.audit", event)

    def _flush_audit_backlog(self, to: Peer) -> None:
        """Hand the buffered records to the security service (and to nobody else)."""
        if not self._allowed(to, _EVENT, "subscribe", "kernel.audit"):
            return
        if self._audit_dropped:
            self._audit_backlog.appendleft(AuditEvent(
                kind="audit-records-lost", subject="kernel", time=time.time(),
                detail=f"{self._audit_dropped} records dropped while no audit subscriber was connected"))
            self._audit_dropped = 0
        hdr = self._enc.encode(Header(kind=Kind.EVENT, type="AuditEvent", dest="kernel.audit", sender=_KERNEL))
        while self._audit_backlog:
            self._send([to.identity, SIGNATURE, hdr, self._enc.encode(self._audit_backlog.popleft())], to)

    def audit(self, kind: str, subject: str, detail: str = "") -> None:
        """For the supervisor (via submit): crashes, restarts, failures."""
        self._audit(kind, subject, detail=detail)

    def publish_kernel_event(self, topic: str, body: msgspec.Struct) -> None:
        """Publish an event from the kernel itself (service state changes)."""
        hdr = Header(kind=Kind.EVENT, type=body_tag(body), dest=topic, sender=_KERNEL)
        frames: list[Any] = [b"", SIGNATURE, self._enc.encode(hdr), self._enc.encode(body)]
        for sub in self._topic_cache.get(topic) or self._subscribers(topic):
            frames[0] = sub.identity
            self._send(frames, sub)

    def service_state_changed(self, name: str, state: str, previous: str, pid: int = 0, detail: str = "") -> None:
        if self._sock is not None:
            self.publish_kernel_event("kernel.services", ServiceStateChanged(
                name=name, state=state, previous=previous, pid=pid, detail=detail))

    # -- disconnects and expiry ----------------------------------------------------------------

    def disconnect_name(self, name: str, why: str) -> None:
        peer = self._by_name.get(name)
        if peer is not None:
            self.disconnect(peer, why)

    def disconnect(self, peer: Peer, why: str, silent: bool = False) -> None:
        if self._peers.pop(peer.identity, None) is None:
            return
        if self._by_name.get(peer.name) is peer:
            del self._by_name[peer.name]
        self._monitors.pop(peer.identity, None)
        if peer.subscriptions:
            self._topic_cache.clear()
        for kid, (requester, orig_id, target, _, type_) in list(self._pending.items()):
            if target is peer:
                del self._pending[kid]
                if requester is not peer:
                    self._send_error(requester.identity, orig_id, ErrorCode.UNAVAILABLE,
                                     f"service {peer.name!r} went away before replying ({why})")
            elif requester is peer:
                del self._pending[kid]
                target.pending -= 1
        peer.pending = 0
        log.info("peer_disconnected", peer=peer.name, reason=why)
        if not peer.principal.shared:
            self._notify(self._on_gone, peer.name, why, peer.principal.credential, silent)

    def _expire(self, now: float) -> None:
        heap = self._expiry
        if len(heap) > 2 * len(self._pending) + 1024:
            # answered requests leave their entries behind: rebuild from what is pending
            heap[:] = [(entry[3], kid) for kid, entry in self._pending.items()]
            heapq.heapify(heap)
        while heap and heap[0][0] <= now:
            _, kid = heapq.heappop(heap)
            pending = self._pending.pop(kid, None)
            if pending is None:
                continue
            requester, orig_id, target, _, type_ = pending
            target.pending -= 1
            self._send_error(requester.identity, orig_id, ErrorCode.TIMEOUT,
                             f"{target.name!r} did not answer {type_!r} before the deadline")

    def statistics(self) -> RouterStatistics:
        return RouterStatistics(
            peers=len(self._peers), pending=len(self._pending), routed=self._routed,
            denied=self._denied, malformed=self._malformed, stray_replies=self._stray,
            dropped_events=self._dropped_events,
        )


def _parses(capability: str) -> bool:
    try:
        parse_capability(capability)
    except CapabilityError:
        return False
    return True


def _worth_logging(count: int) -> bool:
    """Rate limit for repeated warnings: the 1st, 10th, 100th, 1000th, then every 10000th."""
    return count in (1, 10, 100, 1000) or count % 10000 == 0


def _valid_label(label: str) -> bool:
    return bool(SERVICE_NAME.match(label))


