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

__all__ = ["AsyncSocket"]


class AsyncSocket:
    __slots__ = ("sock", "_fd", "_watching", "_changed")

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self._fd = sock.getsockopt(zmq.FD)
        self._watching = False
        self._changed = anyio.Event()

    async def wait(self, mask: int) -> None:
        """Return once ``zmq.EVENTS`` has one of the bits in ``mask`` (POLLIN/POLLOUT)."""
        sock = self.sock
        while not (sock.getsockopt(zmq.EVENTS) & mask):
            if self._watching:
                await self._changed.wait()
                continue
            self._watching = True
            try:
                await anyio.wait_readable(self._fd)
            finally:
                self._watching = False
                changed, self._changed = self._changed, anyio.Event()
                changed.set()

    async def send_multipart(self, frames: Sequence[Any], copy: bool = False) -> None:
        while True:
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK, copy=copy)
                return
            except zmq.Again:
                await self.wait(zmq.POLLOUT)

    async def recv_multipart(self, copy: bool = False) -> list[Any]:
        while True:
            try:
                return self.sock.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                await self.wait(zmq.POLLIN)

    def try_recv_multipart(self, copy: bool = False) -> list[Any] | None:
        """A message if one is waiting, else None; never blocks."""
        try:
            return self.sock.recv_multipart(zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            return None

    def close(self, linger: int = 0) -> None:
        self.sock.close(linger)
