"""protocols._native (one multipart message per call, in C) against pyzmq frame by frame.

Both implementations of ``recv_frames``/``send_frames``/``recv_user`` run the same cases
on real sockets, and each reads what the other wrote.  The fallback (no compiled module)
is run end to end in a process of its own: a router, an SDK service and an SDK client.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from protocols import transport

IMPLS = {"pure": (transport._recv_frames, transport._send_frames, transport._recv_user)}
if transport.NATIVE:
    IMPLS["native"] = (transport._native.recv, transport._native.send, transport._native.recv_user)
ROOT = Path(__file__).resolve().parent.parent


def test_the_compiled_module_is_built_where_a_compiler_is() -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here: protocols._native is not built and pyzmq's calls are used")
    assert transport.NATIVE, "protocols._native did not build or load (pip install -e . prints why)"
    assert transport.recv_frames is transport._native.recv


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind(f"ipc://{tmp_path}/n.sock")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"peer")
    dealer.connect(f"ipc://{tmp_path}/n.sock")
    router.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        yield router, dealer
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def _combos() -> list[tuple[str, str]]:
    return [(a, b) for a in IMPLS for b in IMPLS]


@pytest.mark.parametrize(("sender", "receiver"), _combos())
def test_messages_cross_between_the_implementations(pair: Any, sender: str, receiver: str) -> None:
    router, dealer = pair
    _, send, _ = IMPLS[sender]
    recv, _, _ = IMPLS[receiver]
    array = np.arange(300_000, dtype=np.float32)  # 1.2 MB: pyzmq's zero-copy send
    frames = [b"EB\x01\x00", b"header", b"", b"x" * 100_000, array, memoryview(b"view"), zmq.Frame(b"frame")]
    send(dealer, frames)
    got = recv(router, 0, 4)
    assert got[0] == b"peer"
    assert got[1:4] == [b"EB\x01\x00", b"header", b""]
    assert all(isinstance(p, bytes) for p in got[:4])
    rest = got[4:]
    assert [len(p) for p in rest] == [100_000, array.nbytes, 4, 5]
    assert [p.more for p in rest] == [True, True, True, False]
    assert rest[0].bytes == b"x" * 100_000
    assert np.array_equal(np.frombuffer(rest[1].buffer, dtype=np.float32), array)
    assert bytes(memoryview(rest[2])) == b"view"
    # received frames go on as they are (the router forwards them), and the defaults:
    # flags=0, small=4, keywords accepted
    _, send_back, _ = IMPLS[receiver]
    send_back(router, got)
    again = IMPLS[sender][0](dealer, small=1)
    assert again[0] == b"EB\x01\x00"
    assert [len(p) for p in again[1:]] == [6, 0, 100_000, array.nbytes, 4, 5]
    assert np.array_equal(np.frombuffer(again[4], dtype=np.float32), array)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_errors_are_pyzmqs_own(pair: Any, impl: str) -> None:
    router, dealer = pair
    recv, send, _ = IMPLS[impl]
    with pytest.raises(zmq.Again):
        recv(router, zmq.NOBLOCK)
    with pytest.raises(zmq.ZMQError) as unroutable:  # ROUTER_MANDATORY, no such identity
        send(router, [b"nobody", b"x"])
    assert unroutable.value.errno == zmq.EHOSTUNREACH
    router.setsockopt(zmq.RCVTIMEO, 50)
    with pytest.raises(zmq.Again):  # a blocking receive that timed out
        recv(router, 0)
    closed = zmq.Context.instance().socket(zmq.DEALER)
    closed.close()
    with pytest.raises(zmq.ZMQError) as exc:
        send(closed, [b"x"])
    assert exc.value.errno == zmq.ENOTSOCK
    with pytest.raises(zmq.ZMQError):
        recv(closed, 0)


@pytest.mark.skipif(not transport.NATIVE, reason="protocols._native is not built")
def test_native_argument_errors_name_the_problem(pair: Any) -> None:
    router, dealer = pair
    native = transport._native
    with pytest.raises(ValueError, match="at least one frame"):
        native.send(dealer, [])
    with pytest.raises(TypeError, match="sequence of frames"):
        native.send(dealer, 3)
    with pytest.raises(TypeError, match="small"):
        native.recv(router, 0, 4, 5)
    with pytest.raises(TypeError, match="small"):
        native.recv(router, colour=1)
    with pytest.raises(AttributeError):
        native.recv(object())


@pytest.mark.skipif(not transport.NATIVE, reason="protocols._native is not built")
def test_a_blocking_receive_lets_other_threads_run_and_signals_interrupt_it(pair: Any) -> None:
    router, dealer = pair
    router.setsockopt(zmq.RCVTIMEO, -1)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(transport._native.recv(router)))
    thread.start()
    # The receiving thread holds no GIL while it waits: this thread runs and sends.
    transport._native.send(dealer, [b"a", b"b"])
    thread.join(10)
    assert got and got[0] == [b"peer", b"a", b"b"]

    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            transport._native.recv(router)  # waits forever: only the signal ends it
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_recv_user_reads_the_curve_identity(tmp_path: Path, impl: str) -> None:
    _, _, recv_user = IMPLS[impl]
    from zmq.auth.thread import ThreadAuthenticator

    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    server_pub, server_sec = zmq.curve_keypair()
    client_pub, client_sec = zmq.curve_keypair()
    auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.CURVE_SERVER, 1)
    router.setsockopt(zmq.CURVE_SECRETKEY, server_sec)
    router.setsockopt(zmq.RCVTIMEO, 5000)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.CURVE_SERVERKEY, server_pub)
    dealer.setsockopt(zmq.CURVE_PUBLICKEY, client_pub)
    dealer.setsockopt(zmq.CURVE_SECRETKEY, client_sec)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    plain = ctx.socket(zmq.DEALER)
    plain_router = ctx.socket(zmq.ROUTER)
    plain_router.bind(f"ipc://{tmp_path}/plain.sock")
    plain_router.setsockopt(zmq.RCVTIMEO, 5000)
    plain.connect(f"ipc://{tmp_path}/plain.sock")
    try:
        transport.send_frames(dealer, [b"sig", b"hdr"])
        parts, user = recv_user(router, 0, 4)
        assert parts[1:] == [b"sig", b"hdr"]
        assert user == client_pub.decode()
        transport.send_frames(plain, [b"sig", b"hdr"])
        parts, user = recv_user(plain_router, 0, 4)
        assert parts[1:] == [b"sig", b"hdr"] and user is None
    finally:
        for sock in (router, dealer, plain, plain_router):
            sock.close(0)
        auth.stop()
        ctx.term()


def test_without_the_compiled_module_the_bus_works_as_before(tmp_path: Path) -> None:
    """A router, an SDK service and an SDK client in a process where protocols._native
    cannot be imported: requests with tensors, on asyncio and trio."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["protocols._native"] = None  # as if it had not been built
        import anyio, sniffio, numpy as np, msgspec
        from protocols import transport, Hello, pack_tensors, Tensor
        assert not transport.NATIVE and transport.recv_frames is transport._recv_frames
        from kernel import Router, Principal
        from kernel._caps import CapabilitySet
        from kernel._config import BusConfig
        from services import connect

        class Sum(msgspec.Struct, tag=True):
            x: Tensor

        class Total(msgspec.Struct, tag=True):
            total: float

        async def on_request(incoming):
            return Total(total=float(incoming.tensor(incoming.decode(Sum).x).sum()))

        async def main():
            async with connect("svc", endpoint=ep, credential="s", on_request=on_request,
                               hello=Hello(service="svc", types=["Sum"])) as svc:
                await svc.ready()
                async with connect("cli", endpoint=ep, credential="c") as cli:
                    for n in (16, 1_000_000):
                        descs, frames = pack_tensors([np.ones(n, np.float32)])
                        reply = await cli.call("svc", Sum(x=descs[0]), Total, frames=frames, timeout=10)
                        assert reply.total == n, reply
            with open("{tmp_path}/done", "a") as f:
                f.write(sniffio.current_async_library() + "\\n")

        ep = "ipc://{tmp_path}/bus.sock"
        principals = [Principal("svc", CapabilitySet([]), credential="s"),
                      Principal("cli", CapabilitySet(["call:svc.Sum"]), credential="c")]
        router = Router(ep, BusConfig(), principals, known_services=["svc"])
        with router.running():
            for backend in ("asyncio", "trio"):
                anyio.run(main, backend=backend)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "done").read_text().split() == ["asyncio", "trio"], proc.stdout[-3000:]
