"""The conformance service on the Python SDK: the peer ``edgebus conformance`` drives
(PROTOCOL.md, appendix "Conformance"; the messages are in ``protocols.conformance``).

    edgebus conformance --peer 'python -m services.examples.conformance'

``--fault NAME`` makes it deliberately wrong in one way, for the suite's own tests:
``tags`` (records events whose body tag differs from the header's type), ``tensors``
(echoes tensors without checking their descriptors against the frames), ``liveness``
(never notices that the kernel went silent).  ``--reconnect`` starts a new session when the
kernel ends one (the SDK client's behaviour) instead of exiting (a service's).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Any

import anyio
import anyio.abc

from protocols import BodyDecoder, DecodeError
from protocols.conformance import (
    SERVICE, TOPICS, Echo, Echoed, Fail, Listen, Listening, Note, Notes, Publish, Published, Received, Reply,
    Request, Seen, Sleep, Slept,
)
from protocols import Error, ErrorCode
from services import EXIT_BUS, BusError, Context, Service, Subscription, configure_logging, error_from_wire, run, serve

FAULTS = ("tags", "tensors", "liveness")


class ConformancePeer(Service):
    name = SERVICE
    Request = Request
    Reply = Reply
    publishes = [TOPICS + "*"]
    #: the deliberate fault (one of FAULTS), or ""
    fault = ""

    async def setup(self) -> None:
        self.notes: list[Seen] = []
        self.prefixes: set[str] = set()
        self._notes = BodyDecoder(Note)
        self._new, self._subscriptions = anyio.create_memory_object_stream[Subscription](64)

    async def handle(self, req: Request, ctx: Context) -> Reply | tuple[Reply, list[Any]]:
        match req:
            case Echo(text=text, tensors=tensors):
                if self.fault != "tensors":
                    for desc in tensors:
                        ctx.tensor(desc)  # a descriptor that does not fit its frame: bad-message
                return Echoed(text=text, tensors=tensors, sender=ctx.sender), ctx.frames
            case Sleep(seconds=seconds):
                await anyio.sleep(seconds)  # the SDK answers timeout at the deadline
                return Slept(seconds=seconds)
            case Publish(topic=topic, text=text):
                await self.bus.publish(topic, Note(text=text))
                return Published(topic=topic)
            case Listen(topics=topics):
                sub = await self.bus.subscribe(*topics)  # the kernel's refusal is answered as is
                self.prefixes.update(topics)
                self._new.send_nowait(sub)
                return Listening(topics=sorted(self.prefixes))
            case Received():
                notes, self.notes = self.notes, []
                return Notes(notes=notes)
            case Fail(code=code, message=message):
                try:
                    wire = Error(code=ErrorCode(code), message=message)
                except ValueError:
                    wire = Error(code=ErrorCode.INTERNAL, message=f"asked to fail with {code!r}")
                raise error_from_wire(wire)

    async def main(self) -> None:
        async with anyio.create_task_group() as tg:
            if self.fault == "liveness":
                tg.start_soon(self._deaf)
            async for sub in self._subscriptions:
                tg.start_soon(self._collect, sub)

    async def _collect(self, sub: Subscription) -> None:
        async for event in sub:
            if self.fault == "tags":
                text = event.decode()
                self.notes.append(Seen(topic=event.header.dest, sender=event.sender,
                                       text=str(text.get("text", "")) if isinstance(text, dict) else ""))
                continue
            try:
                note = self._notes.decode(event.header.type, event.body)
            except DecodeError as exc:  # a tag mismatch, or another type: dropped (3.3)
                self.log.warning("event_dropped", topic=event.header.dest, problem=str(exc))
                continue
            self.notes.append(Seen(topic=event.header.dest, sender=event.sender, text=note.text))

    async def _deaf(self) -> None:
        # The fault "liveness": pretend the kernel spoke a moment ago, for ever (reaching
        # into the client on purpose: no correct peer does this).
        while True:
            self.bus._last_rx = time.monotonic()
            await anyio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(prog="services.examples.conformance",
                                     description="the conformance service on the Python SDK")
    parser.add_argument("--fault", choices=FAULTS, default="", help="misbehave in this one way (for tests)")
    parser.add_argument("--reconnect", action="store_true",
                        help="start a new session when one ends, as an SDK client does, instead of exiting")
    args = parser.parse_args()
    ConformancePeer.fault = args.fault
    if not args.reconnect:
        run(ConformancePeer)
        return
    log = configure_logging(SERVICE)
    try:
        anyio.run(functools.partial(serve, ConformancePeer, reconnect=True))
    except* BusError as group:
        log.error("service_bus_error", error=str(group.exceptions[0]))
        sys.exit(EXIT_BUS)
    except* KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
