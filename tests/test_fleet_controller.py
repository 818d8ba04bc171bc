"""The operator's side of the fleet (tools._fleet*): the rollout's pure decisions on tables of
cases, the controller's SQLite state, and the ``edgebus fleet`` commands that need no broker.
The controller against a real broker and devices: tests/test_fleet_rollout.py."""

from __future__ import annotations

import subprocess
import sys

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
