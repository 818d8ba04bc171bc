"""The fleet service's settings: ``[services.fleet.settings]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

from protocols.fleet import DEFAULT_PREFIX
from services import Settings

__all__ = ["FleetSettings", "BrokerSettings"]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


class BrokerSettings(Settings):
    """``[services.fleet.settings.broker]``: the MQTT broker (mutual TLS when ``tls_ca`` is
    given: then ``tls_cert`` and ``tls_key`` are the device's certificate, whose CN is its
    device id, and its key; relative paths: from the config file's directory)."""

    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8883
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive: Annotated[int, msgspec.Meta(ge=5)] = 30
    #: seconds before the first reconnection attempt, doubled up to ``backoff_max``
    backoff_initial: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    backoff_max: Annotated[float, msgspec.Meta(gt=0)] = 30.0

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: the device's certificate and its key")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("tls_cert needs tls_ca: the CA that signed the broker's certificate")


class FleetSettings(Settings):
    #: this device's id in the fleet: its MQTT topics, and its certificate's CN
    device_id: Annotated[str, msgspec.Meta(pattern=_NAME)] = "edgebus-demo"
    #: the groups it is in (the broker's ACL must let it read their topics)
    groups: list[Annotated[str, msgspec.Meta(pattern=_NAME)]] = []
    #: the fleet's id: documents of another fleet are refused; "" any
    fleet: str = ""
    prefix: Annotated[str, msgspec.Meta(min_length=1, pattern=r"^[^#+]+$")] = DEFAULT_PREFIX
    #: the broker; absent: the service is idle (the device is not in a fleet)
    broker: BrokerSettings | None = None
    #: where downloads and the agent's state are kept; default <state-dir>/fleet
    state_dir: Path | None = None
    #: an artifact larger than this is refused; the cache and partial downloads stay within it
    max_artifact_bytes: Annotated[int, msgspec.Meta(ge=1 << 16)] = 512 << 20
    #: chunks asked for at once (each a retained QoS 1 message)
    window: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    #: seconds between health refreshes (a report is published when something changed)
    report_interval: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: CA bundle for bundles fetched by HTTPS (a deployment's ``url``); absent: the system's
    http_ca: Path | None = None
    #: seconds an HTTP(S) range request may take
    http_timeout: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: the configuration file the kernel runs from, into which config fragments are merged
    #: (then the kernel reloads it); absent: a deployment with a config fragment fails
    config_file: Path | None = None
