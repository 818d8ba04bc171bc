"""The operator's one connection to the broker: a paho client (MQTT 3.1.1, mutual TLS when a
CA is given) with its network thread; what arrives waits in a queue for the caller's thread.

Publishing is QoS 1 and waits for the broker's PUBACK (``publish`` ... ``flush``), so what
the controller records as published, the broker holds.  After a lost connection paho
reconnects (1-30 s back-off); ``connections`` counts the CONNACKs so the controller knows to
re-subscribe (done here) and to check the broker still holds its retained documents.
"""

from __future__ import annotations

import os
import queue
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import msgspec

__all__ = ["BrokerOptions", "Link", "BrokerError", "parse_broker"]


class BrokerError(Exception):
    """The broker cannot be reached or refused us; the message says which and what to check."""


class BrokerOptions(msgspec.Struct, frozen=True):
    host: str = "127.0.0.1"
    port: int = 1883
    ca: str = ""
    cert: str = ""
    key: str = ""
    keepalive: int = 30

    def describe(self) -> str:
        return f"{self.host}:{self.port}" + (" (TLS)" if self.ca else "")


def parse_broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "1883"
    try:
        number = int(port)
        if not 0 < number < 65536 or not host:
            raise ValueError
    except ValueError:
        raise BrokerError(f"--broker {text!r}: give HOST:PORT, e.g. broker.example.com:8883") from None
    return host.strip("[]"), number


_CONNACK_REASONS = {1: "unacceptable protocol version", 2: "client id rejected", 3: "server unavailable",
                    4: "bad user name or password", 5: "not authorised (certificate or ACL)"}


class Link:
    """A connected client; ``messages`` hands over what the broker delivered."""

    def __init__(self, options: BrokerOptions, *, client_id: str = "") -> None:
        import paho.mqtt.client as mqtt

        self.options = options
        self.inbox: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.connections = 0
        self._subscriptions: list[str] = []
        self._suback = threading.Condition()
        self._pending_subs: set[int] = set()
        self._refused = ""
        self._connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"edgebus-fleet-{socket.gethostname()}-{os.getpid()}",
                                  clean_session=True)
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 30)
        if options.ca:
            for what, path in (("--ca", options.ca), ("--cert", options.cert), ("--key", options.key)):
                if path and not Path(path).is_file():
                    raise BrokerError(f"{what} {path}: no such file")
            try:
                self.client.tls_set(ca_certs=options.ca, certfile=options.cert or None, keyfile=options.key or None,
                                    tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (ssl.SSLError, ValueError) as exc:
                raise BrokerError(f"TLS files --ca {options.ca} --cert {options.cert} --key {options.key}: {exc}") from None
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    # -- paho's thread -------------------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, properties: Any = None) -> None:
        if rc.is_failure:
            self._refused = _CONNACK_REASONS.get(getattr(rc, "value", 0), str(rc))
            self._connected.set()
            return
        self.connections += 1
        if self._subscriptions:
            client.subscribe([(t, 1) for t in self._subscriptions])
        self._connected.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self.inbox.put((message.topic, message.payload, bool(message.retain)))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, properties: Any = None) -> None:
        with self._suback:
            self._pending_subs.discard(mid)
            self._suback.notify_all()

    # -- the caller's thread -------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> "Link":
        o = self.options
        try:
            self.client.connect(o.host, o.port, keepalive=o.keepalive)
        except ssl.SSLError as exc:
            raise BrokerError(f"TLS with the broker {o.describe()} failed: {exc.reason or exc}; check --ca, --cert "
                              "and --key") from None
        except OSError as exc:
            raise BrokerError(f"cannot reach the broker {o.describe()}: {exc.strerror or exc}; check --broker") from None
        self.client.loop_start()
        if not self._connected.wait(timeout) or self._refused:
            self.close()
            why = self._refused or f"no CONNACK within {timeout:g} s"
            raise BrokerError(f"the broker {o.describe()} refused the connection: {why}")
        return self

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def subscribe(self, topics: Iterable[str], timeout: float = 10.0) -> None:
        """Subscribe (QoS 1) and wait for the SUBACK; kept across reconnections."""
        topics = [t for t in topics if t not in self._subscriptions]
        if not topics:
            return
        self._subscriptions += topics
        with self._suback:
            rc, mid = self.client.subscribe([(t, 1) for t in topics])
            if rc != 0:
                raise BrokerError(f"cannot subscribe to {topics[0]}: not connected to {self.options.describe()}")
            self._pending_subs.add(mid)
            if not self._suback.wait_for(lambda: mid not in self._pending_subs, timeout):
                raise BrokerError(f"no SUBACK from {self.options.describe()} within {timeout:g} s")

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> Any:
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def flush(self, infos: Iterable[Any], timeout: float = 60.0) -> None:
        """Wait for the PUBACK of each publish, or raise BrokerError."""
        end = time.monotonic() + timeout
        for info in infos:
            while not info.is_published():
                if time.monotonic() > end:
                    raise BrokerError(f"the broker {self.options.describe()} did not acknowledge a publish within "
                                      f"{timeout:g} s (connection lost, or the ACL denies it)")
                try:
                    info.wait_for_publish(0.1)
                except RuntimeError:  # not queued: the connection is down; paho sends it on reconnect
                    time.sleep(0.1)
                except ValueError:
                    raise BrokerError(f"a publish to {self.options.describe()} was dropped (queue full)") from None

    def messages(self, timeout: float) -> list[tuple[str, bytes, bool]]:
        """What arrived, waiting up to ``timeout`` for the first."""
        out: list[tuple[str, bytes, bool]] = []
        try:
            out.append(self.inbox.get(timeout=timeout))
            while True:
                out.append(self.inbox.get_nowait())
        except queue.Empty:
            return out

    def retained(self, topics: Iterable[str], *, quiet: float = 0.4, timeout: float = 30.0) -> dict[str, bytes]:
        """The current messages of ``topics`` (wildcards allowed): subscribe, then gather until
        nothing has come for ``quiet`` seconds (mosquitto sends a subscription's retained
        messages right after its SUBACK; on a subscription held already, what is queued and
        arrives live).  Other messages arriving meanwhile stay queued."""
        topics = list(topics)
        fresh = [t for t in topics if t not in self._subscriptions]
        self.subscribe(topics)
        got: dict[str, bytes] = {}
        other: list[tuple[str, bytes, bool]] = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            batch = self.messages(quiet)
            if not batch:
                break
            for topic, payload, retain in batch:
                if any(_matches(t, topic) for t in topics):  # retained, or live (newer still)
                    if payload:
                        got[topic] = payload
                    else:
                        got.pop(topic, None)
                else:
                    other.append((topic, payload, retain))
        for item in other:
            self.inbox.put(item)
        if fresh:  # only for this look: not kept across reconnections, nor echoing our own publishes
            self._subscriptions = [t for t in self._subscriptions if t not in fresh]
            self.client.unsubscribe(fresh)
        return got

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def _matches(pattern: str, topic: str) -> bool:
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(p) == len(t)
