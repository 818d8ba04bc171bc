"""The router in-process, through its public surface: running(), submit(command), notices,
statistics().  What it tells the supervisor arrives on the event loop without the router
thread waiting for it; what the supervisor tells it is what the kernel API reports."""

from __future__ import annotations

import time
from typing import Any

import anyio
import msgspec
import pytest
import zmq

from kernel import BusConfig, CapabilitySet, Principal, Router
from kernel._boundary import FinishOperation, OperationRequested, PeerGone, PeerReady, ServiceUpdate
from protocols import (
    Bye, Codec, Error, ErrorCode, GetService, Header, Hello, Kind, Ready, ServiceStateChanged, ServiceStatus,
    StartService, Subscribe, Subscribed, Welcome,
)
from protocols.transport import recv_frames, send_frames

pytestmark = pytest.mark.anyio
ENDPOINT = "inproc://router-boundary"
#: What the kernel says in these tests.
Said = Welcome | Subscribed | ServiceStatus | ServiceStateChanged | Error


class Peer:
    def __init__(self, ctx: zmq.Context, principal: Principal) -> None:
        self.codec = Codec()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 5000)
        self.sock.connect(ENDPOINT)
        welcome = self.request(Header(kind=Kind.CONTROL, type="Hello", id=1),
                               Hello(service=principal.name, credential=principal.credential))
        assert isinstance(welcome[1], Welcome)

    def send(self, header: Header, body: Any) -> None:
        send_frames(self.sock, self.codec.pack(header, body))

    def receive(self) -> tuple[Header, Any]:
        while True:
            header, body, _ = self.codec.unpack(recv_frames(self.sock, small=3))
            if header.type != "Heartbeat":
                return header, msgspec.msgpack.decode(body, type=Said)

    def request(self, header: Header, body: Any) -> tuple[Header, Any]:
        self.send(header, body)
        return self.receive()


@pytest.fixture
def bus():
    ctx = zmq.Context()
    svc = Principal("svc", CapabilitySet(["publish:svc.*"]))
    operator = Principal("operator", CapabilitySet(["call:kernel.*", "subscribe:kernel.*"]), shared=True)
    router = Router(ENDPOINT, BusConfig(), [svc, operator], known_services=["svc"], supervised=True, ctx=ctx)
    with router.running():
        yield ctx, router, svc, operator
    ctx.destroy(0)  # (closes what a failed test left open)


async def next_notice(router: Router) -> Any:
    assert router.notices is not None
    with anyio.fail_after(5):
        return await router.notices.__anext__()


async def test_readiness_and_departure_reach_the_event_loop(bus) -> None:
    ctx, router, svc_p, _ = bus
    svc = Peer(ctx, svc_p)
    svc.send(Header(kind=Kind.CONTROL, type="Ready"), Ready())
    assert await next_notice(router) == PeerReady("svc")
    svc.send(Header(kind=Kind.CONTROL, type="Bye"), Bye(reason="done"))
    gone = await next_notice(router)
    assert isinstance(gone, PeerGone)
    assert (gone.name, gone.why, gone.credential, gone.silent) == ("svc", "said bye: done", svc_p.credential, False)
    svc.sock.close(0)


def test_notices_never_wait_for_a_reader(bus) -> None:
    """Nobody drains the mailbox here: the router thread goes on routing regardless."""
    ctx, router, svc_p, operator_p = bus
    for _ in range(50):
        svc = Peer(ctx, svc_p)  # each Hello replaces the last connection: a PeerGone each
        svc.sock.close(0)
    client = Peer(ctx, operator_p)
    header, body = client.request(Header(kind=Kind.REQUEST, type="GetService", dest="kernel", id=7),
                                  GetService(name="svc"))
    assert header.id == 7 and isinstance(body, ServiceStatus)
    assert router.notices is not None and len(router.notices) >= 49
    stats = router.statistics()
    assert stats.peers == 2 and stats.pending == 0
    client.sock.close(0)


async def test_the_supervisors_status_updates_are_what_the_kernel_reports(bus) -> None:
    ctx, router, svc_p, operator_p = bus
    client = Peer(ctx, operator_p)
    client.request(Header(kind=Kind.CONTROL, type="Subscribe", id=2), Subscribe(topics=["kernel.services"]))
    router.submit(ServiceUpdate(ServiceStatus(name="svc", state="starting", pid=4242, managed=True, restarts=3),
                                started_at=time.monotonic() - 2.0, previous="backoff", detail="spawned"))
    header, event = client.receive()
    assert header.dest == "kernel.services"
    assert event == ServiceStateChanged(name="svc", state="starting", previous="backoff", pid=4242, detail="spawned")
    _, status = client.request(Header(kind=Kind.REQUEST, type="GetService", dest="kernel", id=3), GetService(name="svc"))
    assert (status.state, status.pid, status.managed, status.restarts) == ("starting", 4242, True, 3)
    assert 2.0 <= status.uptime < 60
    client.sock.close(0)


async def test_an_operation_is_handed_over_and_answered_later(bus) -> None:
    ctx, router, svc_p, operator_p = bus
    client = Peer(ctx, operator_p)
    # Not managed (no status from a supervisor yet): refused at once.
    _, err = client.request(Header(kind=Kind.REQUEST, type="StartService", dest="kernel", id=4),
                            StartService(name="svc"))
    assert isinstance(err, Error) and err.code == ErrorCode.UNKNOWN_DESTINATION
    router.submit(ServiceUpdate(ServiceStatus(name="svc", state="stopped", managed=True)))
    client.send(Header(kind=Kind.REQUEST, type="StartService", dest="kernel", id=5), StartService(name="svc"))
    op = await next_notice(router)
    assert isinstance(op, OperationRequested) and op.request == StartService(name="svc") and op.request_id == 5
    router.submit(ServiceUpdate(ServiceStatus(name="svc", state="ready", pid=99, managed=True), previous="starting"))
    router.submit(FinishOperation(op.identity, op.request_id, ServiceStatus(name="svc", state="ready")))
    header, status = client.receive()
    assert header.kind == Kind.REPLY and header.id == 5
    assert (status.state, status.pid, status.capabilities) == ("ready", 99, ["publish:svc.*"])
    client.send(Header(kind=Kind.REQUEST, type="StartService", dest="kernel", id=6), StartService(name="svc"))
    op = await next_notice(router)
    router.submit(FinishOperation(op.identity, op.request_id, Error(code=ErrorCode.INTERNAL, message="boom")))
    header, err = client.receive()
    assert header.kind == Kind.ERROR and header.id == 6 and err.message == "boom"
    client.sock.close(0)


def test_an_unsupervised_router_refuses_operations() -> None:
    ctx = zmq.Context()
    operator_p = Principal("operator", CapabilitySet(["call:kernel.*"]), shared=True)
    router = Router(ENDPOINT, BusConfig(), [operator_p], ctx=ctx)
    assert router.notices is None
    with router.running():
        client = Peer(ctx, operator_p)
        _, err = client.request(Header(kind=Kind.REQUEST, type="StartService", dest="kernel", id=1),
                                StartService(name="svc"))
        assert err.code == ErrorCode.UNAVAILABLE and "no supervisor" in err.message
        client.sock.close(0)
    ctx.destroy(0)  # (closes what a failed test left open)
