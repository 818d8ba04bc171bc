"""The telemetry service: aggregates every service's metrics and serves them.

Services publish their registry on ``metrics.<service>`` every interval; the kernel's own
counters (requests, events, denials per service) come from its ListServices.  The
Prometheus text format is served over HTTP on the ``http`` setting's address (loopback by
default, ``127.0.0.1:9464``; empty: no HTTP) at ``/metrics``, and on the bus (GetMetrics,
``busctl metrics``).  One subscription per concern, each consumed by its own task:
metrics, alerts and audit checkpoints (forwarded upstream), feature samples (drift).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec

from protocols import ListServices, ServiceList
import numpy as np

from protocols.modelstore import InspectModel, ModelManifest
from protocols.scheduler import Alert
from protocols.telemetry import (
    DriftEvent,
    FeatureSamples,
    GetMetrics,
    GetUplink,
    MetricFamily,
    MetricsSnapshot,
    MetricsText,
    Reply,
    Request,
    Sample,
    UplinkState,
)
from protocols.runtime import ENV_STATE_DIR
from services import BusError, Context, Forbidden, Incoming, Service, SettingsError, Subscription, run

from ._drift import LEVELS, DriftAlarm, DriftDetector
from ._outbox import PRIORITY, Outbox, OutboxFull
from ._prometheus import render
from ._settings import TelemetrySettings
from ._uplink import Uplink, UplinkSettings

__all__ = ["TelemetryService"]


class TelemetryService(Service):
    name = "telemetry"
    Settings = TelemetrySettings
    Request = Request
    Reply = Reply

    async def setup(self) -> None:
        settings: TelemetrySettings = self.settings
        self.snapshots: dict[str, list[MetricFamily]] = {}
        self.seen: dict[str, float] = {}
        # Subscribed before READY, so that nothing published after it is missed.
        self.subscriptions = contextlib.AsyncExitStack()
        self.metric_events = await self._subscribe("metrics.")
        self.alert_events = await self._subscribe("alerts.", if_forbidden="alerts_not_forwarded")
        self.sample_events = await self._subscribe("samples.", if_forbidden="drift_off")
        self.checkpoint_events = await self._subscribe("security.checkpoint", if_forbidden="checkpoints_not_forwarded")
        self.detectors: dict[tuple[str, str], DriftDetector | None] = {}
        self.drift_window = settings.drift_window
        self.drift_every = settings.drift_every
        self.alarms: dict[tuple[str, str], DriftAlarm] = {}
        self.m_psi = self.metrics.gauge("edgebus_drift_psi", "PSI of the latest window against the reference",
                                        ("model", "version", "feature"))
        self.m_level = self.metrics.gauge("edgebus_drift_level", "Drift level: 0 ok, 1 warn, 2 alert",
                                          ("model", "version"))
        self.m_drift = self.metrics.counter("edgebus_drift_events", "Drift events raised (a change to warn or alert)",
                                            ("model", "version"))
        self.m_ingested = self.metrics.counter("edgebus_telemetry_samples_ingested", "Metric samples received")
        state = Path(os.environ.get(ENV_STATE_DIR, ".")) / "telemetry"
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.outbox = Outbox(state / "outbox.db", max_bytes=settings.outbox_max_bytes, max_age=settings.outbox_max_age,
                             min_free_share=settings.outbox_min_free_share)
        self.device = settings.device_id
        self.summary_interval = settings.summary_interval
        self.uplink = None
        if settings.uplink is not None:
            self.uplink = Uplink(settings.uplink, self.outbox, device_id=self.device,
                                 password=self._uplink_password(settings.uplink))
        self._last_summary: dict[str, float] = {}
        self.http: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        #: where /metrics is served, or why it is not (GetUplink: http, http_error)
        self.http_url = self.http_error = ""
        if settings.http:
            await self._listen(settings.http)

    async def _listen(self, address: str) -> None:
        """Serve /metrics on ``address`` (host:port).  If it cannot be had (a port in use:
        another system on this machine), say so in one line and go on without HTTP: the
        metrics stay on the bus (GetMetrics), and GetUplink tells why there is no HTTP."""
        host, _, port = address.rpartition(":")
        host = host or "127.0.0.1"
        try:
            self.http = await anyio.create_tcp_listener(local_host=host, local_port=int(port))
        except (OSError, OverflowError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.http_error = f"cannot listen on {address}: {reason}"
            self.log.error("metrics_http_unavailable", address=address, error=reason,
                           detail="serving the metrics on the bus only (busctl metrics); give telemetry another "
                                  "address: http = \"host:port\" (or \"\" for none) in [services.telemetry.settings]")
            return
        self.http_url = f"http://{host}:{self.http.extra(anyio.abc.SocketAttribute.local_port)}/metrics"
        self.log.info("metrics_http", address=self.http_url)

    async def _subscribe(self, prefix: str, *, if_forbidden: str = "") -> Subscription | None:
        """A subscription kept until teardown; None (logged as ``if_forbidden``) when the
        capability is missing and the concern is optional."""
        try:
            return await self.subscriptions.enter_async_context(self.bus.subscribe(prefix))
        except Forbidden as exc:
            if not if_forbidden:
                raise
            self.log.warning(if_forbidden, reason=str(exc))
            return None

    def _uplink_password(self, uplink: UplinkSettings) -> str:
        """The broker password, from the environment variable the settings name."""
        if not uplink.password_env:
            return ""
        password = os.environ.get(uplink.password_env)
        if password is None:
            raise SettingsError(self.bus.name, "settings.uplink.password_env",
                                f"the environment variable {uplink.password_env} is not set: set it in the "
                                f"kernel's environment and list it in this service's pass_environment")
        return password

    async def teardown(self) -> None:
        await self.subscriptions.aclose()

    async def main(self) -> None:
        async with anyio.create_task_group() as tg:
            assert self.metric_events is not None
            tg.start_soon(self._collect_metrics, self.metric_events)
            if self.alert_events is not None:
                tg.start_soon(self._forward_alerts, self.alert_events)
            if self.checkpoint_events is not None:
                tg.start_soon(self._forward_checkpoints, self.checkpoint_events)
            if self.sample_events is not None:
                tg.start_soon(self._watch_drift, self.sample_events)
            tg.start_soon(self._summaries)
            if self.uplink is not None:
                tg.start_soon(self.uplink.run)
            if self.http is not None:
                tg.start_soon(self.http.serve, self._serve_http)

    def enqueue(self, topic: str, kind: str, body: object) -> None:
        """Accept a message for the uplink (durable once this returns)."""
        payload = msgspec.json.encode({"device": self.device, "kind": kind, "time": time.time(), "body": body})
        try:
            self.outbox.put(topic, payload, PRIORITY[kind])
        except OutboxFull as exc:  # counted in the outbox's dropped
            self.log.warning("uplink_message_dropped", topic=topic, kind=kind, reason=str(exc))
            return
        if self.uplink is not None:
            self.uplink.notify()

    async def _drift(self, model: str, version: str, rows: np.ndarray) -> None:
        key = (model, version)
        if key not in self.detectors:
            try:
                manifest = (await self.bus.call("modelstore", InspectModel(name=model, version=version),
                                                ModelManifest)).manifest
                reference = msgspec.to_builtins(manifest.reference)
                self.detectors[key] = DriftDetector(reference, window=self.drift_window, every=self.drift_every) \
                    if reference else None
            except BusError as exc:
                self.log.warning("drift_reference_unavailable", model=model, version=version, error=str(exc))
                return
        detector = self.detectors[key]
        if detector is None:
            return
        windows = detector.windows
        detector.add(rows)
        if detector.windows == windows:
            return  # no window evaluated
        for result in detector.last:
            self.m_psi.set(result.psi, model, version, result.feature)
        self.m_level.set(LEVELS.index(detector.level), model, version)
        alarm = self.alarms.setdefault(key, DriftAlarm(self.settings.drift_repeat))
        due = alarm.update(detector.level, time.time())
        if due is None:
            return  # no change, and no reminder due
        change, previous = due
        body = [msgspec.to_builtins(f) for f in detector.at_level()]
        if change == "raise":
            self.m_drift.inc(model, version)
        (self.log.info if change == "clear" else self.log.warning)(
            "drift", model=model, version=version, level=alarm.level, change=change, previous=previous,
            features=[f["feature"] for f in body])
        event = DriftEvent(model=model, version=version, features=body, level=alarm.level, change=change,
                           previous=previous, since=alarm.since, windows=detector.windows)
        await self.bus.publish("telemetry.drift", event)
        self.enqueue(f"drift/{model}", "drift", msgspec.to_builtins(event))

    async def _summaries(self) -> None:
        """Condensed metrics every interval, for the uplink."""
        while True:
            await anyio.sleep(self.summary_interval)
            services = {}
            for service, families in self.snapshots.items():
                values = {f.name: sum(s.value for s in f.samples if not s.name.endswith(("_bucket", "_sum")))
                          for f in families}
                requests = values.get("edgebus_requests", 0.0)
                services[service] = {"requests": requests - self._last_summary.get(service, 0.0),
                                     "cpu_s": round(values.get("process_cpu_seconds", 0.0), 2),
                                     "rss": int(values.get("process_resident_memory_bytes", 0.0))}
                self._last_summary[service] = requests
            self.enqueue("summary", "summary", {"interval_s": self.summary_interval, "services": services})

    async def _forward_checkpoints(self, events: Subscription) -> None:
        """The security service's signed audit checkpoints, upstream."""
        async for incoming in events:
            if incoming.header.dest == "security.checkpoint" and incoming.sender == "security":
                self.enqueue("audit/checkpoint", "audit", msgspec.msgpack.decode(incoming.body))

    async def _watch_drift(self, events: Subscription) -> None:
        """Model-input features (``samples.<model>``) into each model version's detector."""
        decoder = msgspec.msgpack.Decoder(FeatureSamples)
        async for incoming in events:
            if (s := self._decode(incoming, "FeatureSamples", decoder)) is not None:
                await self._drift(s.model, s.version, np.asarray(incoming.tensor(s.tensor)))

    async def _forward_alerts(self, events: Subscription) -> None:
        """Alerts (``alerts.<what>``), upstream."""
        decoder = msgspec.msgpack.Decoder(Alert)
        async for incoming in events:
            if (alert := self._decode(incoming, "Alert", decoder)) is not None:
                self.enqueue("alerts/" + incoming.header.dest.removeprefix("alerts."), "alert",
                             {**msgspec.to_builtins(alert), "from": incoming.sender})

    def _decode(self, incoming: Incoming, type_name: str, decoder: msgspec.msgpack.Decoder) -> Any:
        if incoming.type != type_name:
            return None
        try:
            return decoder.decode(incoming.body)
        except msgspec.DecodeError:
            self.log.warning("bad_event", type=type_name, topic=incoming.header.dest, sender=incoming.sender)
            return None

    async def _collect_metrics(self, events: Subscription) -> None:
        """Every service's registry (``metrics.<service>``), for the exposition and summaries."""
        decoder = msgspec.msgpack.Decoder(MetricsSnapshot)
        async for incoming in events:
            if (snap := self._decode(incoming, "MetricsSnapshot", decoder)) is None:
                continue
            # the kernel-stamped sender, not what the snapshot claims
            self.snapshots[incoming.sender] = snap.families
            produced = [s.value for f in snap.families if f.name == "edgebus_sensor_bytes" for s in f.samples]
            if produced:  # a sensor's own counter: into the persisted total, like the uplink's
                self.outbox.add_reading("raw_sensor_bytes", incoming.sender, sum(produced))
            self.m_ingested.inc(value=sum(len(f.samples) for f in snap.families))
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
            MetricFamily(name="edgebus_bus_dropped", kind="counter",
                         help="Messages to it the kernel dropped: its queue was full (events, heartbeats)",
                         samples=[Sample(name="edgebus_bus_dropped_total", labels={"name": s.name},
                                         value=float(s.dropped)) for s in listing.services]),
        ]
        families["kernel"] = kernel
        return render(families)

    async def handle(self, req: Request, ctx: Context) -> Reply:
        match req:
            case GetMetrics():
                return MetricsText(text=await self.exposition())
            case GetUplink():
                up = self.uplink
                counters = self.outbox.counters()
                return UplinkState(enabled=up is not None, connected=bool(up and up.connected),
                                   queued=self.outbox.count(), queued_bytes=self.outbox.size(),
                                   outbox_disk_bytes=self.outbox.disk_bytes(),
                                   sent=counters.get("sent", 0), bytes_sent=counters.get("bytes_sent", 0),
                                   dropped=self.outbox.dropped(), raw_sensor_bytes=counters.get("raw_sensor_bytes", 0),
                                   counting_since=self.outbox.since(), http=self.http_url, http_error=self.http_error)

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
