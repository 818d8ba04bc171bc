"""Sensor drivers: publish tensor frames on ``sensor.<name>`` at their configured rate.

``python -m drivers.sensors``; what the sensor is comes from its settings
(``[services.<name>.settings]``), a tagged union on ``kind``:

* ``kind = "vibration"``: the simulated accelerometer, ``rate`` frames per second (5); a
  bearing fault ``fault_at`` seconds after start (none by default) of ``fault_severity``
  (1.5); ``seed`` (0); a distribution shift for drift demos: the gain moves to
  ``shift_gain`` (1.4) at ``shift_at`` seconds (none by default).
* ``kind = "replay"``: replays the recording ``file``: ``.npy`` (frames along axis 0, or a
  1-D signal cut into frames of ``frame`` samples, 2048), ``.wav`` (PCM, cut into frames)
  or ``.csv`` (one frame per row), at ``rate`` (default: the real rate, a signal's sample
  rate / ``frame``, else 5) or as fast as possible (``fast = true``); ``loop = true``
  starts over at the end.
* ``kind = "camera"``: the images of ``folder`` (png, jpg, .npy), in name order, as HWC
  uint8 frames at ``rate`` (5); loops.  ``demo = true`` instead of a folder: the default
  system's shop labels (``demo/text`` here, rendered by ``tools.build_ocr_demo``).

Relative paths (``file``, ``folder``) are taken from the config file's directory.
"""

from __future__ import annotations

import sys
import time
import wave
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec
import numpy as np

from protocols import pack_tensors
from protocols.sensors import SensorFrame
from services import EXIT_CONFIG, Service, Settings, SettingsError, run

from ._vibration import RATE, VibrationSimulator

#: the demo camera's images (``demo = true``): shop labels for the default system's OCR
DEMO_IMAGES = Path(__file__).with_name("demo") / "text"

__all__ = ["SensorDriver", "SensorSettings", "VibrationSettings", "ReplaySettings", "CameraSettings",
           "SensorFrame", "load_recording"]

_Rate = Annotated[float, msgspec.Meta(gt=0)]
_Seconds = Annotated[float, msgspec.Meta(ge=0)]


class VibrationSettings(Settings, tag_field="kind", tag="vibration"):
    """The simulated accelerometer."""

    rate: _Rate = 5.0
    #: seconds after start when a bearing fault appears; none: never
    fault_at: _Seconds | None = None
    fault_severity: Annotated[float, msgspec.Meta(gt=0)] = 1.5
    seed: int = 0
    #: seconds after start when the gain moves to ``shift_gain`` (a drift demo); none: never
    shift_at: _Seconds | None = None
    shift_gain: Annotated[float, msgspec.Meta(gt=0)] = 1.4


class ReplaySettings(Settings, tag_field="kind", tag="replay"):
    """A recording (.npy, .wav, .csv) replayed."""

    file: Path
    #: samples per frame when the recording is a 1-D signal
    frame: Annotated[int, msgspec.Meta(ge=1)] = 2048
    #: frames per second; none: the recording's real rate (its sample rate / frame), else 5
    rate: _Rate | None = None
    #: as fast as possible (rate ignored)
    fast: bool = False
    #: start over at the end
    loop: bool = False


class CameraSettings(Settings, tag_field="kind", tag="camera"):
    """The images of a folder, in name order, looped."""

    folder: Path | None = None
    #: instead of a folder: the demo's shop labels shipped with this driver (DEMO_IMAGES)
    demo: bool = False
    rate: _Rate = 5.0

    def __post_init__(self) -> None:
        if (self.folder is None) == (not self.demo):
            raise ValueError("give either folder (a folder of images) or demo = true (the demo's shop labels), "
                             "not " + ("both" if self.demo else "neither"))


#: ``[services.<name>.settings]`` of a sensor: ``kind`` says which.
SensorSettings = VibrationSettings | ReplaySettings | CameraSettings


class SensorDriver(Service):
    """One sensor, of the kind its settings name."""

    name = "sensor"
    Settings = SensorSettings
    publishes = ["sensor.*"]

    async def setup(self) -> None:
        self.topic = f"sensor.{self.bus.name}"
        self.produced = self.metrics.counter("edgebus_sensor_bytes", "Bytes of sensor data published")
        match self.settings:
            case ReplaySettings(file=path, frame=frame, rate=rate):
                try:
                    self.frames, self.sample_rate = load_recording(path, frame)
                except (OSError, ValueError) as exc:
                    raise SettingsError(self.bus.name, "settings.file", str(exc)) from None
                self.rate = rate or (self.sample_rate / frame if self.sample_rate else 5.0)
            case CameraSettings(folder=folder, demo=demo):
                folder = DEMO_IMAGES if demo or folder is None else folder
                try:
                    self.files = sorted(p for p in folder.iterdir()
                                        if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".npy"))
                except OSError as exc:
                    raise SettingsError(self.bus.name, "settings.folder", str(exc)) from None
                if not self.files:
                    raise SettingsError(self.bus.name, "settings.folder", f"{folder} holds no .png, .jpg or .npy images")

    async def main(self) -> None:
        match self.settings:
            case VibrationSettings() as settings:
                await self._simulate(settings)
            case ReplaySettings(fast=fast, loop=loop):
                await self._publish_frames(self.frames, self.sample_rate, 0.0 if fast else 1.0 / self.rate, loop)
            case CameraSettings(rate=rate):
                await self._publish_frames(_load_images(self.files), 0.0, 1.0 / rate, loop=True)

    async def _simulate(self, settings: VibrationSettings) -> None:
        sim = VibrationSimulator(seed=settings.seed)
        started = time.monotonic()
        period = 1.0 / settings.rate
        seq = 0
        next_at = started
        announced = False
        while True:
            elapsed = time.monotonic() - started
            fault = settings.fault_severity if settings.fault_at is not None and elapsed >= settings.fault_at else 0.0
            if fault and not announced:
                announced = True
                self.log.info("fault_injected", severity=fault, after_s=round(elapsed, 1))
            samples = sim.frame(fault)
            if settings.shift_at is not None and elapsed >= settings.shift_at:
                samples = samples * np.float32(settings.shift_gain)  # a distribution shift: the gain moved
            descs, frames = pack_tensors([samples])
            await self.bus.publish(self.topic, SensorFrame(seq=seq, time=time.time(), sample_rate=RATE,
                                                           tensor=descs[0], fault=fault), frames=frames)
            self.produced.inc(value=samples.nbytes)
            seq += 1
            next_at += period
            await anyio.sleep(max(0.0, next_at - time.monotonic()))

    async def _publish_frames(self, frames: Any, sample_rate: float, period: float, loop: bool) -> None:
        seq = 0
        next_at = time.monotonic()
        while True:
            for frame in frames:
                descs, buffers = pack_tensors([frame])
                await self.bus.publish(self.topic, SensorFrame(seq=seq, time=time.time(), sample_rate=sample_rate,
                                                               tensor=descs[0]), frames=buffers)
                self.produced.inc(value=frame.nbytes)
                seq += 1
                next_at += period
                await anyio.sleep(max(0.0, next_at - time.monotonic()))
            if not loop:
                self.log.info("recording_done", frames=seq)
                await anyio.sleep_forever()


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


def _load_images(files: list[Path]) -> list[np.ndarray]:
    from PIL import Image

    def load(p: Path) -> np.ndarray:
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False)
        with Image.open(p) as img:
            return np.asarray(img.convert("RGB"))

    return [load(p) for p in files]


def main() -> None:
    if len(sys.argv) > 1:
        print(f"drivers.sensors takes no arguments (got {' '.join(sys.argv[1:])}): the sensor's kind and "
              "options are its settings, e.g. [services.<name>.settings] kind = \"replay\", file = \"rec.npy\"",
              file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    run(SensorDriver)
