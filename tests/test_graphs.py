"""Pipelines as graphs in the scheduler: PP-OCRv4's detector and recogniser from the
rapidocr-onnxruntime wheel (packed as a user would, nobody's ONNX file edited) in a
three-stage graph declared in the scheduler's settings, det -> crop (for each detected box)
-> rec, run by ONE Infer on the graph's name.

* the graph's text, boxes and confidences equal its stages run by hand through the bus
  (detector, the same crop in the test, recogniser), on an image of the detector's size and
  on a larger one (its boxes scaled from the map to the image);
* two lines of text fan out into two items that run as one request of the recogniser, and
  concurrent graph requests' items share its batches; each stage's time is in the reply and
  in the scheduler's metrics; no text: no items, the recogniser not run;
* a stage that fails answers with its error, the graph and the stage named; a model the graph
  names that is not installed is named before any stage runs;
* a graph that cannot run is refused when the config is checked, naming the graph and stage;
* ``busctl infer ocr --input IMAGE`` shows the text, its boxes and each stage's time.

The models are fetched by `make test` (tools.fetch_models); without the package index the
tests that need them skip, saying why.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Iterator

import anyio
import msgspec
import numpy as np
import pytest

from services import BadMessage, UnknownDestination
from services.scheduler import GetSchedule, InferResult, Schedule

from conftest import BIN, System
from test_inference import config
from helpers.models import pack_real, system_with
from test_real_models import DET_POST, DET_PRE, REC_POST, REC_PRE, infer

#: the graph as a user declares it (here inline, as the test config's settings are one table)
OCR = {
    "inputs": ["image"],
    "outputs": {"text": "rec.ctc_greedy.text", "confidence": "rec.ctc_greedy.confidence", "boxes": "crop.boxes",
                "counts": "det.db_boxes.counts"},
    "stages": [
        {"name": "det", "model": "text-det", "inputs": {"x": "image"}},
        {"name": "crop", "op": "crop", "for_each": "det.db_boxes.boxes", "params": {"height": 48, "width": 320},
         "inputs": {"image": "image", "boxes": "det.db_boxes.boxes", "map": "det.sigmoid_0.tmp_0"}},
        {"name": "rec", "model": "text-rec", "inputs": {"x": "crop.crops"}},
    ],
}


def _variant(rec_model: str) -> dict[str, Any]:
    g = json.loads(json.dumps(OCR))
    g["stages"][2]["model"] = rec_model
    return g


#: the classifier where the recogniser was: asked for what it gives, it fails on the crops it
#: is given (uint8 images; it takes float32 NCHW); asked for the recogniser's text, it is refused
#: before any stage runs
CLS = {**_variant("text-cls"), "outputs": {"direction": "rec.save_infer_model/scale_0.tmp_1"}}
GRAPHS = {"ocr": OCR, "ocr-cls": CLS, "ocr-cls-text": _variant("text-cls"), "ocr-missing": _variant("text-nope")}


def inline(value: Any) -> str:
    """``value`` as a TOML inline value (keys quoted)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {inline(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(inline(v) for v in value) + "]"
    return json.dumps(value)


def rendered(lines: list[tuple[int, int, str, int]], size: tuple[int, int]) -> np.ndarray:
    """Lines of text (x, y, text, font size) in black on white, as a camera gives them:
    uint8 HWC RGB."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    for x, y, line, font in lines:
        draw.text((x, y), line, fill="black", font=ImageFont.load_default(size=font))
    return np.asarray(img)


#: the detector's own size (640 x 160: boxes on the map are on the image), and a larger one
TWO_LINES = rendered([(30, 12, "EDGEBUS 2026", 44), (30, 90, "HELLO WORLD", 44)], (640, 160))
LARGER = rendered([(60, 30, "EDGEBUS 2026", 64), (60, 140, "OCR GRAPH", 64)], (960, 240))


@pytest.fixture(scope="module")
def system(real_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    tmp = tmp_path_factory.mktemp("graphs")
    bundles = {"text-det": pack_real(real_model("ppocr-det"), tmp / "det.ebm", "text-det",
                                     {"pre": DET_PRE, "post": DET_POST}),
               "text-rec": pack_real(real_model("ppocr-rec"), tmp / "rec.ebm", "text-rec",
                                     {"pre": REC_PRE, "post": REC_POST}),
               "text-cls": pack_real(real_model("ppocr-cls"), tmp / "cls.ebm", "text-cls", {})}
    text = config(1).replace("max_delay_ms = 5,", f'max_delay_ms = 20, batching = "on", max_batch = 8, '
                                                  f'graphs = {inline(GRAPHS)},')
    text = text.replace("[services.scheduler]\n", '[services.scheduler]\nenvironment = { EDGEBUS_METRICS_INTERVAL = "0.2" }\n')
    with system_with(tmp, text, bundles) as s:
        yield s


async def by_hand(bus: Any, image: np.ndarray) -> dict[str, Any]:
    """The graph's stages one by one: the detector through the bus, the crop here (boxes
    scaled from the map to the image when their sizes differ), the recogniser through the bus."""
    from drivers.ops import text

    _, det = await infer(bus, "text-det", {"x": image[None]},
                         outputs=["db_boxes.boxes", "db_boxes.counts", "sigmoid_0.tmp_0"])
    count = int(det["db_boxes.counts"][0])
    boxes = det["db_boxes.boxes"][0][:count]
    prob = det["sigmoid_0.tmp_0"]
    if prob.shape[-2:] != image.shape[:2]:
        boxes = text.scale_boxes(boxes, prob.shape[-2:], image.shape[:2])
    crops, _ = text.crop_rotated(image, boxes, 48, 320)
    _, rec = await infer(bus, "text-rec", {"x": crops}, outputs=["ctc_greedy.text", "ctc_greedy.confidence"])
    return {"counts": det["db_boxes.counts"], "boxes": boxes, "text": rec["ctc_greedy.text"],
            "confidence": rec["ctc_greedy.confidence"]}


def test_a_three_stage_chain_with_fan_out_gives_what_its_stages_give_by_hand(system: System) -> None:
    from drivers.ops import texts

    async def main() -> list[tuple[InferResult, dict[str, np.ndarray], dict[str, Any]]]:
        out = []
        async with system.client() as bus:
            for image in (TWO_LINES, LARGER):
                result, got = await infer(bus, "ocr", {"image": image[None]})
                out.append((result, got, await by_hand(bus, image)))
        return out

    for (result, got, hand), words in zip(anyio.run(main), (["EDGEBUS2026", "HELLOWORLD"], ["EDGEBUS2026", "OCRGRAPH"])):
        assert list(got) == ["text", "confidence", "boxes", "counts"]
        assert got["counts"].tolist() == hand["counts"].tolist() == [2]
        # per item, fanned back in per request: [1 request, 2 boxes, ...]
        assert got["boxes"].shape == (1, 2, 4, 2) and got["text"].shape[:2] == (1, 2)
        np.testing.assert_array_equal(got["boxes"][0], hand["boxes"])
        assert texts(got["text"][0]) == texts(hand["text"])
        assert [t.replace(" ", "") for t in texts(got["text"][0])] == words  # what a person reads
        np.testing.assert_array_equal(got["confidence"][0], hand["confidence"])
        assert (got["confidence"] > 0.9).all()
        # each stage's time, in order, with its model (or op) and items
        assert [(t.stage, t.model, t.items) for t in result.stages] == [
            ("det", "text-det", 1), ("crop", "crop", 2), ("rec", "text-rec", 2)]
        assert all(t.ms > 0 for t in result.stages)
        assert result.total_ms >= sum(t.ms for t in result.stages) * 0.99
        assert result.model == "ocr" and result.version == "det=1.0.0 rec=1.0.0" and result.batch == 1
    # the larger image's boxes are on the image, not on the detector's 640 x 160 map
    assert got["boxes"][0][:, :, 0].max() > 640 * 0.5 * 960 / 640


def test_items_of_concurrent_requests_batch_and_stage_times_reach_the_metrics(system: System) -> None:
    from drivers.ops import texts
    from protocols.telemetry import MetricsSnapshot

    async def main() -> tuple[list[Any], Schedule, Schedule, dict[str, float]]:
        results: list[Any] = [None] * 8
        async with system.client() as bus:
            before = await bus.call("scheduler", GetSchedule(), Schedule)

            async def one(i: int) -> None:
                results[i] = await infer(bus, "ocr", {"image": TWO_LINES[None]}, outputs=["text"])

            async with anyio.create_task_group() as tg:
                for i in range(len(results)):
                    tg.start_soon(one, i)
            after = await bus.call("scheduler", GetSchedule(), Schedule)
            counts: dict[str, float] = {}
            sub = await bus.subscribe("metrics.scheduler")
            with anyio.fail_after(10):
                while not {"det", "crop", "rec"} <= set(counts):
                    snap = (await sub.receive()).decode(MetricsSnapshot)
                    for family in snap.families:
                        if family.name == "edgebus_graph_stage_seconds":
                            counts = {s.labels["stage"]: s.value for s in family.samples
                                      if s.name.endswith("_count") and s.labels.get("graph") == "ocr"}
        return results, before, after, counts

    results, before, after, counts = anyio.run(main)
    for result, got in results:
        assert list(got) == ["text"]
        assert [t.replace(" ", "") for t in texts(got["text"][0])] == ["EDGEBUS2026", "HELLOWORLD"]
        assert [t.items for t in result.stages] == [1, 2, 2]  # two boxes: one request of two rows
    rec = {m.model: m for m in before.models}.get("text-rec"), {m.model: m for m in after.models}["text-rec"]
    batches = rec[1].batches - (rec[0].batches if rec[0] else 0)
    requests = rec[1].mean_batch * rec[1].batches - (rec[0].mean_batch * rec[0].batches if rec[0] else 0)
    assert requests / batches > 1.2, (rec, "the graph requests' items did not share the recogniser's batches")
    assert counts["det"] >= 8 and counts["crop"] >= 8 and counts["rec"] >= 8, counts


def test_no_text_no_items_and_the_recogniser_is_not_run(system: System) -> None:
    blank = np.full((160, 640, 3), 255, np.uint8)
    result, got = anyio.run(lambda: _one(system, "ocr", {"image": blank[None]}))
    assert got["counts"].tolist() == [0]
    assert got["text"].shape[:2] == (1, 0) and got["boxes"].shape == (1, 0, 4, 2)
    assert [(t.stage, t.items) for t in result.stages] == [("det", 1), ("crop", 0), ("rec", 0)]
    assert result.version == "det=1.0.0"  # the recogniser had nothing to run on


async def _one(system: System, model: str, inputs: dict[str, np.ndarray], **kw: Any) -> Any:
    async with system.client() as bus:
        return await infer(bus, model, inputs, **kw)


def test_a_failing_stage_answers_naming_the_graph_and_the_stage(system: System) -> None:
    async def main() -> list[Exception]:
        errors = []
        async with system.client() as bus:
            for model, inputs, kw in [
                    # the crops are uint8 images; the classifier takes float32 NCHW
                    ("ocr-cls", {"image": TWO_LINES[None]}, {}),
                    # one channel: the detector's pre ops take three
                    ("ocr", {"image": TWO_LINES[None, :, :, :1].copy()}, {}),
                    ("ocr-missing", {"image": TWO_LINES[None]}, {}),
                    ("ocr-cls-text", {"image": TWO_LINES[None]}, {}),
                    ("ocr", {"image": TWO_LINES[None]}, {"outputs": ["texts"]}),
                    ("ocr", {"picture": TWO_LINES[None]}, {})]:
                with pytest.raises((BadMessage, UnknownDestination)) as info:
                    await infer(bus, model, inputs, **kw)
                errors.append(info.value)
        return errors

    cls, det, missing, cls_text, output, name = anyio.run(main)
    assert isinstance(cls, BadMessage) and str(cls).startswith("bad-message: graph ocr-cls, stage rec: text-cls"), cls
    assert "input 'x' takes float32" in str(cls)
    assert isinstance(det, BadMessage) and str(det).startswith("bad-message: graph ocr, stage det: text-det"), det
    assert isinstance(missing, UnknownDestination) and "graph ocr-missing, stage rec:" in str(missing)
    assert "text-nope" in str(missing)
    assert str(cls_text).startswith("bad-message: graph ocr-cls-text, stage rec: text-cls gives no output "
                                    "'ctc_greedy.text'"), cls_text
    assert "graph ocr gives no output 'texts'" in str(output) and "'text'" in str(output)
    assert "graph ocr" in str(name) and "unknown input(s) 'picture'" in str(name) and "'image'" in str(name)


def test_busctl_infer_on_a_graph_shows_the_text_its_boxes_and_each_stage(system: System, tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "two-lines.png"
    Image.fromarray(TWO_LINES).save(path)
    proc = system.busctl("infer", "ocr", "--input", str(path), "--deadline", "60", timeout=90)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "'EDGEBUS 2026'" in out.replace("EDGEBUS2026", "EDGEBUS 2026") or "EDGEBUS" in out, out
    assert "HELLO" in out
    for stage in ("det", "crop", "rec"):
        assert f"stage {stage}" in out, out
    assert "boxes: float32 [1, 2, 4, 2]" in out and "box 0:" in out, out


# -- graphs refused when the config is checked (no system, no models) --------------------------------


def _check(tmp_path: Path, graph: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "system.toml"
    path.write_text(f"""
[services.scheduler]
command = ["{{python}}", "-m", "services.scheduler"]
[services.scheduler.settings]
graphs = {inline({"ocr": graph})}
""")
    return subprocess.run([str(BIN / "edgebus"), "config", "check", str(path)], capture_output=True, text=True,
                          timeout=60)


def test_a_graph_that_cannot_run_is_refused_naming_the_graph_and_stage(tmp_path: Path) -> None:
    assert _check(tmp_path, OCR).returncode == 0
    stages = OCR["stages"]
    cases = [
        ({**OCR, "stages": [stages[0], stages[1], {**stages[2], "inputs": {"x": "crop.crop"}}]},
         "graph ocr, stage rec: inputs.x: 'crop.crop': op crop (stage crop) gives crops, boxes, widths"),
        ({**OCR, "stages": [stages[0], stages[1], {**stages[2], "inputs": {"x": "recogniser.crops"}}]},
         "graph ocr, stage rec: inputs.x: 'recogniser.crops' names no stage 'recogniser'"),
        ({**OCR, "stages": [{**stages[0], "inputs": {"x": "rec.ctc_greedy.text"}}, stages[1], stages[2]]},
         "graph ocr: stages det -> crop -> rec -> det form a cycle"),
        ({**OCR, "stages": [stages[0], {k: v for k, v in stages[1].items() if k != "for_each"}, stages[2]]},
         "graph ocr, stage crop: op crop takes 'boxes' per item: fan out with for_each"),
        ({**OCR, "stages": [stages[0], {**stages[1], "params": {"height": 0}}, stages[2]]},
         "graph ocr, stage crop: params.height must be an integer >= 1, not 0"),
        ({**OCR, "stages": [stages[0], stages[1], {**stages[2], "op": "crop"}]},
         "graph ocr, stage rec: give either model (an installed model) or op"),
        ({**OCR, "stages": [*stages, {"name": "cls", "model": "text-cls", "inputs": {"x": "crop.crops"}}]},
         "graph ocr: stage(s) cls: nothing takes their outputs"),
    ]
    for graph, message in cases:
        proc = _check(tmp_path, graph)
        assert proc.returncode != 0 and message in proc.stderr + proc.stdout, (message, proc.stderr, proc.stdout)
        assert "Traceback" not in proc.stderr


def test_a_graph_s_layout_orders_stages_and_finds_its_fan_out() -> None:
    from services.scheduler._graphs import FanOut, check_graph
    from services.scheduler._settings import GraphSettings

    layout = check_graph("ocr", msgspec.convert(OCR, GraphSettings))
    assert [[s.name for s in wave] for wave in layout.waves] == [["det"], ["crop"], ["rec"]]
    assert layout.stages["crop"].fans_out and layout.stages["crop"].counts == "det.db_boxes.counts"
    assert layout.level_of("rec.ctc_greedy.text") == "crop" and layout.level_of("det.db_boxes.boxes") is None
    assert sorted(layout.stages["det"].wanted) == ["db_boxes.boxes", "db_boxes.counts", "sigmoid_0.tmp_0"]
    fan = FanOut(np.array([2, 0, 1]))
    padded = np.arange(3 * 4).reshape(3, 4)
    items = fan.unpad(padded)
    assert items.tolist() == [0, 1, 8] and fan.owner.tolist() == [0, 0, 2]
    assert fan.pad(items).tolist() == [[0, 1], [0, 0], [8, 0]]
    assert fan.spread(np.array([10, 20, 30])).tolist() == [10, 10, 30]

