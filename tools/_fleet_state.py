"""The controller's state in one SQLite file (WAL; each change one transaction): devices as
the broker last showed them, groups, artifacts pushed, the desired documents published (the
latest per topic, so a broker that lost its retained messages is given them again),
deployments with their waves and per-device progress, and the document version counter.

Several ``edgebus fleet`` commands may use one state at a time (a ``run`` loop and an
operator's ``halt``): SQLite's locking orders them, and the counter is taken inside the
transaction that records the document it numbers.
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import msgspec

from protocols import fleet

from ._fleet_rollout import Policy

__all__ = ["State", "StateError", "Deployment", "Progress", "DeviceRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, pubkey TEXT NOT NULL DEFAULT '', enrolled_at REAL, last_seen REAL,
    enrol BLOB, reported BLOB, reported_at REAL, presence BLOB, presence_at REAL);
CREATE TABLE IF NOT EXISTS groups (name TEXT PRIMARY KEY, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    grp TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE, device TEXT NOT NULL,
    PRIMARY KEY (grp, device));
CREATE TABLE IF NOT EXISTS artifacts (
    sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, chunk_size INTEGER NOT NULL, name TEXT NOT NULL,
    info BLOB NOT NULL, data BLOB NOT NULL, pushed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    topic TEXT PRIMARY KEY, version INTEGER NOT NULL, deployment INTEGER, payload BLOB NOT NULL,
    published_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (
    id INTEGER PRIMARY KEY, grp TEXT NOT NULL, artifact TEXT, config TEXT NOT NULL DEFAULT '',
    policy BLOB NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL, updated_at REAL NOT NULL, wave INTEGER NOT NULL DEFAULT -1,
    wave_started_at REAL NOT NULL DEFAULT 0, waves BLOB NOT NULL,
    previous_artifact TEXT, previous_config TEXT NOT NULL DEFAULT '', group_version INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS progress (
    deployment INTEGER NOT NULL REFERENCES deployments(id), device TEXT NOT NULL, wave INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'planned', reason TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL, baseline TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (deployment, device));
"""

_SCHEMA_VERSION = "2"
#: schema -> the statements that bring a state file of it to the next schema
_MIGRATIONS: dict[str, tuple[str, ...]] = {
    # 2: the devices' presence (their MQTT will): the last Presence read, and when it changed
    "1": ("ALTER TABLE devices ADD COLUMN presence BLOB", "ALTER TABLE devices ADD COLUMN presence_at REAL"),
}

_msgpack = msgspec.msgpack.Encoder()
_json = msgspec.json.Encoder()
_policy = msgspec.msgpack.Decoder(Policy)
_waves = msgspec.msgpack.Decoder(list[list[str]])
_baseline = msgspec.json.Decoder(dict[str, str])


class StateError(Exception):
    """The state file cannot be used (not a fleet state, locked too long)."""


class Deployment(msgspec.Struct):
    id: int
    group: str
    artifact: str | None
    config: str
    policy: Policy
    state: str  # running, halted, stalled, rolled_back, complete
    reason: str
    created_at: float
    updated_at: float
    wave: int
    wave_started_at: float
    waves: list[list[str]]
    previous_artifact: str | None
    previous_config: str
    group_version: int


class Progress(msgspec.Struct):
    device: str
    wave: int
    version: int
    state: str
    reason: str
    updated_at: float
    #: model -> the version the device had active when this deployment first reached it
    baseline: dict[str, str] = {}


class DeviceRow(msgspec.Struct):
    id: str
    pubkey: str
    enrolled_at: float | None
    last_seen: float | None
    enrol: bytes | None
    reported: bytes | None
    reported_at: float | None
    #: the last Presence read (encoded), and when the controller first read it
    presence: bytes | None = None
    presence_at: float | None = None
    groups: list[str] = []

    def decoded(self, field: str, kind: type) -> Any:
        """The message stored in ``field`` (enrol, reported, presence) as a ``kind``, or None
        (none stored, or it does not decode: a row written by another version)."""
        payload = getattr(self, field)
        if not payload:
            return None
        try:
            return fleet.decode(payload, kind)
        except fleet.FleetError:
            return None


_DEPLOYMENT_COLUMNS = ("id, grp, artifact, config, policy, state, reason, created_at, updated_at, wave, "
                       "wave_started_at, waves, previous_artifact, previous_config, group_version")


class State:
    """One state file.  Methods are transactions of their own unless called inside
    ``with state.transaction():``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._depth = 0
        new = not self.path.exists()
        if new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))  # not readable by others
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            with self.transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                schema = row[0] if row is not None else None
                while schema in _MIGRATIONS:  # an older edgebus's state: brought up to date
                    for statement in _MIGRATIONS[schema]:
                        self.db.execute(statement)
                    schema = str(int(schema) + 1)
                    self.db.execute("UPDATE meta SET value=? WHERE key='schema'", (schema,))
                if row is None:
                    self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
                elif schema != _SCHEMA_VERSION:
                    raise StateError(f"{self.path}: fleet state of schema {schema}, this edgebus reads "
                                     f"{_SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{self.path} is not a fleet state file ({exc}); name another with --state") from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (nested calls join the outer one)."""
        if self._depth:
            self._depth += 1
            try:
                yield self.db
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            self._depth = 0
            raise StateError(f"{self.path}: {exc} (another edgebus fleet holds it; try again)") from None
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._depth = 0

    # -- the version counter ------------------------------------------------------------------

    def next_version(self) -> int:
        """A document version above every one this state issued, and above the clock in
        milliseconds: a state file made again (lost, restored from an old backup) still
        issues versions the devices accept, as long as the clock is right."""
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key='version'").fetchone()
            last = int(row[0]) if row else 0
            version = max(last + 1, int(time.time() * 1000))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (str(version),))
            return version

    def meta(self, key: str, default: str = "") -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- devices ------------------------------------------------------------------------------

    def saw_enrol(self, device: str, pubkey: str, payload: bytes, now: float) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO devices (id, pubkey, enrolled_at, last_seen, enrol) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT(id) DO UPDATE SET pubkey=excluded.pubkey, enrol=excluded.enrol, "
                       "enrolled_at=coalesce(enrolled_at, excluded.enrolled_at), "
                       "last_seen=CASE WHEN enrol IS excluded.enrol THEN last_seen ELSE excluded.last_seen END",
                       (device, pubkey, now, now, payload))

    def saw_report(self, device: str, payload: bytes, now: float) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO devices (id, last_seen, reported, reported_at) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(id) DO UPDATE SET reported=excluded.reported, reported_at=excluded.reported_at, "
                       "last_seen=excluded.last_seen", (device, now, payload, now))

    def saw_presence(self, device: str, payload: bytes, now: float) -> None:
        """Record a device's Presence; ``presence_at`` changes only with the payload (the same
        retained message read again keeps the time it was first read)."""
        with self.transaction() as db:
            db.execute("INSERT INTO devices (id, presence, presence_at) VALUES (?, ?, ?) "
                       "ON CONFLICT(id) DO UPDATE SET presence=excluded.presence, "
                       "presence_at=CASE WHEN presence IS excluded.presence THEN presence_at "
                       "ELSE excluded.presence_at END", (device, payload, now))

    def devices(self) -> list[DeviceRow]:
        groups: dict[str, list[str]] = {}
        for grp, device in self.db.execute("SELECT grp, device FROM members ORDER BY grp"):
            groups.setdefault(device, []).append(grp)
        return [DeviceRow(*row, groups=groups.get(row[0], [])) for row in self.db.execute(
            "SELECT id, pubkey, enrolled_at, last_seen, enrol, reported, reported_at, presence, presence_at "
            "FROM devices ORDER BY id")]

    def device(self, device: str) -> DeviceRow | None:
        for row in self.devices():
            if row.id == device:
                return row
        return None

    # -- groups -------------------------------------------------------------------------------

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {name: [] for (name,) in self.db.execute("SELECT name FROM groups ORDER BY name")}
        for grp, device in self.db.execute("SELECT grp, device FROM members ORDER BY grp, device"):
            out[grp].append(device)
        return out

    def create_group(self, name: str, now: float) -> bool:
        with self.transaction() as db:
            return db.execute("INSERT OR IGNORE INTO groups VALUES (?, ?)", (name, now)).rowcount == 1

    def delete_group(self, name: str) -> bool:
        with self.transaction() as db:
            db.execute("DELETE FROM members WHERE grp=?", (name,))
            return db.execute("DELETE FROM groups WHERE name=?", (name,)).rowcount == 1

    def add_members(self, group: str, devices: list[str]) -> int:
        with self.transaction() as db:
            return sum(db.execute("INSERT OR IGNORE INTO members VALUES (?, ?)", (group, d)).rowcount
                       for d in devices)

    def remove_members(self, group: str, devices: list[str]) -> int:
        with self.transaction() as db:
            return sum(db.execute("DELETE FROM members WHERE grp=? AND device=?", (group, d)).rowcount
                       for d in devices)

    def groups_of(self, device: str) -> list[str]:
        return [g for (g,) in self.db.execute("SELECT grp FROM members WHERE device=? ORDER BY grp", (device,))]

    # -- artifacts ----------------------------------------------------------------------------

    def add_artifact(self, sha256: str, name: str, chunk_size: int, info: bytes, data: bytes, now: float) -> bool:
        with self.transaction() as db:
            return db.execute("INSERT OR IGNORE INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (sha256, len(data), chunk_size, name, info, data, now)).rowcount == 1

    def artifact_named(self, name: str) -> str | None:
        """The sha256 of the artifact pushed last as ``name`` ("model@version")."""
        row = self.db.execute("SELECT sha256 FROM artifacts WHERE name=? ORDER BY pushed_at DESC LIMIT 1",
                              (name,)).fetchone()
        return row[0] if row else None

    def artifact_meta(self, sha256: str) -> tuple[str, int] | None:
        """(name, size) without reading the bytes."""
        row = self.db.execute("SELECT name, size FROM artifacts WHERE sha256=?", (sha256,)).fetchone()
        return None if row is None else (row[0], row[1])

    def artifact(self, sha256: str) -> tuple[str, int, bytes, bytes] | None:
        """(name, chunk_size, info, data) or None."""
        row = self.db.execute("SELECT name, chunk_size, info, data FROM artifacts WHERE sha256=?", (sha256,)).fetchone()
        return None if row is None else (row[0], row[1], row[2], row[3])

    def artifacts(self) -> list[tuple[str, str, int, float]]:
        """(sha256, name, size, pushed_at)."""
        return list(self.db.execute("SELECT sha256, name, size, pushed_at FROM artifacts ORDER BY pushed_at"))

    # -- documents ----------------------------------------------------------------------------

    def record_document(self, topic: str, version: int, deployment: int | None, payload: bytes, now: float) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?, ?)",
                       (topic, version, deployment, payload, now))

    def forget_document(self, topic: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM documents WHERE topic=?", (topic,))

    def documents(self) -> dict[str, tuple[int, int | None, bytes]]:
        """topic -> (version, deployment, payload)."""
        return {t: (v, d, p) for t, v, d, p in self.db.execute(
            "SELECT topic, version, deployment, payload FROM documents")}

    # -- deployments --------------------------------------------------------------------------

    def create_deployment(self, group: str, artifact: str | None, config: str, policy: Policy,
                          previous_artifact: str | None, previous_config: str, now: float) -> int:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO deployments (grp, artifact, config, policy, state, created_at, updated_at, waves, "
                "previous_artifact, previous_config) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                (group, artifact, config, _msgpack.encode(policy), now, now, _msgpack.encode([]),
                 previous_artifact, previous_config))
            return int(cur.lastrowid or 0)

    def set_plan(self, deployment: int, waves: list[list[str]], now: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE deployments SET waves=?, updated_at=? WHERE id=?",
                       (_msgpack.encode(waves), now, deployment))
            for i, wave in enumerate(waves):
                for device in wave:
                    db.execute("INSERT OR REPLACE INTO progress VALUES (?, ?, ?, 0, 'planned', '', ?, '{}')",
                               (deployment, device, i, now))

    def deployment(self, deployment: int) -> Deployment | None:
        row = self.db.execute(f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments WHERE id=?", (deployment,)).fetchone()
        return None if row is None else _deployment(row)

    def deployments(self, states: tuple[str, ...] = ()) -> list[Deployment]:
        rows = self.db.execute(f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments ORDER BY id").fetchall()
        out = [_deployment(r) for r in rows]
        return [d for d in out if not states or d.state in states]

    def update_deployment(self, deployment: int, now: float, **fields: Any) -> None:
        allowed = {"state", "reason", "wave", "wave_started_at", "group_version"}
        assert set(fields) <= allowed, set(fields) - allowed
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE deployments SET {sets}, updated_at=? WHERE id=?", (*fields.values(), now, deployment))

    def progress(self, deployment: int) -> list[Progress]:
        return [Progress(*row[:-1], baseline=_baseline.decode(row[-1])) for row in self.db.execute(
            "SELECT device, wave, version, state, reason, updated_at, baseline FROM progress WHERE deployment=? "
            "ORDER BY wave, device", (deployment,))]

    def touched(self, deployment: int) -> dict[str, int]:
        """Devices sent a document by the deployment -> that document's version."""
        return dict(self.db.execute("SELECT device, version FROM progress WHERE deployment=? AND version > 0",
                                    (deployment,)))

    def set_baseline(self, deployment: int, device: str, baseline: dict[str, str]) -> None:
        with self.transaction() as db:
            db.execute("UPDATE progress SET baseline=? WHERE deployment=? AND device=?",
                       (_json.encode(baseline).decode(), deployment, device))

    def set_progress(self, deployment: int, device: str, now: float, *, state: str, reason: str = "",
                     version: int | None = None, wave: int | None = None) -> None:
        with self.transaction() as db:
            cur = db.execute("UPDATE progress SET state=?, reason=?, updated_at=?, version=coalesce(?, version), "
                             "wave=coalesce(?, wave) WHERE deployment=? AND device=? AND (state!=? OR reason!=? "
                             "OR (? IS NOT NULL AND version!=?))",
                             (state, reason, now, version, wave, deployment, device, state, reason, version, version))
            if cur.rowcount == 0 and not db.execute("SELECT 1 FROM progress WHERE deployment=? AND device=?",
                                                    (deployment, device)).fetchone():
                db.execute("INSERT INTO progress VALUES (?, ?, ?, ?, ?, ?, ?, '{}')",
                           (deployment, device, -1 if wave is None else wave, version or 0, state, reason, now))


def _deployment(row: tuple[Any, ...]) -> Deployment:
    (id_, grp, artifact, config, policy, state, reason, created, updated, wave, wave_at, waves, prev_a, prev_c,
     group_version) = row
    return Deployment(id_, grp, artifact, config, _policy.decode(policy), state, reason,
                      created, updated, wave, wave_at, _waves.decode(waves),
                      prev_a, prev_c, group_version)
