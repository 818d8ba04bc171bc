"""Security: run-time capabilities, CURVE over tcp, the audit log, sealing, attestation."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import anyio
import msgspec
import pytest
import zmq

from protocols import (
    CapabilityTable,
    Codec,
    Grant,
    Granted,
    Header,
    Hello,
    Kind,
    ListCapabilities,
    Reset,
    Revoke,
)
from protocols.security import GrantCapability, Grants, ListGrants
from services import BadMessage, ConnectError, Forbidden, UnknownDestination, connect
from services.examples.greeter import Add, Greet, Greeting, Sum
from services.security import (
    AuditLog,
    FileKeyStore,
    SealError,
    Sealed,
    Unseal,
    Unsealed,
    verify_log,
)

from conftest import BIN, System, free_port, wait_for

pytestmark = pytest.mark.anyio

SECURITY = """
[services.security]
command = ["{python}", "-m", "services.security"]
capabilities = ["call:kernel.Grant", "call:kernel.Revoke", "call:kernel.Reset", "call:kernel.Enroll",
                "call:kernel.GetMeasurements", "subscribe:kernel.audit"]
critical = true
"""
GREETER = """
[services.greeter]
command = ["{python}", "-m", "services.examples.greeter"]
"""


async def audit_kinds(system: System) -> list[tuple[str, str, str]]:
    out = system.busctl("audit", "tail", "-n", "200", "--json", check=True).stdout
    return [(r["kind"], r["subject"], r.get("capability", "")) for r in msgspec.json.decode(out)]


async def test_grant_revoke_and_expiry_with_every_step_audited(make_system) -> None:
    system: System = make_system(SECURITY + GREETER + """
[services.client]
capabilities = ["call:greeter.Greet"]
""")
    await system.wait_ready("security", "greeter")
    async with system.client("client") as bus:
        with pytest.raises(Forbidden):
            await bus.call("greeter", Add(a=1, b=2), timeout=5)
        out = system.busctl("caps", "grant", "client", "call:greeter.Add", check=True).stdout
        assert "call:greeter.Add" in out
        assert (await bus.call("greeter", Add(a=1, b=2), Sum, timeout=5)).value == 3  # the next message
        system.busctl("caps", "revoke", "client", "call:greeter.Add", check=True)
        with pytest.raises(Forbidden):
            await bus.call("greeter", Add(a=1, b=2), timeout=5)
        system.busctl("caps", "grant", "client", "call:greeter.Add", "--ttl", "1", check=True)
        assert (await bus.call("greeter", Add(a=2, b=2), Sum, timeout=5)).value == 4
        with anyio.fail_after(10):  # the kernel's tick expires it within 0.1 s of the deadline
            while True:
                try:
                    await bus.call("greeter", Add(a=1, b=1), timeout=5)
                except Forbidden:
                    break
                await anyio.sleep(0.1)
        # a revoked configured capability is refused too
        system.busctl("caps", "revoke", "client", "call:greeter.Greet", check=True)
        with pytest.raises(Forbidden):
            await bus.call("greeter", Greet(who="x"), timeout=5)
    kinds = await audit_kinds(system)
    assert ("denied", "client", "call:greeter.Add") in kinds
    assert [k for k in kinds if k[0] in ("granted", "revoked", "grant-expired")] == [
        ("granted", "client", "call:greeter.Add"), ("revoked", "client", "call:greeter.Add"),
        ("granted", "client", "call:greeter.Add"), ("grant-expired", "client", "call:greeter.Add"),
        ("revoked", "client", "call:greeter.Greet")]
    assert system.busctl("audit", "verify").returncode == 0


async def test_only_the_security_service_changes_the_policy(make_system) -> None:
    system: System = make_system(SECURITY)
    await system.wait_ready("security")
    async with system.client() as bus:  # the operator holds call:* and still may not
        with pytest.raises(Forbidden, match="only the security service"):
            await bus.call("kernel", Grant(name="operator", capability="call:x.Y"), Granted, timeout=5)


async def test_grants_survive_a_restart_of_the_security_service(make_system) -> None:
    system: System = make_system(SECURITY + GREETER + "[services.client]\n")
    await system.wait_ready("security", "greeter")
    system.busctl("caps", "grant", "client", "call:greeter.Greet", check=True)
    system.busctl("restart", "security", check=True)
    async with system.client("client") as bus:
        assert (await bus.call("greeter", Greet(who="again"), Greeting, timeout=5)).text == "hello, again"


async def test_a_grant_with_a_ttl_of_zero_or_less_or_to_no_principal_is_refused(make_system) -> None:
    system: System = make_system(SECURITY + GREETER + "[services.client]\n")
    await system.wait_ready("security", "greeter")
    # busctl refuses a ttl that is not > 0 (it used to print "for -5s" and grant for good)
    for ttl in ("-5", "0", "nan"):
        bad = system.busctl("caps", "grant", "client", "call:greeter.Add", "--ttl", ttl)
        assert bad.returncode == 2 and f"--ttl {ttl}" in bad.stderr and "> 0" in bad.stderr, bad
    async with system.client() as bus:
        # and so does the security service, whoever asks
        for ttl in (-5.0, 0.0, float("inf")):
            with pytest.raises(BadMessage, match="ttl"):
                await bus.call("security", GrantCapability(name="client", capability="call:greeter.Add", ttl=ttl),
                               Grants, timeout=5)
        # a name that is no principal: the kernel, the authority on principals, says so
        bad = system.busctl("caps", "grant", "nosuch", "call:*")
        assert bad.returncode == 4 and "unknown-destination" in bad.stderr, bad
        assert "no principal named 'nosuch'" in bad.stderr and "(configured: client, greeter, operator, security)" in bad.stderr
        bad = system.busctl("caps", "revoke", "nosuch", "call:greeter.Add")
        assert bad.returncode == 4 and "no principal named 'nosuch'" in bad.stderr, bad
        # nothing was granted, kept or recorded
        assert (await bus.call("security", ListGrants(), Grants, timeout=5)).grants == []
        table = await bus.call("kernel", ListCapabilities(), CapabilityTable, timeout=5)
        assert "nosuch" not in table.table and "nosuch" not in table.entries
        assert table.entries["client"] == []
    assert "nosuch" not in system.busctl("caps", check=True).stdout
    grants = system.run_dir / "state" / "security" / "grants.json"
    assert not grants.exists() or msgspec.json.decode(grants.read_bytes()) == []
    assert not [k for k in await audit_kinds(system) if k[0] in ("granted", "revoked")]
    with pytest.raises(Forbidden):  # and the ttl <= 0 attempts granted nothing
        async with system.client("client") as bus:
            await bus.call("greeter", Add(a=1, b=1), timeout=5)


async def test_caps_lists_origin_and_expiry_and_reset_removes_a_revocation(make_system) -> None:
    system: System = make_system(SECURITY + GREETER + """
[services.client]
capabilities = ["call:greeter.*"]
""")
    await system.wait_ready("security", "greeter")
    system.busctl("caps", "grant", "client", "publish:client.*", "--ttl", "600", check=True)
    system.busctl("caps", "grant", "client", "subscribe:alerts.", check=True)
    out = system.busctl("caps", "revoke", "client", "call:greeter.Add", check=True).stdout
    assert "!call:greeter.Add" in out
    listing = system.busctl("caps", "client", check=True).stdout.splitlines()
    assert listing[0].split() == ["PRINCIPAL", "CAPABILITY", "ORIGIN", "EXPIRES"]

    def row(cap: str) -> list[str]:
        found = [re.split(r"\s{2,}", line.strip()) for line in listing[1:] if line.split()[1] == cap]
        assert len(found) == 1, (cap, listing)
        return found[0]

    assert row("call:greeter.*") == ["client", "call:greeter.*", "config", "-"]
    assert row("publish:client.*")[2] == "run-time grant" and re.search(r"\(in (599|600)s\)", row("publish:client.*")[3])
    assert row("subscribe:alerts.") == ["client", "subscribe:alerts.", "run-time grant", "never"]
    assert row("!call:greeter.Add") == ["client", "!call:greeter.Add", "run-time revocation", "-"]
    async with system.client("client") as bus:
        with pytest.raises(Forbidden):  # the revocation beats the configured wildcard
            await bus.call("greeter", Add(a=1, b=2), timeout=5)
        out = system.busctl("caps", "reset", "client", "call:greeter.Add", check=True).stdout
        assert "reset call:greeter.Add of client" in out and "!call:greeter.Add" not in out
        assert (await bus.call("greeter", Add(a=1, b=2), Sum, timeout=5)).value == 3
    assert "call:greeter.Add" not in system.busctl("caps", "client", check=True).stdout
    again = system.busctl("caps", "reset", "client", "call:greeter.Add")
    assert again.returncode == 1 and "rejected" in again.stderr and "no run-time grant or revocation" in again.stderr
    system.busctl("caps", "reset", "client", "publish:client.*", check=True)
    persisted = msgspec.json.decode((system.run_dir / "state" / "security" / "grants.json").read_bytes())
    assert [(g["capability"], g["action"]) for g in persisted] == [("subscribe:alerts.", "grant")]
    kinds = await audit_kinds(system)
    assert [k for k in kinds if k[0] == "reset"] == [("reset", "client", "call:greeter.Add"),
                                                     ("reset", "client", "publish:client.*")]
    # the security service drops a persisted entry whose principal is gone (it would lie in
    # wait for any later service of that name) when it starts
    system.busctl("stop", "security", check=True)
    path = system.run_dir / "state" / "security" / "grants.json"
    path.write_bytes(msgspec.json.encode(persisted + [{"type": "GrantEntry", "name": "nosuch",
                                                       "capability": "call:*", "action": "grant"}]))
    system.busctl("start", "security", check=True)
    assert [g["name"] for g in msgspec.json.decode(path.read_bytes())] == ["client"]
    assert ("policy-dropped", "nosuch", "call:*") in await audit_kinds(system)
    assert "nosuch" not in system.busctl("caps", check=True).stdout


async def test_the_kernel_takes_policy_only_for_principals_and_valid_expiries(make_system) -> None:
    # security configured without a command: this test speaks for it, straight to the kernel
    system: System = make_system(GREETER + """capabilities = ["publish:example.*"]
[services.security]
capabilities = ["call:kernel.Grant", "call:kernel.Revoke", "call:kernel.Reset", "call:kernel.ListCapabilities"]
[services.dormant]
command = ["{python}", "-m", "services.examples.greeter"]
enabled = false
""")
    await system.wait_ready("greeter")
    async with system.client("security") as bus:
        for msg in (Grant(name="nosuch", capability="call:*"), Revoke(name="nosuch", capability="call:*"),
                    Reset(name="nosuch", capability="call:*"), Grant(name="dormant", capability="call:*"),
                    Grant(name="test.1", capability="call:*")):
            with pytest.raises(UnknownDestination, match="no principal named"):
                await bus.call("kernel", msg, Granted, timeout=5)
        for expires in (-5.0, float("nan"), float("inf")):
            with pytest.raises(BadMessage, match="expires"):
                await bus.call("kernel", Grant(name="greeter", capability="call:x.Y", expires=expires), Granted,
                               timeout=5)
        granted = await bus.call("kernel", Grant(name="operator", capability="subscribe:x."), Granted, timeout=5)
        assert "subscribe:x." in granted.capabilities
        await bus.call("kernel", Revoke(name="greeter", capability="publish:example.*"), Granted, timeout=5)
        table = await bus.call("kernel", ListCapabilities(), CapabilityTable, timeout=5)
        assert table.table["greeter"] == ["publish:example.*", "!publish:example.*"]
        assert [(e.capability, e.origin) for e in table.entries["greeter"]] == [
            ("publish:example.*", "config"), ("publish:example.*", "revocation")]
        assert ("subscribe:x.", "grant") in [(e.capability, e.origin) for e in table.entries["operator"]]
        assert "nosuch" not in table.entries and "dormant" not in table.entries
        after = await bus.call("kernel", Reset(name="greeter", capability="publish:example.*"), Granted, timeout=5)
        assert after.capabilities == ["publish:example.*"]
        await bus.call("kernel", Reset(name="greeter", capability="publish:example.*"), Granted, timeout=5)


async def test_curve_over_tcp(make_system, unused_tcp_port: int) -> None:
    pub, sec = zmq.curve_keypair()
    other_pub, other_sec = zmq.curve_keypair()
    endpoint = f"tcp://127.0.0.1:{unused_tcp_port}"
    system: System = make_system(GREETER + f"""
[bus]
tcp_endpoint = "{endpoint}"
[services.remote]
capabilities = ["call:greeter.Greet"]
curve_public_key = "{pub.decode()}"
""")
    await system.wait_ready("greeter")
    server = (system.run_dir / "bus.curve.pub").read_bytes()
    # enrolled: exactly its capabilities
    async with connect("remote", endpoint=endpoint, credential="", curve=(server, pub, sec)) as bus:
        assert bus.name == "remote"
        assert (await bus.call("greeter", Greet(who="tcp"), Greeting, timeout=5)).text == "hello, tcp"
        with pytest.raises(Forbidden):
            await bus.call("greeter", Add(a=1, b=1), timeout=5)
    # an unenrolled key, and the enrolled public key with the wrong secret: not one message (the
    # SDK learns of the refused key from the CURVE handshake itself, and at once)
    for keys, refusal in (((server, other_pub, other_sec), "refused this connection's CURVE key"),
                          ((server, pub, other_sec), "no answer to Hello within 1s: the CURVE handshake failed")):
        with pytest.raises(ConnectError, match=refusal):
            async with connect("remote", endpoint=endpoint, credential="", curve=keys, connect_timeout=1.0):
                pass
    # NULL mechanism on the tcp endpoint, even with a valid ipc credential: nothing
    null = zmq.Context.instance().socket(zmq.DEALER)
    null.setsockopt(zmq.LINGER, 0)
    null.connect(endpoint)
    null.send_multipart(Codec().pack(Header(kind=Kind.CONTROL, type="Hello", id=1),
                                     Hello(service="remote", credential=system.credential("remote"))))
    assert not null.poll(1000)
    null.close(0)
    log = system.log()
    # the unenrolled key was refused by the ZAP handler, the wrong secret by the CURVE exchange,
    # the NULL mechanism by the ZMTP handshake; the kernel said why each time ...
    refused = [line for line in log.splitlines() if '"authentication_failed"' in line and '"CURVE"' in line]
    assert any('"public key not enrolled"' in line for line in refused), refused
    assert any("keys do not match" in line for line in refused), refused
    assert any("does not speak CURVE" in line for line in refused), refused  # the NULL attempt below
    # ... and only the enrolled, correctly keyed connection became a session (the wrong secret
    # fails the CURVE handshake, the NULL mechanism is not spoken on tcp: neither reaches the router)
    connected = [line for line in log.splitlines() if '"peer_connected"' in line and '"service": "remote"' in line]
    assert len(connected) == 1, connected


@pytest.fixture
def unused_tcp_port() -> int:
    return free_port()


# -- the audit log, on files ---------------------------------------------------------------


def _log(tmp: Path, n: int = 30, **kw) -> tuple[AuditLog, FileKeyStore]:
    keys = FileKeyStore(tmp / "keys")
    audit = AuditLog(tmp / "audit", keys.sign, **kw)
    for i in range(n):
        audit.append("denied", f"svc{i}", capability=f"call:x.T{i}")
    audit.checkpoint()
    return audit, keys


def test_an_intact_log_verifies_across_rotated_files(tmp_path: Path) -> None:
    audit, keys = _log(tmp_path, 200, max_bytes=4096, checkpoint_every=50)
    verdict = verify_log(audit.directory, keys.public_key)
    # a checkpoint after every 50 records; the final checkpoint() has nothing new to sign
    assert verdict.ok and verdict.records == 200 + 4 and verdict.files > 3 and verdict.checkpoints == 4


@pytest.mark.parametrize("tamper", ["edit", "delete", "swap", "append"])
def test_tampering_is_found_and_located(tmp_path: Path, tamper: str) -> None:
    audit, keys = _log(tmp_path)
    path = audit.path
    audit.close()
    lines = path.read_bytes().splitlines(keepends=True)
    if tamper == "edit":
        lines[10] = lines[10].replace(b"svc10", b"svc1O")
    elif tamper == "delete":
        del lines[10]
    elif tamper == "swap":
        lines[10], lines[11] = lines[11], lines[10]
    else:  # a forged record appended with a fresh hash but not chained
        forged = msgspec.json.decode(lines[-1])
        forged.update(seq=forged["seq"] + 1, kind="granted", prev="ab" * 32)
        lines.append(msgspec.json.encode(forged) + b"\n")
    path.write_bytes(b"".join(lines))
    verdict = verify_log(audit.directory, keys.public_key)
    assert not verdict.ok
    expected_line = {"edit": 11, "delete": 11, "swap": 11, "append": len(lines)}[tamper]
    assert f"line {expected_line} " in verdict.where, verdict
    assert verdict.problem


def test_a_torn_record_is_cut_and_the_chain_goes_on(tmp_path: Path) -> None:
    audit, keys = _log(tmp_path, 5)
    path = audit.path
    audit.close()
    with open(path, "ab") as f:
        f.write(b'{"type":"AuditRecord","seq":7,"time":1.0,"ki')  # kill -9 / power cut mid-write
    audit = AuditLog(tmp_path / "audit", keys.sign)
    audit.append("after", "recovery")
    audit.close()
    verdict = verify_log(tmp_path / "audit", keys.public_key)
    assert verdict.ok and verdict.records == 7


def test_a_checkpoint_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    audit, _ = _log(tmp_path, 3)
    other = FileKeyStore(tmp_path / "other")
    assert not verify_log(audit.directory, other.public_key).ok


async def test_busctl_audit_verify_fails_naming_the_record(make_system) -> None:
    system: System = make_system(SECURITY + GREETER + "[services.client]\n")
    await system.wait_ready("security", "greeter")
    async with system.client("client") as bus:
        for _ in range(10):  # audited at the 1st and 10th time (rate-limited per capability)
            with pytest.raises(Forbidden):
                await bus.call("greeter", Add(a=1, b=1), timeout=5)
        with pytest.raises(Forbidden):
            await bus.call("greeter", Greet(who="x"), timeout=5)
    wait_for(lambda: len(_audit_lines(system)) >= 4, 10, "the denials in the audit log")
    assert b"10 times so far" in b"".join(_audit_lines(system))
    assert system.busctl("audit", "verify").returncode == 0
    path = sorted((system.run_dir / "state" / "security" / "audit").iterdir())[-1]
    data = path.read_bytes().replace(b'"client"', b'"c1ient"', 1)
    path.write_bytes(data)
    bad = system.busctl("audit", "verify")
    assert bad.returncode == 1 and "line 2 " in bad.stderr and "edited" in bad.stderr


def _audit_lines(system: System) -> list[bytes]:
    d = system.run_dir / "state" / "security" / "audit"
    return [line for p in sorted(d.iterdir()) for line in p.read_bytes().splitlines()] if d.exists() else []


# -- keys ------------------------------------------------------------------------------------


def test_key_files_are_private_and_sealed_keys_need_the_master_key(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path)
    for name in ("master.key", "device.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    blob = store.seal(b"k" * 32, "model:x")
    assert store.unseal(blob, "model:x") == b"k" * 32
    with pytest.raises(SealError, match="context"):
        store.unseal(blob, "model:y")
    (tmp_path / "master.key").unlink()
    with pytest.raises(SealError, match="another master key"):
        FileKeyStore(tmp_path).unseal(blob, "model:x")  # a new master key was created
    os.chmod(tmp_path / "device.key", 0o644)
    with pytest.raises(Exception, match="chmod 600"):
        FileKeyStore(tmp_path)


async def test_unseal_needs_its_capability(make_system) -> None:
    system: System = make_system(SECURITY + """
[services.store]
capabilities = ["call:security.Seal", "call:security.Unseal"]
[services.nosy]
capabilities = ["call:security.Seal"]
""")
    await system.wait_ready("security")
    async with system.client("store") as bus:
        from services.security import Seal

        blob = (await bus.call("security", Seal(key=b"secret-data-key", context="m"), Sealed)).blob
        assert b"secret-data-key" not in blob
        assert (await bus.call("security", Unseal(blob=blob, context="m"), Unsealed)).key == b"secret-data-key"
    async with system.client("nosy") as bus:
        with pytest.raises(Forbidden, match="call:security.Unseal"):
            await bus.call("security", Unseal(blob=blob, context="m"), Unsealed)


# -- attestation -----------------------------------------------------------------------------


async def test_attestation_changes_with_code_or_config_and_verifies(make_system, tmp_path: Path) -> None:
    script = tmp_path / "svc.py"
    script.write_text("from services.examples.greeter import Greeter\nfrom services import run\nrun(Greeter)\n")
    config = SECURITY + f"""
[services.app]
command = ["{{python}}", "{script}"]
"""
    system: System = make_system(config)
    await system.wait_ready("security", "app")
    device = system.run_dir / "state" / "security" / "device.pub"

    def attest(name: str) -> dict:
        report = tmp_path / name
        report.write_text(system.busctl("attest", "--nonce", name, check=True).stdout)
        ok = subprocess.run([str(BIN / "edgebus"), "attest", "verify", str(report), "--pubkey", str(device),
                             "--nonce", name], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
        return msgspec.json.decode(report.read_bytes())["report"]

    first = attest("r1.json")
    system.busctl("restart", "app", check=True)  # same code and config: nothing new measured
    assert attest("r2.json")["pcr"] == first["pcr"]
    script.write_text(script.read_text() + "# changed\n")
    system.busctl("restart", "app", check=True)
    code_changed = attest("r3.json")
    assert code_changed["pcr"] != first["pcr"]
    system.config_path.write_text(config.replace('svc.py"]', 'svc.py"]\nenvironment = { X = "1" }'))
    system.busctl("reload", check=True)
    await system.wait_ready("app")
    config_changed = attest("r4.json")
    assert config_changed["pcr"] != code_changed["pcr"]
    # a tampered report does not verify
    tampered = msgspec.json.decode((tmp_path / "r4.json").read_bytes())
    tampered["report"]["log"][0]["code"] = "00" * 32
    (tmp_path / "bad.json").write_bytes(msgspec.json.encode(tampered))
    bad = subprocess.run([str(BIN / "edgebus"), "attest", "verify", str(tmp_path / "bad.json"), "--pubkey",
                          str(device)], capture_output=True, text=True)
    assert bad.returncode == 1 and "INVALID" in bad.stderr
