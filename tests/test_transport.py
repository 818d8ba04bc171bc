"""The anyio socket adapter with a waiting receiver and a busy sender on one socket.

pyzmq's FD is edge-triggered: a send from one task can process the notification a
receiving task is blocked on, and without a re-check (AsyncSocket._nudge) the receiver
sleeps through a message already queued.  That race is timing-dependent (libzmq throttles
command processing in send); this test drives it hard on both backends, 200 rounds of one
reply against a stream of sends, and fails on its timeout if a reply is ever slept through.
"""

from __future__ import annotations

import threading

import anyio
import pytest
import zmq

from protocols.transport import AsyncSocket, recv_frames, send_frames


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_waiting_receiver_never_misses_a_message(anyio_backend: str, tmp_path) -> None:
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.bind(f"ipc://{tmp_path}/echo.sock")
    stop = threading.Event()

    def echo() -> None:  # answers "echo" frames, swallows the others
        poller = zmq.Poller()
        poller.register(server, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                frames = recv_frames(server, small=2)
                if frames[1] == b"echo":
                    send_frames(server, frames)

    thread = threading.Thread(target=echo)
    thread.start()
    client = ctx.socket(zmq.DEALER)
    client.connect(f"ipc://{tmp_path}/echo.sock")
    asock = AsyncSocket(client)
    rounds = 200
    received = 0
    try:
        with anyio.fail_after(30):
            for _ in range(rounds):
                # One request, then a busy sender: each of its sends may process the
                # notification of the reply's arrival before the event loop sees it.
                await asock.send([b"echo"])
                async with anyio.create_task_group() as tg:
                    async def receiver() -> None:
                        nonlocal received
                        await asock.recv(small=1)
                        received += 1
                        tg.cancel_scope.cancel()

                    async def noise() -> None:
                        while True:
                            await asock.send([b"noise"])
                            await anyio.sleep(0)

                    tg.start_soon(receiver)
                    tg.start_soon(noise)
    finally:
        stop.set()
        thread.join()
        client.close(0)
        server.close(0)
        ctx.term()
    assert received == rounds
