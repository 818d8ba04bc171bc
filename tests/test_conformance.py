"""`edgebus conformance`: the Python SDK's peer and the JavaScript reference peer pass every
scenario; a peer with one deliberate fault fails the scenario that covers it, and only it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools._conformance_scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parent.parent
EDGEBUS = Path(sys.executable).parent / "edgebus"
PY_PEER = f"{sys.executable} -m services.examples.conformance"
JS_DIR = ROOT / "protocols" / "examples" / "js"
NAMES = [s.name for s in SCENARIOS]


def conformance(peer: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EDGEBUS), "conformance", "--peer", peer, *args], capture_output=True, text=True,
                          timeout=240, cwd=ROOT)


def results(proc: subprocess.CompletedProcess[str]) -> dict[str, dict]:
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    return {r["scenario"]: r for r in lines}


def failed(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [name for name, r in results(proc).items() if not r["ok"]]


def test_python_sdk_peer_passes_every_scenario() -> None:
    proc = conformance(PY_PEER, "-o", "json")
    got = results(proc)
    assert list(got) == NAMES, proc.stdout + proc.stderr
    assert not failed(proc), "\n".join(f"{n}: {got[n]['detail']}" for n in failed(proc)) + proc.stderr
    assert proc.returncode == 0
    assert all(r["section"] for r in got.values())


@pytest.fixture(scope="module")
def js_peer() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the JavaScript reference peer (Debian: apt-get install nodejs npm)")
    if not (JS_DIR / "node_modules" / "zeromq").is_dir():
        proc = subprocess.run([npm, "ci", "--prefix", str(JS_DIR), "--no-audit", "--no-fund"], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            pytest.skip(f"npm ci --prefix {JS_DIR} failed (offline?): {proc.stderr.strip().splitlines()[-1:]}")
    return f"{node} {JS_DIR / 'peer.js'}"


def test_javascript_reference_peer_passes_every_scenario(js_peer: str) -> None:
    proc = conformance(js_peer, "-o", "json")
    got = results(proc)
    assert list(got) == NAMES, proc.stdout + proc.stderr
    assert not failed(proc), "\n".join(f"{n}: {got[n]['detail']}" for n in failed(proc)) + proc.stderr
    assert proc.returncode == 0


def test_a_peer_that_does_not_check_tags_fails_tag_mismatch_only() -> None:
    proc = conformance(f"{PY_PEER} --fault tags")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("[FAILED]")] == ["tag-mismatch"], proc.stdout
    assert sum(line.startswith("[  OK  ]") for line in lines) == len(NAMES) - 1
    assert "body tag is Echo" in next(line for line in lines if line.startswith("[FAILED]"))
    assert f"{len(NAMES) - 1} of {len(NAMES)} scenarios passed" in proc.stdout
    assert "the peer's last output lines" in proc.stderr


def test_a_peer_that_does_not_check_tensors_fails_tensors_only() -> None:
    kernel_side = ",".join(NAMES[:NAMES.index("newest-wins") + 1])  # (the fault shows against the real kernel)
    proc = conformance(f"{PY_PEER} --fault tensors", "-o", "json", "--only", kernel_side)
    assert proc.returncode == 1
    assert failed(proc) == ["tensors"], proc.stdout
    assert "dtype not in the list" in results(proc)["tensors"]["detail"]


def test_a_peer_deaf_to_the_kernels_silence_fails_liveness() -> None:
    proc = conformance(f"{PY_PEER} --fault liveness", "-o", "json", "--only", "hello,heartbeats,liveness")
    assert proc.returncode == 1
    assert list(results(proc)) == ["hello", "heartbeats", "liveness"]
    assert failed(proc) == ["liveness"], proc.stdout


def test_a_javascript_peer_without_heartbeats_fails_heartbeats(js_peer: str) -> None:
    proc = conformance(f"{js_peer} --fault heartbeats", "-o", "json", "--only", "hello,heartbeats,deadlines")
    assert proc.returncode == 1
    assert failed(proc) == ["heartbeats"], proc.stdout
    assert "0 heartbeats" in results(proc)["heartbeats"]["detail"]


def test_usage_errors_are_one_line() -> None:
    proc = conformance(PY_PEER, "--only", "no-such-scenario")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("edgebus conformance: no scenario 'no-such-scenario'") and proc.stderr.count("\n") == 1
    proc = conformance("/nonexistent/peer --flag")
    assert proc.returncode == 2
    assert "no program '/nonexistent/peer'" in proc.stderr and proc.stderr.count("\n") == 1
    proc = conformance(PY_PEER, "--config", "/nonexistent/system.toml")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "/nonexistent/system.toml" in proc.stderr


def test_a_peer_that_starts_over_instead_of_exiting_passes() -> None:
    """1.3 allows both: the SDK's reconnecting client takes its name back and says Hello on
    a new connection when the kernel falls silent."""
    proc = conformance(f"{PY_PEER} --reconnect", "-o", "json", "--only", "newest-wins,hello,liveness")
    got = results(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert got["newest-wins"]["detail"] == "the peer started a new session"
    assert got["liveness"]["detail"].startswith("said Hello on a new connection")


def test_a_config_without_the_conformance_service_fails_saying_so(tmp_path: Path) -> None:
    config = tmp_path / "system.toml"
    config.write_text("[bus]\nheartbeat_interval = 0.5\n")
    proc = conformance(PY_PEER, "--config", str(config), "-o", "json", "--only", "handshake,requests")
    assert proc.returncode == 1
    got = results(proc)
    assert list(got) == ["handshake", "requests"] and failed(proc) == ["handshake", "requests"]
    assert all("must declare [services.conformance] without a command" in r["detail"] for r in got.values())
