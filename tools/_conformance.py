"""``edgebus conformance``: drive a peer under test through scripted scenarios against a
real kernel and a scripted one, each checking a section of PROTOCOL.md (appendix
"Conformance" says what the peer serves and how it is run).

The suite speaks the wire itself, frame by frame (it must send what no SDK would), with
synchronous ZeroMQ sockets: a ``Link`` is one session with the real kernel, the
``ScriptedKernel`` a ROUTER the peer is pointed at when the suite needs to be the kernel
(withholding heartbeats, sending malformed frames, timing deadlines exactly).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import msgspec
import zmq

from protocols import SIGNATURE, Bye, Error, Header, Heartbeat, Hello, Kind, ProtocolError, Welcome
from protocols import conformance as contract
from protocols.runtime import ENV_BUS, ENV_CREDENTIAL_FD, ENV_CREDENTIAL_FILE, ENV_RUN_DIR, ENV_SERVICE

__all__ = ["add_command", "Result", "Check", "Link", "ScriptedKernel", "Suite"]

#: The system the suite boots when no --config is given: the peer is an external service
#: (no command) named ``conformance``, allowed its own topics only.
CONFIG = f"""\
# edgebus conformance: the kernel the peer under test connects to.
[bus]
heartbeat_interval = 0.5
heartbeat_liveness = 6

[services.{contract.SERVICE}]
capabilities = ["publish:{contract.TOPICS}*", "subscribe:{contract.TOPICS}*"]
"""

#: What the scripted kernel announces in its Welcome (not the defaults: the peer must use them).
SCRIPTED_INTERVAL = 0.25
SCRIPTED_LIVENESS = 8  # (2 s: a loaded machine does not end sessions by itself)
MAX_MESSAGE_SIZE = 1 << 20

_hdr_decoder = msgspec.msgpack.Decoder(Header)
_any = msgspec.msgpack.Decoder()
_enc = msgspec.msgpack.Encoder()


class Result(msgspec.Struct):
    """One scenario's outcome: one line of text, or one JSON object with ``-o json``."""

    scenario: str
    section: str
    ok: bool
    detail: str
    seconds: float


class Check(Exception):
    """A scenario's check failed: the message says what the peer did and what the spec wants."""


def check(condition: Any, message: str) -> None:
    if not condition:
        raise Check(message)


class Message(msgspec.Struct):
    """A message received by the suite: the decoded header, the body's bytes and its raw frames."""

    header: Header
    body: bytes
    raw: list[bytes]

    def decode(self, type_: Any = Any) -> Any:
        try:
            return msgspec.msgpack.decode(self.body, type=type_) if type_ is not Any else _any.decode(self.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise Check(f"a {self.header.type!r} whose body does not decode: {exc}") from None

    def describe(self) -> str:
        h = self.header
        what = f"{Kind(h.kind).name.lower()} {h.type!r}"
        if h.kind == Kind.ERROR:
            try:
                err = msgspec.msgpack.decode(self.body, type=Error)
                what += f" ({err.code.value}: {err.message})"
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass
        return what


def unpack(frames: Sequence[bytes]) -> Message:
    """Frames as the spec lays them out (section 2), or Check naming what is wrong."""
    check(len(frames) >= 3, f"a message of {len(frames)} frames (section 2: at least signature, header, body)")
    sig = frames[0]
    check(len(sig) == 4 and sig[:2] == b"EB" and sig[2] == SIGNATURE[2],
          f"frame 0 is {sig[:8].hex(' ')!r}, not the signature 45 42 01 <minor> (section 2)")
    try:
        header = _hdr_decoder.decode(frames[1])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Check(f"a header that does not decode (3.2): {exc}") from None
    return Message(header, bytes(frames[2]), [bytes(f) for f in frames[3:]])


def pack(header: Header | dict[str, Any], body: Any, raw: Sequence[bytes] = (), signature: bytes = SIGNATURE) -> list[bytes]:
    """Frames of a message; ``body`` a Struct, a dict, or bytes sent as they are."""
    body_bytes = body if isinstance(body, (bytes, bytearray)) else _enc.encode(body)
    return [signature, _enc.encode(header), body_bytes, *raw]


class Pump:
    """Every open socket of the suite, polled together: each link and the scripted kernel
    receive into their inboxes and beat on time while a scenario waits for anything."""

    def __init__(self) -> None:
        self.poller = zmq.Poller()
        self.members: dict[zmq.Socket, Any] = {}

    def add(self, member: Any) -> None:
        self.members[member.sock] = member
        self.poller.register(member.sock, zmq.POLLIN)

    def remove(self, member: Any) -> None:
        if self.members.pop(member.sock, None) is not None:
            self.poller.unregister(member.sock)

    def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            for member in list(self.members.values()):
                member.tick(now)
            left = end - now
            if left <= 0:
                return
            for sock, _ in self.poller.poll(min(left, 0.02) * 1000):
                member = self.members.get(sock)
                if member is not None:
                    member.drain()

    def until(self, predicate: Callable[[], Any], timeout: float) -> Any:
        """Pump until ``predicate()`` is truthy (returned) or ``timeout`` passes (None)."""
        end = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= end:
                return None
            self.run(0.01)


class Link:
    """A session of the suite's with the real kernel: Hello with ``credential``, then
    heartbeats on time; everything it receives but heartbeats lands in ``inbox``."""

    def __init__(self, pump: Pump, ctx: zmq.Context, endpoint: str, credential: str, service: str,
                 types: Sequence[str] = ()) -> None:
        self.pump = pump
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.inbox: collections.deque[Message] = collections.deque()
        self.ids = itertools.count(1)
        self.interval = 1.0
        self.next_beat = 0.0
        self.welcome: Welcome | None = None
        self.closed = False
        pump.add(self)
        hello_id = next(self.ids)
        self.send(Header(kind=Kind.CONTROL, type="Hello", id=hello_id),
                  Hello(service=service, credential=credential, pid=os.getpid(), types=list(types)))
        answer = self.expect(lambda m: m.header.id == hello_id, 10.0, "the answer to the suite's Hello")
        if answer.header.type != "Welcome":
            raise Check(f"the kernel refused the suite's Hello: {answer.describe()}")
        self.welcome = answer.decode(Welcome)
        self.name = self.welcome.name
        self.interval = self.welcome.heartbeat_interval

    def send(self, header: Header | dict[str, Any], body: Any, raw: Sequence[bytes] = (),
             signature: bytes = SIGNATURE) -> None:
        self.sock.send_multipart(pack(header, body, raw, signature), copy=False)

    def tick(self, now: float) -> None:
        if self.welcome is not None and now >= self.next_beat:
            self.next_beat = now + self.interval
            try:
                self.sock.send_multipart(pack(Header(kind=Kind.CONTROL, type="Heartbeat"), Heartbeat()), zmq.DONTWAIT)
            except zmq.Again:
                pass

    def drain(self) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.DONTWAIT)
            except zmq.Again:
                return
            try:
                msg = unpack(frames)
            except Check:
                continue  # the kernel sends nothing malformed; nothing to report here
            if msg.header.kind == Kind.CONTROL and msg.header.type == "Heartbeat":
                continue
            self.inbox.append(msg)

    def take(self, predicate: Callable[[Message], bool]) -> Message | None:
        for msg in self.inbox:
            if predicate(msg):
                self.inbox.remove(msg)
                return msg
        return None

    def expect(self, predicate: Callable[[Message], bool], timeout: float, what: str) -> Message:
        msg = self.pump.until(lambda: self.take(predicate), timeout)
        if msg is None:
            raise Check(f"no {what} within {timeout:g}s")
        return msg

    def request(self, dest: str, type_: str, body: Any, raw: Sequence[bytes] = (), *, deadline: float | None = None,
                header_extra: dict[str, Any] | None = None) -> int:
        """Send a request (``body``: a Struct, a dict or raw bytes); its id."""
        rid = next(self.ids)
        hdr: dict[str, Any] = {"k": 1, "t": type_, "d": dest, "i": rid,
                               "dl": time.time() + 30.0 if deadline is None else deadline}
        hdr.update(header_extra or {})
        self.send(hdr, body, raw)
        return rid

    def answer_to(self, rid: int, timeout: float, what: str) -> Message:
        return self.expect(lambda m: m.header.id == rid and m.header.kind in (Kind.REPLY, Kind.ERROR), timeout,
                           f"answer to {what}")

    def call(self, dest: str, type_: str, body: Any, raw: Sequence[bytes] = (), *, timeout: float = 10.0,
             deadline: float | None = None) -> Message:
        rid = self.request(dest, type_, body, raw, deadline=deadline if deadline is not None else time.time() + timeout)
        return self.answer_to(rid, timeout + 1.0, f"{type_} (sent to {dest})")

    def control(self, type_: str, body: Any, timeout: float = 5.0) -> Message:
        rid = next(self.ids)
        self.send(Header(kind=Kind.CONTROL, type=type_, id=rid), body)
        return self.expect(lambda m: m.header.id == rid, timeout, f"answer to {type_}")

    def close(self, bye: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if bye and self.welcome is not None:
            try:
                self.sock.send_multipart(pack(Header(kind=Kind.CONTROL, type="Bye"), Bye()), zmq.DONTWAIT)
            except zmq.Again:
                pass
        self.pump.remove(self)
        self.sock.close(linger=100 if bye else 0)


class ScriptedKernel:
    """A ROUTER at ``<dir>/bus.sock`` that plays the kernel as a scenario scripts it: it
    records what the peer sends (``inbox``, with the connection's routing id) and beats
    every SCRIPTED_INTERVAL while ``beating``."""

    def __init__(self, pump: Pump, ctx: zmq.Context, directory: Path) -> None:
        self.pump = pump
        self.dir = directory
        (directory / "credentials").mkdir(parents=True, exist_ok=True)
        self.credential = secrets.token_urlsafe(32)
        self.credential_file = directory / "credentials" / contract.SERVICE
        self.credential_file.write_text(self.credential)
        self.credential_file.chmod(0o600)
        self.endpoint = f"ipc://{directory}/bus.sock"
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(self.endpoint)
        #: (routing id, arrival time, the frames as received)
        self.inbox: collections.deque[tuple[bytes, float, list[bytes]]] = collections.deque()
        self.peer: bytes | None = None
        self.beating = False
        self.next_beat = 0.0
        pump.add(self)

    def rotate(self) -> None:
        """A new credential in the file (as a kernel writes at each start, 5.1)."""
        self.credential = secrets.token_urlsafe(32)
        self.credential_file.write_text(self.credential)

    def welcome(self, hello_id: int) -> None:
        """Welcome the peer: not the default timing, a 1 MiB limit, and a field from a later minor (3.1)."""
        self.send(pack(Header(kind=Kind.REPLY, type="Welcome", id=hello_id, sender="kernel"),
                       {"type": "Welcome", "name": contract.SERVICE, "heartbeat_interval": SCRIPTED_INTERVAL,
                        "heartbeat_liveness": SCRIPTED_LIVENESS, "max_message_size": MAX_MESSAGE_SIZE,
                        "a_later_field": True}))
        self.beating = True
        self.next_beat = 0.0

    def tick(self, now: float) -> None:
        if self.beating and self.peer is not None and now >= self.next_beat:
            self.next_beat = now + SCRIPTED_INTERVAL
            self.send(pack(Header(kind=Kind.CONTROL, type="Heartbeat", sender="kernel"), Heartbeat()))

    def drain(self) -> None:
        while True:
            try:
                identity, *frames = self.sock.recv_multipart(zmq.DONTWAIT)
            except zmq.Again:
                return
            self.inbox.append((identity, time.monotonic(), frames))

    def send(self, frames: list[bytes], to: bytes | None = None) -> None:
        try:
            self.sock.send_multipart([to or self.peer or b"", *frames], zmq.DONTWAIT)
        except (zmq.Again, zmq.ZMQError):
            pass  # (a peer gone: ROUTER drops what it cannot route)

    def next(self, timeout: float, what: str) -> tuple[bytes, float, Message]:
        """The peer's next message, checked against section 2 and 3.2."""
        got = self.pump.until(lambda: self.inbox.popleft() if self.inbox else None, timeout)
        if got is None:
            raise Check(f"the peer sent no {what} within {timeout:g}s")
        identity, at, frames = got
        return identity, at, unpack(frames)

    def expect(self, predicate: Callable[[Message], bool], timeout: float, what: str,
               allow: Callable[[Message], bool] = lambda m: m.header.kind == Kind.CONTROL and m.header.type == "Heartbeat",
               ) -> Message:
        """The first message matching ``predicate``; any other but those ``allow`` lets pass is a failure."""
        end = time.monotonic() + timeout
        while True:
            _, _, msg = self.next(max(0.0, end - time.monotonic()), what)
            if predicate(msg):
                return msg
            check(allow(msg), f"the peer sent {msg.describe()} (id {msg.header.id}) while the suite waited for {what}")

    def close(self) -> None:
        self.pump.remove(self)
        self.sock.close(linger=0)


class PeerProcess:
    """The peer under test, started as a service without a ``command`` would be by hand
    (section 17's variables, its credential in a file); its output goes to ``log``."""

    def __init__(self, argv: list[str], log: Path, pump: Pump) -> None:
        self.argv = argv
        self.log = log
        self.pump = pump
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, bus: str, run_dir: Path, credential_file: Path) -> None:
        self.stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUS_")}
        env.update({ENV_SERVICE: contract.SERVICE, ENV_BUS: bus, ENV_RUN_DIR: str(run_dir),
                    ENV_CREDENTIAL_FILE: str(credential_file), "EDGEBUS_METRICS_INTERVAL": "0"})
        env.pop(ENV_CREDENTIAL_FD, None)
        with self.log.open("ab") as out:
            out.write(f"--- {shlex.join(self.argv)} ({bus})\n".encode())
            out.flush()
            try:
                self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                             start_new_session=True)
            except OSError as exc:
                raise Check(f"cannot start the peer {self.argv[0]!r}: {exc.strerror or exc}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            assert self.proc is not None
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM its process group, SIGKILL after ``grace``; reap it."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.pump.until(lambda: proc.poll() is not None, grace)  # (the suite's sessions beat meanwhile)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what remains of its group (npm's node...)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Suite:
    """One run: a temporary directory, the real kernel (booted on first need), the
    scripted kernel, the peer process, and the sessions of the suite."""

    def __init__(self, peer: list[str], config: str | None, workdir: Path) -> None:
        self.work = workdir
        self.config_text = config
        self.ctx = zmq.Context()
        self.pump = Pump()
        self.peer = PeerProcess(peer, workdir / "peer.log", self.pump)
        self.kernel: subprocess.Popen[bytes] | None = None
        self.run_dir = workdir / "run"
        self.operator: Link | None = None
        self.boot_failure = ""
        #: set when the peer, running, never answered: later scenarios fail at once with it
        self.unresponsive: dict[str, str] = {}
        self.scripted: ScriptedKernel | None = None
        #: where the peer is connected: "kernel", "scripted" or ""
        self.peer_on = ""
        self.extra: list[PeerProcess] = []

    # -- the real kernel -------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.run_dir}/bus.sock"

    def credential(self, name: str) -> str:
        return (self.run_dir / "credentials" / name).read_text().strip()

    def boot(self) -> Link:
        """The real kernel and the suite's operator session (once)."""
        if self.operator is not None:
            return self.operator
        if self.boot_failure:
            raise Check(self.boot_failure)
        try:
            self.operator = self._boot()
        except Check as exc:
            self.boot_failure = str(exc)
            raise
        return self.operator

    def _boot(self) -> Link:
        if self.kernel is None:
            config = self.work / "system.toml"
            config.write_text(self.config_text or CONFIG)
            log = (self.work / "kernel.log").open("ab")
            self.kernel = subprocess.Popen(
                [sys.executable, "-m", "tools.edgebus", "boot", "--config", str(config), "--run-dir", str(self.run_dir),
                 "--state-dir", str(self.work / "state")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
            log.close()
        kernel = self.kernel
        creds = self.run_dir / "credentials"
        up = self.pump.until(lambda: kernel.poll() is not None or (
            (self.run_dir / "bus.sock").exists() and (creds / "operator").exists()), 30.0)
        if up:  # (the credential files are written together, at start)
            self.pump.until(lambda: (creds / contract.SERVICE).exists(), 2.0)
        if kernel.poll() is not None:
            raise Check(f"the kernel exited with status {kernel.returncode}: {self._tail(self.work / 'kernel.log')}")
        if not up:
            raise Check(f"the kernel did not make {self.run_dir}/bus.sock and the operator's credential within 30s")
        if not (creds / contract.SERVICE).exists():
            raise Check(f"the kernel wrote no credential for {contract.SERVICE!r}: the config must declare "
                        f"[services.{contract.SERVICE}] without a command (PROTOCOL.md A.1)")
        return Link(self.pump, self.ctx, self.endpoint, self.credential("operator"), "conformance-suite")

    def link(self, credential: str, service: str, types: Sequence[str] = ()) -> Link:
        return Link(self.pump, self.ctx, self.endpoint, credential, service, types)

    def peer_on_kernel(self, timeout: float = 20.0) -> Link:
        """The peer started against the real kernel and serving (an Echo answered)."""
        op = self.boot()
        if self.peer_on == "kernel" and self.peer.running():
            return op
        if self.unresponsive.get("kernel"):
            raise Check(self.unresponsive["kernel"])
        self.peer.start(self.endpoint, self.run_dir, self.run_dir / "credentials" / contract.SERVICE)
        self.peer_on = "kernel"
        try:
            self.wait_serving(timeout)
        except Check as exc:
            if self.peer.running():  # (a peer that hangs is not waited for again by every scenario)
                self.unresponsive["kernel"] = f"{exc} (and it still runs)"
            raise
        return op

    def wait_serving(self, timeout: float) -> None:
        op = self.boot()
        end = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < end:
            if not self.peer.running():
                raise Check(f"the peer exited with status {self.peer.exited()} before serving; "
                            f"its output ends: {self.peer.tail(5)}")
            answer = op.call(contract.SERVICE, "Echo", contract.Echo(text="up?"), timeout=2.0)
            if answer.header.kind == Kind.REPLY:
                return
            last = answer.describe()
            self.pump.run(0.1)
        raise Check(f"the peer did not serve an Echo through the kernel within {timeout:g}s (last: {last})")

    # -- the scripted kernel ---------------------------------------------------------------

    def script(self) -> ScriptedKernel:
        if self.scripted is None:
            self.scripted = ScriptedKernel(self.pump, self.ctx, self.work / "scripted")
        return self.scripted

    def start_on_script(self) -> tuple[bytes, Message]:
        """The peer started (again) against the scripted kernel: its connection and first message."""
        sk = self.script()
        if self.unresponsive.get("scripted"):
            raise Check(self.unresponsive["scripted"])
        self.peer.stop()
        sk.peer, sk.beating = None, False
        sk.inbox.clear()
        self.peer.start(sk.endpoint, sk.dir, sk.credential_file)
        self.peer_on = "scripted"
        try:
            identity, _, first = sk.next(20.0, "Hello")
        except Check as exc:
            if self.peer.running():
                self.unresponsive["scripted"] = f"{exc} (and it still runs)"
            raise
        return identity, first

    def peer_on_script(self, fresh: bool = False) -> ScriptedKernel:
        """The peer in a session with the scripted kernel (started, welcomed, Ready), or a new one."""
        sk = self.script()
        if self.peer_on == "scripted" and self.peer.running() and not fresh and sk.peer is not None:
            return sk
        identity, hello = self.start_on_script()
        sk.peer = identity
        sk.welcome(hello.header.id)
        sk.expect(lambda m: m.header.kind == Kind.CONTROL and m.header.type == "Ready", 15.0, "Ready after the Welcome")
        return sk

    # -- the end ---------------------------------------------------------------------------

    def close(self) -> None:
        for p in [self.peer, *self.extra]:
            p.stop()
        if self.operator is not None:
            self.operator.close()
        for member in list(self.pump.members.values()):
            if isinstance(member, Link):
                member.close(bye=False)
        if self.scripted is not None:
            self.scripted.close()
        if self.kernel is not None:
            self.kernel.send_signal(signal.SIGTERM)
            try:
                self.kernel.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.kernel.pid, signal.SIGKILL)  # (it leads its session and process group)
                self.kernel.wait()
        self.ctx.term()

    @staticmethod
    def _tail(path: Path, lines: int = 3) -> str:
        try:
            return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def run_suite(peer: list[str], config: str | None, only: Sequence[str], emit: Callable[[Result], None],
              workdir: Path) -> list[Result]:
    from tools._conformance_scenarios import SCENARIOS

    selected = [s for s in SCENARIOS if not only or s.name in only]
    suite = Suite(peer, config, workdir)
    results: list[Result] = []
    try:
        for scenario in selected:
            started = time.monotonic()
            try:
                detail = scenario.run(suite) or ""
                ok = True
            except Check as exc:
                detail, ok = str(exc), False
            except (zmq.ZMQError, ProtocolError, OSError) as exc:
                detail, ok = f"{type(exc).__name__}: {exc}", False
            except Exception as exc:  # an answer the checks did not foresee: a failure, not a traceback
                detail, ok = f"the suite could not check the peer's answer ({type(exc).__name__}: {exc})", False
            result = Result(scenario.name, scenario.section, ok, detail, round(time.monotonic() - started, 3))
            results.append(result)
            emit(result)
    finally:
        suite.close()
    return results


def _command(args: argparse.Namespace) -> int:
    from tools._conformance_scenarios import SCENARIOS

    names = [s.name for s in SCENARIOS]
    only = [n for arg in args.only for n in arg.split(",") if n]
    unknown = [n for n in only if n not in names]
    if unknown:
        print(f"edgebus conformance: no scenario {unknown[0]!r}; the scenarios: {', '.join(names)}", file=sys.stderr)
        return 2
    try:
        peer = shlex.split(args.peer)
    except ValueError as exc:
        print(f"edgebus conformance: --peer: {exc}", file=sys.stderr)
        return 2
    if not peer:
        print("edgebus conformance: --peer: an empty command", file=sys.stderr)
        return 2
    if shutil.which(peer[0]) is None:
        print(f"edgebus conformance: --peer: no program {peer[0]!r} (not on PATH, or not executable)", file=sys.stderr)
        return 2
    config = None
    if args.config:
        config = Path(args.config).read_text()  # (a missing file: one line, by tools._cli.finish)
    json_lines = args.output == "json"
    json_enc = msgspec.json.Encoder()

    def emit(result: Result) -> None:
        if json_lines:
            sys.stdout.write(json_enc.encode(result).decode() + "\n")
        else:
            mark = "[  OK  ]" if result.ok else "[FAILED]"
            line = f"{mark} {result.scenario:<24} {result.section:<14} {result.seconds:6.2f}s"
            if result.detail:
                line += f"  {result.detail}"
            print(line)
        sys.stdout.flush()

    with tempfile.TemporaryDirectory(prefix="edgebus-conformance-") as tmp:
        results = run_suite(peer, config, only, emit, Path(tmp))
        failed = [r for r in results if not r.ok]
        if failed and not json_lines:
            tail = (Path(tmp) / "peer.log").read_text(errors="replace").splitlines()[-20:] \
                if (Path(tmp) / "peer.log").exists() else []
            if tail:
                print("the peer's last output lines:", file=sys.stderr)
                for line in tail:
                    print(f"  {line}", file=sys.stderr)
        if not json_lines:
            print(f"{len(results) - len(failed)} of {len(results)} scenarios passed")
    return 1 if failed else 0


def add_command(sub: Any) -> None:
    """Register ``edgebus conformance`` on the edgebus command's subparsers."""
    p = sub.add_parser("conformance", help="run the protocol conformance suite against a peer (PROTOCOL.md, Conformance)",
                       description="Boot a kernel and drive the peer under test (a command serving the "
                                   "conformance service of PROTOCOL.md's appendix) through scripted scenarios.")
    p.add_argument("--peer", required=True, metavar="COMMAND",
                   help="the command that runs the peer (shell words), e.g. 'node protocols/examples/js/peer.js'")
    p.add_argument("--config", help=f"the system config to boot (it must declare [services.{contract.SERVICE}] "
                                    "without a command); a minimal one when omitted")
    p.add_argument("--only", action="append", default=[], metavar="SCENARIO",
                   help="run only this scenario (repeat, or separate with commas)")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="one line per scenario, or JSON lines")
    p.set_defaults(func=_command)

