"""Shared-memory tensors (protocols.shm, PROTOCOL.md 11.9): a client's region mapped with the
scheduler, images read where the client wrote them, outputs written where it asked; each
client's regions its own, bounded, every bad reference a clear bad-message."""

from __future__ import annotations

import os

import anyio
import msgspec
import numpy as np
import onnxruntime as ort
import pytest

from protocols import Tensor, pack_tensors
from protocols.modelstore import Activate, Install, ModelState
from protocols.scheduler import Infer, InferResult, MapRegion, RegionMapped
from protocols.shm import SHM_DIR, create_region
from services import BadMessage, Overloaded, SharedRegion
from services.modelstore import Bundle, Manifest

from conftest import System
from tools._benchkit import channel_mean_onnx
from test_inference import config
from test_modelstore import KEY

pytestmark = pytest.mark.anyio

OUT = 4 << 20  # outputs from 4 MiB on


def _bundle() -> bytes:
    manifest = msgspec.convert({
        "name": "mean", "version": "1.0.0", "created": 1.0,
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 3, None, None]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 1, None, None]}],
        "variants": {"full": {"file": "full.onnx", "sha256": "", "size": 0}},
    }, Manifest)
    b = Bundle.create(manifest, {"full.onnx": channel_mean_onnx()})
    b.sign(KEY)
    return b.to_bytes()


#: a second client of the scheduler (an external service: it connects on its own)
OTHER = """
[services.other]
capabilities = ["call:scheduler.*"]
"""


async def _system(make_system, inline: str = "off", settings: str = "") -> System:
    system: System = make_system(config(1, inline=inline, settings=settings, extra=OTHER))
    await system.wait_ready("security", "modelstore", "scheduler", "health", "accel-0")
    async with system.client() as bus:
        await bus.request("modelstore", Install(), frames=[_bundle()], timeout=60)
        await bus.call("modelstore", Activate(name="mean", version="1.0.0"), ModelState)
    return system


def _leftovers() -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"edgebus-{os.getpid()}-*")}


@pytest.mark.parametrize("inline", ["off", "on"])
async def test_an_image_in_a_region_gives_the_same_bits_as_frames(make_system, inline: str) -> None:
    """Through the driver (inline off) the region's names travel to it; inline, the scheduler
    reads it; either way the outputs land in the client's region, equal to the socket path
    and to direct ONNX Runtime."""
    system = await _system(make_system, inline)
    session = ort.InferenceSession(channel_mean_onnx(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    image = rng.random((1, 3, 320, 320), dtype=np.float32)
    expected = session.run(None, {"x": image})[0]
    async with system.client() as bus:
        descs, frames = pack_tensors({"x": image})
        by_frames = await bus.request("scheduler", Infer(model="mean", tensors=descs), frames=frames)
        frame_y = by_frames.tensor(by_frames.decode(InferResult).outputs[0])
        async with SharedRegion(bus, 8 << 20) as region:
            x = region.array(image.shape, np.float32)
            x[...] = image
            for _ in range(3):  # (the second and later runs: the driver's region already open)
                incoming = await bus.request("scheduler", Infer(model="mean", tensors=region.describe({"x": x}),
                                                                out_region=region.name, out_offset=OUT))
                result = incoming.decode(InferResult)
                assert not incoming.frames and result.outputs[0].region == region.name
                assert result.outputs[0].offset == OUT
                y = region.tensor(result.outputs[0], incoming)
                assert np.array_equal(y, expected) and np.array_equal(y, frame_y)
            # the region's inputs, the outputs as frames (no out_region)
            incoming = await bus.request("scheduler", Infer(model="mean", tensors=region.put({"x": image + 1}, offset=2 << 20)))
            result = incoming.decode(InferResult)
            assert len(incoming.frames) == 1
            assert np.array_equal(region.tensor(result.outputs[0], incoming), session.run(None, {"x": image + 1})[0])
            # outputs that do not fit from the offset asked: frames, not a truncated write
            incoming = await bus.request("scheduler", Infer(model="mean", tensors=region.describe({"x": x}),
                                                            out_region=region.name, out_offset=(8 << 20) - 1024))
            result = incoming.decode(InferResult)
            assert not result.outputs[0].region
            assert np.array_equal(region.tensor(result.outputs[0], incoming), expected)
    assert not _leftovers()  # unlinked on leaving


async def test_bad_region_references_are_refused_by_name(make_system) -> None:
    system = await _system(make_system, settings=", max_regions = 2, max_region_mb = 16")
    async with system.client() as bus:
        x = Tensor(dtype="float32", shape=[1, 3, 8, 8], region="edgebus-nosuch-1")
        with pytest.raises(BadMessage, match="'edgebus-nosuch-1' is not mapped"):
            await bus.request("scheduler", Infer(model="mean", tensors=[x]))
        with pytest.raises(BadMessage, match="does not exist"):
            await bus.call("scheduler", MapRegion(name="edgebus-nosuch-1", size=4096), RegionMapped)
        with pytest.raises(BadMessage, match="is not 'edgebus-'"):
            await bus.call("scheduler", MapRegion(name="../etc/passwd", size=4096), RegionMapped)
        wrong = create_region(f"edgebus-{os.getpid()}-wrong", 8192)
        try:
            with pytest.raises(BadMessage, match="holds 8192 bytes, not the 4096 said"):
                await bus.call("scheduler", MapRegion(name=f"edgebus-{os.getpid()}-wrong", size=4096), RegionMapped)
        finally:
            wrong.close()
            (SHM_DIR / f"edgebus-{os.getpid()}-wrong").unlink()
        link = SHM_DIR / f"edgebus-{os.getpid()}-link"
        link.symlink_to("/etc/hostname")
        try:
            with pytest.raises(BadMessage, match="cannot be opened"):
                await bus.call("scheduler", MapRegion(name=link.name, size=4096), RegionMapped)
        finally:
            link.unlink()
        async with SharedRegion(bus, 1 << 20) as region:
            with pytest.raises(BadMessage, match="past its"):  # bounds: past the region's end
                await bus.request("scheduler", Infer(model="mean", tensors=[
                    Tensor(dtype="float32", shape=[1, 3, 320, 320], region=region.name)]))
            with pytest.raises(BadMessage, match="not a multiple of 4"):
                await bus.request("scheduler", Infer(model="mean", tensors=[
                    Tensor(dtype="float32", shape=[1, 3, 8, 8], region=region.name, offset=2)]))
            with pytest.raises(BadMessage, match="not mapped"):  # out_region must be mapped too
                await bus.request("scheduler", Infer(model="mean", tensors=region.put(
                    {"x": np.zeros((1, 3, 8, 8), np.float32)}), out_region="edgebus-other-1"))
            with pytest.raises(BadMessage, match="is mapped with 1048576 bytes, not 4096"):
                await bus.call("scheduler", MapRegion(name=region.name, size=4096), RegionMapped)
            # bounded per client: regions and bytes
            async with SharedRegion(bus, 1 << 20):
                with pytest.raises(Overloaded, match="2 regions mapped"):
                    async with SharedRegion(bus, 1 << 20):
                        pass
            with pytest.raises(Overloaded, match="may hold 16777216"):
                async with SharedRegion(bus, 16 << 20):
                    pass
            # another client cannot name this one's region
            async with system.client("other") as other:
                with pytest.raises(BadMessage, match=f"{region.name}' is not mapped for"):
                    await other.request("scheduler", Infer(model="mean", tensors=region.put(
                        {"x": np.zeros((1, 3, 8, 8), np.float32)})))
            # the scheduler keeps serving
            out = await bus.request("scheduler", Infer(model="mean", tensors=region.put(
                {"x": np.ones((1, 3, 8, 8), np.float32)})))
            assert np.array_equal(region.tensor(out.decode(InferResult).outputs[0], out), np.ones((1, 1, 8, 8)))
    assert not _leftovers()


async def test_a_region_created_again_under_its_name_is_refused_at_the_driver(make_system) -> None:
    """The driver opens a region by the name the scheduler gives, checked against the file
    the scheduler mapped: a file put in its place under that name is not read."""
    system = await _system(make_system)
    async with system.client() as bus:
        async with SharedRegion(bus, 1 << 20) as region:
            x = region.put({"x": np.ones((1, 3, 8, 8), np.float32)})
            os.unlink(SHM_DIR / region.name)  # before the driver ever opened it
            impostor = create_region(region.name, 1 << 20)  # another file, same name and size
            try:
                with pytest.raises(BadMessage, match="another file than the one mapped"):
                    with anyio.fail_after(20):
                        await bus.request("scheduler", Infer(model="mean", tensors=x))
            finally:
                impostor.close()
    assert not _leftovers()
