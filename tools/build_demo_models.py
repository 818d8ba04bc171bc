"""Build the demo model bundles the default system uses, from data made here.

    python -m tools.build_demo_models [--out services/modelstore/demo]

``vibration-anomaly``: flags bearing faults in accelerometer frames.  The training data is
simulated like the demo sensor does it: a shaft at 25 Hz with harmonics and noise, and for
faulty bearings periodic impacts at the outer-race frequency (~ 3.6x shaft speed) ringing
at a structural resonance (~3 kHz).  Seven features per frame (RMS, kurtosis, crest factor,
energy in four bands) feed a small network (7-16-1, trained here with numpy); a logistic
``small`` variant and a kurtosis threshold as the rule-based fallback back it up.  The
reference statistics for drift detection describe the demo sensor's healthy output.

The demo must not cry wolf: the training data holds the demo sensor's own healthy output
(other seeds than the one it runs with) besides varied machines, faults of a severity the
features can tell apart (``FAULTS``; the demo sensor's default is 1.5), and each network's
output is then calibrated on healthy frames it did not see: its bias moves so that the
highest healthy score is at most ``HEALTHY_MAX``, far under the alert's ``on`` (0.7).  The
build prints what that gives: the highest score over 10 minutes of the demo sensor at 25
frames/s (no alert), and the share of faulty frames at or over ``on``.

The bundles are signed with the DEMO key in this directory, which is public by design:
never trust it on a real device (remove it with ``busctl trust remove``).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from pathlib import Path

import numpy as np

RATE = 12_800          # samples per second
FRAME = 2_048          # samples per frame (160 ms)
BANDS = ((0, 500), (500, 1500), (1500, 4000), (4000, 6400))
FEATURES = ["rms", "kurtosis", "crest", "band0", "band1", "band2", "band3"]
DEMO_KEY = "DEMO-KEY-DO-NOT-TRUST"
#: fault severities trained on (the features cannot tell much weaker impacts from noise)
FAULTS = (1.0, 2.5)
#: the highest score healthy calibration frames may get
HEALTHY_MAX = 0.1
#: the alert's hysteresis (the scheduler pipeline's on/off, and the manifest's post op)
ON, OFF = 0.7, 0.4


def simulate(n: int, fault: bool, rng: np.random.Generator,
             severity: tuple[float, float] | None = None) -> np.ndarray:
    """Frames of varied machines (shaft speed, phases); faulty ones with impacts of a
    severity drawn from ``severity`` (default ``FAULTS``)."""
    severity = severity or FAULTS
    t = np.arange(FRAME) / RATE
    frames = np.empty((n, FRAME), dtype=np.float32)
    for i in range(n):
        shaft = 25.0 * rng.uniform(0.95, 1.05)
        x = sum(a * np.sin(2 * np.pi * k * shaft * t + rng.uniform(0, 2 * np.pi))
                for k, a in ((1, 1.0), (2, 0.4), (3, 0.2)))
        x = x + rng.normal(0, 0.3, FRAME)
        if fault:
            period = 1.0 / (3.58 * shaft)
            impact = rng.uniform(*severity)
            for start in np.arange(rng.uniform(0, period), t[-1], period):
                k = (t >= start) & (t < start + 0.004)
                tau = t[k] - start
                x[k] += impact * np.exp(-tau * 1500) * np.sin(2 * np.pi * 3000 * tau)
        frames[i] = x
    return frames


def sensor_frames(seeds: range | list[int], n: int, rng: np.random.Generator,
                  severity: tuple[float, float] | None = None) -> np.ndarray:
    """``n`` frames from the demo sensor's simulator per seed; faulty with a severity drawn
    from ``severity`` when given."""
    from drivers.sensors import VibrationSimulator

    out = []
    for seed in seeds:
        sim = VibrationSimulator(seed=seed)
        out += [sim.frame(0.0 if severity is None else float(rng.uniform(*severity))) for _ in range(n)]
    return np.stack(out)


def logits(params: dict, mean: np.ndarray, std: np.ndarray, X: np.ndarray) -> np.ndarray:
    """The network's output before its sigmoid (what to_onnx computes), in float64."""
    z = (X - mean) / std
    h = np.maximum(z @ params["W1"] + params["b1"], 0) if "W1" in params else z
    return (h @ params["W2"] + params["b2"])[:, 0]


def calibrate(params: dict, mean: np.ndarray, std: np.ndarray, healthy: np.ndarray,
              highest: float = HEALTHY_MAX) -> float:
    """Move the output bias down so that no healthy frame scores over ``highest``; returns
    the move (in logits)."""
    shift = max(0.0, float(logits(params, mean, std, healthy).max()) - math.log(highest / (1 - highest)))
    params["b2"] = params["b2"] - shift
    return shift


def features(frames: np.ndarray) -> np.ndarray:
    """The reference implementation of the manifest's pre ops (numba kernels in drivers/)."""
    x = frames.astype(np.float64)
    rms = np.sqrt((x ** 2).mean(axis=1))
    centred = x - x.mean(axis=1, keepdims=True)
    kurt = (centred ** 4).mean(axis=1) / (centred ** 2).mean(axis=1) ** 2
    crest = np.abs(x).max(axis=1) / rms
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.shape[1]), axis=1)) ** 2
    freqs = np.fft.rfftfreq(x.shape[1], 1 / RATE)
    total = spectrum.sum(axis=1)
    bands = [spectrum[:, (freqs >= lo) & (freqs < hi)].sum(axis=1) / total for lo, hi in BANDS]
    return np.stack([rms, kurt, crest, *bands], axis=1).astype(np.float32)


def train(X: np.ndarray, y: np.ndarray, hidden: int, rng: np.random.Generator, steps: int = 3000):
    mean, std = X.mean(axis=0), X.std(axis=0) + 1e-6
    Z = (X - mean) / std
    params = {}
    if hidden:
        params["W1"] = rng.normal(0, 0.5, (Z.shape[1], hidden))
        params["b1"] = np.zeros(hidden)
        params["W2"] = rng.normal(0, 0.5, (hidden, 1))
    else:
        params["W2"] = rng.normal(0, 0.5, (Z.shape[1], 1))
    params["b2"] = np.zeros(1)
    lr = 0.1
    for _ in range(steps):
        h = np.maximum(Z @ params["W1"] + params["b1"], 0) if hidden else Z
        p = 1 / (1 + np.exp(-(h @ params["W2"] + params["b2"])))
        g = (p - y[:, None]) / len(y)
        params["b2"] -= lr * g.sum(axis=0)
        if hidden:
            gh = (g @ params["W2"].T) * (h > 0)
            params["W2"] -= lr * h.T @ g
            params["W1"] -= lr * Z.T @ gh
            params["b1"] -= lr * gh.sum(axis=0)
        else:
            params["W2"] -= lr * Z.T @ g
    return params, mean, std


def to_onnx(params: dict, mean: np.ndarray, std: np.ndarray, hidden: int) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(mean.astype(np.float32), "mean"),
             numpy_helper.from_array(std.astype(np.float32), "std")]
    nodes = [helper.make_node("Sub", ["features", "mean"], ["c"]), helper.make_node("Div", ["c", "std"], ["z"])]
    last = "z"
    if hidden:
        inits += [numpy_helper.from_array(params["W1"].astype(np.float32), "W1"),
                  numpy_helper.from_array(params["b1"].astype(np.float32), "b1")]
        nodes += [helper.make_node("MatMul", ["z", "W1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
                  helper.make_node("Relu", ["h1"], ["h"])]
        last = "h"
    inits += [numpy_helper.from_array(params["W2"].astype(np.float32), "W2"),
              numpy_helper.from_array(params["b2"].astype(np.float32), "b2")]
    nodes += [helper.make_node("MatMul", [last, "W2"], ["o0"]), helper.make_node("Add", ["o0", "b2"], ["o1"]),
              helper.make_node("Sigmoid", ["o1"], ["anomaly"])]
    graph = helper.make_graph(
        nodes, "vibration_anomaly",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, len(FEATURES)])],
        [helper.make_tensor_value_info("anomaly", TensorProto.FLOAT, [None, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgebus-demo")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def reference(X: np.ndarray) -> dict:
    out = {}
    for i, name in enumerate(FEATURES):
        col = X[:, i].astype(np.float64)
        edges = np.quantile(col, np.linspace(0, 1, 11))
        edges = np.unique(edges)
        counts, _ = np.histogram(col, bins=edges)
        out[name] = {"mean": float(col.mean()), "std": float(col.std()), "bins": [float(e) for e in edges],
                     "proportions": [float(c) / len(col) for c in counts], "count": len(col)}
    return out


def main(argv: list[str] | None = None) -> None:
    import msgspec
    import onnx
    import onnxruntime

    from protocols.modelstore import Fallback, FeatureStats, Manifest, OpSpec, Provenance, Variant
    from services.modelstore import Bundle
    from tools._model_tools import graph_io, read_private_key

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="services/modelstore/demo")
    parser.add_argument("--version", default="1.0.0")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key_path = out / f"{DEMO_KEY}.key"
    if not key_path.exists():
        from tools._model_tools import cmd_keygen

        cmd_keygen(argparse.Namespace(out=str(out / DEMO_KEY), force=False))
    rng = np.random.default_rng(7)
    # healthy: varied machines, and the demo sensor itself (seeds other than its own, 0)
    healthy = np.concatenate([features(simulate(600, False, rng)), features(sensor_frames(range(100, 120), 500, rng))])
    faulty = np.concatenate([features(simulate(600, True, rng)),
                             features(sensor_frames(range(200, 220), 250, rng, FAULTS))])
    # the reference for drift: the demo sensor's own healthy output (what "normal" looks like)
    normal = features(sensor_frames([1234], 2000, rng))
    X = np.concatenate([healthy, faulty])
    y = np.concatenate([np.zeros(len(healthy)), np.ones(len(faulty))])
    full, mean, std = train(X, y, 16, rng)
    small, _, _ = train(X, y, 0, rng)
    # calibrated on healthy frames not trained on: no healthy score over HEALTHY_MAX
    calibration = features(sensor_frames(range(300, 302), 5000, rng))
    shifts = [calibrate(params, mean, std, calibration) for params in (full, small)]
    full_bytes, small_bytes = to_onnx(full, mean, std, 16), to_onnx(small, mean, std, 0)
    sess = onnxruntime.InferenceSession(full_bytes, providers=["CPUExecutionProvider"])
    accuracy = float(((sess.run(None, {"features": X})[0][:, 0] > 0.5) == y).mean())
    # what it gives on the demo sensor (seed 0), 10 minutes at 25 frames/s, and at the default fault
    demo = sess.run(None, {"features": features(sensor_frames([0], 15_000, rng))})[0][:, 0]
    fault = sess.run(None, {"features": features(sensor_frames([0], 250, rng, (1.5, 1.5)))})[0][:, 0]
    print(f"calibration moved the outputs by {shifts[0]:.2f} (full), {shifts[1]:.2f} (small) logits; the demo "
          f"sensor's highest healthy score over 15000 frames: {demo.max():.3f} (on = {ON}); faulty frames "
          f"(severity 1.5) at or over on: {(fault >= ON).mean():.1%}, at or under off: {(fault <= OFF).mean():.1%}")
    inputs, outputs = graph_io(full_bytes)
    manifest = Manifest(
        name="vibration-anomaly", version=args.version, created=time.time(),
        author="edgebus demo", description=f"bearing-fault detector on 7 vibration features "
                                          f"(training accuracy {accuracy:.3f})",
        inputs=inputs, outputs=outputs,
        variants={"full": Variant(file="full.onnx", sha256="", size=0),
                  "small": Variant(file="small.onnx", sha256="", size=0,
                                   description="logistic regression on the same features")},
        pre=[OpSpec(op="signal.frame", params={"length": FRAME}),
             OpSpec(op="signal.vibration_features", params={"rate": RATE, "bands": [list(b) for b in BANDS]})],
        post=[OpSpec(op="post.threshold_hysteresis", params={"on": ON, "off": OFF})],
        fallback=Fallback(feature="kurtosis", threshold=4.0, above=1.0, below=0.0),
        reference=msgspec.convert(reference(normal), dict[str, FeatureStats]),
        provenance=Provenance(training_data_sha256=hashlib.sha256(X.tobytes()).hexdigest(),
                              source_revision="tools/build_demo_models.py",
                              tools={"numpy": np.__version__, "onnx": onnx.__version__,
                                     "onnxruntime": onnxruntime.__version__}),
    )
    bundle = Bundle.create(manifest, {"full.onnx": full_bytes, "small.onnx": small_bytes})
    bundle.sign(read_private_key(str(key_path)))
    path = out / f"vibration-anomaly-{args.version}.ebm"
    bundle.save(path)
    print(f"wrote {path} ({path.stat().st_size} bytes), training accuracy {accuracy:.3f}, "
          f"signed with the DEMO key {bundle.signature.key_id}")  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
