"""A three-stage chain through the bus against the sum of its stages run directly.

    python -m tools.bench_graphs [--rounds 6] [--requests 30] [--out bench-results/graphs.json]

The chain is an OCR pipeline of real models as they ship in the rapidocr-onnxruntime wheel
(fetched by ``tools.fetch_models``), packed as a user would: PP-OCRv4's text detector (pre:
resize to 160 x 640, normalize; post: DB boxes), a crop for each box it finds
(``crop_rotated``, 48 x 320), and the recogniser (pre: resize_pad, normalize; post: CTC
greedy with its own dictionary), on a rendered image of two lines of text (two boxes).

* direct: in this process, ONNX Runtime sessions of one intra-op thread (as the driver runs
  them) and the same ops: the detector's pre chain, session and post chain, the crops, the
  recogniser's pre chain, session and post chain, one after the other;
* bus: one ``Infer(model="ocr")`` to the scheduler, which runs the graph declared in its
  settings: the detector on the driver, the crop in the scheduler, the recogniser on the
  driver (a system of one driver of one thread, nothing else running: batch 1).

Rounds interleave a block of each (their order alternating); the figures are the medians of
every request's time, their ratio (target: bus <= 1.15 x direct) and each stage's median
both ways.  The two answers (text, boxes) are compared: they must be the same.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from protocols import pack_tensors
from services.scheduler import Infer, InferResult
from tools._benchkit import boot, client, inference_config, install, pack_signed, stop, write_results

DET = {"pre": [{"op": "image.resize", "params": {"height": 160, "width": 640}},
               {"op": "image.normalize", "params": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                                    "scale": True}}],
       "post": [{"op": "text.db_boxes", "params": {"thresh": 0.3, "box_thresh": 0.6, "unclip_ratio": 1.5}}]}
REC = {"pre": [{"op": "image.resize_pad", "params": {"height": 48, "width": 320}},
               {"op": "image.normalize", "params": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "scale": True}}],
       "post": [{"op": "text.ctc_greedy", "params": {"vocabulary": "metadata:character"}}]}
CROP = (48, 320)

GRAPH = """
[services.scheduler.settings.graphs.ocr]
inputs = ["image"]
outputs = { text = "rec.ctc_greedy.text", boxes = "crop.boxes", counts = "det.db_boxes.counts" }
[[services.scheduler.settings.graphs.ocr.stages]]
name = "det"
model = "text-det"
inputs = { x = "image" }
[[services.scheduler.settings.graphs.ocr.stages]]
name = "crop"
op = "crop"
for_each = "det.db_boxes.boxes"
inputs = { image = "image", boxes = "det.db_boxes.boxes", map = "det.sigmoid_0.tmp_0" }
params = { height = 48, width = 320 }
[[services.scheduler.settings.graphs.ocr.stages]]
name = "rec"
model = "text-rec"
inputs = { x = "crop.crops" }
"""


def _config(pub: str) -> str:
    return inference_config(pub, "max_delay_ms = 0\nhealth_report_s = 3600", extra=GRAPH)


def rendered() -> np.ndarray:
    """Two lines of text in black on white, 640 x 160 (the detector's size), uint8 HWC RGB."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (640, 160), "white")
    draw = ImageDraw.Draw(img)
    for y, line in ((12, "EDGEBUS 2026"), (90, "HELLO WORLD")):
        draw.text((30, y), line, fill="black", font=ImageFont.load_default(size=44))
    return np.asarray(img)


class Direct:
    """The chain's stages in this process: sessions of one thread, the same ops."""

    def __init__(self, det: tuple[Path, Any], rec: tuple[Path, Any]) -> None:
        import onnxruntime as ort

        from drivers.ops import build_chains, text

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.text = text
        self.det = ort.InferenceSession(str(det[0]), opts, providers=["CPUExecutionProvider"])
        self.rec = ort.InferenceSession(str(rec[0]), opts, providers=["CPUExecutionProvider"])
        self.det_chains, self.rec_chains = build_chains(det[1]), build_chains(rec[1])
        self.det_names = [o.name for o in self.det.get_outputs()]
        self.rec_names = [o.name for o in self.rec.get_outputs()]

    def __call__(self, image: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        t0 = time.perf_counter()
        det = self.det_chains.post(dict(zip(self.det_names, self.det.run(None, self.det_chains.pre({"x": image[None]})))))
        t1 = time.perf_counter()
        count = int(det["db_boxes.counts"][0])
        boxes, prob = det["db_boxes.boxes"][0][:count], det["sigmoid_0.tmp_0"]
        if prob.shape[-2:] != image.shape[:2]:
            boxes = self.text.scale_boxes(boxes, prob.shape[-2:], image.shape[:2])
        crops, _ = self.text.crop_rotated(image, boxes, *CROP)
        t2 = time.perf_counter()
        rec = self.rec_chains.post(dict(zip(self.rec_names, self.rec.run(None, self.rec_chains.pre({"x": crops})))))
        t3 = time.perf_counter()
        return ({"text": rec["ctc_greedy.text"], "boxes": boxes},
                {"det": (t1 - t0) * 1e3, "crop": (t2 - t1) * 1e3, "rec": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3})


def _pack(model: Path, name: str, spec: dict[str, Any], key: Any, tmp: Path) -> tuple[bytes, Any]:
    """The signed bundle and its manifest (the direct chain builds its ops from it)."""
    from services.modelstore import Bundle

    data = pack_signed(model, name, spec, key, tmp)
    return data, Bundle.from_bytes(data).manifest


async def _through_bus(tmp: Path, bundles: dict[str, bytes], image: np.ndarray, direct: Direct, rounds: int,
                       requests: int) -> dict[str, Any]:
    descs, frames = pack_tensors({"image": image[None]})
    times: dict[str, dict[str, list[float]]] = {way: {s: [] for s in ("det", "crop", "rec", "total")}
                                                for way in ("direct", "bus")}
    same = True
    await install(tmp, bundles)
    async with client(tmp) as bus:
        async def one() -> tuple[InferResult, dict[str, np.ndarray], float]:
            t0 = time.perf_counter()
            incoming = await bus.request("scheduler", Infer(model="ocr", tensors=descs), frames=frames, timeout=60)
            ms = (time.perf_counter() - t0) * 1e3
            result = incoming.decode(InferResult)
            return result, {t.name: np.asarray(incoming.tensor(t)) for t in result.outputs}, ms

        for _ in range(10):  # warm: sessions, kernels, caches
            result, got, _ = await one()
            want, _ = direct(image)
        from drivers.ops import texts

        same = texts(got["text"][0]) == texts(want["text"]) and np.array_equal(got["boxes"][0], want["boxes"])
        print(f"text {texts(got['text'][0])}, same as direct: {same}", flush=True)
        for r in range(rounds):
            for way in (("direct", "bus") if r % 2 == 0 else ("bus", "direct")):
                for _ in range(requests):
                    if way == "direct":
                        _, stage_ms = direct(image)
                        for s, ms in stage_ms.items():
                            times["direct"][s].append(ms)
                    else:
                        result, _, ms = await one()
                        times["bus"]["total"].append(ms)
                        for t in result.stages:
                            times["bus"][t.stage].append(t.ms)
            print(f"round {r + 1}/{rounds}: direct {statistics.median(times['direct']['total']):.2f} ms, "
                  f"bus {statistics.median(times['bus']['total']):.2f} ms", flush=True)
    return {"times": times, "same": same}


def main(argv: list[str] | None = None) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from tools.fetch_models import ModelUnavailable, model_path

    parser = argparse.ArgumentParser(prog="bench_graphs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (a block of each way)")
    parser.add_argument("--requests", type=int, default=30, help="requests per block")
    parser.add_argument("--out", default="bench-results/graphs.json")
    args = parser.parse_args(argv)
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    tmp = Path(tempfile.mkdtemp(prefix="edgebus-bench-graphs-"))
    try:
        det_path, rec_path = model_path("ppocr-det"), model_path("ppocr-rec")
    except ModelUnavailable as exc:
        raise SystemExit(f"bench_graphs: {exc}") from None
    det_bundle, det_manifest = _pack(det_path, "text-det", DET, key, tmp)
    rec_bundle, rec_manifest = _pack(rec_path, "text-rec", REC, key, tmp)
    direct = Direct((det_path, det_manifest), (rec_path, rec_manifest))
    image = rendered()
    proc, sys_tmp = boot(_config(pub))
    try:
        found = anyio.run(_through_bus, sys_tmp, {"text-det": det_bundle, "text-rec": rec_bundle}, image, direct,
                          args.rounds, args.requests)
    finally:
        stop(proc)
    times = found["times"]
    med = {way: {s: statistics.median(v) for s, v in stages.items()} for way, stages in times.items()}
    ratio = med["bus"]["total"] / med["direct"]["total"]
    print(f"\n{'stage':6} {'direct p50':>11} {'bus p50':>9}   (bus: the stage's time in the scheduler, StageTime)")
    for s in ("det", "crop", "rec"):
        print(f"{s:6} {med['direct'][s]:9.2f}ms {med['bus'][s]:7.2f}ms")
    print(f"{'chain':6} {med['direct']['total']:9.2f}ms {med['bus']['total']:7.2f}ms   "
          f"bus / direct = {ratio:.3f} (target <= 1.15), added {med['bus']['total'] - med['direct']['total']:.2f} ms, "
          f"same answer: {found['same']}")
    write_results(args.out, {"direct_p50_ms": med["direct"], "bus_p50_ms": med["bus"], "ratio": ratio,
                             "target": 1.15, "same_answer": found["same"], "rounds": args.rounds,
                             "requests_per_block": args.requests})


if __name__ == "__main__":
    main()
