"""A/B and trials across the variants of one version (PROTOCOL.md 11.5, 11.6): a variant split
sticky per request key (``pick_variant``), the scheduler running the store's pick when a
request names no variant (an explicit variant wins, the degradation ladder overrides under
pressure) and reporting health per version and variant, and a trial of a variant against the
variant serving the version, gated by the same rule as versions (``_trial.decide``): committed
it becomes the version's default variant, rolled back the default serves again."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest

from drivers.health import Simulate, Simulated
from protocols import pack_tensors
from protocols.modelstore import (
    Activate,
    HealthRecorded,
    Install,
    ListModels,
    ModelEvent,
    ModelList,
    ModelState,
    ReportHealth,
    Resolve,
    Resolved,
    Rollback,
    Split,
    parse_version,
    pick,
    pick_variant,
    pick_version,
)
from services import BadMessage, Rejected
from services.modelstore import Bundle, Manifest
from services.modelstore._trial import Trial, TrialRule
from services.scheduler import Degradation, Infer, InferResult

from conftest import System
from test_inference import W_FULL, W_SMALL, config as inference_config, matmul, mm_bundle
from test_modelstore import KEY

# -- the pure parts ---------------------------------------------------------------------------------


def old_pick_version(name: str, key: str, weights: dict[str, float]) -> str:
    """pick_version as it was before it was generalised (the reference of PROTOCOL.md 11.6)."""
    total = sum(w for w in weights.values() if w > 0)
    point = int.from_bytes(hashlib.sha256(f"{name}\0{key}".encode()).digest()[:8], "big") / 2**64 * total
    for version in sorted(weights, key=parse_version):
        w = weights[version]
        if w <= 0:
            continue
        if point < w:
            return version
        point -= w
    return max(weights, key=parse_version)


def test_pick_version_gives_the_same_versions_as_before() -> None:
    splits = [{"1.0.0": 90, "1.1.0": 10}, {"1.10.0": 1, "1.9.0": 1, "1.0.0-rc.1": 2}, {"2.0.0": 0, "1.0.0": 5},
              {"0.1.0": 33.3, "0.2.0": 33.3, "0.3.0": 33.4}]
    for weights in splits:
        for i in range(3000):
            assert pick_version("vib", f"k{i}", weights) == old_pick_version("vib", f"k{i}", weights)
    # PROTOCOL.md 11.6's examples
    assert [pick_version("vib", k, {"1.0.0": 90, "1.1.0": 10}) for k in ("sensor-17", "sensor-18", "")] == \
        ["1.1.0", "1.0.0", "1.0.0"]


def test_pick_variant_is_sticky_weighted_walks_names_in_order_and_is_independent_of_the_version_pick() -> None:
    weights = {"int8": 10, "full": 90}
    picks = [pick_variant("vib", "1.2.0", f"key-{i}", weights) for i in range(10_000)]
    assert abs(picks.count("int8") / 10_000 - 0.10) < 0.02
    assert picks == [pick_variant("vib", "1.2.0", f"key-{i}", dict(reversed(weights.items())))
                     for i in range(10_000)]  # the order the weights come in does not matter
    # the same rule, hashed as "<name>@<version>", walking variant names in their order
    assert all(p == pick("vib@1.2.0", f"key-{i}", weights) for i, p in enumerate(picks[:500]))
    assert pick("m", "k", {"b": 1, "a": 1}) == pick("m", "k", {"a": 1, "b": 1})
    # a weight of 0 is never picked
    assert {pick_variant("vib", "1.2.0", f"k{i}", {"full": 0, "small": 1}) for i in range(200)} == {"small"}
    # under a version split too, the keys of a version spread over the variants
    versions = {"1.1.0": 90, "1.2.0": 10}
    on_new = [f"key-{i}" for i in range(10_000) if pick_version("vib", f"key-{i}", versions) == "1.2.0"]
    share = sum(pick_variant("vib", "1.2.0", k, weights) == "int8" for k in on_new) / len(on_new)
    assert abs(share - 0.10) < 0.04, share


def test_model_state_gives_the_variant_split_then_the_trial_then_the_default_of_the_active_version() -> None:
    state = ModelState(name="vib", versions=["1.1.0", "1.2.0"], active="1.2.0")
    assert state.variant("1.2.0", "k") == "full" and state.default_variant("1.2.0") == "full"
    state = msgspec.structs.replace(state, default_variants={"1.2.0": "int8", "1.1.0": "small"})
    assert state.variant("1.2.0", "k") == "int8" and state.variant("1.1.0", "k") == "small"
    state = msgspec.structs.replace(state, variant_trial="small")
    assert state.variant("1.2.0", "k") == "small" and state.variant("1.1.0", "k") == "small"
    state = msgspec.structs.replace(state, variant_split={"full": 50, "small": 50})
    assert [state.variant("1.2.0", f"k{i}") for i in range(50)] == \
        [pick_variant("vib", "1.2.0", f"k{i}", {"full": 50, "small": 50}) for i in range(50)]
    assert state.variant("1.1.0", "k") == "small"  # the split and trial are the active version's only
    # on the wire: the defaults stay out, an older reader ignores the new fields
    assert b"variant" not in msgspec.json.encode(ModelState(name="vib", versions=["1.0.0"], active="1.0.0"))


def report(variant: str, requests: int, errors: int = 0, ms: float = 5.0, version: str = "1.0.0") -> ReportHealth:
    return ReportHealth(name="m", version=version, requests=requests, errors=errors, variant=variant,
                        latency_hist=ReportHealth.histogram([ms] * requests))


def test_a_variant_trial_counts_the_reports_of_its_two_variants_of_that_version_only() -> None:
    rule = TrialRule(min_requests=100, window_min_requests=10, windows=2)
    trial = Trial("1.0.0", "1.0.0", started=0.0, window_s=10.0, variant="int8", baseline_variant="full")
    for w in range(3):
        assert trial.add(report("int8", 60), 10 * w + 1)
        assert trial.add(report("full", 60), 10 * w + 2)
        assert not trial.add(report("", 60, errors=60), 10 * w + 3)  # the version as a whole: not counted
        assert not trial.add(report("small", 60, errors=60), 10 * w + 3)
        assert not trial.add(report("int8", 60, errors=60, version="0.9.0"), 10 * w + 3)
        assert not trial.add(report("fallback", 60, errors=60), 10 * w + 3)
    assert trial.side(report("int8", 1)) == 0 and trial.side(report("full", 1)) == 1
    decision = trial.decide(30.0, rule)
    assert decision.verdict == "commit", decision
    # a slow int8 fails on the same rule
    slow = Trial("1.0.0", "1.0.0", started=0.0, window_s=10.0, variant="int8", baseline_variant="full")
    for w in range(3):
        slow.add(report("int8", 60, ms=20.0), 10 * w + 1)
        slow.add(report("full", 60, ms=5.0), 10 * w + 2)
    decision = slow.decide(30.0, rule)
    assert decision.verdict == "rollback" and "p95 20.7 ms against 5.2 ms" in decision.reason, decision
    # a variant trial whose baseline never served says so in variants' words
    alone = Trial("1.0.0", "1.0.0", started=0.0, window_s=10.0, variant="int8", baseline_variant="full")
    alone.add(report("int8", 60), 1.0)
    assert "compares the two variants serving side by side" in alone.decide(15.0, rule).reason
    # a version trial counts every variant of its two versions (the ladder's too), as before
    versions = Trial("1.1.0", "1.0.0", started=0.0, window_s=10.0)
    assert versions.add(report("int8", 5, version="1.1.0"), 1.0) and versions.add(report("", 5), 1.0)
    assert versions.add(report("fallback", 5), 1.0) and not versions.add(report("full", 5, version="0.9.0"), 1.0)
    assert (versions.windows[0][0].requests, versions.windows[0][1].requests) == (5, 10)


# -- in a running system ----------------------------------------------------------------------------


def nan_graph(w: np.ndarray) -> bytes:
    """x @ w + NaN: every output undefined (the scheduler answers it as an error)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Add", ["y0", "n"], ["y"])],
                              "nan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(np.nan).reshape(()), "n")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def slow_graph(w: np.ndarray, matmuls: int = 600, width: int = 512) -> bytes:
    """x @ w, plus 0 x (a chain of ``matmuls`` [N, 512] x [512, 512] products of the input
    through an orthogonal matrix, so it stays finite): the same outputs, several ms slower."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((width, width)))[0].astype(np.float32)
    a = (rng.standard_normal((4, width)) / 2).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("MatMul", ["x", "a"], ["h0"])]
    nodes += [helper.make_node("MatMul", [f"h{i}", "q"], [f"h{i + 1}"]) for i in range(matmuls)]
    nodes += [helper.make_node("ReduceSum", [f"h{matmuls}", "axis"], ["s"], keepdims=1),
              helper.make_node("Mul", ["s", "zero"], ["z"]), helper.make_node("Add", ["y0", "z"], ["y"])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(a, "a"), numpy_helper.from_array(q, "q"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"),
             numpy_helper.from_array(np.float32(0).reshape(()), "zero")]
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def mv_bundle() -> bytes:
    """Model "mv" 1.0.0: full, "same" (the same graph), "nan" (NaN outputs) and "slow"."""
    files = {"full.onnx": matmul(W_FULL), "same.onnx": matmul(W_FULL), "nan.onnx": nan_graph(W_FULL),
             "slow.onnx": slow_graph(W_FULL)}
    manifest = msgspec.convert({
        "name": "mv", "version": "1.0.0", "created": 1.0,
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 4]}],
        "variants": {name[:-5]: {"file": name, "sha256": "", "size": 0} for name in files},
    }, Manifest)
    b = Bundle.create(manifest, files)
    b.sign(KEY)
    return b.to_bytes()


#: trials decided in seconds: windows of 1 s, 100 requests of each variant in windows where each
#: served 20, the p95 rule over 2 windows
STORE = ("settings = { trial_window_s = 1.0, trial_window_min_requests = 20, trial_min_requests = 100, "
         "trial_windows = 2, trial_max_s = 60 }")


def config() -> str:
    text = inference_config()
    old = ("settings = { trial_min_requests = 50, trial_window_s = 0.2, trial_window_min_requests = 10, "
           "trial_windows = 2 }")
    assert old in text and "health_report_s = 60" in text
    return text.replace(old, STORE).replace("health_report_s = 60", "health_report_s = 0.1")


async def boot(make_system, **bundles: bytes) -> System:
    """A system with the models ``bundles`` (name -> bundle) installed, 1.0.0 active."""
    system: System = make_system(config())
    await system.wait_ready("security", "modelstore", "scheduler", "health", "accel-0")
    async with system.client() as bus:
        for name, data in bundles.items():
            await bus.request("modelstore", Install(), frames=[data], timeout=60)
            await bus.call("modelstore", Activate(name=name, version="1.0.0"), ModelState)
    return system


async def infer(bus, x: np.ndarray, key: str, *, model: str = "mm", variant: str = "") -> tuple[InferResult, np.ndarray]:
    descs, frames = pack_tensors([x])
    incoming = await bus.request("scheduler", Infer(model=model, tensors=descs, key=key, variant=variant),
                                 frames=frames, timeout=10)
    result = incoming.decode(InferResult)
    return result, incoming.tensor(result.outputs[0])


async def state_of(bus, name: str) -> ModelState:
    return next(m for m in (await bus.call("modelstore", ListModels(), ModelList)).models if m.name == name)


async def serve(bus, model: str, until: Any, workers: int = 8) -> Any:
    """Requests with keys of many devices, from ``workers`` clients at once, until ``until()``
    (awaited) returns; its result.  NaN outputs come back as bad-message and are counted so."""
    done = anyio.Event()
    answered: dict[str, int] = {}
    found: list[Any] = []

    async def client(n: int) -> None:
        rng = random.Random(n)
        while not done.is_set():
            x = np.array([[rng.random() for _ in range(4)]], dtype=np.float32)
            try:
                result, _ = await infer(bus, x, f"device-{rng.randrange(10_000)}", model=model)
                answered[result.variant] = answered.get(result.variant, 0) + 1
            except BadMessage:
                answered["error"] = answered.get("error", 0) + 1

    async def watch() -> None:
        found.append(await until())
        done.set()

    async with anyio.create_task_group() as tg:
        for n in range(workers):
            tg.start_soon(client, n)
        tg.start_soon(watch)
    return found[0], answered


async def until_decided(events) -> Any:
    """The next committed or rolled-back event: (topic, ModelEvent)."""
    with anyio.fail_after(60):
        while True:
            incoming = await events.receive()
            if incoming.header.dest in ("modelstore.committed", "modelstore.rolledback"):
                return incoming.header.dest, incoming.decode(ModelEvent)


async def until_served(bus, model: str, key: str, variant: str, x: np.ndarray) -> InferResult | None:
    """Infer until the scheduler serves ``variant`` for ``key`` (it learns of the store's
    change from its event): the result (None for "nan", seen by its NaN outputs' error)."""
    with anyio.fail_after(10):
        while True:
            try:
                result, _ = await infer(bus, x, key, model=model)
            except BadMessage as exc:
                if variant == "nan" and "is NaN" in str(exc):
                    return None
                raise
            if result.variant == variant:
                return result


def key_for(variant: str, weights: dict[str, float], model: str = "mm", version: str = "1.0.0") -> str:
    return next(k for k in (f"key-{i}" for i in range(1000)) if pick_variant(model, version, k, weights) == variant)


@pytest.mark.anyio
async def test_a_variant_split_is_sticky_per_key_an_explicit_variant_wins_and_the_ladder_overrides(make_system) -> None:
    system = await boot(make_system, mm=mm_bundle())
    weights = {"full": 50.0, "small": 50.0}
    x = np.array([[0.9, 0.1, 0.2, 0.3]], dtype=np.float32)
    expect = {"full": x @ W_FULL, "small": x @ W_SMALL}
    out = system.busctl("model", "split", "mm", "variants", "full=50", "small=50", check=True).stdout
    assert "active 1.0.0, variant full=50 small=50" in out, out
    listing = system.busctl("model", "list", check=True).stdout
    assert "VARIANT" in listing and "full=50 small=50" in listing
    async with system.client() as bus:
        state = await state_of(bus, "mm")
        assert state.variant_split == weights and state.split == {} and state.active == "1.0.0"
        await until_served(bus, "mm", key_for("small", weights), "small", x)
        seen = set()
        for i in range(40):
            key = f"device-{i}"
            want = pick_variant("mm", "1.0.0", key, weights)
            for _ in range(2):  # sticky: the same key, the same variant
                result, y = await infer(bus, x, key)
                assert (result.variant, result.version) == (want, "1.0.0")
                np.testing.assert_allclose(y, expect[want], rtol=1e-6)
            resolved = await bus.call("modelstore", Resolve(name="mm", key=key), Resolved)
            assert (resolved.version, resolved.variant) == ("1.0.0", want)
            seen.add(want)
        assert seen == {"full", "small"}
        # a request that names its variant gets it, whatever the split picks for its key
        small_key = key_for("small", weights)
        result, y = await infer(bus, x, small_key, variant="full")
        assert result.variant == "full"
        np.testing.assert_allclose(y, expect["full"], rtol=1e-6)
        # variants the version does not have are refused, naming those it has
        with pytest.raises(BadMessage, match="mm 1.0.0 has no variant 'int4'; it has 'full', 'small'"):
            await bus.call("modelstore", Split(name="mm", weights={"full": 50, "int4": 50}, variants=True), ModelState)
        with pytest.raises(BadMessage, match="mm 1.0.0 has no variant 'int4', 'fallback'; it has 'full', 'small'"):
            await bus.call("modelstore", Split(name="mm", weights={"int4": 1, "fallback": 1}, variants=True), ModelState)
        with pytest.raises(BadMessage, match="mm 1.0.0 has no variant 'int4'; it has 'full', 'small'"):
            await bus.call("modelstore", Activate(name="mm", version="", variant="int4"), ModelState)
        with pytest.raises(BadMessage, match="weights must be finite, non-negative and not all zero"):
            await bus.call("modelstore", Split(name="mm", weights={"full": 0}, variants=True), ModelState)
        assert (await state_of(bus, "mm")).variant_split == weights  # unchanged by the refusals
        # under pressure the ladder's lower levels run instead of the split's pick; a named variant still wins
        degradation = await bus.subscribe("scheduler.degradation")
        await bus.call("health", Simulate(temperature_c=95.0), Simulated)
        with anyio.fail_after(15):
            while (await degradation.receive()).decode(Degradation).level != 2:
                pass
        for key in (small_key, key_for("full", weights)):
            result, _ = await infer(bus, x, key)
            assert (result.variant, result.level) == ("fallback", 2)
        assert (await infer(bus, x, small_key, variant="small"))[0].variant == "small"
        await bus.call("health", Simulate(temperature_c=40.0), Simulated)
        with anyio.fail_after(15):
            while (await degradation.receive()).decode(Degradation).level != 0:
                pass
        assert (await infer(bus, x, small_key))[0].variant == "small"
    bad = system.busctl("model", "split", "mm", "variants", "int4=1")
    assert bad.returncode == 1 and "mm 1.0.0 has no variant 'int4'; it has 'full', 'small'" in bad.stderr
    bad = system.busctl("model", "split", "mm", "variants", "small")
    assert bad.returncode == 2 and "'small' is not VARIANT=WEIGHT" in bad.stderr
    out = system.busctl("model", "split", "mm", "variants", check=True).stdout  # none: its default variant again
    assert out.rstrip().endswith("active 1.0.0, variant full")
    async with system.client() as bus:
        assert (await state_of(bus, "mm")).variant_split == {}
        await until_served(bus, "mm", small_key, "full", x)


@pytest.mark.anyio
async def test_a_variant_trial_is_rolled_back_when_it_errors_or_is_slow_and_committed_when_as_good(make_system) -> None:
    system = await boot(make_system, mv=mv_bundle())
    x = np.array([[0.5, 0.25, 0.125, 1.0]], dtype=np.float32)
    async with system.client() as bus:
        events = await bus.subscribe("modelstore.")
        for variant in ("nan", "slow", "same"):
            state = await bus.call("modelstore", Activate(name="mv", version="", variant=variant), ModelState)
            assert (state.variant_trial, state.default_variant("1.0.0"), state.active) == (variant, "full", "1.0.0")
            # without a split the variant in trial serves (as a version in trial does); split for the evidence
            await until_served(bus, "mv", "k", variant, x)
            state = await bus.call("modelstore", Split(name="mv", weights={"full": 50, variant: 50}, variants=True),
                                   ModelState)
            assert state.variant_split == {"full": 50, variant: 50} and state.variant_trial == variant
            (topic, event), answered = await serve(bus, "mv", lambda: until_decided(events))
            state = await state_of(bus, "mv")
            assert state.variant_trial == "" and state.variant_split == {} and state.trial == ""
            if variant == "same":
                assert topic == "modelstore.committed", (event, answered)
                assert (event.version, event.variant) == ("1.0.0", "same")
                assert event.detail.startswith("variant same of 1.0.0 against full: error rate 0.00% of ")
                assert event.detail.endswith("it is the version's default variant; the variant split is cleared")
                assert state.default_variants == {"1.0.0": "same"}
            else:
                assert topic == "modelstore.rolledback", (event, answered)
                assert (event.version, event.variant) == ("1.0.0", "full")
                assert event.detail.startswith(f"variant {variant} rolled back to full: trial of variant {variant} "
                                               "of 1.0.0 failed its health gates against full: ")
                why = ("error rate 100.00% of " if variant == "nan"
                       else "above 1.2x the baseline's in each of the last 2 windows")
                assert why in event.detail, event.detail
                assert state.default_variants == {}
                await until_served(bus, "mv", "k", "full", x)
            assert answered.get(variant, 0) + answered.get("error", 0) > 0 and answered.get("full", 0) > 0
        # the committed variant is what serves a request that names none; a named one still wins
        result = await until_served(bus, "mv", "k", "same", x)
        assert result is not None and result.version == "1.0.0"
        assert (await infer(bus, x, "k", model="mv", variant="full"))[0].variant == "full"
    listing = system.busctl("model", "list", check=True).stdout
    assert "same" in listing.splitlines()[1], listing
    audit = msgspec.json.decode(system.busctl("audit", "tail", "-n", "100", "--json", check=True).stdout)
    assert {r["subject"] for r in audit if r["kind"] == "model-committed"} == {"mv 1.0.0 variant same"}


def demo_bundle(version: str) -> bytes:
    """The store tests' model with a second variant, "int8" (the same graph)."""
    from test_modelstore import onnx_model

    model = onnx_model(float(version.split(".")[1]))
    manifest = msgspec.convert({"name": "demo", "version": version, "created": 0.0, "inputs": [], "outputs": [],
                                "variants": {"full": {"file": "full.onnx", "sha256": "", "size": 0},
                                             "int8": {"file": "int8.onnx", "sha256": "", "size": 0}}}, Manifest)
    b = Bundle.create(manifest, {"full.onnx": model, "int8.onnx": model})
    b.sign(KEY)
    return b.to_bytes()


async def report_variants(bus, version: str, trial: str, baseline: str, *, p95_ms: tuple[float, float]) -> list[str]:
    """Report both variants' health as a scheduler serving them side by side does (and a report
    about the version as a whole, all errors, which a variant trial does not count) until the
    store ends the variant trial; the verdicts it answered about the trial variant."""
    verdicts = []
    with anyio.fail_after(20):
        while True:
            for variant, ms in ((baseline, p95_ms[1]), (trial, p95_ms[0]), ("", 1.0)):
                recorded = await bus.call("modelstore", ReportHealth(
                    name="demo", version=version, requests=30, errors=30 if not variant else 0, variant=variant,
                    latency_hist=ReportHealth.histogram([ms] * 30)), HealthRecorded)
                assert recorded.variant == variant
                if variant == trial:
                    verdicts.append(recorded.verdict)
                else:
                    assert recorded.verdict in ("", "committed", "rolled-back")
            state = await state_of(bus, "demo")
            if not state.variant_trial:
                return verdicts
            await anyio.sleep(0.02)  # the scheduler's report period, shortened


@pytest.mark.anyio
async def test_variant_trials_in_the_store_alone(make_system) -> None:
    from test_modelstore import config as store_config, install

    system: System = make_system(store_config())
    await system.wait_ready("security", "modelstore")
    async with system.client() as bus:
        for v in ("1.0.0", "1.1.0"):
            await install(bus, demo_bundle(v))
        with pytest.raises(Exception, match="demo has no active version: a variant trial concerns the active"):
            await bus.call("modelstore", Activate(name="demo", version="", variant="int8"), ModelState)
        await bus.call("modelstore", Activate(name="demo", version="1.0.0"), ModelState)
        with pytest.raises(Rejected, match="demo 1.1.0 is not the active version .1.0.0.: a variant trial runs on"):
            await bus.call("modelstore", Activate(name="demo", version="1.1.0", variant="int8"), ModelState)
        # the default variant serving already: nothing changes
        state = await bus.call("modelstore", Activate(name="demo", version="1.0.0", variant="full"), ModelState)
        assert state.variant_trial == ""
        # a Rollback during a variant trial ends it (the version stays)
        out = system.busctl("model", "activate", "demo", "variant", "int8", check=True).stdout
        assert out.rstrip().endswith("active 1.0.0, variant int8 (in trial against full)"), out
        assert (await state_of(bus, "demo")).variant_trial == "int8"
        out = system.busctl("model", "rollback", "demo", check=True).stdout
        assert out.rstrip().endswith("active 1.0.0, variant full"), out
        state = await state_of(bus, "demo")
        assert (state.active, state.variant_trial, state.default_variant("1.0.0")) == ("1.0.0", "", "full")
        with pytest.raises(Rejected, match="no previous version"):  # and then there is nothing to roll back
            await bus.call("modelstore", Rollback(name="demo"), ModelState)
        # a slow int8 is rolled back; an int8 as fast is committed and kept the version's default
        await bus.call("modelstore", Activate(name="demo", version="1.0.0", variant="int8"), ModelState)
        verdicts = await report_variants(bus, "1.0.0", "int8", "full", p95_ms=(30.0, 5.0))
        assert set(verdicts) <= {"trial", "rolled-back", ""}
        assert (await state_of(bus, "demo")).default_variants == {}
        await bus.call("modelstore", Activate(name="demo", version="1.0.0", variant="int8"), ModelState)
        verdicts = await report_variants(bus, "1.0.0", "int8", "full", p95_ms=(5.0, 5.0))
        assert set(verdicts) <= {"trial", "committed", ""} and "trial" in verdicts
        state = await state_of(bus, "demo")
        assert state.default_variants == {"1.0.0": "int8"} and state.variant("1.0.0", "any") == "int8"
        resolved = await bus.call("modelstore", Resolve(name="demo", key="any"), Resolved)
        assert (resolved.version, resolved.variant) == ("1.0.0", "int8")
        # a version trial and a variant trial do not overlap; a variant split waits for the version trial
        await bus.call("modelstore", Activate(name="demo", version="1.1.0"), ModelState)
        with pytest.raises(Rejected, match="demo 1.1.0 is in trial against 1.0.0: a variant trial waits"):
            await bus.call("modelstore", Activate(name="demo", version="1.1.0", variant="int8"), ModelState)
        with pytest.raises(Rejected, match="a variant split would mix variants into that comparison"):
            await bus.call("modelstore", Split(name="demo", weights={"full": 1, "int8": 1}, variants=True), ModelState)
        # the version rolled back to keeps its default variant
        state = await bus.call("modelstore", Rollback(name="demo"), ModelState)
        assert state.active == "1.0.0" and state.default_variant("1.0.0") == "int8"
        assert state.variant("1.1.0", "any") == "full"
    # restarted, the store keeps the defaults (state.json)
    system.busctl("restart", "modelstore", check=True)
    await system.wait_ready("modelstore")
    async with system.client() as bus:
        assert (await state_of(bus, "demo")).default_variants == {"1.0.0": "int8"}
