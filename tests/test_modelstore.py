"""The model store: verified installs, encryption at rest, activation, trial, rollback,
A/B splits, crash consistency; and the offline bundle tools."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import zipfile
from pathlib import Path

import anyio
import msgspec
import numpy as np
import pytest

from services import BadMessage, Rejected, Unavailable
from services.modelstore import Bundle, Manifest
from protocols.modelstore import (
    Activate, GetModel, Install, Installed, ListModels, ModelBytes, ModelList, ModelState, Remove, ReportHealth,
    HealthRecorded, ModelEvent, Resolve, Resolved, Rollback, Split,
)
from protocols.modelstore import pick_version

from conftest import BIN, System

pytestmark = pytest.mark.anyio

MARKER = np.array([3.14159, 2.71828, 1.41421, 1.73205] * 64, dtype=np.float32)  # recognisable plaintext


def onnx_model(offset: float, garbage: bool = False) -> bytes:
    if garbage:
        return b"\x08\x07this is not an onnx model" + MARKER.tobytes()
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(MARKER.reshape(256, 1)[:4].repeat(4, axis=1) + np.float32(offset), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
                              [w, numpy_helper.from_array(MARKER, "marker")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def make_key():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def pub_hex(key) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def bundle(version: str, key=None, *, garbage: bool = False, name: str = "demo") -> bytes:
    model = onnx_model(float(version.split(".")[1]), garbage)
    manifest = Manifest(name=name, version=version, created=0.0, inputs=[], outputs=[],
                        variants={"full": {"file": "full.onnx", "sha256": "", "size": 0}})  # type: ignore[dict-item]
    manifest = msgspec.convert(msgspec.to_builtins(manifest), Manifest)
    b = Bundle.create(manifest, {"full.onnx": model})
    if key is not None:
        b.sign(key)
    return b.to_bytes()


def zip_replace(data: bytes, name: str, transform) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for item in src.namelist():
            content = src.read(item)
            dst.writestr(item, transform(content) if item == name else content)
    return out.getvalue()


KEY = make_key()


def config(extra: str = "") -> str:
    return f"""
[services.security]
command = ["{{python}}", "-m", "services.security"]
capabilities = ["call:kernel.Grant", "call:kernel.Revoke", "call:kernel.Enroll",
                "call:kernel.GetMeasurements", "subscribe:kernel.audit"]
settings = {{ trusted_keys = [{{ label = "test", public_key = "{pub_hex(KEY)}" }}] }}

[services.modelstore]
command = ["{{python}}", "-m", "services.modelstore"]
requires = ["security"]
capabilities = ["call:security.VerifySignature", "call:security.Seal", "call:security.Unseal",
                "call:security.AuditAppend", "publish:modelstore.*"]
settings = {{ trial_min_requests = 50, trial_window_s = 0.2, trial_window_min_requests = 10, trial_windows = 2 }}
max_restarts = 50     # the crash tests kill it over and over
backoff_initial = 0.05
backoff_max = 0.2
{extra}"""


async def install(bus, data: bytes) -> Installed:
    return (await bus.request("modelstore", Install(), frames=[data], timeout=60)).decode(Installed)


def store_files(system: System) -> list[str]:
    root = system.run_dir / "state" / "modelstore"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "FAULT")


@pytest.fixture
def store_system(make_system):
    system: System = make_system(config())
    anyio.run(lambda: system.wait_ready("security", "modelstore"))
    return system


async def test_every_bad_bundle_is_refused_with_its_own_error_and_the_store_unchanged(store_system) -> None:
    system = store_system
    good = bundle("1.1.0", KEY)
    async with system.client() as bus:
        await install(bus, good)
        before, listing = store_files(system), await bus.call("modelstore", ListModels(), ModelList)
        cases = {
            "tampered model": (BadMessage, "full.onnx does not match what was signed",
                               zip_replace(bundle("1.2.0", KEY), "full.onnx", lambda c: c[:-1] + bytes([c[-1] ^ 1]))),
            "tampered manifest": (BadMessage, "does not match what was signed",
                                  zip_replace(bundle("1.2.0", KEY), "manifest.json",
                                              lambda c: c.replace(b'"name":"demo"', b'"name":"demo","author":"x"'))),
            "wrong signer": (Rejected, "not in the trust store", bundle("1.2.0", make_key())),
            "unsigned": (BadMessage, "not signed", bundle("1.2.0")),
            "downgrade": (Rejected, "is not newer than 1.1.0", bundle("1.0.0", KEY)),
            "same version": (Rejected, "is not newer than 1.1.0", bundle("1.1.0", KEY)),
            "not loadable": (BadMessage, "ONNX Runtime cannot load", bundle("1.2.0", KEY, garbage=True)),
            "not a bundle": (BadMessage, "not a bundle archive", b"PK\x03\x04 garbage"),
        }
        messages = set()
        for label, (error, text, data) in cases.items():
            with pytest.raises(error) as info:
                await install(bus, data)
            assert text in str(info.value), (label, str(info.value))
            messages.add(str(info.value))
        assert len(messages) >= 6  # each its own error
        assert store_files(system) == before
        assert await bus.call("modelstore", ListModels(), ModelList) == listing


async def test_blobs_are_encrypted_and_served_decrypted(store_system) -> None:
    system = store_system
    data = bundle("1.0.0", KEY)
    model = Bundle.from_bytes(data).files["full.onnx"]
    async with system.client() as bus:
        await install(bus, data)
        for path in (system.run_dir / "state" / "modelstore" / "blobs").iterdir():
            raw = path.read_bytes()
            assert MARKER.tobytes()[:64] not in raw and model[:64] not in raw
        await bus.call("modelstore", Activate(name="demo", version="1.0.0"), ModelState)
        incoming = await bus.request("modelstore", GetModel(name="demo"))
        assert incoming.decode(ModelBytes).version == "1.0.0"
        assert bytes(incoming.frames[0].buffer) == model


async def serve_side_by_side(bus, trial: str, baseline: str, *, errors: tuple[int, int], p95_ms: tuple[float, float],
                             latency_hist: bool = False) -> list[str]:
    """Report both versions' health as a scheduler serving them side by side does (30
    requests each, every 20 ms: windows of 0.2 s) until the store ends the trial; the
    verdicts the store answered."""
    verdicts = []
    with anyio.fail_after(20):
        while True:
            for version, e, p95 in ((baseline, errors[1], p95_ms[1]), (trial, errors[0], p95_ms[0])):
                hist = ReportHealth.histogram([p95] * 30) if latency_hist else {}
                verdicts.append((await bus.call("modelstore", ReportHealth(
                    name="demo", version=version, requests=30, errors=e, p95_ms=0.0 if hist else p95,
                    latency_hist=hist), HealthRecorded)).verdict)
            state = (await bus.call("modelstore", ListModels(), ModelList)).models[0]
            if not state.trial:
                return verdicts
            await anyio.sleep(0.02)  # the scheduler's report period, shortened


async def test_trial_rolls_back_by_itself_or_commits(store_system) -> None:
    system = store_system
    async with system.client() as bus:
        sub = await bus.subscribe("modelstore.")
        for v in ("1.0.0", "1.1.0", "1.2.0"):
            await install(bus, bundle(v, KEY))
        state = await bus.call("modelstore", Activate(name="demo", version="1.0.0"), ModelState)
        assert state.active == "1.0.0" and not state.trial
        state = await bus.call("modelstore", Activate(name="demo", version="1.1.0"), ModelState)
        assert state.active == "1.1.0" and state.trial == "1.1.0" and state.previous == "1.0.0"
        # 20% errors against none, over the same windows: rolled back by the store itself
        verdicts = await serve_side_by_side(bus, "1.1.0", "1.0.0", errors=(6, 0), p95_ms=(5.0, 5.0))
        assert set(verdicts) <= {"trial", "", "rolled-back"} and verdicts.count("rolled-back") <= 1
        state = (await bus.call("modelstore", ListModels(), ModelList)).models[0]
        assert state.active == "1.0.0" and not state.trial
        # a healthy trial, canaried with a split, is committed and the split cleared
        await bus.call("modelstore", Activate(name="demo", version="1.2.0"), ModelState)
        await bus.call("modelstore", Split(name="demo", weights={"1.0.0": 50, "1.2.0": 50}), ModelState)
        verdicts = await serve_side_by_side(bus, "1.2.0", "1.0.0", errors=(0, 0), p95_ms=(5.5, 5.0), latency_hist=True)
        assert "rolled-back" not in verdicts
        state = (await bus.call("modelstore", ListModels(), ModelList)).models[0]
        assert state.active == "1.2.0" and not state.trial and state.split == {} and state.previous == "1.0.0"
        events = {}
        with anyio.move_on_after(5):
            while not {"modelstore.rolledback", "modelstore.committed"} <= set(events):
                event = await sub.receive()
                events[event.header.dest] = event.decode(ModelEvent)
        assert "trial of 1.1.0 failed its health gates against 1.0.0: error rate 20.00% of " in \
            events["modelstore.rolledback"].detail
        committed = events["modelstore.committed"]
        assert committed.version == "1.2.0" and committed.detail.startswith("against 1.0.0: error rate 0.00% of ")
        assert committed.detail.endswith("within 1.2x); the split is cleared")
        # remove is refused for the active version, allowed for an old one
        with pytest.raises(Rejected, match="active"):
            await bus.call("modelstore", Remove(name="demo", version="1.2.0"), ModelState)
        await bus.call("modelstore", Remove(name="demo", version="1.1.0"), ModelState)
        state = await bus.call("modelstore", Rollback(name="demo"), ModelState)
        assert state.active == "1.0.0"
    audit = system.busctl("audit", "tail", "-n", "100", "--json", check=True).stdout
    kinds = [r["kind"] for r in msgspec.json.decode(audit)]
    for kind in ("model-installed", "model-activated", "model-rolledback", "model-committed", "model-removed"):
        assert kind in kinds


def test_a_90_10_split_is_within_2_points_and_sticky() -> None:
    weights = {"1.2.0": 90, "1.3.0": 10}
    picks = [pick_version("demo", f"key-{i}", weights) for i in range(10_000)]
    share = picks.count("1.3.0") / len(picks)
    assert abs(share - 0.10) <= 0.02
    assert picks == [pick_version("demo", f"key-{i}", weights) for i in range(10_000)]


async def test_split_over_the_bus(store_system) -> None:
    system = store_system
    async with system.client() as bus:
        for v in ("1.0.0", "1.1.0"):
            await install(bus, bundle(v, KEY))
        await bus.call("modelstore", Activate(name="demo", version="1.0.0"), ModelState)
    out = system.busctl("model", "split", "demo", "1.0.0=90", "1.1.0=10", check=True).stdout
    assert "split 1.0.0=90 1.1.0=10" in out
    async with system.client() as bus:
        for i in range(100):
            r = await bus.call("modelstore", Resolve(name="demo", key=f"k{i}"), Resolved)
            assert r.version == pick_version("demo", f"k{i}", {"1.0.0": 90, "1.1.0": 10})


FAULTS = ["install:blobs-written", "install:manifest-staged", "install:manifest-written", "activate:before",
          "state-tmp-written", "activate:after"]


async def test_kill_9_at_every_fault_point_leaves_a_consistent_store(store_system) -> None:
    system = store_system
    root = system.run_dir / "state" / "modelstore"
    async with system.client() as bus:
        await install(bus, bundle("1.0.0", KEY))
        await bus.call("modelstore", Activate(name="demo", version="1.0.0"), ModelState)
    version = 0
    for point in FAULTS:
        version += 1
        new = f"1.{version}.0"
        pid = next(x.pid for x in (await system.wait_ready("modelstore")).services if x.name == "modelstore")
        (root / "FAULT").write_text(point)
        async with system.client() as bus:
            try:
                if point.startswith("install"):
                    await install(bus, bundle(new, KEY))
                else:
                    await install(bus, bundle(new, KEY))
                    await bus.call("modelstore", Activate(name="demo", version=new), ModelState, timeout=10)
            except (Unavailable, Exception):
                pass
        assert not (root / "FAULT").exists(), f"fault point {point} was never reached"
        await system.wait_restarted("modelstore", pid)
        async with system.client() as bus:
            state = (await bus.call("modelstore", ListModels(), ModelList)).models[0]
            assert state.active in (f"1.{version - 1}.0" if version > 1 else "1.0.0", new, *state.versions)
            served = await bus.request("modelstore", GetModel(name="demo"))
            assert served.decode(ModelBytes).version == state.active
            # bring the store to a known state for the next point
            if new not in state.versions:
                await install(bus, bundle(new, KEY))
            await bus.call("modelstore", Activate(name="demo", version=new), ModelState)
        assert not [p for p in root.rglob("*.tmp")]


async def test_random_kills_during_installs(store_system) -> None:
    system = store_system
    rng = np.random.default_rng(1)
    async with system.client() as bus:
        await install(bus, bundle("2.0.0", KEY))
        await bus.call("modelstore", Activate(name="demo", version="2.0.0"), ModelState)
    for i in range(1, 6):
        pid = next(s.pid for s in (await system.wait_ready("modelstore")).services if s.name == "modelstore")
        async with system.client() as bus:
            async with anyio.create_task_group() as tg:
                async def attempt() -> None:
                    try:
                        await install(bus, bundle(f"2.{i}.0", KEY))
                        await bus.call("modelstore", Activate(name="demo", version=f"2.{i}.0"), ModelState)
                    except Exception:
                        pass
                tg.start_soon(attempt)
                await anyio.sleep(float(rng.uniform(0.0, 0.3)))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        await system.wait_restarted("modelstore", pid)
        async with system.client() as bus:
            state = (await bus.call("modelstore", ListModels(), ModelList)).models[0]
            served = await bus.request("modelstore", GetModel(name="demo"))
            assert served.decode(ModelBytes).version == state.active
            assert state.active in (f"2.{i - 1}.0", f"2.{i}.0") or state.active in state.versions


# -- offline tools -----------------------------------------------------------------------------


def edgebus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "edgebus"), *args], capture_output=True, text=True, timeout=120)


def test_keygen_pack_sign_verify_inspect_quantize(tmp_path: Path) -> None:
    assert edgebus("keygen", "--out", str(tmp_path / "k")).returncode == 0
    assert oct((tmp_path / "k.key").stat().st_mode & 0o777) == "0o600"
    model = tmp_path / "m.onnx"
    model.write_bytes(onnx_model(1.0))
    packed = edgebus("model", "pack", str(model), "--name", "demo", "--version", "1.0.0", "--out", str(tmp_path / "b.ebm"))
    assert packed.returncode == 0, packed.stderr
    manifest = msgspec.json.decode(edgebus("model", "inspect", str(tmp_path / "b.ebm")).stdout)["manifest"]
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": [None, 4]}]
    assert edgebus("model", "verify", str(tmp_path / "b.ebm")).returncode == 1  # unsigned
    assert edgebus("model", "sign", str(tmp_path / "b.ebm"), "--key", str(tmp_path / "k.key")).returncode == 0
    ok = edgebus("model", "verify", str(tmp_path / "b.ebm"), "--pubkey", str(tmp_path / "k.pub"))
    assert ok.returncode == 0, ok.stderr
    edgebus("keygen", "--out", str(tmp_path / "other"))
    assert edgebus("model", "verify", str(tmp_path / "b.ebm"), "--pubkey", str(tmp_path / "other.pub")).returncode == 1
    # a 4x4 MatMul gains nothing from int8 (whether it is added depends on this CPU): --force adds it
    q = edgebus("model", "quantize", str(tmp_path / "b.ebm"), "--out", str(tmp_path / "q.ebm"), "--runs", "5", "--force")
    assert q.returncode == 0, q.stderr
    assert "size: full" in q.stdout and "latency on x 1x4 " in q.stdout
    assert set(Bundle.load(tmp_path / "q.ebm").manifest.variants) == {"full", "int8"}


def test_the_manifest_ignores_unknown_fields_but_pack_refuses_them_in_a_spec(tmp_path: Path) -> None:
    # a newer producer's manifest (an extra member, top level and nested) still decodes
    newer = msgspec.to_builtins(Bundle.load("services/modelstore/demo/vibration-anomaly-1.0.0.ebm").manifest)
    newer["labels"] = ["ok", "fault"]
    newer["fallback"]["hysteresis"] = 0.1
    assert msgspec.convert(newer, Manifest).fallback.feature == "kurtosis"
    with pytest.raises(msgspec.ValidationError, match="threshold"):  # but types stay strict
        msgspec.convert(newer | {"fallback": {"feature": "kurtosis", "threshold": "4"}}, Manifest)
    model = tmp_path / "m.onnx"
    model.write_bytes(onnx_model(1.0))
    (tmp_path / "spec.json").write_text('{"fallback": {"feature": "x", "treshold": 1.0}}')
    packed = edgebus("model", "pack", str(model), "--name", "demo", "--version", "1.0.0", "--spec",
                     str(tmp_path / "spec.json"), "--out", str(tmp_path / "b.ebm"))
    assert packed.returncode == 1 and "fallback.treshold" in packed.stderr
    assert not (tmp_path / "b.ebm").exists()


async def test_busctl_model_commands(store_system, tmp_path: Path) -> None:
    system = store_system
    for v in ("1.0.0", "1.1.0"):
        (tmp_path / f"{v}.ebm").write_bytes(bundle(v, KEY))
        out = system.busctl("model", "install", str(tmp_path / f"{v}.ebm"), check=True).stdout
        assert f"installed demo {v}" in out
    assert "active 1.0.0" in system.busctl("model", "activate", "demo", "1.0.0", check=True).stdout
    assert "(in trial)" in system.busctl("model", "activate", "demo", "1.1.0", check=True).stdout
    listing = msgspec.json.decode(system.busctl("model", "list", "--json", check=True).stdout)
    assert listing[0]["active"] == "1.1.0" and listing[0]["trial"] == "1.1.0"
    inspect = msgspec.json.decode(system.busctl("model", "inspect", "demo", "1.0.0", check=True).stdout)
    assert inspect["manifest"]["version"] == "1.0.0"
    bad = system.busctl("model", "remove", "demo", "1.1.0")
    assert bad.returncode == 1 and "active" in bad.stderr
    assert "active 1.0.0" in system.busctl("model", "rollback", "demo", check=True).stdout
    (tmp_path / "bad.ebm").write_bytes(bundle("2.0.0"))
    bad = system.busctl("model", "install", str(tmp_path / "bad.ebm"))
    assert bad.returncode == 1 and "not signed" in bad.stderr
