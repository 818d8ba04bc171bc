"""Real models as they ship, through the bus: PP-OCRv4's text detector and recogniser and the
mobile text-direction classifier from the rapidocr-onnxruntime wheel, nobody's ONNX file
edited, no preprocessing in the client.

* the classifier's exported batch dimension is a literal -1: it runs, batched, and every
  answer equals direct ONNX Runtime bit for bit, alone and in batches;
* the detector (dynamic height and width) takes a camera's uint8 image through its pre ops
  and answers with its probability map and the boxes its post op (DB post-processing) finds;
* the recogniser's post op decodes CTC with the dictionary the model ships in its metadata;
* together they read the text of an image the test renders: an end result a person can check.

The models are fetched by `make test` (tools.fetch_models); without the package index the
tests skip, saying why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import anyio
import numpy as np
import pytest

from protocols import pack_tensors
from services.scheduler import GetSchedule, Infer, InferResult, Schedule

from conftest import System
from test_inference import config
from helpers.models import pack_real, system_with

DET_PRE = [{"op": "image.resize", "params": {"height": 160, "width": 640}},
           {"op": "image.normalize", "params": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                                "scale": True}}]
DET_POST = [{"op": "text.db_boxes", "params": {"thresh": 0.3, "box_thresh": 0.6, "unclip_ratio": 1.5}}]
REC_PRE = [{"op": "image.resize_pad", "params": {"height": 48, "width": 320}},
           {"op": "image.normalize", "params": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "scale": True}}]
REC_POST = [{"op": "text.ctc_greedy", "params": {"vocabulary": "metadata:character"}}]


@pytest.fixture(scope="module")
def models(real_model) -> dict[str, Path]:
    return {name: real_model(name) for name in ("ppocr-det", "ppocr-rec", "ppocr-cls")}


@pytest.fixture(scope="module")
def system(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    tmp = tmp_path_factory.mktemp("real")
    bundles = {"text-cls": pack_real(models["ppocr-cls"], tmp / "cls.ebm", "text-cls", {}),
               "text-det": pack_real(models["ppocr-det"], tmp / "det.ebm", "text-det",
                                     {"pre": DET_PRE, "post": DET_POST}),
               "text-rec": pack_real(models["ppocr-rec"], tmp / "rec.ebm", "text-rec",
                                     {"pre": REC_PRE, "post": REC_POST})}
    # batching on for every model, so that concurrent requests share runs
    with system_with(tmp, config(1).replace("max_delay_ms = 5,", 'max_delay_ms = 20, batching = "on", max_batch = 8,'),
                     bundles) as s:
        yield s


def session(path: Path) -> Any:
    """Direct ONNX Runtime, as the test system's driver runs it (one intra-op thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


async def infer(bus: Any, model: str, inputs: dict[str, np.ndarray], **kw: Any) -> tuple[InferResult, dict[str, np.ndarray]]:
    descs, frames = pack_tensors(inputs)
    incoming = await bus.request("scheduler", Infer(model=model, tensors=descs, **kw), frames=frames, timeout=60)
    result = incoming.decode(InferResult)
    return result, {t.name: np.array(incoming.tensor(t)) for t in result.outputs}


def rendered(text: str, size: tuple[int, int] = (640, 160)) -> np.ndarray:
    """``text`` in black on white, as a camera gives it: uint8 HWC RGB."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((40, 50), text, fill="black", font=ImageFont.load_default(size=48))
    return np.asarray(img)


def test_a_model_exported_with_a_literal_minus_one_batch_runs_batched_and_bit_exact(system: System,
                                                                                   models: dict[str, Path]) -> None:
    direct = session(models["ppocr-cls"])
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1, 3, 48, 192)).astype(np.float32) for _ in range(16)]
    expected = [direct.run(None, {"x": x})[0] for x in xs]
    stacked = direct.run(None, {"x": np.concatenate(xs[:8])})[0]

    async def main() -> list[tuple[InferResult, dict[str, np.ndarray]]]:
        got: list[Any] = [None] * len(xs)
        async with system.client() as bus:
            got[0] = await infer(bus, "text-cls", {"x": xs[0]})  # alone

            async def one(i: int) -> None:
                got[i] = await infer(bus, "text-cls", {"x": xs[i]})

            async with anyio.create_task_group() as tg:  # concurrently: they share batches
                for i in range(1, len(xs)):
                    tg.start_soon(one, i)
            schedule = await bus.call("scheduler", GetSchedule(), Schedule)
        assert any(m.model == "text-cls" and m.mean_batch > 1 for m in schedule.models), schedule
        return got

    got = anyio.run(main)
    assert got[0][0].batch == 1
    (name,) = got[0][1]
    np.testing.assert_array_equal(got[0][1][name], expected[0])
    assert max(r.batch for r, _ in got) > 1
    for i, (result, outputs) in enumerate(got):
        # a row computed in a batch is the row ONNX Runtime computes for that batch: with this
        # model and CPU, the same bits as alone (asserted against both)
        np.testing.assert_array_equal(outputs[name], expected[i], err_msg=f"request {i} (batch {result.batch})")
    np.testing.assert_array_equal(stacked, np.concatenate(expected[:8]))


def test_the_detector_takes_a_camera_image_and_gives_its_map_and_the_boxes(system: System,
                                                                          models: dict[str, Path]) -> None:
    from drivers.ops import build_chains

    from protocols.modelstore import Manifest

    image = rendered("EDGEBUS 2026")
    result, out = anyio.run(_one, system, "text-det", {"x": image[None]})
    # the probability map equals direct ONNX Runtime on the same pre-processed input
    manifest = _manifest(system, "text-det")
    assert isinstance(manifest, Manifest)
    feed = build_chains(manifest).pre({"x": image[None]})
    (prob,) = session(models["ppocr-det"]).run(None, feed)
    np.testing.assert_array_equal(out["sigmoid_0.tmp_0"], prob)
    assert out["db_boxes.counts"].tolist() == [1]
    (box,) = out["db_boxes.boxes"][0][:1]
    xs, ys = box[:, 0], box[:, 1]
    assert 20 < xs.min() < 60 and 300 < xs.max() < 450 and 40 < ys.min() < 75 and 85 < ys.max() < 120, box
    assert out["db_boxes.scores"][0][0] > 0.6


async def _one(system: System, model: str, inputs: dict[str, np.ndarray], **kw: Any) -> Any:
    async with system.client() as bus:
        return await infer(bus, model, inputs, **kw)


def _manifest(system: System, model: str) -> Any:
    from protocols.modelstore import InspectModel, ModelManifest

    async def get() -> Any:
        async with system.client() as bus:
            return (await bus.call("modelstore", InspectModel(name=model), ModelManifest)).manifest

    return anyio.run(get)


def test_the_text_of_a_rendered_image_is_read_through_detector_crop_and_recogniser(system: System) -> None:
    from drivers.ops import text, texts

    image = rendered("EDGEBUS 2026")

    async def main() -> tuple[list[str], np.ndarray, InferResult]:
        async with system.client() as bus:
            _, det = await infer(bus, "text-det", {"x": image[None]}, outputs=["db_boxes.boxes", "db_boxes.counts"])
            assert list(det) == ["db_boxes.boxes", "db_boxes.counts"]  # the map stayed in the scheduler
            boxes = det["db_boxes.boxes"][0][:det["db_boxes.counts"][0]]
            crops, _ = text.crop_rotated(image, boxes, 48, 320)
            result, rec = await infer(bus, "text-rec", {"x": crops},
                                      outputs=["ctc_greedy.text", "ctc_greedy.confidence"])
            return texts(rec["ctc_greedy.text"]), rec["ctc_greedy.confidence"], result

    read, confidence, result = anyio.run(main)
    # PP-OCR drops the space between words at this size; the characters are what a person reads
    assert [t.replace(" ", "") for t in read] == ["EDGEBUS2026"], read
    assert confidence[0] > 0.9 and result.model == "text-rec"


def test_inputs_that_do_not_fit_are_named_with_what_the_model_takes(system: System) -> None:
    from services import BadMessage

    async def main() -> list[str]:
        errors = []
        async with system.client() as bus:
            for model, inputs, kw in [
                    ("text-cls", {"x": np.zeros((1, 3, 48), np.float32)}, {}),
                    ("text-cls", {"y": np.zeros((1, 3, 48, 192), np.float32)}, {}),
                    ("text-det", {"x": np.zeros((1, 160, 640, 3), np.float32)}, {}),
                    ("text-cls", {"x": np.zeros((1, 3, 48, 192), np.float32)}, {"outputs": ["probs"]}),
                    ("text-cls", {"x": np.zeros((1, 3, 48, 192), np.float32)}, {"variant": "int8"})]:
                with pytest.raises(BadMessage) as info:
                    await infer(bus, model, inputs, **kw)
                errors.append(str(info.value))
        return errors

    rank, name, dtype, output, variant = anyio.run(main)
    assert "input 'x' takes float32 [?, 3, ?, ?], got float32 [1, 3, 48] (3 axes, not 4)" in rank
    assert "missing input(s) 'x'" in name and "unknown input(s) 'y'" in name
    assert "input 'x' takes uint8 [?, ?, ?, 3], got float32 [1, 160, 640, 3]" in dtype
    assert "no output 'probs'" in output and "save_infer_model/scale_0.tmp_1" in output
    assert "no variant 'int8'" in variant and "'full'" in variant
