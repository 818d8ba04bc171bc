"""Hardening of the kernel (issue 11): one size limit end to end, every request answered,
unauthenticated input rate-limited, no orphans, memory given back.  Real kernels, real
services, real sockets."""

from __future__ import annotations

import time

import anyio
import msgspec
import pytest

from protocols import SIGNATURE, Error, ErrorCode, Header, Kind
from services.examples.greeter import Echo, Greet

from conftest import RawPeer, System

LIMIT = 65536

GREETER = """
[services.greeter]
command = ["{python}", "-m", "services.examples.greeter"]
"""

_enc = msgspec.msgpack.Encoder()


def _sized_request(typ: str, field: str, total: int, msg_id: int) -> list[bytes]:
    """A request to the greeter of exactly ``total`` bytes (all frames), padded in ``field``."""
    hdr = _enc.encode(Header(kind=Kind.REQUEST, type=typ, dest="greeter", id=msg_id, deadline=time.time() + 10))
    cls = {"Echo": Echo, "Greet": Greet}[typ]
    n = total - 4 - len(hdr)
    while 4 + len(hdr) + len(body := _enc.encode(cls(**{field: "x" * n}))) > total:
        n -= 1
    assert 4 + len(hdr) + len(body) == total
    return [SIGNATURE, hdr, body]


# -- one size limit end to end ---------------------------------------------------------------


@pytest.mark.parametrize("typ, field, delta, outcome", [
    # the request itself: refused at once when it would exceed the limit as forwarded
    ("Echo", "text", -300, "reply"),
    ("Echo", "text", -1, "bad-message"),
    ("Echo", "text", 0, "bad-message"),
    ("Echo", "text", +1, "bad-message"),
    # the reply grows past the limit (Greeting adds to what it was asked): the requester
    # learns it at once, whether the reply was too large as sent or only once stamped
    ("Greet", "who", -300, "reply"),
    ("Greet", "who", -20, "bad-message"),
    ("Greet", "who", -12, "bad-message"),
])
def test_requests_at_the_size_limit_are_answered_at_once(make_system, typ: str, field: str, delta: int,
                                                          outcome: str) -> None:
    system: System = make_system(f"[bus]\nmax_message_size = {LIMIT}\n" + GREETER)
    anyio.run(lambda: system.wait_ready("greeter"))
    peer = RawPeer(system.endpoint)
    try:
        peer.hello("test", system.credential("operator"))
        started = time.monotonic()
        peer.send_frames(_sized_request(typ, field, LIMIT + delta, 7))
        header, body, _ = peer.recv(timeout=5)  # the deadline is 10 s: no waiting it out
        elapsed = time.monotonic() - started
    finally:
        peer.close()
    assert header.id == 7
    assert elapsed < 1.0, elapsed
    if outcome == "reply":
        assert header.kind == Kind.REPLY and header.sender == "greeter"
        return
    assert header.kind == Kind.ERROR, header
    err = msgspec.msgpack.decode(body, type=Error)
    assert err.code == ErrorCode.BAD_MESSAGE and str(LIMIT) in err.message, err
    assert header.sender == "kernel"


def test_an_event_too_large_once_stamped_is_refused_to_its_publisher(make_system) -> None:
    system: System = make_system(f"[bus]\nmax_message_size = {LIMIT}\n")
    peer = RawPeer(system.endpoint)
    try:
        peer.hello("test", system.credential("operator"))
        hdr = _enc.encode(Header(kind=Kind.EVENT, type="Echo", dest="big.topic", id=3))
        n = LIMIT - 4 - len(hdr)
        while 4 + len(hdr) + len(body := _enc.encode(Echo(text="x" * n))) > LIMIT:
            n -= 1
        peer.send_frames([SIGNATURE, hdr, body])
        err = peer.recv_error(timeout=2)
    finally:
        peer.close()
    assert err.code == ErrorCode.BAD_MESSAGE and "as forwarded" in err.message, err
