"""The telemetry service: aggregates every service's metrics and serves them.

Services publish their registry on ``metrics.<service>`` every interval; the kernel's own
counters (requests, events, denials per service) come from its ListServices.  The
Prometheus text format is served over HTTP on ``EDGEBUS_TELEMETRY_HTTP`` (loopback by
default, ``127.0.0.1:9464``; empty: no HTTP) at ``/metrics``, and on the bus (GetMetrics,
``busctl metrics``).
"""

from __future__ import annotations

import os
import time

import anyio
import anyio.abc
import msgspec

from protocols import ListServices, ServiceList
from protocols.telemetry import GetMetrics, MetricFamily, MetricsSnapshot, MetricsText, Reply, Request, Sample
from services import BusError, Context, Service, run

from ._prometheus import render

__all__ = ["TelemetryService"]


class TelemetryService(Service):
    name = "telemetry"
    Request = Request
    Reply = Reply

    async def setup(self) -> None:
        self.snapshots: dict[str, list[MetricFamily]] = {}
        self.seen: dict[str, float] = {}
        await self.bus.subscribe("metrics.")
        address = os.environ.get("EDGEBUS_TELEMETRY_HTTP", "127.0.0.1:9464")
        self.http = None
        if address:
            host, _, port = address.rpartition(":")
            self.http = await anyio.create_tcp_listener(local_host=host or "127.0.0.1", local_port=int(port))
            self.log.info("metrics_http", address=f"http://{host}:{self.http.extra(anyio.abc.SocketAttribute.local_port)}/metrics")

    async def main(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._collect)
            if self.http is not None:
                tg.start_soon(self.http.serve, self._serve_http)

    async def _collect(self) -> None:
        decoder = msgspec.msgpack.Decoder(MetricsSnapshot)
        async for incoming in self.bus.events:
            if incoming.type != "MetricsSnapshot":
                continue
            try:
                snap = decoder.decode(incoming.body)
            except msgspec.DecodeError:
                self.log.warning("bad_metrics", sender=incoming.sender)
                continue
            # the kernel-stamped sender, not what the snapshot claims
            self.snapshots[incoming.sender] = snap.families
            self.seen[incoming.sender] = time.time()

    async def exposition(self) -> str:
        families = dict(self.snapshots)
        try:
            listing = await self.bus.call("kernel", ListServices(), ServiceList, timeout=5)
        except BusError:
            listing = ServiceList(services=[])
        kernel = [
            MetricFamily(name="edgebus_service_up", kind="gauge", help="1 when the service is ready",
                         samples=[Sample(name="edgebus_service_up", labels={"name": s.name},
                                         value=1.0 if s.state == "ready" else 0.0) for s in listing.services]),
            MetricFamily(name="edgebus_service_restarts", kind="counter", help="Restarts by the supervisor",
                         samples=[Sample(name="edgebus_service_restarts_total", labels={"name": s.name},
                                         value=float(s.restarts)) for s in listing.services]),
            MetricFamily(name="edgebus_bus_requests_in", kind="counter", help="Requests the kernel routed to it",
                         samples=[Sample(name="edgebus_bus_requests_in_total", labels={"name": s.name},
                                         value=float(s.requests_in)) for s in listing.services]),
            MetricFamily(name="edgebus_bus_requests_out", kind="counter", help="Requests it sent",
                         samples=[Sample(name="edgebus_bus_requests_out_total", labels={"name": s.name},
                                         value=float(s.requests_out)) for s in listing.services]),
            MetricFamily(name="edgebus_bus_denied", kind="counter", help="Its messages the kernel denied",
                         samples=[Sample(name="edgebus_bus_denied_total", labels={"name": s.name},
                                         value=float(s.denied)) for s in listing.services]),
        ]
        families["kernel"] = kernel
        return render(families)

    async def handle(self, req: Request, ctx: Context) -> Reply:
        match req:
            case GetMetrics():
                return MetricsText(text=await self.exposition())

    async def _serve_http(self, client: anyio.abc.SocketStream) -> None:
        """A minimal HTTP/1.0 responder: GET /metrics, anything else 404."""
        async with client:
            try:
                with anyio.fail_after(5):
                    request = b""
                    while b"\r\n\r\n" not in request and len(request) < 8192:
                        request += await client.receive(4096)
            except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError):
                return
            line = request.split(b"\r\n", 1)[0].decode("latin-1", "replace").split()
            if len(line) >= 2 and line[0] == "GET" and line[1].split("?")[0] == "/metrics":
                body = (await self.exposition()).encode()
                head = (f"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n")
            else:
                body = b"not found: the metrics are at /metrics\n"
                head = f"HTTP/1.0 404 Not Found\r\nContent-Length: {len(body)}\r\n\r\n"
            try:
                await client.send(head.encode() + body)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass


def main() -> None:
    run(TelemetryService)
