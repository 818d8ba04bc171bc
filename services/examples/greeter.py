"""An example third-party service: typed requests, tensor pass-through, and a periodic event.

Run by the default config as ``python -m services.examples.greeter``.
"""

from __future__ import annotations

import os

import anyio
import msgspec

from protocols import Tensor
from services import Context, Service, run


class Greet(msgspec.Struct, tag=True):
    who: str


class Add(msgspec.Struct, tag=True):
    a: float
    b: float


class Echo(msgspec.Struct, tag=True, omit_defaults=True):
    """Returns ``text`` and every tensor frame unchanged (zero-copy both ways)."""

    text: str = ""
    tensors: list[Tensor] = []


class Sleep(msgspec.Struct, tag=True):
    """Waits ``seconds`` before answering: for deadline and shutdown tests."""

    seconds: float


class Greeting(msgspec.Struct, tag=True):
    text: str
    greeted_by: str


class Sum(msgspec.Struct, tag=True):
    value: float


class Echoed(msgspec.Struct, tag=True, omit_defaults=True):
    text: str = ""
    tensors: list[Tensor] = []
    sender: str = ""


class Slept(msgspec.Struct, tag=True):
    seconds: float


class Tick(msgspec.Struct, tag=True):
    n: int


Request = Greet | Add | Echo | Sleep
Reply = Greeting | Sum | Echoed | Slept


class Greeter(Service):
    name = "greeter"
    Request = Request
    Reply = Reply
    publishes = ["example.tick"]
    tick_interval = float(os.environ.get("GREETER_TICK_INTERVAL", "5"))

    async def setup(self) -> None:
        # A slow initialisation, for readiness tests: READY is only sent after this.
        await anyio.sleep(float(os.environ.get("GREETER_SETUP_DELAY", "0")))

    async def handle(self, req: Request, ctx: Context) -> Reply | tuple[Reply, list]:
        match req:
            case Greet(who=who):
                return Greeting(text=f"hello, {who}", greeted_by=self.bus.name)
            case Add(a=a, b=b):
                return Sum(value=a + b)
            case Echo(text=text, tensors=tensors):
                return Echoed(text=text, tensors=tensors, sender=ctx.sender), ctx.frames
            case Sleep(seconds=seconds):
                await anyio.sleep(seconds)
                return Slept(seconds=seconds)

    async def main(self) -> None:
        n = 0
        while True:
            await anyio.sleep(self.tick_interval)
            n += 1
            await self.bus.publish("example.tick", Tick(n=n))


if __name__ == "__main__":
    run(Greeter)
