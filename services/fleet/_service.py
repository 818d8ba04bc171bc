"""The fleet service: the device agent's I/O shell.

It connects to the MQTT broker (paho-mqtt in its own network thread, mutual TLS with the
device's certificate, reconnecting with back-off), feeds the agent core (``_agent.Agent``)
the messages it receives, the model store's state and its own actions' outcomes, and
carries out the agent's actions: MQTT subscriptions and publications, the model store's
``Install`` and ``Activate``, config fragments merged into the config file and the
kernel's ``Reload``, and records in the security service's audit log.  Without a
``broker`` in its settings it stays idle.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectSendStream

from protocols import ListServices, Reload, Reloaded, ServiceList
from protocols import fleet as fleet_protocol
from protocols.fleet import HealthSummary, ModelReport, Topics
from protocols.modelstore import Activate as StoreActivate
from protocols.modelstore import Install as StoreInstall
from protocols.modelstore import Rollback as StoreRollback
from protocols.modelstore import Installed, ListModels, ModelList, ModelState
from protocols.runtime import ENV_STATE_DIR
from protocols.security import Attest, AuditAppend, DeviceKey, PublicKey, SignedReport, TrustedKeys, TrustList
from protocols import ProtocolError
from protocols.telemetry import DriftEvent, MetricsSnapshot
from services import (BusError, ConnectionLost, DeadlineExceeded, Forbidden, Overloaded, Service, Unavailable,
                      UnknownDestination, run)

from ._agent import (
    Activate,
    Agent,
    ApplyConfig,
    Audit,
    Connected,
    DiskStorage,
    Disconnected,
    Done,
    Event,
    Fetch,
    Fetched,
    Health,
    Install,
    Models,
    Publish,
    Received,
    Rollback,
    Serving,
    Subscribe,
    Tick,
    TrustChanged,
    Unsubscribe,
)
from ._config import ConfigFragmentError, merge_fragment
from ._settings import FleetSettings

__all__ = ["FleetService", "main"]

#: the trust store's role of the keys that sign deployment documents
FLEET_ROLE = "fleet"
#: how a step's reason starts when its failure may pass (the service it needs restarting):
#: the step is tried again a few times before the deployment fails
_TRANSIENT = "unavailable for now: "


class FleetService(Service):
    name = "fleet"
    Settings = FleetSettings

    async def setup(self) -> None:
        self.client: Any = None
        self.agent: Agent | None = None
        #: by model: the scheduler's latency histogram (count, {le: cumulative}) summed over its
        #: versions, as last published, and as at the previous Serving
        self._latency: dict[str, tuple[float, dict[float, float]]] = {}
        #: per model, the scheduler's edgebus_inference_errors_total (all versions), now and at the last report
        self._errors: dict[str, float] = {}
        self._errors_then: dict[str, float] = {}
        self._latency_then: dict[str, tuple[float, dict[float, float]]] = {}
        #: by model: the drift level of its latest telemetry.drift event
        self._drift: dict[str, str] = {}

    async def main(self) -> None:
        s: FleetSettings = self.settings
        if s.broker is None:
            self.log.info("fleet_off", detail="no broker in [services.fleet.settings.broker]: not in a fleet")
            await anyio.sleep_forever()
        state_dir = s.state_dir or Path(os.environ.get(ENV_STATE_DIR, ".")) / "fleet"
        storage = DiskStorage(state_dir, s.max_artifact_bytes)
        key = await self.bus.call("security", DeviceKey(), PublicKey, timeout=10)
        self.agent = Agent(s.device_id, s.groups, storage, prefix=s.prefix, public_key=key.public_key,
                           fleet_id=s.fleet, max_artifact_bytes=s.max_artifact_bytes, window=s.window,
                           trusted=await self._fleet_keys())
        self.agent.attestation = await self._attest()
        send, receive = anyio.create_memory_object_stream[Event](64)
        async with anyio.create_task_group() as tg, send, receive:
            self.tg = tg
            self.events = send
            await send.send(Models(await self._models()))
            tg.start_soon(self._watch_models, send)
            tg.start_soon(self._ticker, send)
            tg.start_soon(self._watch_latency)
            tg.start_soon(self._watch_drift)
            try:
                self._start_mqtt(send, anyio.lowlevel.current_token())
            except TlsFilesError as exc:
                self.log.error("fleet_tls_invalid", detail=str(exc))
                await anyio.sleep_forever()  # not a crash loop: nothing changes until the files do
            try:
                async for event in receive:
                    await self._handle(event)
            finally:
                receive.close()  # paho's thread, if waiting to deliver, gives up
                with anyio.CancelScope(shield=True):
                    await self._stop_mqtt()

    async def teardown(self) -> None:
        await self._stop_mqtt()

    # -- MQTT --------------------------------------------------------------------------------

    def _start_mqtt(self, send: MemoryObjectSendStream[Event], token: Any) -> None:
        import paho.mqtt.client as mqtt

        s: FleetSettings = self.settings
        b = s.broker
        assert b is not None
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgebus-fleet-{s.device_id}",
                             clean_session=True)
        if b.tls_ca is not None:
            try:
                client.tls_set(ca_certs=str(b.tls_ca), certfile=str(b.tls_cert) if b.tls_cert else None,
                               keyfile=str(b.tls_key) if b.tls_key else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError) as exc:
                raise TlsFilesError(f"cannot use the TLS files of [services.fleet.settings.broker] (tls_ca {b.tls_ca}, "
                                    f"tls_cert {b.tls_cert}, tls_key {b.tls_key}): {exc}; fix them and restart "
                                    "the fleet service") from None
        client.reconnect_delay_set(max(1, int(b.backoff_initial)), max(1, int(b.backoff_max)))
        log = self.log
        closing = threading.Event()
        presence_topic = Topics(s.prefix).presence(s.device_id)

        def set_will(*_: Any) -> None:
            # before every (re)connection: the broker publishes it if this connection dies
            client.will_set(presence_topic, fleet_protocol.presence(s.device_id, False, "will"), qos=1, retain=True)

        def deliver(event: Event) -> None:
            # paho's thread waits for room in the queue: TCP backpressure bounds what is in memory
            if closing.is_set():
                return
            try:
                anyio.from_thread.run(send.send, event, token=token)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, RuntimeError):
                closing.set()

        def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
            if rc.is_failure:
                log.warning("fleet_connect_refused", host=b.host, port=b.port, reason=str(rc))
                return
            log.info("fleet_connected", host=b.host, port=b.port, device=s.device_id)
            c.publish(presence_topic, fleet_protocol.presence(s.device_id, True, "connected"), qos=1, retain=True)
            deliver(Connected())

        def on_disconnect(c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
            if not closing.is_set():
                log.info("fleet_disconnected", reason=str(rc))
            deliver(Disconnected())

        set_will()
        client.on_pre_connect = set_will
        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = lambda c, u, m: deliver(Received(m.topic, bytes(m.payload)))
        self.client, self._closing = client, closing
        client.connect_async(b.host, b.port, b.keepalive)
        client.loop_start()  # paho's thread: connects, and reconnects with its back-off

    async def _stop_mqtt(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            self._closing.set()
            if client.is_connected():  # a clean disconnect fires no will: say offline first
                s: FleetSettings = self.settings
                info = client.publish(Topics(s.prefix).presence(s.device_id),
                                      fleet_protocol.presence(s.device_id, False, "stopped"), qos=1, retain=True)
                try:
                    await anyio.to_thread.run_sync(info.wait_for_publish, 5.0)
                except (ValueError, RuntimeError) as exc:
                    self.log.warning("fleet_offline_not_sent", error=str(exc))
            client.disconnect()
            # joined from a worker thread: paho's may be handing an event to this loop
            await anyio.to_thread.run_sync(client.loop_stop)

    # -- events and actions ------------------------------------------------------------------

    async def _handle(self, event: Event) -> None:
        agent = self.agent
        assert agent is not None
        if isinstance(event, Received) and agent.topics.parse(event.topic)[0] in ("device-desired", "group-desired"):
            agent.handle(TrustChanged(await self._fleet_keys()))  # the trust store as it is now
        if isinstance(event, Connected):
            agent.attestation = await self._attest()
        for action in agent.handle(event):
            match action:
                case Subscribe(topics=topics) if self.client is not None:
                    self.client.subscribe([(t, 1) for t in topics])
                case Unsubscribe(topics=topics) if self.client is not None:
                    self.client.unsubscribe(topics)
                case Publish(topic=topic, payload=payload, retain=retain, qos=qos) if self.client is not None:
                    self.client.publish(topic, payload, qos=qos, retain=retain)
                case Audit(kind=kind, subject=subject, detail=detail):
                    self.log.info(kind.replace("-", "_"), subject=subject, detail=detail)
                    try:
                        await self.bus.call("security", AuditAppend(kind=kind, subject=subject, detail=detail),
                                            timeout=10)
                    except BusError as exc:
                        self.log.warning("fleet_audit_failed", kind=kind, error=str(exc))
                case Install() | Activate() | Rollback() | ApplyConfig():
                    self.tg.start_soon(self._carry_out, action)
                case Fetch():
                    self.tg.start_soon(self._fetch, action)

    async def _fetch(self, f: Fetch) -> None:
        """A chunk by an HTTP(S) range request (in a worker thread), back to the agent."""
        s: FleetSettings = self.settings
        try:
            data = await anyio.to_thread.run_sync(_range_get, f.url, f.start, f.length, s.http_ca, s.http_timeout)
            event = Fetched(f.sha256, f.index, data)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            event = Fetched(f.sha256, f.index, error=str(exc) or type(exc).__name__)
        await self.events.send(event)

    async def _carry_out(self, action: Install | Activate | Rollback | ApplyConfig) -> None:
        """One of the agent's steps through the bus (in its own task: an install takes a while);
        its outcome goes back to the agent as Done, after the model store's state."""
        agent = self.agent
        assert agent is not None
        for delay in (1.0, 2.0, 4.0, 8.0, 0.0):
            ok, reason = await self._step(action)
            if ok or not reason.startswith(_TRANSIENT) or not delay:
                break
            self.log.info("fleet_step_retry", step=type(action).__name__, reason=reason, retry_in=delay)
            await anyio.sleep(delay)  # the model store or the kernel restarting: try again
        reason = reason.removeprefix(_TRANSIENT)
        try:
            await self.events.send(Models(await self._models()))
        except BusError as exc:
            self.log.warning("fleet_models_unavailable", error=str(exc))
        await self.events.send(Done(action, ok, reason))

    async def _step(self, action: Install | Activate | Rollback | ApplyConfig) -> tuple[bool, str]:
        agent = self.agent
        assert agent is not None
        ok, reason = True, ""
        try:
            match action:
                case Install(ref=ref):
                    if any(m.name == ref.name and ref.version in m.versions for m in await self._models()):
                        return True, ""  # installed by an attempt whose answer was lost
                    data = await anyio.to_thread.run_sync(agent.storage.read_blob, ref.sha256)
                    reply = await self.bus.call("modelstore", StoreInstall(), Installed, frames=[data], timeout=300)
                    if (reply.name, reply.version) != (ref.name, ref.version):
                        ok, reason = False, (f"the bundle is {reply.name} {reply.version}, the document says "
                                             f"{ref.name} {ref.version}")
                case Activate(name=name, version=version):
                    await self.bus.call("modelstore", StoreActivate(name=name, version=version), ModelState, timeout=30)
                case Rollback(name=name, version=version):
                    state = await self.bus.call("modelstore", StoreRollback(name=name), ModelState, timeout=30)
                    if state.active != version:
                        ok, reason = False, f"a rollback of {name} made {state.active or 'none'} active, not {version}"
                case ApplyConfig(fragment=fragment):
                    ok, reason = await self._apply_config(fragment.toml)
        except (Unavailable, DeadlineExceeded, UnknownDestination, Overloaded, ConnectionLost) as exc:
            ok, reason = False, f"{_TRANSIENT}{exc}"
        except BusError as exc:
            ok, reason = False, str(exc)
        except OSError as exc:
            ok, reason = False, f"cannot read the downloaded bundle: {exc}"
        return ok, reason

    async def _apply_config(self, toml: str) -> tuple[bool, str]:
        s: FleetSettings = self.settings
        if s.config_file is None:
            return False, "this device takes no config fragments (no config_file in [services.fleet.settings])"
        state_dir = s.state_dir or Path(os.environ.get(ENV_STATE_DIR, ".")) / "fleet"
        try:
            previous = await anyio.to_thread.run_sync(merge_fragment, s.config_file, state_dir / "config.base.toml",
                                                      toml)
        except ConfigFragmentError as exc:
            return False, str(exc)
        try:
            await self.bus.call("kernel", Reload(), Reloaded, timeout=90)
        except BusError as exc:
            from services import atomic_write

            await anyio.to_thread.run_sync(atomic_write, s.config_file, previous)  # the config as it was
            return False, f"the kernel refused the merged config: {exc}"
        return True, ""

    async def _models(self) -> list[ModelReport]:
        listing = await self.bus.call("modelstore", ListModels(), ModelList, timeout=20)
        return [ModelReport(name=m.name, versions=m.versions, active=m.active, trial=m.trial, previous=m.previous)
                for m in listing.models]

    async def _watch_models(self, send: MemoryObjectSendStream[Event]) -> None:
        """The model store's events (installs, activations, commits, rollbacks by its health
        gates): its state again, to the agent."""
        async with self.bus.subscribe("modelstore.") as events:
            async for _ in events:
                try:
                    await send.send(Models(await self._models()))
                except BusError as exc:
                    self.log.warning("fleet_models_unavailable", error=str(exc))

    async def _ticker(self, send: MemoryObjectSendStream[Event]) -> None:
        s: FleetSettings = self.settings
        while True:
            try:
                listing = await self.bus.call("kernel", ListServices(), ServiceList, timeout=10)
                managed = [x for x in listing.services if x.managed]
                failing = sorted(x.name for x in managed if x.state in ("failed", "backoff"))
                await send.send(Health(HealthSummary(services_ready=sum(x.state == "ready" for x in managed),
                                                     services_total=len(managed), failing=failing)))
            except BusError as exc:
                self.log.warning("fleet_health_unavailable", error=str(exc))
            await send.send(self._serving())
            await send.send(Tick())
            await anyio.sleep(s.report_interval)

    def _serving(self) -> Serving:
        """Requests, errors and p95 latency of each model since the previous call (from the
        scheduler's ``edgebus_inference_total_seconds`` and ``edgebus_inference_errors_total``),
        and its drift level."""
        out = []
        for model in sorted(self._latency.keys() | self._drift.keys()):
            count, cum = self._latency.get(model, (0.0, {}))
            count0, cum0 = self._latency_then.get(model, (0.0, {}))
            requests = max(0, int(count - count0))
            errors = max(0, int(self._errors.get(model, 0.0) - self._errors_then.get(model, 0.0)))
            p95 = 0.0
            if requests:
                finite = [le for le in sorted(cum) if le != float("inf")]
                for le in sorted(cum):
                    if cum[le] - cum0.get(le, 0.0) >= 0.95 * requests:
                        p95 = 1000.0 * (le if le != float("inf") else (finite[-1] if finite else 0.0))
                        break
            out.append(ModelReport(name=model, requests=requests, errors=errors, p95_ms=round(p95, 3),
                                   drift=self._drift.get(model, "")))
        self._latency_then = dict(self._latency)
        self._errors_then = dict(self._errors)
        return Serving(out)

    async def _watch_latency(self) -> None:
        try:
            async with self.bus.subscribe("metrics.scheduler") as events:
                async for incoming in events:
                    try:
                        snap = incoming.decode(MetricsSnapshot)
                    except ProtocolError:
                        continue
                    latency: dict[str, tuple[float, dict[float, float]]] = {}
                    errors: dict[str, float] = {}
                    for f in snap.families:
                        if f.name == "edgebus_inference_errors_total":
                            for x in f.samples:
                                model = x.labels.get("model", "")
                                errors[model] = errors.get(model, 0.0) + x.value
                            continue
                        if f.name != "edgebus_inference_total_seconds":
                            continue
                        for x in f.samples:
                            model = x.labels.get("model", "")
                            count, cum = latency.setdefault(model, (0.0, {}))
                            if x.name.endswith("_count"):
                                latency[model] = (count + x.value, cum)
                            elif x.name.endswith("_bucket"):
                                le = float(x.labels.get("le", "inf").replace("+Inf", "inf"))
                                cum[le] = cum.get(le, 0.0) + x.value
                    self._latency = latency
                    self._errors = errors
        except Forbidden as exc:
            self.log.info("fleet_no_latency", detail=f"{exc}: the reports carry no request counts or latency")

    async def _watch_drift(self) -> None:
        try:
            async with self.bus.subscribe("telemetry.drift") as events:
                async for incoming in events:
                    try:
                        event = incoming.decode(DriftEvent)
                    except ProtocolError:
                        continue
                    self._drift[event.model] = event.level
        except Forbidden as exc:
            self.log.info("fleet_no_drift", detail=f"{exc}: the reports carry no drift levels")

    async def _fleet_keys(self) -> dict[str, bytes]:
        """The trust store's keys of role ``fleet``: key id -> raw public key."""
        try:
            keys = await self.bus.call("security", TrustList(), TrustedKeys, timeout=10)
        except BusError as exc:
            self.log.warning("fleet_keys_unavailable", error=str(exc))
            return self.agent.trusted if self.agent is not None else {}
        return {k.key_id: bytes.fromhex(k.public_key) for k in keys.keys if getattr(k, "role", "model") == FLEET_ROLE}

    async def _attest(self) -> SignedReport | None:
        try:
            return await self.bus.call("security", Attest(), SignedReport, timeout=10)
        except BusError as exc:
            self.log.warning("fleet_attestation_unavailable", error=str(exc))
            return None


class TlsFilesError(Exception):
    pass


def _range_get(url: str, start: int, length: int, cafile: Path | None, timeout: float) -> bytes:
    """Bytes ``start`` to ``start + length - 1`` of ``url`` (http or https), exactly; reading
    no more than ``length`` + 1 bytes of the answer."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"{url!r} is not an http(s) URL")
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{start + length - 1}"})
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:
        if answer.status != 206:
            raise ValueError(f"the server answered {answer.status}, not 206: it does not serve byte ranges")
        data = answer.read(length + 1)
    if len(data) != length:
        raise ValueError(f"{len(data)} bytes for a range of {length}")
    return data


def main() -> None:
    run(FleetService)
