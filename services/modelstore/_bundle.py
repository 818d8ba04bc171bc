"""The model bundle: one file holding a signed manifest and the model files.

Layout: a zip archive (stored, not compressed: ONNX files barely compress) with

* ``manifest.json``: the ``Manifest`` (``protocols.modelstore``, msgspec JSON), which lists every model file with
  its sha256 and size: the signature covers the files through it (the OpenSSF
  model-signing idea);
* ``signature.json``: ``{"key_id", "public_key", "signature"}``, ed25519 over the exact
  bytes of manifest.json;
* the model files, e.g. ``full.onnx`` and ``int8.onnx``, and the asset files the manifest's
  ``assets`` name (labels, vocabularies...), e.g. ``assets/labels.txt``, listed and signed the
  same way.

Reading is staged and bounded (``Archive``), because a bundle comes from outside: the
central directory, the manifest and the signature are read first, each under a small
cap; the entries' names, methods, declared sizes and compression ratios are checked
against the limits and the manifest before a single model byte is inflated; then each
file is streamed with its size checked as it inflates (stopping at the first byte over
what the manifest signs) and its sha256 computed on the way.  The store verifies the
signature between those stages (PROTOCOL.md 11.4).

Offline tools (``edgebus model pack|sign|verify|inspect|quantize``) and the store use
this module; verification against a trust store is the store's (the security service's).
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import msgspec

from protocols.modelstore import DIM_NAME, Asset, Dim, Manifest, ManifestError, TensorSpec, Variant

from ._exceptions import BadEntry, BundleError, BundleTooLarge, GraphMismatch, TamperedBundle, UnsignedBundle

__all__ = ["Signature", "Bundle", "Archive", "Limits", "LIMITS", "MANIFEST", "SIGNATURE", "Graph", "read_graph",
           "graph_io", "check_graph", "bundle_files"]

MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
_CHUNK = 1 << 20
_END = b"PK\x05\x06"
_END64_LOCATOR = b"PK\x06\x07"
_LOCAL = b"PK\x03\x04"


class Signature(msgspec.Struct):
    key_id: str
    public_key: str
    signature: str


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """The bounds a bundle is read within (PROTOCOL.md 11.4); every one is checked before
    the bytes it bounds are read."""

    #: the ``manifest.json`` entry, bytes
    manifest: int = 1 << 20
    #: the ``signature.json`` entry, bytes
    signature: int = 16 << 10
    #: the ZIP central directory, bytes: bounds the number of entries before any is parsed
    directory: int = 64 << 10
    #: the model and asset files together, uncompressed, bytes
    total: int = 1 << 30
    #: a compressed entry inflates to at most this many times its compressed size...
    ratio: int = 100
    #: ...unless it inflates to no more than this many bytes
    ratio_floor: int = 1 << 20


LIMITS = Limits()


def _mib(n: int) -> str:
    return f"{n} bytes ({n / (1 << 20):.1f} MiB)"


def _check_name(name: str, what: str) -> None:
    """A bundle's entry names are plain relative paths: no absolute path, no ``..`` or ``.``
    component, no backslash, drive letter or control character."""
    parts = name.split("/")
    problem = ("it is empty" if not name
               else "it has a backslash" if "\\" in name
               else "it has a control character" if any(ord(c) < 32 or ord(c) == 127 for c in name)
               else "it is an absolute path" if name.startswith("/") or ":" in name
               else "it is a directory" if name.endswith("/")
               else "it has a '..', '.' or empty path component" if any(p in ("", ".", "..") for p in parts)
               else "")
    if problem:
        raise BadEntry(f"{what} {name!r} is not a plain file name ({problem}); "
                       "a bundle holds manifest.json, signature.json and the files its variants and assets name, "
                       "nothing else")


class _ViewFile(io.RawIOBase):
    """A seekable read-only file over a buffer, without a copy (``io.BytesIO`` copies a
    memoryview: a 500 MB bundle would be held twice)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        buffer[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise OSError(f"seek to {base + offset}, before the start")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def _directory_size(view: memoryview) -> int:
    """The size of the central directory, from the end record that ``zipfile`` will use
    (found the same way): checked before ``zipfile`` parses the directory, whose every
    entry costs memory and time."""
    n = len(view)
    if n >= 22 and view[n - 22:n - 18] == _END and view[n - 2:n] == b"\0\0":
        end = n - 22
    else:
        start = max(0, n - (1 << 16) - 22)
        found = bytes(view[start:]).rfind(_END)
        if found < 0 or start + found + 22 > n:
            raise BundleError("not a bundle archive: it has no ZIP end-of-central-directory record")
        end = start + found
    if end >= 20 and view[end - 20:end - 16] == _END64_LOCATOR:
        raise BadEntry("it is a ZIP64 archive, which a bundle never needs (over 65,535 entries or 4 GiB); "
                       "write it as a plain ZIP")
    return int(struct.unpack("<L", view[end + 12:end + 16])[0])


class Archive:
    """A bundle archive opened for checking in bounded stages.

    Opening reads the central directory (at most ``limits.directory`` bytes), checks every
    entry (a plain name, once; stored or deflated, not encrypted; declared size and
    compression ratio within the limits) and reads ``manifest.json`` and ``signature.json``
    (each under its cap).  Then ``verify_embedded`` checks the signature, ``check_entries``
    holds the entries to the manifest, and ``read_files`` streams the model files.
    Raises BundleError (or a subclass) naming the problem at whichever stage finds it."""

    def __init__(self, data: Any, limits: Limits = LIMITS) -> None:
        self.limits = limits
        self._view = memoryview(data).cast("B")
        if _directory_size(self._view) > limits.directory:
            raise BundleTooLarge(f"its ZIP central directory is over {limits.directory} bytes "
                                 "(a bundle has a handful of entries)")
        try:
            self._zip = zipfile.ZipFile(_ViewFile(self._view))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error) as exc:
            raise BundleError(f"not a bundle archive: {exc}") from exc
        try:
            self.entries = self._check_structure()
            self.manifest_bytes = self._read_small(MANIFEST, limits.manifest, required=True)
            raw_signature = self._read_small(SIGNATURE, limits.signature, required=False)
            try:
                self.manifest = msgspec.json.decode(self.manifest_bytes, type=Manifest)
                self.manifest.check()
            except (msgspec.DecodeError, msgspec.ValidationError, ManifestError) as exc:
                raise BundleError(f"manifest.json: {exc}") from exc
            self.signature: Signature | None = None
            if raw_signature is not None:
                try:
                    self.signature = msgspec.json.decode(raw_signature, type=Signature)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    raise BundleError(f"signature.json: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    # -- stage 1: the archive's own structure ----------------------------------------------------

    def _check_structure(self) -> dict[str, zipfile.ZipInfo]:
        limits = self.limits
        entries: dict[str, zipfile.ZipInfo] = {}
        declared = 0
        for info in self._zip.infolist():
            name = info.filename
            if info.orig_filename != name:  # zipfile cut it at a NUL byte
                raise BadEntry(f"entry {info.orig_filename!r} has a NUL byte in its name")
            _check_name(name, "entry")
            if name in entries:
                raise BadEntry(f"entry {name!r} appears twice")
            if info.flag_bits & 0x1:
                raise BadEntry(f"entry {name!r} is encrypted; bundles are never encrypted (the store encrypts at rest)")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise BadEntry(f"entry {name!r} uses compression method {info.compress_type}; "
                               "store it (method 0) or deflate it (8)")
            if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
                raise BadEntry(f"entry {name!r} is stored but declares {info.file_size} bytes in "
                               f"{info.compress_size}")
            if info.file_size > limits.ratio_floor and info.file_size > limits.ratio * max(info.compress_size, 1):
                raise BundleTooLarge(
                    f"entry {name!r} would inflate to {_mib(info.file_size)} from {info.compress_size} bytes "
                    f"({info.file_size // max(info.compress_size, 1)}:1), over the limit of {limits.ratio}:1 "
                    "(a zip bomb?); refused before inflating it")
            declared += info.file_size
            entries[name] = info
        cap = limits.total + limits.manifest + limits.signature
        if declared > cap:
            raise BundleTooLarge(f"its entries declare {_mib(declared)} together, over the limit of {_mib(cap)}")
        return entries

    def _read_small(self, name: str, cap: int, required: bool) -> bytes | None:
        info = self.entries.get(name)
        if info is None:
            if required:
                raise BundleError(f"it has no {name}")
            return None
        if info.file_size > cap:
            raise BundleTooLarge(f"{name} declares {info.file_size} bytes, over the limit of {cap}")
        out = bytearray()
        for chunk in self._inflate(info):
            out += chunk
            if len(out) > cap:
                raise BundleTooLarge(f"{name} inflates beyond the limit of {cap} bytes")
        return bytes(out)

    def _inflate(self, info: zipfile.ZipInfo) -> Iterator[bytes]:
        """The entry's bytes in chunks of at most 1 MiB (zipfile stops at its declared size
        and checks the CRC at the end)."""
        try:
            with self._zip.open(info) as f:
                while chunk := f.read(_CHUNK):
                    yield chunk
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError,
                ValueError, struct.error) as exc:
            raise BundleError(f"entry {info.filename!r} cannot be read: {exc}") from exc

    # -- stage 2: the signature, against the key it names ------------------------------------------

    def verify_embedded(self) -> Signature:
        """The bundle is signed, and the signature verifies over manifest.json with the key it
        carries (whose id it names): else the manifest or the signature changed after signing."""
        sig = self.signature
        if sig is None:
            raise UnsignedBundle()
        try:
            embedded = bytes.fromhex(sig.public_key)
        except ValueError:
            raise TamperedBundle("signature.json") from None
        if hashlib.sha256(embedded).hexdigest()[:16] != sig.key_id or not verify(sig, self.manifest_bytes, embedded):
            raise TamperedBundle("manifest.json")
        return sig

    # -- stage 3: the entries against the (signed) manifest -------------------------------------------

    def expected(self) -> dict[str, Variant | Asset]:
        """Each distinct file the variants and assets name, with its signed size and sha256."""
        return bundle_files(self.manifest)

    def check_entries(self) -> dict[str, Variant | Asset]:
        """Exactly the manifest's files are there, each declaring the size the manifest signs,
        all within the total limit.  Reads no file."""
        files = self.expected()
        total = sum(v.size for v in files.values())
        if total > self.limits.total:
            raise BundleTooLarge(f"its model and asset files are {_mib(total)} together, over the limit of "
                                 f"{_mib(self.limits.total)}")
        extra = sorted(set(self.entries) - set(files) - {MANIFEST, SIGNATURE})
        if extra:
            raise BadEntry(f"unlisted file(s) {extra}: a bundle holds manifest.json, signature.json and the files "
                           "its variants and assets name, nothing else")
        for name, variant in files.items():
            info = self.entries.get(name)
            if info is None:
                raise TamperedBundle(f"{name} (missing)")
            if info.file_size != variant.size:
                raise TamperedBundle(f"{name} (its entry declares {info.file_size} bytes, the manifest "
                                     f"{variant.size})")
        return files

    # -- stage 4: the files, streamed ---------------------------------------------------------------------

    def read_files(self, verify_digests: bool = True) -> dict[str, Any]:
        """Every file the manifest lists (models and assets), by name: a stored one as a view of the archive (no
        copy), a deflated one inflated into a buffer of exactly its signed size, stopping at
        the first byte over it.  With ``verify_digests``, each must have its signed sha256."""
        out: dict[str, Any] = {}
        for name, variant in self.check_entries().items():
            info = self.entries[name]
            digest = hashlib.sha256()
            if info.compress_type == zipfile.ZIP_STORED:
                data: Any = self._stored(info)
                digest.update(data)
            else:
                data = bytearray(variant.size)
                pos = 0
                for chunk in self._inflate(info):
                    if pos + len(chunk) > variant.size:
                        raise TamperedBundle(f"{name} (it inflates beyond the {variant.size} bytes the manifest signs)")
                    data[pos:pos + len(chunk)] = chunk
                    digest.update(chunk)
                    pos += len(chunk)
                if pos != variant.size:
                    raise TamperedBundle(f"{name} (it inflates to {pos} bytes, the manifest signs {variant.size})")
            if verify_digests and digest.hexdigest() != variant.sha256:
                raise TamperedBundle(name)
            out[name] = data
        return out

    def _stored(self, info: zipfile.ZipInfo) -> memoryview:
        view, off = self._view, info.header_offset
        if view[off:off + 4] != _LOCAL:
            raise BundleError(f"entry {info.filename!r} cannot be read: bad local header")
        name_len, extra_len = struct.unpack("<HH", view[off + 26:off + 30])
        name = bytes(view[off + 30:off + 30 + name_len])
        if name.decode("utf-8" if info.flag_bits & 0x800 else "cp437", errors="replace") != info.orig_filename:
            raise BadEntry(f"entry {info.filename!r} has another name in its local header: {name!r}")
        start = off + 30 + name_len + extra_len
        if start + info.compress_size > len(view):
            raise BundleError(f"entry {info.filename!r} cannot be read: the archive is truncated")
        return view[start:start + info.compress_size]


def bundle_files(manifest: Manifest) -> dict[str, Variant | Asset]:
    """Each distinct file a manifest's variants and assets name, with its signed size and
    sha256.  Raises BadEntry for a name that is not a plain file name, or names
    manifest.json or signature.json, and BundleError for one file named twice with different
    digests or sizes, or named both as a model and as an asset."""
    files: dict[str, Variant | Asset] = {}
    for what, entries in (("variant", manifest.variants), ("asset", manifest.assets)):
        for entry_name, entry in entries.items():
            _check_name(entry.file, f"{what} {entry_name!r} names file")
            if entry.file in (MANIFEST, SIGNATURE):
                raise BadEntry(f"{what} {entry_name!r} names {entry.file}, which is not a {'model' if what == 'variant' else 'asset'} file")
            other = files.get(entry.file)
            if other is not None:
                if type(other) is not type(entry):
                    raise BundleError(f"manifest.json: {entry.file} is named both as a model file and as an asset")
                if (other.sha256, other.size) != (entry.sha256, entry.size):
                    raise BundleError(f"manifest.json: two {what}s name {entry.file} with different sha256 or size")
            files[entry.file] = entry
    return files


def verify(sig: Signature, manifest_bytes: bytes, public_key: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(bytes.fromhex(sig.signature), manifest_bytes)
    except (InvalidSignature, ValueError):
        return False
    return True


# -- the graph's inputs and outputs, without its weights --------------------------------------------

_ONNX_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 12: "uint32", 13: "uint64"}


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: memoryview) -> Iterator[tuple[int, memoryview | None]]:
    """(field number, bytes of a length-delimited field or None) of a protobuf message,
    without decoding (and so without copying) any of it."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        value = None
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            length, i = _varint(buf, i)
            value = buf[i:i + length]
            i += length
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > n:
            raise ValueError("truncated protobuf message")
        yield field, value


#: dimension names that exporters generate for "unknown" (paddle2onnx, tf2onnx, shape
#: inference): they name nothing shared, so they read as dynamic
_GENERATED_DIM = re.compile(r"^(p2o\.DynamicDimension\.\d+|unk__\d+|\?)$")


class Graph(msgspec.Struct):
    """What an ONNX graph says of its contract (``read_graph``)."""

    #: the inputs (initializers excepted) and outputs, as a manifest takes them: sizes > 0
    #: fixed, 0 and -1 dynamic, named dimensions symbolic (generated names dynamic);
    #: ``batch_axis`` left out, so the default applies (``TensorSpec.batch()``: axis 0 where
    #: it is not fixed, none for a scalar or a fixed axis 0).  An input or output that is no
    #: tensor is listed with dtype "" and shape [] (and named in ``not_tensors``)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    #: the model's ``metadata_props``
    metadata: dict[str, str] = {}
    #: tensors whose graph gives no shape at all (their rank is unknown), by name
    unranked: list[str] = []
    #: inputs and outputs that are not tensors (sequences, maps...), by name
    not_tensors: list[str] = []


def _graph_dim(d: Any) -> Dim:
    if d.HasField("dim_value"):
        return d.dim_value if d.dim_value > 0 else None
    if d.HasField("dim_param") and DIM_NAME.match(d.dim_param) and not _GENERATED_DIM.match(d.dim_param):
        return d.dim_param
    return None


def read_graph(model: Any) -> Graph:
    """The contract of an ONNX model's graph, read from the serialized ModelProto without
    parsing its nodes' or initializers' data: only the graph's ValueInfoProto entries are
    parsed, with ``onnx``, and the model's ``metadata_props``.  Raises ValueError (or
    protobuf's DecodeError) for bytes that are not a model."""
    import onnx

    view = memoryview(model).cast("B")
    inputs: list[memoryview] = []
    outputs: list[memoryview] = []
    initializers: set[str] = set()
    metadata: dict[str, str] = {}
    for field, value in _fields(view):
        if field == 14 and value is not None:  # ModelProto.metadata_props: StringStringEntryProto
            entry = {f: bytes(v).decode(errors="replace") for f, v in _fields(value) if v is not None}
            metadata[entry.get(1, "")] = entry.get(2, "")
        if field != 7 or value is None:  # ModelProto.graph
            continue
        for gfield, item in _fields(value):
            if item is None:
                continue
            if gfield == 11:  # GraphProto.input
                inputs.append(item)
            elif gfield == 12:  # GraphProto.output
                outputs.append(item)
            elif gfield == 5:  # GraphProto.initializer: only its name (TensorProto.name = 8)
                initializers.update(bytes(v).decode(errors="replace") for f, v in _fields(item) if f == 8 and v is not None)
    unranked: list[str] = []
    not_tensors: list[str] = []

    def spec(raw: memoryview) -> TensorSpec:
        info = onnx.ValueInfoProto.FromString(bytes(raw))
        if not info.type.HasField("tensor_type"):
            not_tensors.append(info.name)
            return TensorSpec(name=info.name, dtype="", shape=[], batch_axis=None)
        t = info.type.tensor_type
        if not t.HasField("shape"):
            unranked.append(info.name)
        return TensorSpec(name=info.name, dtype=_ONNX_TYPES.get(t.elem_type, str(t.elem_type)),
                          shape=[_graph_dim(d) for d in t.shape.dim])

    ins = [spec(v) for v in inputs]
    return Graph(inputs=[s for s in ins if s.name not in initializers], outputs=[spec(v) for v in outputs],
                 metadata=metadata, unranked=[n for n in unranked if n not in initializers],
                 not_tensors=[n for n in not_tensors if n not in initializers])


def graph_io(model: Any) -> tuple[list[TensorSpec | None], list[TensorSpec | None]]:
    """The inputs (initializers excepted) and outputs of an ONNX model's graph (``read_graph``):
    a non-tensor input or output is None; an unknown rank is an empty shape with ``dtype`` kept."""
    graph = read_graph(model)
    return ([None if s.name in graph.not_tensors else s for s in graph.inputs],
            [None if s.name in graph.not_tensors else s for s in graph.outputs])


def check_graph(manifest: Manifest, file: str, model: Any) -> None:
    """The manifest's ``inputs`` and ``outputs`` agree with the graph of ``file``: the same
    names in the same order, the same dtypes and ranks (where the graph gives a rank), and
    equal sizes wherever both give a fixed size (a dynamic or symbolic axis on either side
    matches any size; the graph's 0 and -1 are dynamic).  An empty list declares nothing and
    is not checked.  Raises GraphMismatch naming the first contradiction."""
    if not manifest.inputs and not manifest.outputs:
        return
    try:
        graph = read_graph(model)
    except Exception as exc:  # protobuf's DecodeError & co: the load check says more
        raise GraphMismatch(f"{file}: its graph's inputs and outputs cannot be read ({exc})") from exc
    for kind, declared, actual in (("inputs", manifest.inputs, graph.inputs), ("outputs", manifest.outputs, graph.outputs)):
        if not declared:
            continue

        def show(specs: list[TensorSpec]) -> str:
            return ", ".join("(not a tensor)" if s.name in graph.not_tensors else f"{s.name} {s.dtype} {s.shape}"
                             for s in specs)

        if [d.name for d in declared] != [a.name for a in actual]:
            raise GraphMismatch(f"the manifest's {kind} are [{show(declared)}] but the graph of {file} has "
                                f"[{show(actual)}]; fix the manifest (`edgebus model pack` reads them from the graph)")
        for d, a in zip(declared, actual):
            problem = ""
            if a.name in graph.not_tensors:
                problem = "a tensor type; the graph's is not a tensor"
            elif d.dtype != a.dtype:
                problem = f"dtype {d.dtype}, the graph's is {a.dtype}"
            elif a.name not in graph.unranked and len(d.shape) != len(a.shape):
                problem = f"shape {d.shape} (rank {len(d.shape)}), the graph's is {a.shape} (rank {len(a.shape)})"
            elif any(x.__class__ is int and y.__class__ is int and x != y for x, y in zip(d.shape, a.shape)):
                problem = f"shape {d.shape}, the graph's is {a.shape}"
            if problem:
                raise GraphMismatch(f"the manifest's {kind[:-1]} {d.name!r} has {problem} in {file}; fix the manifest "
                                    "(`edgebus model pack` reads it from the graph)")


class Bundle:
    """A bundle in memory: manifest bytes, signature, file contents."""

    def __init__(self, manifest_bytes: bytes, files: dict[str, bytes], signature: Signature | None = None) -> None:
        self.manifest_bytes = manifest_bytes
        try:
            self.manifest = msgspec.json.decode(manifest_bytes, type=Manifest)
            self.manifest.check()
        except (msgspec.DecodeError, msgspec.ValidationError, ManifestError) as exc:
            raise BundleError(f"manifest.json: {exc}") from exc
        self.files = files
        self.signature = signature

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def create(cls, manifest: Manifest, files: dict[str, bytes]) -> "Bundle":
        missing = sorted(v.file for v in [*manifest.variants.values(), *manifest.assets.values()] if v.file not in files)
        if missing:
            raise BundleError(f"the manifest's variants or assets name file(s) {missing} that were not given")
        manifest.variants = {
            name: Variant(file=v.file, sha256=hashlib.sha256(files[v.file]).hexdigest(), size=len(files[v.file]),
                          description=v.description)
            for name, v in manifest.variants.items()
        }
        manifest.assets = {
            name: Asset(file=a.file, sha256=hashlib.sha256(files[a.file]).hexdigest(), size=len(files[a.file]),
                        media_type=a.media_type)
            for name, a in manifest.assets.items()
        }
        manifest.created = manifest.created or time.time()
        return cls(msgspec.json.encode(manifest), files)

    def sign(self, private_key: Any) -> None:
        """Sign with an ed25519 private key (cryptography's Ed25519PrivateKey)."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.signature = Signature(key_id=hashlib.sha256(public).hexdigest()[:16], public_key=public.hex(),
                                   signature=private_key.sign(self.manifest_bytes).hex())

    # -- files ----------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            z.writestr(MANIFEST, self.manifest_bytes)
            if self.signature is not None:
                z.writestr(SIGNATURE, msgspec.json.encode(self.signature))
            for name in sorted(self.files):
                z.writestr(name, self.files[name])
        return buf.getvalue()

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: Any, limits: Limits = LIMITS) -> "Bundle":
        """Read a bundle within ``limits`` (see ``Archive``): sizes are held to the manifest
        as the files inflate; digests and the signature are left to ``check_files`` and
        ``check_signature_with``, so an unsigned or altered bundle can still be inspected."""
        with Archive(data, limits) as archive:
            files = {name: bytes(b) for name, b in archive.read_files(verify_digests=False).items()}
            return cls(archive.manifest_bytes, files, archive.signature)

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        try:
            return cls.from_bytes(Path(path).read_bytes())
        except OSError as exc:
            raise BundleError(f"cannot read {path}: {exc.strerror}") from exc

    # -- verification ---------------------------------------------------------------------------

    def check_files(self) -> None:
        """Every file the manifest lists is there with its signed digest, and no other."""
        listed = bundle_files(self.manifest)
        for name, variant in listed.items():
            data = self.files.get(name)
            if data is None:
                raise TamperedBundle(f"{name} (missing)")
            if len(data) != variant.size or hashlib.sha256(data).hexdigest() != variant.sha256:
                raise TamperedBundle(name)
        extra = set(self.files) - set(listed)
        if extra:
            raise TamperedBundle(f"unlisted file(s) {sorted(extra)}")

    def check_signature_with(self, public_key: bytes) -> bool:
        if self.signature is None:
            raise UnsignedBundle()
        return verify(self.signature, self.manifest_bytes, public_key)
