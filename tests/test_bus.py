"""The bus end to end: a real kernel, real service processes, real sockets."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import msgspec
import pytest

from protocols import SIGNATURE, Error, ErrorCode, Header, Kind, pack_tensors
from services import (
    DeadlineExceeded,
    Forbidden,
    Unavailable,
    UnknownDestination,
)
from services.examples.greeter import Add, Echo, Echoed, Greet, Greeting, Sleep, Slept, Tick

from conftest import System, wait_for

CONFIG = """
[bus]
heartbeat_interval = 0.2
heartbeat_liveness = 3
max_message_size = 1048576
max_pending = 40

[services.greeter]
command = ["{python}", "-m", "services.examples.greeter"]
capabilities = ["publish:example.*"]
settings = { tick_interval = 0.2 }

[services.greeter-trio]
command = ["{python}", "-m", "services.examples.greeter"]
environment = { EDGEBUS_BACKEND = "trio" }

[services.client]
capabilities = [
  "call:greeter.Greet", "call:greeter.Echo", "call:greeter.Sleep", "call:greeter-trio.*",
  "call:fake.*", "call:ghost.*", "call:nowhere.*", "call:kernel.ListServices",
  "subscribe:example.*", "publish:client.*",
]

[services.fake]
capabilities = ["publish:fake.*"]

[services.ghost]
capabilities = []
"""

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory):
    s = System(tmp_path_factory.mktemp("bus"), CONFIG)
    s.wait_bus()
    anyio.run(lambda: s.wait_ready("greeter", "greeter-trio"))
    yield s
    assert s.stop() == 0, s.log()[-3000:]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("service", ["greeter", "greeter-trio"])
async def test_same_service_code_under_asyncio_and_trio(system: System, service: str, anyio_backend: str) -> None:
    async with system.client("client") as bus:
        reply = await bus.call(service, Greet(who="edge"), Greeting, timeout=5)
    assert reply == Greeting(text="hello, edge", greeted_by=service)


async def test_the_kernel_stamps_the_authenticated_sender(system: System) -> None:
    async with system.client("client") as bus:
        echoed = await bus.call("greeter", Echo(text="who am i"), Echoed, timeout=5)
    assert echoed.sender == "client"


def test_a_claimed_sender_is_overwritten(system: System, raw_peer) -> None:
    peer = raw_peer(system.endpoint)
    peer.hello("client", system.credential("client"))
    peer.send(Header(kind=Kind.REQUEST, type="Echo", dest="greeter", id=7, sender="kernel"), Echo(text="spoof"))
    header, body, _ = peer.recv()
    assert header.kind == Kind.REPLY and header.id == 7 and header.sender == "greeter"
    assert msgspec.msgpack.decode(body, type=Echoed).sender == "client"


def test_a_hello_with_a_stolen_name_or_no_credential_is_refused(system: System, raw_peer) -> None:
    peer = raw_peer(system.endpoint)
    peer.send(Header(kind=Kind.CONTROL, type="Hello", id=1), _hello("greeter", "not-a-credential"))
    err = peer.recv_error()
    assert err.code == ErrorCode.UNAUTHENTICATED
    peer.send(Header(kind=Kind.CONTROL, type="Hello", id=2), _hello("greeter", system.credential("client")))
    err = peer.recv_error()
    assert err.code == ErrorCode.UNAUTHENTICATED and "belongs to 'client'" in err.message


def _hello(name: str, credential: str):
    from protocols import Hello

    return Hello(service=name, credential=credential)


async def test_missing_capability_is_forbidden_and_logged(system: System) -> None:
    async with system.client("client") as bus:
        with pytest.raises(Forbidden) as info:
            await bus.call("greeter", Add(a=1, b=2), timeout=5)
        assert info.value.capability == "call:greeter.Add"
        assert "call:greeter.Add" in str(info.value)
        # The bus keeps serving the same client afterwards.
        assert (await bus.call("greeter", Greet(who="x"), Greeting, timeout=5)).text == "hello, x"
    wait_for(lambda: '"capability": "call:greeter.Add"' in system.log(), 5, "the denial in the kernel log")


async def test_subscribe_and_publish_are_capability_checked(system: System) -> None:
    async with system.client("client") as bus:
        with pytest.raises(Forbidden) as info:
            await bus.subscribe("kernel.")
        assert info.value.capability == "subscribe:kernel.*"
        async with bus.subscribe("example.") as sub:
            with anyio.fail_after(5):
                event = await sub.receive()
        assert event.sender == "greeter" and event.header.dest == "example.tick"
        assert isinstance(event.decode(Tick), Tick)


def test_publish_without_capability_is_answered_forbidden(system: System, raw_peer) -> None:
    peer = raw_peer(system.endpoint)
    peer.hello("client", system.credential("client"))
    peer.send(Header(kind=Kind.EVENT, type="Tick", dest="example.tick", id=3), Tick(n=1))
    err = peer.recv_error()
    assert err.code == ErrorCode.FORBIDDEN and err.capability == "publish:example.tick"


async def test_unknown_destination_and_unknown_type(system: System) -> None:
    async with system.client("client") as bus:
        with pytest.raises(UnknownDestination, match="nowhere"):
            await bus.call("nowhere", Greet(who="x"), timeout=5)
        with pytest.raises(Unavailable, match="ghost"):  # configured, never connected
            await bus.call("ghost", Greet(who="x"), timeout=5)


def test_unknown_type_and_undecodable_body(system: System, raw_peer) -> None:
    peer = raw_peer(system.endpoint)
    peer.hello("client", system.credential("client"))
    # greeter-trio: the client holds call:greeter-trio.* so the kernel lets any type through
    peer.send(Header(kind=Kind.REQUEST, type="Launch", dest="greeter-trio", id=1), b"\x80")
    err = peer.recv_error()
    assert err.code == ErrorCode.UNKNOWN_TYPE and "Launch" in err.message
    peer.send(Header(kind=Kind.REQUEST, type="Greet", dest="greeter-trio", id=2), b"\xc1garbage")
    err = peer.recv_error()
    assert err.code == ErrorCode.BAD_MESSAGE and "Greet" in err.message
    peer.send(Header(kind=Kind.REQUEST, type="Greet", dest="greeter-trio", id=3),
              msgspec.msgpack.encode({"type": "Greet", "who": 42}))
    err = peer.recv_error()
    assert err.code == ErrorCode.BAD_MESSAGE and "who" in err.message


def test_body_tag_must_match_header_type(system: System, raw_peer) -> None:
    """A sender allowed to call Greet cannot smuggle an Add in a Greet header."""
    peer = raw_peer(system.endpoint)
    peer.hello("client", system.credential("client"))
    peer.send(Header(kind=Kind.REQUEST, type="Greet", dest="greeter", id=5), Add(a=1, b=1))
    err = peer.recv_error()
    assert err.code == ErrorCode.BAD_MESSAGE and "'Add'" in err.message and "'Greet'" in err.message


def test_malformed_frames_are_answered_and_the_kernel_keeps_running(system: System, raw_peer) -> None:
    peer = raw_peer(system.endpoint)
    cases = [
        ([b"just one frame"], "expected at least 3 frames"),
        ([b"XX\x01\x00", b"\x80", b"\x80"], "signature"),
        ([b"EB\x09\x00", b"\x80", b"\x80"], "major version 9"),
        ([SIGNATURE, b"\xc1\xc1", b"\x80"], "header does not decode"),
        ([SIGNATURE, msgspec.msgpack.encode({"k": 99, "t": "X"}), b"\x80"], "header does not decode"),
    ]
    for frames, expected in cases:
        peer.send_frames(frames)
        err = peer.recv_error()
        assert err.code == ErrorCode.BAD_MESSAGE and expected in err.message, (frames, err)
    # well formed, but before any Hello: refused unread, as a session the kernel does not know
    peer.send_frames([SIGNATURE, msgspec.msgpack.encode({"k": 1, "t": "Greet", "d": "greeter"}), b"\x80"])
    err = peer.recv_error()
    assert err.code == ErrorCode.UNAUTHENTICATED and "say Hello" in err.message, err
    peer.hello("client", system.credential("client"))
    peer.send(Header(kind=Kind.REQUEST, type="Greet", dest="greeter", id=8, deadline=float("nan")), Greet(who="x"))
    err = peer.recv_error()
    assert err.code == ErrorCode.BAD_MESSAGE and "deadline nan" in err.message
    big = b"\0" * (1024 * 1024 + 1)
    peer.send(Header(kind=Kind.REQUEST, type="Echo", dest="greeter", id=9), Echo(), [big])
    err = peer.recv_error()
    assert err.code == ErrorCode.BAD_MESSAGE and "exceeds the bus limit" in err.message
    peer.send(Header(kind=Kind.REQUEST, type="Greet", dest="greeter", id=10), Greet(who="still here"))
    header, body, _ = peer.recv()
    assert header.id == 10 and msgspec.msgpack.decode(body, type=Greeting).text == "hello, still here"


async def test_a_reply_to_a_request_never_received_is_not_delivered(system: System, raw_peer) -> None:
    client = raw_peer(system.endpoint)
    client.hello("client", system.credential("client"))
    fake = raw_peer(system.endpoint)
    fake.hello("fake", system.credential("fake"))
    # An outstanding request from client to greeter (slow, so it is pending for a while).
    client.send(Header(kind=Kind.REQUEST, type="Sleep", dest="greeter", id=77), Sleep(seconds=0.5))
    # fake forges replies for every kernel id it might guess, and unsolicited errors.
    for kid in range(1, 5000):
        fake.send(Header(kind=Kind.REPLY, type="Slept", id=kid), Slept(seconds=99))
    fake.send(Header(kind=Kind.ERROR, type="Error", id=77), Error(code=ErrorCode.INTERNAL, message="forged"))
    header, body, _ = client.recv(timeout=10)
    assert header.kind == Kind.REPLY and header.id == 77 and header.sender == "greeter"
    assert msgspec.msgpack.decode(body, type=Slept).seconds == 0.5
    # and nothing else arrives: fake publishes an event the client cannot see (no
    # subscription), then the client asks something; the next message is that answer.
    client.send(Header(kind=Kind.REQUEST, type="Greet", dest="greeter", id=78), Greet(who="after"))
    header, _, _ = client.recv()
    assert header.id == 78 and header.sender == "greeter"


async def test_deadlines(system: System) -> None:
    async with system.client("client") as bus:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await bus.call("greeter", Sleep(seconds=3), timeout=0.3)
        assert time.monotonic() - start < 2
        with pytest.raises(DeadlineExceeded, match="deadline passed before 'Greet' was sent"):
            await bus.call("greeter", Greet(who="late"), deadline=time.time() - 1)


def test_the_kernel_answers_timeout_at_the_deadline(system: System, raw_peer) -> None:
    peer = raw_peer(system.endpoint)
    peer.hello("client", system.credential("client"))
    peer.send(Header(kind=Kind.REQUEST, type="Greet", dest="greeter", id=3, deadline=time.time() - 1),
              Greet(who="late"))
    err = peer.recv_error()
    assert err.code == ErrorCode.TIMEOUT and "deadline passed" in err.message
    peer.send(Header(kind=Kind.REQUEST, type="Sleep", dest="greeter", id=4, deadline=time.time() + 0.3),
              Sleep(seconds=2))
    err = peer.recv_error(timeout=3)
    assert err.code == ErrorCode.TIMEOUT


def test_requests_beyond_the_pending_limit_are_overloaded_not_dropped(system: System, raw_peer) -> None:
    peer = raw_peer(system.endpoint)
    peer.hello("client", system.credential("client"))
    n = 60  # bus.max_pending is 40
    for i in range(n):
        peer.send(Header(kind=Kind.REQUEST, type="Sleep", dest="greeter", id=100 + i), Sleep(seconds=0.5))
    outcomes: dict[int, str] = {}
    while len(outcomes) < n:
        header, body, _ = peer.recv(timeout=10)
        if header.kind == Kind.ERROR:
            outcomes[header.id] = msgspec.msgpack.decode(body, type=Error).code.value
        else:
            outcomes[header.id] = "ok"
    assert sorted(outcomes) == list(range(100, 100 + n))
    assert list(outcomes.values()).count("overloaded") >= n - 40
    assert "ok" in outcomes.values()


async def test_pending_requests_of_a_silent_peer_are_answered_unavailable(system: System, raw_peer) -> None:
    fake = raw_peer(system.endpoint)
    fake.hello("fake", system.credential("fake"), types=["Work"])
    from protocols import Ready

    fake.send(Header(kind=Kind.CONTROL, type="Ready"), Ready())
    async with system.client("client") as bus:
        async with anyio.create_task_group() as tg:
            result: list[BaseException] = []

            async def call() -> None:
                try:
                    await bus.request("fake", msgspec.msgpack.encode({"type": "Work"}), type="Work", timeout=10)
                except Unavailable as exc:
                    result.append(exc)

            tg.start_soon(call)
            # fake receives the request, then goes silent (no heartbeats, no reply).
            header, _, _ = await anyio.to_thread.run_sync(fake.recv)
            assert header.type == "Work" and header.sender == "client"
            start = time.monotonic()
        assert result and "went away" in str(result[0])
        # declared dead after heartbeat_liveness (3) x heartbeat_interval (0.2 s)
        assert time.monotonic() - start < 3
        with pytest.raises(Unavailable):
            await bus.request("fake", msgspec.msgpack.encode({"type": "Work"}), type="Work", timeout=5)


async def test_tensor_frames_pass_through_untouched(system: System) -> None:
    np = pytest.importorskip("numpy")
    arr = np.arange(3 * 64 * 64, dtype=np.float32).reshape(3, 64, 64)
    descs, frames = pack_tensors([arr])
    async with system.client("client") as bus:
        incoming = await bus.request("greeter", Echo(text="t", tensors=descs), frames=frames, timeout=5)
    echoed = incoming.decode(Echoed)
    out = incoming.tensor(echoed.tensors[0])
    assert out.dtype == np.float32 and out.shape == (3, 64, 64)
    assert np.array_equal(out, arr)


async def test_monitor_shows_filtered_live_traffic(system: System) -> None:
    import subprocess

    from conftest import BIN

    mon = subprocess.Popen([str(BIN / "busctl"), "monitor", "--run-dir", str(system.run_dir), "--type", "Greet",
                            "--limit", "2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Keep the traffic going until the monitor has seen its two records and exited,
        # so it does not matter when exactly its Monitor request reached the kernel.
        async with system.client("client") as bus:
            with anyio.fail_after(10):
                while mon.poll() is None:
                    await bus.call("greeter", Greet(who="mon"), Greeting, timeout=5)
                    await bus.call("greeter", Echo(text="not shown"), Echoed, timeout=5)
                    await anyio.sleep(0.05)
        out, err = mon.communicate(timeout=10)
    finally:
        mon.kill()
    lines = [msgspec.json.decode(line) for line in out.splitlines()]
    assert len(lines) == 2, (out, err)
    assert all(line["message_type"] == "Greet" for line in lines)
    assert {line["kind"] for line in lines} == {"request"}


def test_busctl_list_status_call_introspect_caps(system: System) -> None:
    listing = msgspec.json.decode(system.busctl("list", "--json", check=True).stdout)
    by_name = {s["name"]: s for s in listing}
    assert by_name["greeter"]["state"] == "ready" and by_name["greeter"]["pid"] > 0
    assert {"name", "state", "pid"} <= set(by_name["ghost"])
    table = system.busctl("list", check=True).stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "STATE", "PID"]
    status = msgspec.json.decode(system.busctl("status", "greeter", "--json", check=True).stdout)
    assert status["types"] == ["Add", "Echo", "Greet", "Sleep"]
    out = system.busctl("call", "greeter", "Add", '{"a": 2, "b": 3}', "--json", check=True).stdout
    assert msgspec.json.decode(out) == {"type": "Sum", "value": 5.0}  # the reply itself, as the human view shows it
    iface = msgspec.json.decode(system.busctl("introspect", "greeter", "--json", check=True).stdout)
    assert set(iface["types"]) == {"Add", "Echo", "Greet", "Sleep"}
    assert "Greet" in iface["schema"]["$defs"]
    caps = msgspec.json.decode(system.busctl("caps", "--json", check=True).stdout)
    assert caps["greeter"] == [{"capability": "publish:example.*", "origin": "config", "expires": None}]
    assert caps["ghost"] == []
    bad = system.busctl("call", "greeter", "Add", '{"a": "x"}')
    assert bad.returncode == 1 and "bad-message" in bad.stderr
    bad = system.busctl("call", "greeter", "Add", "{not json")
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr


def test_busctl_without_a_bus_fails_clearly(tmp_path: Path) -> None:
    from conftest import BIN
    import subprocess

    proc = subprocess.run([str(BIN / "busctl"), "list", "--run-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 3
    assert "edgebus is not running with run directory" in proc.stderr


async def test_subscriptions_have_their_own_bounded_queues(system: System) -> None:
    """Two subscriptions of one client: each gets what matches it, in order; a full one
    drops (and counts) only its own events; leaving one keeps the other's prefixes."""
    async with system.client() as bus:
        async with bus.subscribe("sub-test.a") as narrow, bus.subscribe("sub-test.", max_pending=2) as wide:
            await bus.publish("sub-test.b", Tick(n=99))  # only `wide` matches
            for n in range(5):
                await bus.publish("sub-test.a.x", Tick(n=n))
            with anyio.fail_after(5):
                got = [(await narrow.receive()).decode(Tick).n for _ in range(5)]
            assert got == [0, 1, 2, 3, 4]
            # every event reached the client in order before narrow's last: wide kept 2 of 6
            assert wide.dropped == 4
            assert [(await wide.receive()).decode(Tick).n for _ in range(2)] == [99, 0]
            assert narrow.dropped == 0
        async with bus.subscribe("sub-test.") as wide:
            async with bus.subscribe("sub-test.") as same:
                pass  # leaving `same` must not unsubscribe the prefix `wide` still holds
            await bus.publish("sub-test.c", Tick(n=7))
            with anyio.fail_after(5):
                assert (await wide.receive()).decode(Tick).n == 7
        async for _ in same:  # a subscription that was left is exhausted, not hanging
            raise AssertionError("no events after leaving")
