"""The controller: carries out the rollout decisions (``tools._fleet_rollout``) over the
broker, with its state in SQLite (``tools._fleet_state``).  It reaches devices only through
retained topics: desired documents it signs and publishes, reported states, enrolments and
presence (the devices' MQTT wills) it reads.

``step`` is one pass over the running deployments (decide, then publish what was decided);
``run`` loops: take what the broker delivered, ``step``, and after each (re)connection make
sure the broker still holds every document and artifact the state says it published (a
broker restarted without its persistence file is given them again).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable


from protocols import fleet
from protocols.fleet import (
    ArtifactInfo,
    ArtifactRef,
    ConfigFragment,
    Deployment as Document,
    Enrolment,
    Presence,
    ReportedState,
    SignedDocument,
    Topics,
)

from ._fleet_broker import BrokerError, Link
from ._fleet_rollout import DRIFT, Decision, DeviceView, Policy, check_device, decide, plan_waves
from ._fleet_state import Deployment, State

__all__ = ["Controller", "FleetError", "view_of", "DRIFT_LEVELS"]

#: ModelReport.drift as the number a drift<=X gate compares ("": not known)
DRIFT_LEVELS: dict[str, float | None] = {"": None, **DRIFT}
#: documents are valid this long unless --expires says otherwise
DEFAULT_VALIDITY_S = 30 * 86400.0


class FleetError(Exception):
    """An operator's request the controller cannot carry out; says why and what to do."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def view_of(device: str, report: ReportedState | None, bundle_names: Iterable[str] = (),
            presence: tuple[Presence, float] | None = None) -> DeviceView:
    """What the rollout rules see of a device's last report: the document it acted on last
    (or refused), its outcome, and the health of the deployed models (all its models when the
    deployment carries no bundle); online or not as its presence (with the time the controller
    read it) says, when there is one."""
    online, since = True, 0.0
    if presence is not None:
        online, since = presence[0].online, (0.0 if presence[0].online else presence[1])
    if report is None:
        return DeviceView(device, online=presence is not None and online, offline_since=since)
    cur, refused = report.current, report.refused
    if refused is not None and (cur is None or refused.version > cur.version):
        version, outcome, reason = refused.version, "refused", refused.reason + (f": {refused.detail}" if refused.detail else "")
        deployment = refused.deployment
    elif cur is not None:
        version, outcome, deployment = cur.version, cur.outcome, cur.deployment
        reason = cur.reason + (f": {cur.detail}" if cur.detail and cur.reason else cur.detail)
    else:
        version, outcome, reason, deployment = report.applied_version, "pending", "", ""
    names = set(bundle_names)
    models = [m for m in report.models if not names or m.name in names]
    requests = sum(m.requests for m in models)
    errors = sum(m.errors for m in models)
    p95 = max((m.p95_ms for m in models if m.requests), default=None)
    drifts = [DRIFT_LEVELS.get(m.drift) for m in models]
    drift = max((d for d in drifts if d is not None), default=None)
    return DeviceView(device, version=version, outcome=outcome, reason=reason,
                      error_rate=errors / requests if requests else None, p95_ms=p95, drift=drift,
                      online=online and report.online, seen_at=report.time, deployment=deployment,
                      offline_since=since)


class Controller:
    """One controller on one state; ``link`` may be None for the commands that only read."""

    def __init__(self, state: State, link: Link | None, topics: Topics, *, private_key: bytes | None = None,
                 fleet_id: str = "", clock: Callable[[], float] = time.time, log: Callable[[str], None] | None = None) -> None:
        self.state = state
        self.link = link
        self.topics = topics
        self.private_key = private_key
        self.fleet_id = fleet_id
        self.clock = clock
        self.log = log or (lambda line: None)
        #: the last report of each device (the highest seq), decoded
        self.reports: dict[str, ReportedState] = {}
        #: each device's last presence, with when the controller first read it
        self.presence: dict[str, tuple[Presence, float]] = {}
        self._reconciled = 0
        #: (deployment, device) -> the (version, state, reason) last written to its progress row
        self._recorded: dict[tuple[int, str], tuple[int, str, str]] = {}
        for row in state.devices():
            report = row.decoded("reported", ReportedState)
            if report is not None:
                self.reports[row.id] = report
            found = row.decoded("presence", Presence)
            if found is not None:
                self.presence[row.id] = (found, row.presence_at or 0.0)

    # -- what the broker delivered ---------------------------------------------------------------

    def ingest(self, messages: Iterable[tuple[str, bytes, bool]]) -> int:
        """Record enrolments, reports and presence (in one transaction); returns how many
        were new."""
        now = self.clock()
        changed = 0
        with self.state.transaction():
            for topic, payload, _retain in messages:
                kind = self.topics.parse(topic)
                if not payload:
                    continue
                match kind:
                    case ("reported", device):
                        report = self._decoded(topic, payload, ReportedState, device, "a report")
                        if report is None:
                            continue
                        old = self.reports.get(device)
                        if old is not None and report.seq <= old.seq and report.time <= old.time:
                            continue  # seen already (retained, read again), or stale; a device whose
                            # state was wiped counts from 1 again, with a later time: taken
                        self.reports[device] = report
                        self.state.saw_report(device, payload, now)
                        changed += 1
                    case ("enrol", device):
                        enrol = self._decoded(topic, payload, Enrolment, device, "an enrolment")
                        if enrol is None:
                            continue
                        self.state.saw_enrol(device, enrol.public_key, payload, now)
                        changed += 1
                    case ("presence", device):
                        found = self._decoded(topic, payload, Presence, device, "a presence")
                        old = self.presence.get(device)
                        if found is None or (old is not None and old[0] == found):
                            continue  # the same retained message read again: keeps its time
                        self.presence[device] = (found, now)
                        self.state.saw_presence(device, payload, now)
                        changed += 1
                    case _:
                        pass
        return changed

    def _decoded(self, topic: str, payload: bytes, kind: Any, device: str, what: str) -> Any:
        """``payload`` as a ``kind`` that names ``device`` (its topic's), or None (said in the log)."""
        try:
            message = fleet.decode(payload, kind)
        except fleet.FleetError as exc:
            self.log(f"ignored {what} on {topic}: {exc}")
            return None
        assert isinstance(message, kind)
        if message.device != device:
            self.log(f"ignored {what} on {topic}: it names device {message.device!r}")
            return None
        return message

    def refresh(self, quiet: float = 0.4) -> int:
        """Read the devices' retained enrolments, reports and presence once (the commands that show)."""
        link = self._need_link()
        p = self.topics.prefix
        got = link.retained([f"{p}/devices/+/enrol", f"{p}/devices/+/reported", f"{p}/devices/+/presence"],
                            quiet=quiet)
        return self.ingest((t, p, True) for t, p in got.items())

    # -- documents ------------------------------------------------------------------------------

    def _need_link(self) -> Link:
        if self.link is None:
            raise FleetError("this needs the broker: give --broker HOST:PORT (and --ca/--cert/--key for TLS)", 3)
        return self.link

    def _document(self, target: str, deployment: str, bundles: list[ArtifactRef], config: ConfigFragment | None,
                  validity_s: float) -> tuple[int, bytes]:
        if self.private_key is None:
            raise FleetError("no fleet signing key: run `edgebus fleet keygen` (or give --signing-key)", 2)
        now = self.clock()
        version = self.state.next_version()
        doc = Document(fleet=self.fleet_id, version=version, deployment=deployment, target=target, issued=now,
                       expires=now + validity_s, bundles=bundles, config=config)
        signed = fleet.sign_document(doc, self.private_key)
        return version, fleet.encode(signed)

    def issue(self, kind: str, name: str, deployment: int | None, bundles: list[ArtifactRef],
              config: ConfigFragment | None, validity_s: float = DEFAULT_VALIDITY_S) -> tuple[str, int, bytes]:
        """Sign a document for ``device:<name>`` or ``group:<name>`` and record it as its
        topic's current document (the version taken in the same transaction); returns (topic,
        version, payload) for the caller to publish once its transaction is committed (what
        is recorded but not yet on the broker is sent again by ``reconcile``)."""
        topic = self.topics.device_desired(name) if kind == "device" else self.topics.group_desired(name)
        with self.state.transaction():
            version, payload = self._document(f"{kind}:{name}", str(deployment or 0), bundles, config, validity_s)
            self.state.record_document(topic, version, deployment, payload, self.clock())
        return topic, version, payload

    def send(self, documents: Iterable[tuple[str, int, bytes]]) -> None:
        """Publish issued documents, retained, and wait for the broker's acknowledgements."""
        link = self._need_link()
        link.flush([link.publish(topic, payload) for topic, _version, payload in documents])

    def document_content(self, topic: str) -> Document | None:
        """The deployment inside the document the state last published on ``topic``."""
        found = self.state.documents().get(topic)
        if found is None:
            return None
        signed = fleet.decode(found[2], SignedDocument)
        return fleet.decode(signed.payload, Document)  # type: ignore[arg-type,return-value]

    # -- artifacts ------------------------------------------------------------------------------

    def push(self, data: bytes, name: str, chunk_size: int = fleet.DEFAULT_CHUNK_SIZE,
             timeout: float = 300.0) -> tuple[str, bool]:
        """Publish an artifact's chunks then its info, retained (once per content hash: when the
        state has it and the broker holds its info, nothing is sent).  Returns (sha256, sent)."""
        link = self._need_link()
        info = fleet.artifact_info(data, chunk_size)
        known = self.state.artifact(info.sha256)
        if known is not None and link.retained([self.topics.info(info.sha256)], quiet=0.3):
            return info.sha256, False
        if known is not None:
            chunk_size = known[1]
            info = fleet.artifact_info(data, chunk_size)
        self._send_artifact(info, data, timeout)
        self.state.add_artifact(info.sha256, name, info.chunk_size, fleet.encode(info), data, self.clock())
        return info.sha256, True

    def _send_artifact(self, info: ArtifactInfo, data: bytes, timeout: float = 300.0) -> None:
        link = self._need_link()
        pending = []
        for chunk in fleet.chunks_of(data, info.chunk_size):
            pending.append(link.publish(self.topics.chunk(info.sha256, chunk.index), fleet.encode(chunk)))
            if len(pending) >= 64:
                link.flush(pending, timeout)
                pending = []
        link.flush(pending, timeout)
        link.flush([link.publish(self.topics.info(info.sha256), fleet.encode(info))], timeout)  # last: all is there

    def reconcile(self, quiet: float = 0.5) -> int:
        """Give the broker again every document and artifact the state published that it no
        longer holds (or holds otherwise); returns how many were sent."""
        link = self._need_link()
        p = self.topics.prefix
        held = link.retained([f"{p}/devices/+/desired", f"{p}/groups/+/desired", f"{p}/artifacts/+/info"],
                             quiet=quiet)
        sent = []
        for topic, (_version, _dep, payload) in self.state.documents().items():
            if held.get(topic) != payload:
                sent.append(link.publish(topic, payload))
        resent_artifacts = 0
        for sha, name, _size, _at in self.state.artifacts():
            if self.topics.info(sha) not in held:
                found = self.state.artifact(sha)
                assert found is not None
                _, chunk_size, info_bytes, data = found
                self._send_artifact(fleet.decode(info_bytes, ArtifactInfo), data)  # type: ignore[arg-type]
                resent_artifacts += 1
        link.flush(sent)
        if sent or resent_artifacts:
            self.log(f"the broker had lost {len(sent)} documents and {resent_artifacts} artifacts: sent again")
        return len(sent) + resent_artifacts

    # -- deployments ----------------------------------------------------------------------------

    def bundles_of(self, sha256: str | None) -> list[ArtifactRef]:
        if sha256 is None:
            return []
        found = self.state.artifact_meta(sha256)
        if found is None:
            raise FleetError(f"artifact {sha256[:16]} was never pushed from this state; `edgebus fleet push` it", 4)
        name, size = found
        model, _, version = name.partition("@")
        return [ArtifactRef(name=model, version=version, sha256=sha256, size=size)]

    def create(self, group: str, artifact: str | None, config: str, policy: Policy) -> int:
        """Record a deployment of ``artifact`` and/or ``config`` to ``group`` and plan its
        waves; nothing is published until ``step``."""
        groups = self.state.groups()
        if group not in groups:
            raise FleetError(f"no group {group!r}; create it with `edgebus fleet groups create {group}`", 4)
        for d in self.state.deployments(("running",)):
            if d.group == group:
                raise FleetError(f"deployment {d.id} to group {group} is still running; halt it first "
                                 f"(`edgebus fleet halt {d.id}`)", 1)
        self.bundles_of(artifact)  # known?
        previous = self.document_content(self.topics.group_desired(group))
        prev_artifact = previous.bundles[0].sha256 if previous and previous.bundles else None
        prev_config = previous.config.toml if previous and previous.config else ""
        now = self.clock()
        with self.state.transaction():
            dep = self.state.create_deployment(group, artifact, config, policy, prev_artifact, prev_config, now)
            self.state.set_plan(dep, plan_waves(groups[group], policy, salt=str(dep)), now)
        return dep

    def _content(self, d: Deployment) -> tuple[list[ArtifactRef], ConfigFragment | None]:
        config = ConfigFragment(toml=d.config, sha256=fleet.config_digest(d.config)) if d.config else None
        return self.bundles_of(d.artifact), config

    def _previous(self, d: Deployment, baseline: dict[str, str] | None = None
                  ) -> tuple[list[ArtifactRef], ConfigFragment | None]:
        """What to roll a device back to: for each model of the deployment, the version the
        device had active before (``baseline``, from its report when the deployment reached
        it), else the one the group's previous document named; the previous config.  The
        device holds that version already and fetches nothing; its sha256 is the artifact's
        pushed from this state, else all zeros (a version the device never held cannot be
        fetched: it fails, and says so)."""
        config = (ConfigFragment(toml=d.previous_config, sha256=fleet.config_digest(d.previous_config))
                  if d.previous_config else None)
        before = {b.name: b for b in self.bundles_of(d.previous_artifact)}
        out = []
        for new in self.bundles_of(d.artifact):
            version = (baseline or {}).get(new.name) or (before[new.name].version if new.name in before else "")
            if not version:
                continue  # the model is new to the device: nothing to go back to
            known = before.get(new.name)
            if known is not None and known.version == version:
                out.append(known)
                continue
            sha = self.state.artifact_named(f"{new.name}@{version}")
            size = self.state.artifact_meta(sha)[1] if sha else 0  # type: ignore[index]
            out.append(ArtifactRef(name=new.name, version=version, sha256=sha or "0" * 64, size=size))
        if not d.artifact:
            out = list(before.values())
        return out, config

    def baseline(self, device: str, names: Iterable[str]) -> dict[str, str]:
        report = self.reports.get(device)
        if report is None:
            return {}
        active = {m.name: m.active for m in report.models if m.active}
        return {n: active[n] for n in names if n in active}

    def touched(self, d: Deployment) -> dict[str, int]:
        """Devices this deployment sent a document, with its version."""
        return self.state.touched(d.id)

    def views(self, d: Deployment, devices: Iterable[str]) -> dict[str, DeviceView]:
        names = [b.name for b in self.bundles_of(d.artifact)]
        return {dev: view_of(dev, self.reports.get(dev), names, self.presence.get(dev)) for dev in devices}

    def step(self) -> list[tuple[int, Decision]]:
        """One pass over the running deployments; returns what was decided for each."""
        done = []
        for d in self.state.deployments(("running",)):
            touched = self.touched(d)
            views = self.views(d, touched)
            decision = decide(d.policy, d.waves, d.wave, d.wave_started_at, touched, views, self.clock())
            self._record_checks(d, touched, views)
            self._act(d, decision)
            done.append((d.id, decision))
        return done

    def _record_checks(self, d: Deployment, touched: dict[str, int], views: dict[str, DeviceView]) -> None:
        """Each touched device's standing into its progress row, when it changed."""
        now = self.clock()
        with self.state.transaction():
            for device, version in touched.items():
                check = check_device(views.get(device), version, d.policy.gates, device)
                view = views.get(device)
                state = view.outcome if view is not None and view.version == version else check.state
                if check.state == "failed":
                    state = "failed" if state not in ("refused", "rolled-back") else state
                key = (d.id, device)
                if self._recorded.get(key) != (version, state, check.reason):
                    self._recorded[key] = (version, state, check.reason)
                    self.state.set_progress(d.id, device, now, state=state, reason=check.reason)

    def _act(self, d: Deployment, decision: Decision) -> None:
        """Record what was decided (one transaction, in which the deployment is read again: an
        operator's halt or rollback, or another controller, may have acted since ``d`` was
        read), then publish it."""
        now = self.clock()
        issued: list[tuple[str, int, bytes]] = []
        with self.state.transaction():
            current = self.state.deployment(d.id)
            if current is None or (current.state, current.wave) != ("running", d.wave):
                return
            match decision.action:
                case "wait":
                    if decision.reason != d.reason:
                        self.state.update_deployment(d.id, now, reason=decision.reason)
                case "advance":
                    bundles, config = self._content(d)
                    names = [b.name for b in bundles]
                    for device in d.waves[decision.wave]:
                        issued.append(self.issue("device", device, d.id, bundles, config, d.policy.validity_s))
                        self.state.set_progress(d.id, device, now, state="sent", reason=f"document v{issued[-1][1]}",
                                                version=issued[-1][1], wave=decision.wave)
                        self.state.set_baseline(d.id, device, self.baseline(device, names))
                    self.state.update_deployment(d.id, now, wave=decision.wave, wave_started_at=now,
                                                 reason=decision.reason)
                case "finish":
                    bundles, config = self._content(d)
                    issued.append(self.issue("group", d.group, d.id, bundles, config, d.policy.validity_s))
                    self.state.update_deployment(d.id, now, state="complete", group_version=issued[0][1],
                                                 reason=f"{decision.reason} (v{issued[0][1]})")
                case "halt":
                    self.state.update_deployment(d.id, now, state="halted", reason=f"gate failed: {decision.reason}")
                case "stall":
                    self.state.update_deployment(d.id, now, state="stalled", reason=decision.reason)
        match decision.action:
            case "advance":
                self.send(issued)
                self.log(f"deployment {d.id}: wave {decision.wave + 1} of {len(d.waves)} sent to "
                         f"{len(d.waves[decision.wave])} devices")
            case "finish":
                self.send(issued)
                self._clear_device_documents(d)
                self.log(f"deployment {d.id}: complete; group {d.group} document v{issued[0][1]}")
            case "halt":
                self.log(f"deployment {d.id}: halted: {decision.reason}")
                if d.policy.rollback_on_failure:
                    self.rollback(d.id, f"gate failed: {decision.reason}")
            case "stall":
                self.log(f"deployment {d.id}: stalled: {decision.reason}")

    def _clear_device_documents(self, d: Deployment) -> None:
        """The group's document (a higher version) now carries what the wave documents did:
        clear them, and any older document of a member (a device applies the highest version it
        can read, so a lower one is dead), so the broker's retained state stays about one
        document per group."""
        link = self._need_link()
        infos = []
        documents = self.state.documents()
        group = documents.get(self.topics.group_desired(d.group))
        if group is None:
            return
        members = set(self.state.groups().get(d.group, [])) | set(self.touched(d))
        for device in sorted(members):
            topic = self.topics.device_desired(device)
            held = documents.get(topic)
            if held is not None and held[0] < group[0]:
                self.state.forget_document(topic)
                infos.append(link.publish(topic, b""))
        link.flush(infos)

    def halt(self, deployment: int, reason: str) -> Deployment:
        with self.state.transaction():
            d = self._get(deployment)
            if d.state != "running":
                raise FleetError(f"deployment {deployment} is {d.state}, not running", 1)
            self.state.update_deployment(deployment, self.clock(), state="halted", reason=reason)
        return self._get(deployment)

    def rollback(self, deployment: int, reason: str = "rolled back by the operator") -> int:
        """Send each touched device (and the group, if its document was published) a new
        document naming what the group ran before; returns how many documents were sent."""
        d = self._get(deployment)
        if d.state == "rolled_back":
            raise FleetError(f"deployment {deployment} is rolled back already", 1)
        now = self.clock()
        issued = []
        targets = set()
        with self.state.transaction():
            d = self._get(deployment)  # again, inside the transaction
            if d.state == "rolled_back":
                raise FleetError(f"deployment {deployment} is rolled back already", 1)
            touched = {p.device: p for p in self.state.progress(d.id) if p.version > 0}
            if d.group_version:
                held = self.state.documents().get(self.topics.group_desired(d.group))
                if held is not None and held[1] == d.id:
                    bundles, config = self._previous(d)
                    issued.append(self.issue("group", d.group, d.id, bundles, config, d.policy.validity_s))
                    targets.add(self._describe(bundles, config))
            for device, p in touched.items():
                bundles, config = self._previous(d, p.baseline)
                issued.append(self.issue("device", device, d.id, bundles, config, d.policy.validity_s))
                targets.add(self._describe(bundles, config))
                self.state.set_progress(d.id, device, now, state="rolling-back", reason=f"document v{issued[-1][1]} "
                                        f"({self._describe(bundles, config)})", version=issued[-1][1])
            self.state.update_deployment(deployment, now, state="rolled_back", reason=reason)
        self.send(issued)
        self.log(f"deployment {deployment}: rolled back {len(touched)} devices to {'; '.join(sorted(targets))}")
        return len(issued)

    @staticmethod
    def _describe(bundles: list[ArtifactRef], config: ConfigFragment | None) -> str:
        parts = [f"{b.name} {b.version}" for b in bundles] + (["config " + config.sha256[:12]] if config else [])
        return ", ".join(parts) or "nothing deployed before"

    def _get(self, deployment: int) -> Deployment:
        d = self.state.deployment(deployment)
        if d is None:
            raise FleetError(f"no deployment {deployment} (`edgebus fleet status` lists them)", 4)
        return d

    def renew(self, share: float = 0.25) -> int:
        """Issue again (same content, a new version) every document with less than ``share``
        of its validity left: a device reading it after a restart would refuse it as expired
        (TUF's freeze attack is what expiry stops; a live controller keeps its documents
        fresh).  Returns how many were renewed."""
        now = self.clock()
        issued = []
        with self.state.transaction():
            documents = self.state.documents()
            for topic, (version, deployment, payload) in documents.items():
                doc = fleet.decode(fleet.decode(payload, SignedDocument).payload, Document)  # type: ignore[union-attr]
                assert isinstance(doc, Document)
                if doc.expires - now > share * (doc.expires - doc.issued):
                    continue
                if doc.target.startswith("device:"):
                    groups = self.state.groups_of(doc.target[7:])
                    if any(documents.get(self.topics.group_desired(g), (0,))[0] > version for g in groups):
                        continue  # dead: a group's document is newer (not renewed above it)
                kind, _, name = doc.target.partition(":")
                issued.append(self.issue(kind, name, deployment, doc.bundles, doc.config, doc.expires - doc.issued))
                if kind == "device" and deployment is not None:
                    self.state.set_progress(deployment, name, now, state="sent", reason=f"renewed as v{issued[-1][1]}",
                                            version=issued[-1][1])
        self.send(issued)
        if issued:
            self.log(f"renewed {len(issued)} documents before they expire")
        return len(issued)

    # -- the loop -------------------------------------------------------------------------------

    def run(self, *, tick: float = 0.5, until: Callable[[], bool] | None = None,
            stop: Callable[[], bool] | None = None) -> None:
        """Take reports, advance the rollouts; after each (re)connection, reconcile first.
        Returns when ``until()`` holds after a step, or ``stop()`` holds."""
        link = self._need_link()
        p = self.topics.prefix
        link.subscribe([f"{p}/devices/+/enrol", f"{p}/devices/+/reported", f"{p}/devices/+/presence"])
        renewed_at = 0.0
        while not (stop and stop()):
            if link.connections != self._reconciled and link.connected:
                self._reconciled = link.connections
                try:
                    self.reconcile()
                except BrokerError as exc:
                    self.log(f"reconcile: {exc}")
                    self._reconciled = 0
            self.ingest(link.messages(tick))
            if not link.connected:
                continue  # decisions wait for the reports a reconnection brings
            try:
                self.step()
                if time.monotonic() - renewed_at > 60:
                    renewed_at = time.monotonic()
                    self.renew()
            except BrokerError as exc:  # the connection dropped mid-step: the state says what was sent
                self.log(f"step: {exc}")
                continue
            if until is not None and until():
                return
