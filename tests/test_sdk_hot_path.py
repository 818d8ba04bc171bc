"""The SDK's request path without a task, cancel scope or timer per message (issue 12):
deadlines watched by one reaper task (the caller's and the handler's), requests served by at
most max_concurrency long-lived workers, on asyncio and trio alike."""

from __future__ import annotations

import time

import anyio
import msgspec
import pytest

from protocols import Hello
from services import DeadlineExceeded, connect

from conftest import System

CONFIG = """
[services.slow]
[services.client]
capabilities = ["call:slow.*"]
"""


class Nap(msgspec.Struct, tag=True):
    seconds: float = 0.0


class Napped(msgspec.Struct, tag=True):
    seconds: float = 0.0


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory):
    s = System(tmp_path_factory.mktemp("hot"), CONFIG)
    s.wait_bus()
    yield s
    s.stop()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_deadlines_concurrency_and_cancellation_without_per_message_scopes(system: System,
                                                                                  anyio_backend: str) -> None:
    decode = msgspec.msgpack.Decoder(Nap).decode
    running = [0, 0]  # now, most at once

    async def on_request(incoming):  # type: ignore[no-untyped-def]
        nap = decode(incoming.body)
        running[0] += 1
        running[1] = max(running)
        try:
            if nap.seconds:
                await anyio.sleep(nap.seconds)
        finally:
            running[0] -= 1
        return Napped(seconds=nap.seconds)

    with anyio.fail_after(60):
        async with connect("slow", endpoint=system.endpoint, credential=system.credential("slow"),
                           hello=Hello(service="slow", types=["Nap"]), on_request=on_request,
                           max_concurrency=2) as service:
            await service.ready()
            async with connect("client", endpoint=system.endpoint, credential=system.credential("client")) as bus:
                # a handler that overruns its deadline is cancelled at it; its worker serves on
                started = time.monotonic()
                with pytest.raises(DeadlineExceeded):
                    await bus.call("slow", Nap(seconds=5), Napped, timeout=0.3)
                assert time.monotonic() - started < 3
                assert (await bus.call("slow", Nap(), Napped, timeout=5)).seconds == 0
                # a short deadline after a long one (out of order for the reaper) is kept
                async with anyio.create_task_group() as tg:
                    async def long() -> None:
                        with pytest.raises(DeadlineExceeded):
                            await bus.call("slow", Nap(seconds=5), Napped, timeout=2)

                    tg.start_soon(long)
                    await anyio.sleep(0.05)
                    started = time.monotonic()
                    with pytest.raises(DeadlineExceeded):
                        await bus.call("slow", Nap(seconds=5), Napped, timeout=0.2)
                    assert time.monotonic() - started < 1.5
                # a cancelled call leaves nothing behind
                with anyio.move_on_after(0.1):
                    await bus.call("slow", Nap(seconds=0.5), Napped, timeout=10)
                assert not bus._calls
                # at most max_concurrency handlers at once; the others wait their turn
                running[1] = 0
                results: list[float] = []
                started = time.monotonic()
                async with anyio.create_task_group() as tg:
                    for _ in range(6):
                        async def one() -> None:
                            results.append((await bus.call("slow", Nap(seconds=0.2), Napped, timeout=10)).seconds)

                        tg.start_soon(one)
                assert results == [0.2] * 6
                assert running[1] == 2
                assert time.monotonic() - started >= 0.55
                await service.wait_idle()
                counts = service.metrics.requests.values
                assert counts[("Nap", "timeout")] == 3
                assert counts[("Nap", "ok")] >= 8
