"""Sensor drivers: publish tensor frames on ``sensor.<name>`` at their configured rate.

* ``python -m drivers.sensors vibration``: the simulated accelerometer.
  ``EDGEBUS_SENSOR_RATE`` (frames per second, default 5), ``EDGEBUS_SENSOR_FAULT_AT``
  (seconds after start when a bearing fault appears; empty: never),
  ``EDGEBUS_SENSOR_FAULT_SEVERITY`` (default 1.5), ``EDGEBUS_SENSOR_SHIFT_AT`` /
  ``EDGEBUS_SENSOR_SHIFT_GAIN`` (a distribution shift for drift demos: the gain moves).
* ``python -m drivers.sensors replay FILE``: replays a recording: ``.npy`` (frames along
  axis 0, or a 1-D signal cut into frames), ``.wav`` (PCM, cut into frames) or ``.csv``
  (one frame per row), at the real rate (``EDGEBUS_SENSOR_RATE``, or for a signal its
  sample rate / ``EDGEBUS_SENSOR_FRAME``) or as fast as possible (``EDGEBUS_SENSOR_FAST=1``);
  ``EDGEBUS_SENSOR_LOOP=1`` starts over at the end.
* ``python -m drivers.sensors camera DIR``: the images of a folder (png, jpg, .npy), in name
  order, as HWC uint8 frames at ``EDGEBUS_SENSOR_RATE``; loops.
"""

from __future__ import annotations

import os
import sys
import time
import wave
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from protocols import pack_tensors
from protocols.sensors import SensorFrame
from services import EXIT_CONFIG, Service, run

from ._vibration import RATE, VibrationSimulator

__all__ = ["VibrationSensor", "ReplaySensor", "CameraSensor", "SensorFrame", "load_recording"]


class VibrationSensor(Service):
    name = "vibration"
    publishes = ["sensor.*"]

    async def setup(self) -> None:
        self.rate = float(os.environ.get("EDGEBUS_SENSOR_RATE", "5"))
        fault_at = os.environ.get("EDGEBUS_SENSOR_FAULT_AT", "")
        self.fault_at = float(fault_at) if fault_at else None
        self.severity = float(os.environ.get("EDGEBUS_SENSOR_FAULT_SEVERITY", "1.5"))
        self.sim = VibrationSimulator(seed=int(os.environ.get("EDGEBUS_SENSOR_SEED", "0")))
        shift_at = os.environ.get("EDGEBUS_SENSOR_SHIFT_AT", "")
        self.shift_at = float(shift_at) if shift_at else None
        self.shift_gain = float(os.environ.get("EDGEBUS_SENSOR_SHIFT_GAIN", "1.4"))
        self.topic = f"sensor.{self.bus.name}"

    async def main(self) -> None:
        started = time.monotonic()
        period = 1.0 / self.rate
        seq = 0
        next_at = started
        announced = False
        produced = _bytes_counter(self)
        while True:
            elapsed = time.monotonic() - started
            fault = self.severity if self.fault_at is not None and elapsed >= self.fault_at else 0.0
            if fault and not announced:
                announced = True
                self.log.info("fault_injected", severity=fault, after_s=round(elapsed, 1))
            samples = self.sim.frame(fault)
            if self.shift_at is not None and elapsed >= self.shift_at:
                samples = samples * np.float32(self.shift_gain)  # a distribution shift: the gain moved
            descs, frames = pack_tensors([samples])
            await self.bus.publish(self.topic, SensorFrame(seq=seq, time=time.time(), sample_rate=RATE,
                                                           tensor=descs[0], fault=fault), frames=frames)
            produced.inc(value=samples.nbytes)
            seq += 1
            next_at += period
            await anyio.sleep(max(0.0, next_at - time.monotonic()))


def load_recording(path: Path, frame: int) -> tuple[np.ndarray, float]:
    """Frames [N, ...] and the sample rate (0 when the file does not say)."""
    if path.suffix == ".npy":
        data = np.load(path, allow_pickle=False)
        rate = 0.0
    elif path.suffix == ".wav":
        with wave.open(str(path)) as w:
            width, rate = w.getsampwidth(), float(w.getframerate())
            raw = np.frombuffer(w.readframes(w.getnframes()), dtype={1: np.uint8, 2: np.int16, 4: np.int32}[width])
            data = raw.reshape(-1, w.getnchannels())[:, 0].astype(np.float32)
            data = (data - 128) / 128 if width == 1 else data / float(2 ** (8 * width - 1))
    elif path.suffix == ".csv":
        data, rate = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2), 0.0
    else:
        raise ValueError(f"{path}: a recording is .npy, .wav or .csv")
    if data.ndim == 1:
        usable = len(data) // frame * frame
        if not usable:
            raise ValueError(f"{path}: {len(data)} samples are fewer than one frame of {frame}")
        data = data[:usable].reshape(-1, frame)
    return np.ascontiguousarray(data.astype(np.float32) if data.dtype.kind == "f" else data), rate


class ReplaySensor(Service):
    name = "replay"
    publishes = ["sensor.*"]

    async def setup(self) -> None:
        if len(sys.argv) < 3:
            sys.exit(EXIT_CONFIG)
        frame = int(os.environ.get("EDGEBUS_SENSOR_FRAME", "2048"))
        try:
            self.frames, sample_rate = load_recording(Path(sys.argv[2]), frame)
        except (OSError, ValueError) as exc:
            self.log.error("recording_unreadable", error=str(exc))
            raise SystemExit(EXIT_CONFIG) from exc
        self.sample_rate = sample_rate
        rate = os.environ.get("EDGEBUS_SENSOR_RATE")
        self.rate = float(rate) if rate else (sample_rate / frame if sample_rate else 5.0)
        self.fast = os.environ.get("EDGEBUS_SENSOR_FAST") == "1"
        self.loop = os.environ.get("EDGEBUS_SENSOR_LOOP") == "1"

    async def main(self) -> None:
        await _publish_frames(self, self.frames, self.sample_rate, 0.0 if self.fast else 1.0 / self.rate, self.loop)


class CameraSensor(Service):
    name = "camera"
    publishes = ["sensor.*"]

    async def setup(self) -> None:
        folder = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(".")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".npy"))
        if not files:
            self.log.error("no_images", folder=str(folder))
            raise SystemExit(EXIT_CONFIG)
        self.files = files
        self.rate = float(os.environ.get("EDGEBUS_SENSOR_RATE", "5"))

    async def main(self) -> None:
        from PIL import Image

        def load(p: Path) -> np.ndarray:
            if p.suffix == ".npy":
                return np.load(p, allow_pickle=False)
            with Image.open(p) as img:
                return np.asarray(img.convert("RGB"))

        images = [load(p) for p in self.files]
        await _publish_frames(self, images, 0.0, 1.0 / self.rate, loop=True)


def _bytes_counter(svc: Service) -> Any:
    return svc.metrics.counter("edgebus_sensor_bytes", "Bytes of sensor data published")


async def _publish_frames(svc: Service, frames: Any, sample_rate: float, period: float, loop: bool) -> None:
    topic = f"sensor.{svc.bus.name}"
    produced = _bytes_counter(svc)
    seq = 0
    next_at = time.monotonic()
    while True:
        for frame in frames:
            descs, buffers = pack_tensors([frame])
            await svc.bus.publish(topic, SensorFrame(seq=seq, time=time.time(), sample_rate=sample_rate,
                                                     tensor=descs[0]), frames=buffers)
            produced.inc(value=frame.nbytes)
            seq += 1
            next_at += period
            await anyio.sleep(max(0.0, next_at - time.monotonic()))
        if not loop:
            svc.log.info("recording_done", frames=seq)
            await anyio.sleep_forever()


def main() -> None:
    kinds = {"vibration": VibrationSensor, "replay": ReplaySensor, "camera": CameraSensor}
    kind = sys.argv[1] if len(sys.argv) > 1 else "vibration"
    if kind not in kinds:
        sys.exit(f"unknown sensor kind {kind!r}; available: {', '.join(kinds)}")
    run(kinds[kind])
