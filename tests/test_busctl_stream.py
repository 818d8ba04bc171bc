"""`busctl stream MODEL --input FILE.wav`: a .wav file through a stateful stream of real
silero-vad (from the silero-vad wheel, packed with its states declared), as fast as the
answers come and in real time; one line (or JSON object) per chunk, a summary, the stream
closed however busctl ends (the end of the file, Ctrl-C, a reader that went away).

One booted system for the module (security, model store, scheduler, one ONNX Runtime
driver); the .wav files are written here (a tone, then silence)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import wave
from pathlib import Path
from typing import Any, Iterator

import anyio
import numpy as np
import pytest

from protocols import Monitor, Traffic

from conftest import BIN, System
from test_inference import config
from helpers.models import pack_real, system_with
from test_streams import CHUNK, VAD_SPEC, direct

RATE = 16000


def write_wav(path: Path, seconds_tone: float, seconds_silence: float, rate: int = RATE) -> np.ndarray:
    """A 16-bit PCM .wav: a 440 Hz tone then silence; returns the float32 samples busctl reads."""
    t = np.arange(int(seconds_tone * rate)) / rate
    signal_ = np.concatenate([0.5 * np.sin(2 * np.pi * 440 * t), np.zeros(int(seconds_silence * rate))])
    ints = np.round(signal_ * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(ints.tobytes())
    return (ints.astype(np.float64) / 32768).astype(np.float32)


@pytest.fixture(scope="module")
def vad_path(real_model) -> Path:
    return real_model("silero-vad")


@pytest.fixture(scope="module")
def system(vad_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    tmp = tmp_path_factory.mktemp("busctl-stream")
    bundles = {"vad": pack_real(vad_path, tmp / "vad.ebm", "vad", VAD_SPEC),
               "plain": pack_real(vad_path, tmp / "plain.ebm", "plain", {})}  # no states declared
    text = config(1).replace("max_delay_ms = 5,", 'max_delay_ms = 2, batching = "on", max_batch = 32,')
    # the scheduler follows its drivers' readiness (a driver that stops resets its streams at once)
    text = text.replace('"publish:scheduler.*",', '"publish:scheduler.*", "subscribe:kernel.services", '
                                                   '"call:kernel.ListServices",')
    with system_with(tmp, text, bundles) as s:
        yield s


def _json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_a_wav_streamed_as_fast_as_possible_gives_the_models_own_outputs(system: System, vad_path: Path,
                                                                         tmp_path: Path) -> None:
    samples = write_wav(tmp_path / "tone.wav", 0.5, 0.5)  # 16000 samples: 31.25 chunks of 512
    chunks = -(-samples.size // CHUNK)
    padded = np.zeros(chunks * CHUNK, np.float32)
    padded[:samples.size] = samples
    expected = direct(vad_path, padded)

    proc = system.busctl("stream", "vad", "--input", str(tmp_path / "tone.wav"), "-o", "json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = _json_lines(proc.stdout)
    opened, rows, summary = lines[0], lines[1:-1], lines[-1]
    assert opened["kind"] == "opened" and opened["chunks"] == chunks == 32 and opened["chunk_samples"] == CHUNK
    assert opened["rate"] == RATE and opened["chunk_ms"] == pytest.approx(32.0)
    assert any("sr=16000" in n and "sample rate" in n for n in opened["notes"]), opened["notes"]
    assert any("zero-padded with 384 samples" in n for n in opened["notes"]), opened["notes"]
    assert [r["seq"] for r in rows] == list(range(1, chunks + 1))
    assert [r["time_s"] for r in rows] == pytest.approx([i * 0.032 for i in range(chunks)])
    for r, want in zip(rows, expected):
        assert r["kind"] == "chunk" and r["reset"] == "" and list(r["outputs"]) == ["output"]
        got = np.array(r["outputs"]["output"]["values"], dtype=np.float32)
        np.testing.assert_array_equal(got, want, err_msg=f"chunk {r['seq']}")
    speech = [float(w[0, 0]) for w in expected]
    assert max(speech[:15]) > max(speech[-10:])  # (the tone scores above the silence)
    assert summary["kind"] == "summary" and summary["chunks"] == chunks and summary["closed"] is True
    assert summary["resets"] == [] and not summary["interrupted"]
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"] and lat["mean"] > 0

    # the same for a person: one line per chunk, the notes, the summary
    proc = system.busctl("stream", "vad", "--input", str(tmp_path / "tone.wav"), "--value", "sr=16000:int64",
                         timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0].startswith("stream ") and "32 chunks of 512 samples (32.0 ms)" in out[0]
    assert not any("the file's sample rate" in line for line in out)  # given: not taken from the file
    assert any("zero-padded" in line for line in out)
    chunk_lines = [line for line in out if re.match(r"\s+\d+\s+\d+\.\d{3}s  ", line)]
    assert len(chunk_lines) == chunks and chunk_lines[1].split()[:2] == ["2", "0.032s"]
    assert "output=" in chunk_lines[0] and "ms, batch" in chunk_lines[0]
    assert out[-1].startswith("32 chunks in ") and "p99" in out[-1] and out[-1].endswith("stream closed")


def test_realtime_takes_about_the_files_duration(system: System, tmp_path: Path) -> None:
    write_wav(tmp_path / "rt.wav", 0.75, 0.75)  # 1.5 s: 47 chunks of 32 ms
    period, chunks = CHUNK / RATE, -(-24000 // CHUNK)
    t0 = time.monotonic()
    proc = system.busctl("stream", "vad", "--input", str(tmp_path / "rt.wav"), "--realtime", "--json", timeout=60)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    lines = _json_lines(proc.stdout)
    summary = lines[-1]
    assert lines[0]["realtime"] is True and summary["chunks"] == chunks
    # the last chunk is sent (chunks - 1) periods after the first, and not much later
    assert (chunks - 1) * period <= summary["seconds"] <= chunks * period + 1.0, summary
    assert wall >= (chunks - 1) * period
    rows = lines[1:-1]
    assert all(r["late_ms"] >= r["latency_ms"] - 1e-6 for r in rows)
    assert summary["late_chunks"] <= chunks // 10, summary  # (a loaded 2-core machine: allow hiccups)

    # as fast as possible is much quicker than real time
    fast = _json_lines(system.busctl("stream", "vad", "--input", str(tmp_path / "rt.wav"), "--json",
                                     timeout=60).stdout)[-1]
    assert fast["seconds"] < summary["seconds"] / 2


def test_a_model_without_states_is_refused_with_the_reason(system: System, tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", 0.1, 0.0)
    proc = system.busctl("stream", "plain", "--input", str(tmp_path / "a.wav"))
    assert proc.returncode == 1 and proc.stdout == ""
    assert "declares no states" in proc.stderr and "pack spec" in proc.stderr, proc.stderr
    proc = system.busctl("stream", "nosuch", "--input", str(tmp_path / "a.wav"))
    assert proc.returncode == 4, proc.stderr


def test_bad_input_is_a_usage_error(system: System, tmp_path: Path) -> None:
    (tmp_path / "not.wav").write_text("hello, not a wave file\n")
    proc = system.busctl("stream", "vad", "--input", str(tmp_path / "not.wav"))
    assert proc.returncode == 2 and "cannot read" in proc.stderr and "not.wav" in proc.stderr, proc.stderr
    proc = system.busctl("stream", "vad", "--input", str(tmp_path / "missing.wav"))
    assert proc.returncode == 2 and "missing.wav" in proc.stderr, proc.stderr
    write_wav(tmp_path / "a.wav", 0.1, 0.0)
    proc = system.busctl("stream", "vad", "--input", str(tmp_path / "a.wav"), "--value", "sr=fast")
    assert proc.returncode == 2 and "is not a number" in proc.stderr, proc.stderr
    proc = system.busctl("stream", "vad", "--input", str(tmp_path / "a.wav"), "--chunk", "0")
    assert proc.returncode == 2 and "--chunk 0" in proc.stderr, proc.stderr
    proc = system.busctl("stream", "vad")  # no --input
    assert proc.returncode == 2 and "--input" in proc.stderr, proc.stderr


async def _close_streams_seen(system: System, run: Any) -> list[Traffic]:
    """The CloseStream requests busctl sends while ``run()`` goes (seen by the kernel's monitor)."""
    seen: list[Traffic] = []
    async with system.client() as bus:
        async with bus.receive_unsolicited("kernel.monitor") as sub:
            await bus.call("kernel", Monitor(message_type="CloseStream"))
            await anyio.to_thread.run_sync(run)
            with anyio.move_on_after(5):
                async for incoming in sub:
                    if incoming.type == "Traffic":
                        traffic = incoming.decode(Traffic)
                        if traffic.sender.startswith("busctl") and traffic.kind == "request":
                            seen.append(traffic)
                            break
    return seen


def _start(system: System, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(BIN / "busctl"), "stream", *args, "--run-dir", str(system.run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_closes_the_stream_and_sums_up(system: System, tmp_path: Path) -> None:
    write_wav(tmp_path / "long.wav", 5.0, 5.0)  # 10 s in real time: interrupted long before its end
    result: dict[str, Any] = {}

    def run() -> None:
        proc = _start(system, "vad", "--input", str(tmp_path / "long.wav"), "--realtime")
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline()]
            while lines[-1].split()[:1] != ["2"]:  # the head, the notes, two chunks
                lines.append(proc.stdout.readline())
            proc.send_signal(signal.SIGINT)
            rest, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        result.update(code=proc.returncode, lines=lines, rest=rest, err=err)

    seen = anyio.run(_close_streams_seen, system, run)
    assert result["code"] == 130, result
    assert result["lines"][0].startswith("stream ") and len(result["lines"]) == 5, result
    last = result["rest"].splitlines()[-1]
    assert last.startswith("interrupted after ") and last.endswith("stream closed"), result
    assert seen, "busctl sent no CloseStream"


def test_a_reader_that_goes_away_ends_busctl_quietly_and_closes_the_stream(system: System, tmp_path: Path) -> None:
    write_wav(tmp_path / "long.wav", 5.0, 5.0)
    result: dict[str, Any] = {}

    def run() -> None:
        proc = _start(system, "vad", "--input", str(tmp_path / "long.wav"), "--realtime")
        try:
            assert proc.stdout is not None
            proc.stdout.readline()
            proc.stdout.close()  # as `busctl stream ... | head -1`
            result["code"] = proc.wait(timeout=20)
            assert proc.stderr is not None
            result["err"] = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()

    seen = anyio.run(_close_streams_seen, system, run)
    assert result["code"] == 141 and result["err"] == "", result
    assert seen, "busctl sent no CloseStream"


def test_a_reset_in_a_result_is_printed(system: System, tmp_path: Path) -> None:
    """kill -9 of the driver while busctl streams: the next chunk's result says the stream
    was reset, busctl prints it and counts it, and goes on to the end."""
    write_wav(tmp_path / "mid.wav", 1.5, 1.5)  # 3 s in real time
    from test_streams import _pid

    async def main() -> tuple[int, str, str]:
        async with system.client() as bus:
            pid = await _pid(bus, "accel-0")
        proc = await anyio.open_process([str(BIN / "busctl"), "stream", "vad", "--input", str(tmp_path / "mid.wav"),
                                         "--realtime", "--json", "--deadline", "30", "--run-dir",
                                         str(system.run_dir)])
        try:
            assert proc.stdout is not None and proc.stderr is not None
            buffered = b""
            with anyio.fail_after(20):
                while buffered.count(b"\n") < 6:  # the head and 5 chunks
                    buffered += await proc.stdout.receive()
            os.kill(pid, signal.SIGKILL)
            with anyio.fail_after(60):
                async for data in proc.stdout:
                    buffered += data
                err = b"".join([d async for d in proc.stderr])
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await system.wait_restarted("accel-0", pid)
        return proc.returncode or 0, buffered.decode(), err.decode()

    code, stdout, err = anyio.run(main)
    assert code == 0, err
    lines = _json_lines(stdout)
    rows, summary = lines[1:-1], lines[-1]
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    reset = [r for r in rows if r["reset"]]
    assert len(reset) == 1 and "accel-0" in reset[0]["reset"], [r["reset"] for r in rows]
    assert summary["resets"] == [{"seq": reset[0]["seq"], "reason": reset[0]["reset"]}]
