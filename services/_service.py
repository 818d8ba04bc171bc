"""The Service base class and the ``run`` entry point.

A service declares the union of requests it serves and dispatches with ``match``::

    class Greeter(Service):
        name = "greeter"
        Request = Greet | Add
        Reply = Greeting | Sum

        async def handle(self, req: Request, ctx: Context) -> Reply:
            match req:
                case Greet(who=who):
                    return Greeting(text=f"hello {who}")
                case Add(a=a, b=b):
                    return Sum(value=a + b)

    if __name__ == "__main__":
        run(Greeter)

Settings: ``Settings = MySettings`` (a :class:`services.Settings` Struct) is what the
config's ``[services.<name>.settings]`` table is decoded into, before ``setup()``, as
``self.settings``.  Settings that do not decode end the process with status 78 (the
supervisor does not restart it) and a log line naming the key.

Lifecycle: connect and say Hello, decode the settings, ``setup()``, READY, then ``main()`` alongside request
handling until SIGTERM/SIGINT; then drain in-flight requests (``stop_grace``), ``teardown()``,
Bye, exit 0.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, ClassVar

import anyio
import msgspec

from protocols import BodyDecoder, DecodeError, Header, Hello, unpack_tensor
from protocols.telemetry import MetricsSnapshot

from ._bus import BusClient, Incoming, connect
from ._exceptions import BadMessage, BusError, SettingsError, UnknownType, lone_exception
from ._settings import decode_settings
from protocols.runtime import ENV_BACKEND, ENV_SERVICE, EXIT_BUS, EXIT_CONFIG, configure_logging, get_logger

__all__ = ["Service", "Context", "run", "serve"]


class Context(msgspec.Struct):
    """What a handler knows about the request besides its body."""

    header: Header
    frames: list[Any]
    bus: BusClient

    @property
    def sender(self) -> str:
        """The authenticated sender, stamped by the kernel."""
        return self.header.sender

    @property
    def deadline(self) -> float:
        return self.header.deadline

    def tensor(self, desc: Any) -> Any:
        """The numpy view of a tensor frame; a malformed descriptor answers bad-message."""
        try:
            return unpack_tensor(desc, self.frames)
        except DecodeError as exc:
            raise BadMessage(str(exc)) from exc


def _union_members(union: Any) -> list[type]:
    if union is None:
        return []
    args = getattr(union, "__args__", None)
    return list(args) if args else [union]


class Service:
    #: Default name; the kernel's EDGEBUS_SERVICE overrides it.
    name: ClassVar[str] = ""
    #: The type of this service's settings (a ``services.Settings`` Struct), or None.
    Settings: ClassVar[Any] = None
    #: The tagged union of request types served (``A | B``), or None for no requests.
    Request: ClassVar[Any] = None
    #: The union of reply types, for introspection.
    Reply: ClassVar[Any] = None
    #: Topics this service publishes on, for introspection.
    publishes: ClassVar[list[str]] = []
    max_concurrency: ClassVar[int] = 64
    #: Seconds to let in-flight requests finish after SIGTERM.
    stop_grace: ClassVar[float] = 5.0

    def __init__(self, bus: BusClient, settings: Any = None) -> None:
        self.bus = bus
        #: The decoded ``[services.<name>.settings]`` (an instance of ``Settings``).
        self.settings = settings if settings is not None or self.Settings is None else self.Settings()
        self.log = get_logger()
        #: this process's metrics registry (published by the SDK; add your own)
        self.metrics = bus.metrics

    # -- what subclasses override ----------------------------------------------------------

    async def setup(self) -> None:
        """Initialise (open files, load models, subscribe) before READY is sent."""

    async def handle(self, request: Any, ctx: Context) -> Any:
        raise UnknownType(f"{type(self).__name__} has no handler")

    async def main(self) -> None:
        """Background work after READY (publishing loops...).  Default: nothing."""
        await anyio.sleep_forever()

    async def teardown(self) -> None:
        """Release resources after requests drained; runs even when cancelled (shielded)."""

    # -- plumbing --------------------------------------------------------------------------

    @classmethod
    def hello(cls, name: str) -> Hello:
        requests = _union_members(cls.Request)
        replies = _union_members(cls.Reply)
        return Hello(
            service=name,
            types=[t.__struct_config__.tag for t in requests],
            schema=msgspec.json.schema(cls.Request) if requests else {},
            reply_schema=msgspec.json.schema(cls.Reply) if replies else {},
            publishes=list(cls.publishes),
        )


async def serve(cls: type[Service], name: str | None = None, **connect_options: Any) -> None:
    """Run ``cls`` on the bus until SIGTERM/SIGINT (or cancellation)."""
    name = name or os.environ.get(ENV_SERVICE) or cls.name
    log = get_logger()
    decoder = BodyDecoder(cls.Request) if cls.Request is not None else None
    service: Service | None = None

    async def on_request(incoming: Incoming) -> Any:
        if decoder is None:
            raise UnknownType(f"{name!r} serves no requests")
        try:
            request = decoder.decode(incoming.header.type, incoming.body)
        except DecodeError as exc:
            raise BadMessage(str(exc)) from exc
        assert service is not None
        return await service.handle(request, Context(incoming.header, incoming.frames, service.bus))

    # A service does not reconnect: when the kernel is gone or ends its session, it exits
    # (EXIT_BUS) and the kernel, if any, restarts it with a fresh credential.
    connect_options.setdefault("reconnect", False)
    async with connect(name, hello=cls.hello(name), on_request=on_request if decoder else None,
                       max_concurrency=cls.max_concurrency, **connect_options) as bus:
        assert bus.welcome is not None
        service = cls(bus, decode_settings(bus.welcome.settings, cls.Settings, service=bus.name))
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                try:
                    await service.setup()
                    await bus.ready()
                    log.info("service_ready", name=bus.name)
                    tg.start_soon(service.main)
                    tg.start_soon(_publish_metrics, bus)
                    async for signum in signals:
                        log.debug("service_stopping", signal=signal.Signals(signum).name)  # (the kernel logs the stop)
                        break
                    bus.draining = True
                    with anyio.move_on_after(cls.stop_grace):
                        await bus.wait_idle()
                finally:
                    tg.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        await service.teardown()


async def _publish_metrics(bus: BusClient) -> None:
    """Every EDGEBUS_METRICS_INTERVAL seconds (0: never), the registry on metrics.<name>."""
    interval = float(os.environ.get("EDGEBUS_METRICS_INTERVAL", "5"))
    if interval <= 0:
        return
    while True:
        await anyio.sleep(interval)
        await bus.publish(f"metrics.{bus.name}", MetricsSnapshot(service=bus.name, time=time.time(),
                                                                  families=bus.metrics.snapshot()))


def run(cls: type[Service], *, backend: str | None = None) -> None:
    """Process entry point: configure logging, pick the anyio backend (EDGEBUS_BACKEND:
    asyncio or trio), run the service, and exit with a meaningful status."""
    name = os.environ.get(ENV_SERVICE) or cls.name
    log = configure_logging(name)
    backend = backend or os.environ.get(ENV_BACKEND) or "asyncio"
    try:
        try:
            anyio.run(serve, cls, backend=backend)
        except BaseExceptionGroup as group:
            lone = lone_exception(group)
            if lone is None:
                raise
            raise lone from None
    except BusError as exc:
        log.error("service_bus_error", error=str(exc))
        sys.exit(EXIT_BUS)
    except SettingsError as exc:
        log.error("settings_invalid", key=exc.key, problem=exc.problem,
                  detail="fix [services.<name>.settings] in the config; not restarted")
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt:
        pass
    except SystemExit as exc:  # a service's own verdict, e.g. SystemExit(EXIT_CONFIG)
        log.info("service_exit", status=exc.code)
        raise
    log.debug("service_stopped", backend=backend)
