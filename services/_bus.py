"""The bus client every service and tool uses: one DEALER to the kernel's ROUTER.

    async with connect("example", endpoint=..., credential=...) as bus:
        reply = await bus.call("other", Ping(), reply_type=Pong, timeout=2)
        await bus.publish("example.tick", Tick(n=1))
        async with bus.subscribe("alerts.") as sub:
            async for event in sub:
                alert = event.decode(Alert)

Runs under asyncio and trio alike (anyio); nothing here blocks the event loop.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import time
from collections import deque
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import zmq

from protocols import (
    PROTOCOL_MINOR,
    TypeMismatch,
    Bye,
    Codec,
    DecodeError,
    Error,
    ErrorCode,
    Header,
    Heartbeat,
    Hello,
    Kind,
    ProtocolError,
    Ready,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Welcome,
    body_tag,
    unpack_tensor,
)
from protocols.runtime import ENV_BUS, ENV_CREDENTIAL_FD, ENV_CREDENTIAL_FILE, ENV_RUN_DIR, endpoint_for_run_dir, get_logger
from protocols.transport import AsyncSocket, Wakeup, wakeup_factory
from zmq.utils.monitor import parse_monitor_message

from ._exceptions import (
    BusError,
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    InternalError,
    RemoteError,
    Unavailable,
    error_from_wire,
    lone_exception,
)
from ._metrics import Metrics

__all__ = ["BusClient", "Incoming", "Subscription", "connect", "endpoint_for_run_dir", "read_credential"]

log = get_logger(component="bus")

_REQ, _REPLY, _ERR, _EVENT, _CTRL = (int(k) for k in Kind)
_any_decoder = msgspec.msgpack.Decoder()
_error_decoder = msgspec.msgpack.Decoder(Error)


def read_credential() -> str:
    """The credential the kernel handed this process: from the inherited file descriptor
    named by EDGEBUS_CREDENTIAL_FD (read once, then closed), or EDGEBUS_CREDENTIAL_FILE."""
    fd = os.environ.pop(ENV_CREDENTIAL_FD, "")
    if fd:
        with os.fdopen(int(fd), "rb", closefd=True) as f:
            return f.read().decode().strip()
    path = os.environ.get(ENV_CREDENTIAL_FILE, "")
    if path:
        return Path(path).read_text().strip()
    return ""


class Incoming(msgspec.Struct):
    """A message delivered to this peer: header (with the kernel-stamped sender), the body
    still encoded, and any raw tensor frames (zero-copy frame objects: ``.buffer``, ``.bytes``,
    the buffer protocol; see protocols.transport.recv_frames)."""

    header: Header
    body: Any
    frames: list[Any]

    @property
    def sender(self) -> str:
        return self.header.sender

    @property
    def type(self) -> str:
        return self.header.type

    def decode(self, type_: Any = Any) -> Any:
        dec = _any_decoder if type_ is Any else msgspec.msgpack.Decoder(type_)
        try:
            return dec.decode(self.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DecodeError(f"body of {self.header.type!r}", str(exc)) from exc

    def tensor(self, desc: Any) -> Any:
        return unpack_tensor(desc, self.frames)


class Subscription:
    """Events whose topic starts with one of ``prefixes``, in a bounded queue of this
    subscription's own (as nats.py's): ``async with bus.subscribe("alerts.") as sub:
    async for event in sub``.  When the queue is full, new events for it are dropped and
    counted in ``dropped`` (other subscriptions are not held up).  Leaving the ``async
    with`` unsubscribes the prefixes no other subscription of this client still uses."""

    def __init__(self, bus: BusClient, prefixes: Sequence[str], max_pending: int, remote: bool) -> None:
        if not prefixes:
            raise ValueError("subscribe to at least one topic prefix ('' for every topic)")
        self.prefixes = tuple(prefixes)
        self.dropped = 0
        self._bus = bus
        self._remote = remote
        self._in, self._out = anyio.create_memory_object_stream[Incoming](max_pending)

    def matches(self, topic: str) -> bool:
        return topic.startswith(self.prefixes)

    def _offer(self, incoming: Incoming) -> None:
        try:
            self._in.send_nowait(incoming)
        except anyio.WouldBlock:
            self.dropped += 1
            if self.dropped in (1, 100) or self.dropped % 10000 == 0:
                log.warning("events_dropped", prefixes=list(self.prefixes), dropped=self.dropped,
                            reason="this subscription's queue is full; consume it faster or raise max_pending")
        except anyio.ClosedResourceError:
            pass

    def __await__(self) -> Any:
        """``sub = await bus.subscribe(...)``: subscribed until ``await sub.unsubscribe()``
        or the end of the connection (as nats.py's)."""
        return self.__aenter__().__await__()

    async def unsubscribe(self) -> None:
        await self.__aexit__(None, None, None)

    async def __aenter__(self) -> Subscription:
        bus = self._bus
        bus._subscriptions.append(self)
        if self._remote:
            try:
                await bus._control(Subscribe(topics=list(self.prefixes)), Subscribed)
            except BaseException:
                bus._subscriptions.remove(self)
                raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        bus = self._bus
        if self in bus._subscriptions:
            bus._subscriptions.remove(self)
        self._in.close()
        still = {p for s in bus._subscriptions if s._remote for p in s.prefixes}
        gone = [p for p in self.prefixes if p not in still]
        if self._remote and gone and not bus.closed and bus.connected:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                try:
                    await bus._control(Unsubscribe(topics=gone), Subscribed)
                except (BusError, zmq.ZMQError):
                    pass  # the connection is going away: so is the subscription

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Incoming:
        try:
            return await self._out.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def receive(self) -> Incoming:
        """The next event (``async for`` does the same)."""
        return await self._out.receive()


class _Slot:
    """A call waiting for its answer: the reply or error (``value``), a local verdict
    (``error``: its session ended with the answer owed), or ``retry`` (the kernel refused it
    unread because the session had already ended: it was never delivered, so it is sent
    again on the next session)."""

    __slots__ = ("wake", "value", "error", "retry", "session", "deadline", "done", "expired")

    def __init__(self, wake: Wakeup, deadline: float) -> None:
        self.wake = wake
        #: time.time() by which the call ends; ``expired`` once the reaper found it passed
        self.deadline = deadline
        self.expired = False
        #: the caller stopped waiting (answered, expired, cancelled): the reaper forgets it
        self.done = False
        self.value: Incoming | None = None
        self.error: BusError | None = None
        self.retry = False
        #: the session it was sent on (0: not sent yet)
        self.session = 0

    def expire(self) -> None:
        if not self.done:
            self.expired = True
            self.wake.set()

    def again(self) -> None:
        self.wake.clear()
        self.retry = False
        self.session = 0


class _Job:
    """A request being served by a worker: its deadline watched by the reaper, which
    cancels the worker's scope (``scope``) if the handler is still running then."""

    __slots__ = ("incoming", "session", "scope", "deadline", "done", "expired", "answered", "finished", "started")

    def __init__(self, incoming: Incoming, session: int, scope: anyio.CancelScope) -> None:
        self.incoming = incoming
        self.session = session
        self.scope = scope
        self.deadline = math.inf
        #: the handler returned (the reaper leaves it alone)
        self.done = False
        self.expired = False
        #: its answer was given to _send (or not owed any more)
        self.answered = False
        #: counted out of _in_flight
        self.finished = False
        self.started = time.perf_counter()

    def expire(self) -> None:
        if not self.done:
            self.expired = True
            self.scope.cancel()


class _HelloRefused(ConnectError):
    """The kernel answered Hello with an error (a credential it does not take)."""


#: The socket events that tell how a CURVE handshake went (see BusClient._socket).
_HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
#: Reconnection waits: the first, and the most it doubles to.
RECONNECT_FIRST, RECONNECT_MAX = 0.1, 5.0
#: How long an ended session's socket is read for the kernel's refusals of what was sent
#: after the end (they say which calls were never delivered and may be sent again).
_DRAIN = 1.0
#: Every this many messages sent or received back to back, let other tasks run (a loop
#: that publishes, or a flood of events, would otherwise starve the heartbeat and signals).
_FAIRNESS = 64


class BusClient:
    """One connection to the kernel.  Create it with :func:`connect`."""

    def __init__(
        self,
        service: str,
        endpoint: str,
        credential: str,
        *,
        hello: Hello | None = None,
        on_request: Callable[[Incoming], Awaitable[Any]] | None = None,
        max_concurrency: int = 64,
        default_timeout: float = 30.0,
        ctx: zmq.Context | None = None,
        curve: tuple[bytes, bytes, bytes] | None = None,
        reconnect: bool = True,
        connect_timeout: float = 10.0,
        credential_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.service = service
        self.endpoint = endpoint
        self._hello = hello or Hello(service=service)
        self._hello.credential = credential
        #: re-read at every new session (the kernel writes fresh credentials at each start)
        self._credential_file = Path(credential_file) if credential_file else None
        self._hello.pid = os.getpid()
        self._hello.minor = PROTOCOL_MINOR
        self._on_request = on_request
        #: Requests are served by at most this many long-lived worker tasks (started as
        #: needed, parked when idle), fed from a queue by the receiving task: no task per
        #: request.  Requests beyond it wait in the queue.
        self.max_concurrency = max_concurrency
        self._queue: deque[tuple[Incoming, int]] = deque()
        self._free: list[Wakeup] = []
        self._workers = 0
        #: One-shot wake-ups for the running backend (see protocols.transport.Wakeup).
        self._wakeup: Callable[[], Wakeup] | None = None
        #: The deadlines of all pending calls, watched by one task (_reaper) instead of a
        #: cancel scope or timer per call: calls in deadline order (the common case: one
        #: timeout for all, so each new deadline is the latest), and a heap for the others.
        self._deadlines: deque[_Slot | _Job] = deque()
        self._early: list[tuple[float, int, _Slot | _Job]] = []
        self._reaper_wake: Wakeup | None = None
        #: when the reaper wakes next (math.inf: when woken)
        self._reaper_at = math.inf
        self.default_timeout = default_timeout
        self._ctx = ctx or zmq.Context.instance()
        self._curve = curve
        #: Start a new session by itself when the kernel ends this one or goes silent.
        self.reconnect = reconnect
        self._connect_timeout = connect_timeout
        #: While a CURVE handshake is under way: its socket's events (see _socket).
        self._handshake_monitor: AsyncSocket | None = None
        self._handshake_failures = 0
        self._asock = self._socket()
        self._codec = Codec()
        self._ids = itertools.count(1)
        self._calls: dict[int, _Slot] = {}
        self._subscriptions: list[Subscription] = []
        self.closed = False
        self._decoders: dict[Any, msgspec.msgpack.Decoder] = {}
        self.name = service
        self.welcome: Welcome | None = None
        self.draining = False
        self.dropped_events = 0
        self._last_rx = time.monotonic()
        self._in_flight = 0
        self._idle = anyio.Event()
        self.metrics = Metrics()
        self._tg: anyio.abc.TaskGroup | None = None
        #: Sessions so far (each a Hello answered by Welcome); set while one is up.
        self.sessions = 0
        self._up = anyio.Event()
        #: Why the current session is ending (None while it is not).
        self._ending: str | None = None
        self._session_scope: anyio.CancelScope | None = None
        self._marker = -1
        self._said_ready = False
        self._sent = 0

    def _socket(self) -> AsyncSocket:
        self._close_handshake_monitor()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 10000)
        if self._curve is not None:
            server_key, public_key, secret_key = self._curve
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public_key)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
            # The kernel refuses a key it does not enrol in the CURVE handshake itself: no
            # message ever tells, only the socket's events (until the Hello is answered).
            self._handshake_monitor = AsyncSocket(sock.get_monitor_socket(_HANDSHAKE_EVENTS))
        return AsyncSocket(sock)

    def _close_handshake_monitor(self) -> None:
        monitor, self._handshake_monitor = self._handshake_monitor, None
        if monitor is not None:
            try:
                self._asock.sock.disable_monitor()
            except zmq.ZMQError:
                pass  # its socket is closed already
            monitor.close()

    @property
    def connected(self) -> bool:
        """A session is up (False while reconnecting)."""
        return self._up.is_set()

    # -- sending -----------------------------------------------------------------------------

    async def _send(self, header: Header, body: msgspec.Struct | bytes, raw: Sequence[Any] = ()) -> int:
        """Send one message on the current session (waiting for one while reconnecting);
        return the session's number."""
        return await self._send_packed(self._codec.pack(header, body, raw))

    async def _send_packed(self, frames: list[Any]) -> int:
        self._sent += 1
        if not self._sent % _FAIRNESS:
            await anyio.lowlevel.checkpoint()
        while True:
            if not self._up.is_set():
                await self._session_up()
            asock, session = self._asock, self.sessions
            try:
                await asock.send(frames)
                return session
            except (zmq.ZMQError, anyio.ClosedResourceError):
                if asock is self._asock and self._ending is None:
                    raise
                # Its session's socket closed while this waited for room: nothing of the
                # message went out.  It goes on the next session.

    async def _session_up(self) -> None:
        if self.closed:
            raise ConnectionLost("the connection is closed")
        await self._up.wait()

    async def request(
        self,
        dest: str,
        msg: msgspec.Struct | bytes,
        *,
        timeout: float | None = None,
        deadline: float | None = None,
        frames: Sequence[Any] = (),
        type: str | None = None,
    ) -> Incoming:
        """Send a request and wait for its reply; an ERROR reply raises its RemoteError.

        ``msg`` may be pre-encoded msgpack bytes, with ``type`` naming the message type.
        When the session ends while the request is out (its answer lost), ConnectionLost
        names why; one the kernel refused unread is sent again on the next session.
        """
        if deadline is None:
            deadline = time.time() + (self.default_timeout if timeout is None else timeout)
        elif deadline <= time.time():
            raise DeadlineExceeded(f"the deadline passed before {type or body_tag(msg)!r} was sent to {dest!r}")
        header = Header(kind=Kind.REQUEST, type=type or body_tag(msg), dest=dest, id=next(self._ids),
                        deadline=deadline)
        incoming = await self._exchange(header, msg, frames, deadline)
        if incoming.header.kind == _ERR:
            raise self._remote_error(incoming)
        return incoming

    async def call(self, dest: str, msg: msgspec.Struct, reply_type: Any = Any, **kwargs: Any) -> Any:
        """``request`` and decode the reply body into ``reply_type``."""
        incoming = await self.request(dest, msg, **kwargs)
        dec = self._decoders.get(reply_type)
        if dec is None:
            dec = self._decoders[reply_type] = msgspec.msgpack.Decoder(reply_type)
        try:
            reply = dec.decode(incoming.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DecodeError(f"reply {incoming.header.type!r} from {dest!r}", str(exc)) from exc
        if isinstance(reply, msgspec.Struct) and type(reply).__struct_config__.tag not in (None, incoming.type):
            raise TypeMismatch(incoming.type, body_tag(reply))
        return reply

    async def _exchange(self, header: Header, body: msgspec.Struct | bytes, frames: Sequence[Any], deadline: float) -> Incoming:
        """Send and wait for the answer until ``deadline``.  The common case costs no task,
        cancel scope or Event: the message goes out at once (the socket has room) and a
        Wakeup (a future with a timer on asyncio) is resolved by the receiving task."""
        wakeup = self._wakeup
        if wakeup is None:
            wakeup = self._wakeup = wakeup_factory()
        slot = _Slot(wakeup(), deadline)
        calls = self._calls
        packed = self._codec.pack(header, body, frames)
        reaped = self._reaper_wake is not None
        if reaped:
            self._watch_deadline(slot)
        try:
            while True:
                calls[header.id] = slot
                if self._up.is_set() and self._ending is None and self._try_send(packed):
                    slot.session = self.sessions
                else:  # no room, or no session: wait for them, within the deadline
                    with anyio.move_on_after(max(deadline - time.time(), 0.0)):
                        slot.session = await self._send_packed(packed)
                    if not slot.session:
                        break
                if reaped:
                    await slot.wake.wait()
                elif not await slot.wake.wait(deadline - time.time()):
                    break
                if not slot.retry or slot.expired:
                    break
                slot.again()  # refused unread by an ended session: never delivered
        finally:
            slot.done = True
            calls.pop(header.id, None)
        if slot.error is not None:
            if self.closed:  # closed by the cancellation of a scope this caller is in: that is its outcome
                await anyio.lowlevel.checkpoint_if_cancelled()
            raise slot.error
        if slot.value is None:
            waiting = "" if self._up.is_set() else f" (reconnecting to the kernel: {self._ending or 'not connected'})"
            raise DeadlineExceeded(
                f"no reply to {header.type!r} from {header.dest or 'the kernel'!r} before the deadline{waiting}")
        return slot.value

    def _watch_deadline(self, slot: _Slot | _Job) -> None:
        """Give the call's deadline to the reaper: O(1) in the common case."""
        queue = self._deadlines
        while queue and queue[0].done:  # answered calls leave from the front
            queue.popleft()
        if not queue or slot.deadline >= queue[-1].deadline:
            queue.append(slot)
        else:
            heapq.heappush(self._early, (slot.deadline, id(slot), slot))
        if slot.deadline < self._reaper_at:
            self._reaper_at = slot.deadline
            self._reaper_wake.set()  # type: ignore[union-attr]

    async def _reaper(self) -> None:
        """End the calls whose deadline passed (one task for all of them)."""
        if self._wakeup is None:
            self._wakeup = wakeup_factory()
        wake = self._reaper_wake = self._wakeup()
        queue, early = self._deadlines, self._early
        try:
            while True:
                now = time.time()
                while queue and (queue[0].done or queue[0].deadline <= now):
                    queue.popleft().expire()
                while early and (early[0][2].done or early[0][0] <= now):
                    heapq.heappop(early)[2].expire()
                nxt = min(queue[0].deadline if queue else math.inf, early[0][0] if early else math.inf)
                self._reaper_at = nxt
                wake.clear()
                await wake.wait(nxt - now)
        finally:
            # The connection is closing: no call may wait for a deadline nobody watches.
            self._reaper_wake = None
            for entry in [*queue, *(e[2] for e in early)]:
                # (a call answered a moment ago keeps its answer: its caller has yet to run)
                if isinstance(entry, _Slot) and not entry.done and entry.error is None and entry.value is None:
                    entry.error = ConnectionLost("the connection is closed")
                    entry.wake.set()
            queue.clear()
            early.clear()

    def _try_send(self, frames: list[Any]) -> bool:
        """Send now on the current session if its socket has room (never waits)."""
        try:
            if not self._asock.try_send(frames):
                return False
        except zmq.ZMQError:
            return False
        self._sent += 1
        return True

    def _remote_error(self, incoming: Incoming) -> RemoteError:
        try:
            err = _error_decoder.decode(incoming.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return InternalError(f"undecodable error body from {incoming.sender!r}: {exc}", sender=incoming.sender)
        return error_from_wire(err, incoming.sender)

    async def _control(self, msg: msgspec.Struct, reply_type: Any, timeout: float = 10.0) -> Any:
        header = Header(kind=Kind.CONTROL, type=body_tag(msg), id=next(self._ids))
        incoming = await self._exchange(header, msg, (), time.time() + timeout)
        if incoming.header.kind == _ERR:
            raise self._remote_error(incoming)
        return incoming.decode(reply_type)

    async def publish(self, topic: str, msg: msgspec.Struct, *, frames: Sequence[Any] = ()) -> None:
        """Publish an event.  A denial comes back asynchronously and is logged.  While the
        client reconnects, this waits for the new session."""
        await self._send(Header(kind=Kind.EVENT, type=body_tag(msg), dest=topic), msg, frames)

    def subscribe(self, *prefixes: str, max_pending: int = 1024) -> Subscription:
        """Events whose topic starts with any of ``prefixes``, for ``async with ... as sub:
        async for event in sub``.  Entering raises Forbidden naming the capability when a
        prefix is not allowed.  A new session (after a reconnection) subscribes again."""
        return Subscription(self, prefixes, max_pending, remote=True)

    def receive_unsolicited(self, *prefixes: str, max_pending: int = 1024) -> Subscription:
        """Events the kernel sends without a Subscribe (``kernel.monitor`` traffic after a
        Monitor request), on topics starting with ``prefixes``."""
        return Subscription(self, prefixes, max_pending, remote=False)

    async def ready(self) -> None:
        """Tell the kernel this service finished initialising and serves requests now."""
        self._said_ready = True
        await self._send(Header(kind=Kind.CONTROL, type="Ready"), Ready())

    # -- sessions ----------------------------------------------------------------------------

    async def _handshake(self, timeout: float) -> None:
        """Hello on the current socket; Welcome starts a session.  ConnectError otherwise
        (_HelloRefused when the kernel answered with an error, or refused this connection's
        CURVE key).  A Hello answered ``unavailable`` (the kernel cannot take this peer yet)
        is sent again, 0.1 s doubling to 1 s apart, within ``timeout``."""
        deferred = ""
        self._handshake_failures = 0
        try:
            with anyio.fail_after(timeout):
                delay = 0.1
                while True:
                    header, body = await self._hello_answer()
                    if header.kind != _ERR:
                        break
                    try:
                        err = _error_decoder.decode(body)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        raise ConnectError(self.endpoint, f"undecodable answer to Hello: {exc}") from exc
                    if err.code != ErrorCode.UNAVAILABLE:
                        raise _HelloRefused(self.endpoint, f"{err.code.value}: {err.message}")
                    deferred = err.message
                    log.info("hello_deferred", reason=err.message, retry_in=delay)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 1.0)
        except TimeoutError:
            if deferred:
                why = f"the kernel could not take this session within {timeout:g}s: {deferred}"
            elif self._handshake_failures:
                why = (f"no answer to Hello within {timeout:g}s: the CURVE handshake failed "
                       f"{self._handshake_failures} times (the server key is not this kernel's, or the "
                       "secret key does not belong to the public key)")
            else:
                why = f"no answer to Hello within {timeout:g}s; is edgebus running?"
            raise ConnectError(self.endpoint, why) from None
        finally:
            self._close_handshake_monitor()
        try:
            if header.type != "Welcome":
                raise ConnectError(self.endpoint, f"the kernel answered Hello with {header.type!r}, not Welcome")
            self.welcome = msgspec.msgpack.decode(body, type=Welcome)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ConnectError(self.endpoint, f"undecodable answer to Hello: {exc}") from exc
        self.name = self.welcome.name
        self._codec.max_size = self.welcome.max_message_size
        self._last_rx = time.monotonic()
        self.sessions += 1
        self._ending = None

    async def _hello_answer(self) -> tuple[Header, Any]:
        """Send Hello and wait for its answer (header, body).  _HelloRefused when the kernel
        refuses this connection's CURVE key (the handshake fails with ZAP status 400)."""
        msg_id = next(self._ids)
        await self._asock.send(self._codec.pack(Header(kind=Kind.CONTROL, type="Hello", id=msg_id), self._hello))
        answer: tuple[Header, Any] | None = None
        refusal = ""

        async def receive(scope: anyio.CancelScope) -> None:
            nonlocal answer
            while True:
                frames = await self._asock.recv()
                try:
                    header, body, _ = self._codec.unpack(frames)
                except ProtocolError:
                    continue
                if header.id == msg_id and header.kind in (_REPLY, _ERR):
                    answer = (header, body)
                    scope.cancel()
                    return

        async def watch(monitor: AsyncSocket, scope: anyio.CancelScope) -> None:
            nonlocal refusal
            while True:
                event = parse_monitor_message(await monitor.recv())
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    refusal = (f"the kernel refused this connection's CURVE key (ZAP status {event['value']}): "
                               "it is not enrolled (any more); the operator enrols it with busctl security "
                               "enroll NAME KEY")
                    scope.cancel()
                    return
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                    self._handshake_failures += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(receive, tg.cancel_scope)
            if self._handshake_monitor is not None:
                tg.start_soon(watch, self._handshake_monitor, tg.cancel_scope)
        if answer is None:
            raise _HelloRefused(self.endpoint, refusal)
        return answer

    async def _sessions(self, tg: anyio.abc.TaskGroup) -> None:
        """Serve each session until it ends; then fail what it owed, and start the next
        (or raise ConnectionLost when this client does not reconnect)."""
        if self._wakeup is None:
            self._wakeup = wakeup_factory()
        while True:
            self._up.set()
            async with anyio.create_task_group() as session:
                self._session_scope = session.cancel_scope
                session.start_soon(self._receive_loop, self._asock, tg)
                session.start_soon(self._heartbeat_loop, self._asock)
                if self.sessions > 1:
                    session.start_soon(self._restore)
            reason = self._ending or "the session ended"
            for call_id, slot in list(self._calls.items()):
                if slot.session == self.sessions and not slot.retry:
                    del self._calls[call_id]
                    slot.error = ConnectionLost(f"{reason} (the answer to this request was lost with it)")
                    slot.wake.set()
            if not self.reconnect:
                raise ConnectionLost(reason)
            log.warning("session_lost", reason=reason, detail="reconnecting")
            await self._reconnect(reason)

    def _end_session(self, reason: str, drain: bool = False) -> None:
        """The session is over: new messages wait for the next.  ``drain``: the kernel ended
        it, and answers each message sent since with a refusal; read those until the
        kernel has answered a marker sent now (or for at most _DRAIN seconds)."""
        scope = self._session_scope
        if self._ending is not None or scope is None:
            return
        self._ending = reason
        self._up = anyio.Event()
        log.warning("session_ended", reason=reason)
        if drain:
            self._marker = next(self._ids)
            marker = self._codec.pack(Header(kind=Kind.CONTROL, type="Heartbeat", id=self._marker), Heartbeat())
            if self._asock.try_send(marker):
                scope.deadline = min(scope.deadline, anyio.current_time() + _DRAIN)
                return
        scope.cancel()

    async def _reconnect(self, reason: str) -> None:
        """A new socket and Hello, with back-off, until Welcome; a Hello the kernel refuses
        ends the client with ConnectionLost.  The credential is the file's again when it came
        from one (PROTOCOL.md 5.1: a kernel started again wrote a fresh one), else the same."""
        delay = RECONNECT_FIRST
        while True:
            await anyio.sleep(delay)
            if self._credential_file is not None:
                try:
                    self._hello.credential = self._credential_file.read_text().strip()
                except OSError:  # not written yet by a kernel starting again: the next attempt
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
            self._asock.close()
            self._asock = self._socket()
            self._asock.sock.connect(self.endpoint)
            try:
                await self._handshake(min(self._connect_timeout, max(delay, 1.0)))
            except _HelloRefused as exc:
                raise ConnectionLost(f"{reason}; the kernel refused a new session: {exc.reason}") from None
            except ConnectError as exc:
                log.info("reconnect_failed", reason=exc.reason, retry_in=min(delay * 2, RECONNECT_MAX))
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            log.info("reconnected", name=self.name, sessions=self.sessions, after=reason)
            return

    async def _restore(self) -> None:
        """On a new session: Ready again (a service that said it), and every subscription."""
        try:
            if self._said_ready:
                await self._send(Header(kind=Kind.CONTROL, type="Ready"), Ready())
            for sub in list(self._subscriptions):
                if not sub._remote:
                    continue
                try:
                    await self._control(Subscribe(topics=list(sub.prefixes)), Subscribed)
                except RemoteError as exc:  # e.g. a capability revoked meanwhile
                    log.error("subscription_lost", prefixes=list(sub.prefixes), error=str(exc))
                    if sub in self._subscriptions:
                        self._subscriptions.remove(sub)
                    sub._in.close()
        except ConnectionLost:
            pass  # this session ended too: the next one restores them

    # -- receiving ---------------------------------------------------------------------------

    async def _receive_loop(self, asock: AsyncSocket, tg: anyio.abc.TaskGroup) -> None:
        recv = asock.recv
        unpack = self._codec.unpack
        session = self.sessions
        n = 0
        while True:
            frames = await recv()
            n += 1
            if not n % _FAIRNESS:
                await anyio.lowlevel.checkpoint()
            try:
                header, body, raw = unpack(frames)
            except ProtocolError as exc:
                log.warning("bad_message_from_kernel", problem=str(exc))
                continue
            kind = header.kind
            if kind == _ERR and header.sender == "kernel" and self._kernel_error(header, body):
                continue
            self._last_rx = time.monotonic()
            if kind == _REPLY or kind == _ERR:
                slot = self._calls.pop(header.id, None)
                if slot is not None:
                    slot.value = Incoming(header, body, raw)
                    slot.wake.set()
                elif kind == _ERR:
                    err = self._remote_error(Incoming(header, body, raw))
                    log.warning("error_from_bus", code=err.code.value, message=err.message,
                                capability=err.capability or None)
            elif kind == _REQ:
                incoming = Incoming(header, body, raw)
                if self.draining or self._on_request is None:
                    if self._ending is None:  # (an ended session's requester was answered already)
                        await self._reply_error(header, Unavailable(
                            f"{self.name!r} is stopping" if self.draining else f"{self.name!r} serves no requests"))
                    continue
                self._in_flight += 1
                self._queue.append((incoming, session))
                if self._free:
                    self._free.pop().set()
                elif self._workers < self.max_concurrency:
                    self._workers += 1
                    tg.start_soon(self._worker)
            elif kind == _EVENT:
                topic = header.dest
                incoming = Incoming(header, body, raw)
                taken = False
                for sub in self._subscriptions:
                    if sub.matches(topic):
                        sub._offer(incoming)
                        taken = True
                if not taken:  # a subscription just left, or the kernel's view is wider
                    self.dropped_events += 1
            # CONTROL from the kernel (Heartbeat) only refreshes _last_rx.

    def _kernel_error(self, header: Header, body: Any) -> bool:
        """An error from the kernel that this client handles itself (True), or one to deliver.

        ``unauthenticated`` after the Welcome means the kernel ended this session and refused
        the message it answers, unread: the session ends here too, and a call so refused is
        sent again on the next session.  An error answering no call of ours (a refused
        heartbeat or event) is no sign that the session lives: it does not count as
        a message from the kernel for liveness."""
        slot = self._calls.get(header.id) if header.id else None
        try:
            err = _error_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        if err.code != ErrorCode.UNAUTHENTICATED:
            if slot is not None:
                return False  # the answer to a call: delivered as usual
            if (not header.id and err.code == ErrorCode.FORBIDDEN and err.capability.startswith("subscribe:")
                    and err.capability.endswith("*")):
                self._subscription_ended(err.capability[len("subscribe:"):-1], err.message)
                return True
            log.warning("error_from_bus", code=err.code.value, message=err.message, capability=err.capability or None)
            return True
        if slot is not None:
            del self._calls[header.id]
            slot.retry = True
            slot.wake.set()
        if header.id and header.id == self._marker:
            if self._session_scope is not None:
                self._session_scope.cancel()  # every refusal sent before it has arrived
            return True
        self._end_session(err.message, drain=True)
        return True

    def _subscription_ended(self, prefix: str, why: str) -> None:
        """The kernel ended the subscription to ``prefix`` (its capability was revoked): the
        subscriptions of this client that had it stop asking for it, and one left with no
        prefix ends (its ``async for`` stops), as when a new session may not subscribe again."""
        log.error("subscription_lost", prefixes=[prefix], error=why)
        for sub in list(self._subscriptions):
            if sub._remote and prefix in sub.prefixes:
                sub.prefixes = tuple(p for p in sub.prefixes if p != prefix)
                if not sub.prefixes:
                    self._subscriptions.remove(sub)
                    sub._in.close()

    async def _worker(self) -> None:
        """Serve queued requests one after another; park (in _free) while there are none.

        Each worker runs its requests inside one long-lived cancel scope, not one per
        request: the reaper cancels it when a handler overruns its request's deadline
        (see _Job); the worker then answers deadline_exceeded and opens a new scope."""
        if self._wakeup is None:
            self._wakeup = wakeup_factory()
        wake = self._wakeup()
        queue = self._queue
        served = 0
        while True:
            job: _Job | None = None
            with anyio.CancelScope() as scope:
                while True:
                    if not queue:
                        wake.clear()
                        self._free.append(wake)
                        await wake.wait()
                        continue
                    incoming, session = queue.popleft()
                    job = _Job(incoming, session, scope)
                    await self._serve_one(job)
                    served += 1
                    if not served % _FAIRNESS:  # handlers that never wait: let the others run
                        await anyio.lowlevel.checkpoint()
            if job is not None and job.expired:
                await self._overran(job)

    async def _serve_one(self, job: _Job) -> None:
        try:
            reply = await self._answer(job)
            job.done = True  # the reaper leaves it alone from here
            job.answered = True
            if job.session == self.sessions and self._up.is_set():  # else its requester was answered unavailable
                packed = self._codec.pack(*reply)
                if self._ending is not None or not self._try_send(packed):
                    await self._send_packed(packed)
        except ConnectionLost:
            pass
        finally:
            if job.answered or not job.expired:  # (an overrun is answered by _overran)
                self._finished(job)

    def _finished(self, job: _Job) -> None:
        if not job.finished:
            job.finished = True
            self._in_flight -= 1  # after the reply left: wait_idle() means "all answered"
            if self._in_flight == 0:
                self._idle.set()

    async def _overran(self, job: _Job) -> None:
        """The handler of ``job`` was cancelled at its deadline: say so to the requester."""
        header = job.incoming.header
        try:
            exc = DeadlineExceeded(f"{self.name!r} did not finish {header.type!r} before its deadline")
            self.metrics.requests.inc(header.type, exc.code.value)
            self.metrics.request_seconds.observe(time.perf_counter() - job.started, header.type)
            if job.session == self.sessions and self._up.is_set():
                await self._reply_error(header, exc)
        except ConnectionLost:
            pass
        finally:
            self._finished(job)

    async def _answer(self, job: _Job) -> tuple[Header, Any, Sequence[Any]]:
        """Run the handler; whatever happens, return the message that answers it (and
        count it: requests by type and outcome, and their latency)."""
        incoming = job.incoming
        reply = await self._handle_one(job)
        outcome = "ok" if reply[0].kind == _REPLY else reply[1].code.value
        self.metrics.requests.inc(incoming.header.type, outcome)
        self.metrics.request_seconds.observe(time.perf_counter() - job.started, incoming.header.type)
        return reply

    async def _handle_one(self, job: _Job) -> tuple[Header, Any, Sequence[Any]]:
        incoming = job.incoming
        header = incoming.header
        try:
            remaining = header.deadline - time.time() if header.deadline else math.inf
            if remaining <= 0:
                raise DeadlineExceeded(f"{self.name!r} received {header.type!r} after its deadline; not run")
            if remaining == math.inf:
                result = await self._on_request(incoming)  # type: ignore[misc]
            elif self._reaper_wake is not None:  # the reaper cancels the worker's scope at the deadline
                job.deadline = header.deadline
                self._watch_deadline(job)
                result = await self._on_request(incoming)  # type: ignore[misc]
            else:
                with anyio.move_on_after(remaining) as scope:
                    result = await self._on_request(incoming)  # type: ignore[misc]
                if scope.cancelled_caught:
                    raise DeadlineExceeded(f"{self.name!r} did not finish {header.type!r} before its deadline")
            body, frames = result if isinstance(result, tuple) else (result, ())
            if not isinstance(body, msgspec.Struct) or type(body).__struct_config__.tag is None:
                raise TypeError(f"the handler returned {type(body).__name__}, not a tagged msgspec.Struct")
            return Header(kind=Kind.REPLY, type=body_tag(body), id=header.id), body, frames
        except RemoteError as exc:
            return Header(kind=Kind.ERROR, type="Error", id=header.id), exc.to_wire(), ()
        except Exception as exc:
            log.exception("handler_failed", type=header.type, sender=header.sender)
            err = InternalError(f"{type(exc).__name__}: {exc}")
            return Header(kind=Kind.ERROR, type="Error", id=header.id), err.to_wire(), ()

    async def _reply_error(self, header: Header, exc: RemoteError) -> None:
        await self._send(Header(kind=Kind.ERROR, type="Error", id=header.id), exc.to_wire())

    async def wait_idle(self) -> None:
        """Wait until no request handler is running."""
        while self._in_flight:
            self._idle = anyio.Event()
            await self._idle.wait()

    async def _heartbeat_loop(self, asock: AsyncSocket) -> None:
        """Beat every interval without ever waiting behind queued traffic, and end the
        session when the kernel has said nothing for liveness x interval, or has not made
        room for a heartbeat for as long (it is not reading)."""
        assert self.welcome is not None
        interval = self.welcome.heartbeat_interval
        limit = interval * self.welcome.heartbeat_liveness
        beat = self._codec.pack(Header(kind=Kind.CONTROL, type="Heartbeat"), Heartbeat())
        taken, sent = time.monotonic(), self._sent
        while self._ending is None:
            now = time.monotonic()
            # The socket takes messages (this beat, or others since the last: any message is a
            # sign of life to the kernel): the kernel reads.  A publisher that keeps the queue
            # full is not mistaken for a dead kernel.
            if asock.try_send(beat) or self._sent != sent:
                taken, sent = now, self._sent
            elif now - taken > limit:
                self._end_session(f"the kernel has read nothing from this connection for {now - taken:.1f}s "
                                  "(its send queue stayed full)")
                return
            silent = now - self._last_rx
            if silent > limit and not asock.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._end_session(f"no message or heartbeat from the kernel for {silent:.1f}s")
                return
            await anyio.sleep(interval)

    async def close(self, reason: str = "") -> None:
        """Say Bye (waiting at most a second for room: never on a dead kernel) and end the
        connection's tasks."""
        self.closed = True
        for sub in self._subscriptions:
            sub._in.close()
        if self._up.is_set() and self._ending is None:
            bye = self._codec.pack(Header(kind=Kind.CONTROL, type="Bye"), Bye(reason=reason))
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                try:
                    await self._asock.send(bye)
                except (zmq.ZMQError, anyio.ClosedResourceError):
                    pass
        if self._tg is not None:
            self._tg.cancel_scope.cancel()


@asynccontextmanager
async def connect(
    service: str,
    *,
    endpoint: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    credential: str | None = None,
    hello: Hello | None = None,
    on_request: Callable[[Incoming], Awaitable[Any]] | None = None,
    connect_timeout: float = 10.0,
    curve: tuple[bytes, bytes, bytes] | None = None,
    reconnect: bool = True,
    credential_file: str | os.PathLike[str] | None = None,
    **options: Any,
) -> AsyncIterator[BusClient]:
    """Join the bus, say Hello, and keep the connection alive for the ``async with`` body.

    The endpoint comes from ``endpoint``, else ``run_dir``, else EDGEBUS_BUS, else
    EDGEBUS_RUN_DIR; the credential from ``credential``, else ``credential_file``, else
    :func:`read_credential` (EDGEBUS_CREDENTIAL_FD or EDGEBUS_CREDENTIAL_FILE).  A credential
    from a file is read again from it for every new session.
    Over tcp, ``curve`` is (server public key, own public key, own secret key), Z85: the
    kernel knows the peer by its enrolled public key, and no credential is needed.

    When the kernel ends the session (it says why) or goes silent for liveness x interval,
    the client starts a new one (the credential read again when it came from a file), after 0.1 s doubling up to 5 s
    between attempts, and subscribes again; calls out at that moment fail with
    ConnectionLost naming the reason, later ones wait for the new session.  With
    ``reconnect=False`` (what a service does) the loss ends the ``async with`` with
    ConnectionLost instead; so does a new Hello the kernel refuses.
    """
    if endpoint is None:
        if run_dir is None and not os.environ.get(ENV_BUS):
            run_dir = os.environ.get(ENV_RUN_DIR)
        if run_dir is not None:
            endpoint = endpoint_for_run_dir(run_dir)
        else:
            endpoint = os.environ.get(ENV_BUS, "")
    if not endpoint:
        raise ConnectError("<none>", "no bus endpoint: pass --run-dir/--bus or set EDGEBUS_RUN_DIR")
    if endpoint.startswith("ipc://") and not os.path.exists(endpoint[6:]):
        raise ConnectError(endpoint, "the bus socket does not exist; is edgebus running with that run directory?")
    if credential is None:
        if credential_file is None and not os.environ.get(ENV_CREDENTIAL_FD):
            credential_file = os.environ.get(ENV_CREDENTIAL_FILE) or None
        credential = Path(credential_file).read_text().strip() if credential_file else read_credential()
    else:
        credential_file = None  # (given as a string: the same at every session)
    client = BusClient(service, endpoint, credential, hello=hello, on_request=on_request, curve=curve,
                       reconnect=reconnect, connect_timeout=connect_timeout, credential_file=credential_file,
                       **options)
    try:
        client._asock.sock.connect(endpoint)
        await client._handshake(connect_timeout)
        try:
            async with anyio.create_task_group() as tg:
                client._tg = tg
                tg.start_soon(client._sessions, tg)
                tg.start_soon(client._reaper)
                try:
                    yield client
                finally:
                    await client.close()
        except BaseExceptionGroup as group:
            # A lone error (from the body, or a bus error such as ConnectionLost) surfaces
            # as itself: callers catch BusError or their own exceptions, not groups.
            lone = lone_exception(group)
            if lone is not None:
                raise lone from None
            raise
    finally:
        client.closed = True
        client._close_handshake_monitor()
        client._asock.close()
