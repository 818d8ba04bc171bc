"""Where PROTOCOL.md and the code had drifted apart (issue 19, "spec and code agree"), checked
against the real kernel and busctl: defaults left out of what the kernel sends, the id of a
malformed message's error, a reply whose tag is not its type, the introspection of any JSON
Schema, waiting for the bus at boot, and the name an external peer says Hello with."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import anyio
import msgspec
import pytest
import zmq

from protocols import (
    SIGNATURE,
    Codec,
    Error,
    ErrorCode,
    Header,
    Heartbeat,
    Hello,
    Kind,
    MessageEncoder,
    Ready,
    Welcome,
)

from conftest import BIN, System

BUSCTL = str(BIN / "busctl")

CONFIG = """
[services.liar]
capabilities = []

[services.shaped]
capabilities = []

[services.opaque]
capabilities = []

[services.ext]
capabilities = ["call:kernel.ListServices"]

[operator]
capabilities = ["call:*", "subscribe:*", "publish:*"]
"""


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    s = System(tmp_path_factory.mktemp("spec"), CONFIG)
    try:
        s.wait_bus(timeout=30)
        yield s
    finally:
        s.kill()


def busctl(system: System, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BUSCTL, *argv, "--run-dir", str(system.run_dir)], capture_output=True, text=True,
                          timeout=timeout)


class ExternalPeer:
    """A service written without the SDK: a raw pyzmq DEALER that reads its credential file
    (``<run-dir>/credentials/<name>``, as an external service does), says Hello and Ready,
    beats, and answers each request with ``answer(header, body) -> (header type, body dict)``.
    It runs in a thread of its own until ``close()``."""

    def __init__(self, system: System, name: str, types: list[str], answer: Any, **hello: Any) -> None:
        self.codec = Codec()
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(system.endpoint)
        credential = (system.run_dir / "credentials" / name).read_text().strip()
        self.sock.send_multipart(self.codec.pack(Header(kind=Kind.CONTROL, type="Hello", id=1),
                                                 Hello(service=name, credential=credential, types=types, **hello)))
        assert self.sock.poll(30_000), "no Welcome within 30 s"
        header, body, _ = self.codec.unpack(self.sock.recv_multipart())
        assert header.kind == Kind.REPLY and header.id == 1, msgspec.msgpack.decode(body)
        self.welcome = msgspec.msgpack.decode(body, type=Welcome)
        self.sock.send_multipart(self.codec.pack(Header(kind=Kind.CONTROL, type="Ready"), Ready()))
        self.answer = answer
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        beat = self.codec.pack(Header(kind=Kind.CONTROL, type="Heartbeat"), Heartbeat())
        next_beat = 0.0
        while not self.stop.is_set():
            if time.monotonic() >= next_beat:
                self.sock.send_multipart(beat)
                next_beat = time.monotonic() + self.welcome.heartbeat_interval
            if not self.sock.poll(50):
                continue
            header, body, _ = self.codec.unpack(self.sock.recv_multipart())
            if header.kind == Kind.REQUEST:
                typ, reply = self.answer(header, msgspec.msgpack.decode(body))
                self.sock.send_multipart([SIGNATURE, self.codec.encode(Header(kind=Kind.REPLY, type=typ, id=header.id)),
                                          msgspec.msgpack.encode(reply)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close(0)


def _hello_raw(system: System, name: str) -> tuple[Header, bytes]:
    """Say Hello as ``name`` on a raw socket; the reply's header and its undecoded body."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(system.endpoint)
        codec = Codec()
        credential = (system.run_dir / "credentials" / name).read_text().strip()
        sock.send_multipart(codec.pack(Header(kind=Kind.CONTROL, type="Hello", id=3),
                                       Hello(service=name, credential=credential)))
        assert sock.poll(30_000), "no answer to Hello within 30 s"
        header, body, _ = codec.unpack(sock.recv_multipart())
        return header, bytes(body)
    finally:
        sock.close(0)


# -- defaults are left out of what the kernel sends (3.1, 5.2, the `welcome` vector) ------------


def test_a_welcome_at_the_default_settings_leaves_them_out(system: System) -> None:
    header, body = _hello_raw(system, "ext")
    assert header.kind == Kind.REPLY and header.type == "Welcome" and header.id == 3
    assert msgspec.msgpack.decode(body) == {"type": "Welcome", "name": "ext"}


def test_a_welcome_with_other_settings_carries_them_as_float_and_int(make_system) -> None:
    s = make_system("[bus]\nheartbeat_interval = 0.5\nheartbeat_liveness = 5\nmax_message_size = 16777216\n"
                    "[services.ext]\n")
    header, body = _hello_raw(s, "ext")
    assert msgspec.msgpack.decode(body) == {"type": "Welcome", "name": "ext", "heartbeat_interval": 0.5,
                                            "heartbeat_liveness": 5, "max_message_size": 16777216}
    assert b"\xb2heartbeat_interval\xcb\x3f\xe0" in body  # a float64
    # a whole number of seconds in the config is still a float on the wire
    s2 = make_system("[bus]\nheartbeat_interval = 2\n[services.ext]\n")
    _, body = _hello_raw(s2, "ext")
    assert b"\xb2heartbeat_interval\xcb\x40\x00\x00\x00\x00\x00\x00\x00" in body


def test_the_encoder_compares_with_the_default_by_value() -> None:
    enc = MessageEncoder()
    computed = Welcome(name="calc", heartbeat_interval=float("1"), max_message_size=int("67108864"))
    assert enc.encode(computed) == msgspec.msgpack.encode(Welcome(name="calc"))
    as_int = Welcome(name="calc", heartbeat_interval=1, heartbeat_liveness=int("3"))
    assert enc.encode(as_int) == msgspec.msgpack.encode(Welcome(name="calc"))
    assert enc.encode(Header(kind=Kind.REQUEST, type="Add", id=7, deadline=float("0"))) == \
        msgspec.msgpack.encode(Header(kind=Kind.REQUEST, type="Add", id=7))
    # non-defaults stay, whatever their origin
    other = Welcome(name="calc", heartbeat_interval=float("0.5"), max_message_size=int("1024"))
    assert msgspec.msgpack.decode(enc.encode(other)) == {"type": "Welcome", "name": "calc",
                                                         "heartbeat_interval": 0.5, "max_message_size": 1024}


def test_defaults_inside_nested_structs_are_left_out_too() -> None:
    class Inner(msgspec.Struct, omit_defaults=True):
        ms: float = 0.0

    class Outer(msgspec.Struct, tag=True, omit_defaults=True):
        items: list[Inner] = []
        one: Inner | None = None

    enc = MessageEncoder()
    msg = Outer(items=[Inner(ms=float("0")), Inner(ms=1.5)], one=Inner(ms=0.0 * 3))
    assert msgspec.msgpack.decode(enc.encode(msg)) == {"type": "Outer", "items": [{}, {"ms": 1.5}], "one": {}}


# -- the id of a malformed message's error (2, 6.2) ----------------------------------------------


def test_a_request_without_a_body_is_answered_with_its_id(system: System, raw_peer) -> None:
    peer = raw_peer(system.endpoint)
    peer.hello("ext", system.credential("ext"))
    enc = msgspec.msgpack.encode
    peer.send_frames([SIGNATURE, enc(Header(kind=Kind.REQUEST, type="ListServices", dest="kernel", id=41))])
    header, body, _ = peer.recv(timeout=30)
    err = msgspec.msgpack.decode(body, type=Error)
    assert header.kind == Kind.ERROR and header.id == 41, header
    assert err.code == ErrorCode.BAD_MESSAGE and "expected at least 3 frames" in err.message
    # no readable header: id 0 (a lone frame; a header after a signature of another major version)
    for frames in ([SIGNATURE], [b"EB\x02\x00", enc(Header(kind=Kind.REQUEST, type="X", id=42))],
                   [SIGNATURE, b"\xc1"]):
        peer.send_frames(frames)
        header, body, _ = peer.recv(timeout=30)
        assert header.kind == Kind.ERROR and header.id == 0, (frames, header)
    # an error is never answered, even a malformed one; the session still works
    peer.send_frames([SIGNATURE, enc(Header(kind=Kind.ERROR, type="Error", id=43))])
    peer.send(Header(kind=Kind.REQUEST, type="ListServices", dest="kernel", id=44),
              msgspec.msgpack.encode({"type": "ListServices"}))
    header, _, _ = peer.recv(timeout=30)
    assert header.id == 44 and header.kind == Kind.REPLY, header


# -- a reply whose tag is not its type fails `busctl call` (3.3) ---------------------------------


def test_busctl_call_fails_on_a_reply_whose_tag_is_not_its_type(system: System) -> None:
    def answer(header: Header, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if body.get("honest"):
            return "Answer", {"type": "Answer", "n": 1}
        return "Answer", {"type": "Other", "n": 1}

    peer = ExternalPeer(system, "liar", ["Ask"], answer)
    try:
        ok = busctl(system, "call", "liar", "Ask", '{"honest": true}')
        assert ok.returncode == 0 and '"Answer"' in ok.stdout, ok.stderr
        bad = busctl(system, "call", "liar", "Ask")
        assert bad.returncode == 1, (bad.returncode, bad.stdout, bad.stderr)
        assert bad.stdout == "" and "Traceback" not in bad.stderr
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("busctl: call failed: ")
        assert "'Other'" in lines[0] and "'Answer'" in lines[0], lines
    finally:
        peer.close()


# -- introspection reads any JSON Schema of the shape 5.2 specifies, and says when it cannot ----

class Add(msgspec.Struct, tag=True):
    a: int
    b: int = 0


class Sum(msgspec.Struct, tag=True):
    value: float


HAND_WRITTEN = {  # as a JavaScript or Rust author writes one: definitions, $ref, oneOf, const tags
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "oneOf": [{"$ref": "#/definitions/ask"}, {"type": "object", "title": "Ping", "properties": {}}],
    "definitions": {
        "ask": {"type": "object", "required": ["type", "q"], "properties": {
            "type": {"const": "Ask"}, "q": {"type": "string"}, "n": {"type": ["integer", "null"]},
            "tags": {"type": "array", "items": {"$ref": "#/definitions/tag"}}}},
        "tag": {"type": "string", "maxLength": 20},
    },
}
HAND_WRITTEN_REPLY = {"type": "object", "properties": {"type": {"enum": ["Answer"]}, "text": {"type": "string"}}}


def _introspect(system: System, name: str) -> list[str]:
    proc = busctl(system, "introspect", name)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout.splitlines()


def test_introspect_renders_a_hand_written_json_schema(system: System) -> None:
    peer = ExternalPeer(system, "shaped", ["Ask", "Ping"], lambda h, b: ("Answer", {"type": "Answer"}),
                        schema=HAND_WRITTEN, reply_schema=HAND_WRITTEN_REPLY)
    try:
        assert _introspect(system, "shaped") == [
            "service shaped",
            "  request Ask(q: string, n?: integer | null, tags?: [string])",
            "  request Ping()",
            "  reply   Answer(text: string)",
        ]
    finally:
        peer.close()


def test_introspect_renders_msgspec_schemas_and_says_what_it_cannot_render(system: System) -> None:
    peer = ExternalPeer(system, "opaque", ["Add"], lambda h, b: ("Sum", {"type": "Sum", "value": 1.0}),
                        schema=msgspec.json.schema(Add), reply_schema=msgspec.json.schema(Sum))
    try:
        assert _introspect(system, "opaque")[1:] == ["  request Add(a: integer, b?: integer)",
                                                     "  reply   Sum(value: number)"]
    finally:
        peer.close()
    # valid JSON Schemas, but not of a message union: said, in a line each, not left out
    peer = ExternalPeer(system, "opaque", ["Add"], lambda h, b: ("Sum", {"type": "Sum", "value": 1.0}),
                        schema={"type": "string"}, reply_schema={"$ref": "https://example.com/sum.json"})
    try:
        lines = _introspect(system, "opaque")
        assert lines[1] == "  request Add"
        assert lines[2].startswith("  (cannot render the request schema for Add: a 'string' where an object "
                                   "schema (a message) was expected"), lines
        assert lines[3].startswith("  (cannot render the reply schema: the reference "
                                   "'https://example.com/sum.json' is not within the document"), lines
        assert all("busctl introspect -o json shows it as sent" in line for line in lines[2:4])
        shown = msgspec.json.decode(busctl(system, "introspect", "opaque", "-o", "json").stdout)
        assert shown["schema"] == {"type": "string"}
    finally:
        peer.close()


# -- waiting for the bus while the kernel boots (5.1) --------------------------------------------


def test_busctl_wait_bus_started_with_the_kernel_returns_once_a_hello_succeeds(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"  # does not exist yet: the kernel makes it
    waiter = subprocess.Popen([BUSCTL, "wait", "--bus", "--timeout", "90", "-o", "json", "--run-dir", str(run_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    system = System(tmp_path, "[services.ext]\n", env={"EDGEBUS_LOG_LEVEL": "debug"})
    try:
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, (waiter.returncode, err)
        answer = msgspec.json.decode(out)
        assert answer["endpoint"] == system.endpoint and answer["name"].startswith("busctl."), answer
        # it had a session: the kernel logged the Hello it accepted under that name
        deadline = time.monotonic() + 30
        while f'"service": "{answer["name"]}"' not in system.log().replace('":"', '": "'):
            assert time.monotonic() < deadline, system.log()[-3000:]
            time.sleep(0.05)
        # and a Hello succeeds for anyone from then on (the credential files are there)
        header, _ = _hello_raw(system, "ext")
        assert header.type == "Welcome"
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
        system.kill()


def test_busctl_wait_bus_times_out_with_a_message(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run([BUSCTL, "wait", "--bus", "--timeout", "1", "--run-dir", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 6, proc
    assert time.monotonic() - started < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("busctl: the bus did not accept a handshake within 1s: "), lines
    assert "edgebus is not running" in lines[0]
    # --bus without an endpoint is for wait only; wait needs a service or --bus
    for argv in (["list", "--bus"], ["wait"]):
        proc = subprocess.run([BUSCTL, *argv, "--run-dir", str(tmp_path / "none")], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith("busctl: ") and "Traceback" not in proc.stderr, proc


# -- an external service: configured without a command, says Hello with its name (5.1, 5.2) ------

EDGEBUS = str(BIN / "edgebus")


def test_an_external_service_says_hello_with_its_config_name_or_empty(system: System, raw_peer) -> None:
    credential = (system.run_dir / "credentials" / "ext").read_text()
    for said in ("ext", ""):
        peer = raw_peer(system.endpoint)
        assert peer.hello(said, credential).name == "ext"
    peer = raw_peer(system.endpoint)
    peer.send(Header(kind=Kind.CONTROL, type="Hello", id=1), Hello(service="other", credential=credential))
    err = peer.recv_error(timeout=30)
    assert err.code == ErrorCode.UNAUTHENTICATED and "belongs to 'ext', not 'other'" in err.message


def test_no_command_and_an_empty_command_are_the_same_and_the_config_check_says_so(tmp_path: Path) -> None:
    for spelling in ("", "command = []\n"):
        config = tmp_path / "system.toml"
        config.write_text(f"[services.ext]\n{spelling}\n[services.user]\ncommand = [\"/bin/true\"]\n"
                          "requires = [\"ext\"]\n")
        proc = subprocess.run([EDGEBUS, "config", "check", str(config)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 78, proc
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "services.user.requires" in lines[0], lines
        assert "'ext' is configured without a command (an external service" in lines[0], lines
