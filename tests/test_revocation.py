"""Revocation that sticks: an unenrolled key, a revoked capability or a removed service ends
or restricts the live session at once and the peer is told why; run-time decisions survive
reloads and kernel restarts until reset; the SDK notices that its session is over; a CURVE
peer whose keys do not match is logged and audited; only services configured without a
command are enrolled."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import zmq

from protocols import Codec, Enrollments, Error, ErrorCode, Header, Heartbeat, Hello, Kind, ListEnrollments, Welcome
from services import ConnectError, ConnectionLost, Forbidden, connect
from services.examples.greeter import Add, Echo, Greet, Greeting, Sum

from conftest import System, free_port, wait_for

pytestmark = pytest.mark.anyio

SECURITY = """
[services.security]
command = ["{python}", "-m", "services.security"]
capabilities = ["call:kernel.Grant", "call:kernel.Revoke", "call:kernel.Reset", "call:kernel.Enroll",
                "call:kernel.GetMeasurements", "subscribe:kernel.audit"]
critical = true
[services.greeter]
command = ["{python}", "-m", "services.examples.greeter"]
"""


class Remote:
    """A service configured without a command, connecting over tcp with a CURVE key."""

    def __init__(self, name: str, enrolled_in_config: bool = True) -> None:
        self.name = name
        self.public, self.secret = zmq.curve_keypair()
        self.in_config = enrolled_in_config

    def config(self) -> str:
        key = f'curve_public_key = "{self.public.decode()}"\n' if self.in_config else ""
        return f'[services.{self.name}]\ncapabilities = ["call:greeter.*"]\n{key}'


def _config(endpoint: str, *remotes: Remote, extra: str = "", raw: bool = False) -> str:
    """``raw``: for peers that send no heartbeats (RawCurvePeer): the kernel waits a minute."""
    bus = f'[bus]\ntcp_endpoint = "{endpoint}"\n' + ("heartbeat_liveness = 60\n" if raw else "")
    return bus + SECURITY + "".join(r.config() for r in remotes) + extra


def _curve(system: System, remote: Remote) -> tuple[bytes, bytes, bytes]:
    return (system.run_dir / "bus.curve.pub").read_bytes(), remote.public, remote.secret


async def _busctl(system: System, *args: str, check: bool = True) -> Any:
    """busctl in a worker thread: the event loop (and the SDK clients' heartbeats) go on."""
    return await anyio.to_thread.run_sync(functools.partial(system.busctl, *args, check=check))


async def _audit(system: System) -> list[tuple[str, str, str]]:
    out = (await _busctl(system, "audit", "tail", "-n", "500", "--json")).stdout
    return [(r["kind"], r["subject"], r.get("detail", "")) for r in msgspec.json.decode(out)]


async def _enrolment(system: System, name: str) -> Any:
    async with system.client() as bus:
        entries = (await bus.call("kernel", ListEnrollments(name=name), Enrollments, timeout=5)).entries
    assert len(entries) == 1, entries
    return entries[0]


class RawCurvePeer:
    """A hand-driven CURVE DEALER: what the kernel sends, unprompted, is seen as it is."""

    def __init__(self, endpoint: str, curve: tuple[bytes, bytes, bytes]) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = curve
        self.sock.connect(endpoint)
        self.codec = Codec()

    def send(self, header: Header, body: Any) -> None:
        self.sock.send_multipart(self.codec.pack(header, body))

    def recv(self, timeout: float = 5.0) -> tuple[Header, bytes]:
        """The next message other than the kernel's heartbeats."""
        while True:
            assert self.sock.poll(int(timeout * 1000)), f"nothing from the kernel within {timeout}s"
            header, body, _ = self.codec.unpack(self.sock.recv_multipart())
            if not (header.kind == Kind.CONTROL and header.type == "Heartbeat"):
                return header, body

    def hello(self, name: str) -> Welcome:
        self.send(Header(kind=Kind.CONTROL, type="Hello", id=1), Hello(service=name))
        header, body = self.recv()
        assert header.kind == Kind.REPLY, msgspec.msgpack.decode(body)
        return msgspec.msgpack.decode(body, type=Welcome)

    def told(self) -> Error:
        """An error the kernel sent unprompted (id 0)."""
        header, body = self.recv()
        assert header.kind == Kind.ERROR and header.id == 0, header
        return msgspec.msgpack.decode(body, type=Error)

    def close(self) -> None:
        self.sock.close(0)


# -- 1. ending an enrolment, revoking, removing a service: at once, and the peer is told why ----

async def test_unenrolling_a_key_ends_its_live_session_at_once(make_system) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    remote = Remote("remote")
    system: System = make_system(_config(endpoint, remote))
    await system.wait_ready("security", "greeter")
    after = 0
    with pytest.raises(ConnectionLost) as lost:
        with anyio.fail_after(20):
            async with connect("remote", endpoint=endpoint, credential="", curve=_curve(system, remote)) as bus:
                assert (await bus.call("greeter", Add(a=1, b=2), Sum, timeout=5)).value == 3
                await _busctl(system, "security", "unenroll", "remote")
                # the kernel ended the session before it answered the security service: not one
                # more call gets through (it used to be 97 of 97 in the next 5 s)
                while after < 20:
                    await bus.call("greeter", Add(a=1, b=1), Sum, timeout=5)
                    after += 1
    assert after == 0
    # the client was told why, tried a new session and was refused it: it stops, saying both
    message = str(lost.value)
    assert "its CURVE key" in message and "was unenrolled by the security service" in message, message
    assert "refused a new session" in message and "not enrolled" in message, message
    log = system.log()
    assert '"peer_disconnected"' in log and "was unenrolled by the security service" in log
    assert ("unenrolled", "remote", "") in await _audit(system)
    # an empty key is not how to unenroll any more
    bad = await _busctl(system, "security", "enroll", "remote", "", check=False)
    assert bad.returncode == 2 and "busctl security unenroll remote" in bad.stderr, bad


async def test_the_peer_is_told_at_once_why_its_session_ended(make_system) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    unenrolled, replaced, removed = Remote("unenrolled"), Remote("replaced"), Remote("removed")
    config = _config(endpoint, unenrolled, replaced, removed, raw=True)
    system: System = make_system(config)
    await system.wait_ready("security", "greeter")
    peers = {r.name: RawCurvePeer(endpoint, _curve(system, r)) for r in (unenrolled, replaced, removed)}
    try:
        for name, peer in peers.items():
            assert peer.hello(name).name == name
        # an unenrolled key, a key replaced by another, a service removed from the config by a
        # reload: each session ends at once, and the kernel says so without being asked
        await _busctl(system, "security", "unenroll", "unenrolled")
        err = peers["unenrolled"].told()
        assert err.code == ErrorCode.UNAUTHENTICATED and "was unenrolled by the security service" in err.message
        new_public, _ = zmq.curve_keypair()
        await _busctl(system, "security", "enroll", "replaced", new_public.decode())
        err = peers["replaced"].told()
        assert err.code == ErrorCode.UNAUTHENTICATED and "was replaced" in err.message, err
        system.config_path.write_text(config.replace(removed.config(), ""))
        await _busctl(system, "reload")
        err = peers["removed"].told()
        assert err.code == ErrorCode.UNAUTHENTICATED and "'removed' was removed from the configuration" in err.message
        # and any later message on those connections is refused, saying the same
        for name, peer in peers.items():
            peer.send(Header(kind=Kind.CONTROL, type="Heartbeat"), Heartbeat())
            header, body = peer.recv()
            assert header.kind == Kind.ERROR and msgspec.msgpack.decode(body, type=Error).code == ErrorCode.UNAUTHENTICATED
    finally:
        for peer in peers.values():
            peer.close()


async def test_revoking_a_capability_restricts_the_live_session_at_once(make_system) -> None:
    system: System = make_system(SECURITY + '[services.client]\ncapabilities = ["call:greeter.*", "subscribe:example.*"]\n')
    await system.wait_ready("security", "greeter")
    async with system.client() as operator, system.client("client") as bus:
        assert (await bus.call("greeter", Add(a=1, b=2), Sum, timeout=5)).value == 3
        await _busctl(system, "caps", "revoke", "client", "call:greeter.Add")
        with pytest.raises(Forbidden, match="call:greeter.Add"):  # the very next call, naming why
            await bus.call("greeter", Add(a=1, b=2), Sum, timeout=5)
        assert (await bus.call("greeter", Greet(who="x"), Greeting, timeout=5)).text == "hello, x"
        # a subscription the revocation no longer covers ends at once, and the subscriber is
        # told (it used to stay open, silently receiving nothing)
        async with bus.subscribe("example.") as sub:
            await operator.publish("example.mark", Echo(text="before"))
            with anyio.fail_after(5):
                assert (await sub.receive()).decode(Echo).text == "before"
            await _busctl(system, "caps", "revoke", "client", "subscribe:example.*")
            await operator.publish("example.mark", Echo(text="after"))
            with anyio.fail_after(5):
                received = [event.decode(Echo).text async for event in sub]  # ends: no more to come
            assert received == []
        log = system.log()
        assert '"subscription_ended"' in log and '"example."' in log


# -- 2. run-time decisions win over the config across reloads and restarts, until reset ----------

async def _refused(system: System, endpoint: str, remote: Remote) -> str:
    with pytest.raises(ConnectError) as refused:
        async with connect(remote.name, endpoint=endpoint, credential="", curve=_curve(system, remote),
                           connect_timeout=3.0):
            pass
    return str(refused.value)


async def test_an_unenrolment_and_a_revocation_survive_reload_and_restart_until_reset(make_system, tmp_path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    remote = Remote("remote")
    config = _config(endpoint, remote, extra='[services.client]\ncapabilities = ["call:greeter.*"]\n')
    system: System = make_system(config, sub="device")
    await system.wait_ready("security", "greeter")
    assert (await _enrolment(system, "remote")).origin == "config"
    await _busctl(system, "security", "unenroll", "remote")
    await _busctl(system, "caps", "revoke", "client", "call:greeter.Add")
    listing = (await _busctl(system, "security", "list")).stdout
    row = next(line for line in listing.splitlines() if line.startswith("remote "))
    assert "run-time unenrolment" in row and remote.public.decode() in row, listing  # the config's key, withdrawn

    async def still_refused(system: System) -> None:
        assert "not enrolled" in await _refused(system, endpoint, remote)
        entry = await _enrolment(system, "remote")
        assert (entry.origin, entry.public_key, entry.config_key) == ("unenrolment", "", remote.public.decode())
        async with system.client("client") as bus:
            with pytest.raises(Forbidden):
                await bus.call("greeter", Add(a=1, b=1), Sum, timeout=5)
        caps = (await _busctl(system, "caps", "client")).stdout
        assert any("!call:greeter.Add" in line and "run-time revocation" in line for line in caps.splitlines()), caps

    # a reload with the file unchanged used to enrol the key again
    await _busctl(system, "reload")
    await still_refused(system)
    # a kernel restart with the same state directory: the config enrols the key at boot, the
    # security service unenrols it again when it starts; tcp peers wait until it has
    assert system.stop() == 0
    again = System(tmp_path / "device", config)
    try:
        again.wait_bus()
        attempts = 0
        while attempts < 3 or (await again.services())["security"].state != "ready":
            with pytest.raises(ConnectError):  # not one session, not even before security is ready
                async with connect("remote", endpoint=endpoint, credential="", curve=_curve(again, remote),
                                   connect_timeout=0.5):
                    pass
            attempts += 1
        await again.wait_ready("security", "greeter")
        await still_refused(again)
        # until reset: then the configuration applies again
        out = (await _busctl(again, "security", "reset", "remote")).stdout
        assert "reset the enrolment of remote" in out and "config" in out, out
        async with connect("remote", endpoint=endpoint, credential="", curve=_curve(again, remote)) as bus:
            assert (await bus.call("greeter", Add(a=2, b=2), Sum, timeout=5)).value == 4
        entry = await _enrolment(again, "remote")
        assert (entry.origin, entry.public_key) == ("config", remote.public.decode())
        again_reset = await _busctl(again, "security", "reset", "remote", check=False)
        assert again_reset.returncode == 1 and "no run-time enrolment or unenrolment" in again_reset.stderr
        kinds = await _audit(again)
        assert ("enrolment-reset", "remote", "was an unenrolment") in kinds
    finally:
        again.kill()


# -- 3. the SDK notices that its session is over; keys that do not match are audited --------------

async def test_a_client_that_may_not_reconnect_stops_with_the_reason(make_system) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    remote = Remote("remote")
    system: System = make_system(_config(endpoint, remote))
    await system.wait_ready("security", "greeter")
    with pytest.raises(ConnectionLost, match="was unenrolled by the security service") as lost:
        with anyio.fail_after(10):
            async with connect("remote", endpoint=endpoint, credential="", curve=_curve(system, remote),
                               reconnect=False) as bus:
                await bus.call("greeter", Add(a=1, b=1), Sum, timeout=5)
                await _busctl(system, "security", "unenroll", "remote")
                await anyio.sleep_forever()  # told at once: no call is needed to find out
    assert "refused a new session" not in str(lost.value)  # it did not try
    # a new connection with that key is refused at once, saying why (not "no answer" after 10 s)
    with anyio.fail_after(5):
        assert "refused this connection's CURVE key" in await _refused(system, endpoint, remote)


async def test_a_heartbeat_on_an_ended_session_is_answered_with_the_reason(make_system) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    remote = Remote("remote")
    system: System = make_system(_config(endpoint, remote, raw=True))
    await system.wait_ready("security", "greeter")
    peer = RawCurvePeer(endpoint, _curve(system, remote))
    try:
        peer.hello("remote")
        await _busctl(system, "security", "unenroll", "remote")
        peer.told()
        peer.send(Header(kind=Kind.CONTROL, type="Heartbeat"), Heartbeat())
        header, body = peer.recv()
        err = msgspec.msgpack.decode(body, type=Error)
        assert header.kind == Kind.ERROR and err.code == ErrorCode.UNAUTHENTICATED, err  # not bad-message
        assert "session ended" in err.message and "unenrolled" in err.message
        # a Hello on that connection: the key is not enrolled any more
        peer.send(Header(kind=Kind.CONTROL, type="Hello", id=7), Hello(service="remote"))
        header, body = peer.recv()
        assert header.id == 7 and msgspec.msgpack.decode(body, type=Error).code == ErrorCode.UNAUTHENTICATED
    finally:
        peer.close()


async def test_a_peer_with_the_right_public_key_and_the_wrong_secret_is_logged_and_audited(make_system) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    remote = Remote("remote")
    system: System = make_system(_config(endpoint, remote))
    await system.wait_ready("security", "greeter")
    _, wrong_secret = zmq.curve_keypair()
    keys = ((system.run_dir / "bus.curve.pub").read_bytes(), remote.public, wrong_secret)
    with pytest.raises(ConnectError, match="the CURVE handshake failed"):
        async with connect("remote", endpoint=endpoint, credential="", curve=keys, connect_timeout=1.0):
            pass
    wait_for(lambda: "keys do not match" in system.log(), 5, "the failed handshake in the kernel's log")
    failed = [line for line in system.log().splitlines() if '"authentication_failed"' in line]
    assert failed and all('"CURVE"' in line for line in failed), failed
    with anyio.fail_after(10):
        while not any(k == "authentication-failed" and s == "tcp peer" and "keys do not match" in d
                      for k, s, d in await _audit(system)):
            await anyio.sleep(0.2)
    # libzmq retried the handshake about every 0.1 s: summarised, not one line each
    assert len(failed) < 10, failed


# -- 4. who may be enrolled: PROTOCOL.md 9.1.3 and the kernel agree --------------------------------

async def test_only_services_configured_without_a_command_are_enrolled(make_system) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    remote = Remote("remote", enrolled_in_config=False)
    system: System = make_system(_config(endpoint, remote))
    await system.wait_ready("security", "greeter")
    key = zmq.curve_keypair()[0].decode()
    for verb in (("enroll", "operator", key), ("unenroll", "operator")):
        bad = await _busctl(system, "security", *verb, check=False)
        assert bad.returncode == 1 and "rejected" in bad.stderr and "the operator role is not enrolled" in bad.stderr, bad
    bad = await _busctl(system, "security", "enroll", "greeter", key, check=False)
    assert bad.returncode == 1 and "'greeter' is started by the kernel" in bad.stderr, bad
    bad = await _busctl(system, "security", "enroll", "nosuch", key, check=False)
    assert "unknown-destination" in bad.stderr and "no service named 'nosuch'" in bad.stderr, bad
    # nothing was kept of those
    enrollments = system.run_dir / "state" / "security" / "enrollments.json"
    assert not enrollments.exists() or msgspec.json.decode(enrollments.read_bytes()) == {}
    # a service configured without a command is, at run time too
    out = (await _busctl(system, "security", "enroll", "remote", remote.public.decode())).stdout
    assert "enrolled remote" in out and "run-time enrolment" in out, out
    async with connect("remote", endpoint=endpoint, credential="", curve=_curve(system, remote)) as bus:
        assert (await bus.call("greeter", Add(a=1, b=1), Sum, timeout=5)).value == 2
        listing = (await _busctl(system, "security", "list", "--json")).stdout
        entry = next(e for e in msgspec.json.decode(listing) if e["name"] == "remote")
        assert (entry["public_key"], entry["origin"], entry["connected"]) == (remote.public.decode(), "enrolment",
                                                                              True), listing
    # a key identifies one principal
    other = Remote("other", enrolled_in_config=False)
    system.config_path.write_text(_config(endpoint, remote, other))
    await _busctl(system, "reload")
    bad = await _busctl(system, "security", "enroll", "other", remote.public.decode(), check=False)
    assert bad.returncode == 1 and "enrolled for 'remote'" in bad.stderr, bad
    spec = (Path(__file__).resolve().parent.parent / "protocols" / "PROTOCOL.md").read_text()
    assert "the services the kernel has started are" not in spec
