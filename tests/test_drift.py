"""Drift detection: the false-alarm rate without a shift, and detection of a shift."""

from __future__ import annotations

import numpy as np

from drivers.sensors import VibrationSimulator
from services.telemetry._drift import DriftDetector, ks_pvalue, psi
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
    shifted = features(np.stack([sim.frame() * 1.4 for _ in range(200)]))  # a sensor's gain changed
    moved = None
    for start in range(0, 200, 50):
        moved = detector.add(shifted[start:start + 50]) or moved
    assert moved is not None
    names = {m.feature for m in moved}
    assert "rms" in names and names <= set(FEATURES)


async def test_a_shift_in_the_demo_sensor_raises_a_drift_event(make_system) -> None:
    import anyio

    from protocols.telemetry import DriftEvent

    system = make_system("""
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
settings = { http = "", drift_window = 200, drift_every = 25 }
[services.vibration]
command = ["{python}", "-m", "drivers.sensors"]
requires = ["scheduler", "telemetry"]
capabilities = ["publish:sensor.*"]
settings = { kind = "vibration", rate = 50, shift_at = 6, shift_gain = 1.5 }
""")
    async with system.client() as bus:
        sub = await bus.subscribe("telemetry.drift")
        started = anyio.current_time()
        with anyio.fail_after(40):
            event = (await sub.receive()).decode(DriftEvent)
        # none before the shift (6 s in; windows of 200 frames at 50/s are evaluated from 4 s on)
        assert anyio.current_time() - started > 5.0
    assert event.model == "vibration-anomaly"
    assert "rms" in {f["feature"] for f in event.features}
