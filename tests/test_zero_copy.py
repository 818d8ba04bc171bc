"""Tensor payloads cross the router without a single copy.

The router runs in-process on an inproc endpoint, where libzmq hands message buffers over
by reference: if neither the kernel nor the SDK copied the payload, the receiver's frame
points at the very bytes the sender's numpy array owns.
"""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import zmq

from kernel import BusConfig, CapabilitySet, Principal, Router
from protocols import SIGNATURE, Codec, Header, Hello, Kind, Ready, pack_tensors, unpack_tensor
from protocols.transport import recv_frames, send_frames


def _address(buf: object) -> int:
    return np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0]


@pytest.fixture
def inproc_router():
    ctx = zmq.Context()
    client_p = Principal("client", CapabilitySet(["call:echo.*"]))
    echo_p = Principal("echo", CapabilitySet([]))
    router = Router("inproc://zero-copy-bus", BusConfig(), [client_p, echo_p], ctx=ctx)
    with router.running():
        yield ctx, router, client_p, echo_p
    ctx.term()


def _peer(ctx: zmq.Context, name: str, credential: str, types: list[str]) -> zmq.Socket:
    codec = Codec()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect("inproc://zero-copy-bus")
    send_frames(sock, codec.pack(Header(kind=Kind.CONTROL, type="Hello", id=1),
                                 Hello(service=name, credential=credential, types=types)))
    header, _, _ = codec.unpack(recv_frames(sock, small=3))
    assert header.kind == Kind.REPLY
    return sock


def test_a_tensor_reaches_the_service_in_the_senders_own_buffer(inproc_router) -> None:
    ctx, router, client_p, echo_p = inproc_router
    echo = _peer(ctx, "echo", echo_p.credential, ["Echo"])
    send_frames(echo, Codec().pack(Header(kind=Kind.CONTROL, type="Ready"), Ready()))
    client = _peer(ctx, "client", client_p.credential, [])
    arr = np.random.default_rng(0).random((256, 1024), dtype=np.float32)  # 1 MiB
    descs, buffers = pack_tensors([arr])
    codec = Codec()
    body = msgspec.msgpack.encode({"type": "Echo", "tensors": [msgspec.to_builtins(d) for d in descs]})
    frames = [SIGNATURE, codec.encode(Header(kind=Kind.REQUEST, type="Echo", dest="echo", id=1)), body,
              zmq.Frame(buffers[0], copy=False)]
    # Ready has no reply: until the router has processed it, the client is answered
    # `unavailable`; then the request reaches echo.
    for _ in range(100):
        send_frames(client, frames)
        header, _, raw = codec.unpack(_recv_any(echo, client))
        if raw:
            break
    else:
        pytest.fail("the request never reached the echo service")
    assert header.sender == "client" and header.type == "Echo"
    received = unpack_tensor(descs[0], raw)
    assert np.array_equal(received, arr)
    assert _address(raw[0].buffer) == arr.__array_interface__["data"][0], "the payload was copied on the way"


def _recv_any(echo: zmq.Socket, client: zmq.Socket) -> list:
    """The next message for echo; an error sent back to the client (not ready yet) is
    returned as a message without raw frames."""
    poller = zmq.Poller()
    poller.register(echo, zmq.POLLIN)
    poller.register(client, zmq.POLLIN)
    ready = dict(poller.poll(5000))
    if echo in ready:
        return recv_frames(echo, small=3)
    if client in ready:
        return recv_frames(client, small=3)
    raise AssertionError("nothing arrived within 5 s")


def test_zero_copy_packing_hands_large_tensors_to_zeromq_and_copies_small_ones() -> None:
    """A forwarder (scheduler, driver) packs with zero_copy=True: a tensor of 64 KiB or more
    travels as a zmq.Frame over its own memory (ZeroMQ reads it after send returns), a small
    one as a buffer the socket copies; by default every tensor is copied by the socket, so a
    client may reuse its array the moment the send returns."""
    from protocols._tensors import ZERO_COPY_MIN

    big = np.arange(ZERO_COPY_MIN // 4, dtype=np.float32).reshape(4, -1)
    small = np.ones((1, 4), np.float32)
    descs, frames = pack_tensors([big, small], zero_copy=True)
    assert isinstance(frames[0], zmq.Frame) and _address(frames[0].buffer) == _address(big)
    assert isinstance(frames[1], memoryview)
    assert [unpack_tensor(d, frames).tolist() for d in descs] == [big.tolist(), small.tolist()]
    _, copied = pack_tensors([big])
    assert isinstance(copied[0], memoryview)


def test_the_finite_check_finds_nan_and_both_infinities_without_a_temporary() -> None:
    from services.scheduler._contract import all_finite

    for dtype in (np.float16, np.float32, np.float64):
        x = np.zeros((3, 5), dtype)
        assert all_finite(x) and all_finite(x[:0])
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[2, 4] = bad
            assert not all_finite(y), (dtype, bad)
