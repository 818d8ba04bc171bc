"""The durable outbox of the uplink: SQLite in WAL mode, bounded on disk, priority-aware.

A message is accepted once its row is committed (``synchronous=FULL``: it survives kill -9
and power loss).  Messages leave in the order they came (``seq``), so each topic's order
holds; each carries a message id so the far side can de-duplicate what a reconnection sends
twice.

Bounds, enforced after every operation (put, ack), each dropping by the same policy: the
lowest priority first (alerts last), the oldest first within a priority, the message just
accepted last of its priority; what is dropped is counted per priority:

* **bytes**: ``max_bytes`` bounds the outbox's files on disk, ``outbox.db`` and its WAL
  ``outbox.db-wal`` (there is no ``-shm``: the database is opened in exclusive locking
  mode, by one process only), so it covers the payloads and all of SQLite's overhead
  (row and index entries, page slack, the journal).  An eighth of it (at most 4 MiB) is the
  WAL's share: past that the WAL is checkpointed and truncated to zero; the rest bounds the
  database's pages.  Freed pages are given back to the file system (incremental
  auto-vacuum, then a checkpoint that truncates the file), so the files shrink when the
  queue does.  Only while one operation runs can the WAL hold that operation's pages
  beyond the bound.
* **age**: messages older than ``max_age`` seconds are dropped.
* **free disk**: when the disk holding the outbox has less than ``min_free_share`` of
  its space free, the outbox gives space back: it drops messages by the policy and returns
  their pages to the file system until the share is restored; when even an empty outbox
  could not restore it, the outbox does not grow (it drops by the policy down to its size
  before the message came).

Counters persist in the same database, so that they compare like with like: messages and
bytes sent (counted in the transaction that removes the acknowledged message), messages
dropped per priority, and totals of counters other processes report (``raw_sensor_bytes``:
the increase of each sensor's own counter, which restarts with the sensor).  They all count
from one moment, ``since()`` (the database's creation), across restarts of the service.

A message that does not fit (larger than the bound, or the one the policy picks) is not
kept: ``put`` raises ``OutboxFull`` saying why, and it is counted as dropped; a sequence
number ``put`` returns is a message the outbox holds.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Iterator

import msgspec

__all__ = ["Outbox", "OutboxFull", "Queued", "PRIORITY"]

#: higher is dropped later
PRIORITY = {"summary": 0, "drift": 1, "audit": 2, "alert": 3}

#: the database's page size: small pages bound the files finely
PAGE = 1024
#: a row's bytes besides its payload and topic (record header, seq, priority, created, index entry)
ROW_OVERHEAD = 64
#: pages an empty outbox takes (the schema's b-trees, the pointer map, page 1)
BASE_PAGES = 8


class OutboxFull(Exception):
    """The message was not kept (it is counted as dropped); the text says why."""


class Queued(msgspec.Struct):
    seq: int
    topic: str
    priority: int
    payload: bytes
    created: float


class Outbox:
    def __init__(self, path: Path, *, max_bytes: int = 64 << 20, max_age: float = 7 * 86400,
                 min_free_share: float = 0.05) -> None:
        self.path = Path(path)
        self.max_bytes, self.max_age, self.min_free_share = max_bytes, max_age, min_free_share
        #: the WAL's share of the bound; past it the WAL is checkpointed and truncated
        self.wal_budget = min(max_bytes // 8, 4 << 20)
        #: the database's pages at most
        self.limit_pages = (max_bytes - self.wal_budget) // PAGE
        #: free pages worth giving back to the file system before the file reaches its limit
        self.reclaim_pages = max(self.limit_pages // 16, 4)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        # before anything reads the file: no shared-memory index (-shm), one process at a time
        self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self._layout()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints are ours (_reclaim), truncating
        self.db.execute(f"PRAGMA journal_size_limit={self.wal_budget}")
        self.db.execute("CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
                        " priority INTEGER NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS by_priority ON outbox (priority, seq)")
        self.db.execute("CREATE TABLE IF NOT EXISTS dropped (priority INTEGER PRIMARY KEY, count INTEGER NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS readings (counter TEXT NOT NULL, source TEXT NOT NULL,"
                        " last REAL NOT NULL, PRIMARY KEY (counter, source))")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL)")
        if self.db.execute("SELECT 1 FROM meta WHERE key = 'since'").fetchone() is None:
            with self._transaction():  # every counter counts from here (an older outbox's drops included)
                self.db.execute("DELETE FROM dropped")
                self.db.execute("INSERT INTO meta (key, value) VALUES ('since', ?)", (time.time(),))
        # the bounds may have changed since the last run
        self._shrink(self.limit_pages)
        self._reclaim(force=True)

    def _layout(self) -> None:
        """Small pages and incremental auto-vacuum; a database made without them (an older
        outbox) is rebuilt once with them."""
        page = self._pragma("page_size")
        auto_vacuum = self._pragma("auto_vacuum")
        if page == PAGE and auto_vacuum == 2:
            return
        empty = self._pragma("page_count") == 0
        if not empty:
            self.db.execute("PRAGMA journal_mode=DELETE")  # page_size changes only outside WAL mode
        self.db.execute(f"PRAGMA page_size={PAGE}")
        self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if not empty:
            self.db.execute("VACUUM")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction (one WAL commit, one fsync) around the statements inside."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _pragma(self, name: str) -> int:
        return int(self.db.execute(f"PRAGMA {name}").fetchone()[0])

    # -- accepting and sending -------------------------------------------------------------

    def put(self, topic: str, payload: bytes, priority: int) -> int:
        """Accept a message (durably) and enforce the bounds; returns its sequence number.

        Raises OutboxFull (the message counted as dropped) when it was not kept."""
        footprint = len(payload) + len(topic.encode()) + ROW_OVERHEAD
        room = (self.limit_pages - BASE_PAGES) * (PAGE - 8)
        if footprint > room:
            self._count({priority: 1})
            raise OutboxFull(f"a {len(payload)}-byte message cannot fit an outbox bounded to {self.max_bytes} "
                             f"bytes on disk (outbox_max_bytes; at most about {room} bytes of messages)")
        used_before = self._used_pages()
        with self._transaction():
            seq = int(self.db.execute("INSERT INTO outbox (topic, priority, payload, created) VALUES (?, ?, ?, ?)",
                                      (topic, priority, payload, time.time())).lastrowid)
        reason = self._enforce(used_before)
        if self.db.execute("SELECT 1 FROM outbox WHERE seq = ?", (seq,)).fetchone() is None:
            raise OutboxFull(f"dropped on arrival: {reason}; the outbox holds only messages of a higher priority")
        return seq

    def head(self, limit: int = 100) -> list[Queued]:
        return [Queued(*row) for row in self.db.execute(
            "SELECT seq, topic, priority, payload, created FROM outbox ORDER BY seq LIMIT ?", (limit,))]

    def ack(self, seq: int, sent_bytes: int = 0) -> None:
        """The broker has it (``sent_bytes`` on the wire): remove it and count it sent, in
        one transaction; give the space back when that is worth it."""
        with self._transaction():
            if self.db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount:
                self._add("sent", 1)
                self._add("bytes_sent", sent_bytes)
        self._reclaim()

    # -- counters ---------------------------------------------------------------------------

    def _add(self, name: str, value: int) -> None:
        self.db.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, value))

    def add_reading(self, counter: str, source: str, value: float) -> None:
        """A reading of ``source``'s own cumulative counter (which restarts with that process)
        into the persisted total ``counter``: what it grew since the last reading, or all of it
        when it went down (the source restarted)."""
        row = self.db.execute("SELECT last FROM readings WHERE counter = ? AND source = ?",
                              (counter, source)).fetchone()
        last = row[0] if row is not None else 0.0
        increase = value - last if value >= last else value
        if row is not None and increase == 0:
            return
        with self._transaction():
            self.db.execute("INSERT INTO readings (counter, source, last) VALUES (?, ?, ?) "
                            "ON CONFLICT(counter, source) DO UPDATE SET last = excluded.last", (counter, source, value))
            self._add(counter, int(increase))

    def counters(self) -> dict[str, int]:
        """The persisted counters (``sent``, ``bytes_sent``, totals of readings), since ``since()``."""
        return dict(self.db.execute("SELECT name, value FROM counters").fetchall())

    def since(self) -> float:
        """When every counter (these and ``dropped()``) started counting (Unix time)."""
        return float(self.db.execute("SELECT value FROM meta WHERE key = 'since'").fetchone()[0])

    # -- the bounds --------------------------------------------------------------------------

    def _enforce(self, used_before: int) -> str:
        """Apply every bound; returns the reason messages were dropped ("" for none)."""
        reason = ""
        cutoff = time.time() - self.max_age
        oldest = self.db.execute("SELECT created FROM outbox ORDER BY seq LIMIT 1").fetchone()
        if oldest is not None and oldest[0] < cutoff:
            rows = self.db.execute("SELECT seq, priority FROM outbox WHERE created < ?", (cutoff,)).fetchall()
            self._drop(rows)
            reason = f"older than outbox_max_age ({self.max_age:g} s)"
        if self._shrink(self.limit_pages):
            reason = f"over outbox_max_bytes ({self.max_bytes} bytes on disk)"
        short = self._disk_short()
        if short <= 0:
            self._reclaim()
            return reason
        self._reclaim(force=True)  # first give back what is free already
        short = self._disk_short()
        if short > 0:
            used = self._used_pages()
            target = used - math.ceil(short / PAGE)
            if target < BASE_PAGES:  # even empty it could not restore the share: do not grow
                target = used_before
            if self._shrink(target):
                reason = f"the disk has less than outbox_min_free_share ({self.min_free_share:g}) of its space free"
            self._reclaim(force=True)
        return reason

    def _shrink(self, pages: int) -> bool:
        """Drop by the policy until the database's pages in use are at most ``pages``.

        A row frees about its bytes in pages, more where pages are part empty: each round
        learns the ratio from the last one and aims at half a large excess, so that it never
        drops much more than it must."""
        dropped = False
        scale = 1.0  # bytes of pages freed per estimated byte dropped
        while (excess := ((used := self._used_pages()) - pages) * PAGE) > 0:
            rows = self.db.execute("SELECT seq, priority, LENGTH(payload) + LENGTH(topic) FROM outbox "
                                   "ORDER BY priority, seq LIMIT 1024").fetchall()
            if not rows:
                break
            aim = excess if excess <= 8 * PAGE else excess / 2
            victims, estimate = [], 0
            for seq, priority, size in rows:
                victims.append((seq, priority))
                estimate += size + ROW_OVERHEAD
                if estimate * scale >= aim:
                    break
            self._drop(victims)
            dropped = True
            freed = (used - self._used_pages()) * PAGE
            if freed > 0:
                scale = min(max(freed / estimate, 0.25), 4.0)
        return dropped

    def _reclaim(self, *, force: bool = False) -> None:
        """Give free pages back to the file system and keep the WAL within its share;
        ``force``: both now (the disk is short)."""
        free = self._pragma("freelist_count")
        vacuumed = False
        if free and (force or free >= self.reclaim_pages or self._pragma("page_count") > self.limit_pages):
            # (executescript steps it to the end: execute() frees one page per step)
            self.db.executescript("PRAGMA incremental_vacuum;")
            vacuumed = True
        if force or vacuumed or self._file_size(self.wal_path) > self.wal_budget:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _drop(self, rows: list[tuple[int, int]]) -> None:
        counts: dict[int, int] = {}
        with self._transaction():
            for seq, priority in rows:
                self.db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
                counts[priority] = counts.get(priority, 0) + 1
            self._count(counts, transaction=False)

    def _count(self, counts: dict[int, int], *, transaction: bool = True) -> None:
        def write() -> None:
            for priority, n in counts.items():
                self.db.execute("INSERT INTO dropped (priority, count) VALUES (?, ?) "
                                "ON CONFLICT(priority) DO UPDATE SET count = count + excluded.count", (priority, n))
        if transaction:
            with self._transaction():
                write()
        else:
            write()

    def _used_pages(self) -> int:
        return self._pragma("page_count") - self._pragma("freelist_count")

    def _disk_short(self) -> int:
        """Bytes the disk lacks for its free share (<= 0: none)."""
        if self.min_free_share <= 0:
            return 0
        st = os.statvfs(self.path.parent)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        return math.ceil(self.min_free_share * total - free)

    # -- what it holds ------------------------------------------------------------------------

    @property
    def wal_path(self) -> Path:
        return self.path.with_name(self.path.name + "-wal")

    @staticmethod
    def _file_size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    def disk_bytes(self) -> int:
        """The outbox's files on disk (database, WAL, and a shared-memory index if any):
        what ``max_bytes`` bounds."""
        return sum(self._file_size(self.path.with_name(self.path.name + suffix)) for suffix in ("", "-wal", "-shm"))

    def size(self) -> int:
        """The payload bytes queued."""
        return int(self.db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()[0])

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def dropped(self) -> dict[int, int]:
        return dict(self.db.execute("SELECT priority, count FROM dropped").fetchall())

    def close(self) -> None:
        self.db.close()
