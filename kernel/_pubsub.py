"""Publish/subscribe: subscriptions (prefixes, checked against ``subscribe:`` capabilities),
the topic cache, publishing, the kernel's own events (service states, audit records, with a
backlog while nobody listens) and traffic monitors."""

from __future__ import annotations

import collections
import time
from typing import Any

import msgspec

from protocols import SIGNATURE, AuditEvent, ErrorCode, Header, Kind, Monitor, Subscribed, Traffic, body_tag

from ._core import EVENT, KERNEL, KIND_NAMES, SECURITY, RouterCore
from ._peers import Peer

_AUDIT_TOPIC = "kernel.audit"
#: A monitor is shown a message's body when it is at most this long (msgpack bytes).
MONITOR_BODY_LIMIT = 4096


class _ErrorCode(msgspec.Struct):
    """The code of an error body (any code: one this kernel does not know is shown as is)."""

    code: str = ""


_error_decoder = msgspec.msgpack.Decoder(_ErrorCode)


class PubSub(RouterCore):
    def _init_pubsub(self) -> None:
        #: topic -> the peers that receive it (subscribed and allowed); cleared whenever
        #: subscriptions or capabilities change.
        self._topic_cache: dict[str, list[Peer]] = {}
        self._audit_backlog: collections.deque[AuditEvent] = collections.deque(maxlen=10000)
        self._audit_dropped = 0
        #: monitor's identity -> what it watches
        self._monitors: dict[bytes, Monitor] = {}

    def _publish(self, peer: Peer, hdr: Header, parts: list[Any], size: int) -> None:
        topic = hdr.dest
        # Every peer may report its own metrics (metrics.<its name>): no capability needed.
        if not (topic.startswith("metrics.") and topic[8:] == peer.name) and \
                not self._allowed(peer, EVENT, "publish", topic):
            self._deny(peer, hdr, f"publish:{topic}")
            return
        peer.events_out += 1
        hdr.sender = peer.name
        orig, hdr.id = hdr.id, 0
        stamped = self._enc.encode(hdr)
        if size > self._stamp_free_size and size - len(parts[2]) + len(stamped) > self._max_size:
            hdr.id = orig
            self._malformed += 1
            self._reject(peer.identity, hdr, ErrorCode.BAD_MESSAGE,
                         self._too_large_stamped(size - len(parts[2]) + len(stamped)))
            return
        parts[2] = stamped
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
            and self._allowed(p, EVENT, "subscribe", topic)
        ]
        if len(self._topic_cache) > 10000:
            self._topic_cache.clear()
        self._topic_cache[topic] = subs
        return subs

    def _subscribe(self, peer: Peer, hdr: Header, topics: list[str]) -> None:
        for topic in topics:
            if not peer.principal.caps.covers_prefix("subscribe", topic):
                self._deny(peer, hdr, f"subscribe:{topic}*")
                return
        peer.subscriptions.update(topics)
        self._topic_cache.clear()
        if (self._audit_backlog and peer.name == SECURITY and not peer.principal.shared
                and any(_AUDIT_TOPIC.startswith(t) for t in topics)):
            self._flush_audit_backlog(peer)
        self.answer(peer, hdr, Subscribed(topics=sorted(peer.subscriptions)))

    def _unsubscribe(self, peer: Peer, hdr: Header, topics: list[str]) -> None:
        peer.subscriptions.difference_update(topics)
        self._topic_cache.clear()
        self.answer(peer, hdr, Subscribed(topics=sorted(peer.subscriptions)))

    # -- the kernel's own events ------------------------------------------------------------

    def publish_kernel_event(self, topic: str, body: msgspec.Struct) -> None:
        """Publish an event from the kernel itself (service state changes, audit records,
        log records).  Nothing is encoded when nobody receives it."""
        subscribers = self._topic_cache.get(topic)
        if subscribers is None:
            subscribers = self._subscribers(topic)
        if not subscribers:
            return
        hdr = Header(kind=Kind.EVENT, type=body_tag(body), dest=topic, sender=KERNEL)
        frames: list[Any] = [b"", SIGNATURE, self._enc.encode(hdr), self._enc.encode(body)]
        for sub in subscribers:
            frames[0] = sub.identity
            self._send(frames, sub)

    def _audit(self, kind: str, subject: str, *, capability: str = "", detail: str = "") -> None:
        """An audit record for the security service, published on kernel.audit.  While
        nobody subscribes (the security service starting or restarting) records wait in
        a bounded buffer and are delivered to the next subscriber.

        Authentication failures (input nobody authenticated) are summarised: the 1st, 10th,
        100th... for each claimed name and in all, with the count (see Summary)."""
        if kind == "authentication-failed":
            count = self._audit_failures.count(subject)
            if not count:
                return
            if count > 1 or self._audit_failures.total > 1:
                detail += (f" ({count} times for {subject!r}, {self._audit_failures.total} "
                           f"authentication failures in all so far)")
        event = AuditEvent(kind=kind, subject=subject, capability=capability, detail=detail, time=time.time())
        if not (self._topic_cache.get(_AUDIT_TOPIC) or self._subscribers(_AUDIT_TOPIC)):
            if len(self._audit_backlog) == self._audit_backlog.maxlen:
                self._audit_dropped += 1
            self._audit_backlog.append(event)
            return
        self.publish_kernel_event(_AUDIT_TOPIC, event)

    def _flush_audit_backlog(self, to: Peer) -> None:
        """Hand the buffered records to the security service (and to nobody else)."""
        if not self._allowed(to, EVENT, "subscribe", _AUDIT_TOPIC):
            return
        if self._audit_dropped:
            self._audit_backlog.appendleft(AuditEvent(
                kind="audit-records-lost", subject="kernel", time=time.time(),
                detail=f"{self._audit_dropped} records dropped while no audit subscriber was connected"))
            self._audit_dropped = 0
        hdr = self._enc.encode(Header(kind=Kind.EVENT, type="AuditEvent", dest=_AUDIT_TOPIC, sender=KERNEL))
        while self._audit_backlog:
            # (more than its queue holds: what does not fit waits in its backlog, see _deliver)
            self._deliver([to.identity, SIGNATURE, hdr, self._enc.encode(self._audit_backlog.popleft())], to)

    # -- monitors ----------------------------------------------------------------------------

    def _observe(self, hdr: Header, sender: str, dest: str, parts: Any, outcome: str = "") -> None:
        """Report one message (or a refusal: ``outcome``) to the monitors that watch it."""
        kind = KIND_NAMES.get(hdr.kind, "?")
        record = ev_hdr = None
        for identity, flt in list(self._monitors.items()):
            if flt.service and flt.service not in (sender, dest):
                continue
            if flt.message_type and flt.message_type != hdr.type:
                continue
            if flt.topic and not (hdr.kind == EVENT and dest.startswith(flt.topic)):
                continue
            mon = self._peers.get(identity)
            if mon is None or sender == mon.name or dest == mon.name:
                continue  # never report a monitor's own traffic back to it
            if record is None:
                size = sum(len(p) for p in parts[1:]) if parts else 0
                body = bytes(parts[3]) if len(parts) > 3 else b""
                error = ""
                if hdr.kind == Kind.ERROR and body:
                    try:
                        error = _error_decoder.decode(body).code or "?"
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        error = "?"
                record = self._enc.encode(Traffic(
                    time=time.time(), kind=kind, message_type=hdr.type, sender=sender, dest=dest,
                    id=hdr.id, size=size, frames=max(len(parts) - 4, 0), outcome=outcome,
                    body=body if len(body) <= MONITOR_BODY_LIMIT else b"", body_size=len(body), error=error))
                ev_hdr = self._enc.encode(Header(kind=Kind.EVENT, type="Traffic", dest="kernel.monitor",
                                                 sender=KERNEL))
            self._send([identity, SIGNATURE, ev_hdr, record], mon)
