"""What the benchmark scripts share: a throwaway system (its config, models packed, signed
and installed in it), a MatMul model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["boot", "client", "inference_config", "install", "matmul_onnx", "pack_signed", "stop", "write_results"]


def boot(config: str | None) -> tuple[subprocess.Popen[bytes], Path]:
    """``edgebus boot`` on ``config`` (None: the built-in default) in a fresh directory;
    returns once the bus is up (polled every 2 ms: boot-time benchmarks time through it)."""
    tmp = Path(tempfile.mkdtemp(prefix="edgebus-bench-"))
    argv = [str(Path(sys.executable).parent / "edgebus"), "boot", "--run-dir", str(tmp / "run")]
    if config is not None:
        (tmp / "system.toml").write_text(config)
        argv += ["--config", str(tmp / "system.toml")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(tmp / "kernel.log", "wb"),
                            env={**os.environ, "EDGEBUS_LOG_LEVEL": "warning"})
    while not (tmp / "run" / "credentials" / "operator").exists():
        if proc.poll() is not None:
            raise SystemExit(f"edgebus boot failed: {tmp / 'kernel.log'}")
        time.sleep(0.002)
    return proc, tmp


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def inference_config(pub: str, scheduler_settings: str, driver_settings: str = "threads = 1", extra: str = "") -> str:
    """A system for inference: security trusting the hex Ed25519 public key ``pub``, the model
    store, one CPU driver (``accel-cpu``, settings ``{ driver_settings }``) and the scheduler
    with ``scheduler_settings`` (TOML lines of its settings table); ``extra`` is appended
    (more of the scheduler's settings tables, e.g. its graphs, or more services)."""
    return f"""
[services.security]
command = ["{{python}}", "-m", "services.security"]
capabilities = ["call:kernel.Grant", "call:kernel.Revoke", "call:kernel.Enroll", "call:kernel.GetMeasurements", "subscribe:kernel.audit"]
settings = {{ trusted_keys = [{{ label = "bench", public_key = "{pub}" }}] }}
[services.modelstore]
command = ["{{python}}", "-m", "services.modelstore"]
requires = ["security"]
capabilities = ["call:security.VerifySignature", "call:security.Seal", "call:security.Unseal", "call:security.AuditAppend", "publish:modelstore.*"]
[services.accel-cpu]
command = ["{{python}}", "-m", "drivers.accel"]
requires = ["modelstore"]
capabilities = ["call:modelstore.GetModel", "call:modelstore.GetAsset"]
settings = {{ {driver_settings} }}
[services.scheduler]
command = ["{{python}}", "-m", "services.scheduler"]
requires = ["modelstore"]
capabilities = ["call:modelstore.*", "call:accel-*", "subscribe:modelstore.*", "subscribe:health.*", "publish:scheduler.*"]
[services.scheduler.settings]
{scheduler_settings.strip()}
{extra}"""


def pack_signed(model_path: Path, name: str, spec: dict[str, Any], key: Any, tmp: Path) -> bytes:
    """``edgebus model pack`` as a user runs it (in this process: ``name`` 1.0.0, the contract
    read from the graph, ``spec`` written beside it as ``tmp/<name>.json``), signed with ``key``."""
    from services.modelstore import Bundle
    from tools.edgebus import build_parser

    spec_path, out = tmp / f"{name}.json", tmp / f"{name}.ebm"
    spec_path.write_text(json.dumps(spec))
    args = build_parser().parse_args(["model", "pack", str(model_path), "--name", name, "--version", "1.0.0",
                                      "--out", str(out), "--spec", str(spec_path)])
    if args.func(args) != 0:
        raise SystemExit(f"cannot pack {model_path}")
    bundle = Bundle.load(out)
    bundle.sign(key)
    return bundle.to_bytes()


def client(tmp: Path) -> Any:
    """A bus client (as the operator) of the system ``boot`` made in ``tmp``."""
    from services import connect

    return connect("bench", run_dir=tmp / "run", credential=(tmp / "run/credentials/operator").read_text())


async def install(tmp: Path, bundles: Mapping[str, bytes]) -> None:
    """Once every service of the system in ``tmp`` is ready, install each signed bundle
    (model name -> bundle) and activate the version the model store installed."""
    from protocols import ListServices, ServiceList
    from protocols.modelstore import Activate, Install, Installed, ModelState

    async with client(tmp) as bus:
        sub = await bus.subscribe("kernel.services")
        while True:
            st = await bus.call("kernel", ListServices(), ServiceList)
            if st.services and all(s.state == "ready" for s in st.services):
                break
            await sub.receive()
        for data in bundles.values():
            installed = (await bus.request("modelstore", Install(), frames=[data], timeout=120)).decode(Installed)
            await bus.call("modelstore", Activate(name=installed.name, version=installed.version), ModelState)


def matmul_onnx(n: int, seed: int = 0) -> bytes:
    """y = x @ w with a random n x n float32 w: n=1600 makes a 10 MB model."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((n, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(w, "w")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def channel_mean_onnx() -> bytes:
    """y = mean over the channels of an NCHW float32 image x (megabytes in, a third of that out)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1)], "mean",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, None, None])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m.SerializeToString()


def write_results(path: str | Path, results: dict) -> None:
    """The run's figures as indented JSON at ``path`` (its directory created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
