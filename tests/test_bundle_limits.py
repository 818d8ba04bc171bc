"""Model bundles are read with bounded memory and time (issue 11): a zip bomb is refused
before it inflates, entry names are exactly the manifest's, a manifest that contradicts its
graph is refused, and a large install never stalls the store's event loop."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import anyio
import msgspec
import numpy as np
import pytest

from protocols import ListServices, ServiceList
from protocols.modelstore import Install, Installed, ListModels, ModelList
from services import BadMessage
from services.modelstore import Bundle, Manifest

from conftest import System
from test_modelstore import KEY, bundle, config, install, onnx_model, store_files

pytestmark = pytest.mark.anyio

GIB = 1 << 30
ZERO_SIGNATURE = msgspec.json.encode({"key_id": "0" * 16, "public_key": "0" * 64, "signature": "0" * 128})


# -- real bytes --------------------------------------------------------------------------------------


def raw_zip(entries: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """A ZIP archive written by hand, so its headers can say anything: each entry is
    (name, method, data as stored, crc32, declared uncompressed size)."""
    out, central = bytearray(), bytearray()
    for name, method, data, crc, size in entries:
        n = name.encode()
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(data), size, len(n), 0) + n + data
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(data), size, len(n),
                               0, 0, 0, 0, 0, offset) + n
    start = len(out)
    out += central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), start, 0)
    return bytes(out)


def stored(name: str, data: bytes) -> tuple[str, int, bytes, int, int]:
    return name, 0, data, zlib.crc32(data), len(data)


@pytest.fixture(scope="module")
def gib_of_zeros() -> tuple[bytes, int]:
    """1 GiB of zeros as one raw DEFLATE stream (about 1 MiB), and its CRC-32."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk, parts, crc = bytes(1 << 20), [], 0
    for _ in range(1024):
        parts.append(comp.compress(chunk))
        crc = zlib.crc32(chunk, crc)
    parts.append(comp.flush())
    return b"".join(parts), crc


def bomb(zeros: tuple[bytes, int], *, signed_size: int = GIB, header_size: int = GIB, key=None,
         version: str = "1.0.0") -> bytes:
    """A bundle whose full.onnx is 1 GiB of zeros deflated; the manifest signs
    ``signed_size``, the zip headers declare ``header_size``; the signature is all zeros
    unless ``key`` signs the manifest."""
    data, crc = zeros
    manifest = msgspec.json.encode(Manifest(name="bomb", version=version, created=0.0, inputs=[], outputs=[],
                                            variants={"full": {"file": "full.onnx", "sha256": "0" * 64,  # type: ignore[dict-item]
                                                               "size": signed_size}}))
    signature = ZERO_SIGNATURE
    if key is not None:
        b = Bundle(manifest, {})
        b.sign(key)
        signature = msgspec.json.encode(b.signature)
    return raw_zip([stored("manifest.json", manifest), stored("signature.json", signature),
                    ("full.onnx", 8, data, crc, header_size)])


def signed_bundle(files: dict[str, bytes], variants: dict[str, str], *, inputs=(), outputs=(),
                  version: str = "1.0.0", extra: list[tuple[str, bytes]] = ()) -> bytes:  # type: ignore[assignment]
    """A bundle signed by the trusted KEY whose variants name ``files`` (any names), with
    ``extra`` entries appended as they are (duplicates too)."""
    manifest = msgspec.convert({"name": "demo", "version": version, "created": 1.0, "inputs": list(inputs),
                                "outputs": list(outputs),
                                "variants": {v: {"file": f, "sha256": "", "size": 0} for v, f in variants.items()}},
                               Manifest)
    b = Bundle.create(manifest, files)
    b.sign(KEY)
    data = b.to_bytes()
    if not extra:
        return data
    out = io.BytesIO(data)
    with warnings.catch_warnings(), zipfile.ZipFile(out, "a") as z:
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name: that is the point
        for name, content in extra:
            z.writestr(name, content)
    return out.getvalue()


def model(shape_in: list, shape_out: list, *, dtype: int = 1, big: int = 0) -> bytes:
    """A MatMul model x[.., 4] @ w[4, 4]; ``big`` adds an initializer of that many random
    float32 values (the bulk of a large model)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    if big:
        weights = np.random.default_rng(0).random(big, dtype=np.float32)
        inits.append(numpy_helper.from_array(weights, "weights"))
        nodes.append(helper.make_node("ReduceSum", ["weights"], ["total"], keepdims=0))
    outputs = [helper.make_tensor_value_info("y", dtype, shape_out)]
    if big:
        outputs.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", dtype, shape_in)], outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


# -- the real system -----------------------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


async def store_state(system: System) -> tuple[int, str]:
    async with system.client() as bus:
        listing = await bus.call("kernel", ListServices(), ServiceList)
    store = next(s for s in listing.services if s.name == "modelstore")
    return store.pid, store.state


@pytest.fixture
def store_system(make_system):
    system: System = make_system(config())
    anyio.run(lambda: system.wait_ready("security", "modelstore"))
    return system


async def test_a_zip_bomb_is_refused_in_bounded_memory_and_time(store_system, gib_of_zeros, tmp_path) -> None:
    system = store_system
    pid, _ = await store_state(system)
    data = bomb(gib_of_zeros)
    assert len(data) < 1.1 * (1 << 20)
    # through busctl, from a file
    (tmp_path / "bomb.ebm").write_bytes(data)
    t0 = time.monotonic()
    out = system.busctl("model", "install", str(tmp_path / "bomb.ebm"))
    assert time.monotonic() - t0 < 5  # busctl's own start-up included
    assert out.returncode == 1 and "zip bomb" in out.stderr and "100:1" in out.stderr, out.stderr
    # through the SDK: six in a row, each refused within 2 s naming the problem
    async with system.client() as bus:
        for i in range(6):
            t0 = time.monotonic()
            with pytest.raises(BadMessage) as info:
                await install(bus, data)
            assert time.monotonic() - t0 < 2.0, f"bomb {i} took {time.monotonic() - t0:.1f}s"
            assert "full.onnx" in str(info.value) and "over the limit of 100:1" in str(info.value), str(info.value)
        assert await bus.call("modelstore", ListModels(), ModelList) == ModelList(models=[])
    assert peak_rss_mb(pid) < 200, f"the store's peak RSS reached {peak_rss_mb(pid):.0f} MB"
    assert await store_state(system) == (pid, "ready")  # never restarted
    async with system.client() as bus:  # and it still installs a good bundle
        assert (await install(bus, bundle("1.0.0", KEY))).version == "1.0.0"


async def test_bombs_whose_headers_lie_are_refused_before_they_inflate(store_system, gib_of_zeros) -> None:
    system = store_system
    pid, _ = await store_state(system)
    cases = {
        # the headers claim 1,000 bytes (no ratio to see): the all-zero signature fails first
        "small header, zero signature": (bomb(gib_of_zeros, signed_size=1000, header_size=1000),
                                         "manifest.json does not match what was signed"),
        # a trusted signer, but the stream holds more than the 1,000 bytes signed: reading
        # stops at the signed size and the entry does not check out
        "small header, trusted signature": (bomb(gib_of_zeros, signed_size=1000, header_size=1000, key=KEY),
                                            "full.onnx"),
        # headers that disagree with the signed size
        "header over the signed size": (bomb(gib_of_zeros, signed_size=1000, header_size=2000, key=KEY),
                                        "its entry declares 2000 bytes, the manifest 1000"),
        # a trusted signer signing the whole GiB: the ratio still refuses it
        "honest and trusted": (bomb(gib_of_zeros, key=KEY), "over the limit of 100:1"),
    }
    async with system.client() as bus:
        for label, (data, text) in cases.items():
            t0 = time.monotonic()
            with pytest.raises(BadMessage) as info:
                await install(bus, data)
            assert time.monotonic() - t0 < 2.0, label
            assert text in str(info.value), (label, str(info.value))
    assert peak_rss_mb(pid) < 200
    assert await store_state(system) == (pid, "ready")


async def test_entry_names_must_be_exactly_the_manifests(store_system) -> None:
    system = store_system
    m = onnx_model(1.0)
    cases = {
        "parent": (signed_bundle({"../full.onnx": m}, {"full": "../full.onnx"}), "'..'"),
        "absolute": (signed_bundle({"/tmp/full.onnx": m}, {"full": "/tmp/full.onnx"}), "absolute path"),
        "backslash": (signed_bundle({"models\\full.onnx": m}, {"full": "models\\full.onnx"}), "backslash"),
        "dot": (signed_bundle({"./full.onnx": m}, {"full": "./full.onnx"}), "'..', '.'"),
        "duplicate": (signed_bundle({"full.onnx": m}, {"full": "full.onnx"}, extra=[("full.onnx", m)]),
                      "appears twice"),
        "extra entry": (signed_bundle({"full.onnx": m}, {"full": "full.onnx"}, extra=[("notes.txt", b"hi")]),
                        "unlisted file(s) ['notes.txt']"),
        "directory": (signed_bundle({"full.onnx": m}, {"full": "full.onnx"}, extra=[("models/", b"")]),
                      "directory"),
        "hidden extra": (signed_bundle({"full.onnx": m}, {"full": "full.onnx"}, extra=[("../evil.sh", b"x")]),
                         "'..'"),
    }
    async with system.client() as bus:
        before = store_files(system)
        for label, (data, text) in cases.items():
            with pytest.raises(BadMessage) as info:
                await install(bus, data)
            assert text in str(info.value), (label, str(info.value))
        assert store_files(system) == before
        assert await bus.call("modelstore", ListModels(), ModelList) == ModelList(models=[])


X = [{"name": "x", "dtype": "float32", "shape": [None, 4]}]
Y = [{"name": "y", "dtype": "float32", "shape": [None, 4]}]


async def test_a_manifest_that_contradicts_its_graph_is_refused(store_system) -> None:
    system = store_system
    m = model([None, 4], [None, 4])
    files, variants = {"full.onnx": m}, {"full": "full.onnx"}
    refused = {
        "input width": (dict(inputs=[{**X[0], "shape": [None, 8]}], outputs=Y), "input 'x' has shape [None, 8]"),
        "input rank": (dict(inputs=[{**X[0], "shape": [4]}], outputs=Y), "rank 1"),
        "input dtype": (dict(inputs=[{**X[0], "dtype": "int64"}], outputs=Y), "dtype int64, the graph's is float32"),
        "input name": (dict(inputs=[{**X[0], "name": "features"}], outputs=Y), "inputs are [features"),
        "output width": (dict(inputs=X, outputs=[{**Y[0], "shape": [None, 3]}]), "output 'y' has shape [None, 3]"),
        "an output missing": (dict(inputs=X, outputs=Y + [{"name": "z", "dtype": "float32", "shape": [1]}]),
                              "outputs are"),
    }
    async with system.client() as bus:
        for label, (io_specs, text) in refused.items():
            with pytest.raises(BadMessage) as info:
                await install(bus, signed_bundle(files, variants, **io_specs))
            assert text in str(info.value) and "full.onnx" in str(info.value), (label, str(info.value))
        # a variant is checked too
        small = model([None, 4], [None, 4], dtype=7)  # int64 where the manifest says float32
        with pytest.raises(BadMessage, match="small.onnx"):
            await install(bus, signed_bundle({"full.onnx": m, "small.onnx": small}, {"full": "full.onnx",
                                                                                      "small": "small.onnx"},
                                             inputs=X, outputs=Y))
        # dynamic and symbolic axes match any size, on either side
        symbolic = model(["batch", 4], ["batch", 4])
        accepted = [
            ({"full.onnx": m}, dict(inputs=X, outputs=Y)),
            ({"full.onnx": m}, dict(inputs=[{**X[0], "shape": [16, 4]}], outputs=[{**Y[0], "shape": [None, None]}])),
            ({"full.onnx": symbolic}, dict(inputs=[{**X[0], "shape": [32, 4]}], outputs=Y)),
            ({"full.onnx": symbolic}, dict()),  # nothing declared: nothing to contradict
        ]
        for i, (f, io_specs) in enumerate(accepted):
            installed = await install(bus, signed_bundle(f, variants, version=f"1.{i}.0", **io_specs))
            assert installed.version == f"1.{i}.0"


async def test_a_large_install_never_stalls_the_store(make_system) -> None:
    """A 500 MB model installs while another client lists models: every answer within
    1 s, and the store is never declared dead (same pid, ready)."""
    system: System = make_system("[bus]\nmax_message_size = 1073741824\n" + config())
    await system.wait_ready("security", "modelstore")
    pid, _ = await store_state(system)
    big = model([None, 4], [None, 4], big=125_000_000)
    data = signed_bundle({"full.onnx": big}, {"full": "full.onnx"}, inputs=X,
                         outputs=Y + [{"name": "total", "dtype": "float32", "shape": []}])
    latencies: list[float] = []
    done = anyio.Event()
    result: list[Installed] = []

    async def installer() -> None:
        async with system.client() as bus:
            result.append((await bus.request("modelstore", Install(), frames=[data], timeout=180)).decode(Installed))
        done.set()

    async def lister() -> None:
        async with system.client() as bus:
            while not done.is_set():
                t0 = time.monotonic()
                with anyio.fail_after(5):
                    await bus.call("modelstore", ListModels(), ModelList)
                latencies.append(time.monotonic() - t0)
                with anyio.move_on_after(0.05):
                    await done.wait()

    with anyio.fail_after(240):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lister)
            tg.start_soon(installer)
    assert result and result[0].version == "1.0.0"
    assert len(latencies) >= 10, latencies
    assert max(latencies) < 1.0, f"ListModels took up to {max(latencies):.2f}s during the install"
    assert await store_state(system) == (pid, "ready")


def with_flags(archive: bytes, name: str, *, flags: int | None = None, method: int | None = None) -> bytes:
    """``archive`` with the general-purpose flags or the method of entry ``name`` changed in
    both its local and its central header."""
    out = bytearray(archive)
    n = name.encode()
    for magic, flag_at, method_at, name_at in ((b"PK\x03\x04", 6, 8, 30), (b"PK\x01\x02", 8, 10, 46)):
        at = out.find(magic)
        while at >= 0:
            if out[at + name_at:at + name_at + len(n)] == n:
                if flags is not None:
                    out[at + flag_at:at + flag_at + 2] = struct.pack("<H", flags)
                if method is not None:
                    out[at + method_at:at + method_at + 2] = struct.pack("<H", method)
            at = out.find(magic, at + 4)
    return bytes(out)


async def test_malformed_archives_are_refused_naming_the_problem(store_system) -> None:
    system = store_system
    pid, _ = await store_state(system)
    m = onnx_model(1.0)
    good = zipfile.ZipFile(io.BytesIO(signed_bundle({"full.onnx": m}, {"full": "full.onnx"})))
    parts = {name: good.read(name) for name in good.namelist()}
    manifest, signature = stored("manifest.json", parts["manifest.json"]), stored("signature.json", parts["signature.json"])
    full = stored("full.onnx", m)
    many = [stored(f"f{i:05}.onnx", b"") for i in range(3000)]  # a central directory of ~150 KiB
    zip64 = raw_zip([manifest, signature, full])
    end = zip64.rfind(b"PK\x05\x06")
    zip64 = zip64[:end] + struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 1) + zip64[end:]
    cases = {
        "nul in a name": (raw_zip([manifest, signature, stored("full.onnx\0.sh", m)]), "NUL byte"),
        "bzip2": (with_flags(raw_zip([manifest, signature, full]), "full.onnx", method=12), "compression method 12"),
        "encrypted": (with_flags(raw_zip([manifest, signature, full]), "full.onnx", flags=1), "is encrypted"),
        "stored, sizes differ": (raw_zip([manifest, signature, ("full.onnx", 0, m, zlib.crc32(m), len(m) + 1)]),
                                 "is stored but declares"),
        "huge directory": (raw_zip([manifest, signature, full, *many]), "central directory is over 65536 bytes"),
        "huge manifest": (raw_zip([stored("manifest.json", b" " * (2 << 20)), signature, full]),
                          "manifest.json declares 2097152 bytes, over the limit of 1048576"),
        "zip64": (zip64, "ZIP64"),
        "no manifest": (raw_zip([signature, full]), "it has no manifest.json"),
        "stored file missing": (raw_zip([manifest, signature]), "full.onnx (missing)"),
    }
    async with system.client() as bus:
        for label, (data, text) in cases.items():
            with pytest.raises(BadMessage) as info:
                await install(bus, data)
            assert text in str(info.value), (label, str(info.value))
        # the same entries, well formed, install
        assert (await install(bus, raw_zip([manifest, signature, full]))).version == "1.0.0"
    assert await store_state(system) == (pid, "ready")
