"""Store-and-forward to an MQTT broker: QoS 1, in order, reconnecting with back-off.

Reconnection: a failed attempt doubles the back-off from ``backoff_initial`` up to
``backoff_max``; a CONNACK (the broker accepted the session) resets it to
``backoff_initial``, so a short blip after a long outage costs about the initial back-off,
not the maximum.  Each wait is jittered (between half and all of the back-off, "equal
jitter"), so that devices that lost the same broker do not come back in lockstep.

Messages leave the outbox one at a time, oldest first; a message is removed only after
the broker's PUBACK, so a drop of the connection re-sends it (at least once) and the
message id in every payload lets the far side de-duplicate (exactly once after that).
MQTT topics: ``edgebus/<device-id>/<topic>``.
"""

from __future__ import annotations

import random
import ssl
import time
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
    #: seconds before the first reconnection attempt; doubled after each failed one up to
    #: ``backoff_max``; back to this after each CONNACK (each wait jittered to 50-100 %)
    backoff_initial: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    backoff_max: Annotated[float, msgspec.Meta(gt=0)] = 30.0

    def __post_init__(self) -> None:
        if self.backoff_max < self.backoff_initial:
            raise ValueError(f"backoff_max ({self.backoff_max:g}) must not be below backoff_initial "
                             f"({self.backoff_initial:g})")


class Uplink:
    def __init__(self, settings: UplinkSettings, outbox: Outbox, *, device_id: str, password: str = "") -> None:
        self.settings = settings
        self.device_id = device_id
        self.password = password
        self.outbox = outbox
        self.connected = False
        self.wakeup = anyio.Event()
        #: the current back-off (seconds): doubled by each failed attempt, reset by a CONNACK
        self.backoff = settings.backoff_initial

    def notify(self) -> None:
        """A new message is in the outbox."""
        self.wakeup.set()

    def _client(self) -> Any:
        import paho.mqtt.client as mqtt

        s = self.settings
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgebus-{self.device_id}", clean_session=True,
                             reconnect_on_failure=False)  # reconnection is ours (run): no second policy
        if s.username:
            client.username_pw_set(s.username, self.password or None)
        if s.tls_ca is not None:
            client.tls_set(ca_certs=str(s.tls_ca), certfile=str(s.client_cert) if s.client_cert else None,
                           keyfile=str(s.client_key) if s.client_key else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        return client

    async def _back_off(self, **why: Any) -> None:
        """Wait the current back-off, jittered (50-100 %), then double it up to the maximum."""
        delay = self.backoff * random.uniform(0.5, 1.0)
        log.info("uplink_retry", host=self.settings.host, port=self.settings.port, backoff=self.backoff,
                 retry_in=round(delay, 3), **why)
        await anyio.sleep(delay)
        self.backoff = min(self.backoff * 2, self.settings.backoff_max)

    async def run(self) -> None:
        while True:
            client = self._client()
            try:
                await anyio.to_thread.run_sync(lambda: client.connect(self.settings.host, self.settings.port,
                                                                      self.settings.keepalive))
                client.loop_start()
            except OSError as exc:
                await self._back_off(reason="unreachable", error=str(exc))
                continue
            try:
                await self._drain(client)
            finally:
                self.connected = False
                client.disconnect()
                client.loop_stop()  # quick: paho's thread ends with the connection
            await self._back_off(reason="connection_lost")

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
        self.backoff = self.settings.backoff_initial  # a good connection: the next outage starts over
        log.info("uplink_connected", host=self.settings.host, queued=self.outbox.count())
        prefix = f"edgebus/{self.device_id}/"
        while True:
            batch = self.outbox.head(100)
            if not batch:
                self.wakeup = anyio.Event()
                with anyio.move_on_after(0.25):  # a lost connection shows within this
                    await self.wakeup.wait()
                if not client.is_connected():
                    return
                continue
            for message in batch:
                # the id the far side de-duplicates on: the outbox sequence, the same on a resend
                payload = b'{"id":"%s:%d",' % (self.device_id.encode(), message.seq) + message.payload[1:]
                info = client.publish(prefix + message.topic, payload, qos=1)
                delivered = await anyio.to_thread.run_sync(lambda: _wait(client, info))
                if not delivered:
                    log.warning("uplink_lost", detail="no PUBACK; the message stays queued and goes again")
                    return
                self.outbox.ack(message.seq, len(payload))  # counted sent, persistently


def _wait(client: Any, info: Any, timeout: float = 10.0) -> bool:
    """Until the broker's PUBACK (True), or until the connection drops or ``timeout``
    passes (False: the message stays queued)."""
    end = time.monotonic() + timeout
    try:
        while not info.is_published():
            if not client.is_connected() or time.monotonic() > end:
                return False
            info.wait_for_publish(timeout=0.1)
    except (RuntimeError, ValueError):
        return False
    return True
