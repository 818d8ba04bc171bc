"""The durable outbox of the uplink: SQLite in WAL mode, bounded, priority-aware.

A message is accepted once its row is committed (``synchronous=FULL``: it survives kill -9
and power loss).  The outbox is bounded by bytes, by age and by the free share of its disk;
over a bound it drops the oldest messages of the lowest priority first (alerts last) and
counts what it dropped, per priority.  Messages leave in the order they came (``seq``), so
each topic's order holds; each carries a message id so the far side can de-duplicate what
a reconnection sends twice.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import msgspec

__all__ = ["Outbox", "Queued", "PRIORITY"]

#: higher is dropped later
PRIORITY = {"summary": 0, "drift": 1, "audit": 2, "alert": 3}


class Queued(msgspec.Struct):
    seq: int
    topic: str
    priority: int
    payload: bytes
    created: float


class Outbox:
    def __init__(self, path: Path, *, max_bytes: int = 64 << 20, max_age: float = 7 * 86400,
                 min_free_share: float = 0.05) -> None:
        self.path = path
        self.max_bytes, self.max_age, self.min_free_share = max_bytes, max_age, min_free_share
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
                        " priority INTEGER NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS by_priority ON outbox (priority, seq)")
        self.db.execute("CREATE TABLE IF NOT EXISTS dropped (priority INTEGER PRIMARY KEY, count INTEGER NOT NULL)")

    def put(self, topic: str, payload: bytes, priority: int) -> int:
        """Accept a message (durably) and enforce the bounds; returns its sequence number."""
        with self.db:
            seq = self.db.execute("INSERT INTO outbox (topic, priority, payload, created) VALUES (?, ?, ?, ?)",
                                  (topic, priority, payload, time.time())).lastrowid
        self._enforce()
        return int(seq)

    def _drop(self, rows: list[tuple[int, int]]) -> None:
        with self.db:
            for seq, priority in rows:
                self.db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
                self.db.execute("INSERT INTO dropped (priority, count) VALUES (?, 1) "
                                "ON CONFLICT(priority) DO UPDATE SET count = count + 1", (priority,))

    def _enforce(self) -> None:
        old = self.db.execute("SELECT seq, priority FROM outbox WHERE created < ?",
                              (time.time() - self.max_age,)).fetchall()
        if old:
            self._drop(old)
        while self.size() > self.max_bytes or self._disk_short():
            victim = self.db.execute("SELECT seq, priority FROM outbox ORDER BY priority, seq LIMIT 1").fetchone()
            if victim is None:
                return
            self._drop([victim])

    def _disk_short(self) -> bool:
        usage = shutil.disk_usage(self.path.parent)
        return usage.free / usage.total < self.min_free_share and self.count() > 0

    def size(self) -> int:
        return int(self.db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()[0])

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def head(self, limit: int = 100) -> list[Queued]:
        return [Queued(*row) for row in self.db.execute(
            "SELECT seq, topic, priority, payload, created FROM outbox ORDER BY seq LIMIT ?", (limit,))]

    def ack(self, seq: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def dropped(self) -> dict[int, int]:
        return dict(self.db.execute("SELECT priority, count FROM dropped").fetchall())

    def close(self) -> None:
        self.db.close()
