"""Build the OCR demo of the default system: real PP-OCRv4 models reading rendered shop labels.

    python -m tools.build_ocr_demo [--out services/modelstore/demo] [--images drivers/sensors/demo/text]

* ``text-det-1.0.0.ebm`` and ``text-rec-1.0.0.ebm`` in ``--out``: PP-OCRv4's text detector and
  recogniser as they ship in the rapidocr-onnxruntime wheel (``tools.fetch_models``: pinned,
  cached), packed as ``edgebus model pack`` packs them (pre and post ops below, the ONNX files
  untouched) and signed with the DEMO key of that directory (public by design: never trust it
  on a real device).  The model store preloads them (``preload_demo``); they are not in git
  (15 MB): ``make run`` builds them.
* the demo camera's images in ``--images``: shop-shelf labels of a few words in Pillow's
  default font at several sizes, 640 x 160 (the detector's own input size), gray PNGs (20 kB
  in all).  They are in git; one missing is rendered again (one there is never rewritten).

Having built a bundle, it compiles the kernels of the OCR graph's crop op into numba's cache
(a first boot then loads them in half a second).  Idempotent: a bundle whose models, ops and
signature are those it would build is kept, and nothing is printed when all is up to date.  Without the package index (no cached models): one
warning, exit 0, and the default system runs without OCR (its OCR pipeline says so once).  A
fetched model that is not the pinned one is an error (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
DEMO_KEY = "DEMO-KEY-DO-NOT-TRUST"
VERSION = "1.0.0"

#: the detector: the image resized to its 160 x 640, ImageNet-normalised; DB boxes unclipped by
#: 2.0 (PaddleOCR's 1.5 gives crops so tight that the recogniser drops the spaces between the
#: words of these labels: FRESHMILK, 2FOR3.00; 1.8 to 2.2 read them all)
DET_SPEC: dict[str, Any] = {
    "description": "PP-OCRv4 text detector (rapidocr-onnxruntime 1.4.4): an image in, text boxes out",
    "pre": [{"op": "image.resize", "params": {"height": 160, "width": 640}},
            {"op": "image.normalize", "params": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                                 "scale": True}}],
    "post": [{"op": "text.db_boxes", "params": {"thresh": 0.3, "box_thresh": 0.6, "unclip_ratio": 2.0}}],
}
#: the recogniser: a crop resized to height 48 and padded to 320; CTC with the dictionary it ships
REC_SPEC: dict[str, Any] = {
    "description": "PP-OCRv4 text recogniser (rapidocr-onnxruntime 1.4.4): a line's crop in, its text out",
    "pre": [{"op": "image.resize_pad", "params": {"height": 48, "width": 320}},
            {"op": "image.normalize", "params": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "scale": True}}],
    "post": [{"op": "text.ctc_greedy", "params": {"vocabulary": "metadata:character"}}],
}
#: bundle name -> (real model of tools.fetch_models, spec)
BUNDLES: dict[str, tuple[str, dict[str, Any]]] = {"text-det": ("ppocr-det", DET_SPEC),
                                                   "text-rec": ("ppocr-rec", REC_SPEC)}

SIZE = (640, 160)
#: file -> lines (x, y, text, font size); what the demo's OCR reads, in name order
LABELS: dict[str, list[tuple[int, int, str, int]]] = {
    "01-milk.png": [(40, 20, "FRESH MILK", 56), (40, 96, "1 LITRE 1.29", 40)],
    "02-coffee.png": [(30, 20, "Coffee Beans", 52), (30, 96, "PACK 500G 7.49", 40)],
    "03-apples.png": [(60, 40, "APPLES", 72)],
    "04-bread.png": [(30, 30, "Whole Wheat Bread", 44), (30, 100, "SALE 2.19", 36)],
    "05-juice.png": [(20, 20, "ORANGE JUICE", 60), (20, 100, "2 FOR 3.00", 40)],
}


def render(lines: list[tuple[int, int, str, int]], size: tuple[int, int] = SIZE) -> Any:
    """A label: ``lines`` in black on white, Pillow's default font (a PIL image, RGB)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    for x, y, text, font in lines:
        draw.text((x, y), text, fill="black", font=ImageFont.load_default(size=font))
    return img


def _replace(path: Path, write: Any) -> None:
    """``write(file)`` into a temporary file beside ``path``, renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def render_images(folder: Path) -> list[Path]:
    """Each label of LABELS missing from ``folder``, rendered; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, lines in LABELS.items():
        path = folder / name
        if not path.exists():
            _replace(path, lambda f, lines=lines: render(lines).convert("L").save(f, format="PNG", optimize=True))
            written.append(path)
    return written


def _wanted(name: str) -> tuple[str, Any, Any]:
    """The pinned sha256 of ``name``'s model and its pre and post ops, as a manifest has them."""
    from protocols.modelstore import OpSpec
    from tools.fetch_models import MODELS

    real, spec = BUNDLES[name]
    ops = msgspec.convert({"pre": spec["pre"], "post": spec["post"]}, dict[str, list[OpSpec]])
    return MODELS[real].sha256, ops["pre"], ops["post"]


def up_to_date(path: Path, name: str, public_key: bytes) -> bool:
    """Whether the bundle at ``path`` is the one this tool builds: that model (its pinned
    sha256), those ops, signed with the DEMO key."""
    from services.modelstore import Bundle, BundleError

    try:
        bundle = Bundle.load(path)
        signed = bundle.check_signature_with(public_key)
    except (BundleError, OSError):
        return False
    m = bundle.manifest
    sha256, pre, post = _wanted(name)
    full = m.variants.get("full")
    return (signed and m.name == name and m.version == VERSION and full is not None and full.sha256 == sha256
            and m.pre == pre and m.post == post)


def pack(name: str, model: Path, key: Path, out: Path) -> None:
    """``edgebus model pack`` (in this process) into a temporary file, renamed to ``out``."""
    from tools.edgebus import build_parser

    _, spec = BUNDLES[name]
    with tempfile.TemporaryDirectory(prefix="edgebus-ocr-demo-") as tmp:
        spec_path, bundle = Path(tmp) / "spec.json", Path(tmp) / out.name
        spec_path.write_text(json.dumps(spec))
        args = build_parser().parse_args(["model", "pack", str(model), "--name", name, "--version", VERSION,
                                          "--out", str(bundle), "--spec", str(spec_path), "--key", str(key)])
        said = io.StringIO()
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            code = args.func(args)
        if code != 0:
            raise RuntimeError(f"packing {name} from {model} failed: {said.getvalue().strip()}")
        _replace(out, lambda f: f.write(bundle.read_bytes()))


def warm_crop() -> float:
    """Compile the kernels of the scheduler's crop op (numba, into its cache) as the OCR graph
    runs them, so that a first boot loads them in half a second instead of compiling them
    for tens of seconds (``make``'s warm-up, ``drivers.accel --warm``, runs the manifests'
    ops, not the graphs'); the seconds it took."""
    import time

    import numpy as np

    from drivers.ops import text

    started = time.perf_counter()
    boxes = text.scale_boxes(np.array([[[1, 1], [20, 1], [20, 8], [1, 8]]], np.float32), (16, 32), (32, 64))
    text.crop_rotated(np.zeros((32, 64, 3), np.uint8), boxes, 48, 320, 0)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    from tools.fetch_models import ModelUnavailable, PinMismatch, model_path

    parser = argparse.ArgumentParser(prog="python -m tools.build_ocr_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "services/modelstore/demo",
                        help="where the bundles go and the DEMO key is (default: %(default)s)")
    parser.add_argument("--images", type=Path, default=ROOT / "drivers/sensors/demo/text",
                        help="the demo camera's folder (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in render_images(args.images):
        print(f"rendered {path}")
    key = args.out / f"{DEMO_KEY}.key"
    try:
        public_key = bytes.fromhex((args.out / f"{DEMO_KEY}.pub").read_text().split()[0])
    except (OSError, ValueError, IndexError) as exc:
        print(f"build_ocr_demo: error: cannot read the DEMO public key in {args.out}: {exc}", file=sys.stderr)
        return 1
    built = False
    for name, (real, _) in BUNDLES.items():
        out = args.out / f"{name}-{VERSION}.ebm"
        if up_to_date(out, name, public_key):
            continue
        try:
            model = model_path(real)
        except ModelUnavailable as exc:
            print(f"build_ocr_demo: warning: {exc}; the demo runs without OCR", file=sys.stderr)
            return 0
        except PinMismatch as exc:
            print(f"build_ocr_demo: error: {exc}", file=sys.stderr)
            return 1
        pack(name, model, key, out)
        print(f"built {out} ({out.stat().st_size / 2**20:.1f} MB, signed with the DEMO key)")
        built = True
    if built:
        print(f"the OCR graph's crop kernels are in numba's cache ({warm_crop():.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
