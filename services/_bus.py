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

import itertools
import math
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import anyio
import anyio.abc
import msgspec
import zmq

from protocols import (
    PROTOCOL_MINOR,
    TypeMismatch,
    Bye,
    Codec,
    DecodeError,
    Error,
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
from protocols.transport import AsyncSocket

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
    still encoded, and any raw tensor frames (zero-copy ``zmq.Frame`` objects)."""

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
        if self._remote and gone and not bus.closed:
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
    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.value: Incoming | None = None


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
    ) -> None:
        self.service = service
        self.endpoint = endpoint
        self._hello = hello or Hello(service=service)
        self._hello.credential = credential
        self._hello.pid = os.getpid()
        self._hello.minor = PROTOCOL_MINOR
        self._on_request = on_request
        self._limiter = anyio.CapacityLimiter(max_concurrency)
        self.default_timeout = default_timeout
        self._ctx = ctx or zmq.Context.instance()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 10000)
        self._asock = AsyncSocket(sock)
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

    # -- sending -----------------------------------------------------------------------------

    async def _send(self, header: Header, body: msgspec.Struct | bytes, raw: Sequence[Any] = ()) -> None:
        await self._asock.send(self._codec.pack(header, body, raw))

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
        slot = _Slot()
        self._calls[header.id] = slot
        try:
            await self._send(header, body, frames)
            with anyio.move_on_after(max(deadline - time.time(), 0.0)):
                await slot.event.wait()
        finally:
            self._calls.pop(header.id, None)
        if slot.value is None:
            raise DeadlineExceeded(f"no reply to {header.type!r} from {header.dest or 'the kernel'!r} before the deadline")
        return slot.value

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
        """Publish an event.  A denial comes back asynchronously and is logged."""
        await self._send(Header(kind=Kind.EVENT, type=body_tag(msg), dest=topic), msg, frames)

    def subscribe(self, *prefixes: str, max_pending: int = 1024) -> Subscription:
        """Events whose topic starts with any of ``prefixes``, for ``async with ... as sub:
        async for event in sub``.  Entering raises Forbidden naming the capability when a
        prefix is not allowed."""
        return Subscription(self, prefixes, max_pending, remote=True)

    def receive_unsolicited(self, *prefixes: str, max_pending: int = 1024) -> Subscription:
        """Events the kernel sends without a Subscribe (``kernel.monitor`` traffic after a
        Monitor request), on topics starting with ``prefixes``."""
        return Subscription(self, prefixes, max_pending, remote=False)

    async def ready(self) -> None:
        """Tell the kernel this service finished initialising and serves requests now."""
        await self._send(Header(kind=Kind.CONTROL, type="Ready"), Ready())

    # -- receiving ---------------------------------------------------------------------------

    async def _handshake(self, timeout: float) -> None:
        msg_id = next(self._ids)
        await self._send(Header(kind=Kind.CONTROL, type="Hello", id=msg_id), self._hello)
        try:
            with anyio.fail_after(timeout):
                while True:
                    frames = await self._asock.recv()
                    try:
                        header, body, _ = self._codec.unpack(frames)
                    except ProtocolError:
                        continue
                    if header.id == msg_id and header.kind in (_REPLY, _ERR):
                        break
        except TimeoutError:
            raise ConnectError(self.endpoint, f"no answer to Hello within {timeout:g}s; is edgebus running?") from None
        try:
            if header.kind == _ERR:
                err = _error_decoder.decode(body)
                raise ConnectError(self.endpoint, f"{err.code.value}: {err.message}")
            if header.type != "Welcome":
                raise ConnectError(self.endpoint, f"the kernel answered Hello with {header.type!r}, not Welcome")
            self.welcome = msgspec.msgpack.decode(body, type=Welcome)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ConnectError(self.endpoint, f"undecodable answer to Hello: {exc}") from exc
        self.name = self.welcome.name
        self._codec.max_size = self.welcome.max_message_size
        self._last_rx = time.monotonic()

    async def _receive_loop(self, tg: anyio.abc.TaskGroup) -> None:
        recv = self._asock.recv
        unpack = self._codec.unpack
        while True:
            frames = await recv()
            self._last_rx = time.monotonic()
            try:
                header, body, raw = unpack(frames)
            except ProtocolError as exc:
                log.warning("bad_message_from_kernel", problem=str(exc))
                continue
            kind = header.kind
            if kind == _REPLY or kind == _ERR:
                slot = self._calls.pop(header.id, None)
                if slot is not None:
                    slot.value = Incoming(header, body, raw)
                    slot.event.set()
                elif kind == _ERR:
                    err = self._remote_error(Incoming(header, body, raw))
                    log.warning("error_from_bus", code=err.code.value, message=err.message,
                                capability=err.capability or None)
            elif kind == _REQ:
                incoming = Incoming(header, body, raw)
                if self.draining or self._on_request is None:
                    await self._reply_error(header, Unavailable(
                        f"{self.name!r} is stopping" if self.draining else f"{self.name!r} serves no requests"))
                    continue
                self._in_flight += 1
                tg.start_soon(self._serve_one, incoming)
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

    async def _serve_one(self, incoming: Incoming) -> None:
        try:
            reply = await self._answer(incoming)
            await self._send(*reply)
        finally:
            self._in_flight -= 1  # after the reply left: wait_idle() means "all answered"
            if self._in_flight == 0:
                self._idle.set()

    async def _answer(self, incoming: Incoming) -> tuple[Header, Any, Sequence[Any]]:
        """Run the handler; whatever happens, return the message that answers it (and
        count it: requests by type and outcome, and their latency)."""
        started = time.perf_counter()
        reply = await self._handle_one(incoming)
        outcome = "ok" if reply[0].kind == _REPLY else reply[1].code.value
        self.metrics.requests.inc(incoming.header.type, outcome)
        self.metrics.request_seconds.observe(time.perf_counter() - started, incoming.header.type)
        return reply

    async def _handle_one(self, incoming: Incoming) -> tuple[Header, Any, Sequence[Any]]:
        header = incoming.header
        try:
            async with self._limiter:
                remaining = header.deadline - time.time() if header.deadline else math.inf
                if remaining <= 0:
                    raise DeadlineExceeded(f"{self.name!r} received {header.type!r} after its deadline; not run")
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

    async def _heartbeat_loop(self) -> None:
        assert self.welcome is not None
        interval = self.welcome.heartbeat_interval
        limit = interval * self.welcome.heartbeat_liveness
        beat = Heartbeat()
        while True:
            await self._send(Header(kind=Kind.CONTROL, type="Heartbeat"), beat)
            silent = time.monotonic() - self._last_rx
            if silent > limit:
                raise ConnectionLost(f"no message or heartbeat from the kernel for {silent:.1f}s")
            await anyio.sleep(interval)

    async def close(self, reason: str = "") -> None:
        self.closed = True
        for sub in self._subscriptions:
            sub._in.close()
        with anyio.CancelScope(shield=True):
            try:
                await self._send(Header(kind=Kind.CONTROL, type="Bye"), Bye(reason=reason))
            except zmq.ZMQError:
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
    **options: Any,
) -> AsyncIterator[BusClient]:
    """Join the bus, say Hello, and keep the connection alive for the ``async with`` body.

    The endpoint comes from ``endpoint``, else ``run_dir``, else EDGEBUS_BUS, else
    EDGEBUS_RUN_DIR; the credential from ``credential`` or :func:`read_credential`.
    Over tcp, ``curve`` is (server public key, own public key, own secret key), Z85: the
    kernel knows the peer by its enrolled public key, and no credential is needed.
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
        credential = read_credential()
    client = BusClient(service, endpoint, credential, hello=hello, on_request=on_request, **options)
    sock = client._asock.sock
    if curve is not None:
        server_key, public_key, secret_key = curve
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public_key)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
    try:
        sock.connect(endpoint)
        await client._handshake(connect_timeout)
        try:
            async with anyio.create_task_group() as tg:
                client._tg = tg
                tg.start_soon(client._receive_loop, tg)
                tg.start_soon(client._heartbeat_loop)
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
        sock.close(0)
