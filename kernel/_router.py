"""The bus router: one ROUTER socket, every message authenticated, checked and stamped.

``Router`` is assembled from one part per job (see _core.py for the map); this module keeps
its lifecycle: binding, the router thread, and the commands other threads send it.

Running it::

    router.bind()
    with router.running():        # in a thread of its own (tests, benchmarks)
        ...
    await router.serve()          # from an event loop, until cancelled (the kernel)

Only the router thread touches the socket and the tables.  Others talk to it with
``submit(command)``; a supervised router talks back through ``router.notices`` (_boundary).
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import anyio
import anyio.abc
import zmq

from protocols import Measurements
from protocols.transport import recv_frames, recv_user

from ._api import KernelApi
from ._boundary import (
    AddPrincipal,
    Audit,
    Command,
    EnrollKey,
    FinishOperation,
    PublishEvent,
    RemovePrincipal,
    ServiceExited,
    ServiceRemoved,
    ServiceUpdate,
    SetKnownServices,
)
from ._config import BusConfig
from ._core import log
from ._exceptions import BindError
from ._peers import Principal, RouterStatistics
from ._policy import Policy
from ._pubsub import PubSub
from ._routing import WAKE_IDENTITY, Routing
from ._session import Sessions

__all__ = ["Router", "Principal", "RouterStatistics", "ZAP_DOMAIN"]

ZAP_DOMAIN = "edgebus"


class Router(Routing, Sessions, PubSub, KernelApi, Policy):
    """Routes messages between peers.

    ``supervised``: a kernel's router, which reports peers ready and gone and forwards the
    operations (StartService...) through ``notices``; without, it routes alone and answers
    operations ``unavailable``."""

    def __init__(
        self,
        endpoint: str,
        config: BusConfig,
        principals: Iterable[Principal],
        *,
        known_services: Iterable[str] = (),
        supervised: bool = False,
        measurements: Callable[[], Measurements] | None = None,
        enrolled: dict[str, str] | None = None,
        ctx: zmq.Context | None = None,
    ) -> None:
        self._init_core(endpoint, config, ctx or zmq.Context.instance(), supervised)
        self._init_routing()
        self._init_sessions()
        self._init_pubsub()
        self._init_api(frozenset(known_services), measurements)
        self._init_policy(principals, enrolled or {})
        #: The CURVE server secret key (Z85) for the tcp endpoint.
        self.curve_secret_key: bytes | None = None
        self._commands: collections.deque[Command] = collections.deque()
        self._waker: zmq.Socket | None = None
        self._wake_lock = threading.Lock()  # the waker socket is shared by every submitting thread
        self._wake_endpoint = f"inproc://edgebus-router-{id(self):x}"
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------

    def bind(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, self.config.queue_limit)
        sock.setsockopt(zmq.RCVHWM, max(self.config.queue_limit * 10, 10000))
        # A hard ceiling for a single frame: libzmq disconnects a peer that exceeds it.
        # The per-message check in _route sits well below and answers with a clear error.
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_size * 2)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, self._idle_timeout)  # 1 ms while a backlog waits (_hold)
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
        self._stopping = False
        waker = self._ctx.socket(zmq.DEALER)
        waker.setsockopt(zmq.IDENTITY, WAKE_IDENTITY)
        waker.setsockopt(zmq.LINGER, 0)
        waker.connect(self._wake_endpoint)
        self._waker = waker

    def run(self) -> None:
        """Route in this thread until ``stop()``.  Binds first if need be."""
        if self._sock is None:
            self.bind()
        sock = self._sock
        assert sock is not None
        # One call per message (protocols.transport): identity, signature, header, body as
        # bytes; tensor frames as zero-copy frame objects, forwarded without Python ever
        # touching their bytes.  With a CURVE listener, the ZAP-authenticated User-Id too.
        curve = bool(self.config.tcp_endpoint)
        route = self._route
        commands = self._commands
        backlogged = self._backlogged
        tick_every = min(self.config.heartbeat_interval, 0.1)
        next_tick = next_flush = 0.0
        parts: list[Any] | None
        while not self._stopping:
            if commands:
                self._run_commands()
            try:
                if curve:
                    parts, self._user_id = recv_user(sock, 0, 4)
                else:
                    parts = recv_frames(sock, 0, 4)
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
            if backlogged and now >= next_flush:
                # Answers wait for a peer that reads slowly: retry, at most every millisecond.
                next_flush = now + 0.001
                try:
                    self._flush_backlogs()
                except Exception:
                    log.exception("router_internal_error", during="flush")
            if now >= next_tick:
                next_tick = now + tick_every
                try:
                    self._tick(now)
                except Exception:
                    log.exception("router_internal_error", during="tick")

    def stop(self) -> None:
        """Make ``run()`` return (from any thread)."""
        self._stopping = True
        self._wake()

    @contextlib.contextmanager
    def running(self) -> Iterator[Router]:
        """Route in a thread of its own while the block runs; then stop and close."""
        if self._sock is None:
            self.bind()
        thread = threading.Thread(target=self.run, name="edgebus-router", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop()
            thread.join()
            self.close()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Route until cancelled.  Reports started once the socket is bound.

        Routing runs in a worker thread that blocks in libzmq (GIL released), so a message
        costs no event-loop wake-up; the event loop keeps the supervisor."""
        if self._sock is None:
            self.bind()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stop_when_cancelled)
                task_status.started()
                await anyio.to_thread.run_sync(self.run)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                self.close()

    async def _stop_when_cancelled(self) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            self.stop()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        with self._wake_lock:
            if self._waker is not None:
                self._waker.close(0)
                self._waker = None

    def statistics(self) -> RouterStatistics:
        """Counters since start (read from any thread: each is one integer)."""
        return RouterStatistics(
            peers=len(self._peers), pending=len(self._pending), routed=self._routed,
            denied=self._denied, malformed=self._malformed, stray_replies=self._stray,
            dropped_events=self._dropped_events,
            backlogged=len(self._backlogged), overflowed=self._overflows,
        )

    # -- commands from other threads -----------------------------------------------------------

    def submit(self, command: Command) -> None:
        """Have the router thread carry out ``command`` (in order, before its next message).
        Never blocks; from any thread."""
        self._commands.append(command)
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._waker is not None:
                try:
                    self._waker.send(b"", zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # already full of wake-ups: the router will look at the queue anyway

    def _run_commands(self) -> None:
        commands = self._commands
        while commands:
            command = commands.popleft()
            try:
                self._execute(command)
            except Exception:
                log.exception("router_command_failed", command=type(command).__name__)

    def _execute(self, command: Command) -> None:
        match command:
            case AddPrincipal(principal=principal):
                self._add_principal(principal)
            case RemovePrincipal(name=name):
                self._remove_principal(name)
            case SetKnownServices(names=names):
                self.known_services = names
            case EnrollKey(name=name, public_key=key):
                self._enroll(name, key)
            case ServiceUpdate():
                self._service_update(command)
            case ServiceRemoved(name=name):
                self._managed.pop(name, None)
            case ServiceExited(name=name, why=why):
                # Its pending requests are answered `unavailable` now, not after missed heartbeats.
                self._disconnect_name(name, f"process {why}")
            case Audit(kind=kind, subject=subject, detail=detail):
                self._audit(kind, subject, detail=detail)
            case FinishOperation():
                self._finish_operation(command)
            case PublishEvent(topic=topic, body=body):
                self.publish_kernel_event(topic, body)

    def _tick(self, now: float) -> None:
        self._expire(now)
        if self._grant_expiry:
            self._expire_grants()
        self._heartbeats(now)
        if self._trim_at and now >= self._trim_at:
            self._trim_memory()
