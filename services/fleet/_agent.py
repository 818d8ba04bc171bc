"""The device agent's core: a state machine from events to actions, with no I/O of its own.

The shell (``_service.py``; or a simulation running many agents in one process) feeds it
events (``Connected``, ``Disconnected``, ``Received`` an MQTT message, ``Models`` the model
store's state, ``Done`` the outcome of an action it asked for, ``Health``, ``Serving`` the
models' serving health, ``TrustChanged`` the fleet keys, ``Tick``) and
carries out the actions it returns (``Subscribe``, ``Unsubscribe``, ``Publish``, ``Install``,
``Activate``, ``ApplyConfig``, ``Audit``), then feeds back each action's outcome as ``Done``.
Its durable state (``AgentState``) and the artifacts it downloads are kept through a small
storage interface (``Storage``: ``DiskStorage`` on a device, ``MemoryStorage`` in a simulation).

**Reconciliation.**  The agent does not replay a script: after every event it compares the
deployment it has accepted (``AgentState.doc``) with what it observes (the model store's
versions, the blobs it holds, the config digest) and takes the next step, one at a time:

1. download each bundle neither the model store (``name``/``version`` stored) nor the blob
   cache holds: its ``ArtifactInfo``, then its chunks, each verified against the info's hash
   as it arrives and written to a partial file with a journal of verified chunks; when every
   chunk is in, the whole file's sha256 is checked and only then does it become a blob;
2. install each bundle the store does not hold (``Install``; the store checks its signature);
3. activate each bundle not active (``Activate``; the store runs its trial when it replaces
   a version; ``Rollback`` instead when the bundle is the model's previous version, so that
   returning to it is no trial) — all bundles are installed before any is activated;
4. apply the config fragment when its digest differs from the last applied (``ApplyConfig``);
5. wait for the trials: ``succeeded`` once no bundle is in trial, ``rolled-back`` if the
   store rolled one back.

Because every step is derived from the state observed, a restart at any point (kill -9
included) resumes: a partial download continues at its first missing chunk, an install or
activation that happened is seen in the store's state and not repeated, one that did not is
done.  The model store switches versions atomically, so the device is on the old version
or the new one, never between.

**Documents.**  A document from the device's or a group's desired topic is checked by
``protocols.fleet.check_document`` against the fleet keys, the device's id and groups, and the
highest version accepted so far; one that passes replaces the deployment in progress
(``applied_version`` rises to its version at once, so an older document is refused from then
on, even across a restart).  A refused one is audited and reported (``ReportedState.refused``)
and changes nothing else.  The same document delivered again (a retained message on each
connection) is ignored.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Protocol

import msgspec

from protocols import fleet
from protocols.fleet import (
    ArtifactInfo,
    ArtifactRef,
    Chunk,
    ConfigFragment,
    Deployment,
    DeploymentStatus,
    Enrolment,
    HealthSummary,
    ModelReport,
    ReportedState,
    Topics,
)
from protocols.security import SignedReport

__all__ = [
    "AgentState", "Storage", "MemoryStorage", "DiskStorage", "Agent", "StorageFull",
    "Event", "Connected", "Disconnected", "Received", "Models", "Done", "Health", "Serving", "Tick", "TrustChanged",
    "Action", "Subscribe", "Unsubscribe", "Publish", "Fetch", "Fetched", "Install", "Activate", "Rollback", "ApplyConfig", "Audit",
]


# -- durable state -----------------------------------------------------------------------------


class AgentState(msgspec.Struct, omit_defaults=True):
    """What the agent keeps across restarts (``Storage.save_state``, atomically)."""

    #: the highest document version accepted
    applied_version: int = 0
    #: the deployment accepted last (being applied, or applied), and its document's sha256
    doc: Deployment | None = None
    doc_digest: str = ""
    #: "name@version" of the bundles of ``doc`` this agent activated (or found active)
    activated: list[str] = []
    #: the last config fragment applied
    config_digest: str = ""
    status: DeploymentStatus | None = None
    refused: DeploymentStatus | None = None
    #: sequence of the last ReportedState published
    report_seq: int = 0


_state_decoder = msgspec.json.Decoder(AgentState)
_json = msgspec.json.Encoder()


class StorageFull(Exception):
    """An artifact does not fit the storage's bound."""


class Storage(Protocol):
    """Where an agent keeps its state and its artifacts.  Blobs are complete, verified
    artifacts by sha256; a partial artifact is its chunks so far and the set of indices
    verified (its journal)."""

    def load_state(self) -> bytes | None: ...

    def save_state(self, data: bytes) -> None: ...

    def has_blob(self, sha256: str) -> bool: ...

    def read_blob(self, sha256: str) -> bytes: ...

    def drop_blob(self, sha256: str) -> None: ...

    def begin(self, info: ArtifactInfo) -> set[int]:
        """Open (or reopen) the partial artifact of ``info``; the indices held and verified."""
        ...

    def put_chunk(self, info: ArtifactInfo, index: int, data: bytes) -> None:
        """Keep a verified chunk (durably before it is journaled)."""
        ...

    def finish(self, info: ArtifactInfo) -> bool:
        """Check the whole partial artifact's sha256; if it matches, make it a blob (True);
        else drop it (False)."""
        ...

    def discard(self, sha256: str) -> None: ...


class MemoryStorage:
    """Everything in memory: for simulations of many agents in one process.  With
    ``keep_data=False`` the chunks' bytes are not kept (each was verified against its hash as it
    arrived; the whole artifact's hash is then taken on trust, and ``read_blob`` returns empty
    bytes): a thousand agents fetching a 1 MB bundle then hold no 1 GB between them."""

    def __init__(self, max_bytes: int = 1 << 30, keep_data: bool = True) -> None:
        self.state: bytes | None = None
        self.blobs: dict[str, bytes] = {}
        self.partial: dict[str, dict[int, bytes]] = {}
        self.max_bytes = max_bytes
        self.keep_data = keep_data

    def load_state(self) -> bytes | None:
        return self.state

    def save_state(self, data: bytes) -> None:
        self.state = data

    def has_blob(self, sha256: str) -> bool:
        return sha256 in self.blobs

    def read_blob(self, sha256: str) -> bytes:
        return self.blobs[sha256]

    def drop_blob(self, sha256: str) -> None:
        self.blobs.pop(sha256, None)

    def begin(self, info: ArtifactInfo) -> set[int]:
        if info.size > self.max_bytes:
            raise StorageFull(f"artifact of {info.size} bytes, over the limit of {self.max_bytes}")
        return set(self.partial.setdefault(info.sha256, {}))

    def put_chunk(self, info: ArtifactInfo, index: int, data: bytes) -> None:
        self.partial.setdefault(info.sha256, {})[index] = data if self.keep_data else b""

    def finish(self, info: ArtifactInfo) -> bool:
        chunks = self.partial.pop(info.sha256, {})
        data = b"".join(chunks[i] for i in sorted(chunks))
        if self.keep_data and hashlib.sha256(data).hexdigest() != info.sha256:
            return False
        self.blobs[info.sha256] = data
        return True

    def discard(self, sha256: str) -> None:
        self.partial.pop(sha256, None)


class DiskStorage:
    """A directory: ``state.json`` (atomic), ``blobs/<sha256>``, ``partial/<sha256>.part`` (the
    chunks at their offsets) and ``partial/<sha256>.journal`` (one line per chunk verified and
    written, after the chunk is fsynced).  ``max_bytes`` bounds an artifact and the blobs and
    partials held together."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        from services import atomic_write

        self._atomic_write = atomic_write
        self.dir = directory
        self.blobs = directory / "blobs"
        self.partials = directory / "partial"
        for d in (directory, self.blobs, self.partials):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes = max_bytes
        for journal in self.partials.glob("*.journal"):  # its artifact finished as a kill struck
            if not journal.with_suffix(".part").exists():
                journal.unlink(missing_ok=True)

    def load_state(self) -> bytes | None:
        path = self.dir / "state.json"
        return path.read_bytes() if path.exists() else None

    def save_state(self, data: bytes) -> None:
        self._atomic_write(self.dir / "state.json", data)

    def has_blob(self, sha256: str) -> bool:
        return (self.blobs / sha256).exists()

    def read_blob(self, sha256: str) -> bytes:
        return (self.blobs / sha256).read_bytes()

    def drop_blob(self, sha256: str) -> None:
        (self.blobs / sha256).unlink(missing_ok=True)

    def _used(self, but: str) -> int:
        total = 0
        for d in (self.blobs, self.partials):
            for f in d.iterdir():
                if not f.name.startswith(but) and f.suffix != ".journal":
                    total += f.stat().st_size
        return total

    def begin(self, info: ArtifactInfo) -> set[int]:
        if info.size > self.max_bytes:
            raise StorageFull(f"the artifact is {info.size} bytes, over the limit of {self.max_bytes} "
                              "(the fleet service's max_artifact_bytes)")
        if self._used(info.sha256) + info.size > self.max_bytes:
            raise StorageFull(f"the artifact ({info.size} bytes) does not fit beside the {self._used(info.sha256)} "
                              f"bytes held, within {self.max_bytes} (max_artifact_bytes)")
        part, journal = self._paths(info.sha256)
        if not part.exists():
            journal.unlink(missing_ok=True)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
            return set()
        held: set[int] = set()
        if journal.exists():
            with open(part, "rb") as f:
                for line in journal.read_text().split():
                    if not line.isdigit() or int(line) >= len(info.chunks):
                        continue
                    i = int(line)
                    f.seek(i * info.chunk_size)
                    data = f.read(info.chunk_length(i))  # a chunk re-verified: the journal is a hint
                    if hashlib.sha256(data).hexdigest() == info.chunks[i]:
                        held.add(i)
        return held

    def put_chunk(self, info: ArtifactInfo, index: int, data: bytes) -> None:
        part, journal = self._paths(info.sha256)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, data, index * info.chunk_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, b"%d\n" % index)
            os.fsync(fd)
        finally:
            os.close(fd)

    def finish(self, info: ArtifactInfo) -> bool:
        part, journal = self._paths(info.sha256)
        h = hashlib.sha256()
        with open(part, "rb") as f:
            os.truncate(part, info.size)
            while block := f.read(1 << 20):
                h.update(block)
        if h.hexdigest() != info.sha256:
            self.discard(info.sha256)
            return False
        os.replace(part, self.blobs / info.sha256)
        journal.unlink(missing_ok=True)
        return True

    def discard(self, sha256: str) -> None:
        for p in self._paths(sha256):
            p.unlink(missing_ok=True)

    def _paths(self, sha256: str) -> tuple[Path, Path]:
        return self.partials / f"{sha256}.part", self.partials / f"{sha256}.journal"


# -- events and actions ------------------------------------------------------------------------


class Connected(msgspec.Struct):
    """The MQTT session is up (a fresh one: subscriptions are to be made again)."""


class Disconnected(msgspec.Struct):
    pass


class Received(msgspec.Struct):
    topic: str
    payload: bytes


class Models(msgspec.Struct):
    """The model store's models (after a start, an install, an activation, an event)."""

    models: list[ModelReport]


class Done(msgspec.Struct, omit_defaults=True):
    """The outcome of the action ``action`` (``Install``/``Activate``/``ApplyConfig``)."""

    action: object
    ok: bool
    reason: str = ""


class Health(msgspec.Struct):
    health: HealthSummary


class Serving(msgspec.Struct):
    """How the models served since the previous Serving: ``requests``, ``errors``, ``p95_ms``
    and ``drift`` of each ModelReport (the other fields are ignored)."""

    models: list[ModelReport]


class Fetched(msgspec.Struct, omit_defaults=True):
    """The outcome of a Fetch: the bytes, or why there are none."""

    sha256: str
    index: int
    data: bytes = b""
    error: str = ""


class TrustChanged(msgspec.Struct):
    """The fleet keys the device trusts: key id -> raw ed25519 public key."""

    keys: dict[str, bytes]


class Tick(msgspec.Struct):
    pass


Event = Connected | Disconnected | Received | Models | Done | Health | Serving | Fetched | TrustChanged | Tick


class Subscribe(msgspec.Struct):
    topics: list[str]


class Unsubscribe(msgspec.Struct):
    topics: list[str]


class Publish(msgspec.Struct, omit_defaults=True):
    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 1


class Fetch(msgspec.Struct):
    """Fetch ``length`` bytes at ``start`` of ``url`` (an HTTP(S) range request): chunk
    ``index`` of the artifact ``sha256``; answered by a Fetched event."""

    url: str
    sha256: str
    index: int
    start: int
    length: int


class Install(msgspec.Struct):
    """Install the blob ``ref.sha256`` (held by the storage) into the model store."""

    ref: ArtifactRef


class Activate(msgspec.Struct):
    name: str
    version: str


class Rollback(msgspec.Struct):
    """Return ``name`` to its previous version (the model store's Rollback: no trial), for a
    document that names the version before the active one."""

    name: str
    version: str


class ApplyConfig(msgspec.Struct):
    fragment: ConfigFragment


class Audit(msgspec.Struct, omit_defaults=True):
    kind: str
    subject: str
    detail: str = ""


Action = Subscribe | Unsubscribe | Publish | Fetch | Install | Activate | Rollback | ApplyConfig | Audit


class _Download:
    """The artifact being fetched: its info once known, the chunks held, the chunk topics
    subscribed to (a window of ``window`` at most)."""

    def __init__(self, ref: ArtifactRef) -> None:
        self.ref = ref
        self.info: ArtifactInfo | None = None
        self.held: set[int] = set()
        self.asked: set[int] = set()
        #: the chunk topics subscribed to
        self.subscribed: set[int] = set()
        self.info_asked = False
        #: fetched from ref.url (range requests) until that fails
        self.http = bool(ref.url)


# -- the agent ---------------------------------------------------------------------------------


class Agent:
    """One device's agent.  ``handle(event)`` returns the actions to carry out, in order."""

    def __init__(self, device: str, groups: list[str], storage: Storage, *, prefix: str = fleet.DEFAULT_PREFIX,
                 trusted: dict[str, bytes] | None = None, public_key: str = "", fleet_id: str = "",
                 max_artifact_bytes: int = 1 << 30, window: int = 8, clock=time.time) -> None:
        self.device = device
        self.groups = sorted(set(groups))
        self.storage = storage
        self.topics = Topics(prefix)
        self.trusted = dict(trusted or {})
        self.public_key = public_key
        self.fleet_id = fleet_id
        self.max_artifact_bytes = max_artifact_bytes
        self.window = window
        self.clock = clock
        raw = storage.load_state()
        self.state = _state_decoder.decode(raw) if raw else AgentState()
        self.connected = False
        #: the model store's models by name, once known (None: not yet)
        self.models: dict[str, ModelReport] | None = None
        self.health: HealthSummary | None = None
        self.serving: dict[str, ModelReport] = {}
        self.attestation: SignedReport | None = None
        self.download: _Download | None = None
        #: the action in flight (one at a time), awaiting its Done
        self.pending: Install | Activate | Rollback | ApplyConfig | None = None
        self._seen: set[str] = set()  # digests of documents already judged (not to re-audit)
        self._reported: bytes = b""
        self._dirty = False

    # -- entry point -------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        out: list[Action] = []
        match event:
            case Connected():
                self.connected = True
                self._reported = b""
                out.append(Subscribe([self.topics.device_desired(self.device),
                                      *(self.topics.group_desired(g) for g in self.groups)]))
                out.append(Publish(self.topics.enrol(self.device), fleet.encode(self.enrolment()), retain=True))
                if self.download is not None:  # a fresh session: ask again for what is missing
                    if not self.download.http:
                        self.download.asked.clear()
                    self.download.subscribed.clear()
                    self.download.info_asked = False
            case Disconnected():
                self.connected = False
            case Received(topic=topic, payload=payload):
                self._received(topic, payload, out)
            case Models(models=models):
                self.models = {m.name: m for m in models}
            case Done(action=action, ok=ok, reason=reason):
                self._done(action, ok, reason, out)
            case Health(health=health):
                self.health = health
            case Serving(models=models):
                self.serving = {m.name: m for m in models}
            case TrustChanged(keys=keys):
                if keys != self.trusted:
                    self._seen.clear()  # a document refused for its key may pass now: judged again
                self.trusted = dict(keys)
            case Fetched(sha256=sha, index=index, data=data, error=error):
                self._fetched(sha, index, data, error, out)
            case Tick():
                pass
        self._advance(out)
        if self._dirty:
            self._save()
        self._report(out)
        return out

    # -- documents and artifacts -------------------------------------------------------------

    def _received(self, topic: str, payload: bytes, out: list[Action]) -> None:
        match self.topics.parse(topic):
            case ("device-desired", _) | ("group-desired", _):
                if payload:
                    self._document(topic, payload, out)
            case ("info", sha):
                d = self.download
                if d is None or d.ref.sha256 != sha or d.info is not None or not payload:
                    return
                self._info(d, payload, out)
            case ("chunk", sha, index):
                d = self.download
                if d is None or d.info is None or d.ref.sha256 != sha or not payload:
                    return
                self._chunk(d, int(index), payload, out)

    def _document(self, topic: str, payload: bytes, out: list[Action]) -> None:
        digest = hashlib.sha256(payload).hexdigest()
        if digest == self.state.doc_digest or digest in self._seen:
            return  # delivered again (retained, on each connection): judged already
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen.add(digest)
        try:
            doc = fleet.check_document(payload, trusted=self.trusted, device=self.device, groups=self.groups,
                                       applied_version=self.state.applied_version, now=self.clock(),
                                       fleet=self.fleet_id)
        except fleet.Refused as e:
            version, deployment = _peek(payload)
            self.state.refused = DeploymentStatus(deployment=deployment, version=version, outcome="refused",
                                                  reason=e.reason, detail=str(e), time=self.clock())
            self._dirty = True
            out.append(Audit("fleet-refused", topic, f"{e.reason}: {e}"))
            return
        previous = self.state.doc
        self.state.applied_version = doc.version
        self.state.doc = doc
        self.state.doc_digest = digest
        self.state.activated = []
        self._set_status("downloading")
        out.append(Audit("fleet-accepted", f"{doc.deployment} v{doc.version}",
                         f"from {topic}; bundles: {', '.join(f'{b.name} {b.version}' for b in doc.bundles) or 'none'}"
                         + ("; config " + doc.config.sha256[:12] if doc.config else "")
                         + (f"; replaces {previous.deployment} v{previous.version}" if previous else "")))
        if self.download is not None and self.download.ref.sha256 not in {b.sha256 for b in doc.bundles}:
            self._stop_download(out, drop=False)

    def _info(self, d: _Download, payload: bytes, out: list[Action]) -> None:
        try:
            info = fleet.decode(payload, ArtifactInfo)
            info.check()
            if info.sha256 != d.ref.sha256 or info.size != d.ref.size:
                raise fleet.FleetError(f"its info says {info.sha256[:12]}/{info.size} bytes, the document "
                                       f"{d.ref.sha256[:12]}/{d.ref.size} bytes")
            if info.size > self.max_artifact_bytes:
                raise fleet.FleetError(f"{info.size} bytes, over the limit of {self.max_artifact_bytes} "
                                       "(the fleet service's max_artifact_bytes)")
            d.held = self.storage.begin(info)
        except (fleet.FleetError, StorageFull, OSError) as e:
            self._fail(f"bundle {d.ref.name} {d.ref.version}: {e}", out)
            return
        d.info = info
        out.append(Unsubscribe([self.topics.info(d.ref.sha256)]))
        if d.held:
            out.append(Audit("fleet-download-resumed", f"{d.ref.name} {d.ref.version}",
                             f"{len(d.held)} of {len(info.chunks)} chunks held"))
        self._ask(d, out)

    def _chunk(self, d: _Download, index: int, payload: bytes, out: list[Action]) -> None:
        info = d.info
        assert info is not None
        if index >= len(info.chunks) or index in d.held:
            return
        try:
            chunk = fleet.decode(payload, Chunk, limit=info.chunk_size + 512)
        except fleet.FleetError:
            return  # a bad chunk is not held; the window asks for it again on the next session
        if chunk.sha256 != info.sha256 or chunk.index != index:
            return
        self._accept(d, index, chunk.data, out)

    def _fetched(self, sha256: str, index: int, data: bytes, error: str, out: list[Action]) -> None:
        d = self.download
        if d is None or d.info is None or d.ref.sha256 != sha256 or not d.http:
            return
        if error or not self._accept(d, index, data, out):
            # the operator's URL failed: the broker's chunks instead, from the first missing
            d.http = False
            d.asked.clear()
            out.append(Audit("fleet-http-failed", f"{d.ref.name} {d.ref.version}",
                             f"{d.ref.url}: chunk {index}: {error or 'does not match its sha256'}; "
                             "fetching the rest from the broker"))
            self._ask(d, out)

    def _accept(self, d: _Download, index: int, data: bytes, out: list[Action]) -> bool:
        """Keep chunk ``index`` if it verifies (False if not); finish the artifact with its last."""
        info = d.info
        assert info is not None
        if index >= len(info.chunks) or index in d.held:
            return True
        if len(data) != info.chunk_length(index) or hashlib.sha256(data).hexdigest() != info.chunks[index]:
            return False
        try:
            self.storage.put_chunk(info, index, data)
        except OSError as e:
            self._fail(f"bundle {d.ref.name} {d.ref.version}: cannot write its chunk: {e}", out)
            return True
        d.held.add(index)
        if len(d.held) % max(1, len(info.chunks) // 4) == 0:  # progress in the report: by quarters
            self._set_progress()
        if len(d.held) == len(info.chunks):
            if d.subscribed:
                out.append(Unsubscribe([self.topics.chunk(info.sha256, i) for i in sorted(d.subscribed)]))
            self.download = None
            if not self.storage.finish(info):
                self._fail(f"bundle {d.ref.name} {d.ref.version}: the chunks do not make its sha256", out)
                return True
            out.append(Audit("fleet-downloaded", f"{d.ref.name} {d.ref.version}",
                             f"sha256 {info.sha256}, {info.size} bytes in {len(info.chunks)} chunks"
                             + (f" from {d.ref.url}" if d.http else "")))
        else:
            self._ask(d, out)
        return True

    def _ask(self, d: _Download, out: list[Action]) -> None:
        """Ask for the next chunks missing, up to ``window`` outstanding: subscribe to their
        topics, or fetch them from the bundle's URL (range requests)."""
        info = d.info
        assert info is not None
        if not self.connected and not d.http:
            return
        outstanding = len(d.asked - d.held)
        new = []
        for i in range(len(info.chunks)):
            if outstanding >= self.window:
                break
            if i not in d.held and i not in d.asked:
                d.asked.add(i)
                new.append(i)
                outstanding += 1
        if not new:
            return
        if d.http:
            out += [Fetch(d.ref.url, info.sha256, i, i * info.chunk_size, info.chunk_length(i)) for i in new]
        else:
            d.subscribed.update(new)
            out.append(Subscribe([self.topics.chunk(info.sha256, i) for i in new]))

    def _stop_download(self, out: list[Action], drop: bool) -> None:
        d = self.download
        if d is None:
            return
        topics = [self.topics.info(d.ref.sha256)] + [self.topics.chunk(d.ref.sha256, i) for i in sorted(d.subscribed)]
        out.append(Unsubscribe(topics))
        if drop:
            self.storage.discard(d.ref.sha256)
        self.download = None

    # -- reconciliation ----------------------------------------------------------------------

    def _advance(self, out: list[Action]) -> None:
        doc = self.state.doc
        status = self.state.status
        if doc is None or status is None or status.outcome in ("failed", "rolled-back", "succeeded", "refused"):
            return
        if self.pending is not None or self.models is None:
            return  # one step at a time; the model store's state first
        # 1. download what neither the store nor the cache holds
        for ref in doc.bundles:
            if self._stored(ref) or self.storage.has_blob(ref.sha256):
                continue
            if ref.size > self.max_artifact_bytes:
                self._fail(f"bundle {ref.name} {ref.version} is {ref.size} bytes, over the limit of "
                           f"{self.max_artifact_bytes} (max_artifact_bytes)", out)
                return
            self._set_status("downloading")
            if self.download is None or self.download.ref.sha256 != ref.sha256:
                self._stop_download(out, drop=False)
                self.download = _Download(ref)
            d = self.download
            if d.info is not None:
                self._ask(d, out)
            elif self.connected and not d.info_asked:
                d.info_asked = True
                out.append(Subscribe([self.topics.info(ref.sha256)]))
            return
        # 2. install
        for ref in doc.bundles:
            if not self._stored(ref):
                self._set_status("installing")
                self.pending = Install(ref)
                out.append(self.pending)
                return
        # 3. activate
        for ref in doc.bundles:
            key = f"{ref.name}@{ref.version}"
            m = self.models.get(ref.name)
            if not ref.activate or key in self.state.activated:
                continue
            if m is not None and m.active == ref.version:
                self.state.activated.append(key)  # active already (or activated before a restart)
                self._dirty = True
                continue
            self._set_status("installing")
            if m is not None and m.previous == ref.version:
                self.pending = Rollback(ref.name, ref.version)  # back to the version before: no trial
            else:
                self.pending = Activate(ref.name, ref.version)
            out.append(self.pending)
            return
        # 4. config
        if doc.config is not None and doc.config.sha256 != self.state.config_digest:
            self._set_status("installing")
            self.pending = ApplyConfig(doc.config)
            out.append(self.pending)
            return
        # 5. trials
        in_trial = []
        for ref in doc.bundles:
            if not ref.activate:
                continue
            m = self.models.get(ref.name)
            if m is None or m.active != ref.version:
                self._finish("rolled-back", f"{ref.name} {ref.version} is no longer active (rolled back to "
                                            f"{m.active if m and m.active else 'none'})", out)
                return
            if m.trial == ref.version:
                in_trial.append(f"{ref.name} {ref.version}")
        if in_trial:
            self._set_status("trial", detail=f"in trial: {', '.join(in_trial)}")
            return
        for ref in doc.bundles:  # installed: the cache's copy is no longer needed
            if self.storage.has_blob(ref.sha256):
                self.storage.drop_blob(ref.sha256)
        self._finish("succeeded", "", out)

    def _stored(self, ref: ArtifactRef) -> bool:
        m = (self.models or {}).get(ref.name)
        return m is not None and ref.version in m.versions

    def _done(self, action: object, ok: bool, reason: str, out: list[Action]) -> None:
        if action is not self.pending:
            return
        self.pending = None
        match action:
            case Install(ref=ref):
                if not ok:
                    self.storage.drop_blob(ref.sha256)  # the store refused it: it will not do better later
                    self._fail(f"the model store refused {ref.name} {ref.version}: {reason}", out)
                else:
                    if self.models is not None:  # until the store's own state says so
                        m = self.models.setdefault(ref.name, ModelReport(name=ref.name))
                        if ref.version not in m.versions:
                            m.versions = [*m.versions, ref.version]
                    out.append(Audit("fleet-installed", f"{ref.name} {ref.version}", f"sha256 {ref.sha256}"))
            case Activate(name=name, version=version) | Rollback(name=name, version=version):
                if not ok:
                    self._fail(f"the model store did not activate {name} {version}: {reason}", out)
                else:
                    self.state.activated.append(f"{name}@{version}")
                    self._dirty = True
                    out.append(Audit("fleet-activated", f"{name} {version}",
                                     "rolled back to it" if isinstance(action, Rollback) else ""))
            case ApplyConfig(fragment=fragment):
                if not ok:
                    self._fail(f"the config fragment was not applied: {reason}", out)
                else:
                    self.state.config_digest = fragment.sha256
                    self._dirty = True
                    out.append(Audit("fleet-config-applied", fragment.sha256))

    def _set_status(self, outcome: str, detail: str = "") -> None:
        doc = self.state.doc
        assert doc is not None
        s = self.state.status
        if s is not None and s.deployment == doc.deployment and s.version == doc.version and s.outcome == outcome \
                and s.detail == detail:
            return
        self.state.status = DeploymentStatus(deployment=doc.deployment, version=doc.version, outcome=outcome,
                                             detail=detail, time=self.clock())
        self._set_progress()
        self._dirty = True

    def _set_progress(self) -> None:
        doc, s = self.state.doc, self.state.status
        if doc is None or s is None:
            return
        total = have = 0
        for ref in doc.bundles:
            if self._stored(ref) or self.storage.has_blob(ref.sha256):
                continue
            total += ref.size
            d = self.download
            if d is not None and d.ref.sha256 == ref.sha256 and d.info is not None:
                have += sum(d.info.chunk_length(i) for i in d.held)
        s.have, s.total = have, total

    def _fail(self, reason: str, out: list[Action]) -> None:
        self._stop_download(out, drop=False)
        self._finish("failed", reason, out)

    def _finish(self, outcome: str, reason: str, out: list[Action]) -> None:
        doc = self.state.doc
        assert doc is not None
        self.state.status = DeploymentStatus(deployment=doc.deployment, version=doc.version, outcome=outcome,
                                             reason=reason, time=self.clock())
        self._dirty = True
        out.append(Audit(f"fleet-{outcome}", f"{doc.deployment} v{doc.version}", reason))

    # -- reports -----------------------------------------------------------------------------

    def enrolment(self) -> Enrolment:
        return Enrolment(device=self.device, public_key=self.public_key, time=self.clock(), groups=self.groups,
                         attestation=self.attestation)

    def reported(self) -> ReportedState:
        models = []
        for m in sorted((self.models or {}).values(), key=lambda m: m.name):
            s = self.serving.get(m.name)
            models.append(m if s is None else msgspec.structs.replace(m, requests=s.requests, errors=s.errors,
                                                                     p95_ms=s.p95_ms, drift=s.drift))
        return ReportedState(device=self.device, seq=self.state.report_seq, time=self.clock(), groups=self.groups,
                             models=models, config_digest=self.state.config_digest, health=self.health,
                             current=self.state.status, refused=self.state.refused,
                             applied_version=self.state.applied_version, attestation=self.attestation)

    def _report(self, out: list[Action]) -> None:
        """Publish the reported state if it changed (or the session is new)."""
        if not self.connected or self.models is None:
            return
        r = self.reported()
        r.time, r.seq = 0.0, 0
        key = fleet.encode(r)
        if key == self._reported:
            return
        self._reported = key
        self.state.report_seq += 1
        self._save()
        report = self.reported()
        payload = fleet.encode(report)
        if len(payload) > fleet.MAX_REPORT:  # a reader refuses it: the attestation goes first, then the versions
            report.attestation = None
            payload = fleet.encode(report)
            if len(payload) > fleet.MAX_REPORT:
                report.models = [msgspec.structs.replace(m, versions=[]) for m in report.models]
                payload = fleet.encode(report)
        out.append(Publish(self.topics.reported(self.device), payload, retain=True))

    def _save(self) -> None:
        self.storage.save_state(_json.encode(self.state))
        self._dirty = False


def _peek(payload: bytes) -> tuple[int, str]:
    """The version and deployment id a refused document claims (for its report), if it says."""
    try:
        signed = fleet.decode(payload, fleet.SignedDocument)
        doc = fleet.decode(signed.payload, Deployment)
        return doc.version, doc.deployment
    except fleet.FleetError:
        return 0, ""
