"""The SDK's own ends for tools/bench_bus.py: an echo service and a client written with
``services.connect`` as a user would, on asyncio or trio.

Run as a script (``python tools/_bench_sdk.py serve|client ...``) so that PYTHONPATH alone
decides which ``services``/``protocols`` are measured: bench_bus points it at an older
checkout to compare SDK versions in one run.

    serve  ENDPOINT CREDENTIAL_FILE BACKEND            prints "ready", echoes until killed
    client ENDPOINT CREDENTIAL_FILE BACKEND RTT_N PIPE_N WINDOW   prints one JSON line
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import anyio
import msgspec

SMALL = b"x" * 64


class Echo(msgspec.Struct, tag=True):
    data: bytes = b""


class Echoed(msgspec.Struct, tag=True):
    data: bytes = b""


def serve(endpoint: str, credential_file: str, backend: str) -> None:
    from protocols import Hello
    from services import connect

    dec = msgspec.msgpack.Decoder(Echo)

    async def on_request(incoming):  # type: ignore[no-untyped-def]
        return Echoed(data=dec.decode(incoming.body).data)

    async def main() -> None:
        credential = Path(credential_file).read_text().strip()
        async with connect("echo-sdk", endpoint=endpoint, credential=credential, on_request=on_request,
                           hello=Hello(service="echo-sdk", types=["Echo"]), reconnect=False) as bus:
            await bus.ready()
            print("ready", flush=True)
            await anyio.sleep_forever()

    try:
        anyio.run(main, backend=backend)
    except KeyboardInterrupt:
        pass  # (profilers stop it with SIGINT)


def client(endpoint: str, credential_file: str, backend: str, rtt_n: str, pipe_n: str, window: str) -> None:
    from services import connect

    async def main() -> dict[str, float]:
        credential = Path(credential_file).read_text().strip()
        async with connect("client-sdk", endpoint=endpoint, credential=credential) as bus:
            msg = Echo(data=SMALL)
            for _ in range(300):  # warm-up
                await bus.call("echo-sdk", msg, Echoed)
            times = []
            for _ in range(int(rtt_n)):
                t0 = time.perf_counter()
                await bus.call("echo-sdk", msg, Echoed)
                times.append(time.perf_counter() - t0)
            times.sort()
            total, left = int(pipe_n), [int(pipe_n)]

            async def worker() -> None:
                while left[0] > 0:
                    left[0] -= 1
                    await bus.call("echo-sdk", msg, Echoed)

            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(int(window)):
                    tg.start_soon(worker)
            rps = total / (time.perf_counter() - t0)
            return {"rtt_us": statistics.median(times) * 1e6, "rtt_p99_us": times[int(len(times) * 0.99)] * 1e6,
                    "pipelined_rps": rps}

    print(json.dumps(anyio.run(main, backend=backend)), flush=True)


if __name__ == "__main__":
    {"serve": serve, "client": client}[sys.argv[1]](*sys.argv[2:])
