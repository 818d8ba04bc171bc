"""Ops that compose: a manifest's pre and post ops as chains around the model, checked without
running anything (``drivers.ops.check_chains``: the contract a client sees, or a ChainError
naming the op that cannot run), refused at pack and at install, and run around real models
as they ship in wheels on the package index (``build_chains``): a text line rendered here is
read back by the PP-OCR recogniser through its manifest's ops alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from drivers import ops
from drivers.ops import ChainError, OpInputError, build_chains, check_chains
from protocols.modelstore import Manifest, OpSpec, TensorSpec, Variant
from services.modelstore import Bundle

from conftest import ROOT, System
from test_model_contract import key_files, pack, packed, store_config

DEMO = ROOT / "services" / "modelstore" / "demo" / "vibration-anomaly-1.0.0.ebm"
HALF = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "scale": True}  # PaddleOCR's (x / 255 - 0.5) / 0.5
CLS_PRE = [{"op": "image.resize_pad", "params": {"height": 48, "width": 192}},
           {"op": "image.normalize", "params": HALF}]
REC_PRE = [{"op": "image.resize_pad", "params": {"height": 48, "width": 320}},
           {"op": "image.normalize", "params": HALF}]
CTC = {"op": "text.ctc_greedy", "params": {"vocabulary": "metadata:character"}}


def spec(name: str, dtype: str, shape: list[Any], batch_axis: Any = msgspec.UNSET) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=shape, batch_axis=batch_axis)


def manifest(inputs: list[TensorSpec], outputs: list[TensorSpec], pre: list[dict[str, Any]] = (),
             post: list[dict[str, Any]] = (), **kw: Any) -> Manifest:
    """A manifest of a model that is not needed to check its chains."""
    return Manifest(name="m", version="1.0.0", created=1.0, inputs=inputs, outputs=outputs,
                    variants={"full": Variant(file="full.onnx", sha256="", size=0)},
                    pre=[msgspec.convert(p, OpSpec) for p in pre], post=[msgspec.convert(p, OpSpec) for p in post],
                    **kw)


def shapes(specs: list[TensorSpec]) -> list[tuple[str, str, list[Any], Any]]:
    return [(s.name, s.dtype, s.shape, s.batch()) for s in specs]


def render(text: str, size: int = 32) -> np.ndarray:
    """A line of black text on white, uint8 HWC RGB, as a camera or a scanner would give it."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("RGB", (right - left + 16, bottom - top + 16), "white")
    ImageDraw.Draw(img).text((8 - left, 8 - top), text, fill="black", font=font)
    return np.asarray(img)


class Model:
    """A packed real model: its bundle, its chains, and ONNX Runtime on its file."""

    def __init__(self, path: Path, resources: dict[str, bytes] | None = None) -> None:
        import onnxruntime

        self.bundle = Bundle.load(path)
        self.manifest = self.bundle.manifest
        self.chains = build_chains(self.manifest, resources)
        self.session = onnxruntime.InferenceSession(self.bundle.files["full.onnx"], providers=["CPUExecutionProvider"])

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        feed = self.chains.pre(inputs)
        outputs = self.session.run(None, feed)
        result = self.chains.post(dict(zip([o.name for o in self.session.get_outputs()], outputs)))
        contract = self.chains.contract
        assert list(result) == [s.name for s in contract.outputs]  # the model's outputs, then the chains'
        for s in contract.outputs:  # every output is what the contract says: dtype, rank, fixed sizes
            assert s.check(result[s.name].dtype.name, result[s.name].shape, "output") is None, s
        return result


# -- the contract of real models --------------------------------------------------------------------


def test_the_contract_of_real_models_with_their_ops(real_model, capsys, tmp_path: Path) -> None:
    # the text direction classifier: the client sends uint8 NHWC images of any size, as a camera
    # gives them; the classifier's literal -1 batch and its 3 channels come through
    cls = packed(capsys, real_model("ppocr-cls"), tmp_path / "cls.ebm",
                 spec={"pre": CLS_PRE, "post": [{"op": "post.argmax", "output": "direction"}]})
    contract = check_chains(cls)
    assert shapes(contract.inputs) == [("x", "uint8", [None, None, None, 3], 0)]
    assert shapes(contract.outputs) == [("save_infer_model/scale_0.tmp_1", "float32", [None, 2], 0),
                                        ("direction", "int64", [None], 0)]
    assert contract.batchable and contract.assets == []
    # the recogniser: a symbolic batch N given by the spec reaches the client's input; the CTC
    # decode reads the dictionary the model ships in its metadata and adds text and confidence
    rec = packed(capsys, real_model("ppocr-rec"), tmp_path / "rec.ebm",
                 spec={"inputs": {"x": {"shape": ["N", 3, 48, "W"]}}, "pre": REC_PRE, "post": [CTC]})
    contract = check_chains(rec)
    assert shapes(contract.inputs) == [("x", "uint8", ["N", None, None, 3], 0)]
    assert shapes(contract.outputs)[1:] == [("ctc_greedy.text", "uint32", [None, None], 0),
                                            ("ctc_greedy.confidence", "float32", [None], 0)]
    # the detector: a fixed canvas, DB boxes padded to max_candidates per image, with counts
    det = packed(capsys, real_model("ppocr-det"), tmp_path / "det.ebm", spec={
        "pre": [{"op": "image.resize", "params": {"height": 640, "width": 640}},
                {"op": "image.normalize", "params": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}],
        "post": [{"op": "text.db_boxes", "params": {"max_candidates": 50}}]})
    contract = check_chains(det)
    assert shapes(contract.inputs) == [("x", "uint8", [None, None, None, 3], 0)]
    assert shapes(contract.outputs)[1:] == [("db_boxes.boxes", "float32", [None, 50, 4, 2], 0),
                                            ("db_boxes.scores", "float32", [None, 50], 0),
                                            ("db_boxes.counts", "int32", [None], 0)]
    # a model without ops: its contract is its manifest's
    vad = packed(capsys, real_model("silero-vad"), tmp_path / "vad.ebm")
    contract = check_chains(vad)
    assert contract.inputs == vad.inputs and contract.outputs == vad.outputs and contract.pre == contract.post == []


def test_the_old_demo_bundle_keeps_its_meaning() -> None:
    """pre and post without input/output, as every manifest before chains: one pre chain into
    the first input, one post chain on the first output, whose result is added after it."""
    m = Bundle.load(DEMO).manifest
    contract = check_chains(m)
    assert shapes(contract.inputs) == [("features", "float32", [None, None], 0)]
    assert shapes(contract.outputs) == [("anomaly", "float32", [None, 1], 0),
                                        ("threshold_hysteresis", "bool", [None, 1], 0)]
    chains = build_chains(m)
    rng = np.random.default_rng(1)
    signals = rng.normal(size=(3, 2048)).astype(np.float32)
    feed = chains.pre({"features": signals})
    np.testing.assert_array_equal(feed["features"], ops.pipeline([(s.op, s.params) for s in m.pre])(signals))
    scores = np.array([[0.9], [0.5], [0.3]], np.float32)
    out = chains.post({"anomaly": scores})
    assert list(out) == ["anomaly", "threshold_hysteresis"] and out["anomaly"] is scores
    np.testing.assert_array_equal(out["threshold_hysteresis"], [[True], [True], [False]])


def test_chains_of_several_inputs_and_outputs() -> None:
    """An op with ``input`` starts a chain: here one per model input, an input left without a
    chain, a post chain reading a part another chain added, and names given with ``output``."""
    m = manifest([spec("image", "float32", ["N", 3, 224, 224]), spec("scale", "float32", ["N", 1]),
                  spec("signal", "float32", ["N", 7])],
                 [spec("logits", "float32", ["N", 1000]), spec("aux", "int8", ["N", 4])],
                 pre=[{"op": "image.resize", "params": {"height": 224, "width": 224}, "input": "image"},
                      {"op": "image.to_tensor"},
                      {"op": "signal.frame", "params": {"length": 1024}, "input": "signal"},
                      {"op": "signal.vibration_features", "params": {"rate": 8000, "bands": [[0, 1000]] * 4}}],
                 post=[{"op": "post.softmax", "output": "probs"},
                       {"op": "post.topk", "params": {"k": 5}, "input": "probs", "output": "best"},
                       {"op": "post.argmax", "input": "best.values"},
                       {"op": "post.dequantize_int8", "params": {"scale": 0.5}, "input": "aux"}])
    contract = check_chains(m)
    assert shapes(contract.inputs) == [("image", "uint8", ["N", None, None, 3], 0),
                                       ("scale", "float32", ["N", 1], 0),
                                       ("signal", "float32", ["N", None], 0)]
    assert shapes(contract.outputs) == [
        ("logits", "float32", ["N", 1000], 0), ("aux", "int8", ["N", 4], 0), ("probs", "float32", ["N", 1000], 0),
        ("best.indices", "int64", ["N", 5], 0), ("best.values", "float32", ["N", 5], 0),
        ("argmax", "int64", ["N"], 0), ("dequantize_int8", "float32", ["N", 4], 0)]
    chains = build_chains(m)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (2, 30, 40, 3), np.uint8)
    scale = np.ones((2, 1), np.float32)
    feed = chains.pre({"image": images, "scale": scale, "signal": rng.normal(size=(2, 1500)).astype(np.float32)})
    assert feed["scale"] is scale and feed["image"].shape == (2, 3, 224, 224) and feed["signal"].shape == (2, 7)
    np.testing.assert_array_equal(feed["image"], ops.normalize(ops.resize(images, 224, 224)))
    logits = rng.normal(size=(2, 1000)).astype(np.float32)
    out = chains.post({"logits": logits, "aux": np.array([[2, -4, 0, 1]] * 2, np.int8)})
    np.testing.assert_array_equal(out["best.indices"], np.argsort(-logits, axis=1)[:, :5])
    np.testing.assert_array_equal(out["argmax"], [0, 0])
    np.testing.assert_array_equal(out["dequantize_int8"], [[1, -2, 0, 0.5]] * 2)


def reuse_manifest() -> Manifest:
    """A detector-like model fed by letterbox -> to_tensor and a recogniser-like input fed by
    resize_pad -> normalize: image ops that write into a given buffer, inside chains."""
    return manifest([spec("image", "float32", ["N", 3, 64, 64]), spec("line", "float32", ["N", 3, 48, 160])],
                    [spec("y", "float32", ["N", 4])],
                    pre=[{"op": "image.letterbox", "params": {"height": 64, "width": 64}, "input": "image"},
                         {"op": "image.to_tensor"},
                         {"op": "image.resize_pad", "params": {"height": 48, "width": 160}, "input": "line"},
                         {"op": "image.normalize", "params": HALF}])


def expected_feed(image: np.ndarray, line: np.ndarray) -> dict[str, np.ndarray]:
    return {"image": ops.normalize(ops.letterbox(image, 64, 64)[0]),
            "line": ops.normalize(ops.text.resize_pad(line, 48, 160)[0], **HALF)}


def held(chains: ops.Chains) -> list[Any]:
    """The intermediate buffers each pre chain keeps (its spare sets' arrays)."""
    return [[h[1] for s in bound._spare for h in s if h is not None] for _, bound in chains._pre]


def test_a_chain_writes_its_intermediates_into_the_buffers_of_its_last_call() -> None:
    """The second frame of a size costs no new intermediate image: the first op of each chain
    writes into the array it gave last time; the chain's result is new each time (it leaves
    the chain: to ONNX Runtime, to the client) and a result already given is never written."""
    chains = build_chains(reuse_manifest())
    rng = np.random.default_rng(4)
    frames = [(rng.integers(0, 256, (2, 30, 50, 3), np.uint8), rng.integers(0, 256, (2, 20, 90, 3), np.uint8))
              for _ in range(3)]
    first = chains.pre({"image": frames[0][0], "line": frames[0][1]})
    buffers = held(chains)
    assert [len(b) for b in buffers] == [1, 1]
    kept = {k: v.copy() for k, v in first.items()}
    second = chains.pre({"image": frames[1][0], "line": frames[1][1]})
    assert [[id(a) for a in b] for b in held(chains)] == [[id(a) for a in b] for b in buffers]  # no new intermediate
    for got, (image, line) in ((first, frames[0]), (second, frames[1])):
        for name, want in expected_feed(image, line).items():
            np.testing.assert_array_equal(got[name], want)
    for name in ("image", "line"):
        assert not np.may_share_memory(first[name], second[name])
        assert all(not np.may_share_memory(second[name], a) for b in held(chains) for a in b)
        np.testing.assert_array_equal(first[name], kept[name])  # the first results were not written again
    third = chains.pre({"image": frames[2][0][:1], "line": frames[2][1]})  # another shape: a buffer of its own
    np.testing.assert_array_equal(third["image"], expected_feed(frames[2][0][:1], frames[2][1])["image"])
    assert held(chains)[1][0] is buffers[1][0] and held(chains)[0][0] is not buffers[0][0]
    assert held(build_chains(reuse_manifest(), reuse=False)) == [[], []]


def test_chains_running_on_several_threads_at_once_keep_their_buffers_apart() -> None:
    """A driver runs batches on several threads: each call takes a set of buffers of its own."""
    import concurrent.futures

    chains = build_chains(reuse_manifest())
    rng = np.random.default_rng(5)
    frames = [(rng.integers(0, 256, (1, 30, 50, 3), np.uint8), rng.integers(0, 256, (1, 20, 90, 3), np.uint8))
              for _ in range(6)]
    wants = [expected_feed(*f) for f in frames]

    def run(k: int) -> bool:
        for _ in range(15):
            got = chains.pre({"image": frames[k][0], "line": frames[k][1]})
            if any(not np.array_equal(got[n], w) for n, w in wants[k].items()):
                return False
        return True

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, range(6)))
    assert all(len(b) <= 2 for b in held(chains))  # at most two spare sets kept


def test_audio_and_detector_ops_in_chains() -> None:
    from drivers.ops import _audio, _detect

    # a log-mel front end into a speech model's [N, 80, T] input; a client sends float32 samples
    mel = manifest([spec("mel", "float32", [None, 80, None])], [spec("y", "float32", [None, 4])],
                   pre=[{"op": "audio.log_mel", "params": {"n_mels": 80, "log": "log10"}}])
    assert shapes(check_chains(mel).inputs) == [("mel", "float32", [None, None], 0)]
    samples = np.random.default_rng(3).uniform(-1, 1, (2, 16000)).astype(np.float32)
    feed = build_chains(mel).pre({"mel": samples})
    np.testing.assert_array_equal(feed["mel"], _audio.log_mel(samples, n_mels=80, log="log10"))
    # an input without a batch axis (one fixed clip of 100 frames): the client's has none either,
    # and its single row is not held to the rows of a batch
    clip = manifest([spec("mel", "float32", [1, 80, 101])], [spec("y", "float32", [1, 4])],
                    pre=[{"op": "audio.log_mel", "params": {}}])
    assert shapes(check_chains(clip).inputs) == [("mel", "float32", [1, None], None)]
    assert build_chains(clip).pre({"mel": samples[:1]})["mel"].shape == (1, 80, 101)
    # a YOLOv8 head: detections padded to max_detections with each image's count
    yolo = manifest([spec("images", "float32", [None, 3, 640, 640])], [spec("output0", "float32", [None, 84, 8400])],
                    post=[{"op": "post.decode_yolo", "params": {"max_detections": 100}}])
    assert shapes(check_chains(yolo).outputs)[1:] == [("decode_yolo.detections", "float32", [None, 100, 6], 0),
                                                      ("decode_yolo.counts", "int32", [None], 0)]
    pred = np.random.default_rng(4).uniform(0, 1, (2, 84, 8400)).astype(np.float32)
    pred[:, :4] *= 640
    out = build_chains(yolo).post({"output0": pred})
    want = _detect.decode_yolo_batch(pred, max_detections=100)
    np.testing.assert_array_equal(out["decode_yolo.detections"], want[0])
    np.testing.assert_array_equal(out["decode_yolo.counts"], want[1])


# -- refusals ---------------------------------------------------------------------------------------

IMAGE_MODEL = ([spec("x", "float32", [None, 3, 48, None])], [spec("y", "float32", [None, 2])])
TEXT_MODEL = ([spec("x", "float32", ["N", 3, 48, "W"])], [spec("probs", "float32", ["N", None, 97])])
VOCAB = "".join(chr(ord("!") + i) + "\n" for i in range(95))  # 95 entries, the space appended: 96 + blank


@pytest.mark.parametrize(("model", "pre", "post", "message"), [
    (IMAGE_MODEL, [{"op": "image.resise", "params": {"height": 48, "width": 192}}], [],
     "pre[0] names op 'image.resise', which is not an op the accelerator drivers have; did you mean image.resize"),
    (IMAGE_MODEL, [], [{"op": "post.argmax"}, {"op": "post.ctc_magic", "input": "y"}],
     "post[1] names op 'post.ctc_magic'"),
    (IMAGE_MODEL, [CLS_PRE[0], {"op": "image.normalize", "params": {"std": [1, 0]}}], [],
     "pre[1] image.normalize: parameter 'std': must be a non-empty list of finite numbers greater than 0"),
    (IMAGE_MODEL, [{"op": "image.resize_pad", "params": {"height": 48}}], [],
     "pre[0] image.resize_pad: parameter 'width': is required"),
    (IMAGE_MODEL, [{"op": "audio.log_mel", "params": {"rate": 8000, "fmax": 6000}}], [],
     "pre[0] audio.log_mel: parameter 'fmax': must be above fmin=0 and at most rate / 2 = 4000, not 6000"),
    # an op given what it does not take: what it is given, and what it takes
    (IMAGE_MODEL, [], [CTC],
     "post[0] text.ctc_greedy: is given float32 [?, 2] (batch axis 0), which it cannot take (2 axes, not 3); "
     "it takes a recogniser's scores [N, T, C]"),
    (IMAGE_MODEL, [{"op": "signal.rms"}, {"op": "image.resize", "params": {"height": 48, "width": 96}}], [],
     "pre[1] image.resize: is given float32 [N] (batch axis 0), which it cannot take (dtype float32 is not uint8); "
     "it takes uint8 images, HWC or NHWC"),
    (IMAGE_MODEL, [{"op": "image.rgb_to_gray"}, CLS_PRE[0], CLS_PRE[1]], [],
     "pre[2] image.normalize: is given uint8 [N, 48, 192, 1] (batch axis 0), which it cannot take (mean has 3 "
     "values for images of 1 channels)"),
    # a chain whose end does not fit the model input it feeds
    (IMAGE_MODEL, [CLS_PRE[0]], [],
     "pre[0] image.resize_pad: gives uint8 [N, 48, 192, C] (batch axis 0) at the end of the chain feeding input 'x' "
     "(dtype uint8, not float32), which takes float32 [?, 3, 48, ?] (batch axis 0)"),
    (IMAGE_MODEL, [{"op": "image.resize_pad", "params": {"height": 32, "width": 192}}, CLS_PRE[1]], [],
     "pre[1] image.normalize: gives float32 [N, C, 32, 192] (batch axis 0) at the end of the chain feeding input "
     "'x' (axis 2 is 32, not 48)"),
    (IMAGE_MODEL, [CLS_PRE[0], {"op": "image.rgb_to_gray"}, {"op": "image.to_tensor"}], [],
     "pre[2] image.to_tensor: gives float32 [N, 1, 48, 192] (batch axis 0) at the end of the chain feeding input "
     "'x' (axis 1 is 1, not 3)"),
    (([spec("features", "float32", [None, 7])], [spec("y", "float32", [None, 1])]),
     [{"op": "signal.frame", "params": {"length": 1024, "hop": 512}}, {"op": "signal.vibration_features",
                                                                      "params": {"rate": 8000, "bands": [[0, 100]]}}],
     [], "pre[1] signal.vibration_features: gives float32 [N, 4] (batch axis 0) at the end of the chain feeding "
         "input 'features' (axis 1 is 4, not 7)"),
    (([spec("frames", "float32", [None, 1024])], [spec("y", "float32", [None, 1])]),
     [{"op": "signal.frame", "params": {"length": 1024}, "input": "frames"}, {"op": "post.nms",
                                                                             "params": {"iou_threshold": 0.5}}],
     [], "(no batch axis (one row per request: an op does not keep the rows))"),
    (IMAGE_MODEL, [{"op": "post.topk", "params": {"k": 2}}], [],
     "pre[0] post.topk: gives several arrays (indices, values) at the end of the chain feeding input 'x', which "
     "takes one, float32 [?, 3, 48, ?]"),
    # inputs and outputs that do not exist, or twice
    (IMAGE_MODEL, [{**CLS_PRE[0], "input": "image"}, CLS_PRE[1]], [],
     "pre[0] image.resize_pad: 'input' 'image' is not an input of the model; its inputs: 'x'"),
    (IMAGE_MODEL, [*CLS_PRE, {**CLS_PRE[0], "input": "x"}, CLS_PRE[1]], [],
     "pre[2] image.resize_pad: starts a second chain feeding input 'x', which pre[0] image.resize_pad already feeds"),
    (IMAGE_MODEL, [], [{"op": "post.softmax", "input": "logits"}],
     "post[0] post.softmax: reads 'logits', which is neither an output of the model nor added by an earlier post "
     "chain; there are: 'y'"),
    (IMAGE_MODEL, [], [{"op": "post.argmax", "input": "softmax"}, {"op": "post.softmax", "input": "y"}],
     "post[0] post.argmax: reads 'softmax', which is neither"),
    (IMAGE_MODEL, [], [{"op": "post.softmax"}, {"op": "post.softmax", "input": "y"}],
     "post[1] post.softmax: adds output 'softmax', which post[0] post.softmax adds already; name what it adds with "
     "'output'"),
    (IMAGE_MODEL, [], [{"op": "post.softmax", "output": "y"}],
     "post[0] post.softmax: adds output 'y', which the model gives already"),
    (IMAGE_MODEL, [], [{"op": "post.topk", "params": {"k": 1}, "output": "best"},
                       {"op": "post.softmax", "input": "y", "output": "best.values"}],
     "post[1] post.softmax: adds output 'best.values', which post[0] post.topk adds already"),
    (IMAGE_MODEL, [], [{"op": "post.topk", "params": {"k": 1}}, {"op": "post.argmax"}],
     "post[1] post.argmax: follows post[0] post.topk, which gives several arrays (indices, values) and so ends its "
     "chain; start a new chain on one of them with 'input' (e.g. \"topk.indices\")"),
    (IMAGE_MODEL, [], [{"op": "post.softmax", "output": "p"}, {"op": "post.argmax"}],
     "post[0] post.softmax: 'output' names what a chain adds and goes on its last op, but post[1] post.argmax "
     "continues the chain"),
    (IMAGE_MODEL, [{**CLS_PRE[0], "output": "small"}, CLS_PRE[1]], [],
     "pre[0] image.resize_pad: 'output' names what a post chain adds"),
    (IMAGE_MODEL, [], [{"op": "post.topk", "params": {"k": 3}}],
     "post[0] post.topk: is given float32 [?, 2] (batch axis 0), which it cannot take (k=3 is more than the 2 "
     "scores of the last axis)"),
    # what the ops read from the bundle
    (TEXT_MODEL, [], [{"op": "text.ctc_greedy", "params": {"vocabulary": "metadata:dictionary"}}],
     "post[0] text.ctc_greedy: parameter 'vocabulary' reads metadata 'dictionary', which the manifest does not have "
     "(its metadata: 'character')"),
    (TEXT_MODEL, [], [{"op": "text.ctc_greedy", "params": {"vocabulary": "asset:vocab"}}],
     "post[0] text.ctc_greedy: parameter 'vocabulary' reads asset 'vocab', which the bundle does not have (its "
     "assets: none; add it with `edgebus model pack --asset vocab=FILE`)"),
    (TEXT_MODEL, [], [{"op": "text.ctc_greedy", "params": {"vocabulary": "words.txt"}}],
     "parameter 'vocabulary': must be 'asset:NAME' (a file of the model's bundle), 'metadata:KEY'"),
    (TEXT_MODEL, [], [{"op": "text.ctc_greedy", "params": {"vocabulary": "metadata:character", "space": False}}],
     "post[0] text.ctc_greedy: parameter 'vocabulary': metadata:character has 95 entries but the model scores 97 "
     "classes, 96 besides the blank 0: is it the model's vocabulary, one entry a line?"),
    (TEXT_MODEL, [], [{"op": "text.ctc_greedy", "params": {"vocabulary": ["a", "b"]}}],
     "('a', 'b') has 3 entries (with the space appended) but the model scores 97 classes"),
])
def test_chains_that_cannot_run_are_refused_naming_the_op(model: tuple[list[TensorSpec], list[TensorSpec]],
                                                          pre: list[dict[str, Any]], post: list[dict[str, Any]],
                                                          message: str) -> None:
    m = manifest(*model, pre=pre, post=post, metadata={"character": VOCAB})
    with pytest.raises(ChainError) as info:
        check_chains(m)
    assert message in str(info.value)
    assert str(info.value).endswith("; fix the model's manifest") and isinstance(info.value, ops.OpsError)
    with pytest.raises(ChainError):  # and so can nothing be built to run
        build_chains(m)


def test_the_text_model_with_a_fitting_vocabulary_passes() -> None:
    m = manifest(*TEXT_MODEL, post=[CTC], metadata={"character": VOCAB})
    assert shapes(check_chains(m).outputs)[1:] == [("ctc_greedy.text", "uint32", ["N", None], 0),
                                                   ("ctc_greedy.confidence", "float32", ["N"], 0)]


def test_pack_refuses_chains_that_cannot_run(real_model, capsys, tmp_path: Path) -> None:
    code, err = pack(capsys, real_model("ppocr-cls"), tmp_path / "cls.ebm", spec={"pre": [CLS_PRE[0]]})
    assert code == 1 and not (tmp_path / "cls.ebm").exists()
    assert err.startswith("edgebus: cannot pack: pre[0] image.resize_pad: gives uint8 [N, 48, 192, C] (batch axis 0) "
                          "at the end of the chain feeding input 'x' (dtype uint8, not float32)"), err
    code, err = pack(capsys, real_model("ppocr-rec"), tmp_path / "rec.ebm",
                     spec={"post": [{"op": "text.ctc_greedy", "params": {"vocabulary": "metadata:characters"}}]})
    assert code == 1 and "reads metadata 'characters', which the manifest does not have (its metadata: " in err
    # an asset vocabulary is read at pack: one too short for the model's classes is refused there
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    code, err = pack(capsys, real_model("ppocr-rec"), tmp_path / "rec.ebm", "--asset",
                     f"vocab={tmp_path / 'vocab.txt'}",
                     spec={"post": [{"op": "text.ctc_greedy", "params": {"vocabulary": "asset:vocab"}}]})
    assert code == 1 and "asset:vocab has 3 entries (with the space appended) but the model scores 6625 classes" in err


@pytest.mark.anyio
async def test_the_store_refuses_at_install_a_bundle_whose_chains_cannot_run(real_model, capsys, make_system,
                                                                            tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key, public = key_files(tmp_path)
    good = tmp_path / "cls-1.0.0.ebm"
    m = packed(capsys, real_model("ppocr-cls"), good, "--key", str(key), name="text-direction",
               spec={"pre": CLS_PRE, "post": [{"op": "post.argmax"}]})
    # signed by a trusted key, but made without pack's check: the CTC decode on a classifier
    bad = msgspec.structs.replace(m, version="1.1.0", post=[OpSpec(op="text.ctc_greedy",
                                                                    params={"vocabulary": "metadata:character"})])
    bundle = Bundle.create(bad, dict(Bundle.load(good).files))
    bundle.sign(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key.read_text().strip())))
    bundle.save(tmp_path / "cls-1.1.0.ebm")
    system: System = make_system(store_config(public))
    await system.wait_ready("security", "modelstore")
    # the demo bundle (pre signal.frame, vibration_features; post threshold_hysteresis) still installs
    assert "vibration-anomaly" in system.busctl("model", "list", check=True).stdout
    refused = system.busctl("model", "install", str(tmp_path / "cls-1.1.0.ebm"))
    assert refused.returncode == 1
    assert ("bad bundle: its pre and post ops cannot run: post[0] text.ctc_greedy: parameter 'vocabulary' reads "
            "metadata 'character', which the manifest does not have") in refused.stderr, refused.stderr
    system.busctl("model", "install", str(good), check=True)


# -- running ----------------------------------------------------------------------------------------


def test_a_rendered_line_is_read_back_through_the_manifest_ops_alone(real_model, capsys, tmp_path: Path) -> None:
    """The recogniser as it ships, with its manifest's ops: the client sends the rendered image
    (uint8 HWC, any width), the reply carries the text; the model's input is bit-exact with the
    ops run by hand."""
    from drivers.ops import _image, _text

    packed(capsys, real_model("ppocr-rec"), tmp_path / "rec.ebm", spec={"pre": REC_PRE, "post": [CTC]})
    rec = Model(tmp_path / "rec.ebm")
    lines = ["Hello edgebus 42", "OCR 2026"]
    images = [render(t) for t in lines]
    for line, image in zip(lines, images):
        out = rec(x=image[None])
        assert ops.texts(out["ctc_greedy.text"]) == [line]
        assert out["ctc_greedy.confidence"][0] > 0.8
        want = _image.normalize(_text.resize_pad(image, 48, 320)[0], **HALF)
        np.testing.assert_array_equal(rec.chains.pre({"x": image[None]})["x"], want)
    # a batch of two images of one size: one row each, in order
    same = [images[1], np.ascontiguousarray(images[1][:, ::-1])]
    out = rec(x=np.stack(same))
    assert out["ctc_greedy.text"].shape[0] == 2 and ops.texts(out["ctc_greedy.text"])[0] == lines[1]


def test_the_vocabulary_may_come_from_an_asset(real_model, capsys, tmp_path: Path) -> None:
    rec_model = real_model("ppocr-rec")
    vocab = packed(capsys, rec_model, tmp_path / "probe.ebm").metadata["character"]
    (tmp_path / "vocab.txt").write_text(vocab, newline="")
    m = packed(capsys, rec_model, tmp_path / "rec.ebm", "--asset", f"vocab={tmp_path / 'vocab.txt'}",
               spec={"pre": REC_PRE, "post": [{"op": "text.ctc_greedy", "params": {"vocabulary": "asset:vocab"}}]})
    assert check_chains(m).assets == ["vocab"]
    with pytest.raises(ChainError, match="reads asset 'vocab', which the driver did not fetch"):
        build_chains(m)
    rec = Model(tmp_path / "rec.ebm", {"vocab": (tmp_path / "vocab.txt").read_bytes()})
    assert ops.texts(rec(x=render("Asset 7")[None])["ctc_greedy.text"]) == ["Asset 7"]
    # the declarations' reading of a vocabulary is the kernel module's
    from drivers.ops import _text

    assert ops.vocabulary(vocab) == _text.vocabulary_from_metadata(vocab)
    assert ops.vocabulary(vocab, space=False) == _text.vocabulary_from_metadata(vocab, space=False)


def test_classifier_and_detector_through_their_chains(real_model, capsys, tmp_path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    packed(capsys, real_model("ppocr-cls"), tmp_path / "cls.ebm",
           spec={"pre": CLS_PRE, "post": [{"op": "post.argmax", "output": "direction"}]})
    cls = Model(tmp_path / "cls.ebm")
    line = render("upright text")
    both = np.stack([line, line[::-1, ::-1]])  # as read, and turned half a turn
    np.testing.assert_array_equal(cls(x=both)["direction"], [0, 1])
    packed(capsys, real_model("ppocr-det"), tmp_path / "det.ebm", spec={
        "pre": [{"op": "image.resize", "params": {"height": 320, "width": 320}},
                {"op": "image.normalize", "params": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}],
        "post": [{"op": "text.db_boxes", "params": {"max_candidates": 20}}]})
    det = Model(tmp_path / "det.ebm")
    font = ImageFont.load_default(size=28)
    page = Image.new("RGB", (320, 320), "white")
    draw = ImageDraw.Draw(page)
    draw.text((20, 40), "first line", fill="black", font=font)
    draw.text((40, 200), "second 123", fill="black", font=font)
    blank = np.full((320, 320, 3), 255, np.uint8)
    out = det(x=np.stack([np.asarray(page), blank]))
    counts = out["db_boxes.counts"]
    np.testing.assert_array_equal(counts, [2, 0])
    boxes = out["db_boxes.boxes"][0, :2]
    assert boxes[0, :, 1].mean() < 120 < 180 < boxes[1, :, 1].mean()  # in reading order, each around its line
    assert not out["db_boxes.boxes"][0, 2:].any() and not out["db_boxes.boxes"][1].any()


def test_rows_and_fit_are_held_as_the_chains_run(real_model, capsys, tmp_path: Path) -> None:
    chains = build_chains(Bundle.load(DEMO).manifest)
    # 4096 samples make two frames of 2048: two rows for one request's row
    with pytest.raises(OpInputError, match=r"'signal.frame' cannot take its input: pre\[0\] in the chain feeding "
                                           r"input 'features': float32 \[1, 4096\] gives "
                                           r"2 row\(s\) \(float32 \[2, 2048\]\) for 1 input row\(s\); each row must "
                                           r"give exactly one; it takes real signals of at least 2048 samples"):
        chains.pre({"features": np.zeros((1, 4096), np.float32)})
    with pytest.raises(OpInputError, match="input 'features', which its chain"):
        chains.pre({"signal": np.zeros((1, 2048), np.float32)})
    # one mean for every channel passes the check (the model fixes 3 channels), but a
    # one-channel image then does not fit the model's input: said before ONNX Runtime sees it
    m = packed(capsys, real_model("ppocr-cls"), tmp_path / "cls.ebm", spec={"pre": [
        CLS_PRE[0], {"op": "image.normalize", "params": {"mean": [0.5], "std": [0.5]}}]})
    assert check_chains(m).inputs[0].shape == [None, None, None, 3]
    with pytest.raises(OpInputError, match=r"pre\[1\] ends the chain feeding input 'x' with what the model does "
                                           r"not take: input 'x' takes float32 "
                                           r"\[\?, 3, \?, \?\], got float32 \[1, 1, 48, 192\] \(axis 1 is 1, not 3\)"):
        build_chains(m).pre({"x": np.zeros((1, 20, 30, 1), np.uint8)})


def test_texts_are_code_points() -> None:
    words = ["", "edge", "文字识别", "a b"]
    codes = np.zeros((4, 6), np.uint32)
    for i, w in enumerate(words):
        codes[i, :len(w)] = [ord(c) for c in w]
    assert ops.texts(codes) == words
    assert ops.texts(codes[1]) == ["edge"] and ops.texts(np.zeros((2, 0), np.uint32)) == ["", ""]


def test_the_declarations_import_neither_numba_nor_numpy() -> None:
    """The model store and the scheduler check contracts: they must not pay numba's import."""
    code = (f"import sys; import drivers.ops, drivers.ops._chain, drivers.ops._catalog; "
            f"from services.modelstore import Bundle; "
            f"c = drivers.ops.check_chains(Bundle.load({str(DEMO)!r}).manifest); "
            f"assert c.inputs[0].dtype == 'float32'; "
            f"print(sorted(m for m in ('numba', 'numpy', 'llvmlite') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
