"""Issue 11, the inference and test-harness parts: bad inference input is answered
bad-message naming the input and what was expected (never an empty or NaN "ok"), and
nothing a test starts outlives it (the fixture ends every process the kernel made; the
session fails naming any process it started that survives)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import numpy as np
import pytest

from protocols import pack_tensors
from protocols.modelstore import ListModels, ModelList
from services import BadMessage
from services.scheduler import Infer, InferResult

from conftest import ROOT, System, alive, kill_and_wait, proc_comm, proc_environ, proc_stat, wait_for

DEMO = "vibration-anomaly"  # the default config's demo model: pre op signal.frame {length: 2048}
HELPERS = Path(__file__).resolve().parent / "helpers"


# -- bad inference input ---------------------------------------------------------------------------


async def demo_system(make_system) -> System:
    """The default system, its demo model installed and active."""
    system: System = make_system(None)
    await system.wait_ready("modelstore", "scheduler", "accel-cpu", timeout=60)
    async with system.client() as bus:
        sub = await bus.subscribe("modelstore.")
        with anyio.fail_after(60):
            while True:
                models = (await bus.call("modelstore", ListModels(), ModelList)).models
                if any(m.name == DEMO and m.active for m in models):
                    break
                await sub.receive()
    return system


async def infer(bus, x: np.ndarray) -> tuple[InferResult, list[np.ndarray]]:
    descs, frames = pack_tensors([x])
    incoming = await bus.request("scheduler", Infer(model=DEMO, tensors=descs), frames=frames, timeout=20)
    result = incoming.decode(InferResult)
    return result, [np.asarray(incoming.tensor(t)) for t in result.outputs]


@pytest.mark.anyio
async def test_inference_input_the_pre_ops_cannot_take_is_bad_message_naming_it(make_system, tmp_path: Path) -> None:
    system = await demo_system(make_system)
    rng = np.random.default_rng(0)
    async with system.client() as bus:
        result, outputs = await infer(bus, rng.standard_normal((1, 2048)).astype(np.float32))  # loads the model
        assert result.model == DEMO and outputs[0].shape == (1, 1) and np.isfinite(outputs[0]).all()

        cases = [
            (np.zeros((1, 7), np.float32), "float32 [1, 7] gives 0 row"),      # shorter than one frame: was [0, 1], ok
            (np.zeros((1, 0), np.float32), "float32 [1, 0] gives 0 row"),      # no samples at all
            (rng.standard_normal((1, 4096)).astype(np.float32), "gives 2 row"),  # two frames for one request
        ]
        for x, detail in cases:
            started = time.monotonic()
            with pytest.raises(BadMessage) as info:
                await infer(bus, x)
            assert time.monotonic() - started < 2, f"{x.shape}: answered late"
            message = str(info.value)
            for part in (DEMO, "input 'features'", "'signal.frame'", detail, "at least 2048 samples",
                         "[N, 2048]"):
                assert part in message, (part, message)
        # no batch axis: refused by the model's contract before any op runs
        with pytest.raises(BadMessage, match=r"input 'features' takes float32 \[\?, \?\], got float32 \[2048\]"):
            await infer(bus, rng.standard_normal(2048).astype(np.float32))

        # a constant signal has no kurtosis: a NaN score is an error for that caller only,
        # whatever else shares its batch
        good = [rng.standard_normal((1, 2048)).astype(np.float32) for _ in range(4)]
        flat = [np.full((1, 2048), 0.5, np.float32) for _ in range(4)]
        answers: dict[int, object] = {}

        async def one(i: int, x: np.ndarray) -> None:
            try:
                answers[i] = await infer(bus, x)
            except BadMessage as exc:
                answers[i] = exc

        async with anyio.create_task_group() as tg:
            for i, x in enumerate(good + flat):
                tg.start_soon(one, i, x)
        for i in range(4):
            result, outputs = answers[i]  # type: ignore[misc]
            assert outputs[0].shape == (1, 1) and np.isfinite(outputs[0]).all()
        for i in range(4, 8):
            assert isinstance(answers[i], BadMessage) and "NaN" in str(answers[i]), answers[i]

    # the same through busctl: exit status non-zero, the error on stderr
    np.save(tmp_path / "short.npy", np.zeros((1, 7), np.float32))
    out = system.busctl("infer", DEMO, "--input", str(tmp_path / "short.npy"))
    assert out.returncode != 0 and "bad-message" in out.stderr and "at least 2048 samples" in out.stderr, out
    assert "[0, 1]" not in out.stdout


def test_ops_never_answer_with_nothing() -> None:
    from drivers import ops

    pre = ops.pipeline([("signal.frame", {"length": 2048}), ("signal.rms", {})])
    with pytest.raises(ops.OpInputError, match=r"'signal.frame'.*float32 \[3, 7\] gives an empty result"):
        pre(np.zeros((3, 7), np.float32))
    with pytest.raises(ops.OpInputError, match=r"gives 2 row\(s\).* for 1 input row"):
        pre.rows(np.zeros((1, 4096), np.float32))
    assert pre.rows(np.ones((3, 2048), np.float32)).shape == (3,)
    assert pre(np.ones(4096, np.float32)).shape == (2,)  # a long recording: a frame each, as before
    # keeping no detection is an answer, not an error
    nms = ops.pipeline([("post.nms", {"iou_threshold": 0.5, "score_threshold": 0.9})])
    assert nms(np.array([[0, 0, 1, 1, 0.1]], np.float32)).shape == (0, 5)


def test_the_fallback_rule_refuses_what_its_pre_ops_cannot_take() -> None:
    from services.modelstore import Bundle
    from services.scheduler._ladder import fallback

    manifest = Bundle.load(ROOT / "services/modelstore/demo/vibration-anomaly-1.0.0.ebm").manifest
    with pytest.raises(BadMessage, match=r"vibration-anomaly: input 0 .*'signal.frame'.*at least 2048"):
        fallback(manifest, np.zeros((1, 7), np.float32))
    (out,) = fallback(manifest, np.random.default_rng(1).standard_normal((2, 2048)).astype(np.float32))
    assert out.shape == (2, 1)


# -- nothing left behind ---------------------------------------------------------------------------


ESCAPING_HUNG_SERVICE = f"""
[bus]
heartbeat_interval = 5.0
heartbeat_liveness = 10

[services.hung]
# says Hello and Ready and hangs; first it starts a sleep in a session of its own
command = ["{{python}}", "-c", "import runpy, subprocess; subprocess.Popen(['sleep', '3600'], start_new_session=True); runpy.run_path('{HELPERS / 'hung_service.py'}')"]

[services.greeter]
command = ["{{python}}", "-m", "services.examples.greeter"]
"""


@pytest.mark.anyio
async def test_kill_ends_every_process_the_kernel_made(make_system) -> None:
    system: System = make_system(ESCAPING_HUNG_SERVICE)
    listing = await system.wait_ready("hung", "greeter")
    services = [s.pid for s in listing.services]
    kernel = system.proc.pid
    marker = str(system.run_dir).encode()

    def escaped() -> list[int]:
        return [pid for pid in _pids() if proc_comm(pid) == "sleep" and marker in proc_environ(pid)]

    sleeper = wait_for(escaped, 10, "the service's sleep in a session of its own")[0]
    for pid in services:  # each in its own process group, in the kernel's session
        stat = proc_stat(pid)
        assert stat is not None and int(stat[2]) == pid and int(stat[3]) == kernel
    assert int(proc_stat(sleeper)[3]) != kernel  # type: ignore[index]
    assert set(services) | {sleeper, kernel} <= set(system.leftovers())

    system.kill()  # no waiting afterwards: gone when it returns
    assert [pid for pid in [kernel, *services, sleeper] if alive(pid)] == []
    assert system.leftovers() == []


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


LEAKY = '''
import os, subprocess, sys

DETACH = """
import os, sys, time
if os.fork():
    os._exit(0)
os.setsid()
os.write(1, str(os.getpid()).encode())
os.close(1)
time.sleep(3600)
"""


def detached(argv, **kw):
    """A sleeper in a session of its own whose parent has exited (so it is nobody's child)."""
    return int(subprocess.run([sys.executable, "-c", DETACH, *argv], stdout=subprocess.PIPE, check=True,
                              **kw).stdout)


def test_leaks(tmp_path):
    child = subprocess.Popen(["sleep", "3600"])  # never waited for
    ours = detached([str(tmp_path / "x")])      # names this run's tmp dir, carries its token
    # not this session's: a clean environment and nothing of the run's tmp dir (someone else's)
    foreign = detached([], env={"PATH": os.environ["PATH"]})
    with open(os.environ["LEAK_OUT"], "w") as f:
        f.write(f"{child.pid} {ours} {foreign}")
'''


def test_the_session_fails_naming_a_process_it_left_running(tmp_path: Path) -> None:
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "test_leaky.py").write_text(LEAKY)
    out = tmp_path / "pids"
    env = {**os.environ, "LEAK_OUT": str(out),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path / "inner"), "--basetemp", str(tmp_path / "base"),
                           str(tmp_path / "inner" / "test_leaky.py")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path / "inner")
    child, ours, foreign = map(int, out.read_text().split())
    try:
        report = proc.stdout + proc.stderr
        assert proc.returncode == 1, report
        assert "1 passed" in report and "still running at its end" in report, report
        assert f"pid {child} " in report and f"pid {ours} " in report, report
        assert f"pid {foreign} " not in report, report
        assert not alive(child) and not alive(ours)  # killed by the check
        assert alive(foreign)  # left alone
    finally:
        kill_and_wait([child, ours, foreign])
