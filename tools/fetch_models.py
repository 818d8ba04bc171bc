"""Real ONNX models, as they ship inside wheels on the package index, for tests and benchmarks.

    python -m tools.fetch_models [--cache DIR] [--quiet] [NAME ...]

Each model is pinned (``MODELS``): the wheel it ships in, by project, version and the
wheel's sha256, the file inside it and that file's sha256 and size.  A wheel is downloaded
with ``python -m pip download --no-deps --only-binary=:all: PROJECT==VERSION`` (so the
user's index, proxy and certificate configuration apply), checked against its pinned
sha256, and only the listed files are extracted into the cache, each written to a
temporary file and renamed into place once its own sha256 is checked.  A model already in
the cache with its pinned sha256 is not downloaded again.  The cache is
``$EDGEBUS_MODEL_CACHE``, else ``~/.cache/edgebus/models``, one directory per wheel.

Where the index cannot be reached the command prints one warning line per model it could
not fetch and exits 0 (``make test`` goes on; the tests that need the model skip, saying
why).  A downloaded wheel or file whose sha256 is not the pinned one is an error (exit 1).

Tests use ``model_path(name)`` through the ``real_model`` fixture; benchmarks call it
directly: it fetches when needed and raises ModelUnavailable saying why it could not.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import msgspec

__all__ = ["Wheel", "RealModel", "MODELS", "ModelUnavailable", "PinMismatch", "cache_dir", "cached_path",
           "model_path", "fetch", "main"]

#: the environment variable naming the cache directory
ENV_CACHE = "EDGEBUS_MODEL_CACHE"
#: how long one ``pip download`` may take, seconds
PIP_TIMEOUT = 900


class Wheel(msgspec.Struct, frozen=True, kw_only=True):
    """A wheel on the package index, pinned by its sha256."""

    project: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def directory(self) -> str:
        return f"{self.project}-{self.version}"


class RealModel(msgspec.Struct, frozen=True, kw_only=True):
    """One ONNX file inside a wheel, pinned by its sha256 and size."""

    wheel: Wheel
    #: the file's path inside the wheel
    member: str
    sha256: str
    size: int
    description: str

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


RAPIDOCR = Wheel(project="rapidocr-onnxruntime", version="1.4.4",
                 sha256="971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf")
SILERO_VAD = Wheel(project="silero-vad", version="6.2.3",
                   sha256="7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8")

#: Every real model the tests and benchmarks use, by name.
MODELS: dict[str, RealModel] = {
    "ppocr-det": RealModel(
        wheel=RAPIDOCR, member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", size=4745517,
        description="PP-OCRv4 text detector: x [N,3,H,W] float32 -> probability map [N,1,H,W]"),
    "ppocr-cls": RealModel(
        wheel=RAPIDOCR, member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", size=585532,
        description="PP-OCR text direction classifier: x [-1,3,?,?] (a literal -1 batch) -> [-1,2]"),
    "ppocr-rec": RealModel(
        wheel=RAPIDOCR, member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        sha256="48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", size=10857958,
        description="PP-OCRv4 text recogniser: x [N,3,48,W] -> softmax [N,T,6625]; its dictionary in "
                    "metadata_props 'character'"),
    "silero-vad": RealModel(
        wheel=SILERO_VAD, member="silero_vad/data/silero_vad.onnx",
        sha256="1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", size=2327524,
        description="Silero voice activity detector: input [N,512] at 16 kHz, state [2,N,128], sr int64 scalar"),
}


class ModelUnavailable(Exception):
    """A model that is not in the cache and could not be fetched (no index reachable, the
    package or version not found): the message says which, why, and what to do."""


class PinMismatch(Exception):
    """A downloaded wheel or an extracted file whose sha256 is not the pinned one."""


def cache_dir(cache: str | Path | None = None) -> Path:
    """``cache``, else ``$EDGEBUS_MODEL_CACHE``, else ``~/.cache/edgebus/models``."""
    if cache:
        return Path(cache)
    env = os.environ.get(ENV_CACHE)
    return Path(env) if env else Path.home() / ".cache" / "edgebus" / "models"


def _model(name: str) -> RealModel:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"no real model named {name!r}; the models: {', '.join(MODELS)}") from None


def cached_path(name: str, cache: str | Path | None = None) -> Path:
    """Where model ``name`` is (or would be) in the cache."""
    model = _model(name)
    return cache_dir(cache) / model.wheel.directory / model.file_name


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


#: files checked in this process: path -> (size, mtime_ns) when their sha256 was right
_verified: dict[Path, tuple[int, int]] = {}
#: wheels that could not be fetched in this process, with why (not tried again)
_failed: dict[Wheel, str] = {}


def _is_cached(model: RealModel, path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    if _verified.get(path) == (st.st_size, st.st_mtime_ns):
        return True
    if st.st_size != model.size or _sha256_file(path) != model.sha256:
        return False
    _verified[path] = (st.st_size, st.st_mtime_ns)
    return True


def _download(wheel: Wheel, into: Path) -> Path:
    """The wheel, downloaded by pip into ``into`` and checked against its pinned sha256."""
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", wheel.requirement,
            "-d", str(into)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ModelUnavailable(f"pip download {wheel.requirement} took over {PIP_TIMEOUT} s") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines
        raise ModelUnavailable(f"pip download {wheel.requirement} failed: {errors[-1] if errors else proc.returncode}")
    found = sorted(into.glob("*.whl"))
    if len(found) != 1:
        raise ModelUnavailable(f"pip download {wheel.requirement} gave {len(found)} wheel files, not one")
    digest = _sha256_file(found[0])
    if digest != wheel.sha256:
        raise PinMismatch(f"{found[0].name} from the package index has sha256 {digest}, not the pinned "
                          f"{wheel.sha256}: the index (or a proxy) serves other bytes for {wheel.requirement}; "
                          "nothing was extracted")
    return found[0]


def _extract(wheel_file: Path, models: list[RealModel], cache: Path) -> None:
    """Each model's file from the wheel into the cache: a temporary file in the same
    directory, its sha256 checked, then renamed into place."""
    with zipfile.ZipFile(wheel_file) as z:
        for model in models:
            target = cache / model.wheel.directory / model.file_name
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{model.file_name}.", suffix=".tmp")
            tmp = Path(tmp_name)
            try:
                digest = hashlib.sha256()
                with os.fdopen(fd, "wb") as out, z.open(model.member) as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                if digest.hexdigest() != model.sha256:
                    raise PinMismatch(f"{model.member} in {wheel_file.name} has sha256 {digest.hexdigest()}, not the "
                                      f"pinned {model.sha256}")
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep others on the machine from a public model
                os.replace(tmp, target)
            except KeyError:
                raise PinMismatch(f"{wheel_file.name} has no {model.member}") from None
            finally:
                tmp.unlink(missing_ok=True)


def _fetch_wheel(wheel: Wheel, cache: Path) -> None:
    """Download ``wheel`` and extract every pinned model it ships (once per process: a
    wheel that could not be fetched is not tried again)."""
    if wheel in _failed:
        raise ModelUnavailable(_failed[wheel])
    models = [m for m in MODELS.values() if m.wheel == wheel]
    with tempfile.TemporaryDirectory(prefix="edgebus-wheel-") as tmp:
        try:
            wheel_file = _download(wheel, Path(tmp))
        except ModelUnavailable as exc:
            _failed[wheel] = str(exc)
            raise
        _extract(wheel_file, models, cache)


def _unavailable(name: str, why: str) -> ModelUnavailable:
    model = MODELS[name]
    return ModelUnavailable(f"real model {name} ({model.wheel.requirement}, {model.file_name}) is not in the cache "
                            f"and could not be fetched: {why}; run `python -m tools.fetch_models` where the package "
                            f"index is reachable, or set {ENV_CACHE} to a cache that holds it")


def model_path(name: str, cache: str | Path | None = None) -> Path:
    """The path of real model ``name`` in the cache, fetching its wheel if needed.

    Raises ModelUnavailable (saying why and what to do) when it cannot be fetched,
    PinMismatch when what was fetched is not what is pinned, ValueError for an unknown name."""
    model = _model(name)
    root = cache_dir(cache)
    path = root / model.wheel.directory / model.file_name
    if _is_cached(model, path):
        return path
    try:
        _fetch_wheel(model.wheel, root)
    except ModelUnavailable as exc:
        raise _unavailable(name, str(exc)) from None
    except OSError as exc:
        raise _unavailable(name, f"cannot write the cache {root}: {exc}") from None
    if not _is_cached(model, path):
        raise PinMismatch(f"{path} does not hold the pinned {model.member} after extracting it")
    return path


def fetch(names: list[str] | None = None, cache: str | Path | None = None) -> dict[str, tuple[Path | None, str]]:
    """Each model of ``names`` (default: all) into the cache: name -> (path, "cached" or
    "fetched"), or (None, why) when it could not be fetched.  Raises PinMismatch."""
    out: dict[str, tuple[Path | None, str]] = {}
    names = names or list(MODELS)
    cached = {name for name in names if _is_cached(_model(name), cached_path(name, cache))}
    for name in names:
        if name in cached:
            out[name] = (cached_path(name, cache), "cached")
            continue
        try:
            out[name] = (model_path(name, cache), "fetched")
        except ModelUnavailable as exc:
            out[name] = (None, str(exc))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.fetch_models",
                                     description="Fetch the pinned real ONNX models (from wheels on the package "
                                                 "index) into the cache.")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"the models (default: all): {', '.join(MODELS)}")
    parser.add_argument("--cache", metavar="DIR", help=f"the cache (default: ${ENV_CACHE}, else ~/.cache/edgebus/models)")
    parser.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; the models: {', '.join(MODELS)}")
    try:
        results = fetch(args.names or None, args.cache)
    except PinMismatch as exc:
        print(f"fetch_models: error: {exc}", file=sys.stderr)
        return 1
    for name, (path, how) in results.items():
        if path is None:
            print(f"fetch_models: warning: {how}; the tests that need it will skip", file=sys.stderr)
        elif not args.quiet:
            print(f"{name}: {path} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
