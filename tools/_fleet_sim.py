"""Simulated devices: the real agent core (``services.fleet.Agent`` with ``MemoryStorage``)
behind an in-memory model store, each device with its own MQTT connection, many in one
thread.

Each device has its own client (its own TCP connection, client id and subscriptions), as a
real device does: the broker's work and the bytes it sends are what a fleet of that size
costs it (a shared connection would let the broker send a retained chunk once for several
devices, and hide that cost).  The clients are paho clients driven from one ``selectors``
loop (``loop_read``/``loop_write``/``loop_misc``), not a thread each: 500 of them are one
thread and 500 sockets.

The model store is a few dictionaries: ``Install`` records the version (the storage keeps no
bytes: ``MemoryStorage(keep_data=False)``, each chunk verified as it arrives), ``Activate``
switches the active version and starts a trial against the previous one that commits after
``trial_s`` seconds, or rolls back when the version is in ``failing`` (what a device whose
health gates fail does); ``Rollback`` returns to the previous version without a trial.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time
from collections import deque
from typing import Any, Callable, Iterable

from protocols import fleet as fleet_protocol
from protocols.fleet import ModelReport
from services.fleet import (
    Activate,
    Agent,
    ApplyConfig,
    Audit,
    Connected,
    Disconnected,
    Done,
    Fetch,
    Fetched,
    Install,
    MemoryStorage,
    Models,
    Publish,
    Received,
    Rollback,
    Subscribe,
    Tick,
    Unsubscribe,
)

__all__ = ["SimStore", "SimDevice", "Fleet"]


class SimStore:
    """One device's model store, in memory."""

    def __init__(self, models: dict[str, str], trial_s: float, failing: Iterable[str] = ()) -> None:
        self.models = {name: ModelReport(name=name, versions=[v], active=v) for name, v in models.items()}
        self.trial_s = trial_s
        self.failing = set(failing)  # "name@version" whose trial fails
        self.trials: dict[str, tuple[float, str]] = {}  # name -> (started, previous)

    def install(self, name: str, version: str) -> None:
        m = self.models.setdefault(name, ModelReport(name=name))
        if version not in m.versions:
            m.versions = [*m.versions, version]

    def activate(self, name: str, version: str, now: float) -> tuple[bool, str]:
        m = self.models.get(name)
        if m is None or version not in m.versions:
            return False, f"{name} {version} is not installed"
        if m.active == version:
            return True, ""
        previous = m.active
        m.active = version
        m.previous = previous
        if previous:
            m.trial = version
            self.trials[name] = (now, previous)
        return True, ""

    def rollback(self, name: str, version: str) -> tuple[bool, str]:
        """Back to the previous version, no trial (the model store's Rollback)."""
        m = self.models.get(name)
        if m is None or not m.previous or m.previous != version:
            return False, f"{name} has no previous version {version}"
        m.active, m.previous, m.trial = m.previous, "", ""
        self.trials.pop(name, None)
        return True, ""

    def tick(self, now: float) -> bool:
        """End the trials that are due; True if anything changed."""
        changed = False
        for name, (started, previous) in list(self.trials.items()):
            if now - started < self.trial_s:
                continue
            m = self.models[name]
            if f"{name}@{m.active}" in self.failing:
                m.active, m.previous = previous, ""
            m.trial = ""
            del self.trials[name]
            changed = True
        return changed

    def report(self) -> list[ModelReport]:
        return [ModelReport(name=m.name, versions=list(m.versions), active=m.active, trial=m.trial,
                            previous=m.previous) for m in self.models.values()]


class SimDevice:
    def __init__(self, fleet: "Fleet", device: str, groups: list[str], store: SimStore, **agent: Any) -> None:
        import paho.mqtt.client as mqtt

        self.fleet = fleet
        self.device = device
        self.store = store
        self.agent = Agent(device, groups, MemoryStorage(keep_data=False), **agent)
        self.queue: deque[Any] = deque([Models(store.report())])
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sim-{device}", clean_session=True)
        self.client.max_inflight_messages_set(0)
        self.client.max_queued_messages_set(0)
        if fleet.tls is not None:
            self.client.tls_set_context(fleet.tls)
        self.client.username_pw_set(device)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_socket_register_write = lambda c, u, s: fleet._want(self, True)
        self.client.on_socket_unregister_write = lambda c, u, s: fleet._want(self, False)
        self.online = False
        self.sock: Any = None
        #: messages and payload bytes the broker sent this device, and it sent the broker
        self.rx = self.rx_bytes = self.tx = self.tx_bytes = 0

    def presence(self, online: bool, cause: str) -> None:
        """Publish this device's presence (retained), as the fleet service does."""
        payload = fleet_protocol.presence(self.device, online, cause)
        self.tx += 1
        self.tx_bytes += len(payload)
        self.client.publish(self.agent.topics.presence(self.device), payload, qos=1, retain=True)

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if not rc.is_failure:
            self.presence(True, "connected")
            self.queue.append(Connected())

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.queue.append(Disconnected())

    def _on_message(self, c: Any, u: Any, m: Any) -> None:
        self.rx += 1
        self.rx_bytes += len(m.payload) + len(m.topic)
        self.queue.append(Received(m.topic, bytes(m.payload)))

    def pump(self, now: float) -> None:
        """Feed the agent what happened; carry out what it asks."""
        if self.store.tick(now):
            self.queue.append(Models(self.store.report()))
        while self.queue:
            event = self.queue.popleft()
            for action in self.agent.handle(event):
                self._carry_out(action, now)

    def _carry_out(self, action: Any, now: float) -> None:
        match action:
            case Subscribe(topics=topics):
                if self.online:
                    self.client.subscribe([(t, 1) for t in topics])
            case Unsubscribe(topics=topics):
                if self.online:
                    self.client.unsubscribe(topics)
            case Publish(topic=topic, payload=payload, retain=retain, qos=qos):
                self.tx += 1
                self.tx_bytes += len(payload) + len(topic)
                self.client.publish(topic, payload, qos=qos, retain=retain)
            case Install(ref=ref):
                if not self.agent.storage.has_blob(ref.sha256):
                    self.queue.append(Done(action, False, "the blob is gone"))
                    return
                self.store.install(ref.name, ref.version)
                self.queue.append(Models(self.store.report()))  # the store's state, then the outcome (as
                self.queue.append(Done(action, True))  # the fleet service does)
            case Activate(name=name, version=version):
                ok, reason = self.store.activate(name, version, now)
                self.queue.append(Models(self.store.report()))
                self.queue.append(Done(action, ok, reason))
            case Rollback(name=name, version=version):
                ok, reason = self.store.rollback(name, version)
                self.queue.append(Models(self.store.report()))
                self.queue.append(Done(action, ok, reason))
            case ApplyConfig():
                self.queue.append(Done(action, True))
            case Audit():
                self.fleet.audits += 1
            case Fetch(sha256=sha, index=index):  # a url: the simulation has no HTTP (the broker's chunks serve)
                self.queue.append(Fetched(sha, index, error="the simulation fetches no URLs"))


class Fleet:
    """Many SimDevices on one broker, run by ``step`` from one thread."""

    def __init__(self, host: str, port: int, *, tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.devices: dict[str, SimDevice] = {}
        self.sel = selectors.DefaultSelector()
        self.audits = 0
        self._misc_at = 0.0

    def add(self, device: str, groups: list[str], store: SimStore, **agent: Any) -> SimDevice:
        d = SimDevice(self, device, groups, store, **agent)
        self.devices[device] = d
        return d

    def connect(self, device: SimDevice) -> None:
        # the device's last will, as the fleet service's: offline, retained, if the link dies
        device.client.will_set(device.agent.topics.presence(device.device),
                               fleet_protocol.presence(device.device, False, "will"), qos=1, retain=True)
        device.client.connect(self.host, self.port, keepalive=60)
        device.sock = device.client.socket()
        device.online = True
        self.sel.register(device.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, device)

    def disconnect(self, device: SimDevice) -> None:
        """Go offline (a clean stop: the device says so on its presence topic, then the
        session ends)."""
        if not device.online:
            return
        device.presence(False, "stopped")
        device.online = False
        try:
            self.sel.unregister(device.sock)
        except (KeyError, ValueError):
            pass
        device.client.disconnect()
        device.client.loop_write()  # sends DISCONNECT and closes
        device.sock = None
        device.queue.append(Disconnected())

    def drop(self, device: SimDevice) -> None:
        """Lose the link (no DISCONNECT: the broker publishes the device's will); ``step``
        sees the connection closed."""
        if device.sock is not None:
            device.sock.shutdown(socket.SHUT_RDWR)

    def _want(self, device: SimDevice, write: bool) -> None:
        if device.sock is None or not device.online:
            return
        try:
            self.sel.modify(device.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0), device)
        except (KeyError, ValueError):
            pass

    def step(self, timeout: float = 0.05) -> None:
        now = time.time()
        for key, mask in self.sel.select(timeout):
            d: SimDevice = key.data
            if mask & selectors.EVENT_READ:
                d.client.loop_read(100)
                sock = d.sock
                while isinstance(sock, ssl.SSLSocket) and sock.pending() and d.online:
                    d.client.loop_read(100)
            if mask & selectors.EVENT_WRITE and d.online:
                d.client.loop_write()
            if d.client.socket() is None and d.online:  # the broker closed it
                d.online = False
                try:
                    self.sel.unregister(key.fileobj)
                except (KeyError, ValueError):
                    pass
                d.sock = None
        if now - self._misc_at > 1.0:
            self._misc_at = now
            for d in self.devices.values():
                if d.online:
                    d.client.loop_misc()
                d.queue.append(Tick())
        for d in self.devices.values():
            if d.queue or d.store.trials:
                d.pump(now)
            if d.online and d.client.want_write():
                self._want(d, True)

    def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.step()
            if done():
                return True
        return False

    def close(self) -> None:
        for d in self.devices.values():
            if d.online:
                self.disconnect(d)
        self.sel.close()

    def outcome(self, device: str) -> tuple[int, str, str]:
        """(document version, outcome, the active version of each model) as the agent has it."""
        a = self.devices[device].agent
        s = a.state.status
        models = ",".join(f"{m.name}@{m.active}" for m in self.devices[device].store.report())
        return (s.version if s else 0), (s.outcome if s else ""), models
