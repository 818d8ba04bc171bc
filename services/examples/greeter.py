"""An example third-party service: typed settings, typed requests, tensor pass-through,
and a periodic event.

Run by the default config as ``python -m services.examples.greeter``, with its settings in
``[services.greeter.settings]``::

    [services.greeter.settings]
    greeting = "good morning, {who}"
    tick_interval = 5.0
"""

from __future__ import annotations

from typing import Annotated

import anyio
import msgspec

from protocols import Tensor
from services import Context, Service, Settings, run


class GreeterSettings(Settings):
    """What ``[services.greeter.settings]`` may hold; anything else is an error."""

    #: the reply to Greet; ``{who}`` is replaced by the name greeted
    greeting: str = "hello, {who}"
    #: seconds between ``example.tick`` events
    tick_interval: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    #: seconds ``setup()`` takes, for readiness tests (READY is sent only after it)
    setup_delay: Annotated[float, msgspec.Meta(ge=0)] = 0.0


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
    Settings = GreeterSettings
    Request = Request
    Reply = Reply
    publishes = ["example.tick"]

    async def setup(self) -> None:
        # A slow initialisation, for readiness tests: READY is only sent after this.
        await anyio.sleep(self.settings.setup_delay)

    async def handle(self, req: Request, ctx: Context) -> Reply | tuple[Reply, list]:
        match req:
            case Greet(who=who):
                return Greeting(text=self.settings.greeting.replace("{who}", who), greeted_by=self.bus.name)
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
            await anyio.sleep(self.settings.tick_interval)
            n += 1
            await self.bus.publish("example.tick", Tick(n=n))


if __name__ == "__main__":
    run(Greeter)
