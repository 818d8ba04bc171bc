"""``edgebus keygen`` and ``edgebus model pack|sign|verify|inspect|quantize``: offline."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect

from protocols.modelstore import Manifest, TensorSpec, Variant
from services.modelstore import Bundle, BundleError

__all__ = ["add_commands"]

_ONNX_TYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 4: "uint16"}


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
    """Inputs and outputs with dtype and shape, read from the ONNX graph."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    initializers = {i.name for i in model.graph.initializer}

    def spec(v: Any) -> TensorSpec:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        return TensorSpec(name=v.name, dtype=_ONNX_TYPES.get(t.elem_type, str(t.elem_type)), shape=shape)

    return ([spec(v) for v in model.graph.input if v.name not in initializers],
            [spec(v) for v in model.graph.output])


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
    model = Path(args.model).read_bytes()
    try:
        inputs, outputs = graph_io(model)
    except Exception as exc:  # onnx raises its own DecodeError & co
        return _fail(f"{args.model} is not an ONNX model: {exc}")
    try:
        spec: dict[str, Any] = json.loads(Path(args.spec).read_text()) if args.spec else {}
    except ValueError as exc:
        return _fail(f"{args.spec} is not JSON: {exc}")
    if not isinstance(spec, dict):
        return _fail(f"{args.spec}: a spec is a JSON object (pre, post, fallback, reference, provenance)")
    misspelt = unknown_keys(spec)
    if misspelt:
        return _fail(f"{args.spec}: unknown manifest key(s) {', '.join(misspelt)}; fix or remove them "
                     "(the manifest's fields: protocols.modelstore.Manifest)")
    files = {"full.onnx": model}
    variants = {"full": Variant(file="full.onnx", sha256="", size=0)}
    for extra in args.variant or []:
        name, _, path = extra.partition("=")
        files[f"{name}.onnx"] = Path(path).read_bytes()
        variants[name] = Variant(file=f"{name}.onnx", sha256="", size=0)
    try:
        manifest = msgspec.convert({
            **spec, "name": args.name, "version": args.version, "created": time.time(),
            "author": args.author or spec.get("author", ""), "description": args.description or spec.get("description", ""),
            "inputs": msgspec.to_builtins(inputs), "outputs": msgspec.to_builtins(outputs),
            "variants": msgspec.to_builtins(variants),
        }, Manifest)
        bundle = Bundle.create(manifest, files)
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
    feed = {i.name: rng.random([d or 1 for d in i.shape]).astype(i.dtype) for i in inputs}
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
    p.add_argument("--spec", help="JSON with pre, post, fallback, reference, provenance")
    p.add_argument("--variant", action="append", help="NAME=FILE.onnx, e.g. small=small.onnx")
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
