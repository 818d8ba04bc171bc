"""Property-based: random frames thrown at a live router never take it down."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import SIGNATURE, Header, Kind
from services.examples.greeter import Greet, Greeting

from conftest import RawPeer, System

CONFIG = """
[bus]
max_message_size = 65536

[services.greeter]
command = ["{python}", "-m", "services.examples.greeter"]

[services.client]
capabilities = ["call:*", "publish:*", "subscribe:*"]
"""

header_maps = st.fixed_dictionaries(
    {},
    optional={
        "k": st.one_of(st.integers(-2, 8), st.text(max_size=3)),
        "t": st.one_of(st.sampled_from(["Hello", "Ready", "Heartbeat", "Bye", "Subscribe", "Greet", "Error"]),
                       st.text(max_size=8), st.integers(-(2**63), 2**64 - 1)),
        "d": st.one_of(st.sampled_from(["greeter", "kernel", "client", ""]), st.text(max_size=8)),
        "i": st.one_of(st.integers(-(2**63), 2**64 - 1), st.floats()),
        "dl": st.one_of(st.floats(allow_nan=True), st.integers(-(2**63), 2**64 - 1)),
        "s": st.text(max_size=8),
        "zz": st.binary(max_size=8),
    },
)
bodies = st.one_of(
    st.binary(max_size=64),
    st.dictionaries(st.sampled_from(["type", "who", "topics", "credential", "service", "a"]),
                    st.one_of(st.text(max_size=8), st.integers(-(2**63), 2**64 - 1), st.lists(st.text(max_size=4), max_size=3)),
                    max_size=4).map(msgspec.msgpack.encode),
)
messages = st.one_of(
    st.lists(st.binary(max_size=32), min_size=0, max_size=6),
    st.tuples(st.sampled_from([SIGNATURE, b"EB\x01\x07", b"EB\x02\x00", b"EB", b""]),
              st.one_of(header_maps.map(msgspec.msgpack.encode), st.binary(max_size=24)),
              bodies, st.lists(st.binary(max_size=16), max_size=3)).map(lambda t: [t[0], t[1], t[2], *t[3]]),
)


@pytest.fixture(scope="module")
def fuzz_system(tmp_path_factory: pytest.TempPathFactory):
    import anyio

    s = System(tmp_path_factory.mktemp("fuzz"), CONFIG)
    s.wait_bus()
    anyio.run(lambda: s.wait_ready("greeter"))
    yield s
    assert s.stop() == 0


def _drain(peer: RawPeer) -> None:
    while peer.sock.poll(0):
        peer.sock.recv_multipart()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(messages, min_size=1, max_size=8), authenticated=st.booleans())
def test_random_frames_never_break_the_router(fuzz_system: System, batch: list[list[bytes]], authenticated: bool) -> None:
    peer = RawPeer(fuzz_system.endpoint)
    try:
        if authenticated:
            peer.hello("client", fuzz_system.credential("client"))
        for frames in batch:
            if frames:
                peer.send_frames(frames)
        _drain(peer)
    finally:
        peer.close()
    # The kernel is alive and still routes for a well-behaved peer.
    check = RawPeer(fuzz_system.endpoint)
    try:
        check.hello("client", fuzz_system.credential("client"))
        check.send(Header(kind=Kind.REQUEST, type="Greet", dest="greeter", id=1), Greet(who="ok"))
        header, body, _ = check.recv(timeout=10)
        assert header.kind == Kind.REPLY, msgspec.msgpack.decode(body)
        assert msgspec.msgpack.decode(body, type=Greeting).text == "hello, ok"
    finally:
        check.close()
    assert fuzz_system.proc.poll() is None


def test_fuzzing_found_no_internal_errors(fuzz_system: System) -> None:
    """Runs after the property test in this module: the router never hit its last-resort
    handler (a bug would show as router_internal_error in the log)."""
    assert "router_internal_error" not in fuzz_system.log()
