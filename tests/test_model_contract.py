"""The model contract of the manifest (named tensors, fixed / symbolic / dynamic dimensions,
each tensor's batch axis or none), read by `edgebus model pack` from real ONNX models as they
ship in wheels on the package index, the spec's overrides, the graph's metadata, and assets
in bundles: packed, signed, installed into a real model store, served by GetAsset and
`busctl model asset`, refused when tampered with."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from protocols.modelstore import (
    AssetBytes, ContractError, GetAsset, Manifest, ManifestError, TensorSpec, bind_dims, check_tensors,
)
from services import BadMessage
from services.modelstore import Bundle, BundleError, TamperedBundle, read_graph
from tools.edgebus import build_parser

from conftest import ROOT, System
from test_modelstore import zip_replace

DEMO = ROOT / "services" / "modelstore" / "demo" / "vibration-anomaly-1.0.0.ebm"
DEMO_PUBLIC_KEY = "1b2919a2f33f79bff04474da0ab8b807def7108184315f111162a4b8c612ea62"


def pack(capsys: pytest.CaptureFixture[str], model: Path, out: Path, *extra: str, spec: Any = None,
         name: str = "m", version: str = "1.0.0") -> tuple[int, str]:
    """`edgebus model pack`, in this process: (exit status, stderr)."""
    args = ["model", "pack", str(model), "--name", name, "--version", version, "--out", str(out), *extra]
    if spec is not None:
        spec_path = out.with_suffix(".spec.json")
        spec_path.write_text(json.dumps(spec))
        args += ["--spec", str(spec_path)]
    capsys.readouterr()
    parsed = build_parser().parse_args(args)
    code = parsed.func(parsed)
    return code, capsys.readouterr().err


def packed(capsys: pytest.CaptureFixture[str], model: Path, out: Path, *extra: str, **kw: Any) -> Manifest:
    code, err = pack(capsys, model, out, *extra, **kw)
    assert code == 0, err
    return Bundle.load(out).manifest


def by_name(specs: list[TensorSpec]) -> dict[str, TensorSpec]:
    return {s.name: s for s in specs}


# -- the contract read from real models ----------------------------------------------------------


def test_pack_reads_the_contract_of_real_models(real_model, capsys, tmp_path: Path) -> None:
    # a literal -1 batch dimension (as ppocr-cls ships it) is dynamic, and the batch axis
    cls = packed(capsys, real_model("ppocr-cls"), tmp_path / "cls.ebm")
    (x,), (y,) = cls.inputs, cls.outputs
    assert (x.name, x.dtype, x.shape, x.batch()) == ("x", "float32", [None, 3, None, None], 0)
    assert (y.dtype, y.shape, y.batch()) == ("float32", [None, 2], 0)
    assert x.check("float32", (6, 3, 48, 192)) is None  # the input the old manifest refused
    # generated dimension names (p2o.DynamicDimension.N) name nothing shared: dynamic
    det = packed(capsys, real_model("ppocr-det"), tmp_path / "det.ebm")
    assert det.inputs[0].shape == [None, 3, None, None] and det.outputs[0].shape == [None, 1, None, None]
    assert det.inputs[0].batch() == det.outputs[0].batch() == 0
    # a recurrent model: a state whose axis 0 is fixed has no batch axis by default, a scalar none
    vad = by_name(packed(capsys, real_model("silero-vad"), tmp_path / "vad.ebm").inputs)
    assert list(vad) == ["input", "state", "sr"]
    assert (vad["input"].shape, vad["input"].batch()) == ([None, None], 0)
    assert (vad["state"].shape, vad["state"].batch()) == ([2, None, 128], None)
    assert (vad["sr"].dtype, vad["sr"].shape, vad["sr"].batch()) == ("int64", [], None)
    assert vad["sr"].check("int64", ()) is None
    # the graph's metadata_props: the recogniser's dictionary, one character a line
    rec = packed(capsys, real_model("ppocr-rec"), tmp_path / "rec.ebm")
    assert rec.inputs[0].shape == [None, 3, None, None] and rec.outputs[0].shape == [None, None, 6625]
    characters = rec.metadata["character"].split("\n")
    assert len(characters) == 6623 and len(rec.metadata["character"]) > 6623
    # the bundle carries the model file as shipped, and the default batch axis is left implicit
    bundle = Bundle.load(tmp_path / "rec.ebm")
    bundle.check_files()
    assert bundle.files["full.onnx"] == real_model("ppocr-rec").read_bytes()
    assert b"batch_axis" not in bundle.manifest_bytes


def test_the_graph_reader_keeps_real_symbolic_names_and_drops_generated_ones() -> None:
    from onnx import TensorProto, helper

    def tensor(name: str, dims: list[Any]) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])], "g",
        [tensor("a", ["batch", 3, "unk__7", "?"]), tensor("b", ["batch", 0, -1, "not a name!"])],
        [tensor("c", ["batch", 3, "p2o.DynamicDimension.4", "seq"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="labels", value="cat\ndog")
    read = read_graph(model.SerializeToString())
    assert [s.shape for s in read.inputs] == [["batch", 3, None, None], ["batch", None, None, None]]
    assert read.outputs[0].shape == ["batch", 3, None, "seq"] and read.metadata == {"labels": "cat\ndog"}
    assert read.inputs[0].batch() == 0


# -- the spec's overrides -------------------------------------------------------------------------


def test_spec_overrides_any_tensor_by_name(real_model, capsys, tmp_path: Path) -> None:
    vad = packed(capsys, real_model("silero-vad"), tmp_path / "vad.ebm",
                 spec={"inputs": {"state": {"batch_axis": 1}}, "outputs": {"stateN": {"shape": [2, None, 128]}}})
    state, state_n = by_name(vad.inputs)["state"], by_name(vad.outputs)["stateN"]
    assert (state.batch_axis, state.batch()) == (1, 1)
    # a shape without a batch_axis takes that shape's default (axis 0 is fixed now: none)
    assert (state_n.shape, state_n.batch()) == ([2, None, 128], None)
    rec = packed(capsys, real_model("ppocr-rec"), tmp_path / "rec.ebm",
                 spec={"inputs": {"x": {"shape": ["N", 3, 48, "W"]}}, "outputs": {"softmax_11.tmp_0": {"shape": ["N", None, 6625]}},
                       "metadata": {"note": "PP-OCRv4"}})
    assert rec.inputs[0].shape == ["N", 3, 48, "W"] and rec.inputs[0].batch() == 0
    assert rec.metadata["note"] == "PP-OCRv4" and "character" in rec.metadata


@pytest.mark.parametrize(("spec", "extra", "message"), [
    ({"inputs": {"image": {"shape": [None, 3, 48, None]}}}, (),
     "overrides inputs 'image', which the graph does not have; its inputs are 'x'"),
    ({"outputs": {"y": {}, "z": {}}}, (), "overrides outputs 'y', 'z', which the graph does not have"),
    ({"inputs": {"x": {"rank": 4, "batch": 0}}}, (), "inputs.x: unknown key(s) 'rank', 'batch'"),
    ({"inputs": [{"name": "x", "shape": [1, 3, 48, 48]}]}, (), '"inputs" in a spec maps input names'),
    ({"inputs": {"x": {"shape": "NCHW"}}}, (), "inputs.x: Expected `array`, got `str`"),
    ({"inputs": {"x": {"shape": [None, 4, None, None]}}}, (),
     "input 'x' has shape [None, 4, None, None], the graph's is [None, 3, None, None]"),
    ({"inputs": {"x": {"shape": [None, 3, None]}}}, (), "(rank 3), the graph's is"),
    ({"inputs": {"x": {"dtype": "uint8"}}}, (), "dtype uint8, the graph's is float32"),
    ({"inputs": {"x": {"batch_axis": 4}}}, (), "input 'x' has batch_axis 4, outside its 4 axes"),
    ({"inputs": {"x": {"shape": [None, 3, "a b", None]}}}, (), "symbolic dimension 'a b'"),
    ({"pre": [{"op": "image.resise", "params": {}}]}, (),
     "pre[0] names op 'image.resise', which is not an op the accelerator drivers have; did you mean image.resize"),
    ({"post": [{"op": "post.ctc_magic"}]}, (), "post[0] names op 'post.ctc_magic'"),
    ({"assets": {"labels": {"file": "l.txt", "sha256": "", "size": 0}}}, (), "add each with --asset NAME=FILE"),
    (None, ("--asset", "labels"), "--asset 'labels' is not NAME=FILE"),
    (None, ("--asset", "bad name=x.txt"), "an asset name is"),
    (None, ("--asset", "labels=/no/such/labels.txt"), "--asset labels: cannot read /no/such/labels.txt"),
])
def test_spec_and_asset_errors_name_what_is_wrong(real_model, capsys, tmp_path: Path, spec: Any,
                                                   extra: tuple[str, ...], message: str) -> None:
    code, err = pack(capsys, real_model("ppocr-cls"), tmp_path / "b.ebm", *extra, spec=spec)
    assert code == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "b.ebm").exists()


# -- TensorSpec's checks -----------------------------------------------------------------------------


def test_tensorspec_check_names_the_tensor_what_it_takes_and_what_it_got() -> None:
    x = TensorSpec(name="x", dtype="float32", shape=[None, 3, 48, "W"])
    assert x.check("float32", (6, 3, 48, 192)) is None
    assert x.check("float64", (6, 3, 48, 192)) == ("input 'x' takes float32 [?, 3, 48, W], got float64 "
                                                   "[6, 3, 48, 192] (dtype float64, not float32)")
    assert x.check("float32", (3, 48, 192)) == ("input 'x' takes float32 [?, 3, 48, W], got float32 [3, 48, 192] "
                                                "(3 axes, not 4)")
    assert x.check("float32", (6, 3, 32, 192), kind="output") == (
        "output 'x' takes float32 [?, 3, 48, W], got float32 [6, 3, 32, 192] (axis 2 is 32, not 48)")
    assert x.describe() == "float32 [?, 3, 48, W] (batch axis 0)"
    # batch(): an absent batch_axis (manifests older than the field) resolves from the shape
    assert [TensorSpec(name="t", dtype="float32", shape=s).batch() for s in ([None, 7], ["N", 7], [1, 7], [], [2, None])] \
        == [0, 0, None, None, None]
    assert TensorSpec(name="t", dtype="float32", shape=[2, None], batch_axis=1).batch() == 1
    assert TensorSpec(name="t", dtype="float32", shape=[None, 7], batch_axis=None).batch() is None


def test_symbolic_dims_and_the_batch_size_agree_across_tensors() -> None:
    a = TensorSpec(name="a", dtype="float32", shape=["N", "T", 8])
    b = TensorSpec(name="b", dtype="int64", shape=["N", "T"])
    assert bind_dims([a, b], [(2, 5, 8), (2, 5)]) == {"N": 2, "T": 5}
    with pytest.raises(ContractError, match=r"inputs 'a' and 'b' disagree on dimension 'T': 5 on axis 1 of 'a', "
                                            r"4 on axis 1 of 'b'"):
        bind_dims([a, b], [(2, 5, 8), (2, 4)])
    state = TensorSpec(name="state", dtype="float32", shape=[2, None, 128], batch_axis=1)
    sr = TensorSpec(name="sr", dtype="int64", shape=[], batch_axis=None)
    x = TensorSpec(name="input", dtype="float32", shape=[None, None])
    specs = [x, state, sr]
    ok = {"input": ("float32", (3, 512)), "state": ("float32", (2, 3, 128)), "sr": ("int64", ())}
    assert check_tensors(specs, ok) is None
    assert check_tensors(specs, {**ok, "state": ("float32", (2, 4, 128))}) == (
        "inputs disagree on the batch size: 'input' has 3 on axis 0, 'state' has 4 on axis 1")
    missing = check_tensors(specs, {"input": ok["input"], "extra": ("float32", (1,))})
    assert missing is not None and missing.startswith("missing input(s) 'state', 'sr' and unknown input(s) 'extra': "
                                                      "the model takes 'input' float32 [?, ?] (batch axis 0)")
    assert check_tensors(specs, {**ok, "sr": ("int32", ())}) == "input 'sr' takes int64 [], got int32 [] (dtype int32, not int64)"


def test_manifest_check_refuses_a_contract_that_cannot_hold() -> None:
    def manifest(**kw: Any) -> Manifest:
        base: dict[str, Any] = {"name": "m", "version": "1.0.0", "created": 0.0, "outputs": [],
                                "variants": {"full": {"file": "full.onnx", "sha256": "", "size": 0}}}
        return msgspec.convert(base | kw, Manifest)

    x = {"name": "x", "dtype": "float32", "shape": [None, 4]}
    manifest(inputs=[x]).check()
    for inputs, assets, message in [
        ([x, x], {}, "two inputs are named 'x'"),
        ([x | {"dtype": "float8"}], {}, "input 'x' has dtype 'float8', which is not one of bool, int8"),
        ([x | {"batch_axis": 2}], {}, "input 'x' has batch_axis 2, outside its 2 axes [?, 4]"),
        ([x | {"shape": [-1, 4]}], {}, "input 'x' has size -1 on axis 0: a size is >= 0; write null for a dynamic axis"),
        ([x], {"../labels": {"file": "l", "sha256": "", "size": 0}}, "asset name '../labels'"),
    ]:
        with pytest.raises(ManifestError, match=message.replace("[", r"\[").replace("?", r"\?")):
            manifest(inputs=inputs, assets=assets).check()


def test_the_old_demo_bundle_decodes_verifies_and_keeps_its_bytes() -> None:
    bundle = Bundle.load(DEMO)
    bundle.check_files()
    assert bundle.check_signature_with(bytes.fromhex(DEMO_PUBLIC_KEY))
    (features,), (anomaly,) = bundle.manifest.inputs, bundle.manifest.outputs
    assert features.batch_axis is msgspec.UNSET and features.batch() == 0 and anomaly.batch() == 0
    assert bundle.manifest.metadata == {} and bundle.manifest.assets == {}
    assert b"batch_axis" not in msgspec.json.encode(bundle.manifest)  # re-encoded, the absent field stays absent


# -- assets in bundles -------------------------------------------------------------------------------


def make_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def key_files(tmp_path: Path) -> tuple[Path, str]:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = make_key()
    (tmp_path / "k.key").write_text(key.private_bytes_raw().hex() + "\n")
    return tmp_path / "k.key", key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


LABELS = "up\nupside-down\n"
THRESHOLDS = {"box": 0.6, "unclip": 1.5}


def asset_bundle(capsys: pytest.CaptureFixture[str], real_model: Any, tmp_path: Path, key: Path,
                 version: str = "1.0.0") -> Path:
    (tmp_path / "labels.txt").write_text(LABELS)
    (tmp_path / "thresholds.json").write_text(json.dumps(THRESHOLDS))
    out = tmp_path / f"cls-{version}.ebm"
    manifest = packed(capsys, real_model("ppocr-cls"), out, "--asset", f"labels={tmp_path / 'labels.txt'}",
                      "--asset", f"thresholds={tmp_path / 'thresholds.json'}", "--key", str(key),
                      name="text-direction", version=version)
    assert set(manifest.assets) == {"labels", "thresholds"}
    labels = manifest.assets["labels"]
    assert (labels.file, labels.size, labels.media_type) == ("assets/labels.txt", len(LABELS), "text/plain")
    assert labels.sha256 == hashlib.sha256(LABELS.encode()).hexdigest()
    assert manifest.assets["thresholds"].media_type == "application/json"
    return out


def test_a_tampered_or_missing_asset_is_refused_offline(real_model, capsys, tmp_path: Path) -> None:
    key, _ = key_files(tmp_path)
    data = asset_bundle(capsys, real_model, tmp_path, key).read_bytes()
    Bundle.from_bytes(data).check_files()
    with pytest.raises(TamperedBundle, match="assets/labels.txt does not match what was signed"):
        Bundle.from_bytes(zip_replace(data, "assets/labels.txt", lambda b: b.replace(b"up\n", b"UP\n"))).check_files()
    with pytest.raises(BundleError, match="assets/labels.txt"):  # a size that is not the signed one
        Bundle.from_bytes(zip_replace(data, "assets/labels.txt", lambda b: b + b"sideways\n"))
    # a manifest naming one file both as a model and as an asset
    m = Bundle.from_bytes(data).manifest
    clash = msgspec.structs.replace(m, assets={"labels": msgspec.structs.replace(m.assets["labels"], file="full.onnx")})
    with pytest.raises(BundleError, match="full.onnx is named both as a model file and as an asset"):
        Bundle(msgspec.json.encode(clash), Bundle.from_bytes(data).files).check_files()


def store_config(public_key: str) -> str:
    return f"""
[services.security]
command = ["{{python}}", "-m", "services.security"]
capabilities = ["call:kernel.Grant", "call:kernel.Revoke", "call:kernel.Enroll",
                "call:kernel.GetMeasurements", "subscribe:kernel.audit"]
settings = {{ trusted_keys = [{{ label = "test", public_key = "{public_key}" }},
                             {{ label = "demo", public_key = "{DEMO_PUBLIC_KEY}" }}] }}

[services.modelstore]
command = ["{{python}}", "-m", "services.modelstore"]
requires = ["security"]
capabilities = ["call:security.VerifySignature", "call:security.Seal", "call:security.Unseal",
                "call:security.AuditAppend", "publish:modelstore.*"]
settings = {{ preload_demo = true }}

[services.reader]
# a client that may fetch assets and nothing else of the store
capabilities = ["call:modelstore.GetAsset"]
"""


@pytest.mark.anyio
async def test_assets_are_installed_encrypted_and_served_by_the_store(real_model, capsys, make_system,
                                                                      tmp_path: Path) -> None:
    key, public = key_files(tmp_path)
    bundle_path = asset_bundle(capsys, real_model, tmp_path, key)
    system: System = make_system(store_config(public))
    await system.wait_ready("security", "modelstore")
    # the old demo bundle (no batch_axis, no metadata, no assets) still installs, verified
    state = msgspec.json.decode(system.busctl("model", "list", "--json", check=True).stdout)
    # (besides the OCR demo's text-det and text-rec where `make run` built them)
    assert ("vibration-anomaly", "1.0.0") in [(m["name"], m["active"]) for m in state]
    # a tampered asset is refused at install, the store unchanged
    tampered = tmp_path / "tampered.ebm"
    tampered.write_bytes(zip_replace(bundle_path.read_bytes(), "assets/labels.txt", lambda b: b.upper()))
    refused = system.busctl("model", "install", str(tampered))
    assert refused.returncode == 1 and "assets/labels.txt does not match what was signed" in refused.stderr
    system.busctl("model", "install", str(bundle_path), check=True)
    system.busctl("model", "activate", "text-direction", "1.0.0", check=True)
    # at rest the assets are encrypted like the models: no plaintext in the store's files
    root = system.run_dir / "state" / "modelstore"
    for blob in (root / "blobs").iterdir():
        content = blob.read_bytes()
        assert b"upside-down" not in content and b"unclip" not in content
    # busctl model asset: to a file, and to standard output
    got = system.busctl("model", "asset", "text-direction", "labels", str(tmp_path / "out.txt"), check=True)
    assert f"asset labels of text-direction 1.0.0: {len(LABELS)} bytes (text/plain) written to" in got.stdout
    assert (tmp_path / "out.txt").read_text() == LABELS
    assert json.loads(system.busctl("model", "asset", "text-direction", "thresholds", check=True).stdout) == THRESHOLDS
    missing = system.busctl("model", "asset", "text-direction", "vocab")
    assert missing.returncode == 1 and "has no asset 'vocab'; it has ['labels', 'thresholds']" in missing.stderr
    nomodel = system.busctl("model", "asset", "nothing", "labels")
    assert nomodel.returncode == 4 and "no model nothing" in nomodel.stderr
    # GetAsset by version, from a service holding only call:modelstore.GetAsset; the bytes as raw frame 0
    async with system.client("reader") as bus:
        incoming = await bus.request("modelstore", GetAsset(name="text-direction", asset="labels", version="1.0.0"))
        reply = incoming.decode(AssetBytes)
        frame = incoming.frames[0]
        assert bytes(frame.buffer if hasattr(frame, "buffer") else frame) == LABELS.encode()
        assert (reply.version, reply.size, reply.media_type) == ("1.0.0", len(LABELS), "text/plain")
        with pytest.raises(BadMessage, match="has no asset"):
            await bus.call("modelstore", GetAsset(name="vibration-anomaly", asset="labels"), AssetBytes)
    # the store's start-up sweep keeps the asset blobs (they are referenced by the manifest)
    old = (await system.services())["modelstore"].pid
    system.busctl("restart", "modelstore", check=True)
    await system.wait_restarted("modelstore", old)
    got = system.busctl("model", "asset", "text-direction", "labels", str(tmp_path / "again.txt"), check=True)
    assert (tmp_path / "again.txt").read_text() == LABELS


# -- fetching the real models ---------------------------------------------------------------------------


def offline_env(**extra: str) -> dict[str, str]:
    """pip without any index: no configuration file, no index, no find-links."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""} | extra


def test_fetch_models_offline_warns_once_per_model_and_exits_0(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tools.fetch_models", "--cache", str(tmp_path / "cache"), "--quiet"],
                          capture_output=True, text=True, timeout=300, env=offline_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == 4 and all(w.startswith("fetch_models: warning: real model ") for w in warnings)
    assert "ppocr-cls (rapidocr-onnxruntime==1.4.4" in warnings[1] and "the tests that need it will skip" in warnings[1]
    assert not list((tmp_path / "cache").rglob("*.onnx"))


def test_fetch_models_downloads_nothing_when_the_cache_holds_them(real_model, tmp_path: Path) -> None:
    from tools import fetch_models

    for name in fetch_models.MODELS:
        real_model(name)
    cache = fetch_models.cached_path("ppocr-det").parent.parent
    proc = subprocess.run([sys.executable, "-m", "tools.fetch_models", "--cache", str(cache)],
                          capture_output=True, text=True, timeout=300, env=offline_env(), cwd=ROOT)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.count("(cached)") == 4
    # a file that is not the pinned one is not taken as cached
    copy = tmp_path / "cache" / "silero-vad-6.2.3"
    copy.mkdir(parents=True)
    (copy / "silero_vad.onnx").write_bytes(b"not the model")
    offline = subprocess.run([sys.executable, "-m", "tools.fetch_models", "--cache", str(tmp_path / "cache"), "silero-vad"],
                             capture_output=True, text=True, timeout=300, env=offline_env(), cwd=ROOT)
    assert offline.returncode == 0 and "warning: real model silero-vad" in offline.stderr
    with pytest.raises(ValueError, match="no real model named 'yolo'"):
        fetch_models.model_path("yolo")


def test_a_model_store_bundle_with_a_graph_as_shipped_still_loads_in_onnx_runtime(real_model, capsys,
                                                                                   tmp_path: Path) -> None:
    """The contract pack writes for ppocr-cls is the one ONNX Runtime runs: a batch of 6."""
    import numpy as np
    import onnxruntime as ort

    manifest = packed(capsys, real_model("ppocr-cls"), tmp_path / "cls.ebm")
    sess = ort.InferenceSession(str(real_model("ppocr-cls")), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((6, 3, 48, 192), dtype=np.float32)
    assert manifest.inputs[0].check(x.dtype.name, x.shape) is None
    (y,) = sess.run(None, {"x": x})
    assert manifest.outputs[0].check(y.dtype.name, y.shape, kind="output") is None
    assert check_tensors(manifest.outputs, {manifest.outputs[0].name: (y.dtype.name, y.shape)}, kind="output") is None
