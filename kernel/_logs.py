"""The kernel's journal: the recent log records of each service, kept in memory.

Every line the kernel process logs passes through ``LogBook.sink`` (registered with
``protocols.runtime.add_log_sink``): the kernel's own lines, each about a service carrying
its name in ``service`` (the others ``service=kernel``), and the services' own lines and
output, which the supervisor re-emits with their name (_supervisor._emit).  Each record
goes to the bounded ring of its ``service`` (``[logs] lines_per_service``), numbered by one
sequence across services, and to ``publish`` (the kernel has it published on
``kernel.logs.<service>``).  ``query`` answers GetLogs.

Lines pass the process's level filter first (``EDGEBUS_LOG_LEVEL``, info by default), so
debug lines are kept only when the kernel logs them.  Rings of configured services (and
``kernel``) are kept for as long as they are configured; other names (sessions of the
operator's shared credential, ``busctl.3``) share at most ``OTHER_RINGS`` rings, the least
recently written forgotten first.  Sinks run in the thread that logs (the event loop or
the router's thread): the book takes a lock, never logs, and never blocks.
"""

from __future__ import annotations

import collections
import heapq
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec

from protocols import LogRecord, LogRecords

__all__ = ["LogBook", "OTHER_RINGS", "FIELD_LIMIT", "ANSWER_LIMIT"]

#: Rings for names that are neither configured services nor ``kernel``.
OTHER_RINGS = 32
#: A string field longer than this many characters is kept cut, saying how much was cut.
FIELD_LIMIT = 16384
#: A GetLogs answer leaves out its oldest records beyond this many (msgpack) bytes.
ANSWER_LIMIT = 8 * 1024 * 1024

#: Keys of an event dict that are record attributes, not fields.
_OWN_KEYS = frozenset({"service", "level", "event", "timestamp", "component"})

_encoder = msgspec.msgpack.Encoder()


class _Kept(msgspec.Struct, array_like=True):
    record: LogRecord
    size: int


class LogBook:
    def __init__(self, lines_per_service: int, known: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._lines = lines_per_service
        self._known = frozenset(known) | {"kernel"}
        self._rings: dict[str, collections.deque[_Kept]] = {}
        self._others: collections.OrderedDict[str, collections.deque[_Kept]] = collections.OrderedDict()
        self._seq = 0
        #: Called with each record after it is kept (any thread; must not block or log).
        self.publish: Callable[[LogRecord], None] | None = None

    @property
    def lines_per_service(self) -> int:
        return self._lines

    def configure(self, lines_per_service: int, known: Iterable[str]) -> None:
        """After a reload: the new bound (each ring keeps its newest records) and the
        configured names (a removed service's ring becomes one of the others)."""
        with self._lock:
            self._known = frozenset(known) | {"kernel"}
            if lines_per_service != self._lines:
                self._lines = lines_per_service
                for table in (self._rings, self._others):
                    for name, ring in table.items():
                        table[name] = collections.deque(ring, maxlen=lines_per_service)
            for name in [n for n in self._rings if n not in self._known]:
                self._others[name] = self._rings.pop(name)
            for name in [n for n in self._others if n in self._known]:
                self._rings[name] = self._others.pop(name)
            while len(self._others) > OTHER_RINGS:
                self._others.popitem(last=False)

    # -- writing (any thread) -----------------------------------------------------------------

    def sink(self, event: Mapping[str, Any]) -> None:
        """Keep one logged line (protocols.runtime.add_log_sink)."""
        service = str(event.get("service") or "kernel")
        fields = {k: _plain(v) for k, v in event.items() if k not in _OWN_KEYS and v is not None}
        with self._lock:
            self._seq += 1
            record = LogRecord(seq=self._seq, time=time.time(), service=service,
                               level=str(event.get("level", "info")), event=_cut(str(event.get("event", ""))),
                               component=str(event.get("component") or ""), fields=fields)
            self._ring(service).append(_Kept(record, len(_encoder.encode(record))))
        publish = self.publish
        if publish is not None:
            publish(record)

    def _ring(self, service: str) -> collections.deque[_Kept]:
        ring = self._rings.get(service)
        if ring is not None:
            return ring
        if service in self._known:
            ring = self._rings[service] = collections.deque(maxlen=self._lines)
            return ring
        ring = self._others.get(service)
        if ring is None:
            ring = self._others[service] = collections.deque(maxlen=self._lines)
            if len(self._others) > OTHER_RINGS:
                self._others.popitem(last=False)
        else:
            self._others.move_to_end(service)
        return ring

    # -- reading ------------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._known | set(self._rings) | set(self._others))

    def query(self, services: Iterable[str] = (), lines: int = 0, since: float = 0.0, after: int = 0) -> LogRecords:
        """The records of ``services`` (all when empty), oldest first: at or after ``since``
        (Unix time), after sequence number ``after``, the newest ``lines`` of them (0: all),
        within ANSWER_LIMIT bytes.  Raises KeyError naming a service the book knows nothing
        of (neither configured nor ever logged about)."""
        wanted = list(dict.fromkeys(services))
        with self._lock:
            if wanted:
                rings = []
                for name in wanted:
                    ring = self._rings.get(name)
                    if ring is None:
                        ring = self._others.get(name)
                    if ring is None:
                        if name not in self._known:
                            raise KeyError(name)
                        continue
                    rings.append(list(ring))
            else:
                rings = [list(r) for r in (*self._rings.values(), *self._others.values())]
            last = self._seq
        merged = heapq.merge(*rings, key=lambda kept: kept.record.seq)
        chosen = [k for k in merged if k.record.seq > after and k.record.time >= since]
        if lines > 0:
            chosen = chosen[-lines:]
        size, first = 0, len(chosen)
        while first > 0 and size + chosen[first - 1].size <= ANSWER_LIMIT:
            first -= 1
            size += chosen[first].size
        return LogRecords(records=[k.record for k in chosen[first:]], last=last,
                          lines_per_service=self._lines, omitted=first)


def _cut(text: str) -> str:
    if len(text) <= FIELD_LIMIT:
        return text
    return f"{text[:FIELD_LIMIT]}... [{len(text) - FIELD_LIMIT} more characters]"


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as msgpack can carry it: strings cut, containers kept (3 levels deep),
    anything else as its ``str``."""
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        return value if -2**63 <= value < 2**64 else str(value)
    if isinstance(value, str):
        return _cut(value)
    if depth < 3 and isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v, depth + 1) for v in value]
    if depth < 3 and isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    return _cut(str(value))
