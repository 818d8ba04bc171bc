"""The demo behind `make run` (issue 14): the default system's camera shows shop labels
(rendered text) to an OCR graph of real PP-OCRv4 models, whose text appears on results.ocr.

* the default system, as `make run` boots it (ports replaced), publishes on results.ocr each
  label's words as a person reads them, with the boxes and confidences as tensors; no line of
  its log is a warning;
* without the OCR models (the package index out of reach when `make run` built the demo) the
  rest of the system runs: the OCR pipeline says once (info) that its models are missing and
  skips its frames quietly, and reads as soon as they are installed;
* a camera takes a folder or the demo's labels, one of the two;
* `busctl sub results.ocr` shows the text first.

The models are fetched and packed by ``tools.build_ocr_demo`` (as `make run` does, here when
they are missing); without the package index the tests that need them skip, saying why.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest

from drivers.sensors import CameraSettings, SensorSettings
from kernel import default_config_text
from protocols.modelstore import Activate, Install, ModelState
from protocols.scheduler import Detection, PipelineResult
from services import SettingsError, decode_settings
from tools import build_ocr_demo

from conftest import BIN, System, free_port, wait_for

pytestmark = pytest.mark.anyio

DEMO = Path(__file__).resolve().parent.parent / "services" / "modelstore" / "demo"
#: what each label reads, in the camera's order (name order)
WORDS = [" ".join(text for _, _, text, _ in lines).split() for lines in build_ocr_demo.LABELS.values()]


@pytest.fixture(scope="module")
def ocr_bundles(real_model: Any) -> list[Path]:
    """The demo's OCR bundles, built as `make run` builds them (kept when up to date)."""
    for name, _ in build_ocr_demo.BUNDLES.values():
        real_model(name)  # skips, saying why, where the package index is out of reach
    assert build_ocr_demo.main([]) == 0
    bundles = [DEMO / f"{name}-{build_ocr_demo.VERSION}.ebm" for name in build_ocr_demo.BUNDLES]
    assert all(b.exists() for b in bundles)
    return bundles


def default_config(**replace: str) -> str:
    """The built-in default as `make run` boots it, its telemetry port free and no bearing
    fault (its alert is a warning line), with ``replace``'s old -> new texts."""
    config = default_config_text().replace('http = "127.0.0.1:9464"', f'http = "127.0.0.1:{free_port()}"')
    config = config.replace("fault_at = 20.0", "")
    for old, new in replace.items():
        assert old in config, old
        config = config.replace(old, new)
    return config


def records(system: System) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in system.log().splitlines() if line.startswith("{")]


def read(result: PipelineResult) -> list[str]:
    return " ".join(result.text).split()


async def test_the_default_system_reads_the_demo_labels_on_results_ocr(make_system, ocr_bundles: list[Path]) -> None:
    assert list(build_ocr_demo.LABELS) == sorted(build_ocr_demo.LABELS)  # (the camera's order: by name)
    system: System = make_system(default_config())
    await system.wait_ready("scheduler", "camera", "accel-cpu", timeout=60)
    seen: dict[int, PipelineResult] = {}
    async with system.client() as bus:
        async with bus.subscribe("results.ocr") as sub:
            with anyio.fail_after(60):  # every label once: 5 frames at 0.5 per second, and the first's load
                while len(seen) < len(WORDS):
                    incoming = await sub.receive()
                    result = incoming.decode(PipelineResult)
                    label = result.seq % len(WORDS)
                    assert read(result) == WORDS[label], (result.seq, result.text)
                    outputs = {t.name: np.array(incoming.tensor(t)) for t in result.outputs}
                    lines = len(list(build_ocr_demo.LABELS.values())[label])
                    assert outputs["boxes"].shape == (1, lines, 4, 2) and outputs["confidence"].shape == (1, lines)
                    assert (outputs["confidence"] > 0.9).all(), outputs["confidence"]
                    seen[label] = result
    assert {r.model for r in seen.values()} == {"ocr"} and {r.source for r in seen.values()} == {"sensor.camera"}
    assert seen[0].version == "det=1.0.0 rec=1.0.0"
    # what a person watching sees: the text first on each line
    proc = subprocess.run([str(BIN / "busctl"), "sub", "results.ocr", "--limit", "1"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "EDGEBUS_RUN_DIR": str(system.run_dir), "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    _, line = proc.stdout.splitlines()
    assert "PipelineResult" in line and re.search(r'\{"text": \["[A-Za-z0-9]', line), line
    assert [r for r in records(system) if r["level"] not in ("debug", "info")] == []


async def test_without_the_ocr_models_the_pipeline_says_so_once_and_reads_once_they_come(make_system,
                                                                                       tmp_path: Path) -> None:
    # the store preloads only the vibration model: what `make run` gives without the package index
    only = tmp_path / "preload"
    only.mkdir()
    (only / "vibration-anomaly-1.0.0.ebm").write_bytes((DEMO / "vibration-anomaly-1.0.0.ebm").read_bytes())
    system: System = make_system(default_config(**{
        "preload_demo = true": f'preload_demo = false\npreload = "{only}"',
        "rate = 0.5                 # frames per second": "rate = 2.0"}))  # (the pipeline takes 1 a second)
    await system.wait_ready("scheduler", "camera", "accel-cpu", timeout=60)
    wait_for(lambda: "pipeline_model_missing" in system.log(), 30, "the OCR pipeline's first frame")
    async with system.client() as bus:
        async with bus.subscribe("results.") as sub:
            with anyio.fail_after(30):  # the vibration pipeline goes on, the OCR one runs no frame
                detections = 0
                while detections < 8:  # 4 s at 2 a second: the OCR pipeline tried 3 more frames
                    incoming = await sub.receive()
                    assert incoming.header.dest == "results.vibration", incoming.header.dest
                    incoming.decode(Detection)
                    detections += 1
    missing = [r for r in records(system) if r["event"] == "pipeline_model_missing"]
    assert len(missing) == 1 and missing[0]["level"] == "info" and missing[0]["model"] == "ocr", missing
    assert "text-det" in missing[0]["error"] and "stage det" in missing[0]["error"]
    assert [r for r in records(system) if r["level"] not in ("debug", "info")] == []
    if not all((DEMO / f"{name}-1.0.0.ebm").exists() for name in build_ocr_demo.BUNDLES):
        return  # (no bundles to install here: the part above is what an offline `make run` shows)
    async with system.client() as bus:
        for name in build_ocr_demo.BUNDLES:
            await bus.request("modelstore", Install(), frames=[(DEMO / f"{name}-1.0.0.ebm").read_bytes()], timeout=120)
            await bus.call("modelstore", Activate(name=name, version="1.0.0"), ModelState)
        async with bus.subscribe("results.ocr") as sub:
            with anyio.fail_after(30):
                result = (await sub.receive()).decode(PipelineResult)
    assert read(result) == WORDS[result.seq % len(WORDS)]


def test_a_camera_takes_a_folder_or_the_demo_labels() -> None:
    demo = decode_settings({"kind": "camera", "demo": True}, SensorSettings)
    assert isinstance(demo, CameraSettings) and demo.folder is None
    assert decode_settings({"kind": "camera", "folder": "images"}, SensorSettings, base=Path("/x")).folder == \
        Path("/x/images")
    for raw, says in [({"kind": "camera"}, "not neither"), ({"kind": "camera", "folder": "i", "demo": True}, "not both")]:
        with pytest.raises(SettingsError, match=re.escape(says)):
            decode_settings(raw, SensorSettings)

