"""Store-and-forward to an MQTT broker: QoS 1, in order, reconnecting with back-off.

Messages leave the outbox one at a time, oldest first; a message is removed only after
the broker's PUBACK, so a drop of the connection re-sends it (at least once) and the
message id in every payload lets the far side de-duplicate (exactly once after that).
MQTT topics: ``edgebus/<device-id>/<topic>``.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec

from services import Settings, get_logger

from ._outbox import Outbox

__all__ = ["Uplink", "UplinkSettings"]

log = get_logger(component="uplink")


class UplinkSettings(Settings):
    """``[services.telemetry.settings.uplink]``: the MQTT broker to forward to."""

    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1883
    username: str = ""
    #: the NAME of the environment variable holding the password (list it in the service's
    #: ``pass_environment``): a secret never sits in the config
    password_env: str = ""
    #: CA bundle: turns TLS on (relative paths: from the config file's directory)
    tls_ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    keepalive: Annotated[int, msgspec.Meta(ge=5)] = 30


class Uplink:
    def __init__(self, settings: UplinkSettings, outbox: Outbox, *, device_id: str, password: str = "") -> None:
        self.settings = settings
        self.device_id = device_id
        self.password = password
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
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgebus-{self.device_id}", clean_session=True)
        if s.username:
            client.username_pw_set(s.username, self.password or None)
        if s.tls_ca is not None:
            client.tls_set(ca_certs=str(s.tls_ca), certfile=str(s.client_cert) if s.client_cert else None,
                           keyfile=str(s.client_key) if s.client_key else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
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
        prefix = f"edgebus/{self.device_id}/"
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
                payload = b'{"id":"%s:%d",' % (self.device_id.encode(), message.seq) + message.payload[1:]
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
