"""`edgebus model quantize`: measured on the inputs a model serves (--shape, --value, or the
contract's representative default, each guess warned about), full and int8 interleaved, int8
added only when smaller and not slower (--force adds it anyway), and a graph ONNX Runtime
cannot quantize refused with one message, exit 1, no traceback: on real models as they ship
(ppocr cls, det and silero-vad from wheels on the package index) and on a graph made here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.modelstore import Bundle
from tools.edgebus import build_parser

from conftest import ROOT
from test_model_contract import pack, packed


def quantize(capsys: pytest.CaptureFixture[str], bundle: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    """`edgebus model quantize`, in this process (3 runs): (exit status, stdout, stderr)."""
    capsys.readouterr()
    parsed = build_parser().parse_args(["model", "quantize", str(bundle), "--out", str(out), "--runs", "3", *extra])
    code = parsed.func(parsed)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def cls_bundle(real_model, capsys, tmp_path: Path) -> Path:
    packed(capsys, real_model("ppocr-cls"), tmp_path / "cls.ebm", name="cls")
    return tmp_path / "cls.ebm"


def test_quantize_measures_on_the_shape_given_and_says_why_int8_is_not_added(cls_bundle, capsys, tmp_path) -> None:
    out = tmp_path / "cls-q.ebm"
    code, stdout, stderr = quantize(capsys, cls_bundle, out, "--shape", "x=1x3x48x192")
    # the text direction classifier's int8 graph is larger than its full one (its weights are
    # small, the quantize/dequantize nodes are not): said plainly, and not added
    assert code == 1, stderr
    assert "latency on x 1x3x48x192 (median of 3 interleaved runs each" in stdout
    assert "int8 is larger than full" in stderr and "not added (pass --force to add it anyway)" in stderr
    assert "warning" not in stderr  # nothing was guessed
    assert not out.exists()
    # --force adds it; the int8 graph runs on the shape measured and answers like full
    code, stdout, stderr = quantize(capsys, cls_bundle, out, "--shape", "x=1x3x48x192", "--force")
    assert code == 0, stderr
    assert f"int8 variant added to {out}" in stdout and "(--force)" in stdout
    bundle = Bundle.load(out)
    assert sorted(bundle.manifest.variants) == ["full", "int8"]
    import onnxruntime as ort

    x = np.random.default_rng(1).random((2, 3, 48, 192), dtype=np.float32)
    full, int8 = (ort.InferenceSession(bundle.files[f], providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                  for f in ("full.onnx", "int8.onnx"))
    assert int8.shape == full.shape == (2, 2) and np.allclose(int8, full, atol=0.1)  # probabilities, near


def test_quantize_without_shape_measures_a_representative_image_and_warns(cls_bundle, capsys, tmp_path) -> None:
    code, stdout, stderr = quantize(capsys, cls_bundle, tmp_path / "q.ebm")
    # not 1x3x1x1 (what it measured before): batch 1, an image's height and width 224, guessed aloud
    assert "latency on x 1x3x224x224" in stdout, stdout
    assert ("warning: input 'x' float32 [?, 3, ?, ?] (batch axis 0): measured at 1x3x224x224, guessing axis 2 = 224 "
            "(an image side), axis 3 = 224 (an image side); give the size you serve with --shape x=...") in stderr
    assert code == 1 and "not added" in stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--shape", "x=1x4x48x192"], "input 'x' takes float32 [?, 3, ?, ?], got float32 [1, 4, 48, 192] (axis 1 is 4, not 3)"),
    (["--shape", "x=1x3x48"], "3 axes, not 4"),
    (["--shape", "x=1x3xHx192"], "--shape x=1x3xHx192: give the sizes as AxBxC"),
    (["--shape", "image=1x3x48x192"], "--shape names input(s) 'image', which the model does not have; its inputs: 'x'"),
    (["--shape", "x"], "--shape 'x' is not NAME=VALUE"),
    (["--value", "x=a lot"], "--value x=a lot: input 'x' is float32; give a number"),
])
def test_quantize_refuses_inputs_that_do_not_fit_the_contract(cls_bundle, capsys, tmp_path, args, message) -> None:
    code, stdout, stderr = quantize(capsys, cls_bundle, tmp_path / "q.ebm", *args)
    assert code == 1 and message in stderr, stderr
    assert stdout == "" and not (tmp_path / "q.ebm").exists()


def test_quantize_needs_the_value_of_an_integer_scalar(real_model, capsys, tmp_path) -> None:
    # silero-vad: input [N, samples], state [2, N, 128] without batch axis, sr an int64 scalar
    vad = tmp_path / "vad.ebm"
    packed(capsys, real_model("silero-vad"), vad, name="vad")
    code, _, stderr = quantize(capsys, vad, tmp_path / "q.ebm")
    assert code == 1
    assert ("input 'sr' is an int64 scalar, a parameter quantize cannot guess (a sample rate, a count...): give its "
            "value, e.g. --value sr=16000") in stderr
    code, stdout, stderr = quantize(capsys, vad, tmp_path / "q.ebm", "--value", "sr=16000", "--shape", "input=1x512")
    assert "latency on input 1x512, state 2x1x128, sr=16000 " in stdout, stderr
    assert "guessing axis 1 = 1 (no batch axis: taken as a state's batch)" in stderr
    assert "Traceback" not in stderr


def unquantizable_model(path: Path) -> Path:
    """A graph ONNX Runtime runs but cannot quantize: a convolution with a bias whose weight is
    computed by a node, not an initializer (its dynamic quantisation raises)."""
    weight = numpy_helper.from_array(np.random.default_rng(0).random((4, 3, 3, 3), dtype=np.float32), "w0")
    bias = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w0"], ["w"]), helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, None, None])], [weight, bias])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_graph_onnx_runtime_cannot_quantize_is_refused_with_one_message(capsys, tmp_path) -> None:
    bundle, out = tmp_path / "conv.ebm", tmp_path / "conv-q.ebm"
    packed(capsys, unquantizable_model(tmp_path / "conv.onnx"), bundle, name="conv")
    # as a user runs it: a separate process, its whole stderr
    proc = subprocess.run([sys.executable, "-m", "tools.edgebus", "model", "quantize", str(bundle), "--out", str(out),
                           "--shape", "x=1x3x32x32"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == ("edgebus: cannot quantize conv 1.0.0: ONNX Runtime cannot quantize this graph (Expected w "
                           "to be an initializer); nothing written\n"), proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_the_real_text_detector_is_refused_likewise(real_model, capsys, tmp_path) -> None:
    # PP-OCRv4's detector as it ships: ONNX Runtime's dynamic quantisation raises on it
    det = tmp_path / "det.ebm"
    code, err = pack(capsys, real_model("ppocr-det"), det, name="det")
    assert code == 0, err
    code, stdout, stderr = quantize(capsys, det, tmp_path / "q.ebm", "--shape", "x=1x3x640x640")
    assert code == 1 and stdout == ""
    assert stderr.startswith("edgebus: cannot quantize det 1.0.0: ONNX Runtime cannot quantize this graph (Expected "), stderr
    assert stderr.endswith("to be an initializer); nothing written\n") and stderr.count("\n") == 1
