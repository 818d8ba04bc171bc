"""``edgebus keygen`` and ``edgebus model pack|sign|verify|inspect|quantize``: offline."""

from __future__ import annotations

import argparse
import difflib
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

from protocols.modelstore import ASSET_NAME, Asset, Manifest, TensorSpec, Variant
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


def _check_ops(spec: dict[str, Any]) -> None:
    """Every op the spec's pre and post name is one the accelerator drivers know (when
    drivers.ops can be imported here)."""
    try:
        from drivers.ops import OPS
    except ImportError:  # a tools-only install: the store's install and the driver's load check
        return
    for where in ("pre", "post"):
        steps = spec.get(where) or []
        for i, step in enumerate(steps if isinstance(steps, list) else []):
            name = step.get("op") if isinstance(step, dict) else None
            if isinstance(name, str) and name not in OPS:
                close = difflib.get_close_matches(name, OPS, n=3)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                raise PackError(f"{where}[{i}] names op {name!r}, which is not an op the accelerator drivers have; "
                                f"{hint}the ops: {', '.join(sorted(OPS))}")


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
        _check_ops(spec)
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
        bundle = Bundle.create(manifest, {**files, **asset_files})
        for variant in bundle.manifest.variants.values():  # the contract fits every variant's graph
            check_graph(bundle.manifest, variant.file, files[variant.file])
    except (msgspec.ValidationError, BundleError) as exc:
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


def _latency_ms(model: bytes, inputs: list[TensorSpec], runs: int = 200) -> float:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {i.name: np.asarray(rng.random([d if isinstance(d, int) and d > 0 else 1 for d in i.shape])).astype(i.dtype)
            for i in inputs}
    for _ in range(10):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cmd_quantize(args: argparse.Namespace) -> int:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        bundle = Bundle.load(args.bundle)
        bundle.check_files()
    except BundleError as exc:
        return _fail(str(exc))
    full = bundle.files[bundle.manifest.variants["full"].file]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "full.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(full)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        int8 = dst.read_bytes()
    manifest = msgspec.structs.replace(bundle.manifest, variants={
        **bundle.manifest.variants,
        "int8": Variant(file="int8.onnx", sha256="", size=0, description="ONNX Runtime dynamic int8 quantisation of full"),
    })
    files = {**bundle.files, "int8.onnx": int8}
    out = Bundle.create(manifest, files)
    out.save(args.out)
    full_ms, int8_ms = _latency_ms(full, manifest.inputs), _latency_ms(int8, manifest.inputs)
    print(f"int8 variant added to {args.out} (unsigned: sign it again)")
    print(f"size: full {len(full)} B, int8 {len(int8)} B ({len(int8) / len(full):.2f}x)")
    print(f"latency (median of 200, 1 thread, batch 1): full {full_ms:.3f} ms, int8 {int8_ms:.3f} ms "
          f"({int8_ms / full_ms:.2f}x)")
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
    p = msub.add_parser("quantize", help="add an int8 variant (dynamic quantisation); report size and speed")
    p.add_argument("bundle")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_quantize)
