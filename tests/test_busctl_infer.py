"""`busctl infer` on models with several named inputs and outputs: inputs from .npy, image and
.wav files and from the command line (--value), each by name, a batch axis added from the
model's contract, --only to get some outputs, large outputs summarised, text decoded, -o json;
and the pure parts (reading files, fitting inputs, summaries) on their own.

The end-to-end tests boot one real system (`edgebus boot`: security, model store, scheduler,
one ONNX Runtime driver) for the module and install small models made here."""

from __future__ import annotations

import json
import subprocess
import wave
from pathlib import Path
from typing import Any, Iterator

import anyio
import msgspec
import numpy as np
import pytest

from protocols.modelstore import Activate, Install, ModelState, TensorSpec
from services.modelstore import Bundle, Manifest
from tools._busctl_tensors import (
    InputError, decode_text, fit_input, load_input, name_inputs, output_json, parse_value, read_wav, show_output,
    split_input, summarise,
)

from conftest import System
from test_modelstore import KEY

W = (np.arange(4000, dtype=np.float32).reshape(4, 1000) % 97) / 97
W[0, 281] = 5.0  # the top class of x = [1, 0, 0, 0]


# -- models made here --------------------------------------------------------------------------


def _graph(nodes: list[Any], inputs: list[Any], outputs: list[Any], init: list[Any] = ()) -> bytes:
    from onnx import helper

    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(init)),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def _bundle(name: str, model: bytes, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
            **more: Any) -> bytes:
    manifest = msgspec.convert({"name": name, "version": "1.0.0", "created": 1.0, "inputs": inputs,
                                "outputs": outputs, "variants": {"full": {"file": "full.onnx", "sha256": "", "size": 0}},
                                **more}, Manifest)
    b = Bundle.create(manifest, {"full.onnx": model})
    b.sign(KEY)
    return b.to_bytes()


def multi_model() -> bytes:
    """x float32 [N, 4] and scale float32 [] (no batch axis) -> y = x * scale [N, 4] and
    logits = x @ W [N, 1000]."""
    from onnx import TensorProto as T, helper, numpy_helper

    return _graph([helper.make_node("Mul", ["x", "scale"], ["y"]), helper.make_node("MatMul", ["x", "w"], ["logits"])],
                   [helper.make_tensor_value_info("x", T.FLOAT, [None, 4]),
                    helper.make_tensor_value_info("scale", T.FLOAT, [])],
                   [helper.make_tensor_value_info("y", T.FLOAT, [None, 4]),
                    helper.make_tensor_value_info("logits", T.FLOAT, [None, 1000])],
                   [numpy_helper.from_array(W, "w")])


def multi_bundle() -> bytes:
    return _bundle("multi", multi_model(),
                   [{"name": "x", "dtype": "float32", "shape": [None, 4], "batch_axis": 0},
                    {"name": "scale", "dtype": "float32", "shape": [], "batch_axis": None}],
                   [{"name": "y", "dtype": "float32", "shape": [None, 4], "batch_axis": 0},
                    {"name": "logits", "dtype": "float32", "shape": [None, 1000], "batch_axis": 0}])


def audio_bundle() -> bytes:
    """audio float32 [N, S] -> peak = max |audio| [N] and mean [N]."""
    from onnx import TensorProto as T, helper

    model = _graph([helper.make_node("Abs", ["audio"], ["a"]),
                    helper.make_node("ReduceMax", ["a"], ["peak"], axes=[1], keepdims=0),
                    helper.make_node("ReduceMean", ["audio"], ["mean"], axes=[1], keepdims=0)],
                   [helper.make_tensor_value_info("audio", T.FLOAT, [None, None])],
                   [helper.make_tensor_value_info("peak", T.FLOAT, [None]),
                    helper.make_tensor_value_info("mean", T.FLOAT, [None])])
    return _bundle("audio", model, [{"name": "audio", "dtype": "float32", "shape": [None, None], "batch_axis": 0}],
                   [{"name": "peak", "dtype": "float32", "shape": [None], "batch_axis": 0},
                    {"name": "mean", "dtype": "float32", "shape": [None], "batch_axis": 0}])


def vision_bundle() -> bytes:
    """Pre ops: a camera's uint8 HWC image resized to 8x8, to float32 NCHW in [0, 1]; the
    model: x [N, 3, 8, 8] -> colour, the mean of each channel [N, 3]."""
    from onnx import TensorProto as T, helper

    model = _graph([helper.make_node("ReduceMean", ["x"], ["colour"], axes=[2, 3], keepdims=0)],
                   [helper.make_tensor_value_info("x", T.FLOAT, [None, 3, 8, 8])],
                   [helper.make_tensor_value_info("colour", T.FLOAT, [None, 3])])
    return _bundle("vision", model, [{"name": "x", "dtype": "float32", "shape": [None, 3, 8, 8], "batch_axis": 0}],
                   [{"name": "colour", "dtype": "float32", "shape": [None, 3], "batch_axis": 0}],
                   pre=[{"op": "image.resize", "params": {"height": 8, "width": 8}},
                        {"op": "image.to_tensor", "params": {"scale": True}}])


def echo_bundle() -> bytes:
    """codes uint32 [N, L] -> text (the same code points): a text output."""
    from onnx import TensorProto as T, helper

    model = _graph([helper.make_node("Identity", ["codes"], ["text"])],
                   [helper.make_tensor_value_info("codes", T.UINT32, [None, None])],
                   [helper.make_tensor_value_info("text", T.UINT32, [None, None])])
    return _bundle("echo", model, [{"name": "codes", "dtype": "uint32", "shape": [None, None], "batch_axis": 0}],
                   [{"name": "text", "dtype": "uint32", "shape": [None, None], "batch_axis": 0}])


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    pytest.importorskip("onnxruntime")
    from test_inference import config

    s = System(tmp_path_factory.mktemp("infer"), config(1))
    try:
        s.wait_bus()

        async def install() -> None:
            await s.wait_ready("security", "modelstore", "scheduler", "accel-0")
            async with s.client() as bus:
                for name, make in (("multi", multi_bundle), ("audio", audio_bundle), ("vision", vision_bundle),
                                   ("echo", echo_bundle)):
                    await bus.request("modelstore", Install(), frames=[make()], timeout=60)
                    await bus.call("modelstore", Activate(name=name, version="1.0.0"), ModelState)

        anyio.run(install)
        yield s
    finally:
        s.kill()


def infer(system: System, *argv: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = system.busctl("infer", *argv, "--deadline", "60", timeout=90)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def infer_json(system: System, *argv: str) -> dict[str, Any]:
    return json.loads(infer(system, *argv, "-o", "json").stdout)


def save(path: Path, arr: Any) -> str:
    np.save(path, np.asarray(arr))
    return str(path)


def write_wav(path: Path, samples: np.ndarray, width: int = 2, rate: int = 16000) -> str:
    """Integer PCM samples [frames, channels] as a WAVE file."""
    frames = samples if samples.ndim == 2 else samples[:, None]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(frames, dtype={1: "u1", 2: "<i2", 4: "<i4"}[width]).tobytes())
    return str(path)


# -- end to end ----------------------------------------------------------------------------------


def test_two_named_inputs_one_from_a_file_one_a_value(system: System, tmp_path: Path) -> None:
    x = save(tmp_path / "x.npy", np.array([1, 2, 3, 4], dtype=np.float32))  # no batch axis: one is added
    out = infer_json(system, "multi", "--input", f"x={x}", "--value", "scale=2.5")
    assert list(out["outputs"]) == ["y", "logits"]
    y = out["outputs"]["y"]
    assert (y["dtype"], y["shape"], y["values"]) == ("float32", [1, 4], [[2.5, 5.0, 7.5, 10.0]])
    import onnxruntime as ort

    session = ort.InferenceSession(multi_model(), providers=["CPUExecutionProvider"])
    _, expected = session.run(None, {"x": np.array([[1, 2, 3, 4]], np.float32), "scale": np.array(2.5, np.float32)})
    np.testing.assert_array_equal(np.array(out["outputs"]["logits"]["values"], dtype=np.float32), expected)
    assert out["model"] == "multi" and out["version"] == "1.0.0"
    # the order on the command line does not matter; a scalar from a .npy file works as well
    scale = save(tmp_path / "scale.npy", np.float32(2.5))
    again = infer_json(system, "multi", "--input", f"scale={scale}", "--input", f"x={x}")
    assert again["outputs"]["y"] == y
    # a single unnamed --input is the model's first input; the scalar comes by name
    assert infer_json(system, "multi", "--input", x, "--value", "scale=2.5")["outputs"]["y"] == y


def test_only_sends_back_the_outputs_asked_for(system: System, tmp_path: Path) -> None:
    x = save(tmp_path / "x.npy", np.ones((2, 4), dtype=np.float32))
    out = infer_json(system, "multi", "--input", f"x={x}", "--value", "scale=1", "--only", "y")
    assert list(out["outputs"]) == ["y"] and out["outputs"]["y"]["shape"] == [2, 4]
    text = infer(system, "multi", "--input", f"x={x}", "--value", "scale=1", "--only", "logits").stdout
    assert "logits: float32 [2, 1000]" in text and "\ny:" not in text
    bad = infer(system, "multi", "--input", f"x={x}", "--value", "scale=1", "--only", "nope", code=1)
    assert "nope" in bad.stderr and "'y'" in bad.stderr and "'logits'" in bad.stderr


def test_a_1000_class_output_is_summarised_with_its_top_5(system: System, tmp_path: Path) -> None:
    x = save(tmp_path / "x.npy", np.array([1, 0, 0, 0], dtype=np.float32))
    proc = infer(system, "multi", "--input", f"x={x}", "--value", "scale=1")
    lines = proc.stdout.splitlines()
    logits = W[0]
    head = next(line for line in lines if line.startswith("logits:"))
    assert head.startswith("logits: float32 [1, 1000] min 0 max 5 mean ")
    assert f"mean {logits.astype(np.float64).mean():.6g}" in head
    top = lines[lines.index(head) + 1]
    order = np.argsort(-logits, kind="stable")[:5]
    assert top.strip().startswith("top 5 of row [0]: 281 (5), ")
    assert [int(part.split(" (")[0]) for part in top.split(": ", 1)[1].split(", ")] == order.tolist()
    # the small output in full, and nothing near megabytes
    assert "y: float32 [1, 4] [[1., 0., 0., 0.]]" in lines
    assert len(proc.stdout) < 1000
    # JSON: 1000 values are given in full; the summary is for more than 10,000
    out = infer_json(system, "multi", "--input", f"x={x}", "--value", "scale=1")
    assert len(out["outputs"]["logits"]["values"][0]) == 1000 and "summary" not in out["outputs"]["logits"]


def test_json_of_a_large_output_is_its_summary(system: System, tmp_path: Path) -> None:
    x = save(tmp_path / "x.npy", np.eye(4, dtype=np.float32)[[0] * 11])  # [11, 4]: logits are 11,000 values
    out = infer_json(system, "multi", "--input", f"x={x}", "--value", "scale=1")
    logits = out["outputs"]["logits"]
    assert logits["shape"] == [11, 1000] and "values" not in logits
    assert logits["summary"]["max"] == 5.0 and logits["summary"]["top"][0] == [281, 5.0]
    assert out["outputs"]["y"]["values"][0] == [1.0, 0.0, 0.0, 0.0]
    assert out["batch"] >= 1 and out["variant"] == "full" and "total_ms" in out


def test_a_wav_file_is_float_samples_of_its_first_channel(system: System, tmp_path: Path) -> None:
    left = np.array([0, 8192, -16384, 4096] * 128, dtype=np.int16)
    right = np.full_like(left, 32767)
    wav = write_wav(tmp_path / "a.wav", np.stack([left, right], 1))
    out = infer_json(system, "audio", "--input", f"audio={wav}")
    assert out["outputs"]["peak"]["values"] == [0.5]
    assert out["outputs"]["mean"]["values"] == pytest.approx([(8192 - 16384 + 4096) / 4 / 32768])
    text = infer(system, "audio", "--input", wav).stdout  # unnamed: the model's one input
    assert "peak: float32 [1] [0.5]" in text


def test_an_image_goes_through_the_models_pre_ops(system: System, tmp_path: Path) -> None:
    from PIL import Image

    colour = (200, 100, 50)
    Image.new("RGB", (12, 10), colour).save(tmp_path / "red.png")
    Image.new("RGBA", (5, 7), (*colour, 9)).save(tmp_path / "alpha.png")  # alpha dropped: RGB
    for name in ("red.png", "alpha.png"):
        out = infer_json(system, "vision", "--input", str(tmp_path / name))
        assert out["outputs"]["colour"]["shape"] == [1, 3]
        np.testing.assert_allclose(out["outputs"]["colour"]["values"][0], np.array(colour) / 255, rtol=1e-6)


def test_a_text_output_is_printed_as_strings(system: System, tmp_path: Path) -> None:
    words = ["hello", "wörld ✓"]
    codes = np.zeros((2, 8), dtype=np.uint32)
    for row, word in zip(codes, words):
        row[: len(word)] = [ord(c) for c in word]
    path = save(tmp_path / "codes.npy", codes)
    text = infer(system, "echo", "--input", f"codes={path}").stdout
    assert "text: uint32 [2, 8] text\n  'hello'\n  'wörld ✓'\n" in text
    assert infer_json(system, "echo", "--input", path)["outputs"]["text"] == {
        "dtype": "uint32", "shape": [2, 8], "text": words}


def test_bad_files_and_inputs_are_named(system: System, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a tensor")
    bad = infer(system, "multi", "--input", f"x={tmp_path / 'notes.txt'}", "--value", "scale=1", code=2)
    assert str(tmp_path / "notes.txt") in bad.stderr and ".npy" in bad.stderr and ".wav" in bad.stderr \
        and "image" in bad.stderr
    missing = infer(system, "multi", "--input", str(tmp_path / "missing.npy"), code=2)
    assert "cannot read" in missing.stderr and "missing.npy" in missing.stderr
    x = save(tmp_path / "x5.npy", np.ones((1, 5), dtype=np.float32))
    assert "not a number" in infer(system, "multi", "--input", x, "--value", "scale=x", code=2).stderr
    # what the scheduler refuses, it names: the input, what it takes and what came
    shape = infer(system, "multi", "--input", f"x={x}", "--value", "scale=1", code=1)
    assert "bad-message" in shape.stderr and "'x'" in shape.stderr and "[1, 5]" in shape.stderr
    extra = infer(system, "multi", "--input", f"x={x}", "--value", "scale=1", "--value", "bias=1", code=1)
    assert "'bias'" in extra.stderr
    missing_input = infer(system, "multi", "--input", f"x={save(tmp_path / 'x.npy', np.ones(4, np.float32))}", code=1)
    assert "'scale'" in missing_input.stderr
    too_many = infer(system, "multi", "--input", x, "--input", x, "--input", x, code=2)
    assert "x" in too_many.stderr and "scale" in too_many.stderr and "NAME=FILE" in too_many.stderr


def test_a_real_recurrent_model_with_a_scalar_input(system: System, real_model, tmp_path: Path, capsys) -> None:
    """silero-vad as it ships: input [N, 512] from a .wav, state [2, N, 128] (batch axis 1, as
    the spec says) from a .npy of [2, 128], sr an int64 scalar from --value; outputs equal
    direct ONNX Runtime's."""
    import onnxruntime as ort

    from test_model_contract import pack

    model = real_model("silero-vad")
    code, err = pack(capsys, model, tmp_path / "vad.ebm", name="vad", spec={
        "inputs": {"state": {"batch_axis": 1}}, "outputs": {"stateN": {"shape": [2, None, 128], "batch_axis": 1}}})
    assert code == 0, err
    bundle = Bundle.load(tmp_path / "vad.ebm")
    bundle.sign(KEY)
    (tmp_path / "vad.ebm").write_bytes(bundle.to_bytes())
    system.busctl("model", "install", str(tmp_path / "vad.ebm"), check=True, timeout=130)
    system.busctl("model", "activate", "vad", "1.0.0", check=True)
    t = np.arange(512) / 16000
    pcm = (np.sin(2 * np.pi * 440 * t) * 12000).astype(np.int16)
    wav = write_wav(tmp_path / "tone.wav", pcm)
    state = save(tmp_path / "state.npy", np.zeros((2, 128), dtype=np.float32))  # its batch axis 1 is added
    out = infer_json(system, "vad", "--input", f"input={wav}", "--input", f"state={state}", "--value", "sr=16000")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    direct = session.run(None, {"input": (pcm.astype(np.float64) / 32768).astype(np.float32)[None],
                                "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)})
    names = [o.name for o in session.get_outputs()]
    for name, want in zip(names, direct):
        got = out["outputs"][name]
        assert got["shape"] == list(want.shape)
        np.testing.assert_array_equal(np.array(got["values"], dtype=want.dtype), want)


# -- the pure parts --------------------------------------------------------------------------------


def test_wav_files_of_each_sample_width(tmp_path: Path) -> None:
    assert read_wav(write_wav(tmp_path / "u8.wav", np.array([0, 128, 255], np.uint8), width=1)).tolist() == \
        [-1.0, 0.0, 127 / 128]
    assert read_wav(write_wav(tmp_path / "s16.wav", np.array([-32768, 0, 16384], np.int16))).tolist() == [-1.0, 0.0, 0.5]
    assert read_wav(write_wav(tmp_path / "s32.wav", np.array([-2**31, 0, 2**30], np.int32), width=4)).tolist() == \
        [-1.0, 0.0, 0.5]
    with wave.open(str(tmp_path / "s24.wav"), "wb") as w:
        w.setnchannels(2), w.setsampwidth(3), w.setframerate(8000)
        w.writeframes(b"".join(v.to_bytes(3, "little", signed=True) for v in (-2**23, 5, 2**22, 7)))
    a = load_input(str(tmp_path / "s24.wav"))
    assert a.dtype == np.float32 and a.tolist() == [-1.0, 0.5]  # the first channel of two
    (tmp_path / "short.wav").write_bytes((tmp_path / "s16.wav").read_bytes()[:30])
    with pytest.raises(InputError, match="short.wav"):
        load_input(str(tmp_path / "short.wav"))


def test_files_are_told_apart_by_their_first_bytes(tmp_path: Path) -> None:
    from PIL import Image

    np.save(tmp_path / "a.npy", np.arange(6, dtype=np.int16).reshape(2, 3))
    (tmp_path / "a.npy").rename(tmp_path / "array.bin")
    assert load_input(str(tmp_path / "array.bin")).tolist() == [[0, 1, 2], [3, 4, 5]]
    Image.new("L", (3, 2), 7).save(tmp_path / "grey.jpg.png")
    img = load_input(str(tmp_path / "grey.jpg.png"))
    assert (img.dtype, img.shape) == (np.uint8, (2, 3, 3)) and (img == 7).all()  # grey as RGB, HWC
    for name, data, why in (("x.txt", b"hello", "none of the formats"), ("x.npy", b"\x93NUMPY\x01\x00junk", "as a .npy"),
                            ("x.wav", b"RIFF\x00\x00\x00\x00WAVEjunk", "as a .wav"), ("x.png", b"\x89PNG\r\n\x1a\nxx", "")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=name.replace(".", r"\.")) as err:
            load_input(str(tmp_path / name))
        assert why in str(err.value)
    np.save(tmp_path / "objects.npy", np.array([{}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="allow_pickle"):
        load_input(str(tmp_path / "objects.npy"))
    np.save(tmp_path / "complex.npy", np.zeros(2, complex))
    with pytest.raises(InputError, match="complex128"):
        load_input(str(tmp_path / "complex.npy"))
    with pytest.raises(InputError, match="cannot read .*nothing-here"):
        load_input(str(tmp_path / "nothing-here"))


def test_names_values_and_the_batch_axis() -> None:
    assert split_input("x=a.npy") == ("x", "a.npy") and split_input("./a=b.npy") == ("", "./a=b.npy")
    assert split_input("input.1=a.wav") == ("input.1", "a.wav") and split_input("a.npy") == ("", "a.npy")
    sr = TensorSpec(name="sr", dtype="int64", shape=[], batch_axis=None)
    name, v = parse_value("sr=16000", sr)
    assert (name, v.dtype, v.shape, int(v)) == ("sr", np.int64, (), 16000)
    assert parse_value("t=0.5")[1].dtype == np.float32 and parse_value("n=3")[1].dtype == np.int64
    assert parse_value("t=3:float16")[1].dtype == np.float16
    one = TensorSpec(name="t", dtype="float32", shape=[1], batch_axis=None)
    assert parse_value("t=3", one)[1].shape == (1,) and parse_value("t=3", one)[1].dtype == np.float32
    for bad, why in (("sr", "NAME=NUMBER"), ("sr=x", "not a number"), ("sr=1.5:int64", "whole number"),
                     ("sr=1:nope", "not a dtype"), ("sr=300:uint8", "does not fit"), ("sr=1:complex64", "complex64")):
        with pytest.raises(InputError, match=why):
            parse_value(bad)
    image = TensorSpec(name="image", dtype="uint8", shape=[None, None, None, 3], batch_axis=0)
    assert fit_input(np.zeros((5, 7, 3), np.uint8), image).shape == (1, 5, 7, 3)
    assert fit_input(np.zeros((1, 5, 7, 3), np.uint8), image).shape == (1, 5, 7, 3)
    state = TensorSpec(name="state", dtype="float32", shape=[2, None, 128], batch_axis=1)
    assert fit_input(np.zeros((2, 128)), state).shape == (2, 1, 128)  # at the spec's batch axis...
    assert fit_input(np.zeros((2, 128)), state).dtype == np.float32   # ... and float64 made float32
    assert fit_input(np.zeros((2, 1, 128), np.float32), state, force_batch=True).shape == (2, 1, 1, 128)
    assert fit_input(np.int64(16000), sr, force_batch=True).shape == ()  # no batch axis: never one
    assert fit_input(np.zeros(3), None, force_batch=True).shape == (1, 3)
    specs = [TensorSpec(name=n, dtype="float32", shape=[None]) for n in ("a", "b", "c")]
    assert list(name_inputs([("", 1), ("c", 3), ("", 2)], specs, "m").items()) == [("a", 1), ("c", 3), ("b", 2)]
    with pytest.raises(InputError, match="twice"):
        name_inputs([("a", 1), ("a", 2)], specs, "m")
    with pytest.raises(InputError, match="NAME=FILE"):
        name_inputs([("", 1)] * 4, specs, "m")


def test_summaries_text_and_json() -> None:
    big = np.linspace(-1, 1, 2_000_000, dtype=np.float32).reshape(2000, 1000)
    lines = show_output("scores", big)
    assert len("\n".join(lines)) < 300 and lines[0].startswith("scores: float32 [2000, 1000] min -1 max 1 mean ")
    assert lines[1].startswith("  top 5 of row [0]: 999 (")
    assert show_output("steps", big.reshape(2, 1000, 1000))[1].startswith("  top 5 of row [0, 0]: 999 (")
    s = summarise(big)
    assert s["min"] == -1.0 and s["max"] == 1.0 and abs(s["mean"]) < 1e-6 and [i for i, _ in s["top"]] == [999, 998, 997, 996, 995]
    assert "top" not in summarise(np.arange(30, dtype=np.int64))  # not scores: integers
    assert summarise(np.zeros((0, 5), np.float32)) == {"min": None, "max": None, "mean": None}
    assert show_output("n", np.arange(3, dtype=np.int64)) == ["n: int64 [3] [0, 1, 2]"]
    assert show_output("z", np.zeros((0, 5), np.float32))[0] == "z: float32 [0, 5] []"
    assert output_json("n", np.arange(3, dtype=np.int64)) == {"dtype": "int64", "shape": [3], "values": [0, 1, 2]}
    assert "summary" in output_json("scores", big) and "values" not in output_json("scores", big)
    codes = np.zeros((2, 3, 4), np.uint32)
    codes[1, 2, :2] = [ord("o"), ord("k")]
    assert decode_text(codes) == [["", "", ""], ["", "", "ok"]]
    assert decode_text(np.array([104, 105, 0], np.uint32)) == "hi"
    assert output_json("ctc.text", codes[1])["text"] == ["", "", "ok"]
    not_text = np.array([[0x110000]], np.uint32)  # not code points: shown as numbers
    assert output_json("text", not_text)["values"] == [[0x110000]]
    assert show_output("text", not_text) == ["text: uint32 [1, 1] [[1114112]]"]
    assert output_json("counts", np.array([[104, 105]], np.uint32))["values"] == [[104, 105]]  # not named text
