"""A small anyio adapter over a pyzmq socket, so the same code runs on asyncio and trio.

pyzmq's ``zmq.FD`` is edge-triggered: it becomes readable when the socket's event state
*changed*, not while messages wait.  So every wait re-checks ``zmq.EVENTS`` first, and all
operations are non-blocking attempts.  Only one task may wait on a file descriptor at a
time under anyio, so one task watches the FD and wakes the others through an Event.
"""

from __future__ import annotations

from typing import Any, Sequence

import anyio
import zmq

__all__ = ["AsyncSocket", "recv_frames", "send_frames"]

# Plain ints: pyzmq's flag enums cost an Enum construction per bitwise operation.
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE)
# The Cython send; pyzmq's Python wrapper around it only adds DRAFT-socket options.
_send = zmq.backend.Socket.send


def recv_frames(sock: zmq.Socket, flags: int = 0, small: int = 4) -> list[Any]:
    """Receive one multipart message: the first ``small`` frames as bytes, the rest as
    zero-copy ``zmq.Frame`` objects.  Raises zmq.Again with NOBLOCK when none waits.

    ``frame.more`` is used instead of getsockopt(RCVMORE), which costs several times more
    per frame in pyzmq."""
    frame = sock.recv(flags, copy=False)
    parts: list[Any] = [frame.bytes]
    while frame.more:
        frame = sock.recv(0, copy=False)
        parts.append(frame.bytes if len(parts) < small else frame)
    return parts


def send_frames(sock: zmq.Socket, parts: Sequence[Any], flags: int = 0) -> None:
    """Send one multipart message frame by frame (cheaper than send_multipart).  Only the
    first frame can raise (EAGAIN with NOBLOCK, EHOSTUNREACH on a mandatory ROUTER); after
    it, libzmq accepts the rest of the message atomically."""
    last = len(parts) - 1
    if last == 0:
        _send(sock, parts[0], flags)
        return
    _send(sock, parts[0], flags | _MORE)
    for i in range(1, last):
        _send(sock, parts[i], _MORE)
    _send(sock, parts[last], 0)


class AsyncSocket:
    __slots__ = ("sock", "_fd", "_watching", "_changed", "_scope", "_wanted")

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self._fd = sock.getsockopt(zmq.FD)
        self._watching = False
        self._changed = anyio.Event()
        self._scope: anyio.CancelScope | None = None
        self._wanted = 0

    async def wait(self, mask: int) -> None:
        """Return once ``zmq.EVENTS`` has one of the bits in ``mask`` (POLLIN/POLLOUT)."""
        sock = self.sock
        while not (sock.getsockopt(zmq.EVENTS) & mask):
            self._wanted |= mask
            if self._watching:
                await self._changed.wait()
                continue
            self._watching = True
            try:
                with anyio.CancelScope() as self._scope:
                    await anyio.wait_readable(self._fd)
            finally:
                self._watching = False
                self._scope = None
                self._wanted = 0
                changed, self._changed = self._changed, anyio.Event()
                changed.set()

    def _nudge(self) -> None:
        """After our own send or recv: libzmq may have processed the notification that a
        waiter is blocked on (the FD is edge-triggered), so the waiter would sleep through
        a message already there.  Wake it to re-check zmq.EVENTS."""
        if self._scope is not None and self.sock.getsockopt(zmq.EVENTS) & self._wanted:
            self._scope.cancel()

    async def send(self, frames: Sequence[Any]) -> None:
        """Send one multipart message, waiting while the peer's queue is full."""
        while True:
            try:
                send_frames(self.sock, frames, _NOBLOCK)
                break
            except zmq.Again:
                await self.wait(zmq.POLLOUT)
        if self._scope is not None:
            self._nudge()

    def try_send(self, frames: Sequence[Any]) -> bool:
        """Send one multipart message if the socket takes it now; False (nothing sent) if
        its queue is full.  Never waits: for what must not queue behind other traffic."""
        try:
            send_frames(self.sock, frames, _NOBLOCK)
        except zmq.Again:
            return False
        if self._scope is not None:
            self._nudge()
        return True

    async def recv(self, small: int = 3) -> list[Any]:
        """Receive one multipart message (see :func:`recv_frames`)."""
        while True:
            try:
                frames = recv_frames(self.sock, _NOBLOCK, small)
                break
            except zmq.Again:
                await self.wait(zmq.POLLIN)
        if self._scope is not None:
            self._nudge()
        return frames

    def close(self, linger: int = 0) -> None:
        """Close the socket.  A task waiting on it wakes: the one watching the FD with
        anyio.ClosedResourceError, the others with zmq.ZMQError (ENOTSOCK)."""
        if self._watching:
            anyio.notify_closing(self._fd)
        self.sock.close(linger)
