"""Store-and-forward to an MQTT broker: QoS 1, in order, reconnecting with back-off.

Messages leave the outbox one at a time, oldest first; a message is removed only after
the broker's PUBACK, so a drop of the connection re-sends it (at least once) and the
message id in every payload lets the far side de-duplicate (exactly once after that).
MQTT topics: ``edgebus/<device-id>/<topic>``.
"""

from __future__ import annotations

import ssl
from typing import Any

import anyio
import msgspec

from services import get_logger

from ._outbox import Outbox

__all__ = ["Uplink", "UplinkSettings"]

log = get_logger(component="uplink")


class UplinkSettings(msgspec.Struct, kw_only=True):
    host: str
    port: int = 1883
    device_id: str = "edgebus"
    username: str = ""
    password: str = ""
    #: CA bundle: turns TLS on
    tls_ca: str = ""
    client_cert: str = ""
    client_key: str = ""
    keepalive: int = 30


class Uplink:
    def __init__(self, settings: UplinkSettings, outbox: Outbox) -> None:
        self.settings = settings
        self.outbox = outbox
        self.connected = False
        self.sent = 0
        self.bytes_sent = 0
        self.wakeup = anyio.Event()

    def notify(self) -> None:
        """A new message is in the outbox."""
        self.wakeup.set()

    def _client(self) -> Any:
        import paho.mqtt.client as mqtt

        s = self.settings
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgebus-{s.device_id}", clean_session=True)
        if s.username:
            client.username_pw_set(s.username, s.password or None)
        if s.tls_ca:
            client.tls_set(ca_certs=s.tls_ca, certfile=s.client_cert or None, keyfile=s.client_key or None,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        return client

    async def run(self) -> None:
        backoff = 0.5
        while True:
            client = self._client()
            try:
                await anyio.to_thread.run_sync(lambda: client.connect(self.settings.host, self.settings.port,
                                                                      self.settings.keepalive))
                client.loop_start()
            except OSError as exc:
                log.info("uplink_unreachable", host=self.settings.host, port=self.settings.port, error=str(exc),
                         retry_in=backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            try:
                await self._drain(client)
            finally:
                self.connected = False
                client.loop_stop()
                client.disconnect()
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _drain(self, client: Any) -> None:
        """Send what the outbox holds; return when the connection fails."""
        # wait for CONNACK
        with anyio.move_on_after(10):
            while not client.is_connected():
                await anyio.sleep(0.02)
        if not client.is_connected():
            log.warning("uplink_no_connack", host=self.settings.host)
            return
        self.connected = True
        log.info("uplink_connected", host=self.settings.host, queued=self.outbox.count())
        prefix = f"edgebus/{self.settings.device_id}/"
        while True:
            batch = self.outbox.head(100)
            if not batch:
                self.wakeup = anyio.Event()
                with anyio.move_on_after(1.0):
                    await self.wakeup.wait()
                if not client.is_connected():
                    return
                continue
            for message in batch:
                # the id the far side de-duplicates on: the outbox sequence, the same on a resend
                payload = b'{"id":"%s:%d",' % (self.settings.device_id.encode(), message.seq) + message.payload[1:]
                info = client.publish(prefix + message.topic, payload, qos=1)
                delivered = await anyio.to_thread.run_sync(lambda: _wait(info))
                if not delivered:
                    log.warning("uplink_lost", detail="no PUBACK; the message stays queued and goes again")
                    return
                self.outbox.ack(message.seq)
                self.sent += 1
                self.bytes_sent += len(payload)


def _wait(info: Any) -> bool:
    try:
        info.wait_for_publish(timeout=10)
    except (RuntimeError, ValueError):
        return False
    return info.is_published()
