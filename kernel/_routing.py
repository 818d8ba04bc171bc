"""Routing and flow control: the hot path.

``_route`` is deliberately plain: decode the header, look up the peer, check the capability
through a per-peer cache, stamp sender and correlation id, and forward the body and tensor
frames untouched (zero-copy frame objects, see protocols.transport).  A request is
remembered in the pending table under the kernel's own id until its reply, its deadline or
its target's departure.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from typing import Any

import msgspec
import zmq

from protocols import SIGNATURE, Error, ErrorCode, Header, ProtocolError, check_signature

from ._core import CONTROL, ERROR, EVENT, KERNEL, REPLY, REQUEST, CACHE_LIMIT, RouterCore, log, worth_logging
from ._peers import Peer, Pending

#: The identity of the router's own wake-up socket (see _router.py): its messages are empty.
WAKE_IDENTITY = b"edgebus-kernel-wake"


class Routing(RouterCore):
    def _init_routing(self) -> None:
        #: kernel id -> the request routed under it
        self._pending: dict[int, Pending] = {}
        #: (expiry, kernel id), a heap; answered requests' entries stay until they surface
        self._expiry: list[tuple[float, int]] = []
        self._ids = itertools.count(1)
        self._hdr = msgspec.msgpack.Decoder(Header)
        self._request_timeout = self.config.request_timeout
        self._max_pending = self.config.max_pending

    def _route(self, parts: list[Any]) -> None:
        identity = parts[0]
        if len(parts) < 4:
            if identity == WAKE_IDENTITY:
                return
            self._malformed += 1
            self._reject(identity, self._header_of(parts), ErrorCode.BAD_MESSAGE,
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
        if size > self._max_size:
            self._malformed += 1
            problem = f"message of {size} bytes exceeds the bus limit of {self._max_size} bytes"
            if hdr.kind == REPLY or hdr.kind == ERROR:
                self._undeliverable_reply(identity, hdr, problem)
            self._reject(identity, hdr, ErrorCode.BAD_MESSAGE, problem)
            return
        peer = self._peers.get(identity)
        if peer is None:
            if hdr.kind == CONTROL and hdr.type == "Hello":
                self._hello(identity, hdr, parts[3])
            else:
                self._sessionless(identity, hdr)
            return
        peer.last_seen = now = time.monotonic()
        kind = hdr.kind
        if kind == REQUEST:
            self._request(peer, hdr, parts, now, size)
        elif kind == REPLY or kind == ERROR:
            self._reply(peer, hdr, parts, size)
        elif kind == EVENT:
            self._publish(peer, hdr, parts, size)
        else:
            self._control_message(peer, hdr, parts[3])

    def _header_of(self, parts: list[Any]) -> Header | None:
        """The header of a message too short to route, if it has one: a signature of this
        major version, then a frame that decodes as a header.  Its error then carries the
        header's id (PROTOCOL.md 2); without one, id 0."""
        if len(parts) < 3:
            return None
        try:
            check_signature(parts[1])
            return self._hdr.decode(parts[2])
        except (ProtocolError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    def _request(self, peer: Peer, hdr: Header, parts: list[Any], now: float, size: int) -> None:
        dest = hdr.dest
        typ = hdr.type
        ok = peer.calls.get((dest, typ))
        if ok is None:
            if len(peer.calls) >= CACHE_LIMIT:
                peer.calls.clear()
            ok = peer.calls[(dest, typ)] = peer.principal.caps.allows("call", f"{dest}.{typ}")
        if not ok:
            self._deny(peer, hdr, f"call:{dest}.{typ}")
            return
        peer.requests_out += 1
        if dest == KERNEL:
            self._kernel_request(peer, hdr, parts[3])
            return
        target = self._by_name.get(dest)
        if target is None or not target.ready:
            if target is None and dest not in self.known_services:
                self.answer(peer, hdr, Error(code=ErrorCode.UNKNOWN_DESTINATION,
                                             message=f"no service named {dest!r} is configured or connected"))
            else:
                self.answer(peer, hdr, Error(code=ErrorCode.UNAVAILABLE, message=(
                    f"service {dest!r} is not ready (not running, starting or restarting); retry later")))
            return
        if typ not in target.types:
            self.answer(peer, hdr, Error(code=ErrorCode.UNKNOWN_TYPE, message=(
                f"service {dest!r} does not serve {typ!r}; "
                f"it serves {', '.join(sorted(target.types)) or 'nothing'}")))
            return
        if hdr.deadline:
            if not math.isfinite(hdr.deadline):
                self.answer(peer, hdr, Error(code=ErrorCode.BAD_MESSAGE, message=(
                    f"deadline {hdr.deadline!r} is not a finite number of seconds since the epoch")))
                return
            remaining = hdr.deadline - time.time()
            if remaining <= 0:
                self.answer(peer, hdr, Error(code=ErrorCode.TIMEOUT, message=(
                    f"the deadline passed {-remaining * 1000:.1f} ms before the request reached the kernel")))
                return
            expires = now + min(remaining, self._request_timeout)
        else:
            expires = now + self._request_timeout
        if target.pending >= self._max_pending:
            self.answer(peer, hdr, Error(code=ErrorCode.OVERLOADED, message=(
                f"service {dest!r} has {target.pending} requests outstanding (bus.max_pending)")))
            return
        orig = hdr.id
        kid = next(self._ids)
        hdr.id = kid
        hdr.sender = peer.name
        stamped = self._enc.encode(hdr)
        if size > self._stamp_free_size and size - len(parts[2]) + len(stamped) > self._max_size:
            hdr.id = orig
            self._malformed += 1
            self.answer(peer, hdr, Error(code=ErrorCode.BAD_MESSAGE, message=self._too_large_stamped(
                size - len(parts[2]) + len(stamped))))
            return
        parts[0] = target.identity
        parts[2] = stamped
        try:
            self._sendv(parts)
        except zmq.Again:
            hdr.id = orig
            self.answer(peer, hdr, Error(code=ErrorCode.OVERLOADED, message=(
                f"service {dest!r} has {self.config.queue_limit} messages queued (bus.queue_limit)")))
            return
        except zmq.ZMQError:
            hdr.id = orig
            self.disconnect(target, "its connection is gone")
            self.answer(peer, hdr, Error(code=ErrorCode.UNAVAILABLE, message=f"service {dest!r} disconnected"))
            return
        self._routed += 1
        target.requests_in += 1
        self._pending[kid] = Pending(peer, orig, target, expires, typ)
        heapq.heappush(self._expiry, (expires, kid))
        target.pending += 1
        if self._monitors:
            hdr.id = orig  # monitors see the requester's id, as on the reply
            self._observe(hdr, peer.name, dest, parts)

    def _reply(self, peer: Peer, hdr: Header, parts: list[Any], size: int) -> None:
        kid = hdr.id
        pending = self._pending.get(kid)
        if pending is None or pending.target is not peer:
            # Late (already timed out) or never asked for: a reply is only delivered to
            # the requester of an outstanding request.
            self._stray += 1
            if worth_logging(self._stray):
                log.warning("reply_dropped", count=self._stray, service=peer.name, id=kid, type=hdr.type,
                            reason="no outstanding request with this id for this sender "
                                   "(it timed out, its requester left, or it was never sent)")
            return
        del self._pending[kid]
        peer.pending -= 1
        requester = pending.requester
        hdr.id = pending.request_id
        hdr.sender = peer.name
        hdr.dest = ""
        stamped = self._enc.encode(hdr)
        if size > self._stamp_free_size and size - len(parts[2]) + len(stamped) > self._max_size:
            problem = self._too_large_stamped(size - len(parts[2]) + len(stamped))
            self._malformed += 1
            self.answer(requester, pending.request_id, Error(code=ErrorCode.BAD_MESSAGE, message=(
                f"the reply of {peer.name!r} to {pending.type!r} was not delivered: {problem}")))
            hdr.id = kid
            self._reject(peer.identity, hdr, ErrorCode.BAD_MESSAGE, problem)
            return
        parts[0] = requester.identity
        parts[2] = stamped
        self._deliver(parts, requester)
        self._routed += 1
        if self._monitors:
            self._observe(hdr, peer.name, requester.name, parts)

    def _undeliverable_reply(self, identity: bytes, hdr: Header, problem: str) -> None:
        """A reply (or error) too large to route: its requester is answered ``bad-message`` at
        once instead of waiting out its deadline."""
        peer = self._peers.get(identity)
        pending = self._pending.get(hdr.id)
        if peer is None or pending is None or pending.target is not peer:
            return
        del self._pending[hdr.id]
        peer.pending -= 1
        self.answer(pending.requester, pending.request_id, Error(code=ErrorCode.BAD_MESSAGE, message=(
            f"the reply of {peer.name!r} to {pending.type!r} was not delivered: {problem}")))

    def _expire(self, now: float) -> None:
        """Answer ``timeout`` for every request whose deadline has passed."""
        heap = self._expiry
        if len(heap) > 2 * len(self._pending) + 1024:
            # answered requests leave their entries behind: rebuild from what is pending
            heap[:] = [(p.expires, kid) for kid, p in self._pending.items()]
            heapq.heapify(heap)
        while heap and heap[0][0] <= now:
            _, kid = heapq.heappop(heap)
            pending = self._pending.pop(kid, None)
            if pending is None:
                continue
            pending.target.pending -= 1
            self.answer(pending.requester, pending.request_id, Error(code=ErrorCode.TIMEOUT, message=(
                f"{pending.target.name!r} did not answer {pending.type!r} before the deadline")))

    def _drop_pending(self, peer: Peer, why: str) -> None:
        """``peer`` is gone: what it was asked is answered ``unavailable``, what it asked is
        forgotten (a late reply to it is dropped as stray), and so is its backlog."""
        self._forget(peer)
        for kid, pending in list(self._pending.items()):
            if pending.target is peer:
                del self._pending[kid]
                if pending.requester is not peer:
                    self.answer(pending.requester, pending.request_id, Error(
                        code=ErrorCode.UNAVAILABLE, message=f"service {peer.name!r} went away before replying ({why})"))
            elif pending.requester is peer:
                del self._pending[kid]
                pending.target.pending -= 1
        peer.pending = 0
