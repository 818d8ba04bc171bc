"""Model store benchmark: install and activate a 10 MB model; activation to first inference.

    python -m tools.bench_modelstore [--versions 5] [--out bench-results/modelstore.json]

A system with the security service and the model store boots in a throwaway directory,
trusting a key made for the run.  For each of ``--versions`` successive versions of a
10 MB model (one 1600x1600 float32 MatMul), it measures:

* install: the Install request, from send to reply (archive parse, sha256 of every file,
  signature checked through the security service, ONNX Runtime load check in a throwaway
  process, encryption, fsync'd writes), against a plain ``sha256 + write + fsync`` of the
  same bytes in this process (the floor of any store that checks and persists);
* activate: the Activate request (the atomic switch);
* switch: from the Activate reply to the first inference by the new version in a serving
  loop that plays the accelerator driver: it hears ``modelstore.activated``, fetches the
  bytes with GetModel, builds an ONNX Runtime session from bytes, warms it, and only then
  switches; meanwhile every request is still served by the old version.  Failed requests
  during the switch are counted (target: zero).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from pathlib import Path

import anyio
import numpy as np

from services import connect
from services.modelstore import Bundle, Manifest
from protocols.modelstore import Activate, GetModel, Install, ModelEvent, ModelState
from tools._benchkit import boot, matmul_onnx, stop, write_results


def make_bundle(version: str, key, seed: int) -> bytes:
    import msgspec

    manifest = msgspec.convert({"name": "big", "version": version, "created": time.time(), "inputs": [],
                                "outputs": [], "variants": {"full": {"file": "full.onnx", "sha256": "", "size": 0}}},
                               Manifest)
    b = Bundle.create(manifest, {"full.onnx": matmul_onnx(1600, seed)})
    b.sign(key)
    return b.to_bytes()


def floor_write(data: bytes, directory: Path) -> float:
    t0 = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    path = directory / "floor.bin"
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    path.unlink()
    return time.perf_counter() - t0


async def run(args: argparse.Namespace) -> dict:
    import onnxruntime as ort
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    kernel, tmp = boot(f"""
[services.security]
command = ["{{python}}", "-m", "services.security"]
capabilities = ["call:kernel.Grant", "call:kernel.Revoke", "call:kernel.Enroll", "call:kernel.GetMeasurements",
                "subscribe:kernel.audit"]
settings = {{ trusted_keys = [{{ label = "bench", public_key = "{pub}" }}] }}
[services.modelstore]
command = ["{{python}}", "-m", "services.modelstore"]
requires = ["security"]
capabilities = ["call:security.VerifySignature", "call:security.Seal", "call:security.Unseal",
                "call:security.AuditAppend", "publish:modelstore.*"]
""")
    try:
        bundles = [make_bundle(f"1.{i}.0", key, i) for i in range(args.versions + 1)]
        size = len(bundles[0])
        x = np.random.default_rng(0).standard_normal((1, 1600)).astype(np.float32)
        results = {"install_s": [], "floor_s": [], "activate_ms": [], "switch_ms": [], "failed": 0, "served": 0}
        cred = (tmp / "run" / "credentials" / "operator").read_text()
        async with connect("bench", run_dir=tmp / "run", credential=cred) as bus:
            from protocols import ListServices, ServiceList

            sub = await bus.subscribe("kernel.services", "modelstore.activated")
            while True:  # until the store is ready
                st = await bus.call("kernel", ListServices(), ServiceList)
                if any(s.name == "modelstore" and s.state == "ready" for s in st.services):
                    break
                await sub.receive()

            async def load(version: str) -> ort.InferenceSession:
                incoming = await bus.request("modelstore", GetModel(name="big", version=version), timeout=60)
                data = bytes(incoming.frames[0].buffer)
                sess = await anyio.to_thread.run_sync(
                    lambda: ort.InferenceSession(data, providers=["CPUExecutionProvider"]))
                sess.run(None, {"x": x})  # warm
                return sess

            await bus.request("modelstore", Install(), frames=[bundles[0]], timeout=120)
            await bus.call("modelstore", Activate(name="big", version="1.0.0"), ModelState)
            serving = {"version": "1.0.0", "session": await load("1.0.0")}
            first_by: dict[str, float] = {}

            async def serve_loop() -> None:  # the driver's request loop, never blocked by a swap
                while True:
                    try:
                        serving["session"].run(None, {"x": x})
                        results["served"] += 1
                        first_by.setdefault(serving["version"], time.perf_counter())
                    except Exception:
                        results["failed"] += 1
                    await anyio.sleep(0.002)

            async def watch() -> None:  # hears activations, warms the new version, then swaps
                async for incoming in sub:
                    if incoming.header.dest != "modelstore.activated":
                        continue
                    ev = incoming.decode(ModelEvent)
                    session = await load(ev.version)
                    serving["session"], serving["version"] = session, ev.version

            async with anyio.create_task_group() as tg:
                tg.start_soon(serve_loop)
                tg.start_soon(watch)
                for i in range(1, args.versions + 1):
                    version = f"1.{i}.0"
                    results["floor_s"].append(floor_write(bundles[i], tmp))
                    t0 = time.perf_counter()
                    await bus.request("modelstore", Install(), frames=[bundles[i]], timeout=120)
                    results["install_s"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    await bus.call("modelstore", Activate(name="big", version=version), ModelState)
                    activated = time.perf_counter()
                    results["activate_ms"].append((activated - t0) * 1e3)
                    with anyio.fail_after(60):
                        while version not in first_by:
                            await anyio.sleep(0.005)
                    results["switch_ms"].append((first_by[version] - activated) * 1e3)
                tg.cancel_scope.cancel()
        return {"bundle_bytes": size, **results}
    finally:
        stop(kernel)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_modelstore", description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", type=int, default=5)
    parser.add_argument("--out", default="bench-results/modelstore.json")
    args = parser.parse_args(argv)
    r = anyio.run(run, args)
    med = {k: statistics.median(r[k]) for k in ("install_s", "floor_s", "activate_ms", "switch_ms")}
    print(f"bundle: {r['bundle_bytes'] / 1e6:.1f} MB")
    print(f"install (verify, ORT load check, encrypt, persist): {med['install_s'] * 1e3:.0f} ms; "
          f"sha256 + write + fsync of the same bytes: {med['floor_s'] * 1e3:.0f} ms "
          f"({med['install_s'] / med['floor_s']:.1f}x)")
    print(f"activate (atomic switch): {med['activate_ms']:.1f} ms")
    print(f"activate to first inference by the new version: {med['switch_ms']:.0f} ms (target 1000 ms); "
          f"requests served meanwhile {r['served']}, failed {r['failed']}")
    write_results(args.out, {**r, "medians": med})


if __name__ == "__main__":
    main()
