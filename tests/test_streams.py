"""Stateful streams on a real recurrent model: silero-vad (from the silero-vad wheel) as it
ships, its state ([2, N, 128], batched along axis 1) kept by the scheduler between 32 ms
chunks, its sample rate a parameter fixed per stream.

* each stream's outputs through the bus equal the model run directly with that stream's own
  state carried chunk by chunk, bit for bit, with many streams batched together and each
  given a different signal (no state leaks between streams);
* kill -9 of the driver holding the streams: each gets a reset event and goes on from its
  initial state;
* an idle stream expires; refusals are named.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Iterator

import anyio
import numpy as np
import pytest

from protocols import pack_tensors
from protocols.modelstore import Activate, Install, ModelState
from services import BadMessage, Forbidden, UnknownDestination
from services.scheduler import (
    STREAM_EVENTS, CloseStream, GetSchedule, Infer, InferResult, OpenStream, Schedule, StreamClosed, StreamOpened,
    StreamReset, StreamResult,
)

from conftest import System
from test_inference import config
from helpers.models import pack_real, system_with

CHUNK = 512  # 32 ms at 16 kHz
VAD_SPEC = {"inputs": {"state": {"batch_axis": 1}}, "outputs": {"stateN": {"batch_axis": 1}},
            "states": [{"input": "state", "output": "stateN"}]}


@pytest.fixture(scope="module")
def vad_path(real_model) -> Path:
    return real_model("silero-vad")


@pytest.fixture
def system(vad_path: Path, tmp_path: Path) -> Iterator[System]:
    bundles = {"vad": pack_real(vad_path, tmp_path / "vad.ebm", "vad", VAD_SPEC),
               "plain": pack_real(vad_path, tmp_path / "plain.ebm", "plain", {})}  # no states declared
    intruder = '[services.intruder]\ncapabilities = ["call:scheduler.*"]\n'  # an external peer
    text = config(1, extra=intruder).replace("max_delay_ms = 5,", 'max_delay_ms = 2, batching = "on", max_batch = 32,')
    # the scheduler follows its drivers' readiness (a driver that stops resets its streams at once)
    text = text.replace('"publish:scheduler.*",', '"publish:scheduler.*", "subscribe:kernel.services", "call:kernel.ListServices",')
    with system_with(tmp_path, text, bundles) as s:
        yield s


def signals(n: int, chunks: int, seed: int = 0) -> list[np.ndarray]:
    """A different signal per stream: noise, a tone, silence... at different levels."""
    rng = np.random.default_rng(seed)
    t = np.arange(chunks * CHUNK) / 16000
    out = []
    for i in range(n):
        tone = np.sin(2 * np.pi * (150 + 40 * i) * t) * (0.05 + 0.1 * (i % 3))
        out.append((tone + rng.standard_normal(t.shape) * 0.02 * (i % 4)).astype(np.float32))
    return out


def direct(path: Path, signal_: np.ndarray, reset_at: int | None = None) -> list[np.ndarray]:
    """The model run directly, carrying the stream's state chunk by chunk (from zeros, and
    from zeros again at chunk ``reset_at``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    outs = []
    for i in range(len(signal_) // CHUNK):
        if i == reset_at:
            state = np.zeros((2, 1, 128), np.float32)
        out, state = session.run(None, {"input": signal_[None, i * CHUNK:(i + 1) * CHUNK], "state": state,
                                        "sr": np.array(16000, np.int64)})
        outs.append(out)
    return outs


async def open_stream(bus: Any, model: str = "vad", **kw: Any) -> StreamOpened:
    descs, frames = pack_tensors({"sr": np.array(16000, np.int64)})
    incoming = await bus.request("scheduler", OpenStream(model=model, tensors=descs, **kw), frames=frames)
    return incoming.decode(StreamOpened)


async def chunk(bus: Any, stream: str, samples: np.ndarray) -> tuple[InferResult, dict[str, np.ndarray]]:
    descs, frames = pack_tensors([samples[None]])
    incoming = await bus.request("scheduler", Infer(model="vad", tensors=descs, stream=stream), frames=frames,
                                 timeout=30)
    result = incoming.decode(InferResult)
    return result, {t.name: np.array(incoming.tensor(t)) for t in result.outputs}


def test_streams_batched_together_each_equal_the_model_run_with_its_own_state(system: System, vad_path: Path) -> None:
    n, chunks = 12, 15
    sigs = signals(n, chunks)
    expected = [direct(vad_path, s) for s in sigs]

    async def main() -> tuple[list[list[Any]], Schedule, Any]:
        got: list[list[Any]] = [[] for _ in range(n)]
        async with system.client() as bus:
            opened = [await open_stream(bus) for _ in range(n)]
            assert opened[0].inputs == ["input"] and opened[0].driver == "accel-0"
            assert len({o.stream for o in opened}) == n

            async def feed(i: int) -> None:
                for c in range(chunks):  # as fast as the answers come: chunks of the streams batch together
                    got[i].append(await chunk(bus, opened[i].stream, sigs[i][c * CHUNK:(c + 1) * CHUNK]))

            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(feed, i)
            schedule = await bus.call("scheduler", GetSchedule(), Schedule)
            closed = (await bus.request("scheduler", CloseStream(stream=opened[0].stream))).decode(StreamClosed)
            with pytest.raises(UnknownDestination, match="no stream"):
                await chunk(bus, opened[0].stream, sigs[0][:CHUNK])
        return got, schedule, closed

    got, schedule, closed = anyio.run(main)
    assert closed.chunks == chunks and closed.reason == "closed"
    batches = [r.batch for stream in got for r, _ in stream]
    assert max(batches) > 1, "the streams never shared a batch"
    assert any(m.model == "vad" and m.mean_batch > 1 for m in schedule.models)
    for i in range(n):
        assert [r.seq for r, _ in got[i]] == list(range(1, chunks + 1))
        for c, ((result, outputs), want) in enumerate(zip(got[i], expected[i])):
            assert list(outputs) == ["output"]  # the state stays with the scheduler
            np.testing.assert_array_equal(outputs["output"], want,
                                          err_msg=f"stream {i}, chunk {c} (batch {result.batch})")
    # different signals, different answers: no stream read another's state
    finals = {round(float(got[i][-1][1]["output"][0, 0]), 6) for i in range(n)}
    assert len(finals) > n // 2


def test_killing_the_driver_resets_every_stream_which_goes_on(system: System, vad_path: Path) -> None:
    sigs = signals(3, 8, seed=1)

    async def main() -> tuple[list[list[Any]], list[StreamReset], list[str]]:
        got: list[list[Any]] = [[] for _ in sigs]
        async with system.client() as bus:
            async with bus.subscribe(STREAM_EVENTS) as events:
                opened = [await open_stream(bus) for _ in sigs]
                for c in range(4):
                    for i, s in enumerate(sigs):
                        got[i].append(await chunk(bus, opened[i].stream, s[c * CHUNK:(c + 1) * CHUNK]))
                pid = await _pid(bus, "accel-0")
                os.kill(pid, signal.SIGKILL)
                resets = []
                with anyio.fail_after(20):
                    while len(resets) < len(sigs):
                        incoming = await events.receive()
                        if incoming.type == "StreamReset":
                            resets.append(incoming.decode(StreamReset))
                await system.wait_restarted("accel-0", pid)
                for c in range(4, 8):
                    for i, s in enumerate(sigs):
                        got[i].append(await chunk(bus, opened[i].stream, s[c * CHUNK:(c + 1) * CHUNK]))
        return got, resets, [o.stream for o in opened]

    got, resets, ids = anyio.run(main)
    assert sorted(r.stream for r in resets) == sorted(ids)
    assert all("accel-0" in r.reason and r.seq == 4 for r in resets)
    for i, s in enumerate(sigs):
        expected = direct(vad_path, s, reset_at=4)
        assert got[i][4][0].reset and "accel-0" in got[i][4][0].reset  # the first chunk after says so too
        assert all(not r.reset for r, _ in got[i][5:])
        for c, ((_, outputs), want) in enumerate(zip(got[i], expected)):
            np.testing.assert_array_equal(outputs["output"], want, err_msg=f"stream {i}, chunk {c}")


async def _pid(bus: Any, name: str) -> int:
    from protocols import ListServices, ServiceList

    listing = await bus.call("kernel", ListServices(), ServiceList)
    return next(s.pid for s in listing.services if s.name == name)


def test_a_stream_publishes_its_results_and_expires_when_idle(system: System) -> None:
    sig = signals(1, 2, seed=2)[0]

    async def main() -> tuple[list[StreamResult], StreamClosed]:
        async with system.client() as bus:
            async with bus.subscribe("results.vad.") as results, bus.subscribe(STREAM_EVENTS) as events:
                opened = await open_stream(bus, topic="results.vad.mic-1", idle_s=1.0)
                for c in range(2):
                    await chunk(bus, opened.stream, sig[c * CHUNK:(c + 1) * CHUNK])
                published = []
                with anyio.fail_after(10):
                    while len(published) < 2:
                        incoming = await results.receive()
                        if incoming.type == "StreamResult":
                            published.append(incoming.decode(StreamResult))
                    while True:  # no chunk for a second: closed
                        incoming = await events.receive()
                        if incoming.type == "StreamClosed":
                            closed = incoming.decode(StreamClosed)
                            break
                with pytest.raises(UnknownDestination):
                    await chunk(bus, opened.stream, sig[:CHUNK])
        return published, closed

    published, closed = anyio.run(main)
    assert [p.seq for p in published] == [1, 2] and [t.name for t in published[0].outputs] == ["output"]
    assert closed.reason == "idle" and closed.chunks == 2


def test_stream_requests_that_cannot_be_served_are_refused_with_the_reason(system: System) -> None:
    async def main() -> list[str]:
        errors = []
        async with system.client() as bus:
            with pytest.raises(BadMessage) as info:
                await open_stream(bus, model="plain")  # no states declared
            errors.append(str(info.value))
            with pytest.raises(BadMessage) as info:
                await bus.request("scheduler", OpenStream(model="vad"))  # its parameter sr is missing
            errors.append(str(info.value))
            with pytest.raises(BadMessage) as info:
                await open_stream(bus, topic="alerts.x")
            errors.append(str(info.value))
            opened = await open_stream(bus)
            descs, frames = pack_tensors({"input": np.zeros((1, CHUNK), np.float32),
                                          "state": np.zeros((2, 1, 128), np.float32)})
            with pytest.raises(BadMessage) as info:
                await bus.request("scheduler", Infer(model="vad", tensors=descs, stream=opened.stream), frames=frames)
            errors.append(str(info.value))
            with pytest.raises(BadMessage) as info:
                await chunk(bus, opened.stream, np.zeros(CHUNK, np.float64))
            errors.append(str(info.value))
        async with system.client("intruder") as other:
            with pytest.raises(Forbidden, match="belongs to"):
                await chunk(other, opened.stream, np.zeros(CHUNK, np.float32))
        return errors

    plain, missing, topic, state, dtype = anyio.run(main)
    assert "declares no states" in plain
    assert "missing parameter(s) 'sr'" in missing
    assert "results." in topic
    assert "'state' is the stream's own" in state
    assert "input 'input' takes float32" in dtype


def test_a_microphone_replayed_from_a_wav_feeds_a_stream_pipeline(vad_path: Path, tmp_path: Path) -> None:
    """drivers.sensors replays a .wav in 32 ms frames at its real rate on sensor.mic; the
    scheduler's stream pipeline feeds them, in order, as the chunks of one stream of the
    voice-activity model and publishes each score: the scores are the model's, run directly
    over the same recording with its state carried."""
    import wave

    sig = signals(3, 12, seed=4)[2]
    with wave.open(str(tmp_path / "mic.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(sig, -1, 1) * 32767).astype("<i2").tobytes())
    pcm = np.frombuffer((np.clip(sig, -1, 1) * 32767).astype("<i2").tobytes(), "<i2").astype(np.float32) / 32768
    expected = [float(o[0, 0]) for o in direct(vad_path, pcm)]
    bundle = pack_real(vad_path, tmp_path / "vad.ebm", "vad", VAD_SPEC)
    text = config(1, extra=f"""
[services.mic]
command = ["{{python}}", "-m", "drivers.sensors"]
capabilities = ["publish:sensor.*"]
settings = {{ kind = "replay", file = "{tmp_path / 'mic.wav'}", frame = {CHUNK}, loop = true }}
""", settings=', pipelines = [{ source = "sensor.mic", model = "vad", stream = true, parameters = { sr = 16000 }, '
              'rate = 100, on = 0.5, off = 0.3 }]')
    assert "sensor.mic" in text
    s = System(tmp_path, text)
    try:
        s.wait_bus()

        async def main() -> list[Any]:
            from services.scheduler import Detection

            await s.wait_ready("security", "modelstore", "scheduler", "accel-0")
            async with s.client() as bus:
                async with bus.subscribe("results.vad") as results:
                    await bus.request("modelstore", Install(), frames=[bundle], timeout=120)
                    await bus.call("modelstore", Activate(name="vad", version="1.0.0"), ModelState)
                    got: list[Any] = []
                    with anyio.fail_after(30):
                        while len(got) < 6:
                            got.append((await results.receive()).decode(Detection))
            return got

        got = anyio.run(main)
    finally:
        s.kill()
    # the pipeline opened its stream at the first frame it could run: from there, chunk by chunk
    first = got[0].seq
    assert [d.seq for d in got] == list(range(first, first + 6))
    offset = first % 12  # replay's seq counts from 0, and the recording loops
    direct_from = [float(o[0, 0]) for o in direct(vad_path, np.tile(pcm, 2)[offset * CHUNK:])]
    assert [d.score for d in got] == pytest.approx(direct_from[:6], abs=0), (offset, expected[:8])


def test_a_chunk_is_checked_as_any_request_is(vad_path: Path, tmp_path: Path) -> None:
    """A stream's chunk goes through the model contract's one check (Plan.check): an empty
    chunk and a chunk with NaN are refused naming the stream."""
    from services.scheduler._contract import Plan
    from services.scheduler._streams import Streams

    from protocols.modelstore import Manifest

    from services.modelstore import Bundle

    pack_real(vad_path, tmp_path / "vad.ebm", "vad", VAD_SPEC)
    manifest = Bundle.load(tmp_path / "vad.ebm").manifest
    assert isinstance(manifest, Manifest)
    plan = Plan.of("vad", manifest)
    descs, _ = pack_tensors({"sr": np.array(16000, np.int64)})
    stream = Streams(4, 60).create("vad", "1.0.0", manifest, plan, "me", descs, [np.array(16000, np.int64)],
                                   None, "", (), 0.0)
    with pytest.raises(BadMessage, match=rf"vad \(stream {stream.id}\): inputs disagree on the batch size: "
                                         r"'input' has 0 on axis 0, 'state' has 1"):
        stream.bind([], [np.zeros((0, CHUNK), np.float32)])
    with pytest.raises(BadMessage, match="input 'input' contains NaN"):
        stream.bind([], [np.full((1, CHUNK), np.nan, np.float32)])
    bound = stream.bind([], [np.zeros((1, CHUNK), np.float32)])
    assert list(bound) == ["input", "state", "sr"] and bound["state"].shape == (2, 1, 128)
