"""The command-line tools answer a user's mistake with one line, never a traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import BIN


def edgebus(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "edgebus"), *args], capture_output=True, text=True, timeout=60, **kw)


def _relu(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_user_errors_are_one_line_naming_what_was_wrong(tmp_path: Path) -> None:
    model = _relu(tmp_path / "relu.onnx")
    (tmp_path / "spec.json").write_text("{not json")
    (tmp_path / "bad.key").write_text("zz\n")
    cases = [
        (("keygen", "--out", "/no/such/dir/k"), "/no/such/dir/k.key: No such file or directory"),
        (("model", "pack", str(tmp_path / "missing.onnx"), "--name", "m", "--version", "1.0.0", "--out", "o.ebm"),
         "missing.onnx: No such file or directory"),
        (("model", "pack", str(model), "--name", "m", "--version", "1.0.0", "--spec", str(tmp_path / "spec.json"),
          "--out", str(tmp_path / "o.ebm")), "spec.json is not JSON"),
        (("model", "pack", str(model), "--name", "m", "--version", "1.0.0", "--key", str(tmp_path / "bad.key"),
          "--out", str(tmp_path / "o.ebm")), "bad.key is not an ed25519 private key"),
        (("model", "inspect", str(tmp_path / "nothing.ebm")), "nothing.ebm"),
        (("config", "check", str(tmp_path / "none.toml")), "cannot read the file"),
    ]
    for args, expected in cases:
        out = edgebus(*args)
        assert out.returncode != 0, args
        assert "Traceback" not in out.stderr, (args, out.stderr)
        assert expected in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)


def test_version_and_a_closed_pipe() -> None:
    out = edgebus("--version")
    assert out.returncode == 0 and out.stdout.startswith("edgebus ")
    read, write = os.pipe()
    os.close(read)  # the reader (`| head`) is gone before the tool writes
    try:
        proc = subprocess.run([str(BIN / "edgebus"), "config", "default"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode == 141
