"""Hardening of the kernel (issue 11): one size limit end to end, every request answered,
unauthenticated input rate-limited, no orphans, memory given back.  Real kernels, real
services, real sockets."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import zmq

from protocols import SIGNATURE, Error, ErrorCode, Header, Hello, Kind, ListServices, ServiceList, transport
from services import RemoteError
from services.examples.greeter import Echo, Greet, Sleep

from conftest import RawPeer, System, alive, children, group, proc_comm, wait_for

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


# -- every request gets exactly one answer ---------------------------------------------------


@contextlib.contextmanager
def _counting_answers(answers: collections.Counter[int]) -> Iterator[None]:
    """Count the replies and errors this process's bus clients receive, by correlation id
    (the header is frame 1 of every message a DEALER receives): what the kernel answered,
    whether or not the SDK still waited for it.  Real sockets; only the counting is added,
    around the one call (protocols.transport.recv_frames) every SDK receive goes through."""
    receive = transport.recv_frames

    def counting(sock: zmq.Socket, flags: int = 0, small: int = 4) -> list[Any]:
        frames = receive(sock, flags, small)
        header = msgspec.msgpack.decode(frames[1], type=Header)
        if header.kind in (Kind.REPLY, Kind.ERROR):
            answers[header.id] += 1
        return frames

    transport.recv_frames = counting
    try:
        yield
    finally:
        transport.recv_frames = receive


def test_a_burst_of_15000_requests_gets_exactly_one_answer_each(make_system) -> None:
    """Requests at a sleeping service with short deadlines: the kernel's timeout answers come
    all at once, faster than the client reads; none may be lost."""
    system: System = make_system(GREETER)
    answers: collections.Counter[int] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    n = 15000

    async def main() -> list[int]:
        await system.wait_ready("greeter")
        with _counting_answers(answers):
            async with system.client() as bus:
                answers.clear()  # (the Welcome)

                async def one() -> None:
                    try:
                        await bus.request("greeter", Sleep(seconds=5.0), timeout=0.5)
                        outcomes["reply"] += 1
                    except RemoteError as exc:
                        outcomes[f"{exc.code.value} from {exc.sender or 'the SDK'}"] += 1

                started = time.monotonic()
                async with anyio.create_task_group() as tg:
                    for _ in range(n):
                        tg.start_soon(one)
                # The kernel answers at the deadline (0.5 s after each send); give what it
                # sent time to arrive, then count.
                with anyio.fail_after(30):
                    while sum(answers.values()) < n:
                        await anyio.sleep(0.1)
                await anyio.sleep(0.5)  # (a duplicate would show up meanwhile)
                assert time.monotonic() - started < 30
                return sorted(answers)

    ids = anyio.run(main)
    assert len(ids) == n, (len(ids), outcomes)
    assert set(answers.values()) == {1}, collections.Counter(answers.values())
    assert sum(outcomes.values()) == n
    log = system.log()
    assert "peer_backlog_overflow" not in log


def test_a_peer_that_never_reads_has_its_session_ended_with_the_reason(make_system) -> None:
    """What waits for a peer is bounded: past the backlog's limit its session ends (said in
    the log), the kernel's memory does not grow without end, and others are served."""
    system: System = make_system("[bus]\nqueue_limit = 100\n")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 10)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(system.endpoint)
        hello = Hello(service="flood", credential=system.credential("operator"))
        sock.send_multipart([SIGNATURE, _enc.encode(Header(kind=Kind.CONTROL, type="Hello", id=1)), _enc.encode(hello)])
        body = _enc.encode(Greet(who="x"))
        for i in range(30000):  # answered unknown-destination, at once; never read
            sock.send_multipart([SIGNATURE, _enc.encode(Header(kind=Kind.REQUEST, type="Greet", dest="nowhere",
                                                               id=i + 2)), body])
        deadline = time.monotonic() + 20
        while "peer_backlog_overflow" not in system.log():
            assert time.monotonic() < deadline, "the kernel kept the answers of a peer that never reads"
            time.sleep(0.1)
        assert "it does not read its messages" in system.log()
    finally:
        ctx.destroy(0)

    async def still_serves() -> None:
        async with system.client() as bus:
            await bus.call("kernel", ListServices(), ServiceList, timeout=5)

    anyio.run(still_serves)


SLOW_SUBSCRIBER = """
[services.slow]
capabilities = ["subscribe:flood.*"]
"""


def test_events_dropped_for_a_full_queue_are_counted_in_the_status(make_system) -> None:
    system: System = make_system("[bus]\nqueue_limit = 100\n" + SLOW_SUBSCRIBER)
    from protocols import Subscribe

    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 10)
        sock.connect(system.endpoint)
        for i, (typ, body) in enumerate((("Hello", Hello(service="slow", credential=system.credential("slow"))),
                                         ("Subscribe", Subscribe(topics=["flood."])))):
            sock.send_multipart([SIGNATURE, _enc.encode(Header(kind=Kind.CONTROL, type=typ, id=i + 1)), _enc.encode(body)])
            while True:  # (past the kernel's heartbeats)
                assert sock.poll(5000), f"no answer to {typ}"
                header = msgspec.msgpack.decode(sock.recv_multipart()[1], type=Header)
                if header.id == i + 1:
                    assert header.kind == Kind.REPLY, header
                    break
        # from now on "slow" reads nothing

        async def flood() -> None:
            async with system.client() as bus:
                for i in range(5000):
                    await bus.publish("flood.x", Echo(text=f"event {i}"))
                await bus.call("kernel", ListServices(), ServiceList, timeout=5)  # all routed

        anyio.run(flood)
        out = system.busctl("status", "slow", "--json", check=True).stdout
    finally:
        ctx.destroy(0)
    status = msgspec.json.decode(out)
    assert status["dropped"] > 1000, status  # 5000 sent; about queue_limit + 10 + the socket's buffers held
    assert "peer_queue_full" in system.log()


# -- input nobody authenticated is summarised, not logged line by line ---------------------


def _flood(system: System, garbage: int, bad_hellos: int) -> tuple[int, list[Any]]:
    """Send ``garbage`` malformed messages and ``bad_hellos`` Hellos with wrong credentials
    on one raw connection, then log in on it (so everything before was processed); return
    the kernel log lines added meanwhile and the authentication-failed audit records."""
    from protocols import AuditEvent

    records: list[Any] = []

    async def main() -> int:
        async with system.client() as bus, bus.subscribe("kernel.audit") as audit:
            before = len(system.log().splitlines())
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            try:
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(system.endpoint)
                for i in range(garbage):
                    sock.send_multipart([b"garbage %d" % i] + [b"x"] * (i % 5))
                for i in range(bad_hellos):
                    sock.send_multipart([SIGNATURE, _enc.encode(Header(kind=Kind.CONTROL, type="Hello", id=i + 1)),
                                         _enc.encode(Hello(service="intruder", credential=f"guess-{i}"))])
                good = Hello(service="late", credential=system.credential("operator"))
                sock.send_multipart([SIGNATURE, _enc.encode(Header(kind=Kind.CONTROL, type="Hello", id=99999)),
                                     _enc.encode(good)])
                with anyio.fail_after(20):
                    while True:
                        await anyio.sleep(0.01)
                        while sock.poll(0):
                            frames = sock.recv_multipart()
                            if len(frames) > 1 and msgspec.msgpack.decode(frames[1], type=Header).id == 99999:
                                break
                        else:
                            continue
                        break
            finally:
                ctx.destroy(0)
            await bus.call("kernel", ListServices(), ServiceList, timeout=5)  # still serving
            with anyio.move_on_after(1.0):  # audit records published before the Welcome are here
                async for event in audit:
                    record = event.decode(AuditEvent)
                    if record.kind == "authentication-failed":
                        records.append(record)
            return len(system.log().splitlines()) - before

    return anyio.run(main), records


def test_garbage_before_hello_is_summarised_in_the_log(make_system) -> None:
    system: System = make_system("[bus]\n")
    lines, records = _flood(system, garbage=5000, bad_hellos=0)
    assert lines < 30, system.log()[-5000:]
    summary = [ln for ln in system.log().splitlines() if "message_rejected" in ln]
    assert any('"count": 1000' in ln for ln in summary), summary  # counted, not forgotten


def test_bad_credentials_are_summarised_in_the_audit_log(make_system) -> None:
    system: System = make_system("[bus]\n")
    _, records = _flood(system, garbage=0, bad_hellos=500)
    assert 1 <= len(records) < 30, len(records)
    assert "100 times" in records[-1].detail, records[-1]


def test_bad_credentials_are_summarised_in_the_kernel_log(make_system) -> None:
    system: System = make_system("[bus]\n")
    lines, _ = _flood(system, garbage=0, bad_hellos=500)
    assert lines < 30, lines


# -- no orphans -------------------------------------------------------------------------------

DEFAULT_LIKE = """
[services.security]
command = ["{python}", "-m", "services.security"]
capabilities = ["call:kernel.Grant", "call:kernel.Revoke", "call:kernel.Enroll", "subscribe:kernel.audit"]

[services.modelstore]
command = ["{python}", "-m", "services.modelstore"]
requires = ["security"]
capabilities = ["call:security.VerifySignature", "call:security.Seal", "call:security.Unseal",
                "call:security.AuditAppend", "publish:modelstore.*"]
settings = { preload_demo = false }

[services.telemetry]
command = ["{python}", "-m", "services.telemetry"]
capabilities = ["subscribe:metrics.*", "call:kernel.ListServices"]
settings = { http = "" }

[services.greeter]
command = ["{python}", "-m", "services.examples.greeter"]

# Not a bus client at all: only the kernel's death signal can end it.
[services.sleeper]
command = ["sleep", "300"]
start_timeout = 300
stop_signal = "SIGKILL"
"""


def test_services_die_with_a_killed_kernel(make_system) -> None:
    system: System = make_system(DEFAULT_LIKE)
    anyio.run(lambda: system.wait_ready("security", "modelstore", "telemetry", "greeter", timeout=60))
    kernel = system.proc.pid
    services = wait_for(lambda: (lambda kids: kids if len(kids) >= 5 else None)(
        [pid for pid in children(kernel) if alive(pid)]), 10, "the five services")
    assert "sleep" in {proc_comm(pid) for pid in services}
    try:
        os.kill(kernel, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: not any(alive(pid) or group(pid) for pid in services), 5, "the services to die")
        gone_after = time.monotonic() - killed
    finally:
        for pid in services:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    assert gone_after < 1.0, gone_after


# -- memory comes back ------------------------------------------------------------------------


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _settled_rss(pid: int, quiet: float = 1.5, timeout: float = 15) -> float:
    """The process's RSS once it stopped changing for ``quiet`` seconds."""
    end = time.monotonic() + timeout
    last, since = _rss_mib(pid), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < end, "the kernel's RSS did not settle"
        time.sleep(0.1)
        now = _rss_mib(pid)
        if abs(now - last) > 0.05:
            last, since = now, time.monotonic()
    return last


def _idle_connections(system: System, n: int, ctx: zmq.Context) -> None:
    """``n`` connections at once, each says Hello with the operator credential; then all close."""
    hello = _enc.encode(Hello(service="idle", credential=system.credential("operator")))
    header = _enc.encode(Header(kind=Kind.CONTROL, type="Hello", id=1))
    socks = []
    try:
        for _ in range(n):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(system.endpoint)
            sock.send_multipart([SIGNATURE, header, hello])
            socks.append(sock)
        for sock in socks:
            assert sock.poll(10000), "no Welcome"
            assert msgspec.msgpack.decode(sock.recv_multipart()[1], type=Header).kind == Kind.REPLY
    finally:
        for sock in socks:
            sock.close(0)


def test_memory_of_closed_connections_comes_back(make_system) -> None:
    # (the operator's sessions come and go at debug level)
    system: System = make_system("[bus]\n", env={"EDGEBUS_LOG_LEVEL": "debug"})
    kernel = system.proc.pid
    ctx = zmq.Context()
    try:
        def ended(count: int) -> bool:
            return system.log().count('"peer_disconnected"') >= count

        _idle_connections(system, 100, ctx)  # warm up (imports, caches, arenas)
        wait_for(lambda: ended(100), 10, "the 100 warm-up sessions to end")
        before = _settled_rss(kernel)
        _idle_connections(system, 1000, ctx)
        wait_for(lambda: ended(1100), 20, "the 1000 sessions to end")
        after = _settled_rss(kernel)
    finally:
        ctx.destroy(0)
    assert after - before < 4.0, f"RSS {before:.1f} MiB before 1000 connections, {after:.1f} MiB after"
