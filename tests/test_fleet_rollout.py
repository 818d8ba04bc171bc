"""Staged rollouts end to end: the operator's real ``edgebus fleet`` commands (a state in
SQLite, mutual TLS to a real mosquitto whose ACL ``edgebus fleet acl`` wrote) and four real
``edgebus boot`` systems with the fleet service: dev1..dev3 in group ``shop``, dev4 in
``lab``.  The systems' model stores end a trial that nobody serves after one second by rolling
it back (``trial_max_s = 1``: how tests/test_trials.py fails a trial), so a deployment that
replaces a version fails its canary; a model's first version has no trial.

The four systems are booted once for the module (about a quarter of its time); each test
brings the fleet to the state it starts from."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from protocols.modelstore import ListModels, ModelList

from conftest import BIN, System, kill_and_wait, wait_for
from helpers.mosquitto import Mosquitto, Pki
from test_fleet_agent import device_config
from test_modelstore import KEY, bundle

GROUP = ["dev1", "dev2", "dev3"]
OUTSIDER = "dev4"
TRIAL_FAILS = "trial_window_s = 0.2, trial_max_s = 1.0"  # the model store's settings


class Shop:
    """The broker, the operator's CLI and the four devices."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pki = Pki(tmp / "pki")
        self.broker = Mosquitto(tmp / "mosquitto", pki=self.pki, acl=["# nothing yet"])
        self.broker.start()
        cert, key = self.pki.client("operator")
        self.base = [str(BIN / "edgebus"), "fleet", "--state", str(tmp / "fleet.sqlite"), "-q"]
        self.tls = ["--broker", f"127.0.0.1:{self.broker.port}", "--ca", str(self.pki.ca), "--cert", str(cert),
                    "--key", str(key)]
        self.systems: dict[str, System] = {}
        self.runner: subprocess.Popen[str] | None = None
        self.bundles: dict[tuple[str, str], Path] = {}

    def fleet(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"edgebus fleet {' '.join(args)}: exit {r.returncode}: {r.stderr}")
        return r

    def json(self, *args: str, timeout: float = 60) -> Any:
        return json.loads(self.fleet("-o", "json", *args, timeout=timeout).stdout)

    def bundle(self, name: str, version: str) -> str:
        path = self.bundles.get((name, version))
        if path is None:
            path = self.bundles[(name, version)] = self.tmp / f"{name}-{version}.ebm"
            path.write_bytes(bundle(version, KEY, name=name))
        return str(path)

    def boot(self) -> None:
        public = self.fleet("keygen", "--fleet", "shops").stdout.strip()
        self.fleet("groups", "create", "shop")
        self.fleet("groups", "add", "shop", *GROUP)
        self.fleet("groups", "create", "lab")
        self.fleet("groups", "add", "lab", OUTSIDER)
        # the broker's ACL from the controller's state, before any device connects
        self.broker.set_acl(self.fleet("acl").stdout.splitlines())
        from test_fleet_agent import FLEET_PUB

        for name in [*GROUP, OUTSIDER]:
            config = device_config(self.broker, name, ["shop"] if name in GROUP else ["lab"], store=TRIAL_FAILS)
            config = config.replace(FLEET_PUB.hex(), public)  # the devices trust the key keygen made
            d = self.tmp / name
            d.mkdir()
            self.systems[name] = System(d, config)
        for s in self.systems.values():
            s.wait_bus(60)

    def models(self) -> dict[str, dict[str, tuple[str, list[str], str]]]:
        """device -> model -> (active, versions, trial), from each model store itself."""
        import anyio

        async def read() -> dict[str, dict[str, tuple[str, list[str], str]]]:
            out = {}
            for name, s in self.systems.items():
                async with s.client() as bus:
                    listed = await bus.call("modelstore", ListModels(), ModelList, timeout=20)
                out[name] = {m.name: (m.active, sorted(m.versions), m.trial)
                             for m in listed.models}
            return out

        return anyio.run(read)

    def ready(self) -> None:
        import anyio

        async def wait() -> None:
            for s in self.systems.values():
                await s.wait_ready("security", "modelstore", "fleet", timeout=90)

        anyio.run(wait)

    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["device"]: d for d in self.json("devices")}

    def wait_devices(self, predicate: Any, what: str, timeout: float = 90) -> dict[str, dict[str, Any]]:
        last: list[Any] = [None]

        def check() -> Any:
            last[0] = self.devices()
            return last[0] if predicate(last[0]) else None

        try:
            return wait_for(check, timeout, what, interval=0.5)
        except AssertionError:
            raise AssertionError(f"{what}; devices: {json.dumps(last[0], indent=1)}") from None

    def close(self) -> None:
        if self.runner is not None:
            kill_and_wait([self.runner.pid])
            self.runner = None
        errors = []
        for s in self.systems.values():
            try:
                s.kill()
            except AssertionError as exc:
                errors.append(str(exc))
        self.broker.stop()
        if errors:
            raise AssertionError("; ".join(errors))


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    s = Shop(tmp_path_factory.mktemp("shop"))
    try:
        s.boot()
        s.fleet(*s.tls, "devices")  # the broker options are remembered from here on
        yield s
    finally:
        s.close()


def _deploy(shop: Shop, name: str, version: str, *extra: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return shop.fleet("deploy", "--group", "shop", "--bundle", shop.bundle(name, version), "--canary", "1",
                      "--waves", "2", "--soak", "0.5", "--follow", "--follow-timeout", str(timeout - 30), *extra,
                      timeout=timeout, check=False)


def _ensure_demo_1(shop: Shop) -> None:
    """The group runs demo 1.0.0 (the first test's deployment, when run alone)."""
    if all(shop.models()[d].get("demo", ("",))[0] == "1.0.0" for d in GROUP):
        return
    r = _deploy(shop, "demo", "1.0.0")
    assert r.returncode == 0, r.stderr


def _locked(path: Path) -> bool:
    """Whether a controller loop holds the state's lock (probed without keeping it)."""
    import fcntl
    import os

    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (releases the probe's lock, if it got it)
    return False


def _enrolled(devices: dict[str, dict[str, Any]]) -> bool:
    return set(devices) >= {*GROUP, OUTSIDER} and all(d.get("applied_version") is not None for d in devices.values())


def test_three_devices_enrol_receive_their_groups_deployment_and_a_fourth_does_not_change(shop: Shop) -> None:
    shop.ready()
    devices = shop.wait_devices(_enrolled, "four devices enrolled and reporting")
    assert devices["dev1"]["groups"] == ["shop"] and devices[OUTSIDER]["groups"] == ["lab"]
    assert all(d["attestation"] == "valid" and d["enrolled"] for d in devices.values())
    before = devices[OUTSIDER]

    r = _deploy(shop, "demo", "1.0.0")
    assert r.returncode == 0, r.stderr
    status = shop.json("status")
    dep = status[-1]
    assert (dep["group"], dep["bundle"], dep["state"], dep["waves"]) == ("shop", "demo 1.0.0", "complete", 2)
    detail = shop.json("status", str(dep["deployment"]))
    assert sorted(x["device"] for x in detail["devices"]) == GROUP
    assert sorted(x["wave"] for x in detail["devices"]) == [1, 2, 2]

    # each device reports it active (the group's document: every wave document is superseded by it)
    devices = shop.wait_devices(lambda ds: all(ds[d].get("models", {}).get("demo") == "1.0.0"
                                               and ds[d]["deployment"]["outcome"] == "succeeded" for d in GROUP),
                                "the group on demo 1.0.0")
    group_versions = {devices[d]["applied_version"] for d in GROUP}
    assert len(group_versions) == 1  # the group's document, one version for all
    models = shop.models()
    assert all(models[d]["demo"] == ("1.0.0", ["1.0.0"], "") for d in GROUP)
    # the fourth device: nothing applied, nothing installed
    after = shop.devices()[OUTSIDER]
    assert after["applied_version"] == before["applied_version"] == 0 and after["deployment"] is None
    assert models[OUTSIDER] == {}
    # pushing the same bundle again sends nothing: the broker holds it (by content hash)
    pushed = shop.fleet("push", shop.bundle("demo", "1.0.0"), "-o", "json")
    assert json.loads(pushed.stdout)["sha256"] in {a["sha256"] for a in shop.json("artifacts")}


def test_a_canary_whose_trial_fails_halts_the_rollout_and_no_other_device_changes(shop: Shop) -> None:
    shop.ready()
    shop.wait_devices(_enrolled, "four devices enrolled and reporting")
    _ensure_demo_1(shop)
    before = shop.wait_devices(lambda ds: all(ds[d]["deployment"]["outcome"] == "succeeded" for d in GROUP),
                               "the group settled")

    r = _deploy(shop, "demo", "1.1.0", "--gate", "trial=committed", "--gate", "error_rate<=0.05")
    assert r.returncode == 1, r.stderr  # the rollout did not complete
    dep = shop.json("status")[-1]
    assert dep["state"] == "rolled_back" and dep["wave"] == 1, dep
    assert "gate failed" in dep["reason"] and "rolled-back" in dep["reason"], dep
    detail = shop.json("status", str(dep["deployment"]))
    canary = [x["device"] for x in detail["devices"] if x["wave"] == 1]
    assert len(canary) == 1
    canary = canary[0]
    others = [d for d in GROUP if d != canary]
    assert all(x["document"] == 0 and x["state"] == "planned" for x in detail["devices"] if x["device"] in others)
    human = shop.fleet("status", str(dep["deployment"]), "--cached").stdout
    assert f"deployment {dep['deployment']} to shop: rolled_back (wave 1 of 2)" in human

    # the canary tried 1.1.0, its store rolled it back, and the controller's rollback document
    # (a higher version naming 1.0.0) is what it applied last
    devices = shop.wait_devices(lambda ds: ds[canary]["applied_version"] > before[canary]["applied_version"]
                                and ds[canary]["deployment"]["outcome"] == "succeeded"
                                and ds[canary]["deployment"]["version"] == ds[canary]["applied_version"],
                                "the canary to apply its rollback document")
    models = shop.models()
    assert models[canary]["demo"] == ("1.0.0", ["1.0.0", "1.1.0"], "")
    # no device outside the canary changed: same document, same models, nothing fetched
    for d in [*others, OUTSIDER]:
        assert devices[d]["applied_version"] == before[d]["applied_version"], d
        assert devices[d].get("deployment") == before[d].get("deployment"), d
    for d in others:
        assert models[d]["demo"] == ("1.0.0", ["1.0.0"], "")
    assert models[OUTSIDER] == {}


def test_the_broker_stopped_mid_rollout_devices_end_on_old_or_new_and_converge(shop: Shop) -> None:
    shop.ready()
    shop.wait_devices(_enrolled, "four devices enrolled and reporting")
    # a model new to the devices (no trial), a long soak: the broker goes down between the waves
    shop.runner = subprocess.Popen([*shop.base, "run", "--tick", "0.2"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
    wait_for(lambda: _locked(shop.tmp / "fleet.sqlite.lock"), 60, "the controller loop to start")
    dep = int(shop.fleet("deploy", "--group", "shop", "--bundle", shop.bundle("other", "1.0.0"), "--canary", "1",
                         "--waves", "2", "--soak", "8").stdout)

    def canary_done() -> Any:
        s = shop.json("status", "--cached", str(dep))
        return s if any(x["wave"] == 1 and x["state"] == "succeeded" for x in s["devices"]) else None

    second = shop.fleet("run", "--once", check=False)  # one controller loop per state
    assert second.returncode == 1 and "another controller" in second.stderr, second.stderr
    status = wait_for(canary_done, 90, "the canary on other 1.0.0", interval=0.3)
    assert status["state"] == "running"  # (wave 1 still soaking, unless the machine was very slow)
    shop.broker.stop()
    # while the broker is down: every device on the old version (none) or the new, never between
    for d, models in shop.models().items():
        assert models.get("other") in (None, ("1.0.0", ["1.0.0"], "")), (d, models)
    assert shop.runner.poll() is None  # the controller waits for the broker
    shop.broker.start()

    def complete() -> Any:
        s = shop.json("status", "--cached", str(dep))
        return s if s["state"] != "running" else None

    status = wait_for(complete, 120, "the rollout to complete after the broker's restart", interval=0.3)
    assert status["state"] == "complete", status
    shop.wait_devices(lambda ds: all(ds[d].get("models", {}).get("other") == "1.0.0" for d in GROUP),
                      "the group converged on other 1.0.0")
    models = shop.models()
    for d in GROUP:
        assert models[d]["other"] == ("1.0.0", ["1.0.0"], "")
    assert "other" not in models[OUTSIDER]
    shop.runner.send_signal(signal.SIGTERM)
    assert shop.runner.wait(30) == 0
    shop.runner = None
