"""The scheduler's pure parts, without processes: queue order and expiry, batch formation,
placement (per-driver temperatures, failover), the degradation ladder, pipelines, settings."""

from __future__ import annotations

import math
import time
import tomllib

import anyio
import numpy as np
import pytest

from protocols.modelstore import Fallback, FeatureStats, Manifest, TensorSpec, Variant
from protocols import Tensor
from services import BadMessage, DeadlineExceeded, Overloaded, SettingsError, Unavailable, decode_settings
from services.scheduler import SchedulerSettings
from services.scheduler._batching import form_batch, misfit, split, stack, stackable, take, undefined
from services.scheduler._ladder import Ladder, fallback, variant_for
from services.scheduler._pipelines import Pipeline
from services.scheduler._placement import Driver, apply_health, place, run_with_failover, thermal_pressure
from services.scheduler._contract import Plan
from services.scheduler._queueing import Job, ModelQueue
from services.scheduler._tuning import PROBE_BATCH, PROBE_EVERY, BatchTuner, decide
from services.scheduler._settings import PipelineSettings

pytestmark = pytest.mark.anyio

FAR = 1e12  # a deadline that never passes


PLAN = Plan("m", [TensorSpec(name="x", dtype="float32", shape=[None, 4])],
            [TensorSpec(name="y", dtype="float32", shape=[None, 4])])


def job(priority: int = 1, deadline: float = FAR, version: str = "1.0.0", shape: tuple[int, ...] = (1, 4),
        value: float = 0.0, plan: Plan = PLAN, variant: str = "") -> Job:
    return Job("m", version, {"x": np.full(shape, value, dtype=np.float32)}, priority, deadline, plan, variant)


def manifest(**fields) -> Manifest:
    base = dict(name="m", version="1.0.0", created=0.0,
                inputs=[TensorSpec(name="x", dtype="float32", shape=[None, 4])],
                outputs=[TensorSpec(name="y", dtype="float32", shape=[None, 1])],
                variants={"full": Variant(file="full.onnx", sha256="", size=0)})
    return Manifest(**(base | fields))


# -- queueing ------------------------------------------------------------------------------------


async def test_queue_serves_priority_first_then_earliest_deadline_then_arrival() -> None:
    q = ModelQueue("m", max_queue=10)
    jobs = [job(2, 0), job(1, 50.0 + FAR), job(1, FAR), job(0, FAR + 9), job(1, FAR), job(0, 0)]
    for j in jobs:
        q.admit(j)
    order = [q.pop() for _ in range(len(jobs))]
    # priority 0 first, its deadline-less one last; within priority 1 the earlier deadline,
    # then arrival order for equal deadlines; no deadline counts as the latest
    assert order == [jobs[3], jobs[5], jobs[2], jobs[4], jobs[1], jobs[0]]
    assert q.head() is None and len(q) == 0


async def test_admission_refuses_a_full_queue_naming_the_setting() -> None:
    q = ModelQueue("m", max_queue=2)
    q.admit(job())
    q.admit(job())
    with pytest.raises(Overloaded, match="max_queue"):
        q.admit(job())
    assert len(q) == 2


async def test_a_job_whose_deadline_passes_before_its_batch_could_finish_is_answered_not_run() -> None:
    q = ModelQueue("m", max_queue=10)
    now = 1000.0
    q.batch_took(0.5)  # moving average: 0.1 s per batch
    late, tight, fine, gone = job(deadline=now + 0.05), job(deadline=now + 0.1), job(deadline=now + 5), job(deadline=now + 1)
    gone.cancelled = True  # its caller stopped waiting
    for j in (late, tight, gone, fine):
        q.admit(j)
    assert q.pop_live(now) is fine
    assert q.expired == 3
    for j in (late, tight):
        assert j.done and isinstance(j.error, DeadlineExceeded)
    assert not gone.done and gone.error is None  # nobody waits for that answer
    assert q.pop_live(now) is None


def _descs(names: list[str]) -> list[Tensor]:
    return [Tensor(dtype="float32", shape=[], frame=i, name=n) for i, n in enumerate(names)]


async def test_inputs_are_checked_against_the_contract_before_queueing() -> None:
    plan = Plan.of("m", manifest())
    x = np.zeros((3, 4), dtype=np.float32)
    assert plan.bind([], [x])["x"] is x  # unnamed: the contract's order
    assert plan.bind(_descs(["x"]), [x])["x"] is x
    for names, arrays, words in [
            ([], [], "no input"), ([], [np.zeros((2, 4))], r"input 'x' takes float32 \[\?, 4\], got float64"),
            ([], [np.zeros((2, 5), np.float32)], "axis 1 is 5, not 4"),
            ([], [np.array([[np.inf, 0, 0, 0]], np.float32)], "NaN"),
            ([], [x, x], "takes 1 input"), (["x", "x"], [x, x], "given twice"),
            (["z"], [x], "missing input.*'x'.*unknown input.*'z'"), (["x", ""], [x, x], "every input tensor or none"),
            ([], [np.zeros((0, 4), np.float32)], "no rows")]:
        with pytest.raises(BadMessage, match=words):
            plan.bind(_descs(names) if names else [], arrays)


async def test_named_inputs_with_a_scalar_parameter_and_a_state_batched_on_axis_1() -> None:
    """silero-vad's contract: input [N, 512], state [2, N, 128] (batch axis 1), sr a scalar."""
    plan = Plan("vad", [TensorSpec(name="input", dtype="float32", shape=[None, 512]),
                        TensorSpec(name="state", dtype="float32", shape=[2, None, 128], batch_axis=1),
                        TensorSpec(name="sr", dtype="int64", shape=[], batch_axis=None)],
                [TensorSpec(name="output", dtype="float32", shape=[None, 1]),
                 TensorSpec(name="stateN", dtype="float32", shape=[2, None, 128], batch_axis=1)])
    assert plan.batchable and plan.axes == {"input": 0, "state": 1, "sr": None}

    def vad_job(n: int, sr: int) -> Job:
        inputs = plan.bind(_descs(["sr", "state", "input"]),
                           [np.array(sr, np.int64), np.full((2, n, 128), n, np.float32),
                            np.full((n, 512), n, np.float32)])
        assert list(inputs) == ["input", "state", "sr"]  # the contract's order
        return Job("vad", "1.0.0", inputs, 1, FAR, plan)

    a, b, other_rate = vad_job(1, 16000), vad_job(2, 16000), vad_job(1, 8000)
    assert a.rows == 1 and b.rows == 2
    assert stackable(a, b) and not stackable(a, other_rate)  # a scalar parameter must be equal
    with pytest.raises(BadMessage, match="disagree on the batch size"):
        plan.bind([], [np.zeros((2, 512), np.float32), np.zeros((2, 3, 128), np.float32), np.array(16000)])
    inputs = stack([a, b])
    assert inputs["input"].shape == (3, 512) and inputs["state"].shape == (2, 3, 128) and inputs["sr"] == 16000
    outputs = {"output": np.arange(3, dtype=np.float32).reshape(3, 1), "stateN": inputs["state"] * 10}
    assert misfit([a, b], outputs) == ""
    split([a, b], outputs)
    assert a.outputs["output"].tolist() == [[0]] and b.outputs["output"].tolist() == [[1], [2]]
    assert (a.outputs["stateN"] == 10).all() and a.outputs["stateN"].shape == (2, 1, 128)
    assert (b.outputs["stateN"] == 20).all() and b.outputs["stateN"].shape == (2, 2, 128)
    assert "stateN" in misfit([a, b], {**outputs, "stateN": np.zeros((2, 2, 128), np.float32)})
    assert "no output 'stateN'" in misfit([a, b], {"output": outputs["output"]})
    nan = {**outputs, "output": np.array([[0], [np.nan], [1]], np.float32)}
    split([a, b], nan)
    assert undefined(a) == "" and undefined(b) == "output 'output' is NaN for input row(s) [0]"


async def test_a_model_with_an_output_without_a_batch_axis_is_never_batched() -> None:
    plan = Plan("m", [TensorSpec(name="x", dtype="float32", shape=[None, 4])],
                [TensorSpec(name="total", dtype="float32", shape=[], batch_axis=None)])
    assert not plan.batchable
    assert not stackable(job(plan=plan), job(plan=plan))


async def test_outputs_asked_for_are_checked_by_name() -> None:
    assert PLAN.wanted(["y"]) == ["y"]
    with pytest.raises(BadMessage, match="no output 'z'; its outputs are 'y'"):
        PLAN.wanted(["z"])


async def test_jobs_asking_for_different_variants_do_not_share_a_batch() -> None:
    assert not stackable(job(variant="int8"), job())
    assert stackable(job(variant="int8"), job(variant="int8"))


# -- batching per model ----------------------------------------------------------------------------


async def test_the_batching_decision_is_per_row_cost_alone_against_batched() -> None:
    assert decide(None, 1.0) is None and decide(1.0, None) is None
    assert decide(1.0, 0.2) is True  # a row in a batch costs a fifth: batch
    assert decide(1.0, 1.1) is False  # batches cost more per row (a large model on a CPU): do not
    assert decide(1.0, 0.9) is False  # within the margin (0.85): not worth the wait


async def test_auto_batching_turns_off_for_a_model_that_batches_badly_and_probes_again() -> None:
    t = BatchTuner("auto", 16)
    assert t.batching is None and t.limit() == 2 * PROBE_BATCH  # measuring: small batches as load allows
    for _ in range(3):
        t.record(1, 0.010, 0.011)  # a row alone: 10 ms (and 1 ms of bus hops)
        t.record(8, 0.120, 0.121)  # 8 rows: 15 ms a row
    assert t.batching is False
    limits = [t.limit() for _ in range(PROBE_EVERY * 2)]
    assert limits.count(PROBE_BATCH) == 2 and limits.count(1) == PROBE_EVERY * 2 - 2  # a small probe in PROBE_EVERY
    for _ in range(10):
        t.record(8, 0.016)  # the device got better at batches (2 ms a row)
    assert t.batching is True and t.limit() == 16
    assert "up to 16" in t.describe()


async def test_auto_batching_counts_the_bus_hops_a_batch_shares_among_its_rows() -> None:
    """A model whose compute per row does not shrink in batches still gains from them when
    each run also costs bus hops: 1 ms a row either way, 2 ms of hops a run."""
    t = BatchTuner("auto", 16)
    for _ in range(3):
        t.record(1, 0.001, 0.003)
        t.record(8, 0.008, 0.010)
    assert t.batching is True
    assert "alone 3.000 ms, batched 1.250 ms" in t.describe()
    t.record(1, 0.0, 0.001)  # a run the driver did not time (the fallback rule): not counted
    assert "alone 3.000 ms" in t.describe()


async def test_auto_batching_measures_a_row_alone_even_under_constant_load() -> None:
    t = BatchTuner("auto", 16)
    limits = [t.limit() for _ in range(8)]
    assert 1 in limits and 2 * PROBE_BATCH in limits


async def test_on_and_off_are_what_they_say() -> None:
    assert BatchTuner("off", 16).limit() == 1 and BatchTuner("on", 16).limit() == 16
    assert BatchTuner("auto", 1).limit() == 1


# -- batching ------------------------------------------------------------------------------------


async def test_a_batch_takes_stackable_jobs_up_to_max_batch() -> None:
    q = ModelQueue("m", max_queue=100)
    for _ in range(5):
        q.admit(job())
    batch = [q.pop()]
    assert take(q, batch, 3, time.time()) is False  # full
    assert len(batch) == 3 and len(q) == 2
    assert take(q, batch := [q.pop()], 8, time.time()) is True  # the queue ran dry: it may wait
    assert len(batch) == 2


async def test_a_batch_stops_at_a_job_of_another_version_priority_or_shape() -> None:
    first = job()
    assert stackable(first, job(shape=(3, 4)))  # the batch axis may differ
    assert not stackable(first, job(version="1.1.0"))
    assert not stackable(first, job(priority=0))
    assert not stackable(first, job(shape=(1, 5)))
    q = ModelQueue("m", max_queue=100)
    q.admit(job(shape=(1, 5)))  # another shape at the head (same priority, later arrival)
    assert take(q, batch := [first], 8, time.time()) is False and batch == [first] and len(q) == 1


async def test_expired_jobs_are_dropped_while_a_batch_forms() -> None:
    q = ModelQueue("m", max_queue=100)
    now = time.time()
    ok1, dead, ok2 = job(deadline=FAR), job(deadline=now - 1), job(deadline=FAR)
    for j in (ok1, dead, ok2):
        q.admit(j)
    batch = await form_batch(q, max_batch=8, max_delay=0)
    assert set(batch) == {ok1, ok2} and dead.done and q.expired == 1


async def test_a_batch_waits_up_to_max_delay_for_more_requests() -> None:
    q = ModelQueue("m", max_queue=100)
    q.admit(job())

    async def later() -> None:
        await anyio.sleep(0.05)
        q.admit(job())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(later)
            batch = await form_batch(q, max_batch=2, max_delay=10.0)  # returns when full, not after 10 s
    assert len(batch) == 2
    q.admit(job())
    started = time.monotonic()
    assert len(await form_batch(q, max_batch=2, max_delay=0.05)) == 1  # nobody came: leaves after the delay
    assert 0.04 < time.monotonic() - started < 2


async def test_stack_and_split_give_each_job_its_rows() -> None:
    batch = [job(shape=(n, 4), value=n) for n in (1, 3, 2)]
    x = stack(batch)["x"]
    assert x.shape == (6, 4)
    split(batch, {"y": x * 10})
    for j, n in zip(batch, (1, 3, 2)):
        assert j.outputs["y"].shape == (n, 4) and (j.outputs["y"] == n * 10).all()


# -- placement -----------------------------------------------------------------------------------


def test_placement_picks_the_least_loaded_driver_that_is_up() -> None:
    a, b, c = Driver("a"), Driver("b"), Driver("c")
    a.in_flight, b.in_flight, c.in_flight = 2, 1, 0
    now = time.monotonic()
    c.mark_down(now)
    assert place([a, b, c], now, 80) is b
    assert place([a, b, c], now + 1.0, 80) is c  # back after the pause
    for d in (a, b, c):
        d.mark_down(now)
    assert place([a, b, c], now, 80) is None


def test_each_driver_gets_its_own_health_sources_reading_and_a_hot_one_is_avoided() -> None:
    hot, cool = Driver("accel-0", health="health-0"), Driver("accel-1", health="health-1")
    cool.in_flight = 3  # the hot one is idle: load alone would pick it
    apply_health([hot, cool], "health-0", 92.0)
    apply_health([hot, cool], "health-1", 55.0)
    assert (hot.temperature, cool.temperature) == (92.0, 55.0)
    assert place([hot, cool], time.monotonic(), 80) is cool
    apply_health([hot, cool], "health-1", None)  # a reading without a temperature changes nothing
    apply_health([hot, cool], "health-9", 99.0)  # nor does a source no driver names
    assert (hot.temperature, cool.temperature) == (92.0, 55.0)
    apply_health([hot, cool], "health-1", 85.0)  # every driver hot: by load again
    assert place([hot, cool], time.monotonic(), 80) is hot


def test_drivers_sharing_a_health_source_share_its_readings() -> None:
    a, b = Driver("a"), Driver("b")  # both watched by the default "health"
    assert apply_health([a, b], "health", 70.0) == [a, b]
    assert a.temperature == b.temperature == 70.0


def test_thermal_pressure_is_the_coolest_driver_that_is_up() -> None:
    a, b = Driver("a", "ha"), Driver("b", "hb")
    now = time.monotonic()
    assert thermal_pressure([a, b], now) is None
    apply_health([a, b], "ha", 90.0)
    assert thermal_pressure([a, b], now) is None  # b is not known to be hot
    apply_health([a, b], "hb", 60.0)
    assert thermal_pressure([a, b], now) == 60.0
    b.mark_down(now)
    assert thermal_pressure([a, b], now) == 90.0  # only the hot one is left


async def test_a_batch_fails_over_to_another_driver() -> None:
    a, b = Driver("a"), Driver("b")
    tried: list[str] = []
    failures: list[str] = []

    async def send(driver: Driver) -> str:
        tried.append(driver.name)
        assert driver.in_flight == 1
        if driver is a:
            raise Unavailable("a is gone")
        return "result"

    result, driver = await run_with_failover([a, b], 80, time.time() + 5, "m", send,
                                             lambda d, e: failures.append(d.name))
    assert (result, driver, tried, failures) == ("result", b, ["a", "b"], ["a"])
    assert not a.up(time.monotonic()) and b.batches == 1 and a.in_flight == b.in_flight == 0


async def test_no_driver_before_the_deadline_is_a_timeout_naming_the_last_error() -> None:
    a = Driver("a")

    async def send(driver: Driver) -> None:
        raise Unavailable("a is gone")

    with anyio.fail_after(5), pytest.raises(DeadlineExceeded, match="a is gone"):
        await run_with_failover([a], 80, time.time() + 0.3, "m", send)


# -- the degradation ladder ----------------------------------------------------------------------


def test_the_ladder_steps_down_under_heat_holds_between_and_climbs_back_when_cool() -> None:
    ladder = Ladder(hot_c=80, cool_c=70, overload_depth=100)
    moves = []
    for temperature in (50, 85, 85, 85, 75, 75, 65, 65, 65):
        step = ladder.step(temperature, depth=0)
        moves.append(step and (step.previous, step.level))
    assert moves == [None, (0, 1), (1, 2), None, None, None, (2, 1), (1, 0), None]
    assert ladder.pressure == ""
    ladder.step(85, depth=0)
    assert "temperature 85" in ladder.pressure


def test_the_ladder_steps_down_under_overload_and_needs_half_the_depth_to_climb() -> None:
    ladder = Ladder(hot_c=80, cool_c=70, overload_depth=100)
    assert ladder.step(None, depth=100).level == 1 and "100 requests queued" in ladder.pressure
    assert ladder.step(None, depth=60) is None  # below overload, not yet calm
    assert ladder.step(None, depth=49).level == 0
    assert ladder.step(None, depth=0) is None  # at the top it stays


def test_each_level_runs_what_the_manifest_has() -> None:
    full_only = manifest()
    both = manifest(variants={"full": Variant(file="f", sha256="", size=0), "int8": Variant(file="i", sha256="", size=0),
                              "small": Variant(file="s", sha256="", size=0)},
                    fallback=Fallback(feature="a", threshold=0.5))
    assert [variant_for(both, level) for level in (0, 1, 2)] == ["full", "small", "fallback"]
    assert [variant_for(full_only, level) for level in (0, 1, 2)] == ["full", "full", "full"]
    int8 = manifest(variants={"full": Variant(file="f", sha256="", size=0), "int8": Variant(file="i", sha256="", size=0)})
    assert variant_for(int8, 2) == "int8"
    assert variant_for(None, 2) == "full"


def test_the_fallback_rule_thresholds_the_named_feature() -> None:
    m = manifest(fallback=Fallback(feature="b", threshold=0.5, above=1.0, below=0.0),
                 reference={n: FeatureStats(mean=0, std=1) for n in "abcd"})
    x = np.array([[0.9, 0.1, 0, 0], [0.1, 0.9, 0, 0]], dtype=np.float32)
    (out,) = fallback(m, x)
    assert out.dtype == np.float32 and out.tolist() == [[0.0], [1.0]]


# -- pipelines and settings ----------------------------------------------------------------------


def test_a_pipeline_keeps_to_its_rate_and_its_alert_follows_the_score_with_hysteresis() -> None:
    p = Pipeline(PipelineSettings(source="sensor.v", model="m", rate=2.0, on=0.7, off=0.4))
    assert (p.result_topic, p.alerts_topic) == ("results.m", "alerts.m")
    assert [p.admit(t) for t in (10.0, 10.2, 10.5, 10.9, 11.1)] == [True, False, True, False, True]
    assert [p.score(s) for s in (0.5, 0.8, 0.6, 0.9, 0.41, 0.4, 0.5, 0.1)] == [
        None, True, None, None, None, False, None, None]


def test_settings_decode_from_a_toml_table_with_an_array_of_pipeline_tables() -> None:
    table = tomllib.loads("""
max_batch = 8
drivers = [{ name = "accel-0", health = "health-0" }, { name = "accel-1" }]
[[pipelines]]
source = "sensor.vibration"
model = "vibration-anomaly"
rate = 2
""")
    s = decode_settings(table, SchedulerSettings, service="scheduler")
    assert s.max_batch == 8 and [(d.name, d.health) for d in s.drivers] == [("accel-0", "health-0"),
                                                                              ("accel-1", "health")]
    assert s.pipelines[0].model == "vibration-anomaly" and s.pipelines[0].rate == 2.0
    assert s.overload_at == 192 and math.isclose(s.step_s, 1.0)
    default = decode_settings({}, SchedulerSettings)
    assert [d.name for d in default.drivers] == ["accel-cpu"] and default.pipelines == []


@pytest.mark.parametrize("table, key", [
    ({"pipelines": [{"source": "s", "modle": "m"}]}, "settings.pipelines[0].modle"),
    ({"max_batch": 0}, "settings.max_batch"),
    ({"drivers": [{"name": "a"}, {"name": "a"}]}, "settings"),
    ({"hot_c": 60, "cool_c": 70}, "settings"),
    ({"pipelines": [{"source": "s", "model": "m", "on": 0.3, "off": 0.5}]}, "settings.pipelines[0]"),
])
def test_bad_settings_name_the_key(table: dict, key: str) -> None:
    with pytest.raises(SettingsError) as info:
        decode_settings(table, SchedulerSettings, service="scheduler")
    assert info.value.key == key


def test_a_driver_the_kernel_does_not_report_ready_gets_no_batch() -> None:
    """The scheduler starts beside its drivers: one still starting is skipped, and with none
    ready there is no placement (requests wait for one until their deadline)."""
    starting, ready = Driver("accel-a"), Driver("accel-b")
    starting.ready = False
    now = time.monotonic()
    assert place([starting, ready], now, 80.0) is ready
    ready.ready = False
    assert place([starting, ready], now, 80.0) is None
    starting.ready = True
    assert place([starting, ready], now, 80.0) is starting


async def test_a_batch_brings_back_the_union_of_the_outputs_its_jobs_want() -> None:
    from services.scheduler._batching import wanted_outputs

    a, b, c = job(), job(), job()
    a.want, b.want = frozenset({"y"}), frozenset({"z", "y"})
    assert wanted_outputs([a, b]) == ["y", "z"]
    assert wanted_outputs([a, b, c]) is None  # c wants them all
    two = Plan("m", [TensorSpec(name="x", dtype="float32", shape=[None, 4])],
               [TensorSpec(name="y", dtype="float32", shape=[None, 4]),
                TensorSpec(name="big", dtype="float32", shape=[None, 1000])])
    d = job(plan=two)
    d.want = frozenset({"y"})
    assert misfit([d], {"y": np.zeros((1, 4), np.float32)}) == ""  # "big" was not asked for: not missing
