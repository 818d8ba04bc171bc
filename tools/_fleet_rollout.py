"""The rollout's decisions, as pure functions of what the controller knows (no I/O, no clock
of their own): which devices each wave touches, whether a device has passed the gates, and
what a running deployment does next.  ``tools._fleet_controller`` feeds them from SQLite and
the devices' reported state, and carries out what they decide over the broker.

A rollout: wave 1 is the canary (``--canary N`` devices or ``PCT%`` of the group, at least
one), waves 2..N split the rest evenly.  Each wave's devices get their own desired document.
The next wave starts once the last one has soaked ``soak_s`` seconds and every gate holds on
enough of the devices touched so far (``quorum``, a share of them: 1.0 waits for every
one; an offline device is pending, and converges when it reconnects).  A device that fails a
gate halts the rollout at once (and the controller rolls the touched devices back).  After
the last wave has soaked and holds, the group's own desired document is published: devices
that were offline or join the group later get the deployment from it.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from typing import Literal, Sequence

import msgspec

__all__ = ["Gate", "Policy", "DeviceView", "Check", "Decision", "PolicyError", "parse_gate", "parse_canary",
           "plan_waves", "check_device", "judge", "decide", "OUTCOMES_FAILED", "OUTCOMES_DONE", "DRIFT"]


class PolicyError(ValueError):
    """A rollout option that does not parse; the message says what is accepted."""


Metric = Literal["error_rate", "p95_ms", "drift", "trial"]

#: a device's outcomes of a deployment that fail the rollout (its trial failed, it refused
#: the document or could not install the bundle)
OUTCOMES_FAILED = frozenset({"failed", "rolled-back", "refused"})
#: outcomes on the new version: the trial is running, or it is done (committed, or no trial)
OUTCOMES_DONE = frozenset({"trial", "succeeded"})


class Gate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``error_rate<=0.02`` (a share of the requests since the device's last report),
    ``p95_ms<=50`` (the largest p95 among the deployed models), ``drift<=ok|warn`` (the worst
    drift level of the deployed models: ok 0, warn 1, alert 2), ``trial=committed`` (the model
    store committed the trial; without it a device in trial counts as on the new version)."""

    metric: Metric
    limit: float = 0.0  # the bound of a numeric gate (ignored for trial)

    def __str__(self) -> str:
        if self.metric == "trial":
            return "trial=committed"
        if self.metric == "drift" and self.limit in DRIFT_NAMES:
            return f"drift<={DRIFT_NAMES[self.limit]}"
        return f"{self.metric}<={self.limit:g}"


#: drift levels (protocols.fleet.ModelReport.drift) as the numbers a drift gate compares
DRIFT = {"ok": 0.0, "warn": 1.0, "alert": 2.0}
DRIFT_NAMES = {v: k for k, v in DRIFT.items()}


_GATE = re.compile(r"^\s*(error_rate|p95_ms|drift)\s*<=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*$")


def parse_gate(text: str) -> Gate:
    if re.fullmatch(r"\s*trial\s*=\s*committed\s*", text):
        return Gate("trial")
    level = re.fullmatch(r"\s*drift\s*<=\s*(ok|warn|alert)\s*", text)
    if level:
        return Gate("drift", DRIFT[level.group(1)])
    m = _GATE.match(text)
    if not m:
        raise PolicyError(f"gate {text!r} is not one of error_rate<=X (a share, 0.02 = 2%), p95_ms<=MS, "
                          "drift<=ok|warn (or 0|1), trial=committed")
    return Gate(m.group(1), float(m.group(2)))  # type: ignore[arg-type]


def parse_canary(text: str) -> tuple[int, float]:
    """``"3"`` -> (3, 0.0); ``"10%"`` -> (0, 10.0)."""
    text = text.strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 < pct <= 100:
                raise ValueError
            return 0, pct
        count = int(text)
        if count < 1:
            raise ValueError
        return count, 0.0
    except ValueError:
        raise PolicyError(f"--canary {text!r}: give a number of devices (at least 1) or a share such as 10%") from None


class Policy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    canary_count: int = 1
    canary_pct: float = 0.0  # when > 0, the canary is this share of the group (rounded up, >= 1)
    waves: int = 3  # the canary's wave included
    soak_s: float = 60.0
    gates: tuple[Gate, ...] = ()
    #: share of the devices touched so far that must have passed for the next wave (1.0: all)
    quorum: float = 1.0
    #: a wave whose quorum has not passed this long after it started halts the rollout
    #: (without rolling back: nothing failed; the operator decides)
    wave_timeout_s: float = 3600.0
    #: roll the touched devices back when a gate fails
    rollback_on_failure: bool = True
    #: how long the documents of the deployment are valid (a device refuses an expired one)
    validity_s: float = 30 * 86400.0

    def __post_init__(self) -> None:
        if self.waves < 1:
            raise PolicyError(f"--waves {self.waves}: at least 1 (the canary)")
        if self.soak_s < 0:
            raise PolicyError(f"--soak {self.soak_s:g}: seconds, not negative")
        if not 0 < self.quorum <= 1:
            raise PolicyError(f"--quorum {self.quorum:g}: a share in (0, 1], e.g. 0.9")
        if self.wave_timeout_s <= 0:
            raise PolicyError(f"--wave-timeout {self.wave_timeout_s:g}: seconds, more than 0")


def plan_waves(devices: Sequence[str], policy: Policy, salt: str = "") -> list[list[str]]:
    """The devices of each wave, canary first.  The order is a hash of ``salt`` (the
    deployment's id) and each device's id: another deployment picks other canaries, and
    devices named by site or batch are spread over the waves.  Empty waves are dropped."""
    ordered = sorted(set(devices), key=lambda d: (hashlib.sha256(f"{salt}\0{d}".encode()).digest(), d))
    n = len(ordered)
    if n == 0:
        return []
    size = math.ceil(n * policy.canary_pct / 100) if policy.canary_pct > 0 else policy.canary_count
    size = max(1, min(n, size))
    waves = [ordered[:size]]
    rest = ordered[size:]
    later = policy.waves - 1
    if later > 0 and rest:
        later = min(later, len(rest))
        base, extra = divmod(len(rest), later)
        start = 0
        for i in range(later):
            end = start + base + (1 if i < extra else 0)
            waves.append(rest[start:end])
            start = end
    elif rest:  # a single wave: the canary; the rest get the group's document at the end
        pass
    return waves


class DeviceView(msgspec.Struct, frozen=True):
    """What the controller knows of a device for one deployment: its last report."""

    device: str
    #: the version of the desired document the device last acted on (0: none yet)
    version: int = 0
    #: its outcome (protocols.fleet.OUTCOMES, or "pending" before any): downloading,
    #: installing, trial, succeeded, failed, rolled-back, refused
    outcome: str = "pending"
    reason: str = ""
    error_rate: float | None = None
    p95_ms: float | None = None
    drift: float | None = None
    online: bool = True
    seen_at: float = 0.0
    #: when the controller read the device's offline presence (its will, or its clean stop); 0: unknown
    offline_since: float = 0.0
    #: the deployment id of that document
    deployment: str = ""


class Check(msgspec.Struct, frozen=True):
    """One device's standing in a rollout: pending, passed, failed, or superseded (a newer
    document than this deployment's reached it: not counted either way)."""

    device: str
    state: Literal["pending", "passed", "failed", "superseded"]
    reason: str


def check_device(view: DeviceView | None, version: int, gates: Sequence[Gate], device: str = "") -> Check:
    """Whether a device that was sent document ``version`` has passed ``gates``."""
    name = view.device if view is not None else device
    if view is None:
        return Check(name, "pending", "no report from the device yet")
    where = "" if view.online else (f" (offline since {time.strftime('%H:%M:%S', time.localtime(view.offline_since))})"
                                    if view.offline_since else " (offline)")
    if view.version < version:
        return Check(name, "pending", f"has not acted on document v{version} yet (reports v{view.version}, "
                                      f"{view.outcome}){where}")
    if view.version > version:
        return Check(name, "superseded", f"acts on a newer document v{view.version}")
    if view.outcome in OUTCOMES_FAILED:
        return Check(name, "failed", f"{view.outcome}: {view.reason}" if view.reason else view.outcome)
    if view.outcome not in OUTCOMES_DONE:
        return Check(name, "pending", f"{view.outcome}{': ' + view.reason if view.reason else ''}{where}")
    for gate in gates:
        match gate.metric:
            case "trial":
                if view.outcome == "trial":
                    return Check(name, "pending", f"trial running{where}")
            case metric:
                value = getattr(view, metric)
                if value is not None and value > gate.limit:
                    return Check(name, "failed", f"{metric} {value:g} > {gate.limit:g}")
    return Check(name, "passed", view.outcome)


class Decision(msgspec.Struct, frozen=True):
    """What a running deployment does next: ``wait``, ``advance`` (start wave ``wave``,
    0-based), ``finish`` (publish the group's document), ``halt`` (a gate failed: roll back
    when the policy says so) or ``stall`` (the wave timed out: halt without rolling back)."""

    action: Literal["wait", "advance", "finish", "halt", "stall"]
    reason: str
    wave: int = -1
    checks: tuple[Check, ...] = ()


def judge(touched: dict[str, int], views: dict[str, DeviceView], gates: Sequence[Gate]) -> list[Check]:
    """Each touched device (device -> the document version it was sent) against the gates."""
    return [check_device(views.get(d), v, gates, d) for d, v in sorted(touched.items())]


def decide(policy: Policy, waves: Sequence[Sequence[str]], current: int, started_at: float,
           touched: dict[str, int], views: dict[str, DeviceView], now: float) -> Decision:
    """The next step of a running deployment.  ``current`` is the index of the wave started
    last (-1: none yet), ``started_at`` when it started, ``touched`` every device sent a
    document by this deployment with that document's version."""
    if current < 0:
        if not waves:
            return Decision("finish", "the group has no devices: its document is published")
        return Decision("advance", "starting the canary", wave=0)
    checks = tuple(judge(touched, views, policy.gates))
    failed = [c for c in checks if c.state == "failed"]
    if failed:
        return Decision("halt", "; ".join(f"{c.device}: {c.reason}" for c in failed), checks=checks)
    soaked = now - started_at
    counted = [c for c in checks if c.state != "superseded"]
    passed = sum(c.state == "passed" for c in counted)
    need = math.ceil(policy.quorum * len(counted) - 1e-9)
    label = "canary" if current == 0 else f"wave {current + 1}"
    if passed < need:
        if soaked >= policy.wave_timeout_s:
            return Decision("stall", f"{label}: {passed} of {len(counted)} devices passed after {soaked:.0f} s "
                                     f"(quorum {need}, timeout {policy.wave_timeout_s:g} s)", checks=checks)
        pending = [c.device for c in counted if c.state == "pending"]
        return Decision("wait", f"{label}: {passed} of {len(counted)} devices passed, {need} needed; waiting for "
                                + ", ".join(pending[:5]) + (f" and {len(pending) - 5} more" if len(pending) > 5 else ""),
                        checks=checks)
    if soaked < policy.soak_s:
        return Decision("wait", f"{label}: soaking, {soaked:.0f} of {policy.soak_s:g} s", checks=checks)
    if current + 1 < len(waves):
        return Decision("advance", f"{label} holds ({passed} of {len(counted)} passed)", wave=current + 1,
                        checks=checks)
    return Decision("finish", f"{label} holds ({passed} of {len(counted)} passed): the group's document is "
                              "published", checks=checks)
