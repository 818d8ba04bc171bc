"""Drift detection: the false-alarm rate without a shift, and detection of a shift."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from drivers.sensors import VibrationSimulator
from services.telemetry._drift import DriftAlarm, DriftDetector, ks_pvalue, psi
import pytest

from tools.build_demo_models import FEATURES, features, reference

pytestmark = pytest.mark.anyio


def _reference(seed: int = 0, n: int = 2000) -> dict:
    sim = VibrationSimulator(seed=seed)
    return reference(features(np.stack([sim.frame() for _ in range(n)])))


def test_psi_and_ks_basics() -> None:
    q = np.full(10, 0.1)
    assert psi(q, q) == 0.0
    assert psi(q, np.array([0.5] + [0.5 / 9] * 9)) > 0.2
    assert ks_pvalue(0.0, 100) == 1.0 and ks_pvalue(0.5, 100) < 1e-6


def test_no_shift_false_alarm_rate_is_under_1_percent() -> None:
    ref = _reference()
    sim = VibrationSimulator(seed=99)
    rows = features(np.stack([sim.frame() for _ in range(6200)]))
    detector = DriftDetector(ref, window=200, every=50)
    alarms = 0
    for start in range(0, len(rows), 50):
        if detector.add(rows[start:start + 50]):
            alarms += 1
    assert detector.windows >= 100
    assert alarms / detector.windows < 0.01, (alarms, detector.windows)


def test_a_gain_shift_is_detected_and_named() -> None:
    ref = _reference()
    sim = VibrationSimulator(seed=5)
    detector = DriftDetector(ref, window=200, every=50)
    healthy = features(np.stack([sim.frame() for _ in range(200)]))
    assert detector.add(healthy) is None
    shifted = features(np.stack([sim.frame() * 1.4 for _ in range(400)]))  # a sensor's gain changed
    moved = None
    for start in range(0, 400, 50):  # a level changes once a whole window of new rows agrees
        moved = detector.add(shifted[start:start + 50]) or moved
    assert moved is not None
    names = {m.feature for m in moved}
    assert "rms" in names and names <= set(FEATURES)


def test_no_shift_raises_no_drift_level_even_warn() -> None:
    """PSI's sampling noise stays below warn: its threshold is not taken under the noise of
    a window's size, and a level needs a whole window of new rows to agree."""
    ref = _reference()
    for seed, every in ((99, 50), (5, 25)):
        sim = VibrationSimulator(seed=seed)
        rows = features(np.stack([sim.frame() for _ in range(5000)]))
        detector = DriftDetector(ref, window=200, every=every)
        levels = set()
        for start in range(0, len(rows), every):
            detector.add(rows[start:start + every])
            levels.add(detector.level)
        assert levels == {"ok"}, (seed, every, levels)


def test_the_alarm_raises_on_change_repeats_at_most_every_period_and_clears() -> None:
    alarm = DriftAlarm(repeat=10.0)
    assert alarm.update("ok", 0.0) is None
    assert alarm.update("warn", 1.0) == ("raise", "ok")
    assert alarm.update("alert", 2.0) == ("raise", "warn") and alarm.since == 2.0
    assert [alarm.update("alert", t) for t in (3.0, 11.0)] == [None, None]
    assert alarm.update("alert", 12.0) == ("repeat", "alert")
    assert alarm.update("alert", 21.0) is None and alarm.update("alert", 22.5) == ("repeat", "alert")
    assert alarm.update("ok", 23.0) == ("clear", "alert")
    assert alarm.update("ok", 100.0) is None  # ok is never repeated


async def test_a_persisting_shift_raises_one_event_repeats_on_the_period_and_clears_on_recovery(
        make_system, tmp_path: Path) -> None:
    import anyio

    from protocols.telemetry import DriftEvent, GetUplink, UplinkState

    # a recording: 4 s healthy, 8 s with the gain moved, 6 s healthy again (at 50 frames/s)
    sim = VibrationSimulator(seed=11)
    frames = [sim.frame() for _ in range(200)] + [sim.frame() * 1.4 for _ in range(400)] + \
        [sim.frame() for _ in range(300)]
    np.save(tmp_path / "shift.npy", np.stack(frames))
    system = make_system(_SYSTEM.replace("DRIFT", "drift_window = 100, drift_every = 25, drift_repeat = 3")
                         .replace("SENSOR", f'kind = "replay", file = "{tmp_path / "shift.npy"}", rate = 50'))
    events: list[DriftEvent] = []
    arrived: list[float] = []
    async with system.client() as bus:
        sub = await bus.subscribe("telemetry.drift")
        with anyio.fail_after(60):
            while not events or events[-1].change != "clear":
                events.append((await sub.receive()).decode(DriftEvent))
                arrived.append(anyio.current_time())
        queued = (await bus.call("telemetry", GetUplink(), UplinkState)).queued
    changes = [(e.change, e.level) for e in events]
    # it used to be one event per evaluated window: 16 while the shift lasted
    raises = [c for c in changes if c[0] == "raise"]
    assert 1 <= len(raises) <= 2 and raises[-1] == ("raise", "alert"), changes
    repeats = [e for e in events if e.change == "repeat"]
    assert len(repeats) <= 4, changes  # the shift lasts 8 s: a reminder every 3 s at most
    reminded = [t for t, e in zip(arrived, events) if e.change != "clear"]
    assert all(b - a >= 2.5 for a, b in zip(reminded[len(raises) - 1:], reminded[len(raises):])), arrived
    assert changes[-1] == ("clear", "ok") and events[-1].previous == "alert" and not events[-1].features
    assert "rms" in {f["feature"] for f in events[len(raises) - 1].features}
    assert all(e.since == events[len(raises) - 1].since for e in repeats)
    assert queued == len(events)  # each event, and only those, queued for the uplink


_SYSTEM = """
[services.security]
command = ["{python}", "-m", "services.security"]
capabilities = ["call:kernel.GetMeasurements", "subscribe:kernel.audit"]
settings = { trusted_keys = [{ label = "demo", public_key = "1b2919a2f33f79bff04474da0ab8b807def7108184315f111162a4b8c612ea62" }] }
[services.modelstore]
command = ["{python}", "-m", "services.modelstore"]
requires = ["security"]
capabilities = ["call:security.VerifySignature", "call:security.Seal", "call:security.Unseal", "call:security.AuditAppend", "publish:modelstore.*"]
settings = { preload_demo = true }
[services.accel-cpu]
command = ["{python}", "-m", "drivers.accel"]
requires = ["modelstore"]
capabilities = ["call:modelstore.GetModel"]
[services.scheduler]
command = ["{python}", "-m", "services.scheduler"]
requires = ["modelstore"]
capabilities = ["call:modelstore.*", "call:accel-*", "subscribe:modelstore.*", "subscribe:sensor.*", "publish:samples.*", "publish:results.*", "publish:alerts.*", "publish:scheduler.*"]
settings = { drivers = [{ name = "accel-cpu" }], pipelines = [{ source = "sensor.vibration", model = "vibration-anomaly", rate = 100 }] }
[services.telemetry]
command = ["{python}", "-m", "services.telemetry"]
requires = ["modelstore"]
capabilities = ["subscribe:metrics.*", "subscribe:samples.*", "call:modelstore.InspectModel", "publish:telemetry.*", "call:kernel.ListServices"]
settings = { http = "", DRIFT }
[services.vibration]
command = ["{python}", "-m", "drivers.sensors"]
requires = ["scheduler", "telemetry"]
capabilities = ["publish:sensor.*"]
settings = { SENSOR }
"""


async def test_a_shift_in_the_demo_sensor_raises_a_drift_event(make_system) -> None:
    import anyio

    from protocols.telemetry import DriftEvent

    system = make_system(_SYSTEM.replace("DRIFT", "drift_window = 200, drift_every = 25")
                         .replace("SENSOR", 'kind = "vibration", rate = 50, shift_at = 6, shift_gain = 1.5'))
    async with system.client() as bus:
        sub = await bus.subscribe("telemetry.drift")
        started = anyio.current_time()
        with anyio.fail_after(40):
            event = (await sub.receive()).decode(DriftEvent)
        # none before the shift (6 s in; windows of 200 frames at 50/s are evaluated from 4 s on)
        assert anyio.current_time() - started > 5.0
    assert event.model == "vibration-anomaly"
    assert "rms" in {f["feature"] for f in event.features}


# -- the demo model does not cry wolf ---------------------------------------------------------------


def test_the_demo_model_raises_no_alert_on_ten_minutes_of_healthy_frames_and_the_fault_at_once() -> None:
    """The demo bundle as the system runs it (its pre ops, each variant in ONNX Runtime, the
    vibration pipeline's on/off hysteresis from the default config), faster than real time:
    10 minutes of the demo sensor at 25 frames/s raise no alert, and its default fault
    (severity 1.5) raises one on its first frame and holds it."""
    import tomllib

    import onnxruntime

    from drivers import ops
    from services.modelstore import Bundle

    root = Path(__file__).resolve().parent.parent
    config = tomllib.loads((root / "kernel/default.toml").read_text())
    pipeline = next(p for p in config["services"]["scheduler"]["settings"]["pipelines"]
                    if p["model"] == "vibration-anomaly")
    on, off = pipeline["on"], pipeline["off"]
    sensor = config["services"]["vibration"]["settings"]
    bundle = Bundle.load(root / "services/modelstore/demo/vibration-anomaly-1.0.0.ebm")
    manifest = bundle.manifest
    pre = ops.pipeline([(s.op, s.params) for s in manifest.pre])

    def alerts(scores: np.ndarray) -> int:
        state = ops.threshold_hysteresis(scores.reshape(-1, 1), on, off)[:, 0]
        return int(np.count_nonzero(state[1:] & ~state[:-1]) + state[0])

    sim = VibrationSimulator(seed=sensor.get("seed", 0))  # the default system's sensor
    healthy = pre(np.stack([sim.frame() for _ in range(10 * 60 * 25)]))
    severity = sensor.get("fault_severity", 1.5)
    faulty = pre(np.stack([sim.frame(severity) for _ in range(250)]))  # 10 s at 25 frames/s
    for variant in ("full", "small"):
        session = onnxruntime.InferenceSession(bundle.files[manifest.variants[variant].file],
                                               providers=["CPUExecutionProvider"])
        scores = session.run(None, {"features": healthy})[0][:, 0]
        # whatever frames the pipeline's rate lets through: none even reaches `on`
        assert alerts(scores) == 0 and scores.max() < on, (variant, scores.max())
        fault = session.run(None, {"features": faulty})[0][:, 0]
        assert fault[0] >= on and alerts(fault) == 1 and fault.min() > off, (variant, fault[:5], fault.min())
    # the rule-based fallback: no alert on healthy frames either
    rule = manifest.fallback
    column = healthy[:, list(manifest.reference).index(rule.feature)]
    assert not np.any(column > rule.threshold)
