"""``edgebus keygen`` and ``edgebus model pack|sign|verify|inspect|quantize``: offline."""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect

from protocols.modelstore import ASSET_NAME, Asset, Manifest, TensorSpec, Variant, check_tensors
from services.modelstore import Bundle, BundleError, Graph, check_graph, read_graph

__all__ = ["add_commands", "graph_io", "read_private_key", "unknown_keys", "PackError", "apply_overrides"]

#: the keys a spec's "inputs" / "outputs" entry may override, by tensor name
_OVERRIDABLE = ("dtype", "shape", "batch_axis")


def _fail(message: str, code: int = 1) -> int:
    print(f"edgebus: {message}", file=sys.stderr)
    return code


class KeyFileError(ValueError):
    pass


def read_private_key(path: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        raw = bytes.fromhex(Path(path).read_text().split()[0])
        return Ed25519PrivateKey.from_private_bytes(raw)
    except (ValueError, IndexError):
        raise KeyFileError(f"{path} is not an ed25519 private key (64 hex characters, from `edgebus keygen`)") from None


def unknown_keys(value: Any, type_: Any = Manifest, path: str = "") -> list[str]:
    """Keys of ``value`` (JSON data) that ``type_`` has no field for, as dotted paths.

    The manifest tolerates unknown fields (a newer device's bundle still installs on an
    older one), so a misspelt key would be dropped silently: an author's spec is checked
    here instead, where the author can fix it."""
    info = type_ if isinstance(type_, msgspec.inspect.Type) else msgspec.inspect.type_info(type_)
    found: list[str] = []
    match info:
        case msgspec.inspect.StructType() if isinstance(value, dict):
            fields = {f.encode_name: f.type for f in info.fields}
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if key not in fields:
                    found.append(where)
                else:
                    found += unknown_keys(item, fields[key], where)
        case msgspec.inspect.ListType() if isinstance(value, list):
            for i, item in enumerate(value):
                found += unknown_keys(item, info.item_type, f"{path}[{i}]")
        case msgspec.inspect.DictType() if isinstance(value, dict):
            for key, item in value.items():
                found += unknown_keys(item, info.value_type, f"{path}.{key}")
        case msgspec.inspect.UnionType():
            for member in info.types:
                if isinstance(member, msgspec.inspect.StructType):
                    found += unknown_keys(value, member, path)
    return found


def graph_io(model_bytes: bytes) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs with dtype, shape and batch axis, read from the ONNX graph (the
    contract ``edgebus model pack`` starts from: ``services.modelstore.read_graph``)."""
    graph = read_graph(model_bytes)
    return graph.inputs, graph.outputs


class PackError(ValueError):
    """A spec, asset or model that ``edgebus model pack`` refuses; the message says what to fix."""


def apply_overrides(specs: list[TensorSpec], overrides: Any, kind: str) -> list[TensorSpec]:
    """The graph's ``specs`` with the spec file's overrides applied: ``overrides`` maps a
    tensor's name to any of dtype, shape and batch_axis.  A shape given without a batch_axis
    takes the default one of that shape (``TensorSpec.batch()``: axis 0 where it is not
    fixed, else none); a batch_axis equal to the default is left out of the manifest.
    Raises PackError naming unknown tensors, unknown keys and invalid values."""
    if overrides is None:
        return specs
    if not isinstance(overrides, dict):
        raise PackError(f'"{kind}" in a spec maps {kind[:-1]} names to what to override, e.g. '
                        f'{{"{kind}": {{"{specs[0].name if specs else "x"}": {{"shape": [null, 3, 48, null], '
                        f'"batch_axis": 0}}}}}}')
    names = [s.name for s in specs]
    unknown = [n for n in overrides if n not in names]
    if unknown:
        raise PackError(f"the spec overrides {kind} {', '.join(map(repr, unknown))}, which the graph does not have; "
                        f"its {kind} are {', '.join(map(repr, names)) or 'none'}")
    out = []
    for spec in specs:
        change = overrides.get(spec.name)
        if change is None:
            out.append(spec)
            continue
        if not isinstance(change, dict):
            raise PackError(f"{kind}.{spec.name}: give an object with any of {', '.join(_OVERRIDABLE)}")
        bad = [k for k in change if k not in _OVERRIDABLE]
        if bad:
            raise PackError(f"{kind}.{spec.name}: unknown key(s) {', '.join(map(repr, bad))}; a spec may override "
                            f"{', '.join(_OVERRIDABLE)}")
        merged = {**msgspec.to_builtins(spec), **change}
        if "shape" in change and "batch_axis" not in change:
            merged.pop("batch_axis", None)
        try:
            new = msgspec.convert(merged, TensorSpec)
        except msgspec.ValidationError as exc:
            raise PackError(f"{kind}.{spec.name}: {exc}") from None
        if new.batch_axis is not msgspec.UNSET and new.batch_axis == msgspec.structs.replace(
                new, batch_axis=msgspec.UNSET).batch():
            new.batch_axis = msgspec.UNSET  # the default: written only where it differs from it
        out.append(new)
    return out


def _check_ops(manifest: Manifest, assets: dict[str, bytes]) -> None:
    """The manifest's pre and post chains can run around the model (``drivers.ops.check_chains``
    with the assets' bytes, when drivers.ops can be imported here): an unknown op, bad
    parameters, a chain whose end does not fit the model input it feeds, a post chain reading a
    tensor that does not exist, a vocabulary too short for the model... are refused here with
    the ChainError's message, not at the first inference."""
    try:
        from drivers.ops import ChainError, check_chains
    except ImportError:  # a tools-only install: the store's install and the driver's load check
        return
    try:
        check_chains(manifest, assets)
    except ChainError as exc:
        raise PackError(str(exc)) from None


def _contract(graph: Graph, spec: dict[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs = apply_overrides(graph.inputs, spec.get("inputs"), "inputs")
    outputs = apply_overrides(graph.outputs, spec.get("outputs"), "outputs")
    for kind, specs, given in (("inputs", inputs, spec.get("inputs") or {}), ("outputs", outputs, spec.get("outputs") or {})):
        for s in specs:
            overridden = given.get(s.name, {})
            if s.name in graph.not_tensors:
                raise PackError(f"{kind[:-1]} {s.name!r} of the graph is not a tensor (a sequence or a map), which "
                                "edgebus cannot carry")
            if s.name in graph.unranked and "shape" not in overridden:
                raise PackError(f"the graph gives no shape for {kind[:-1]} {s.name!r} (its rank is unknown); give it "
                                f'in the spec: {{"{kind}": {{"{s.name}": {{"shape": [null, ...]}}}}}}')
    return inputs, outputs


def _assets(items: list[str] | None) -> tuple[dict[str, Asset], dict[str, bytes]]:
    assets: dict[str, Asset] = {}
    files: dict[str, bytes] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise PackError(f"--asset {item!r} is not NAME=FILE, e.g. --asset labels=labels.txt")
        if not ASSET_NAME.match(name):
            raise PackError(f"--asset {item!r}: an asset name is 1-63 of A-Z, a-z, 0-9, '_', '.' and '-', starting "
                            "with a letter or digit")
        if name in assets:
            raise PackError(f"--asset {name!r} is given twice")
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise PackError(f"--asset {name}: cannot read {path}: {exc.strerror}") from None
        file = f"assets/{name}" + ("" if Path(name).suffix else Path(path).suffix)
        assets[name] = Asset(file=file, sha256="", size=0, media_type=mimetypes.guess_type(path)[0] or "")
        files[file] = data
    return assets, files


def cmd_keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.generate()
    base = Path(args.out)
    private, public = base.with_suffix(".key"), base.with_suffix(".pub")
    if private.exists() and not args.force:
        return _fail(f"{private} exists; pass --force to replace it")
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.private_bytes_raw().hex() + "\n")
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    public.write_text(pub + "\n")
    print(f"private key {private} (mode 0600), public key {public}: {pub}")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    try:
        model = Path(args.model).read_bytes()
    except OSError as exc:
        return _fail(f"cannot read {args.model}: {exc.strerror}")
    try:
        graph = read_graph(model)
    except Exception as exc:  # onnx raises its own DecodeError & co
        return _fail(f"{args.model} is not an ONNX model: {exc}")
    try:
        spec: dict[str, Any] = json.loads(Path(args.spec).read_text()) if args.spec else {}
    except ValueError as exc:
        return _fail(f"{args.spec} is not JSON: {exc}")
    except OSError as exc:
        return _fail(f"cannot read {args.spec}: {exc.strerror}")
    if not isinstance(spec, dict):
        return _fail(f"{args.spec}: a spec is a JSON object (pre, post, fallback, reference, provenance, metadata, "
                     "and inputs/outputs overrides by name)")
    if "assets" in spec:
        return _fail(f"{args.spec}: assets are not given in the spec; add each with --asset NAME=FILE")
    misspelt = unknown_keys({k: v for k, v in spec.items() if k not in ("inputs", "outputs")})
    if misspelt:
        return _fail(f"{args.spec}: unknown manifest key(s) {', '.join(misspelt)}; fix or remove them "
                     "(the manifest's fields: protocols.modelstore.Manifest)")
    files = {"full.onnx": model}
    variants = {"full": Variant(file="full.onnx", sha256="", size=0)}
    try:
        inputs, outputs = _contract(graph, spec)
        assets, asset_files = _assets(args.asset)
        for extra in args.variant or []:
            name, _, path = extra.partition("=")
            try:
                files[f"{name}.onnx"] = Path(path).read_bytes()
            except OSError as exc:
                raise PackError(f"--variant {name}: cannot read {path}: {exc.strerror}") from None
            variants[name] = Variant(file=f"{name}.onnx", sha256="", size=0)
    except PackError as exc:
        return _fail(f"cannot pack: {exc}")
    metadata = {**graph.metadata, **(spec.get("metadata") or {})}
    try:
        manifest = msgspec.convert({
            **spec, "name": args.name, "version": args.version, "created": time.time(),
            "author": args.author or spec.get("author", ""), "description": args.description or spec.get("description", ""),
            "inputs": msgspec.to_builtins(inputs), "outputs": msgspec.to_builtins(outputs),
            "variants": msgspec.to_builtins(variants), "metadata": metadata, "assets": msgspec.to_builtins(assets),
        }, Manifest)
        _check_ops(manifest, {name: asset_files[a.file] for name, a in assets.items()})
        bundle = Bundle.create(manifest, {**files, **asset_files})
        for variant in bundle.manifest.variants.values():  # the contract fits every variant's graph
            check_graph(bundle.manifest, variant.file, files[variant.file])
    except (msgspec.ValidationError, BundleError, PackError) as exc:
        return _fail(f"cannot pack: {exc}")
    if args.key:
        try:
            bundle.sign(read_private_key(args.key))
        except KeyFileError as exc:
            return _fail(str(exc))
    bundle.save(args.out)
    print(f"packed {args.name} {args.version} into {args.out}" + (" (signed)" if args.key else " (unsigned)"))
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    try:
        bundle = Bundle.load(args.bundle)
        bundle.check_files()
        key = read_private_key(args.key)
    except (BundleError, KeyFileError) as exc:
        return _fail(str(exc))
    bundle.sign(key)
    bundle.save(args.out or args.bundle)
    print(f"signed {bundle.manifest.name} {bundle.manifest.version} with key {bundle.signature.key_id}")  # type: ignore[union-attr]
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        bundle = Bundle.load(args.bundle)
        bundle.check_files()
        if bundle.signature is None:
            return _fail(f"{args.bundle}: not signed")
        key = bytes.fromhex(Path(args.pubkey).read_text().split()[0] if args.pubkey and Path(args.pubkey).is_file()
                            else (args.pubkey or bundle.signature.public_key))
        if not bundle.check_signature_with(key):
            return _fail(f"{args.bundle}: INVALID signature for key {key.hex()[:16]}...")
    except (BundleError, ValueError) as exc:
        return _fail(str(exc))
    trusted = "" if args.pubkey else " (checked against the key it carries; pass --pubkey to check who signed it)"
    print(f"valid: {bundle.manifest.name} {bundle.manifest.version}, signed by {bundle.signature.key_id}{trusted}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        bundle = Bundle.load(args.bundle)
    except BundleError as exc:
        return _fail(str(exc))
    out = {"manifest": msgspec.to_builtins(bundle.manifest),
           "signature": msgspec.to_builtins(bundle.signature) if bundle.signature else None,
           "files": {n: len(b) for n, b in bundle.files.items()}}
    print(json.dumps(out, indent=2))
    return 0


class QuantizeError(ValueError):
    """What ``edgebus model quantize`` refuses (a bad --shape or --value, a graph ONNX Runtime
    cannot quantize or run); the message says what was wrong and what to do."""


#: the size a dynamic dimension is measured at when --shape does not give it (see _guess)
_IMAGE_SIDE, _OTHER_DIM = 224, 256


def _parse_assignments(items: list[str] | None, option: str, example: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise QuantizeError(f"{option} {item!r} is not NAME=VALUE, e.g. {option} {example}")
        if name in out:
            raise QuantizeError(f"{option} {name} is given twice")
        out[name] = value
    return out


def _image_axes(spec: TensorSpec) -> tuple[int, ...]:
    """The height and width axes of an image-like input: rank 4 with 1, 3 or 4 channels on
    axis 1 (NCHW) or, failing that, axis 3 (NHWC); () for any other tensor."""
    shape = spec.shape
    if len(shape) != 4:
        return ()
    if shape[1] in (1, 3, 4):
        return (2, 3)
    if shape[3] in (1, 3, 4):
        return (1, 2)
    return ()


def _guess(spec: TensorSpec, axis: int, batch: int) -> tuple[int, str]:
    """The size a dynamic dimension is measured at without --shape, and why."""
    if axis == spec.batch():
        return batch, "the batch"
    if axis in _image_axes(spec):
        return _IMAGE_SIDE, "an image side"
    if spec.batch() is None:
        return 1, "no batch axis: taken as a state's batch"
    return _OTHER_DIM, "a dynamic length"


def _feeds(inputs: list[TensorSpec], shape_args: list[str] | None, value_args: list[str] | None
           ) -> tuple[dict[str, Any], list[str]]:
    """The inputs quantize measures on: each input's shape from --shape NAME=AxBxC, else from
    the contract (fixed sizes as they are, the batch axis at the batch size of the shapes
    given or 1, a symbolic size as given for another input, other dynamic sizes guessed:
    ``_guess``); values from --value NAME=V (every element V), else random floats in [0, 1)
    and zeros for integers.  Returns the feeds and a warning per guessed dimension.
    Raises QuantizeError naming an unknown input, a shape that does not fit the contract,
    or an integer scalar without --value."""
    import numpy as np

    shapes_given = _parse_assignments(shape_args, "--shape", "x=1x3x640x640")
    values_given = _parse_assignments(value_args, "--value", "sr=16000")
    names = [s.name for s in inputs]
    for option, given in (("--shape", shapes_given), ("--value", values_given)):
        unknown = [n for n in given if n not in names]
        if unknown:
            raise QuantizeError(f"{option} names input(s) {', '.join(map(repr, unknown))}, which the model does not "
                                f"have; its inputs: {'; '.join(f'{s.name!r} {s.describe()}' for s in inputs)}")
    shapes: dict[str, list[int]] = {}
    for name, text in shapes_given.items():
        try:
            shape = [int(d) for d in text.lower().split("x")] if text != "scalar" else []
        except ValueError:
            raise QuantizeError(f"--shape {name}={text}: give the sizes as AxBxC, e.g. --shape {name}=1x3x640x640 "
                                "(or 'scalar')") from None
        if any(d < 0 for d in shape):
            raise QuantizeError(f"--shape {name}={text}: a size is >= 0")
        shapes[name] = shape
    by_name = {s.name: s for s in inputs}
    symbols: dict[str, int] = {}
    batch = None
    for name, shape in shapes.items():
        spec = by_name[name]
        if len(shape) == len(spec.shape):
            symbols.update({d: n for d, n in zip(spec.shape, shape) if isinstance(d, str)})
            axis = spec.batch()
            if batch is None and axis is not None:
                batch = shape[axis]
    warnings: list[str] = []
    for spec in inputs:
        if spec.name in shapes:
            continue
        shape, guessed = [], []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int):
                shape.append(d)
            elif isinstance(d, str) and d in symbols:
                shape.append(symbols[d])
            else:
                size, why = _guess(spec, axis, batch or 1)
                if isinstance(d, str):
                    symbols[d] = size
                shape.append(size)
                if why != "the batch":
                    guessed.append(f"axis {axis} = {size} ({why})")
        shapes[spec.name] = shape
        if guessed:
            warnings.append(f"input {spec.name!r} {spec.describe()}: measured at {_show(shape)}, guessing "
                            f"{', '.join(guessed)}; give the size you serve with --shape {spec.name}=...")
    problem = check_tensors(inputs, {s.name: (s.dtype, shapes[s.name]) for s in inputs})
    if problem:
        raise QuantizeError(f"cannot measure on these shapes: {problem}; fix --shape")
    rng = np.random.default_rng(0)
    feeds: dict[str, Any] = {}
    for spec in inputs:
        dtype, shape = np.dtype(spec.dtype), shapes[spec.name]
        if spec.name in values_given:
            text = values_given[spec.name]
            try:
                value = int(text) if dtype.kind in "iub" else float(text)
            except ValueError:
                raise QuantizeError(f"--value {spec.name}={text}: input {spec.name!r} is {spec.dtype}; give a "
                                    f"{'whole ' if dtype.kind in 'iub' else ''}number") from None
            feeds[spec.name] = np.full(shape, value, dtype=dtype)
        elif dtype.kind == "f":
            feeds[spec.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        elif dtype.kind in "iu" and not shape:
            raise QuantizeError(f"input {spec.name!r} is an {spec.dtype} scalar, a parameter quantize cannot guess "
                                f"(a sample rate, a count...): give its value, e.g. --value {spec.name}=16000")
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
            if dtype.kind != "b":
                warnings.append(f"input {spec.name!r} ({spec.dtype}) filled with 0; give --value {spec.name}=V to "
                                "measure on another value")
    return feeds, warnings


def _show(shape: list[int] | tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _quantize_int8(full: bytes) -> bytes:
    """ONNX Runtime's dynamic int8 quantisation of ``full``; QuantizeError with its reason
    where it cannot."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "full.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(full)
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # its advice ("consider pre-processing...") is not the user's concern
        try:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        except Exception as exc:  # noqa: BLE001 - ORT and onnx raise ValueError, RuntimeError, their own errors
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise QuantizeError(f"ONNX Runtime cannot quantize this graph ({reason}); nothing written") from None
        finally:
            logging.disable(previous)
        return dst.read_bytes()


def _session(model: bytes, which: str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4  # failures are reported below, once, not logged by ORT as well
    try:
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise QuantizeError(f"ONNX Runtime cannot load the {which} graph: {str(exc).strip()[:300]}") from None


def _run(sess: Any, feeds: dict[str, Any], which: str) -> list[Any]:
    try:
        return sess.run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        raise QuantizeError(f"the {which} graph does not run on these inputs: {str(exc).strip()[:300]}; give the "
                            "shapes you serve with --shape NAME=AxBxC (and --value for parameters)") from None


def _latency_ms(full: bytes, int8: bytes, feeds: dict[str, Any], runs: int) -> tuple[float, float, float]:
    """Median latency of the full and int8 graphs (one thread), measured interleaved: each
    round runs both, alternating which goes first, so a change of the CPU's speed during
    the measurement falls on both; and the largest absolute difference of their outputs."""
    import numpy as np

    sessions = (_session(full, "full"), _session(int8, "int8"))
    outputs = [_run(s, feeds, w) for s, w in zip(sessions, ("full", "int8"))]
    diff = max((float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
                for a, b in zip(*outputs) if a.shape == b.shape and a.dtype.kind in "fiu"), default=0.0)
    for _ in range(2):  # warm-up
        for s in sessions:
            s.run(None, feeds)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(runs):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            sessions[k].run(None, feeds)
            times[k].append(time.perf_counter() - t0)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3, diff


#: int8 is added only when it is smaller and at most this much slower (the noise of a short
#: interleaved measurement); --force adds it anyway
_SLOWER = 1.05


def cmd_quantize(args: argparse.Namespace) -> int:
    try:
        bundle = Bundle.load(args.bundle)
        bundle.check_files()
    except BundleError as exc:
        return _fail(str(exc))
    manifest = bundle.manifest
    full = bundle.files[manifest.variants["full"].file]
    if args.runs < 1:
        return _fail(f"--runs {args.runs}: give at least 1 run (20 by default)")
    try:
        feeds, warnings = _feeds(manifest.inputs, args.shape, args.value)
        for warning in warnings:
            print(f"edgebus: warning: {warning}", file=sys.stderr)
        int8 = _quantize_int8(full)
        full_ms, int8_ms, diff = _latency_ms(full, int8, feeds, args.runs)
    except QuantizeError as exc:
        return _fail(f"cannot quantize {manifest.name} {manifest.version}: {exc}")
    on = ", ".join(f"{n} {_show(a.shape)}" if a.shape else f"{n}={a.item():g}" for n, a in feeds.items())
    size, speed = len(int8) / len(full), int8_ms / full_ms
    print(f"size: full {len(full)} B, int8 {len(int8)} B ({size:.2f}x)")
    print(f"latency on {on} (median of {args.runs} interleaved runs each, 1 thread): full {full_ms:.3f} ms, "
          f"int8 {int8_ms:.3f} ms ({speed:.2f}x)")
    print(f"outputs: int8 differs from full by at most {diff:.3g} on these inputs")
    problems = []
    if size >= 1:
        problems.append(f"int8 is {'larger' if size > 1 else 'no smaller'} than full ({len(int8)} B against "
                        f"{len(full)} B)")
    if speed > _SLOWER:
        problems.append(f"int8 is {speed:.2f}x slower than full on this CPU for {on}")
    if problems and not args.force:
        return _fail(f"{'; '.join(problems)}: not added (pass --force to add it anyway)")
    manifest = msgspec.structs.replace(manifest, variants={
        **manifest.variants,
        "int8": Variant(file="int8.onnx", sha256="", size=0, description="ONNX Runtime dynamic int8 quantisation of full"),
    })
    Bundle.create(manifest, {**bundle.files, "int8.onnx": int8}).save(args.out)
    print(f"int8 variant added to {args.out} (unsigned: sign it again)"
          + (f", though {'; '.join(problems)} (--force)" if problems else ""))
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("keygen", help="create an ed25519 signing key pair (BASE.key, BASE.pub)")
    p.add_argument("--out", required=True, help="base path of the key files")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_keygen)
    model = sub.add_parser("model", help="model bundles: pack, sign, verify, inspect, quantize")
    msub = model.add_subparsers(dest="model_command", required=True)
    p = msub.add_parser("pack", help="pack an ONNX model into a bundle (inputs/outputs read from the graph)")
    p.add_argument("model")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--author")
    p.add_argument("--description")
    p.add_argument("--spec", help="JSON with pre, post, fallback, reference, provenance, metadata, and "
                                  '"inputs"/"outputs": overrides by tensor name of dtype, shape, batch_axis')
    p.add_argument("--variant", action="append", help="NAME=FILE.onnx, e.g. small=small.onnx")
    p.add_argument("--asset", action="append", metavar="NAME=FILE",
                   help="a file the bundle carries for ops and clients (labels, vocabulary...); repeatable")
    p.add_argument("--key", help="sign with this private key")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_pack)
    p = msub.add_parser("sign", help="sign a bundle")
    p.add_argument("bundle")
    p.add_argument("--key", required=True)
    p.add_argument("--out")
    p.set_defaults(func=cmd_sign)
    p = msub.add_parser("verify", help="check a bundle's files and signature")
    p.add_argument("bundle")
    p.add_argument("--pubkey", help="the key it must be signed with (hex or file)")
    p.set_defaults(func=cmd_verify)
    p = msub.add_parser("inspect", help="print a bundle's manifest")
    p.add_argument("bundle")
    p.set_defaults(func=cmd_inspect)
    p = msub.add_parser("quantize", help="add an int8 variant (dynamic quantisation) when it is smaller and not "
                                         "slower, measured on the inputs the model serves")
    p.add_argument("bundle")
    p.add_argument("--out", required=True)
    p.add_argument("--shape", action="append", metavar="NAME=AxBxC",
                   help="measure input NAME at this shape, e.g. x=1x3x640x640 (repeatable); without it: fixed sizes "
                        "as the contract has them, batch 1, an image's height and width 224, other dynamic sizes "
                        "256 (1 in a tensor without batch axis), each guess warned about")
    p.add_argument("--value", action="append", metavar="NAME=V",
                   help="fill input NAME with V, e.g. sr=16000 (required for integer scalars; repeatable)")
    p.add_argument("--runs", type=int, default=20, help="interleaved runs of each graph (default 20)")
    p.add_argument("--force", action="store_true", help="add int8 even when it is larger or slower than full")
    p.set_defaults(func=cmd_quantize)
