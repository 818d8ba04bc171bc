"""The operator's side of the fleet (tools._fleet*): the rollout's pure decisions on tables of
cases, the controller's SQLite state, and the ``edgebus fleet`` commands that need no broker.
The controller against a real broker and devices: tests/test_fleet_rollout.py."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest

from protocols.fleet import DeploymentStatus, ModelReport, ReportedState
from tools._fleet_controller import view_of
from tools._fleet_rollout import (
    DeviceView,
    Gate,
    Policy,
    PolicyError,
    check_device,
    decide,
    parse_canary,
    parse_gate,
    plan_waves,
)
from tools._fleet_state import State

from conftest import BIN

# -- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "gate"), [
    ("error_rate<=0.02", Gate("error_rate", 0.02)),
    ("p95_ms <= 50", Gate("p95_ms", 50.0)),
    ("drift<=0.5", Gate("drift", 0.5)),
    ("drift<=warn", Gate("drift", 1.0)),
    ("trial=committed", Gate("trial")),
])
def test_gates_parse(text: str, gate: Gate) -> None:
    assert parse_gate(text) == gate


@pytest.mark.parametrize("text", ["error_rate<0.02", "p95<=5", "trial=yes", "drift<=bad", "error_rate<=-1", ""])
def test_bad_gates_say_what_is_accepted(text: str) -> None:
    with pytest.raises(PolicyError, match="error_rate<=X"):
        parse_gate(text)


@pytest.mark.parametrize(("text", "parsed"), [("1", (1, 0.0)), ("12", (12, 0.0)), ("10%", (0, 10.0)),
                                              ("100%", (0, 100.0))])
def test_canary_is_a_count_or_a_share(text: str, parsed: tuple[int, float]) -> None:
    assert parse_canary(text) == parsed


@pytest.mark.parametrize("text", ["0", "-1", "0%", "150%", "x", "1.5"])
def test_bad_canaries_are_refused(text: str) -> None:
    with pytest.raises(PolicyError, match="--canary"):
        parse_canary(text)


def test_a_policy_checks_its_numbers() -> None:
    for bad in ({"waves": 0}, {"soak_s": -1.0}, {"quorum": 0.0}, {"quorum": 1.5}, {"wave_timeout_s": 0.0}):
        with pytest.raises(PolicyError):
            Policy(**bad)


# -- waves --------------------------------------------------------------------------------------

DEVICES = [f"dev{i:03d}" for i in range(10)]


@pytest.mark.parametrize(("policy", "sizes"), [
    (Policy(canary_count=1, waves=3), [1, 5, 4]),
    (Policy(canary_count=2, waves=2), [2, 8]),
    (Policy(canary_pct=10, waves=3), [1, 5, 4]),
    (Policy(canary_pct=25, waves=4), [3, 3, 2, 2]),  # 25% of 10 rounds up
    (Policy(canary_count=1, waves=1), [1]),  # the rest get the group's document at the end
    (Policy(canary_count=20, waves=3), [10]),  # a canary as large as the group
    (Policy(canary_count=1, waves=20), [1] * 10),  # no empty waves
])
def test_waves_split_the_group_canary_first(policy: Policy, sizes: list[int]) -> None:
    waves = plan_waves(DEVICES, policy, salt="7")
    assert [len(w) for w in waves] == sizes
    flat = [d for w in waves for d in w]
    assert len(flat) == len(set(flat)) and set(flat) <= set(DEVICES)


def test_waves_are_deterministic_and_another_deployment_picks_other_canaries() -> None:
    p = Policy(canary_count=1, waves=3)
    assert plan_waves(DEVICES, p, "1") == plan_waves(list(reversed(DEVICES)), p, "1")
    canaries = {plan_waves(DEVICES, p, str(i))[0][0] for i in range(20)}
    assert len(canaries) > 3
    assert plan_waves([], p, "1") == []


# -- one device against the gates -------------------------------------------------------------

GATES = (Gate("error_rate", 0.05), Gate("p95_ms", 100.0), Gate("drift", 1.0))


def v(outcome: str, version: int = 10, **kw) -> DeviceView:
    return DeviceView("d", version=version, outcome=outcome, **kw)


@pytest.mark.parametrize(("view", "gates", "state", "reason"), [
    (None, GATES, "pending", "no report"),
    (v("succeeded", version=9), GATES, "pending", "has not acted on document v10"),
    (v("succeeded", version=9, online=False), GATES, "pending", "(offline)"),
    (v("downloading", online=False, offline_since=time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))), GATES, "pending",
     "downloading (offline since 03:04:05)"),
    (v("succeeded", version=11), GATES, "superseded", "newer document v11"),
    (v("downloading"), GATES, "pending", "downloading"),
    (v("installing"), GATES, "pending", "installing"),
    (v("trial"), GATES, "passed", "trial"),
    (v("trial"), (Gate("trial"),), "pending", "trial running"),
    (v("succeeded"), (Gate("trial"),), "passed", "succeeded"),
    (v("succeeded", error_rate=0.01, p95_ms=20.0, drift=0.0), GATES, "passed", "succeeded"),
    (v("succeeded"), GATES, "passed", "succeeded"),  # no traffic, no drift known: nothing exceeds
    (v("succeeded", error_rate=0.2), GATES, "failed", "error_rate 0.2 > 0.05"),
    (v("trial", p95_ms=250.0), GATES, "failed", "p95_ms 250 > 100"),
    (v("succeeded", drift=2.0), GATES, "failed", "drift 2 > 1"),
    (v("rolled-back", reason="m 1.1.0 is no longer active"), (), "failed", "rolled-back: m 1.1.0"),
    (v("failed", reason="the model store refused it"), (), "failed", "failed: the model store refused"),
    (v("refused", reason="expired"), (), "failed", "refused: expired"),
])
def test_a_device_against_the_gates(view, gates, state, reason) -> None:
    check = check_device(view, 10, gates, "d")
    assert check.state == state and reason in check.reason, check


# -- what a rollout does next -------------------------------------------------------------------

WAVES = [["a"], ["b", "c"], ["d", "e"]]
P = Policy(canary_count=1, waves=3, soak_s=30, gates=(Gate("error_rate", 0.05),), quorum=1.0, wave_timeout_s=600)
OK = "succeeded"


def views(**outcomes: str | tuple[str, float]) -> dict[str, DeviceView]:
    out = {}
    for device, o in outcomes.items():
        outcome, err = (o, None) if isinstance(o, str) else o
        out[device] = DeviceView(device, version=10, outcome=outcome, error_rate=err)
    return out


@pytest.mark.parametrize(("policy", "current", "started", "touched", "seen", "now", "action", "reason"), [
    # not started: the canary goes
    (P, -1, 0.0, {}, {}, 0.0, "advance", "starting the canary"),
    # the canary has not reported
    (P, 0, 0.0, {"a": 10}, {}, 5.0, "wait", "0 of 1 devices passed, 1 needed; waiting for a"),
    (P, 0, 0.0, {"a": 10}, views(a="downloading"), 5.0, "wait", "waiting for a"),
    # passed but soaking
    (P, 0, 0.0, {"a": 10}, views(a=OK), 10.0, "wait", "canary: soaking, 10 of 30 s"),
    # passed and soaked: wave 2
    (P, 0, 0.0, {"a": 10}, views(a=OK), 30.0, "advance", "canary holds (1 of 1 passed)"),
    # a gate fails: halt, whatever the soak
    (P, 0, 0.0, {"a": 10}, views(a=(OK, 0.5)), 1.0, "halt", "a: error_rate 0.5 > 0.05"),
    (P, 0, 0.0, {"a": 10}, views(a="rolled-back"), 1.0, "halt", "a: rolled-back"),
    # a device of an earlier wave failing later halts too
    (P, 1, 100.0, {"a": 10, "b": 10, "c": 10}, views(a=(OK, 0.5), b=OK, c=OK), 200.0, "halt", "a: error_rate"),
    # wave 2 waits for both; with quorum 2/3 one pending device does not block
    (P, 1, 100.0, {"a": 10, "b": 10, "c": 10}, views(a=OK, b=OK), 200.0, "wait", "2 of 3 devices passed, 3 needed"),
    (Policy(soak_s=30, quorum=0.66), 1, 100.0, {"a": 10, "b": 10, "c": 10}, views(a=OK, b=OK), 200.0,
     "advance", "wave 2 holds (2 of 3 passed)"),
    # the last wave holds: the group's document
    (P, 2, 100.0, dict.fromkeys("abcde", 10), views(a=OK, b=OK, c=OK, d=OK, e=OK), 130.0, "finish",
     "wave 3 holds (5 of 5 passed): the group's document is published"),
    # a wave that does not reach its quorum in time stalls (no rollback: nothing failed)
    (P, 1, 100.0, {"a": 10, "b": 10, "c": 10}, views(a=OK, b=OK), 700.0, "stall", "2 of 3 devices passed after 600 s"),
    # a device another document reached is counted neither way
    (P, 0, 0.0, {"a": 10}, {"a": DeviceView("a", version=12, outcome="failed")}, 40.0, "advance",
     "canary holds (0 of 0 passed)"),
])
def test_what_a_rollout_does_next(policy, current, started, touched, seen, now, action, reason) -> None:
    d = decide(policy, WAVES, current, started, touched, seen, now)
    assert d.action == action and reason in d.reason, d
    if action == "advance" and current >= 0:
        assert d.wave == current + 1


def test_an_empty_group_finishes_at_once() -> None:
    assert decide(P, [], -1, 0.0, {}, {}, 0.0).action == "finish"


def test_a_single_wave_rollout_finishes_after_the_canary() -> None:
    d = decide(Policy(waves=1, soak_s=0), [["a"]], 0, 0.0, {"a": 10}, views(a=OK), 1.0)
    assert d.action == "finish"


# -- a device's report, as the rules see it ---------------------------------------------------------


def report(current: DeploymentStatus | None = None, refused: DeploymentStatus | None = None,
           models: list[ModelReport] | None = None, applied: int = 0, online: bool = True) -> ReportedState:
    return ReportedState(device="d", seq=1, time=1.0, current=current, refused=refused, models=models or [],
                         applied_version=applied, online=online)


def test_a_report_becomes_a_view() -> None:
    assert view_of("d", None).online is False
    assert view_of("d", report(applied=4)).version == 4
    cur = DeploymentStatus(deployment="3", version=10, outcome="trial", detail="in trial: m 1.1.0")
    view = view_of("d", report(current=cur))
    assert (view.version, view.outcome, view.reason) == (10, "trial", "in trial: m 1.1.0")
    # a refused document newer than the current one is what the device did with it
    refused = DeploymentStatus(deployment="4", version=12, outcome="refused", reason="expired", detail="expired at 5")
    view = view_of("d", report(current=cur, refused=refused))
    assert (view.version, view.outcome, view.reason) == (12, "refused", "expired: expired at 5")
    # an older refusal (a replay) does not hide the current deployment
    old = DeploymentStatus(deployment="1", version=3, outcome="refused", reason="replay")
    assert view_of("d", report(current=cur, refused=old)).outcome == "trial"


def test_health_is_read_from_the_deployed_models() -> None:
    models = [ModelReport(name="m", active="1.1.0", requests=200, errors=10, p95_ms=12.0, drift="warn"),
              ModelReport(name="other", active="2.0.0", requests=100, errors=100, p95_ms=900.0, drift="alert")]
    view = view_of("d", report(models=models), ["m"])
    assert (view.error_rate, view.p95_ms, view.drift) == (0.05, 12.0, 1.0)
    every = view_of("d", report(models=models))  # a config-only deployment: every model counts
    assert (every.error_rate, every.p95_ms, every.drift) == (110 / 300, 900.0, 2.0)
    idle = view_of("d", report(models=[ModelReport(name="m", active="1.1.0")]), ["m"])
    assert (idle.error_rate, idle.p95_ms, idle.drift) == (None, None, None)


# -- the state --------------------------------------------------------------------------------------


def test_versions_only_increase_and_start_above_the_clock(tmp_path) -> None:
    import time

    s = State(tmp_path / "f.sqlite")
    first = s.next_version()
    assert first >= int(time.time() * 1000) - 1000
    more = [s.next_version() for _ in range(50)]
    assert more == sorted(set(more)) and more[0] > first
    s.close()
    again = State(tmp_path / "f.sqlite")  # reopened: still above
    assert again.next_version() > more[-1]
    assert (tmp_path / "f.sqlite").stat().st_mode & 0o077 == 0  # not readable by others


def test_a_failed_transaction_leaves_nothing(tmp_path) -> None:
    s = State(tmp_path / "f.sqlite")
    s.create_group("g", 1.0)
    with pytest.raises(RuntimeError):
        with s.transaction():
            s.add_members("g", ["a", "b"])
            s.record_document("t", s.next_version(), None, b"x", 1.0)
            raise RuntimeError("midway")
    assert s.groups() == {"g": []} and s.documents() == {}


def test_deployments_waves_and_progress_round_trip(tmp_path) -> None:
    s = State(tmp_path / "f.sqlite")
    policy = Policy(canary_pct=10, waves=2, gates=(Gate("trial"),))
    dep = s.create_deployment("g", "ab" * 32, "", policy, None, "", 1.0)
    s.set_plan(dep, [["a"], ["b", "c"]], 1.0)
    s.set_progress(dep, "a", 2.0, state="sent", version=10, wave=0)
    d = s.deployment(dep)
    assert d is not None and d.policy == policy and d.waves == [["a"], ["b", "c"]] and d.state == "running"
    assert [(p.device, p.wave, p.version, p.state) for p in s.progress(dep)] == [
        ("a", 0, 10, "sent"), ("b", 1, 0, "planned"), ("c", 1, 0, "planned")]
    s.update_deployment(dep, 3.0, state="halted", reason="why")
    assert s.deployments(("running",)) == [] and s.deployment(dep).reason == "why"


def test_a_state_of_schema_1_is_migrated_to_keep_presence(tmp_path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                     "INSERT INTO meta VALUES ('schema', '1');"
                     "CREATE TABLE devices (id TEXT PRIMARY KEY, pubkey TEXT NOT NULL DEFAULT '', enrolled_at REAL, "
                     "last_seen REAL, enrol BLOB, reported BLOB, reported_at REAL);"
                     "INSERT INTO devices (id, pubkey) VALUES ('a', 'k');")
    db.commit()
    db.close()
    s = State(path)
    assert s.meta("schema") == "2" and s.device("a").presence is None
    offline = fleet.presence("a", False, "will", now=5.0)
    s.saw_presence("a", offline, 10.0)
    s.saw_presence("a", offline, 20.0)  # the same message read again keeps its time
    row = s.device("a")
    assert (row.pubkey, row.presence, row.presence_at) == ("k", offline, 10.0)
    s.close()
    assert State(path).meta("schema") == "2"
    with pytest.raises(fleet.FleetError, match="over the limit"):
        fleet.decode(b"x" * (fleet.MAX_PRESENCE + 1), fleet.Presence)


def test_a_file_that_is_not_a_state_is_one_line_and_exit_5(tmp_path) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not sqlite at all" * 100)
    r = subprocess.run([str(BIN / "edgebus"), "fleet", "--state", str(bad), "groups"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 5 and r.stderr.count("\n") == 1 and "is not a fleet state file" in r.stderr, r.stderr


# -- the commands that need no broker ---------------------------------------------------------------


def fleet_cli(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "edgebus"), "fleet", "--state", str(tmp_path / "f.sqlite"), *args],
                          capture_output=True, text=True, timeout=60)


def test_keygen_groups_and_acl(tmp_path) -> None:
    r = fleet_cli(tmp_path, "keygen", "--fleet", "shops")
    assert r.returncode == 0 and len(r.stdout.strip()) == 64, r.stderr
    assert (tmp_path / "f.signing-key").stat().st_mode & 0o777 == 0o600
    again = fleet_cli(tmp_path, "keygen")
    assert again.returncode == 2 and "--force" in again.stderr
    assert fleet_cli(tmp_path, "groups", "create", "north").returncode == 0
    assert fleet_cli(tmp_path, "groups", "add", "north", "cam-1", "cam-2", "-q").returncode == 0
    assert fleet_cli(tmp_path, "groups", "add", "south", "cam-3").returncode == 4
    bad = fleet_cli(tmp_path, "groups", "add", "north", "a/b")
    assert bad.returncode == 2 and "device id 'a/b'" in bad.stderr
    listed = fleet_cli(tmp_path, "-o", "json", "groups")
    assert listed.stdout.strip() == '[{"group":"north","devices":["cam-1","cam-2"]}]'
    acl = fleet_cli(tmp_path, "acl", "--operator", "ops").stdout.splitlines()
    assert "user ops" in acl and "user cam-2" in acl
    assert acl[acl.index("user cam-1") + 1] == "topic read edgebus/fleet/groups/north/desired"


def test_usage_errors_are_one_line(tmp_path) -> None:
    fleet_cli(tmp_path, "groups", "create", "g")
    for args, code, words in [
        (("deploy", "--group", "g", "--canary", "0", "--artifact", "x"), 2, "--canary '0'"),
        (("deploy", "--group", "g", "--gate", "speed<=1", "--artifact", "x"), 2, "gate 'speed<=1'"),
        (("deploy", "--group", "g"), 2, "deploy what?"),
        (("deploy", "--group", "g", "--artifact", "x", "--broker", "127.0.0.1:1"), 2, "no fleet signing key"),
        (("status", "--cached", "42"), 4, "no deployment 42"),
        (("halt", "42"), 4, "no deployment 42"),
        (("devices", "--broker", "nowhere:x"), 3, "give HOST:PORT"),
    ]:
        r = fleet_cli(tmp_path, *args)
        assert r.returncode == code and words in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)


def test_a_closed_pipe_is_quiet(tmp_path) -> None:
    fleet_cli(tmp_path, "groups", "create", "g")
    fleet_cli(tmp_path, "groups", "add", "g", "-q", *(f"device-{i:05d}" for i in range(3000)))
    r = subprocess.run(f"{BIN / 'edgebus'} fleet --state {tmp_path / 'f.sqlite'} acl | head -c 10 >/dev/null",
                       shell=True, capture_output=True, text=True, timeout=60)
    assert r.stderr == ""


# -- the controller against a real mosquitto, with simulated devices (the real agent core) ------------

import queue  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402

from protocols import fleet  # noqa: E402
from protocols.fleet import Topics  # noqa: E402
from tools._fleet_broker import BrokerOptions, Link  # noqa: E402
from tools._fleet_controller import Controller  # noqa: E402
from tools._fleet_sim import Fleet, SimStore  # noqa: E402

from conftest import wait_for  # noqa: E402
from helpers.mosquitto import Mosquitto, plain_broker  # noqa: E402,F401  (a fixture)

SIGNING = Ed25519PrivateKey.generate()
SIGNING_PUB = SIGNING.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class Sim:
    """Simulated devices stepped in a thread of their own; ``call`` runs a function there."""

    def __init__(self, broker: Mosquitto) -> None:
        self.fleet = Fleet(broker.host, broker.port)
        self.calls: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._loop)
        self.thread.start()

    def _loop(self) -> None:
        try:
            while not self.stopping.is_set():
                self.fleet.step(0.02)
                while not self.calls.empty():
                    fn, done, out = self.calls.get()
                    out.append(fn())
                    done.set()
        except BaseException as exc:  # reported by call/close in the test's thread
            self.failure = exc

    def call(self, fn):
        done, out = threading.Event(), []
        self.calls.put((fn, done, out))
        assert done.wait(30), f"the simulation did not run the call: {self.failure!r}"
        return out[0]

    def add(self, device: str, groups: list[str], *, failing: tuple[str, ...] = (), online: bool = True) -> None:
        def make() -> None:
            d = self.fleet.add(device, groups, SimStore({"m": "1.0.0"}, trial_s=0.2, failing=failing),
                               trusted={fleet.key_id(SIGNING_PUB): SIGNING_PUB}, public_key="00" * 32)
            if online:
                self.fleet.connect(d)
        self.call(make)

    def online(self, device: str, up: bool) -> None:
        d = self.fleet.devices[device]
        self.call(lambda: self.fleet.connect(d) if up else self.fleet.disconnect(d))

    def drop(self, device: str) -> None:
        d = self.fleet.devices[device]
        self.call(lambda: self.fleet.drop(d))

    def models(self, device: str) -> tuple[str, list[str]]:
        return self.call(lambda: (self.fleet.devices[device].store.models["m"].active,
                                  sorted(self.fleet.devices[device].store.models["m"].versions)))

    def close(self) -> None:
        try:
            self.call(lambda: (self.fleet.close(), self.stopping.set()))
        finally:
            self.stopping.set()
            self.thread.join(30)
        assert self.failure is None, self.failure


@pytest.fixture
def sim(plain_broker: Mosquitto):
    s = Sim(plain_broker)
    yield s
    s.close()


def controller(tmp_path, broker: Mosquitto, clock=time.time) -> Controller:
    link = Link(BrokerOptions(host=broker.host, port=broker.port)).connect()
    return Controller(State(tmp_path / "fleet.sqlite"), link, Topics(), private_key=SIGNING.private_bytes_raw(),
                      fleet_id="test", clock=clock)


def enrolled(c: Controller, devices: list[str]) -> None:
    wait_for(lambda: c.refresh(quiet=0.2) >= 0 and set(devices) <= set(c.reports), 30, "the devices' reports")


def test_offline_devices_do_not_block_a_quorum_and_converge_when_they_reconnect(tmp_path, plain_broker, sim) -> None:
    devices = [f"d{i}" for i in range(10)]
    for d in devices:
        sim.add(d, ["g"])
    c = controller(tmp_path, plain_broker)
    try:
        enrolled(c, devices)
        c.state.create_group("g", 0.0)
        c.state.add_members("g", devices)
        sha, sent = c.push(b"x" * 200_000, "m@2.0.0", chunk_size=16384)
        assert sent and c.push(b"x" * 200_000, "m@2.0.0") == (sha, False)  # once per content hash
        dep = c.create("g", sha, "", Policy(canary_pct=30, waves=2, soak_s=0.2, gates=(Gate("trial"),), quorum=0.6))
        plan = c.state.deployment(dep).waves
        away = [plan[0][0], plan[1][0]]  # one device of each wave is offline throughout
        for d in away:
            sim.online(d, False)
        c.run(tick=0.1, until=lambda: c.state.deployment(dep).state != "running",
              stop=lambda: time.time() - c.state.deployment(dep).created_at > 60)
        d = c.state.deployment(dep)
        assert d.state == "complete", d.reason
        status = {p.device: p.state for p in c.state.progress(dep)}
        # the quorum (60%) let it complete: an online device slower than that (a loaded
        # machine) may still be on its way (sent, downloading, installing, trial, pending),
        # none failed or went back; all converge below
        online = [x for x in devices if x not in away]
        assert not [x for x in online if status[x] in ("failed", "refused", "rolled-back", "rolling-back")], status
        assert sum(status[x] == "succeeded" for x in online) >= 0.6 * len(devices), status
        assert [sim.models(x) for x in away] == [("1.0.0", ["1.0.0"])] * 2
        for x in away:
            sim.online(x, True)
        wait_for(lambda: all(sim.models(x) == ("2.0.0", ["1.0.0", "2.0.0"]) for x in devices), 30,
                 "the offline devices to converge on reconnecting")
        # the wave documents were cleared: the broker holds the group's document only
        held = c.link.retained([f"{c.topics.prefix}/devices/+/desired", f"{c.topics.prefix}/groups/+/desired"])
        assert list(held) == [c.topics.group_desired("g")]
    finally:
        c.link.close()


def test_a_later_wave_failing_rolls_every_touched_device_back_to_what_it_ran(tmp_path, plain_broker, sim) -> None:
    devices = [f"d{i}" for i in range(4)]
    plan = plan_waves(devices, Policy(canary_count=1, waves=2), salt="1")  # deployment 1's waves
    bad = plan[1][0]
    for d in devices:
        sim.add(d, ["g"], failing=("m@2.0.0",) if d == bad else ())
    c = controller(tmp_path, plain_broker)
    try:
        enrolled(c, devices)
        c.state.create_group("g", 0.0)
        c.state.add_members("g", devices)
        sha, _ = c.push(b"y" * 50_000, "m@2.0.0")
        dep = c.create("g", sha, "", Policy(canary_count=1, waves=2, soak_s=0.2, gates=(Gate("trial"),)))
        assert dep == 1 and c.state.deployment(dep).waves == plan
        c.run(tick=0.1, until=lambda: c.state.deployment(dep).state != "running",
              stop=lambda: time.time() - c.state.deployment(dep).created_at > 60)
        d = c.state.deployment(dep)
        assert d.state == "rolled_back" and f"{bad}: rolled-back" in d.reason, d.reason
        # every touched device gets a document naming 1.0.0, the version it ran (it was never
        # pushed from this state: the device holds it and fetches nothing)
        touched = c.touched(d)
        assert sorted(touched) == sorted(plan[0] + plan[1])

        def settled() -> bool:
            c.refresh(quiet=0.2)
            return all(c.reports[x].current.version == touched[x] and c.reports[x].current.outcome == "succeeded"
                       for x in touched)

        wait_for(settled, 30, "every touched device to apply its rollback document")
        assert all(sim.models(x)[0] == "1.0.0" for x in devices)
        assert sim.models(plan[0][0]) == ("1.0.0", ["1.0.0", "2.0.0"])  # the canary had committed 2.0.0
    finally:
        c.link.close()


def test_a_broker_that_lost_its_retained_messages_is_given_them_again(tmp_path, plain_broker, sim) -> None:
    sim.add("d0", ["g"])
    c = controller(tmp_path, plain_broker)
    try:
        enrolled(c, ["d0"])
        c.state.create_group("g", 0.0)
        c.state.add_members("g", ["d0"])
        sha, _ = c.push(b"z" * 40_000, "m@2.0.0", chunk_size=8192)
        dep = c.create("g", sha, "", Policy(canary_count=1, waves=1, soak_s=0.0))
        c.run(tick=0.1, until=lambda: c.state.deployment(dep).state != "running")
        c.link.close()
        plain_broker.stop()
        for f in plain_broker.dir.glob("*.db"):
            f.unlink()  # the retained messages are lost
        plain_broker.start()
        c = controller(tmp_path, plain_broker)
        assert c.reconcile(quiet=0.3) == 2  # the group's document and the artifact
        held = c.link.retained([f"{c.topics.prefix}/#"], quiet=0.3)
        assert held[c.topics.group_desired("g")] == c.state.documents()[c.topics.group_desired("g")][2]
        assert sum(1 for t in held if "/chunks/" in t) == 5 and c.topics.info(sha) in held
        assert c.reconcile(quiet=0.3) == 0  # nothing missing any more

        # documents near their expiry are issued again with a higher version
        later = Controller(c.state, c.link, c.topics, private_key=SIGNING.private_bytes_raw(), fleet_id="test",
                           clock=lambda: time.time() + 29 * 86400)
        before = c.state.documents()[c.topics.group_desired("g")][0]
        assert later.renew() == 1 and c.state.documents()[c.topics.group_desired("g")][0] > before
        assert later.renew() == 0
    finally:
        c.link.close()


def test_halt_stops_a_rollout_where_it_is_and_rollback_returns_the_touched_devices(tmp_path, plain_broker, sim) -> None:
    devices = ["d0", "d1", "d2"]
    for d in devices:
        sim.add(d, ["g"])
    c = controller(tmp_path, plain_broker)
    (tmp_path / "fleet.signing-key").write_text(SIGNING.private_bytes_raw().hex() + "\n")
    cli = ["--state", str(tmp_path / "fleet.sqlite"), "--broker", f"{plain_broker.host}:{plain_broker.port}"]
    try:
        enrolled(c, devices)
        c.state.create_group("g", 0.0)
        c.state.add_members("g", devices)
        sha, _ = c.push(b"w" * 30_000, "m@2.0.0")
        dep = c.create("g", sha, "", Policy(canary_count=1, waves=2, soak_s=3600))
        c.step()
        canary = c.state.deployment(dep).waves[0][0]
        wait_for(lambda: sim.models(canary) == ("2.0.0", ["1.0.0", "2.0.0"]), 30, "the canary on 2.0.0")
        r = fleet_cli(tmp_path, *cli, "halt", str(dep), "--reason", "night freeze")
        assert r.returncode == 0, r.stderr
        again = fleet_cli(tmp_path, *cli, "halt", str(dep))
        assert again.returncode == 1 and f"deployment {dep} is halted, not running" in again.stderr
        assert c.step() == [] and c.state.deployment(dep).reason == "night freeze"
        r = fleet_cli(tmp_path, *cli, "rollback", str(dep))
        assert r.returncode == 0, r.stderr
        wait_for(lambda: sim.models(canary) == ("1.0.0", ["1.0.0", "2.0.0"]), 30, "the canary back on 1.0.0")
        others = [d for d in devices if d != canary]
        assert all(sim.models(d) == ("1.0.0", ["1.0.0"]) for d in others)
        assert fleet_cli(tmp_path, *cli, "rollback", str(dep)).returncode == 1

        def rolled_back() -> Any:
            s = json.loads(fleet_cli(tmp_path, *cli, "-o", "json", "status", str(dep)).stdout)
            return s if [x["state"] for x in s["devices"] if x["device"] == canary] == ["rolled-back"] else None

        status = wait_for(rolled_back, 30, "status to show the canary rolled back", interval=0.3)
        assert status["state"] == "rolled_back"
        assert {x["device"]: x["state"] for x in status["devices"] if x["device"] != canary} == dict.fromkeys(
            others, "planned")
    finally:
        c.link.close()


@pytest.mark.parametrize(("reports", "kept"), [
    ([(1, 10.0), (2, 11.0)], (2, 11.0)),
    ([(2, 11.0), (1, 10.0)], (2, 11.0)),  # a stale one delivered late
    ([(5, 50.0), (5, 50.0)], (5, 50.0)),  # the retained one read again
    ([(40, 50.0), (1, 60.0)], (1, 60.0)),  # a device whose state was wiped counts from 1 again, later
])
def test_the_controller_keeps_each_devices_latest_report(tmp_path, reports, kept) -> None:
    c = Controller(State(tmp_path / "f.sqlite"), None, Topics())
    topic = c.topics.reported("d")
    for seq, t in reports:
        c.ingest([(topic, fleet.encode(ReportedState(device="d", seq=seq, time=t)), True)])
    assert (c.reports["d"].seq, c.reports["d"].time) == kept
    # a report on another device's topic, or one that does not decode, is ignored
    c.ingest([(c.topics.reported("e"), fleet.encode(ReportedState(device="d", seq=99, time=99.0)), True),
              (topic, b"\x93garbage", True)])
    assert "e" not in c.reports and c.reports["d"].seq == kept[0]
    assert [d.id for d in c.state.devices()] == ["d"]


def test_a_second_controller_loop_stands_by_and_takes_over_when_the_first_ends(tmp_path, plain_broker) -> None:
    import signal as signals

    from conftest import kill_and_wait

    (tmp_path / "f.signing-key").write_text(SIGNING.private_bytes_raw().hex() + "\n")
    argv = [str(BIN / "edgebus"), "fleet", "--state", str(tmp_path / "f.sqlite"), "--broker",
            f"{plain_broker.host}:{plain_broker.port}", "run", "--tick", "0.2"]
    procs: list[subprocess.Popen[str]] = []
    lines: queue.Queue = queue.Queue()

    def start() -> subprocess.Popen[str]:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        threading.Thread(target=lambda: [lines.put((p.pid, line)) for line in p.stderr], daemon=True).start()
        return p

    def line_from(p: subprocess.Popen[str], words: str) -> str:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                pid, line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if pid == p.pid and words in line:
                return line
        raise AssertionError(f"no line with {words!r} from pid {p.pid}")

    try:
        first = start()
        line_from(first, "controller on")
        second = start()
        line_from(second, "standby: another controller advances the rollouts")
        first.send_signal(signals.SIGTERM)
        assert first.wait(30) == 0
        line_from(second, "controller on")  # took over
        second.send_signal(signals.SIGTERM)
        assert second.wait(30) == 0
    finally:
        kill_and_wait([p.pid for p in procs if p.poll() is None])


def test_devices_show_the_presence_their_wills_and_clean_stops_publish(tmp_path, plain_broker, sim) -> None:
    devices = ["p0", "p1", "p2"]
    for d in devices:
        sim.add(d, ["g"])
    c = controller(tmp_path, plain_broker)
    try:
        enrolled(c, devices)
        wait_for(lambda: c.refresh(quiet=0.2) >= 0 and all(c.presence.get(d, (None,))[0] is not None
                                                            and c.presence[d][0].online for d in devices),
                 30, "every device online")
        sim.online("p0", False)  # a clean stop: the device says offline itself
        sim.drop("p1")  # a lost link: the broker publishes its will
        wait_for(lambda: c.refresh(quiet=0.2) >= 0 and not c.presence["p0"][0].online
                 and not c.presence["p1"][0].online, 30, "p0 and p1 offline")
        assert (c.presence["p0"][0].cause, c.presence["p1"][0].cause, c.presence["p2"][0].online) == \
            ("stopped", "will", True)
        assert view_of("p1", c.reports["p1"], (), c.presence["p1"]).offline_since > 0
        cli = [str(BIN / "edgebus"), "fleet", "--state", str(tmp_path / "fleet.sqlite"),
               "--broker", f"{plain_broker.host}:{plain_broker.port}"]
        r = subprocess.run([*cli, "-o", "json", "devices"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert {x["device"]: x["online"] for x in json.loads(r.stdout)} == {"p0": False, "p1": False, "p2": True}
        # a deployment reaching them: `fleet status` shows the offline ones waiting, and since when
        c.state.create_group("g", 0.0)
        c.state.add_members("g", devices)
        sha, _ = c.push(b"y" * 1000, "m@2.0.0")
        dep = c.create("g", sha, "", Policy(canary_count=3, waves=1, soak_s=0.0))
        c.step()
        r = subprocess.run([*cli, "-o", "json", "status", str(dep)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        rows = {x["device"]: x for x in json.loads(r.stdout)["devices"]}
        for d in ("p0", "p1"):
            assert rows[d]["state"] == "waiting" and "(offline since " in rows[d]["reason"], rows
            assert rows[d]["online"] is False
        assert rows["p2"]["online"] is True and rows["p2"]["state"] != "waiting", rows
        sim.online("p1", True)  # back: online again
        wait_for(lambda: c.refresh(quiet=0.2) >= 0 and c.presence["p1"][0].online, 30, "p1 online again")
        r = subprocess.run([*cli, "devices"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        header, *lines = r.stdout.splitlines()
        at = header.index("ONLINE")
        rows = {line.split()[0]: line[at:].split()[0] for line in lines}
        assert rows == {"p0": "no", "p1": "yes", "p2": "yes"}, r.stdout
    finally:
        c.link.close()
