"""The inference path: scheduler, accelerator drivers, health driver, real ONNX Runtime."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence
import signal
import time

import anyio
import msgspec
import numpy as np
import onnxruntime as ort
import pytest

from drivers.health import Simulate, Simulated
from protocols import ListServices, ServiceList, pack_tensors
from services import BadMessage, DeadlineExceeded, UnknownDestination
from services.modelstore import Bundle, Manifest
from protocols.modelstore import Activate, Install, ModelState
from services.scheduler import Degradation, GetSchedule, Infer, InferResult, Schedule

from conftest import System
from test_modelstore import KEY, config as store_config

pytestmark = pytest.mark.anyio

W_FULL = np.arange(16, dtype=np.float32).reshape(4, 4) / 10
W_SMALL = np.eye(4, dtype=np.float32)


def matmul(w: np.ndarray) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
                              [numpy_helper.from_array(w, "w")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def mm_bundle() -> bytes:
    manifest = msgspec.convert({
        "name": "mm", "version": "1.0.0", "created": 1.0,
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 4]}],
        "variants": {"full": {"file": "full.onnx", "sha256": "", "size": 0},
                     "small": {"file": "small.onnx", "sha256": "", "size": 0}},
        "fallback": {"feature": "a", "threshold": 0.5, "above": 1.0, "below": 0.0},
        "reference": {n: {"mean": 0.5, "std": 0.3} for n in "abcd"},
    }, Manifest)
    b = Bundle.create(manifest, {"full.onnx": matmul(W_FULL), "small.onnx": matmul(W_SMALL)})
    b.sign(KEY)
    return b.to_bytes()


def config(drivers: int = 1, extra: str = "", health: Sequence[str] = (), inline: str = "off",
           settings: str = "") -> str:
    """``health``: each driver's health source (default: the one health driver).  The tests
    of placement keep every model on the drivers (``inline``: the scheduler's own lane)."""
    names = ", ".join(f'{{ name = "accel-{i}"' + (f', health = "{health[i]}"' if health else "") + " }"
                      for i in range(drivers))
    accel = "".join(f"""
[services.accel-{i}]
command = ["{{python}}", "-m", "drivers.accel"]
requires = ["modelstore"]
capabilities = ["call:modelstore.GetModel"]
settings = {{ threads = 1 }}
backoff_initial = 0.05
max_restarts = 20
""" for i in range(drivers))
    return store_config() + accel + f"""
[services.health]
command = ["{{python}}", "-m", "drivers.health"]
capabilities = ["publish:health.*"]
settings = {{ simulated = true, interval = 0.2 }}

[services.scheduler]
command = ["{{python}}", "-m", "services.scheduler"]
requires = ["modelstore"]
capabilities = ["call:modelstore.*", "call:accel-*", "subscribe:modelstore.*", "subscribe:health.*",
                "subscribe:sensor.*", "publish:scheduler.*", "publish:alerts.*", "publish:results.*"]
settings = {{ drivers = [{names}], step_s = 0.2, max_delay_ms = 5, health_report_s = 60, inline = "{inline}"{settings} }}
{extra}"""


async def boot(make_system, drivers: int = 1, inline: str = "off") -> System:
    system: System = make_system(config(drivers, inline=inline))
    names = ["security", "modelstore", "scheduler", "health", *(f"accel-{i}" for i in range(drivers))]
    await system.wait_ready(*names)
    async with system.client() as bus:
        await bus.request("modelstore", Install(), frames=[mm_bundle()], timeout=60)
        await bus.call("modelstore", Activate(name="mm", version="1.0.0"), ModelState)
    return system


async def infer(bus, x: np.ndarray, *, priority: int = 1, timeout: float = 10, model: str = "mm") -> tuple[InferResult, np.ndarray]:
    descs, frames = pack_tensors([x])
    incoming = await bus.request("scheduler", Infer(model=model, tensors=descs, priority=priority),
                                 frames=frames, timeout=timeout)
    result = incoming.decode(InferResult)
    return result, incoming.tensor(result.outputs[0])


async def test_outputs_equal_direct_onnx_runtime_and_requests_are_batched(make_system) -> None:
    system = await boot(make_system)
    session = ort.InferenceSession(matmul(W_FULL), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    inputs = [rng.random((int(rng.integers(1, 4)), 4), dtype=np.float32) for _ in range(64)]
    results: list = [None] * len(inputs)
    async with system.client() as bus:
        async with anyio.create_task_group() as tg:
            async def one(i: int) -> None:
                results[i] = await infer(bus, inputs[i])
            for i in range(len(inputs)):
                tg.start_soon(one, i)
        for x, (result, y) in zip(inputs, results):
            assert result.variant == "full" and result.version == "1.0.0"
            np.testing.assert_allclose(y, session.run(None, {"x": x})[0], rtol=1e-6)
        schedule = await bus.call("scheduler", GetSchedule(), Schedule)
    assert schedule.models[0].served == 64 and schedule.models[0].mean_batch > 1


async def test_bad_inputs_get_clear_errors_and_the_scheduler_keeps_serving(make_system) -> None:
    system = await boot(make_system)
    async with system.client() as bus:
        with pytest.raises(BadMessage, match="float32"):
            await infer(bus, np.zeros((2, 4), dtype=np.float64))
        with pytest.raises(BadMessage, match=r"input 'x' takes float32 \[\?, 4\], got float32 \[2, 5\] \(axis 1 is 5"):
            await infer(bus, np.zeros((2, 5), dtype=np.float32))
        with pytest.raises(BadMessage, match="NaN"):
            await infer(bus, np.array([[np.nan, 0, 0, 0]], dtype=np.float32))
        with pytest.raises(UnknownDestination, match="nosuch"):
            await infer(bus, np.zeros((1, 4), dtype=np.float32), model="nosuch")
        result, y = await infer(bus, np.ones((1, 4), dtype=np.float32))
        np.testing.assert_allclose(y, np.ones((1, 4), dtype=np.float32) @ W_FULL, rtol=1e-6)


async def test_an_expired_request_is_never_run(make_system) -> None:
    system = await boot(make_system)
    system.busctl("stop", "accel-0", check=True)  # nothing can be computed for now
    x = np.ones((1, 4), dtype=np.float32)
    outcomes: list[str] = []
    async with system.client() as bus:
        async def one(timeout: float) -> None:
            try:
                await infer(bus, x, timeout=timeout)
                outcomes.append("ok")
            except DeadlineExceeded:
                outcomes.append("timeout")

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 2.0)  # holds the only driver slot, waiting for a driver
            await anyio.sleep(0.1)
            for _ in range(5):
                tg.start_soon(one, 0.3)  # queued behind it; their deadlines pass in the queue
            await anyio.sleep(0.6)
            system.busctl("start", "accel-0", check=True)
        _, y = await infer(bus, x)  # and the scheduler serves again
        schedule = await bus.call("scheduler", GetSchedule(), Schedule)
    assert outcomes.count("timeout") >= 5
    q = schedule.models[0]
    assert q.expired >= 5  # answered from the queue
    assert q.served == 1 + outcomes.count("ok")  # none of the expired ones was computed


async def test_high_priority_p95_stays_below_low_priority_p95_under_saturation(make_system) -> None:
    system = await boot(make_system)
    latencies: dict[int, list[float]] = {0: [], 2: []}
    async with system.client() as bus:
        x = np.ones((1, 4), dtype=np.float32)

        async def one(priority: int) -> None:
            started = time.monotonic()
            await infer(bus, x, priority=priority, timeout=60)
            latencies[priority].append(time.monotonic() - started)

        async with anyio.create_task_group() as tg:
            for i in range(400):
                tg.start_soon(one, 0 if i % 5 == 0 else 2)
    p95 = {p: float(np.percentile(v, 95)) for p, v in latencies.items()}
    assert p95[0] < p95[2], p95


async def test_kill_9_of_a_driver_under_load_loses_no_request(make_system) -> None:
    system = await boot(make_system, drivers=2)
    outcomes: list[str] = []
    async with system.client() as bus:
        st = await bus.call("kernel", ListServices(), ServiceList)
        victim = next(s.pid for s in st.services if s.name == "accel-0")
        x = np.ones((1, 4), dtype=np.float32)

        async def one() -> None:
            try:
                await infer(bus, x, timeout=15)
                outcomes.append("ok")
            except Exception as exc:
                outcomes.append(type(exc).__name__)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(300):
                    tg.start_soon(one)
                    if i == 100:
                        os.kill(victim, signal.SIGKILL)
                    await anyio.sleep(0.002)
    assert len(outcomes) == 300  # every client got a reply or an error
    assert outcomes.count("ok") >= 290, {o: outcomes.count(o) for o in set(outcomes)}


async def test_heat_moves_down_the_ladder_and_back_up(make_system) -> None:
    system = await boot(make_system)
    x = np.array([[0.9, 0.1, 0.1, 0.1]], dtype=np.float32)
    async with system.client() as bus:
        sub = await bus.subscribe("scheduler.degradation")
        await bus.call("health", Simulate(temperature_c=95.0), Simulated)
        levels = []
        with anyio.fail_after(15):
            while 2 not in levels:
                levels.append((await sub.receive()).decode(Degradation).level)
        result, y = await infer(bus, x)
        assert result.variant == "fallback" and result.level == 2 and y.tolist() == [[1.0]]
        await bus.call("health", Simulate(temperature_c=40.0), Simulated)
        with anyio.fail_after(15):
            while levels[-1] != 0:
                levels.append((await sub.receive()).decode(Degradation).level)
        assert levels == [1, 2, 1, 0]
        result, y = await infer(bus, x)
        assert result.variant == "full"


async def test_a_hot_driver_gets_no_batch_while_a_cool_one_is_up(make_system) -> None:
    # accel-0 is watched by "health", accel-1 by "health-1" (a second health driver)
    base = config(2, health=["health", "health-1"])
    second = base[base.index("[services.health]"):base.index("[services.scheduler]")]
    system: System = make_system(base + second.replace("[services.health]", "[services.health-1]"))
    await system.wait_ready("security", "modelstore", "scheduler", "health", "health-1", "accel-0", "accel-1")
    async with system.client() as bus:
        await bus.request("modelstore", Install(), frames=[mm_bundle()], timeout=60)
        await bus.call("modelstore", Activate(name="mm", version="1.0.0"), ModelState)
        readings = await bus.subscribe("health.")
        await bus.call("health", Simulate(temperature_c=95.0), Simulated)
        await bus.call("health-1", Simulate(temperature_c=40.0), Simulated)
        with anyio.fail_after(10):  # until the scheduler has both readings
            while True:
                temps = {d.name: d.temperature_c for d in (await bus.call("scheduler", GetSchedule(), Schedule)).drivers}
                if temps == {"accel-0": 95.0, "accel-1": 40.0}:
                    break
                await readings.receive()
        x = np.ones((1, 4), dtype=np.float32)
        results: list[InferResult] = []

        async def one() -> None:
            results.append((await infer(bus, x))[0])

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(one)
        schedule = await bus.call("scheduler", GetSchedule(), Schedule)
    assert {r.driver for r in results} == {"accel-1"}  # the hot one was avoided, though idle
    assert {r.variant for r in results} == {"full"} and schedule.level == 0  # a cool driver: no pressure
    assert {d.name: d.batches for d in schedule.drivers}["accel-0"] == 0


async def test_replay_and_camera_sensors_publish_their_frames(make_system, tmp_path: Path) -> None:
    from PIL import Image

    from drivers.sensors import SensorFrame

    recording = np.random.default_rng(3).standard_normal((3, 16)).astype(np.float32)
    np.save(tmp_path / "rec.npy", recording)
    (tmp_path / "images").mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        Image.new("RGB", (8, 6), colour).save(tmp_path / "images" / f"{i}.png")
    system: System = make_system(f"""
[services.replay]
command = ["{{python}}", "-m", "drivers.sensors"]
capabilities = ["publish:sensor.*"]
settings = {{ kind = "replay", file = "{tmp_path / 'rec.npy'}", fast = true, loop = true }}
[services.camera]
command = ["{{python}}", "-m", "drivers.sensors"]
capabilities = ["publish:sensor.*"]
settings = {{ kind = "camera", folder = "../images", rate = 50 }}
""")
    colours = [[255, 0, 0], [0, 255, 0]]
    async with system.client() as bus:
        # One subscription per sensor: the fast replay filling its own queue cannot crowd
        # camera frames out of theirs.
        async with bus.subscribe("sensor.replay") as replay, bus.subscribe("sensor.camera") as camera:

            async def collect(sub, n: int) -> list:
                out = []
                while len(out) < n:
                    incoming = await sub.receive()
                    frame = incoming.decode(SensorFrame)
                    out.append((frame.seq, np.array(incoming.tensor(frame.tensor))))
                return out

            with anyio.fail_after(20):
                replayed = await collect(replay, 6)
                shot = await collect(camera, 2)
    seqs = [s for s, _ in replayed]
    assert seqs == list(range(seqs[0], seqs[0] + 6))  # in order, none lost in between
    for seq, data in replayed:  # frame seq is row seq % 3 of the recording, looping
        np.testing.assert_array_equal(data, recording[seq % 3])
    assert shot[1][0] == shot[0][0] + 1
    for seq, data in shot:  # the images in name order, looping
        assert data.shape == (6, 8, 3) and data.dtype == np.uint8
        assert data[0, 0].tolist() == colours[seq % 2]


async def test_busctl_infer_and_sched(make_system, tmp_path: Path) -> None:
    system = await boot(make_system)
    np.save(tmp_path / "x.npy", np.ones((2, 4), dtype=np.float32))
    out = msgspec.json.decode(system.busctl("infer", "mm", "--input", str(tmp_path / "x.npy"), "--json",
                                            check=True).stdout)
    np.testing.assert_allclose(np.array(out["outputs"]["y"]["values"]), np.ones((2, 4), dtype=np.float32) @ W_FULL, rtol=1e-6)
    assert out["variant"] == "full" and out["version"] == "1.0.0"
    text = system.busctl("sched", check=True).stdout
    assert "degradation level 0" in text and "accel-0" in text and "mm" in text
    bad = system.busctl("infer", "mm", "--input", str(tmp_path / "missing.npy"))
    assert bad.returncode == 2 and "cannot read" in bad.stderr


def test_sensor_settings_are_a_tagged_union_on_kind(tmp_path: Path) -> None:
    from drivers.sensors import CameraSettings, ReplaySettings, SensorSettings, VibrationSettings
    from services import SettingsError, decode_settings

    assert decode_settings({"kind": "vibration", "fault_at": 20}, SensorSettings, base=tmp_path) == \
        VibrationSettings(fault_at=20.0)
    replay = decode_settings({"kind": "replay", "file": "rec/a.wav", "loop": True}, SensorSettings, base=tmp_path)
    assert replay == ReplaySettings(file=tmp_path / "rec/a.wav", loop=True)  # relative: from the config's directory
    assert decode_settings({"kind": "camera", "folder": "/abs"}, SensorSettings, base=tmp_path) == \
        CameraSettings(folder=Path("/abs"))
    for raw, key in [({"kind": "vibraton"}, "settings.kind"), ({"rate": 5}, "settings"),
                     ({"kind": "camera", "folder": "x", "fast": True}, "settings.fast"),
                     ({"kind": "vibration", "rate": 0}, "settings.rate")]:
        with pytest.raises(SettingsError) as info:
            decode_settings(raw, SensorSettings, base=tmp_path, service="cam")
        assert info.value.key == key, (raw, info.value)


# -- the inline lane: models of microseconds run in the scheduler's own process ----------------------

async def test_a_tiny_model_moves_inline_and_answers_the_same_bits(make_system) -> None:
    """auto: after a few runs measured on the (CPU) driver, the 4x4 MatMul runs in the
    scheduler; its answers are bit-equal to the driver's and to direct ONNX Runtime, and it
    goes on answering while its driver is stopped."""
    system = await boot(make_system, inline="auto")
    session = ort.InferenceSession(matmul(W_FULL), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).random((1, 4), dtype=np.float32)
    expected = session.run(None, {"x": x})[0]
    async with system.client() as bus:
        where = []
        with anyio.fail_after(60):
            while not where or where[-1] != "scheduler":
                result, y = await infer(bus, x)
                where.append(result.driver)
                assert np.array_equal(y, expected), result.driver
        assert where[0] == "accel-0"  # measured there first
        schedule = await bus.call("scheduler", GetSchedule(), Schedule)
        assert schedule.models[0].inline
        row = next(line for line in system.busctl("sched", check=True).stdout.splitlines() if line.startswith("mm"))
        assert " inline " in row, row
        system.busctl("stop", "accel-0", check=True)
        for _ in range(5):
            result, y = await infer(bus, x)
            assert result.driver == "scheduler" and np.array_equal(y, expected)
        with pytest.raises(BadMessage, match="float32"):  # the contract still checks first
            await infer(bus, np.zeros((1, 4), dtype=np.float64))


async def test_inline_off_for_one_model_keeps_it_on_its_driver(make_system) -> None:
    system: System = make_system(config(1, inline="on", settings=', models = { mm = { inline = "off" } }'))
    await system.wait_ready("security", "modelstore", "scheduler", "health", "accel-0")
    async with system.client() as bus:
        await bus.request("modelstore", Install(), frames=[mm_bundle()], timeout=60)
        await bus.call("modelstore", Activate(name="mm", version="1.0.0"), ModelState)
        drivers = {(await infer(bus, np.ones((1, 4), dtype=np.float32)))[0].driver for _ in range(40)}
    assert drivers == {"accel-0"}


def test_the_inline_decision() -> None:
    from services.scheduler import decide_inline

    assert decide_inline("off", 1e-5, 0.3, True, False) is False
    assert decide_inline("on", None, 0.3, False, False) is True  # on: whatever was measured
    assert decide_inline("auto", None, 0.3, True, False) is False  # not measured yet
    assert decide_inline("auto", 1e-4, 0.3, False, False) is False  # a GPU driver keeps its models
    assert decide_inline("auto", 2e-4, 0.3, True, False) is True
    assert decide_inline("auto", 4e-4, 0.3, True, False) is False  # too slow to go inline...
    assert decide_inline("auto", 4e-4, 0.3, True, True) is True  # ...but not to leave it (hysteresis)
    assert decide_inline("auto", 7e-4, 0.3, True, True) is False


def test_a_runner_measures_its_own_cpu_not_its_waits_for_the_gil() -> None:
    """Whether a model runs on an event loop follows ModelRunner.cpu_s: a run in a worker
    thread beside a thread that holds the GIL takes long on the clock (``last_s``) but not
    on the CPU, and one slow run does not move the median of the last five."""
    import threading

    from drivers.ops import ModelRunner

    manifest = msgspec.convert({"name": "mm", "version": "1.0.0", "created": 1.0,
                                "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
                                "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 4]}],
                                "variants": {"full": {"file": "full.onnx", "sha256": "", "size": 0}}}, Manifest)
    runner = ModelRunner(matmul(W_FULL), manifest, {}, ["CPUExecutionProvider"], threads=1)
    x = {"x": np.ones((1, 4), dtype=np.float32)}
    for _ in range(5):
        runner.run(x)
    assert runner.quick and 0 < runner.cpu_s < 0.5e-3

    stop = threading.Event()

    def hold_the_gil() -> None:  # pure Python: gives the GIL up only every switch interval
        while not stop.is_set():
            sum(range(10_000))

    busy = threading.Thread(target=hold_the_gil)
    busy.start()
    try:
        waited = []
        for _ in range(20):
            thread = threading.Thread(target=lambda: (runner.run(x), waited.append((runner.last_s, runner.cpu_s))))
            thread.start()
            thread.join()
    finally:
        stop.set()
        busy.join()
    assert max(last for last, _ in waited) > 2e-3  # it waited for the GIL (switch interval: 5 ms)...
    assert runner.quick and runner.cpu_s < 0.5e-3  # ...which is no work an event loop would do
    assert all(cpu < 0.5e-3 for _, cpu in waited)


async def test_a_run_that_gives_nan_counts_as_an_error_in_the_metrics(make_system) -> None:
    """The scheduler counts requests its model's run failed (here: NaN out of log(-1)) in
    edgebus_inference_errors_total, which a fleet device reports (ModelReport.errors)."""
    from onnx import TensorProto, helper

    from protocols.telemetry import MetricsSnapshot

    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "log",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    manifest = msgspec.convert({"name": "log", "version": "1.0.0", "created": 1.0,
                                "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
                                "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 4]}],
                                "variants": {"full": {"file": "full.onnx", "sha256": "", "size": 0}}}, Manifest)
    bundle = Bundle.create(manifest, {"full.onnx": m.SerializeToString()})
    bundle.sign(KEY)
    system: System = make_system(config(1), env={"EDGEBUS_METRICS_INTERVAL": "0.2"})
    await system.wait_ready("security", "modelstore", "scheduler", "health", "accel-0")
    async with system.client() as bus:
        await bus.request("modelstore", Install(), frames=[bundle.to_bytes()], timeout=60)
        await bus.call("modelstore", Activate(name="log", version="1.0.0"), ModelState)
        async with bus.subscribe("metrics.scheduler") as sub:
            await infer(bus, np.ones((1, 4), dtype=np.float32), model="log")
            for _ in range(2):
                with pytest.raises(BadMessage, match="NaN|undefined"):
                    await infer(bus, -np.ones((1, 4), dtype=np.float32), model="log")
            with anyio.fail_after(20):
                while True:
                    snap = (await sub.receive()).decode(MetricsSnapshot)
                    errors = [x.value for f in snap.families if f.name == "edgebus_inference_errors_total"
                              for x in f.samples if x.labels.get("model") == "log"]
                    if errors:
                        break
    assert errors == [2.0]


def test_the_inline_lane_closes_runners_of_versions_removed() -> None:
    from services.scheduler._inline import InlineLane

    lane = InlineLane(None, None, [])
    lane._runners.update({("a", "1.0.0", "full"): "runner a1", ("a", "2.0.0", "full"): "runner a2",
                          ("b", "1.0.0", "full"): "runner b1"})
    lane._refused = {("a", "1.0.0", "int8"), ("c", "1.0.0", "full")}
    lane.retain({"a": ["2.0.0", "1.0.0"], "b": []})
    assert list(lane._runners) == [("a", "1.0.0", "full"), ("a", "2.0.0", "full")]
    assert lane._refused == {("a", "1.0.0", "int8")}
