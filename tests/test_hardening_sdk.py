"""The SDK against a kernel that dies or ends its session: it never hangs, it is told why,
and a client reconnects by itself."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import anyio
import msgspec
import pytest

from protocols import Error, ErrorCode, Header, Kind
from protocols.runtime import EXIT_BUS
from services import ConnectionLost
from services.examples.greeter import Add, Echo, Sleep, Sum

from conftest import PY, ROOT, System, wait_for

pytestmark = pytest.mark.anyio

HELPERS = Path(__file__).resolve().parent / "helpers"


def _bus(interval: float, liveness: int) -> str:
    return f"""
[bus]
heartbeat_interval = {interval}
heartbeat_liveness = {liveness}
[services.flood]
capabilities = ["publish:flood.*"]
"""


@pytest.fixture
def spawn() -> Iterator[object]:
    """Start a process of our own (not the kernel's: no parent-death signal can help it) in
    its own session; each is killed and reaped at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, env={**os.environ, "EDGEBUS_LOG_FORMAT": "json", **env}, cwd=ROOT,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def _flooding(system: System, spawn) -> subprocess.Popen[bytes]:
    proc = spawn([PY, str(HELPERS / "fast_publisher.py")],
                 {"EDGEBUS_BUS": system.endpoint, "EDGEBUS_SERVICE": "flood",
                  "EDGEBUS_CREDENTIAL_FILE": str(system.run_dir / "credentials" / "flood")},
                 system.tmp / "flood.log")
    # ready, and it really floods: thousands of events through the kernel (polled: no
    # kernel.services event tells of a service the kernel did not start)
    with anyio.fail_after(20):
        while (await system.services())["flood"].events_out < 5000:
            assert proc.poll() is None, (system.tmp / "flood.log").read_text()
            await anyio.sleep(0.05)
    return proc


def _kill_kernel(system: System) -> float:
    os.killpg(system.proc.pid, signal.SIGKILL)  # the kernel's own group; the publisher has its own session
    system.proc.wait()
    return time.monotonic()


async def test_a_fast_publisher_exits_with_exit_bus_soon_after_the_kernel_dies(make_system, spawn) -> None:
    system: System = make_system(_bus(0.5, 3))
    proc = await _flooding(system, spawn)
    killed = _kill_kernel(system)
    # no message for liveness x interval = 1.5 s: lost; checked every 0.5 s
    wait_for(lambda: proc.poll() is not None, 3.0, "the publisher to exit after the kernel's death")
    took = time.monotonic() - killed
    log = (system.tmp / "flood.log").read_text()
    assert proc.returncode == EXIT_BUS, log
    assert took < 3.0, took
    assert "no message or heartbeat from the kernel" in log or "has read nothing" in log, log


async def test_a_fast_publisher_honours_sigterm_after_the_kernel_died(make_system, spawn) -> None:
    # liveness 20 s: only SIGTERM can end it within the time allowed
    system: System = make_system(_bus(1.0, 20))
    proc = await _flooding(system, spawn)
    _kill_kernel(system)
    time.sleep(0.5)  # let its send queue fill up: the publisher and its heartbeat now wait on a dead socket
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    wait_for(lambda: proc.poll() is not None, 3.0, "the publisher to honour SIGTERM with its kernel dead")
    assert time.monotonic() - sent < 3.0
    assert proc.returncode in (0, EXIT_BUS), (system.tmp / "flood.log").read_text()


# -- a session the kernel ended --------------------------------------------------------------

_SESSIONS = """
[bus]
heartbeat_interval = 0.2
heartbeat_liveness = 3
[services.greeter]
command = ["{python}", "-m", "services.examples.greeter"]
capabilities = ["publish:example.*"]
[services.client]
capabilities = ["call:greeter.*", "subscribe:example.*"]
"""


def _ended_for_silence(system: System, peer: str) -> bool:
    return any('"peer_disconnected"' in line and f'"service": "{peer}"' in line and '"no heartbeat for' in line
               for line in system.log().splitlines())


async def test_the_next_message_after_a_session_ended_is_told_why(make_system, raw_peer) -> None:
    system: System = make_system(_SESSIONS)
    await system.wait_ready("greeter")
    peer = raw_peer(system.endpoint)
    peer.hello("client", system.credential("client"))  # and then no heartbeat
    wait_for(lambda: _ended_for_silence(system, "client"), 5, "the kernel to end the silent session")
    peer.send(Header(kind=Kind.REQUEST, type="Add", dest="greeter", id=5), Add(a=1, b=2))
    header, body, _ = peer.recv()
    while header.kind == Kind.CONTROL:  # heartbeats sent before the end
        header, body, _ = peer.recv()
    assert header.kind == Kind.ERROR and header.id == 5
    err = msgspec.msgpack.decode(body, type=Error)
    assert err.code == ErrorCode.UNAUTHENTICATED, err
    assert "session ended: no heartbeat for" in err.message and "say Hello" in err.message, err
    # a new Hello on the same connection starts a session again
    peer.hello("client", system.credential("client"))
    peer.send(Header(kind=Kind.REQUEST, type="Add", dest="greeter", id=6), Add(a=2, b=2))
    header, body, _ = peer.recv()
    assert header.id == 6 and msgspec.msgpack.decode(body, type=Sum).value == 4
    # a connection that never had a session is told to say Hello first (unread: as a
    # client whose kernel started again is)
    stranger = raw_peer(system.endpoint)
    stranger.send(Header(kind=Kind.REQUEST, type="Add", dest="greeter", id=1), Add(a=1, b=1))
    err = stranger.recv_error()
    assert err.code == ErrorCode.UNAUTHENTICATED and "no session with this kernel" in err.message
    assert "say Hello" in err.message


async def test_a_client_whose_session_was_ended_reconnects_and_resubscribes(make_system) -> None:
    system: System = make_system(_SESSIONS)
    await system.wait_ready("greeter")
    async with system.client() as operator, system.client("client") as bus:
        async with bus.subscribe("example.") as sub:
            await _mark_arrives(operator, sub, "before")
            lost: list[BaseException] = []

            async def in_flight() -> None:
                try:
                    await bus.call("greeter", Sleep(seconds=3), timeout=10)
                except ConnectionLost as exc:
                    lost.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(in_flight)
                await anyio.wait_all_tasks_blocked()  # the Sleep is out
                time.sleep(1.2)  # the event loop stalls: no heartbeat for > 0.6 s, and the kernel ends the session
                # the next call is refused by the ended session, reconnects and succeeds
                assert (await bus.call("greeter", Add(a=1, b=2), Sum, timeout=5)).value == 3
            assert bus.sessions == 2
            assert _ended_for_silence(system, "client")
            # the call out at that moment failed, naming why
            assert len(lost) == 1 and "no heartbeat for" in str(lost[0]), lost
            # the subscription goes on: the new session subscribed again
            await _mark_arrives(operator, sub, "after")


async def test_a_client_reads_its_credential_file_again_when_the_kernel_starts_again(make_system) -> None:
    """PROTOCOL.md 5.1: a kernel started again writes fresh credentials; a client whose
    credential came from a file says Hello with the new one and goes on."""
    from services import connect

    system: System = make_system(_SESSIONS)
    await system.wait_ready("greeter")
    path = system.run_dir / "credentials" / "client"
    async with connect("client", endpoint=system.endpoint, credential_file=path) as bus:
        assert (await bus.call("greeter", Add(a=1, b=2), Sum, timeout=5)).value == 3
        old = path.read_text()
        system.stop()
        again = System(system.tmp, _SESSIONS)  # the same run directory, a new kernel
        try:
            again.wait_bus()
            await again.wait_ready("greeter")
            assert path.read_text() != old
            with anyio.fail_after(30):
                while True:
                    try:
                        assert (await bus.call("greeter", Add(a=2, b=2), Sum, timeout=5)).value == 4
                        break
                    except ConnectionLost:  # (the session the old kernel's end cut)
                        continue
            assert bus.sessions >= 2
        finally:
            again.kill()


async def test_connect_without_reconnect_ends_with_the_reason(make_system) -> None:
    system: System = make_system(_SESSIONS)
    await system.wait_ready("greeter")
    with pytest.raises(ConnectionLost, match="no heartbeat for"):
        async with system.client("client", reconnect=False) as bus:
            await bus.call("greeter", Add(a=1, b=1), Sum, timeout=5)
            time.sleep(1.2)
            await bus.call("greeter", Add(a=1, b=2), Sum, timeout=5)
    assert _ended_for_silence(system, "client")


async def _mark_arrives(operator: Any, sub: Any, text: str) -> None:
    """Publish Echo(text) on example.mark until ``sub`` has it (a subscription may take a
    moment to be in place again after a reconnection)."""
    with anyio.fail_after(10):
        while True:
            await operator.publish("example.mark", Echo(text=text))
            with anyio.move_on_after(0.2):
                while True:
                    event = await sub.receive()
                    if event.type == "Echo" and event.decode(Echo).text == text:
                        return
