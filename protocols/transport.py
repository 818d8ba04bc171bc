"""A small anyio adapter over a pyzmq socket, so the same code runs on asyncio and trio.

pyzmq's ``zmq.FD`` is edge-triggered: it becomes readable when the socket's event state
*changed*, not while messages wait.  So every wait re-checks ``zmq.EVENTS`` first, and all
operations are non-blocking attempts: a receiver drains the socket until EAGAIN and only
then waits.

On asyncio the FD is watched once for the socket's life (a reader registered with the
event loop on the first wait, as zmq.asyncio does), not registered and removed around each
wait (what ``anyio.wait_readable`` does: two epoll_ctl calls and a future per message).
Its callback reads ``zmq.EVENTS`` (which re-arms the FD) and wakes the waiting tasks
through plain futures.  On other backends (trio) one task watches the FD with
``anyio.wait_readable`` and wakes the others through an Event.

:class:`Wakeup` is the matching cheap one-shot wake-up for one waiting task, with an
optional timeout: a future and a timer handle on asyncio, a parked task under a deadline
on trio; no anyio Event or cancel scope per use.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Callable, Sequence

import anyio
import sniffio
import zmq

__all__ = ["AsyncSocket", "NATIVE", "Wakeup", "recv_frames", "recv_user", "send_frames", "wakeup_factory"]

# Plain ints: pyzmq's flag enums cost an Enum construction per bitwise operation.
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN, _POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)
# The Cython send; pyzmq's Python wrapper around it only adds DRAFT-socket options.
_send = zmq.backend.Socket.send


def _recv_frames(sock: zmq.Socket, flags: int = 0, small: int = 4) -> list[Any]:
    return _recv_user(sock, flags, small, user=False)[0]


def _send_frames(sock: zmq.Socket, parts: Sequence[Any], flags: int = 0) -> None:
    last = len(parts) - 1
    if last == 0:
        _send(sock, parts[0], flags)
        return
    _send(sock, parts[0], flags | _MORE)
    for i in range(1, last):
        _send(sock, parts[i], _MORE)
    _send(sock, parts[last], 0)


def _recv_user(sock: zmq.Socket, flags: int = 0, small: int = 4,
               user: bool = True) -> tuple[list[Any], str | None]:
    frame = sock.recv(flags, copy=False)
    parts: list[Any] = [frame.bytes]
    user_id = None
    while frame.more:
        frame = sock.recv(0, copy=False)
        if user and len(parts) == 1:
            try:
                user_id = frame.get("User-Id")
            except zmq.ZMQError:  # no such property: not a ZAP-authenticated connection
                pass
        parts.append(frame.bytes if len(parts) < small else frame)
    return parts, user_id


def _zmq_error(errno: int) -> zmq.ZMQError:
    """The exception pyzmq raises for ``errno``."""
    if errno == zmq.EAGAIN:
        return zmq.Again(errno)
    if errno == zmq.ETERM:
        return zmq.ContextTerminated(errno)
    return zmq.ZMQError(errno)


def _load_native() -> Any:
    """protocols._native bound to pyzmq's libzmq, or None (not built, or no such libzmq)."""
    try:
        from . import _native  # type: ignore[attr-defined]

        _native.load(_zmq_error, _send)
    except ImportError:
        return None
    return _native


_native = _load_native()
#: Whether the compiled message calls (protocols/_native.c) are in use.
NATIVE = _native is not None

#: ``recv_frames(sock, flags=0, small=4)``: receive one multipart message, the first
#: ``small`` frames as bytes and the rest as zero-copy frame objects (``zmq.Frame``, or
#: ``protocols._native.Msg``: both expose ``.bytes``, ``.buffer``, ``.more``, ``len()`` and
#: the buffer protocol).  Raises zmq.Again with NOBLOCK when none waits.
#:
#: ``send_frames(sock, parts, flags=0)``: send one multipart message (bytes, received
#: frames, or any buffer: numpy arrays and ``zmq.Frame`` go zero-copy through pyzmq).  Only
#: the first frame can raise (EAGAIN with NOBLOCK, EHOSTUNREACH on a mandatory ROUTER);
#: after it, libzmq accepts the rest of the message atomically.
#:
#: ``recv_user(sock, flags=0, small=4)``: ``recv_frames`` and the User-Id (the ZAP
#: authenticated identity) of frame 1, or None.
#:
#: One call per message in C where protocols._native is built; else pyzmq frame by frame
#: (``frame.more`` instead of getsockopt(RCVMORE), which costs several times more).
if _native is not None:
    recv_frames, send_frames, recv_user = _native.recv, _native.send, _native.recv_user
else:
    recv_frames, send_frames, recv_user = _recv_frames, _send_frames, _recv_user


class Wakeup:
    """A one-shot wake-up for one waiting task: ``set()`` from anywhere in the event loop's
    thread, ``await wait(timeout)`` -> True once set, False when ``timeout`` (seconds)
    passed first.  Cancellation of the waiting task works as for any await.  ``clear()``
    makes it usable again.  Build them with :func:`wakeup_factory` (backend-specific)."""

    __slots__ = ("is_set",)

    def __init__(self) -> None:
        self.is_set = False

    def set(self) -> None:
        raise NotImplementedError

    def clear(self) -> None:
        self.is_set = False

    async def wait(self, timeout: float = math.inf) -> bool:
        raise NotImplementedError


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _AsyncioWakeup(Wakeup):
    __slots__ = ("_fut",)

    def __init__(self) -> None:
        self.is_set = False
        self._fut: asyncio.Future[None] | None = None

    def set(self) -> None:
        self.is_set = True
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait(self, timeout: float = math.inf) -> bool:
        if self.is_set:
            return True
        if timeout <= 0:
            return False
        loop = asyncio.get_running_loop()
        fut = self._fut = loop.create_future()
        timer = loop.call_later(timeout, _expire, fut) if timeout != math.inf else None
        try:
            await fut
        finally:
            self._fut = None
            if timer is not None:
                timer.cancel()
        return self.is_set


class _TrioWakeup(Wakeup):
    __slots__ = ("_task",)

    def __init__(self) -> None:
        self.is_set = False
        self._task: Any = None

    def set(self) -> None:
        self.is_set = True
        task, self._task = self._task, None
        if task is not None:
            import trio

            trio.lowlevel.reschedule(task)

    async def wait(self, timeout: float = math.inf) -> bool:
        import trio

        if self.is_set:
            return True
        if timeout <= 0:
            return False

        def abort(_: Any) -> Any:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        self._task = trio.lowlevel.current_task()
        try:
            if timeout == math.inf:
                await trio.lowlevel.wait_task_rescheduled(abort)
            else:
                with trio.move_on_after(timeout):
                    await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            self._task = None
        return self.is_set


def wakeup_factory() -> Callable[[], Wakeup]:
    """The Wakeup class for the running event loop's backend (asyncio or trio)."""
    return _TrioWakeup if sniffio.current_async_library() == "trio" else _AsyncioWakeup


class AsyncSocket:
    __slots__ = ("sock", "_fd", "_watching", "_changed", "_scope", "_wanted", "_loop", "_waiters", "_asyncio",
                 "_events")

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self._fd = sock.getsockopt(zmq.FD)
        self._watching = False
        self._changed: anyio.Event | None = None
        self._scope: Any = None  # trio.CancelScope
        self._wanted = 0
        #: asyncio: the loop the FD's reader is registered with, and the waiting tasks' futures
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._asyncio: bool | None = None
        #: asyncio: zmq.EVENTS as read by whoever woke the waiters (each read is a syscall)
        self._events = 0

    async def wait(self, mask: int, checked: bool = False) -> None:
        """Return once ``zmq.EVENTS`` has one of the bits in ``mask`` (POLLIN/POLLOUT).
        ``checked``: the caller has just read zmq.EVENTS without them (and nothing touched
        the socket since)."""
        sock = self.sock
        if self._asyncio is None:
            self._asyncio = sniffio.current_async_library() == "asyncio"
        if self._asyncio:
            events = 0 if checked else sock.getsockopt(_EVENTS)
            while not (events & mask):
                loop = self._loop
                if loop is None:
                    loop = self._loop = asyncio.get_running_loop()
                    try:
                        loop.add_reader(self._fd, self._readable)
                    except OSError:  # a socket closed without close() left its FD number registered
                        loop.remove_reader(self._fd)
                        loop.add_reader(self._fd, self._readable)
                fut = loop.create_future()
                self._waiters.append(fut)
                self._wanted |= mask
                try:
                    await fut
                finally:
                    if not fut.done():  # cancelled
                        self._waiters.remove(fut)
                # What the waker read: fresh enough, as only this task receives (at worst
                # a send or receive meets EAGAIN and waits again).
                events = self._events
            return
        import trio  # (the only other backend anyio runs on)

        while not (sock.getsockopt(_EVENTS) & mask):
            self._wanted |= mask
            if self._watching:
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
                continue
            self._watching = True
            try:
                # trio's own scope and wait: anyio's wrappers cost more than the wait itself
                with trio.CancelScope() as self._scope:
                    await trio.lowlevel.wait_readable(self._fd)
            except trio.ClosedResourceError:
                raise anyio.ClosedResourceError from None
            finally:
                self._watching = False
                self._scope = None
                self._wanted = 0
                changed, self._changed = self._changed, None
                if changed is not None:
                    changed.set()

    def _readable(self) -> None:
        """asyncio: the FD became readable.  Reading zmq.EVENTS re-arms it (without that
        the level-triggered reader would fire on every loop iteration); the waiters wake and
        check the events they want themselves."""
        try:
            events = self.sock.getsockopt(_EVENTS)
        except zmq.ZMQError:
            events = _POLLIN | _POLLOUT  # closed: the waiters find out when they look
        self._wake_all(events)

    def _wake_all(self, events: int) -> None:
        waiters = self._waiters
        if waiters:
            self._events = events
            self._waiters = []
            self._wanted = 0
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _nudge(self) -> None:
        """After our own send or recv: libzmq may have processed the notification that a
        waiter is blocked on (the FD is edge-triggered), so the waiter would sleep through
        a message already there.  Wake it to re-check zmq.EVENTS."""
        events = self.sock.getsockopt(_EVENTS)
        if events & self._wanted:
            if self._waiters:
                self._wake_all(events)
            elif self._scope is not None:
                self._scope.cancel()

    async def send(self, frames: Sequence[Any]) -> None:
        """Send one multipart message, waiting while the peer's queue is full."""
        while True:
            try:
                send_frames(self.sock, frames, _NOBLOCK)
                break
            except zmq.Again:
                await self.wait(_POLLOUT)
        if self._waiters or self._scope is not None:
            self._nudge()

    def try_send(self, frames: Sequence[Any]) -> bool:
        """Send one multipart message if the socket takes it now; False (nothing sent) if
        its queue is full.  Never waits: for what must not queue behind other traffic."""
        try:
            send_frames(self.sock, frames, _NOBLOCK)
        except zmq.Again:
            return False
        if self._waiters or self._scope is not None:
            self._nudge()
        return True

    async def recv(self, small: int = 3) -> list[Any]:
        """Receive one multipart message (see :func:`recv_frames`).  zmq.EVENTS is looked at
        first: cheaper than the zmq.Again exception that ends every drain otherwise."""
        sock = self.sock
        ready = sock.getsockopt(_EVENTS) & _POLLIN
        while True:
            if ready:
                try:
                    frames = recv_frames(sock, _NOBLOCK, small)
                    break
                except zmq.Again:
                    pass
            await self.wait(_POLLIN, checked=True)
            ready = True
        if self._waiters or self._scope is not None:
            self._nudge()
        return frames

    def close(self, linger: int = 0) -> None:
        """Close the socket.  A task waiting on it wakes: the one watching the FD with
        anyio.ClosedResourceError, the others with zmq.ZMQError (ENOTSOCK)."""
        if self._loop is not None:
            if not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            self._loop = None
            for fut in self._waiters:
                if not fut.done():
                    fut.set_exception(anyio.ClosedResourceError())
            self._waiters = []
        if self._watching:
            anyio.notify_closing(self._fd)
        self.sock.close(linger)
