"""busctl as an operator meets it, on real systems: global options before or after the verb,
-o short|json|json-pretty with JSON that holds what the human view shows, distinct exit codes,
timeouts true to their help and a dead kernel seen at once, no traceback for a user error,
quiet on a closed pipe, NO_COLOR, shell completion, monitor with bodies and error codes,
pub/sub from the shell, and top (q quits, rates in the first frame) in a terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path
from typing import Any, Iterator

import anyio
import msgspec
import pytest

from services.examples.greeter import Tick

from conftest import BIN, System, free_port, wait_for

pytestmark = pytest.mark.anyio

BUSCTL = str(BIN / "busctl")

CONFIG = """
[bus]
heartbeat_interval = 0.2
heartbeat_liveness = 3

[services.greeter]
command = ["{python}", "-m", "services.examples.greeter"]
capabilities = ["publish:example.*"]
settings = { tick_interval = 0.1 }

[services.other]
command = ["{python}", "-m", "services.examples.greeter"]
settings = { tick_interval = 60 }

[services.listener]
capabilities = ["subscribe:shell.*"]

[operator]
capabilities = ["call:kernel.*", "call:greeter.*", "call:other.*", "subscribe:kernel.*", "subscribe:example.*",
                "subscribe:shell.*", "publish:shell.*"]
"""


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    s = System(tmp_path_factory.mktemp("busctl"), CONFIG)
    try:
        s.wait_bus()
        anyio.run(lambda: s.wait_ready("greeter", "other"))
        yield s
    finally:
        s.kill()


def busctl(*argv: str, env: dict[str, str] | None = None, timeout: float = 30,
           stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """busctl with exactly these arguments (System.busctl appends --run-dir at the end)."""
    return subprocess.run([BUSCTL, *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, input=stdin)


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


# -- a program in a terminal --------------------------------------------------------------------


class Terminal:
    """A program on the slave side of a pty of a given size: its screen output is read from
    the master, keys are written to it."""

    def __init__(self, argv: list[str], cols: int = 160, rows: int = 40, env: dict[str, str] | None = None) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.before = termios.tcgetattr(self.slave)
        full_env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
        # its own session, with this terminal as its controlling one: ^C is SIGINT, as in a shell
        self.proc = subprocess.Popen(argv, stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                     env={**full_env, "TERM": "xterm-256color", **(env or {})},
                                     start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        self.screen = b""

    def read_until(self, predicate: Any, timeout: float, what: str) -> bytes:
        end = time.monotonic() + timeout
        while not predicate(self.screen):
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; screen:\n"
                                     + self.screen.decode(errors="replace")[-3000:])
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:  # EIO: the program ended and closed the terminal
                    pass
        return self.screen

    def send(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            self.drain()
        return code

    def drain(self) -> None:
        while select.select([self.master], [], [], 0.05)[0]:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.screen += data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminal() -> Iterator[Any]:
    opened: list[Terminal] = []

    def open_(*argv: str, **kw: Any) -> Terminal:
        t = Terminal([BUSCTL, *argv], **kw)
        opened.append(t)
        return t

    yield open_
    for t in opened:
        t.close()


# -- 4. conventions -----------------------------------------------------------------------------


def test_global_options_go_before_or_after_the_verb_and_busctl_alone_lists(system: System) -> None:
    run = str(system.run_dir)
    variants = [
        ("--run-dir", run, "list", "-o", "json"),
        ("list", "--run-dir", run, "-o", "json"),
        ("-o", "json", "--run-dir", run, "list"),
        ("--run-dir", run, "list", "--json"),          # --json is -o json
        ("--run-dir", run, "-o", "json"),               # no verb: list
        ("--run-dir", run, "--timeout", "3", "--deadline", "4", "list", "-o", "json-pretty"),
    ]
    outputs = []
    for argv in variants:
        proc = busctl(*argv)
        assert proc.returncode == 0, (argv, proc.stderr)
        listing = json.loads(proc.stdout)
        outputs.append(sorted((s["name"], s["state"], s["pid"]) for s in listing))
        if "json-pretty" in argv:
            assert proc.stdout.startswith("[\n  {"), proc.stdout[:50]
        else:
            assert len(proc.stdout.strip().splitlines()) == 1  # compact: one line
    assert all(o == outputs[0] for o in outputs) and ("greeter", "ready") in {o[:2] for o in outputs[0]}
    human = busctl("--run-dir", run)
    assert human.returncode == 0 and human.stdout.splitlines()[0].split()[:3] == ["NAME", "STATE", "PID"]
    assert "\x1b[" not in human.stdout  # no colour into a pipe
    assert [line.split()[0] for line in human.stdout.splitlines()[1:]] == [o[0] for o in outputs[0]]

    version = busctl("--version")
    assert version.returncode == 0 and version.stdout.startswith("busctl ")
    edgebus = subprocess.run([str(BIN / "edgebus"), "--version"], capture_output=True, text=True, timeout=30)
    assert edgebus.returncode == 0 and edgebus.stdout.split()[1:] == version.stdout.split()[1:]


def test_every_option_has_help_and_the_help_tells_the_exit_codes() -> None:
    import argparse

    from tools.busctl import EXIT_CODES, build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name}: {a.option_strings or a.dest}" for name, p in [("busctl", parser), *verbs.items()]
               for a in p._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert not missing, missing
    out = busctl("--help").stdout
    for code, text in EXIT_CODES.items():
        assert f"  {code}  {text}" in out
    assert set(EXIT_CODES) == set(range(8))
    for name in verbs:
        proc = busctl(name, "--help")
        assert proc.returncode == 0 and ("--deadline" in proc.stdout or name == "completion"), name
        assert "==SUPPRESS==" not in proc.stdout, name


def test_a_key_that_begins_with_a_dash_is_a_key_not_an_option(tmp_path: Path) -> None:
    """Z85 has "-" among its characters: one key in 85 begins with it (the random keys of
    test_revocation met it).  busctl takes it as the KEY of security enroll; anything else
    unknown stays a usage error (exit 2)."""
    key = "-!MRtMdmC[-.PaRxpV1X41Nqw6<9QSqxL0^y5YH!"
    gone = str(tmp_path / "not-running")
    enroll = busctl("security", "enroll", "remote", key, "--run-dir", gone)
    assert enroll.returncode == 3 and "is not running" in enroll.stderr, enroll.stderr  # parsed: it went to connect
    for argv in (("security", "enroll", "remote", "-short"), ("list", key), ("security", "enroll", "a", "b", "c")):
        proc = busctl(*argv, "--run-dir", gone)
        assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr, (argv, proc.stderr)


def test_json_holds_what_the_human_view_shows(system: System) -> None:
    run = ("--run-dir", str(system.run_dir))
    # call: the reply itself, as the human view prints it, not an envelope
    human = busctl(*run, "call", "greeter", "Add", '{"a": 2, "b": 3}')
    js = busctl(*run, "call", "greeter", "Add", '{"a": 2, "b": 3}', "-o", "json")
    assert json.loads(human.stdout) == json.loads(js.stdout) == {"type": "Sum", "value": 5.0}
    # status: every field the human view lists, at its default or not
    status = json.loads(busctl(*run, "status", "other", "-o", "json").stdout)
    lines = busctl(*run, "status", "other").stdout.splitlines()
    # (the fields, a blank line, then its last log lines: JSON's "logs")
    shown = [line.split(":", 1)[0].strip() for line in lines[:lines.index("")]] + ["logs"]
    assert [k.replace("_", " ") for k in status] == shown
    assert status["requires"] == [] and status["last_exit"] == "" and status["restarts"] == 0
    # caps: each pattern with its origin and expiry (none: null), as the table's rows
    caps = json.loads(busctl(*run, "caps", "-o", "json").stdout)
    assert caps["greeter"] == [{"capability": "publish:example.*", "origin": "config", "expires": None}]
    assert caps["other"] == []
    rows = busctl(*run, "caps").stdout.splitlines()[1:]
    assert len(rows) == sum(max(len(v), 1) for v in caps.values())
    # top: numbers as numbers (rates, CPU, bytes), null where the table shows nothing
    frame = json.loads(busctl(*run, "top", "--iterations", "1", "--interval", "0.3", "-o", "json").stdout)
    greeter = next(s for s in frame["services"] if s["name"] == "greeter")
    assert isinstance(greeter["msg_per_s"], float) and greeter["msg_per_s"] > 0  # it ticks every 0.1 s
    assert isinstance(greeter["rss_bytes"], int) and greeter["rss_bytes"] > 1 << 20
    assert isinstance(greeter["cpu_percent"], float) and greeter["pid"] > 0
    assert isinstance(frame["kernel_uptime"], float) and frame["kernel_uptime"] > 0


def test_metrics_as_json_are_families_of_numeric_samples(make_system) -> None:
    port = free_port()
    system: System = make_system(f"""
[services.greeter]
command = ["{{python}}", "-m", "services.examples.greeter"]
environment = {{ EDGEBUS_METRICS_INTERVAL = "0.2" }}
[services.telemetry]
command = ["{{python}}", "-m", "services.telemetry"]
capabilities = ["subscribe:metrics.*", "call:kernel.ListServices"]
environment = {{ EDGEBUS_METRICS_INTERVAL = "0.2" }}
settings = {{ http = "127.0.0.1:{port}" }}
""")
    anyio.run(lambda: system.wait_ready("greeter", "telemetry"))
    system.busctl("call", "greeter", "Greet", '{"who": "metrics"}', check=True)

    def greeted() -> list[dict[str, Any]] | None:
        families = json.loads(system.busctl("metrics", "-o", "json", check=True).stdout)
        by_name = {f["name"]: f for f in families}
        samples = [s for s in by_name.get("edgebus_requests_total", {}).get("samples", [])
                   if s["labels"].get("service") == "greeter" and s["labels"].get("type") == "Greet"]
        return families if samples and samples[0]["value"] == 1.0 else None

    families = wait_for(greeted, 15, "the Greet request in the metrics", interval=0.2)
    by_name = {f["name"]: f for f in families}
    # named as the text names them (# TYPE edgebus_requests_total counter)
    assert by_name["edgebus_requests_total"]["type"] == "counter" and by_name["edgebus_requests_total"]["help"]
    rss = [s for s in by_name["process_resident_memory_bytes"]["samples"] if s["labels"]["service"] == "greeter"]
    assert rss and isinstance(rss[0]["value"], float) and rss[0]["value"] > 0
    text = system.busctl("metrics", check=True).stdout  # (a moment later: more samples, the same families)
    assert {f["name"] for f in families} <= {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    from tools._busctl_commands import parse_metrics

    assert sum(len(f["samples"]) for f in parse_metrics(text)) == len(
        [line for line in text.splitlines() if line and not line.startswith("#")])


async def test_sched_and_model_list_json_keep_the_fields_at_their_defaults(make_system) -> None:
    pytest.importorskip("onnxruntime")
    from test_inference import boot

    system = await boot(make_system)
    import numpy as np

    np.save(system.tmp / "x.npy", np.ones((1, 4), dtype=np.float32))
    from protocols.modelstore import ModelState
    from protocols.scheduler import DriverState, ModelQueue, Schedule

    models = json.loads(system.busctl("model", "list", "-o", "json", check=True).stdout)
    assert list(models[0]) == list(ModelState.__struct_fields__)
    assert models[0]["name"] == "mm" and models[0]["previous"] == "" and models[0]["split"] == {}
    system.busctl("infer", "mm", "--input", str(system.tmp / "x.npy"), check=True)
    sched = json.loads(system.busctl("sched", "-o", "json", check=True).stdout)
    assert list(sched) == list(Schedule.__struct_fields__) and sched["pressure"] == ""  # at its default, still there
    assert list(sched["drivers"][0]) == list(DriverState.__struct_fields__)
    assert list(sched["models"][0]) == list(ModelQueue.__struct_fields__)


def test_exit_codes_are_distinct(system: System) -> None:
    def code(*argv: str) -> tuple[int, str]:
        proc = system.busctl(*argv)
        no_traceback(proc)
        return proc.returncode, proc.stderr

    assert code("call", "greeter", "Greet", '{"who": "codes"}')[0] == 0
    rc, err = code("call", "greeter", "Add", '{"a": "x"}')
    assert rc == 1 and "bad-message" in err
    rc, err = code("call", "greeter", "Add", "{not json")
    assert rc == 2 and "not valid JSON" in err
    rc, err = code("status", "nosuch")
    assert rc == 4 and "nosuch" in err
    rc, err = code("stop", "nosuch")
    assert rc == 4 and "nosuch" in err
    rc, err = code("call", "greeter", "Sleep", '{"seconds": 5}', "--deadline", "0.3")
    assert rc == 6 and "deadline" in err
    rc, err = code("call", "secret", "Ping")
    assert rc == 7 and "call:secret.Ping" in err
    system.busctl("stop", "other", check=True)
    try:
        rc, err = code("call", "other", "Greet")
        assert rc == 5 and "unavailable" in err
        rc, err = code("wait", "other", "--state", "ready", "--deadline", "0.3")
        assert rc == 6 and "'stopped'" in err
    finally:
        system.busctl("start", "other", check=True)
    assert code("wait", "other", "--state", "ready")[0] == 0


def test_no_traceback_for_a_user_error(system: System, tmp_path: Path) -> None:
    run = ("--run-dir", str(system.run_dir))
    cases = [
        (2, (*run, "call", "greeter", "Greet", "[1, 2]"), "must be a JSON object"),
        (2, (*run, "call", "greeter", "Greet", "-"), "not valid JSON"),          # stdin: "nope"
        (2, (*run, "pub", "shell.x", "Tick", "{oops"), "not valid JSON"),
        (2, (*run, "pub", "shell.x", "no good", "{}"), "not a message type name"),
        (1, (*run, "call", "greeter", "NoSuchType"), "unknown-type"),
        (2, (*run, "infer", "m", "--input", str(tmp_path / "missing.npy")), "cannot read"),
        (2, (*run, "model", "install", str(tmp_path / "missing.ebm")), "cannot read"),
        (2, (*run, "caps", "grant", "greeter", "call:x.Y", "--ttl", "nan"), "--ttl nan"),
        (2, (*run, "caps", "grant", "greeter", "call:x.Y", "--ttl", "soon"), "invalid float"),
        (2, (*run, "list", "--deadline", "-1"), "seconds > 0"),
        (2, (*run, "list", "--timeout", "inf"), "seconds > 0"),
        (2, (*run, "audit", "tail", "-n", "0"), "at least 1"),
        (2, (*run, "top", "--interval", "0"), "seconds > 0"),
        (2, (*run, "monitor", "--limit", "-2"), "--limit -2"),
        (2, (*run, "frobnicate"), "invalid choice"),
        (2, ("--bus", "nonsense", "--credential-file", str(tmp_path), "list"), "--bus nonsense"),
        (3, ("--bus", f"ipc://{system.run_dir}/bus.sock", "--credential-file", str(tmp_path), "list"), "cannot read"),
        (3, ("--run-dir", str(tmp_path / "nowhere"), "list"), "not running"),
        (3, ("--credential-file", str(tmp_path / "none"), *run, "list"), "no credential"),
    ]
    for expected, argv, text in cases:
        proc = busctl(*argv, stdin="nope")
        no_traceback(proc)
        assert proc.returncode == expected and text in proc.stderr, (argv, proc.returncode, proc.stderr)
        message = [line for line in proc.stderr.splitlines() if line.startswith("busctl")]
        assert len(message) == 1, (argv, proc.stderr)


def test_quiet_on_a_closed_pipe(system: System) -> None:
    # a stream whose reader goes away
    proc = subprocess.Popen([BUSCTL, "--run-dir", str(system.run_dir), "sub", "example."], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"TIME")
        proc.stdout.close()  # the reader closes; ticks keep coming every 0.1 s
        code = proc.wait(10)
        err = proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 141 and err == "", (code, err)
    # a table into head
    shell = subprocess.run(["bash", "-c", f"set -o pipefail; {BUSCTL} --run-dir {system.run_dir} list | head -1; "
                                          f"{BUSCTL} completion bash | head -1"],
                           capture_output=True, text=True, timeout=30)
    assert shell.stderr == "" and shell.stdout.startswith("NAME"), shell


def test_colour_on_a_terminal_only_and_never_with_no_color(system: System, terminal) -> None:
    coloured = terminal("--run-dir", str(system.run_dir), "list")
    assert coloured.wait(20) == 0
    assert b"\x1b[32mready\x1b[0m" in coloured.screen, coloured.screen
    plain = terminal("--run-dir", str(system.run_dir), "list", env={"NO_COLOR": "1"})
    assert plain.wait(20) == 0
    assert b"\x1b[" not in plain.screen and b"ready" in plain.screen, plain.screen


def test_shell_completion_for_bash_and_zsh(system: System) -> None:
    run = str(system.run_dir)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    probe = f"""
source <(busctl completion bash)
t() {{ COMP_WORDS=("$@"); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); COMPREPLY=(); _busctl; echo "${{COMPREPLY[*]}}"; }}
t busctl st
t busctl --run-dir {run} status ""
t busctl restart --run-dir={run} gr
t busctl -o ""
t busctl audit ""
t busctl --run-dir {run} caps ""
t busctl list --dead
"""
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out
    assert out.stdout.splitlines() == ["status start stop stream", "greeter listener other", "greeter",
                                       "short json json-pretty", "tail verify", "grant revoke reset greeter listener other",
                                       "--deadline"]
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed: its completion was not exercised")
    zprobe = f"""
autoload -U compinit; compinit -u -D
source <(busctl completion zsh)
compadd() {{ shift; print -r -- "$*"; }}
_files() {{ print -r -- "files $*"; }}
t() {{ words=("$@"); CURRENT=${{#words}}; _busctl; }}
t busctl --run-dir {run} start ""
t busctl model install ""
t busctl --run-dir ""
t busctl co
"""
    out = subprocess.run(["zsh", "-f", "-c", zprobe], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out
    assert out.stdout.splitlines() == ["greeter listener other", "files ", "files -/", " ".join(
        ["list", "status", "logs", "call", "introspect", "start", "stop", "restart", "reload", "wait", "caps", "audit",
         "trust", "attest", "security", "model", "infer", "stream", "sched", "metrics", "top", "monitor", "pub",
         "sub", "completion"])], out.stdout


# -- 2. timeouts --------------------------------------------------------------------------------


def test_defaults_are_what_the_help_says() -> None:
    from tools.busctl import build_parser, deadline_of

    parser = build_parser()
    # (argv, --timeout, the request's deadline)
    for argv, timeout, deadline in (
            (["list"], 5.0, 10.0),
            (["start", "x"], 5.0, 90.0),      # start/stop/restart/reload used to set 60 s for every verb
            (["list"], 5.0, 10.0),
            (["--deadline", "3", "stop", "x"], 5.0, 3.0),
            (["stop", "x", "--deadline", "4"], 5.0, 4.0),
            (["--timeout", "2", "reload"], 2.0, 90.0),
            (["model", "install", "b.ebm"], 5.0, 120.0),
            (["model", "list"], 5.0, 10.0),
            (["status", "x", "--timeout", "1"], 1.0, 10.0)):
        args = parser.parse_args(argv)
        assert (args.timeout, deadline_of(args)) == (timeout, deadline), argv
    assert "(default 5)" in busctl("list", "--help").stdout
    assert "deadline 90 s" in busctl("restart", "--help").stdout


def test_the_deadline_is_ten_seconds_unless_given(system: System) -> None:
    t0 = time.monotonic()
    proc = system.busctl("call", "greeter", "Sleep", '{"seconds": 30}', timeout=40)
    took = time.monotonic() - t0
    assert proc.returncode == 6 and 9.5 < took < 15, (proc.returncode, took, proc.stderr)


def test_a_dead_kernel_is_seen_at_once(make_system) -> None:
    system: System = make_system(CONFIG)
    anyio.run(lambda: system.wait_ready("greeter"))
    pid = system.proc.pid
    os.kill(pid, signal.SIGKILL)
    system.proc.wait(10)
    for argv in (["list"], ["--timeout", "60", "status", "greeter"]):
        t0 = time.monotonic()
        proc = system.busctl(*argv)
        took = time.monotonic() - t0
        assert proc.returncode == 3 and took < 1.0, (argv, took, proc.stderr)
        assert proc.stderr.strip() == (
            f"busctl: edgebus is not running with run directory {system.run_dir} (no kernel holds "
            f"{system.run_dir}/kernel.lock; the last one was pid {pid}); start it (edgebus boot), or give busctl "
            "the run directory it uses (--run-dir or EDGEBUS_RUN_DIR)"), proc.stderr


# -- 5. monitor and the shell -------------------------------------------------------------------


async def test_monitor_shows_bodies_and_error_codes(system: System, terminal) -> None:
    run = ("--run-dir", str(system.run_dir))
    long_text = "x" * 500
    width = 140
    narrow = terminal(*run, "monitor", "--service", "other", cols=width)
    full = terminal(*run, "monitor", "--service", "other", "--full", cols=width)
    js = subprocess.Popen([BUSCTL, *run, "monitor", "--service", "other", "-o", "json"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for t in (narrow, full):
            t.read_until(lambda s: b"OUTCOME" in s, 10, "the monitor's header")
        await anyio.sleep(0.5)  # (its Monitor request reaches the kernel after the header is printed)
        system.busctl("call", "other", "Echo", json.dumps({"text": long_text}), check=True)   # request, reply
        system.busctl("call", "other", "Add", '{"a": "x"}')                                    # request, error
        system.busctl("call", "other", "Nope")                                                 # refused
        for t in (narrow, full):
            t.read_until(lambda s: b" Nope " in s, 10, "the refused request")
            t.send(b"\x03")  # ^C
            assert t.wait(10) == 130
        await anyio.sleep(0.5)
        js.send_signal(signal.SIGINT)
        out, err = js.communicate(timeout=10)
    finally:
        if js.poll() is None:
            js.kill()
            js.wait()
    assert js.returncode == 130 and "Traceback" not in err, err
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in narrow.screen.decode().splitlines() if "other" in line]
    assert any("\x1b[31m" in line for line in narrow.screen.decode().splitlines())  # (an error's code in red)
    echo = next(line for line in lines if " request Echo " in line)
    assert '{"text": "xxx' in echo and echo.rstrip().endswith("…") and len(echo.rstrip()) <= width, echo
    error = next(line for line in lines if " error " in line)
    assert "bad-message" in error and '"code": "bad-message"' in error, error
    refused = next(line for line in lines if " Nope " in line)
    assert "unknown-type" in refused and " ok " not in refused, refused
    reply = next(line for line in lines if " reply " in line)
    assert " ok " in reply
    full_echo = next(line for line in full.screen.decode().splitlines() if " request Echo " in line)
    assert json.dumps({"text": long_text}) in full_echo
    records = [json.loads(line) for line in out.splitlines()]
    by_kind = {(r["kind"], r["message_type"]): r for r in records}
    assert by_kind[("request", "Echo")]["body"] == {"type": "Echo", "text": long_text}
    assert by_kind[("request", "Echo")]["outcome"] == "ok" and not by_kind[("request", "Echo")]["refused"]
    assert by_kind[("reply", "Echoed")]["outcome"] == "ok"
    assert by_kind[("error", "Error")]["outcome"] == "bad-message"
    assert by_kind[("error", "Error")]["body"]["code"] == "bad-message"
    assert by_kind[("request", "Nope")]["outcome"] == "unknown-type" and by_kind[("request", "Nope")]["refused"]


async def test_pub_and_sub_from_the_shell(system: System) -> None:
    run = ("--run-dir", str(system.run_dir))
    sub = subprocess.Popen([BUSCTL, *run, "sub", "shell.", "--limit", "2", "-o", "json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        async with system.client("listener") as bus, bus.subscribe("shell.") as events:
            # Publish until the busctl subscriber has seen two (it subscribes when it is ready).
            with anyio.fail_after(20):
                n = 0
                while sub.poll() is None:
                    proc = busctl(*run, "pub", "shell.test", "Tick", json.dumps({"n": n}))
                    assert proc.returncode == 0 and proc.stdout == "published Tick on shell.test\n", proc
                    n += 1
                    await anyio.sleep(0.1)
            first = await events.receive()  # an SDK peer gets it typed
            assert first.decode(Tick) == Tick(n=0) and first.sender.startswith("busctl")
        out, err = sub.communicate(timeout=10)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    assert sub.returncode == 0, err
    events_seen = [json.loads(line) for line in out.splitlines()]
    assert len(events_seen) == 2
    assert all(e["topic"] == "shell.test" and e["type"] == "Tick" and e["sender"].startswith("busctl")
               for e in events_seen)
    assert [e["body"]["n"] for e in events_seen] == sorted(e["body"]["n"] for e in events_seen)
    # capability-checked like any peer: the operator may not publish nor subscribe elsewhere
    denied = busctl(*run, "pub", "alerts.x", "Tick", '{"n": 1}')
    assert denied.returncode == 7 and "publish:alerts.x" in denied.stderr, denied
    denied = busctl(*run, "sub", "alerts.")
    assert denied.returncode == 7 and "subscribe:alerts.*" in denied.stderr, denied
    human = busctl(*run, "sub", "example.", "--limit", "1")
    assert human.returncode == 0 and human.stdout.splitlines()[0].split() == ["TIME", "TOPIC", "TYPE", "SENDER", "BODY"]
    assert "example.tick" in human.stdout and '{"n": ' in human.stdout


# -- top ----------------------------------------------------------------------------------------


def test_top_quits_on_q_with_rates_in_its_first_frame(system: System, terminal) -> None:
    system.busctl("stop", "other", check=True)
    try:
        top = terminal("--run-dir", str(system.run_dir), "top", "--interval", "5", env={"NO_COLOR": "1"})
        screen = top.read_until(lambda s: s.count(b"greeter") >= 1 and b"DENIED" in s, 15, "the first frame")
        frame = screen.decode().rsplit("busctl top", 1)[1]
        head = frame.splitlines()[0]
        assert "kernel up " in head and "kernel up ?" not in head and "(q quits)" in head, head
        assert time.strftime("%Y-%m-%d") in head
        rows = {line.split()[0]: line.split() for line in frame.splitlines()[2:] if line.strip()}
        assert rows["NAME"][:6] == ["NAME", "STATE", "PID", "MSG/S", "CPU", "RSS"]
        greeter = rows["greeter"]
        assert greeter[1] == "ready" and int(greeter[3]) > 0 and greeter[5].endswith("M"), greeter  # a rate at once
        other = rows["other"]
        assert other[1] == "stopped" and other[2:6] == ["-", "0", "-", "-"], other  # no stale CPU or memory
        t0 = time.monotonic()
        top.send(b"q")
        assert top.wait(5) == 0
        assert time.monotonic() - t0 < 2  # not at the next 5 s screen
        after = termios.tcgetattr(top.slave)
        assert after[3] & termios.ICANON and after[3] & termios.ECHO  # the terminal is given back
        assert after == top.before
    finally:
        system.busctl("start", "other", check=True)
