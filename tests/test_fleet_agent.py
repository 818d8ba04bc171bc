"""The fleet's device side against a real mosquitto (mutual TLS, the ACL of
protocols.fleet.acl_lines): the agent's core, and real `edgebus boot` systems receiving
signed deployments of bundles published as retained chunks."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from protocols import fleet
from protocols.fleet import Topics
from protocols.modelstore import ListModels, ModelList
from protocols.security import AuditRecords, AuditTail

from conftest import System, wait_for
from kernel import default_config_text
from services import BusError
from services.examples.greeter import Greet, Greeting
from services.fleet import Activate as AgentActivate
from services.fleet import Rollback as AgentRollback
from services.fleet import (Agent, Audit, Connected, DiskStorage, Done, Install, MemoryStorage, Models, Publish, Received,
                            Serving, Subscribe)
from services.security._trust import TrustStore
from helpers.mosquitto import Mosquitto, mqtt_client, tls_broker  # noqa: F401  (a fixture)
from test_modelstore import KEY, bundle, pub_hex


def _collect(client, topics: list[str]) -> tuple[dict[str, bytes], threading.Event]:
    got: dict[str, bytes] = {}
    subscribed = threading.Event()
    client.on_message = lambda c, u, m: got.__setitem__(m.topic, m.payload)
    client.on_subscribe = lambda c, u, mid, codes, p=None: subscribed.set()
    client.subscribe([(t, 1) for t in topics])
    return got, subscribed


def test_the_acl_lets_a_device_read_only_its_own_and_its_groups_topics(tls_broker: Mosquitto) -> None:
    t = Topics()
    tls_broker.set_acl(fleet.acl_lines({"dev1": ["north"], "dev2": ["south"]}, operator="operator"))
    op = mqtt_client(tls_broker, "operator")
    try:
        for topic in (t.device_desired("dev1"), t.device_desired("dev2"), t.group_desired("north"),
                      t.group_desired("south"), t.info("a" * 64)):
            op.publish(topic, topic.encode(), qos=1, retain=True).wait_for_publish(10)
        dev1 = mqtt_client(tls_broker, "dev1")
        try:
            got, subscribed = _collect(dev1, [f"{t.prefix}/#"])
            assert subscribed.wait(10)
            end = time.monotonic() + 30
            while len(got) < 3 and time.monotonic() < end:
                time.sleep(0.05)
            # writes: its own reported topic reaches the operator, another device's does not
            seen, sub2 = _collect(op, [f"{t.prefix}/devices/+/reported"])
            assert sub2.wait(10)
            dev1.publish(t.reported("dev2"), b"forged", qos=1).wait_for_publish(10)
            dev1.publish(t.device_desired("dev1"), b"forged", qos=1).wait_for_publish(10)
            dev1.publish(t.reported("dev1"), b"mine", qos=1).wait_for_publish(10)
            end = time.monotonic() + 30
            while t.reported("dev1") not in seen and time.monotonic() < end:
                time.sleep(0.05)
            assert seen == {t.reported("dev1"): b"mine"}
            time.sleep(0.5)  # anything the broker delivered late is in by now
            assert set(got) == {t.device_desired("dev1"), t.group_desired("north"), t.info("a" * 64),
                                t.reported("dev1")}
            assert got[t.device_desired("dev1")] == t.device_desired("dev1").encode()  # not overwritten
        finally:
            dev1.loop_stop(); dev1.disconnect()
    finally:
        op.loop_stop(); op.disconnect()


# -- a real device: `edgebus boot` with the fleet service ---------------------------------------

FLEET_KEY = Ed25519PrivateKey.generate()
FLEET_RAW = FLEET_KEY.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
FLEET_PUB = FLEET_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
OTHER_RAW = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def device_config(broker: Mosquitto, device: str, groups: list[str], extra: str = "", settings: str = "",
                  store: str = "") -> str:
    b = broker.client_settings(device)
    return f"""
[services.security]
command = ["{{python}}", "-m", "services.security"]
capabilities = ["call:kernel.Grant", "call:kernel.Revoke", "call:kernel.Enroll",
                "call:kernel.GetMeasurements", "subscribe:kernel.audit"]
[[services.security.settings.trusted_keys]]
label = "test"
public_key = "{pub_hex(KEY)}"
[[services.security.settings.trusted_keys]]
label = "test fleet"
public_key = "{FLEET_PUB.hex()}"
role = "fleet"

[services.modelstore]
command = ["{{python}}", "-m", "services.modelstore"]
requires = ["security"]
capabilities = ["call:security.VerifySignature", "call:security.Seal", "call:security.Unseal",
                "call:security.AuditAppend", "publish:modelstore.*"]
settings = {{ {store} }}

[services.fleet]
command = ["{{python}}", "-m", "services.fleet"]
requires = ["modelstore"]
capabilities = [
  "call:security.DeviceKey", "call:security.Attest", "call:security.TrustList", "call:security.AuditAppend",
  "call:modelstore.ListModels", "call:modelstore.Install", "call:modelstore.Activate", "call:modelstore.Rollback", "subscribe:modelstore.*",
  "call:kernel.ListServices", "call:kernel.Reload", "subscribe:metrics.scheduler", "subscribe:telemetry.drift",
]
backoff_initial = 0.05
backoff_max = 0.2

[services.fleet.settings]
device_id = "{device}"
groups = {groups!r}
window = 2
report_interval = 5.0
{settings}
[services.fleet.settings.broker]
host = "{b['host']}"
port = {b['port']}
tls_ca = "{b['tls_ca']}"
tls_cert = "{b['tls_cert']}"
tls_key = "{b['tls_key']}"
backoff_initial = 0.5
backoff_max = 2.0
{extra}"""


class Operator:
    """The test's side of the broker: publishes artifacts and signed documents (retained), and
    follows the devices' reports."""

    def __init__(self, broker: Mosquitto) -> None:
        self.t = Topics()
        self.reports: dict[str, fleet.ReportedState] = {}
        self.enrolments: dict[str, fleet.Enrolment] = {}
        #: every presence message read, in order, per device
        self.presence: dict[str, list[fleet.Presence]] = {}
        self.lock = threading.Lock()
        self.client = mqtt_client(broker, "operator")
        got, subscribed = threading.Event(), threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda c, u, mid, codes, p=None: subscribed.set()
        self.client.subscribe([(f"{self.t.prefix}/devices/+/reported", 1), (f"{self.t.prefix}/devices/+/enrol", 1),
                               (f"{self.t.prefix}/devices/+/presence", 1)])
        assert subscribed.wait(10)

    def _on_message(self, c, u, m) -> None:
        kind = self.t.parse(m.topic)
        with self.lock:
            if kind[0] == "reported" and m.payload:
                self.reports[kind[1]] = fleet.decode(m.payload, fleet.ReportedState)
            elif kind[0] == "enrol" and m.payload:
                self.enrolments[kind[1]] = fleet.decode(m.payload, fleet.Enrolment)
            elif kind[0] == "presence" and m.payload:
                self.presence.setdefault(kind[1], []).append(fleet.decode(m.payload, fleet.Presence))

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(20)

    def artifact(self, data: bytes, chunk_size: int, only: range | None = None) -> fleet.ArtifactInfo:
        info = fleet.artifact_info(data, chunk_size)
        self.publish(self.t.info(info.sha256), fleet.encode(info))
        for c in fleet.chunks_of(data, chunk_size):
            if only is None or c.index in only:
                self.publish(self.t.chunk(c.sha256, c.index), fleet.encode(c))
        return info

    def deploy(self, topic: str, version: int, target: str, bundles: list[fleet.ArtifactRef], *,
               key: bytes = FLEET_RAW, expires_in: float = 3600, deployment: str = "") -> bytes:
        now = time.time()
        doc = fleet.Deployment(fleet="test", version=version, deployment=deployment or f"dep-{version}",
                               target=target, issued=now - 1, expires=now + expires_in, bundles=bundles)
        payload = fleet.encode(fleet.sign_document(doc, key))
        self.publish(topic, payload)
        return payload

    def wait_report(self, device: str, predicate, what: str, timeout: float = 90) -> fleet.ReportedState:
        def check():
            with self.lock:
                r = self.reports.get(device)
            return r if r is not None and predicate(r) else None
        try:
            return wait_for(check, timeout, what)
        except AssertionError:
            raise AssertionError(f"{what}; the last report: {self.reports.get(device)}") from None

    def wait_presence(self, device: str, online: bool, after: int, what: str, timeout: float = 60) -> int:
        """The index of the first presence of ``device`` from ``after`` on that says ``online``."""
        def check():
            with self.lock:
                seen = self.presence.get(device, [])[after:]
            return next((after + i + 1 for i, p in enumerate(seen) if p.online == online), None)
        try:
            return wait_for(check, timeout, what)
        except AssertionError:
            raise AssertionError(f"{what}; presence read: {self.presence.get(device)}") from None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _model(r: fleet.ReportedState, name: str) -> fleet.ModelReport | None:
    return next((m for m in r.models if m.name == name), None)


async def _audit(system: System) -> list[str]:
    async with system.client() as bus:
        records = await bus.call("security", AuditTail(n=200), AuditRecords, timeout=10)
    return [f"{r.kind} {r.subject} {r.detail}" for r in records.records]


async def _pid(system: System, name: str) -> int:
    return (await system.services())[name].pid


@pytest.mark.anyio
async def test_a_device_receives_a_signed_deployment_resumes_after_kill_9_and_refuses_bad_documents(
        tls_broker: Mosquitto, make_system) -> None:
    tls_broker.set_acl(fleet.acl_lines({"dev1": ["lab"]}, operator="operator"))
    op = Operator(tls_broker)
    try:
        system = make_system(device_config(tls_broker, "dev1", ["lab"]))
        await system.wait_ready("security", "modelstore", "fleet", timeout=60)
        first = op.wait_report("dev1", lambda r: r.groups == ["lab"], "the device's first report")
        assert first.attestation is not None and first.current is None
        assert op.enrolments["dev1"].public_key == first.attestation.public_key

        # a deployment to its group; only the first chunks are on the broker yet
        v1 = bundle("1.0.0", KEY)
        chunk = 256
        n = -(-len(v1) // chunk)
        assert n >= 6
        info = op.artifact(v1, chunk, only=range(0, n // 2))
        ref = fleet.ArtifactRef(name="demo", version="1.0.0", sha256=info.sha256, size=info.size)
        op.deploy(op.t.group_desired("lab"), 1, "group:lab", [ref])
        journal = system.run_dir / "state" / "fleet" / "partial" / f"{info.sha256}.journal"
        wait_for(lambda: journal.exists() and len(journal.read_text().split()) >= n // 2, 60, "half the chunks")
        report = op.wait_report("dev1", lambda r: r.current is not None and r.current.outcome == "downloading",
                                "the download reported")
        assert report.applied_version == 1

        # kill -9 mid-download; the kernel restarts the agent, which resumes from its journal
        pid = await _pid(system, "fleet")
        os.kill(pid, signal.SIGKILL)
        await system.wait_restarted("fleet", pid, timeout=60)
        await system.wait_ready("fleet", timeout=60)
        for c in fleet.chunks_of(v1, chunk):
            if c.index >= n // 2:
                op.publish(op.t.chunk(c.sha256, c.index), fleet.encode(c))
        report = op.wait_report("dev1", lambda r: r.current is not None and r.current.outcome == "succeeded",
                                "the deployment to succeed")
        m = _model(report, "demo")
        assert m is not None and m.active == "1.0.0" and report.current.deployment == "dep-1"
        audit = await _audit(system)
        assert any(a.startswith(f"fleet-download-resumed demo 1.0.0 {n // 2} of {n} chunks held") for a in audit), audit
        assert any(a.startswith("fleet-succeeded dep-1 v1") for a in audit)
        assert not journal.exists() and not list((journal.parent.parent / "blobs").iterdir())

        # a newer version to the device itself: installed, activated, in trial against 1.0.0
        v2 = bundle("1.1.0", KEY)
        info2 = op.artifact(v2, 4096)
        ref2 = fleet.ArtifactRef(name="demo", version="1.1.0", sha256=info2.sha256, size=info2.size)
        op.deploy(op.t.device_desired("dev1"), 2, "device:dev1", [ref2])
        report = op.wait_report("dev1", lambda r: r.current is not None and r.current.version == 2
                                and r.current.outcome == "trial", "the second deployment in trial")
        m = _model(report, "demo")
        assert m.active == "1.1.0" and m.trial == "1.1.0" and set(m.versions) == {"1.0.0", "1.1.0"}

        # refused, each reported with its reason, nothing else changes
        old = op.deploy(op.t.device_desired("dev1"), 1, "device:dev1", [ref], deployment="replayed")
        report = op.wait_report("dev1", lambda r: r.refused is not None and r.refused.reason == "replay", "replay")
        op.deploy(op.t.device_desired("dev1"), 10, "device:dev1", [ref], key=OTHER_RAW, deployment="forged")
        report = op.wait_report("dev1", lambda r: r.refused.reason == "unknown-key", "an unknown key refused")
        assert report.refused.deployment == "forged"
        op.deploy(op.t.device_desired("dev1"), 11, "device:dev1", [ref], expires_in=-10, deployment="stale")
        report = op.wait_report("dev1", lambda r: r.refused.reason == "expired", "an expired document refused")
        assert report.current.version == 2 and report.applied_version == 2 and _model(report, "demo").active == "1.1.0"

        # back to 1.0.0 (a newer document naming it): the store's Rollback, no trial, nothing fetched
        op.deploy(op.t.device_desired("dev1"), 12, "device:dev1", [ref], deployment="back")
        report = op.wait_report("dev1", lambda r: r.current.version == 12 and r.current.outcome == "succeeded",
                                "the rollback to 1.0.0")
        m = _model(report, "demo")
        assert (m.active, m.trial) == ("1.0.0", "")

        # the other key, trusted at run time with role fleet, now signs documents the device applies
        other_pub = Ed25519PrivateKey.from_private_bytes(OTHER_RAW).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        system.busctl("trust", "add", other_pub.hex(), "--label", "second fleet key", "--role", "fleet", check=True)
        listing = system.busctl("trust", "list", check=True).stdout
        assert any(fleet.key_id(other_pub) in line and " fleet " in line for line in listing.splitlines()), listing
        op.deploy(op.t.device_desired("dev1"), 13, "device:dev1", [ref], key=OTHER_RAW, deployment="second-key")
        op.wait_report("dev1", lambda r: r.current.version == 13 and r.current.outcome == "succeeded",
                       "a document signed by the key added at run time")
        audit = await _audit(system)
        for reason in ("replay", "unknown-key", "expired"):
            assert any(a.startswith("fleet-refused") and f" {reason}: " in a for a in audit), (reason, audit)
        assert old  # (the replayed bytes were a genuine, once valid document)
    finally:
        op.close()


@pytest.mark.anyio
async def test_a_devices_presence_is_online_when_connected_its_will_when_killed_and_offline_when_stopped(
        tls_broker: Mosquitto, make_system) -> None:
    tls_broker.set_acl(fleet.acl_lines({"dev6": []}, operator="operator"))
    op = Operator(tls_broker)
    try:
        system = make_system(device_config(tls_broker, "dev6", []), sub="dev6")
        await system.wait_ready("security", "modelstore", "fleet", timeout=60)
        at = op.wait_presence("dev6", True, 0, "online once connected")
        # kill -9: no DISCONNECT, the broker publishes the device's will (retained)
        pid = await _pid(system, "fleet")
        os.kill(pid, signal.SIGKILL)
        at = op.wait_presence("dev6", False, at, "offline (the will) after kill -9")
        assert op.presence["dev6"][at - 1].cause == "will"
        await system.wait_restarted("fleet", pid, timeout=60)
        at = op.wait_presence("dev6", True, at, "online again once restarted")
        # a clean stop says offline itself (a clean disconnect fires no will)
        assert system.stop() == 0
        at = op.wait_presence("dev6", False, at, "offline after a clean stop")
        assert op.presence["dev6"][at - 1].cause == "stopped"
        # retained: a reader that comes later reads it
        late = mqtt_client(tls_broker, "operator")
        try:
            got, subscribed = _collect(late, [op.t.presence("dev6")])
            wait_for(lambda: got.get(op.t.presence("dev6")), 30, "the retained presence")
            assert fleet.decode(got[op.t.presence("dev6")], fleet.Presence).online is False
        finally:
            late.loop_stop(); late.disconnect()
    finally:
        op.close()


@pytest.mark.anyio
async def test_a_device_killed_mid_download_with_the_broker_down_converges_when_both_come_back(
        tls_broker: Mosquitto, make_system) -> None:
    tls_broker.set_acl(fleet.acl_lines({"dev2": ["lab"]}, operator="operator"))
    op = Operator(tls_broker)
    config = device_config(tls_broker, "dev2", ["lab"])
    system = make_system(config, sub="dev2")
    await system.wait_ready("security", "modelstore", "fleet", timeout=60)
    op.wait_report("dev2", lambda r: r.groups == ["lab"], "the device's first report")
    data = bundle("1.0.0", KEY)
    chunk = 256
    n = -(-len(data) // chunk)
    info = op.artifact(data, chunk, only=range(0, n // 3))
    op.deploy(op.t.group_desired("lab"), 5, "group:lab",
              [fleet.ArtifactRef(name="demo", version="1.0.0", sha256=info.sha256, size=info.size)])
    state = system.run_dir / "state"
    journal = state / "fleet" / "partial" / f"{info.sha256}.journal"
    wait_for(lambda: journal.exists() and len(journal.read_text().split()) >= n // 3, 60, "a third of the chunks")

    # the whole device dies (kill -9: kernel and services), and the broker goes down
    system.kill()
    op.close()
    tls_broker.stop()
    for stale in (system.run_dir / "bus.sock", system.run_dir / "credentials" / "operator"):
        stale.unlink(missing_ok=True)
    again = System(system.tmp, config)
    try:
        again.wait_bus(30)
        await again.wait_ready("security", "modelstore", "fleet", timeout=60)
        async with again.client() as bus:  # on the old version (none) until the download completes
            assert not [m for m in (await bus.call("modelstore", ListModels(), ModelList)).models if m.name == "demo"]
        tls_broker.start()
        op = Operator(tls_broker)
        for c in fleet.chunks_of(data, chunk):
            if c.index >= n // 3:
                op.publish(op.t.chunk(c.sha256, c.index), fleet.encode(c))
        report = op.wait_report("dev2", lambda r: r.current is not None and r.current.outcome == "succeeded",
                                "the deployment to succeed after the restarts")
        assert _model(report, "demo").active == "1.0.0" and report.applied_version == 5
        audit = await _audit(again)
        assert any(a.startswith(f"fleet-download-resumed demo 1.0.0 {n // 3} of {n} chunks held") for a in audit), audit
    finally:
        op.close()
        again.kill()


@pytest.mark.anyio
async def test_a_config_fragment_is_merged_into_the_config_file_and_applied_by_the_kernels_reload(
        tls_broker: Mosquitto, make_system, tmp_path: Path) -> None:
    tls_broker.set_acl(fleet.acl_lines({"dev3": []}, operator="operator"))
    op = Operator(tls_broker)
    d = tmp_path / "dev3"
    greeter = """
[services.greeter]
command = ["{python}", "-m", "services.examples.greeter"]
[services.greeter.settings]
greeting = "hello, {who}"
tick_interval = 60.0
"""
    config = device_config(tls_broker, "dev3", [], extra=greeter, settings=f'config_file = "{d / "system.toml"}"')
    system = make_system(config, sub="dev3")
    try:
        await system.wait_ready("security", "modelstore", "fleet", "greeter", timeout=60)
        op.wait_report("dev3", lambda r: r.current is None, "the device's first report")
        toml = '[services.greeter.settings]\ngreeting = "fleet says hi, {who}"\n'
        now = time.time()
        doc = fleet.Deployment(fleet="test", version=1, deployment="cfg-1", target="device:dev3", issued=now,
                               expires=now + 600, config=fleet.ConfigFragment(toml=toml, sha256=fleet.config_digest(toml)))
        op.publish(op.t.device_desired("dev3"), fleet.encode(fleet.sign_document(doc, FLEET_RAW)))
        report = op.wait_report("dev3", lambda r: r.current is not None and r.current.outcome in ("succeeded", "failed"),
                                "the config deployment to end")
        assert report.current.outcome == "succeeded", report.current
        assert report.config_digest == fleet.config_digest(toml)
        async with system.client() as bus:
            with anyio.fail_after(60):
                while True:  # the kernel restarts the greeter with its new settings
                    try:
                        reply = await bus.call("greeter", Greet(who="dev3"), Greeting, timeout=5)
                        if reply.text == "fleet says hi, dev3":
                            break
                    except BusError:
                        pass
                    await anyio.sleep(0.2)
        text = system.config_path.read_text()
        assert text.startswith("# Written by the edgebus fleet service") and 'tick_interval = 60.0' in text
        assert (system.run_dir / "state" / "fleet" / "config.base.toml").read_text() == config
        assert any(a.startswith("fleet-config-applied") for a in await _audit(system))
        assert system.stop() == 0  # SIGTERM: the fleet service leaves its MQTT session cleanly
        assert '"fleet_disconnected"' not in system.log() and "Traceback" not in system.log()
    finally:
        op.close()


# -- the agent's core, driven in process (the simulation's way: MemoryStorage) ----------------


class Harness:
    """Retained topics in a dict, a model store in a dict: runs an agent's actions until
    nothing is left to do, and counts what it asked for."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.retained: dict[str, bytes] = {}
        self.store: dict[str, fleet.ModelReport] = {}
        self.subscribed: list[str] = []
        self.published: dict[str, bytes] = {}
        self.audit: list[Audit] = []
        self.refuse_install = ""

    def run(self, *events, limit: int = 10_000) -> None:
        queue = list(events)
        while queue and limit:
            limit -= 1
            for action in self.agent.handle(queue.pop(0)):
                match action:
                    case Subscribe(topics=topics):
                        self.subscribed += topics
                        queue += [Received(t, self.retained[t]) for t in topics if t in self.retained]
                    case Publish(topic=topic, payload=payload):
                        self.published[topic] = payload
                    case Install(ref=ref):
                        if not self.refuse_install:
                            m = self.store.setdefault(ref.name, fleet.ModelReport(name=ref.name))
                            m.versions.append(ref.version)
                        queue += [Models(list(self.store.values())), Done(action, not self.refuse_install,
                                                                          self.refuse_install)]
                    case AgentActivate(name=name, version=version):
                        m = self.store[name]
                        m.trial = version if m.active else ""
                        m.previous, m.active = m.active or m.previous, version
                        queue += [Models(list(self.store.values())), Done(action, True)]
                    case AgentRollback(name=name):
                        m = self.store[name]
                        m.active, m.previous, m.trial = m.previous, "", ""
                        queue += [Models(list(self.store.values())), Done(action, True)]
                    case Audit():
                        self.audit.append(action)

    def report(self) -> fleet.ReportedState:
        return fleet.decode(self.published[self.agent.topics.reported(self.agent.device)], fleet.ReportedState)


def _signed(version: int, target: str, bundles=(), key: bytes = FLEET_RAW, expires_in: float = 600) -> bytes:
    now = time.time()
    return fleet.encode(fleet.sign_document(fleet.Deployment(
        fleet="test", version=version, deployment=f"d{version}", target=target, issued=now, expires=now + expires_in,
        bundles=list(bundles)), key))


def _agent(storage=None, **kw) -> Agent:
    return Agent("dev9", ["a", "b"], storage or MemoryStorage(), trusted={fleet.key_id(FLEET_PUB): FLEET_PUB}, **kw)


def _publish_artifact(h: Harness, data: bytes, chunk_size: int) -> fleet.ArtifactRef:
    info = fleet.artifact_info(data, chunk_size)
    h.retained[h.agent.topics.info(info.sha256)] = fleet.encode(info)
    for c in fleet.chunks_of(data, chunk_size):
        h.retained[h.agent.topics.chunk(c.sha256, c.index)] = fleet.encode(c)
    return fleet.ArtifactRef(name="m", version="1.0.0", sha256=info.sha256, size=info.size)


def test_the_agent_applies_the_highest_version_of_its_device_and_group_topics() -> None:
    h = Harness(_agent())
    t = h.agent.topics
    h.retained[t.group_desired("a")] = _signed(7, "group:a")
    h.retained[t.group_desired("b")] = _signed(9, "group:b")
    h.retained[t.device_desired("dev9")] = _signed(8, "device:dev9")
    h.run(Models([]), Connected())
    r = h.report()
    assert r.applied_version == 9 and r.current.deployment == "d9" and r.current.outcome == "succeeded"
    # the order of arrival decides which were refused, never which is applied
    assert r.refused is None or r.refused.reason == "replay"
    h.run(Received(t.group_desired("a"), _signed(10, "group:c")))  # another group's document
    assert h.report().refused.reason == "wrong-target" and h.report().applied_version == 9


def test_a_bundle_the_store_holds_is_not_fetched_and_a_bad_chunk_is_not_kept() -> None:
    h = Harness(_agent(window=2))
    data = os.urandom(10_000)
    ref = _publish_artifact(h, data, 1000)
    h.store["m"] = fleet.ModelReport(name="m", versions=["1.0.0"], active="0.9.0")
    h.retained[h.agent.topics.device_desired("dev9")] = _signed(1, "device:dev9", [ref])
    h.run(Models(list(h.store.values())), Connected())
    assert not [s for s in h.subscribed if "/artifacts/" in s]  # held: activated, nothing fetched
    assert h.report().current.outcome == "trial" and h.store["m"].active == "1.0.0"

    # a new agent, nothing held: a corrupted chunk is dropped, the download waits for a good one
    h = Harness(_agent(window=2))
    ref = _publish_artifact(h, data, 1000)
    bad = fleet.Chunk(sha256=ref.sha256, index=3, data=b"x" * 1000)
    h.retained[h.agent.topics.chunk(ref.sha256, 3)] = fleet.encode(bad)
    h.retained[h.agent.topics.device_desired("dev9")] = _signed(1, "device:dev9", [ref])
    h.run(Models([]), Connected())
    assert h.report().current.outcome == "downloading" and not h.store
    good = next(c for c in fleet.chunks_of(data, 1000) if c.index == 3)
    h.run(Received(h.agent.topics.chunk(ref.sha256, 3), fleet.encode(good)))
    assert h.report().current.outcome == "succeeded" and h.store["m"].active == "1.0.0"
    assert h.agent.storage.blobs == {} and h.agent.storage.partial == {}  # installed: the cache is emptied


def test_an_artifact_over_the_limit_fails_the_deployment_and_a_refused_install_says_why(tmp_path: Path) -> None:
    h = Harness(_agent(DiskStorage(tmp_path / "s", 1 << 16), max_artifact_bytes=1 << 16))
    ref = _publish_artifact(h, os.urandom(70_000), 8192)
    h.retained[h.agent.topics.device_desired("dev9")] = _signed(1, "device:dev9", [ref])
    h.run(Models([]), Connected())
    r = h.report()
    assert r.current.outcome == "failed" and "over the limit of 65536" in r.current.reason
    assert not [s for s in h.subscribed if "/chunks/" in s]

    h = Harness(_agent(DiskStorage(tmp_path / "t", 1 << 20)))
    h.refuse_install = "bad bundle: it is not signed"
    ref = _publish_artifact(h, os.urandom(5000), 1024)
    h.retained[h.agent.topics.device_desired("dev9")] = _signed(1, "device:dev9", [ref])
    h.run(Models([]), Connected())
    r = h.report()
    assert r.current.outcome == "failed" and "the model store refused m 1.0.0: bad bundle: it is not signed" in r.current.reason
    assert [a.kind for a in h.audit][-1] == "fleet-failed"


def test_the_disk_storage_resumes_from_its_journal_and_rechecks_each_chunk(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    info = fleet.artifact_info(data, 1000)
    s = DiskStorage(tmp_path, 1 << 20)
    assert s.begin(info) == set()
    for c in fleet.chunks_of(data, 1000):
        if c.index in (0, 2, 5):
            s.put_chunk(info, c.index, c.data)
    s2 = DiskStorage(tmp_path, 1 << 20)
    assert s2.begin(info) == {0, 2, 5}
    with open(tmp_path / "partial" / f"{info.sha256}.part", "r+b") as f:  # a torn chunk is not trusted
        f.seek(2 * 1000)
        f.write(b"\0" * 10)
    assert DiskStorage(tmp_path, 1 << 20).begin(info) == {0, 5}
    for c in fleet.chunks_of(data, 1000):
        s2.put_chunk(info, c.index, c.data)
    assert s2.finish(info) and s2.read_blob(info.sha256) == data
    assert list((tmp_path / "partial").iterdir()) == []


def test_a_fleet_key_signs_documents_only_and_a_model_key_bundles_only(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trust.json", [("fleet", FLEET_PUB.hex(), "fleet"), ("models", pub_hex(KEY))])
    data = b"manifest"
    fleet_sig = FLEET_KEY.sign(data)
    assert store.verify(data, fleet_sig) is None  # as a bundle's signer: not trusted
    assert store.verify(data, fleet_sig, role="fleet").label == "fleet"
    assert store.verify(data, KEY.sign(data), role="fleet") is None
    assert store.verify(data, KEY.sign(data)).label == "models"
    with pytest.raises(ValueError, match="one role"):
        store.add(FLEET_PUB.hex(), "again", role="model")


def test_the_report_carries_each_models_serving_health() -> None:
    h = Harness(_agent())
    h.store["m"] = fleet.ModelReport(name="m", versions=["1.0.0"], active="1.0.0")
    h.run(Models(list(h.store.values())), Connected())
    h.run(Serving([fleet.ModelReport(name="m", requests=120, errors=3, p95_ms=8.5, drift="warn")]))
    m = h.report().models[0]
    assert (m.name, m.active, m.requests, m.errors, m.p95_ms, m.drift) == ("m", "1.0.0", 120, 3, 8.5, "warn")


class RangeServer:
    """One blob over HTTP with byte ranges (206), in a thread of the test; counts the ranges
    served.  ``fail`` makes it answer 500 from then on."""

    def __init__(self, data: bytes) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                rng = self.headers.get("Range", "")
                if server.fail or not rng.startswith("bytes="):
                    self.send_error(500 if server.fail else 416)
                    return
                first, last = (int(x) for x in rng[6:].split("-"))
                body = data[first:last + 1]
                server.ranges.append((first, last))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.ranges: list[tuple[int, int]] = []
        self.fail = False
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/demo-1.0.0.ebm"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.mark.anyio
async def test_a_bundle_with_a_url_is_fetched_by_range_requests_and_from_the_broker_when_the_url_fails(
        tls_broker: Mosquitto, make_system) -> None:
    tls_broker.set_acl(fleet.acl_lines({"dev4": []}, operator="operator"))
    op = Operator(tls_broker)
    data = bundle("1.0.0", KEY)
    chunk = 256
    server = RangeServer(data)
    try:
        system = make_system(device_config(tls_broker, "dev4", []), sub="dev4")
        await system.wait_ready("security", "modelstore", "fleet", timeout=60)
        op.wait_report("dev4", lambda r: r.current is None, "the device's first report")
        info = op.artifact(data, chunk, only=range(0))  # the info on the broker, no chunk
        ref = fleet.ArtifactRef(name="demo", version="1.0.0", sha256=info.sha256, size=info.size, url=server.url)
        op.deploy(op.t.device_desired("dev4"), 1, "device:dev4", [ref])
        report = op.wait_report("dev4", lambda r: r.current is not None and r.current.outcome == "succeeded",
                                "the bundle fetched by URL")
        assert _model(report, "demo").active == "1.0.0"
        assert sorted(server.ranges) == [(i * chunk, min(len(data), (i + 1) * chunk) - 1)
                                         for i in range(len(info.chunks))]

        # the URL fails: the device takes the chunks from the broker
        server.fail = True
        v2 = bundle("1.1.0", KEY)
        info2 = op.artifact(v2, chunk)
        ref2 = fleet.ArtifactRef(name="demo", version="1.1.0", sha256=info2.sha256, size=info2.size, url=server.url)
        op.deploy(op.t.device_desired("dev4"), 2, "device:dev4", [ref2])
        report = op.wait_report("dev4", lambda r: r.current is not None and r.current.version == 2
                                and r.current.outcome == "trial", "the second bundle from the broker")
        assert _model(report, "demo").active == "1.1.0"
        assert any(a.startswith("fleet-http-failed demo 1.1.0") for a in await _audit(system))
    finally:
        server.close()
        op.close()


@pytest.mark.anyio
async def test_a_trial_the_model_store_rolls_back_is_reported_rolled_back(tls_broker: Mosquitto, make_system) -> None:
    tls_broker.set_acl(fleet.acl_lines({"dev5": ["canary"]}, operator="operator"))
    op = Operator(tls_broker)
    try:  # no traffic: the trial stays undecided and is rolled back at trial_max_s
        system = make_system(device_config(tls_broker, "dev5", ["canary"],
                                           store="trial_window_s = 0.5, trial_max_s = 3.0"), sub="dev5")
        await system.wait_ready("security", "modelstore", "fleet", timeout=60)
        op.wait_report("dev5", lambda r: r.current is None, "the device's first report")
        refs = []
        for version in ("1.0.0", "1.1.0"):
            info = op.artifact(bundle(version, KEY), 4096)
            refs.append(fleet.ArtifactRef(name="demo", version=version, sha256=info.sha256, size=info.size))
        op.deploy(op.t.group_desired("canary"), 1, "group:canary", refs[:1])
        op.wait_report("dev5", lambda r: r.current is not None and r.current.outcome == "succeeded", "1.0.0 active")
        op.deploy(op.t.group_desired("canary"), 2, "group:canary", refs[1:])
        report = op.wait_report("dev5", lambda r: r.current.version == 2 and r.current.outcome == "rolled-back",
                                "the trial rolled back")
        assert _model(report, "demo").active == "1.0.0" and "1.1.0 is no longer active" in report.current.reason
        assert any(a.startswith("fleet-rolled-back dep-2 v2") for a in await _audit(system))
    finally:
        op.close()


@pytest.mark.anyio
async def test_unusable_tls_files_are_said_once_and_the_service_stays_up(tls_broker: Mosquitto, make_system,
                                                                       tmp_path: Path) -> None:
    config = device_config(tls_broker, "dev6", []).replace(str(tls_broker.pki.ca), str(tmp_path / "missing-ca.pem"))
    system = make_system(config, sub="dev6")
    await system.wait_ready("security", "modelstore", "fleet", timeout=60)
    wait_for(lambda: '"fleet_tls_invalid"' in system.log(), 30, "the TLS files refused")
    line = next(x for x in system.log().splitlines() if '"fleet_tls_invalid"' in x)
    assert "missing-ca.pem" in line and "fix them" in line and "Traceback" not in system.log()
    assert (await system.services())["fleet"].restarts == 0


@pytest.mark.anyio
async def test_without_a_broker_the_fleet_service_is_idle(make_system) -> None:
    text = device_config_without_broker()
    system = make_system(text, sub="idle")
    await system.wait_ready("security", "modelstore", "fleet", timeout=60)
    wait_for(lambda: '"fleet_off"' in system.log(), 30, "the fleet service to say it is off")
    assert not (system.run_dir / "state" / "fleet").exists()
    assert re.search(r"fleet_(connected|disconnected|tls_invalid)", system.log()) is None


def device_config_without_broker() -> str:
    """The default config's fleet section as it ships (no broker), with what it requires."""
    text = default_config_text()
    keep = ("[services.security]", "[services.security.settings]", "[[services.security.settings.trusted_keys]]",
            "[services.modelstore]", "[services.modelstore.settings]", "[services.fleet]",
            "[services.fleet.settings]")
    out, on = [], True
    for line in text.splitlines():
        if line.startswith("["):
            on = line.strip() in keep or not line.startswith("[services")
        if on:
            out.append(line)
    return "\n".join(out).replace("preload_demo = true", "preload_demo = false")
