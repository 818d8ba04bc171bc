"""A service that publishes as fast as it can (tests/test_hardening_sdk.py): started by the
test, not by the kernel, so that only the SDK can notice the kernel's death."""

import msgspec

from services import Service, run


class Tick(msgspec.Struct, tag=True):
    n: int
    pad: bytes = b"x" * 256


class FastPublisher(Service):
    name = "flood"
    publishes = ["flood.tick"]

    async def main(self) -> None:
        n = 0
        while True:
            await self.bus.publish("flood.tick", Tick(n=n))
            n += 1


if __name__ == "__main__":
    run(FastPublisher)
