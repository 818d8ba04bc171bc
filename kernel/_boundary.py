"""The boundary between the kernel's event loop (the supervisor) and the router's thread.

Messages, one queue each way, and nothing else crosses it:

* **commands**, event loop (or any thread) -> router: ``Router.submit(command)``; the router
  thread runs them in order between two messages.  The supervisor pushes each service's
  status this way whenever it changes, so the router never reads supervisor state.
* **notices**, router -> event loop: a ``Mailbox`` the kernel drains (``async for notice in
  router.notices``).  Putting never blocks: the router thread never waits for the loop.
"""

from __future__ import annotations

import collections
import os
import weakref
from typing import Generic, TypeVar

import anyio
import msgspec

from protocols import ServiceStatus

from ._peers import Principal

__all__ = [
    "Command", "AddPrincipal", "RemovePrincipal", "SetKnownServices", "EnrollKey", "ServiceUpdate",
    "ServiceRemoved", "ServiceExited", "Audit", "FinishOperation", "PublishEvent",
    "Notice", "PeerReady", "PeerGone", "OperationRequested", "Mailbox",
]


# -- commands: to the router ----------------------------------------------------------------

class AddPrincipal(msgspec.Struct, frozen=True):
    """Register (or replace) a credential: a spawned service's, the operator's, an external
    service's."""

    principal: Principal


class RemovePrincipal(msgspec.Struct, frozen=True):
    """Revoke a credential: its peer is disconnected and it cannot say Hello again."""

    name: str


class SetKnownServices(msgspec.Struct, frozen=True):
    """The configured service names (after a reload): requests to others are answered
    ``unknown-destination``, to these but not connected ``unavailable``."""

    names: frozenset[str]


class EnrollKey(msgspec.Struct, frozen=True):
    """Bind a CurveZMQ public key (Z85) to an external service; an empty key unbinds."""

    name: str
    public_key: str


class ServiceUpdate(msgspec.Struct, frozen=True):
    """A managed service's status changed (the supervisor's snapshot).  The router keeps it
    for ListServices and publishes ``kernel.services`` when the state changed."""

    status: ServiceStatus
    #: Monotonic start time of its process (uptime is computed when asked).
    started_at: float = 0.0
    #: The state before this change ("" when only the pid or counters changed).
    previous: str = ""
    detail: str = ""


class ServiceRemoved(msgspec.Struct, frozen=True):
    """A reload removed a managed service."""

    name: str


class ServiceExited(msgspec.Struct, frozen=True):
    """A managed service's process exited: its connection goes now, and its pending
    requests are answered ``unavailable`` (not after missed heartbeats)."""

    name: str
    why: str


class Audit(msgspec.Struct, frozen=True):
    """An audit record (crashes, restarts, failures, refused CURVE keys) for kernel.audit."""

    kind: str
    subject: str
    detail: str = ""


class FinishOperation(msgspec.Struct, frozen=True):
    """The answer to an ``OperationRequested``: an ``Error``, a ``ServiceStatus`` (the router
    answers with its own fuller view of that service) or any reply."""

    identity: bytes
    request_id: int
    result: msgspec.Struct


class PublishEvent(msgspec.Struct, frozen=True):
    """Publish ``body`` on ``topic`` as the kernel (its log records, on kernel.logs.<service>),
    to the peers subscribed and allowed."""

    topic: str
    body: msgspec.Struct


Command = (AddPrincipal | RemovePrincipal | SetKnownServices | EnrollKey | ServiceUpdate | ServiceRemoved
           | ServiceExited | Audit | FinishOperation | PublishEvent)


# -- notices: from the router ----------------------------------------------------------------

class PeerReady(msgspec.Struct, frozen=True):
    """A service said READY."""

    name: str


class PeerGone(msgspec.Struct, frozen=True):
    """A service's connection is gone.  ``silent``: it missed its heartbeats (hung?);
    ``credential`` tells which incarnation it was."""

    name: str
    why: str
    credential: str
    silent: bool


class OperationRequested(msgspec.Struct, frozen=True):
    """StartService, StopService, RestartService or Reload, from the peer ``identity``: the
    supervisor does it and answers with ``FinishOperation``."""

    request: msgspec.Struct
    identity: bytes
    request_id: int


Notice = PeerReady | PeerGone | OperationRequested

T = TypeVar("T")


class Mailbox(Generic[T]):
    """A queue from a thread to an event loop.  ``put`` never blocks (a deque and an
    eventfd); the loop waits on the eventfd's readability, without polling."""

    def __init__(self) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Closed with the mailbox, never under a waiter (which holds a reference).
        weakref.finalize(self, os.close, self._fd)

    def put(self, item: T) -> None:
        """From any thread."""
        self._items.append(item)
        os.eventfd_write(self._fd, 1)

    def __aiter__(self) -> Mailbox[T]:
        return self

    async def __anext__(self) -> T:
        """The next item, in order (on the event loop)."""
        while not self._items:
            await anyio.wait_readable(self._fd)
            try:
                os.eventfd_read(self._fd)  # reset; the items are what counts
            except BlockingIOError:
                pass
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)
