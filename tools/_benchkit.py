"""What the benchmark scripts share: a throwaway system, a MatMul model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["boot", "stop", "matmul_onnx", "write_results"]


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


def write_results(path: str | Path, results: dict) -> None:
    """The run's figures as indented JSON at ``path`` (its directory created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
