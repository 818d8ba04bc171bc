"""The fleet channel: what a device and the operator's controller exchange over MQTT.

Every payload is one msgspec Struct, msgpack-encoded, tagged (``{"type": "Deployment", ...}``)
and checked for size before it is decoded (``decode``).  Topics are under a prefix
(``DEFAULT_PREFIX``, ``edgebus/fleet``):

====================================  ========  =====  ====================================
topic                                 retained  QoS    payload
====================================  ========  =====  ====================================
``<p>/devices/<device>/desired``      yes       1      ``SignedDocument`` (a ``Deployment``)
``<p>/groups/<group>/desired``        yes       1      ``SignedDocument`` (a ``Deployment``)
``<p>/devices/<device>/reported``     yes       1      ``ReportedState``
``<p>/devices/<device>/enrol``        yes       1      ``Enrolment``
``<p>/devices/<device>/presence``     yes       1      ``Presence`` (also the device's MQTT will)
``<p>/artifacts/<sha256>/info``       yes       1      ``ArtifactInfo``
``<p>/artifacts/<sha256>/chunks/<i>`` yes       1      ``Chunk``
====================================  ========  =====  ====================================

A device reads its own desired topic, its groups' desired topics and the artifacts; it
writes only its own reported, enrol and presence topics (``acl_lines`` writes the mosquitto
ACL that holds it to that).  Presence is MQTT's last will: before every connection the device
sets its will to ``Presence(online=False)`` (retained, QoS 1), and once connected publishes
``Presence(online=True)``; a device that dies or loses its link is marked offline by the
broker, one that stops cleanly publishes offline itself (a clean disconnect fires no will).
An empty retained message clears a topic (MQTT's rule) and is ignored.

Deployment documents are TUF-like: a ``Deployment`` is encoded once (``SignedDocument.payload``
is those exact bytes, never re-encoded for verification) and signed with ed25519 by a fleet
key the device trusts (role ``fleet`` in its trust store).  ``Deployment.version`` is one
counter per fleet, across every device and group document, increasing with each document
the operator issues; a device applies, among the valid documents of its device topic and its
groups' topics, the one with the highest version, and refuses any whose version is not
higher than the last it applied (replay, rollback attack), that has expired (freeze attack),
that names another target, that is signed by a key it does not trust, or that is too large:
``check_document`` is that rule, pure.  Rolling a device back is a new document (a higher
version) naming the older bundle versions; the device holds them already and fetches nothing.

Artifacts are addressed by the sha256 of their bytes: a device that holds a blob (in its
cache or its model store) fetches nothing.  ``ArtifactInfo`` lists each chunk's sha256, so a
chunk is verified as it arrives and a download resumes at the first chunk missing.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Iterable, Mapping

import msgspec

from .security import SignedReport

__all__ = [
    "DEFAULT_PREFIX", "MAX_DOCUMENT", "MAX_REPORT", "MAX_ENROLMENT", "MAX_PRESENCE", "Presence", "presence",
    "MAX_INFO", "MAX_CHUNK_SIZE",
    "DEFAULT_CHUNK_SIZE", "ArtifactRef", "ConfigFragment", "Deployment", "SignedDocument", "ArtifactInfo",
    "Chunk", "Enrolment", "ModelReport", "HealthSummary", "DeploymentStatus", "ReportedState", "Message",
    "FleetError", "Refused", "Topics", "encode", "decode", "key_id", "sign_document", "check_document",
    "artifact_info", "chunks_of", "config_digest", "acl_lines", "OUTCOMES", "REASONS", "NAME",
]

#: default topic prefix
DEFAULT_PREFIX = "edgebus/fleet"
#: a SignedDocument's encoded size at most (bytes)
MAX_DOCUMENT = 64 * 1024
#: a ReportedState's encoded size at most
MAX_REPORT = 64 * 1024
#: an Enrolment's encoded size at most (the attestation report's measurement log is in it)
MAX_ENROLMENT = 256 * 1024
#: a Presence's encoded size at most
MAX_PRESENCE = 1024
#: an ArtifactInfo's encoded size at most (about 14,000 chunks)
MAX_INFO = 1024 * 1024
#: a chunk's data at most; a Chunk message may be this plus ``_CHUNK_OVERHEAD``
MAX_CHUNK_SIZE = 1024 * 1024
DEFAULT_CHUNK_SIZE = 64 * 1024
_CHUNK_OVERHEAD = 512

#: a device id, group name or fleet id: also an MQTT topic level, so no ``/ + #``
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

#: DeploymentStatus.outcome: where the device is with its last deployment
OUTCOMES = ("downloading", "installing", "trial", "succeeded", "failed", "rolled-back", "refused")
#: Refused.reason / DeploymentStatus.reason codes for refused documents
REASONS = ("oversize", "malformed", "unknown-key", "bad-signature", "expired", "not-yet-valid", "replay",
           "wrong-target", "wrong-fleet")


class FleetError(ValueError):
    """A fleet message that breaks a rule (size, encoding, field)."""


class Refused(FleetError):
    """A deployment document the device must not apply; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# -- deployment documents ----------------------------------------------------------------------


class ArtifactRef(msgspec.Struct, tag=True, omit_defaults=True):
    """A signed model bundle to install: ``name`` at ``version`` (the bundle's manifest says the
    same), its bytes' sha256 (hex) and size.  ``url``: where to fetch it by HTTP(S) range
    requests instead of the broker's chunks (optional)."""

    name: str
    version: str
    sha256: str
    size: int
    url: str = ""
    #: activate it (a trial against the version it replaces) once installed
    activate: bool = True


class ConfigFragment(msgspec.Struct, tag=True):
    """A TOML fragment of the device's configuration (``[services.<name>.settings]`` tables),
    applied through the kernel's reload; ``sha256`` = sha256 of ``toml`` encoded as UTF-8."""

    toml: str
    sha256: str


class Deployment(msgspec.Struct, tag=True, omit_defaults=True):
    """The desired state of a device or group: what it should run.  Signed inside a
    ``SignedDocument``."""

    fleet: str
    #: one counter per fleet across all its documents; a device applies only a higher one
    version: int
    #: the deployment this document belongs to (one deployment: one document per wave/group)
    deployment: str
    #: "device:<id>" or "group:<name>": the topic it may be read from
    target: str
    #: Unix times: issued, and not valid after ``expires``
    issued: float
    expires: float
    bundles: list[ArtifactRef] = []
    config: ConfigFragment | None = None


class SignedDocument(msgspec.Struct, tag=True):
    """``payload``: the msgpack encoding of a ``Deployment``; ``signature``: ed25519 over
    ``payload`` by the key ``key_id`` (sha256 of the raw public key, first 16 hex digits)."""

    payload: bytes
    key_id: str
    signature: bytes


# -- artifacts ---------------------------------------------------------------------------------


class ArtifactInfo(msgspec.Struct, tag=True):
    """On ``<p>/artifacts/<sha256>/info``: the artifact's size, its chunk size and each chunk's
    sha256 (hex), in order; every chunk is ``chunk_size`` bytes but the last."""

    sha256: str
    size: int
    chunk_size: int
    chunks: list[str]

    def check(self) -> None:
        """Raise FleetError unless the fields agree with each other and the limits."""
        if not _SHA256.match(self.sha256):
            raise FleetError(f"artifact sha256 {self.sha256[:70]!r} is not 64 lowercase hex digits")
        if not 0 < self.chunk_size <= MAX_CHUNK_SIZE:
            raise FleetError(f"chunk_size {self.chunk_size} is not in 1..{MAX_CHUNK_SIZE}")
        if self.size < 0 or len(self.chunks) != -(-self.size // self.chunk_size):
            raise FleetError(f"{len(self.chunks)} chunks do not make {self.size} bytes in chunks of {self.chunk_size}")
        for c in self.chunks:
            if not _SHA256.match(c):
                raise FleetError(f"chunk sha256 {c[:70]!r} is not 64 lowercase hex digits")

    def chunk_length(self, index: int) -> int:
        """The length chunk ``index`` must have."""
        return min(self.chunk_size, self.size - index * self.chunk_size)


class Chunk(msgspec.Struct, tag=True):
    """On ``<p>/artifacts/<sha256>/chunks/<index>``: one chunk of the artifact ``sha256``."""

    sha256: str
    index: int
    data: bytes


def artifact_info(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ArtifactInfo:
    """The ArtifactInfo of ``data`` cut in chunks of ``chunk_size``."""
    chunks = [hashlib.sha256(data[i:i + chunk_size]).hexdigest() for i in range(0, len(data), chunk_size)]
    info = ArtifactInfo(sha256=hashlib.sha256(data).hexdigest(), size=len(data), chunk_size=chunk_size, chunks=chunks)
    info.check()
    return info


def chunks_of(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterable[Chunk]:
    """The Chunks of ``data`` (what a publisher sends, with ``Topics.chunk``)."""
    digest = hashlib.sha256(data).hexdigest()
    for index, start in enumerate(range(0, len(data), chunk_size)):
        yield Chunk(sha256=digest, index=index, data=data[start:start + chunk_size])


def config_digest(toml: str) -> str:
    return hashlib.sha256(toml.encode()).hexdigest()


# -- device to controller ----------------------------------------------------------------------


class Enrolment(msgspec.Struct, tag=True, omit_defaults=True):
    """On ``<p>/devices/<device>/enrol`` (retained): who the device is.  ``public_key``: the
    device key from its security service (ed25519, hex); ``attestation``: its signed report of
    what its kernel started; ``groups``: the groups it asks to be in (the operator decides)."""

    device: str
    public_key: str
    time: float
    groups: list[str] = []
    attestation: SignedReport | None = None


class ModelReport(msgspec.Struct, tag=True, omit_defaults=True):
    """One model in the device's store, and its serving health since the last report."""

    name: str
    versions: list[str] = []
    active: str = ""
    #: the version in trial (also the active one) until the store's health gates commit it
    trial: str = ""
    #: the version a rollback returns to (the model store's ``previous``)
    previous: str = ""
    requests: int = 0
    errors: int = 0
    p95_ms: float = 0.0
    #: ok | warn | alert (telemetry's drift level of the active version); "" unknown
    drift: str = ""


class HealthSummary(msgspec.Struct, tag=True, omit_defaults=True):
    """The device's health: its services, and its load (the health driver's readings)."""

    services_ready: int = 0
    services_total: int = 0
    #: services not ready (failed, restarting)
    failing: list[str] = []
    cpu_load: float = 0.0
    memory_used: float = 0.0
    temperature_c: float = 0.0


class DeploymentStatus(msgspec.Struct, tag=True, omit_defaults=True):
    """The device's progress with one deployment document."""

    deployment: str
    version: int
    #: one of ``OUTCOMES``
    outcome: str
    #: why (a ``REASONS`` code for a refused document, else a short phrase); "" if none
    reason: str = ""
    detail: str = ""
    time: float = 0.0
    #: bytes held of the bundles to fetch, and their total (while downloading)
    have: int = 0
    total: int = 0


class ReportedState(msgspec.Struct, tag=True, omit_defaults=True):
    """On ``<p>/devices/<device>/reported`` (retained, QoS 1), on every change and on each
    connection: what the device runs.  ``seq`` increases with every report of this device
    (across restarts) so a reader can drop a stale one."""

    device: str
    seq: int
    time: float
    online: bool = True
    groups: list[str] = []
    models: list[ModelReport] = []
    #: sha256 of the last config fragment applied; "" none
    config_digest: str = ""
    health: HealthSummary | None = None
    #: the deployment applied last (or being applied), with its outcome
    current: DeploymentStatus | None = None
    #: the last document refused, and why (it does not replace ``current``)
    refused: DeploymentStatus | None = None
    #: the highest document version applied (a document must be higher to be applied)
    applied_version: int = 0
    attestation: SignedReport | None = None


class Presence(msgspec.Struct, tag=True, omit_defaults=True):
    """On ``<p>/devices/<device>/presence`` (retained, QoS 1): whether the device is connected.
    ``online=True`` is published by the device once connected; ``online=False`` is its MQTT
    last will (published by the broker when the connection dies without a DISCONNECT: a
    crash, kill -9, lost link, missed keepalives) or published by the device itself on a clean
    stop.  ``time``: when the device wrote it (for a will: when the connection it outlives was
    made, the broker publishes it later); a reader notes when it saw the change."""

    device: str
    online: bool
    time: float
    #: "connected", "will" (the broker published it), "stopped" (a clean stop)
    cause: str = ""


def presence(device: str, online: bool, cause: str = "", now: float | None = None) -> bytes:
    """An encoded Presence of ``device`` (what goes on ``Topics.presence``, or in the will)."""
    return encode(Presence(device=device, online=online, time=time.time() if now is None else now, cause=cause))


Message = SignedDocument | Deployment | ArtifactInfo | Chunk | Enrolment | ReportedState | Presence

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder] = {}
_LIMITS: dict[type, int] = {
    SignedDocument: MAX_DOCUMENT, Deployment: MAX_DOCUMENT, ArtifactInfo: MAX_INFO,
    Chunk: MAX_CHUNK_SIZE + _CHUNK_OVERHEAD, Enrolment: MAX_ENROLMENT, ReportedState: MAX_REPORT,
    Presence: MAX_PRESENCE,
}


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, type: type, limit: int | None = None) -> Message:
    """Decode ``data`` as ``type`` (one of ``Message``'s) after checking its size (``limit``,
    default the type's own: ``MAX_DOCUMENT``...).  Raises FleetError, saying what was wrong."""
    cap = _LIMITS[type] if limit is None else limit
    if len(data) > cap:
        raise FleetError(f"a {type.__name__} of {len(data)} bytes is over the limit of {cap} bytes")
    decoder = _decoders.get(type)
    if decoder is None:
        decoder = _decoders[type] = msgspec.msgpack.Decoder(type)
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as e:
        raise FleetError(f"not a valid {type.__name__}: {e}") from None


# -- signing and the acceptance rule -------------------------------------------------------------


def key_id(public_key: bytes) -> str:
    """A key's id: the first 16 hex digits of the sha256 of its 32 raw bytes (as the trust
    store's)."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def sign_document(deployment: Deployment, private_key: bytes) -> SignedDocument:
    """Sign ``deployment`` with an ed25519 private key (32 raw bytes)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.from_private_bytes(private_key)
    payload = encode(deployment)
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return SignedDocument(payload=payload, key_id=key_id(public), signature=key.sign(payload))


def check_document(data: bytes, *, trusted: Mapping[str, bytes], device: str, groups: Iterable[str],
                   applied_version: int, now: float | None = None, fleet: str = "") -> Deployment:
    """The deployment in ``data`` (an encoded SignedDocument read from a desired topic) if the
    device may apply it; else raise ``Refused`` with its reason:

    - ``oversize``/``malformed``: over ``MAX_DOCUMENT``, or not a SignedDocument of a Deployment;
    - ``unknown-key``: ``key_id`` is not in ``trusted`` (key id -> raw ed25519 public key:
      the device's fleet keys); ``bad-signature``: the signature does not verify;
    - ``expired``: ``now`` is past ``expires``; ``not-yet-valid``: issued more than 5 minutes
      ahead of ``now`` (clock skew allowed);
    - ``replay``: ``version`` is not above ``applied_version`` (an old or replayed document);
    - ``wrong-target``: its target is neither ``device:<device>`` nor ``group:<g>`` of ``groups``;
      ``wrong-fleet``: ``fleet`` given and not its fleet.

    The signature is checked before anything in the payload is believed."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if len(data) > MAX_DOCUMENT:
        raise Refused("oversize", f"a deployment document of {len(data)} bytes is over {MAX_DOCUMENT} bytes")
    try:
        signed = decode(data, SignedDocument)
    except FleetError as e:
        raise Refused("malformed", str(e)) from None
    public = trusted.get(signed.key_id)
    if public is None:
        raise Refused("unknown-key", f"signed by key {signed.key_id[:32]!r}, which is not a trusted fleet key")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signed.signature, signed.payload)
    except InvalidSignature:
        raise Refused("bad-signature", f"the signature by key {signed.key_id} does not verify") from None
    try:
        doc = decode(signed.payload, Deployment)
    except FleetError as e:
        raise Refused("malformed", str(e)) from None
    now = time.time() if now is None else now
    if fleet and doc.fleet != fleet:
        raise Refused("wrong-fleet", f"document of fleet {doc.fleet!r}, this device is in fleet {fleet!r}")
    targets = {f"device:{device}", *(f"group:{g}" for g in groups)}
    if doc.target not in targets:
        raise Refused("wrong-target", f"document for {doc.target!r}, not for this device or its groups")
    if now > doc.expires:
        raise Refused("expired", f"document version {doc.version} expired at {doc.expires:.0f} (now {now:.0f})")
    if doc.issued > now + 300:
        raise Refused("not-yet-valid", f"document version {doc.version} is issued at {doc.issued:.0f}, "
                                       f"ahead of this device's clock ({now:.0f})")
    if doc.version <= applied_version:
        raise Refused("replay", f"document version {doc.version} is not above the version applied, {applied_version}")
    for b in doc.bundles:
        if not _SHA256.match(b.sha256) or b.size < 0:
            raise Refused("malformed", f"bundle {b.name!r}: sha256 {b.sha256[:70]!r} or size {b.size} is not valid")
    if doc.config is not None and config_digest(doc.config.toml) != doc.config.sha256:
        raise Refused("malformed", "the config fragment's sha256 does not match its text")
    return doc


# -- topics and ACLs ---------------------------------------------------------------------------


class Topics:
    """The topic names under a prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix.rstrip("/")

    def device_desired(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/desired"

    def group_desired(self, group: str) -> str:
        return f"{self.prefix}/groups/{group}/desired"

    def reported(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/reported"

    def enrol(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/enrol"

    def presence(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/presence"

    def info(self, sha256: str) -> str:
        return f"{self.prefix}/artifacts/{sha256}/info"

    def chunk(self, sha256: str, index: int) -> str:
        return f"{self.prefix}/artifacts/{sha256}/chunks/{index}"

    def chunks(self, sha256: str) -> str:
        """The wildcard subscription to every chunk of an artifact."""
        return f"{self.prefix}/artifacts/{sha256}/chunks/+"

    def parse(self, topic: str) -> tuple[str, ...]:
        """("device-desired", device) | ("group-desired", group) | ("reported", device) |
        ("enrol", device) | ("presence", device) | ("info", sha256) | ("chunk", sha256, index) | ("other",)."""
        if not topic.startswith(self.prefix + "/"):
            return ("other",)
        parts = topic[len(self.prefix) + 1:].split("/")
        match parts:
            case ["devices", device, "desired"]:
                return ("device-desired", device)
            case ["groups", group, "desired"]:
                return ("group-desired", group)
            case ["devices", device, "reported"]:
                return ("reported", device)
            case ["devices", device, "enrol"]:
                return ("enrol", device)
            case ["devices", device, "presence"]:
                return ("presence", device)
            case ["artifacts", sha, "info"]:
                return ("info", sha)
            case ["artifacts", sha, "chunks", index] if index.isdigit():
                return ("chunk", sha, index)
        return ("other",)


def acl_lines(devices: Mapping[str, Iterable[str]], prefix: str = DEFAULT_PREFIX, operator: str = "") -> list[str]:
    """A mosquitto ACL file (``acl_file``) for a broker whose devices log in by certificate
    (``use_identity_as_username true``: the username is the certificate's CN, the device id):
    ``devices`` maps each device id to its groups.  Every device may read its own desired
    topic, the artifacts and its groups' desired topics, and write only its own reported,
    enrol and presence topics (the last also its will's); ``operator`` (a username) may read
    and write everything under the prefix.
    Anything not listed is denied (mosquitto's ACLs are default-deny)."""
    p = prefix.rstrip("/")
    lines = ["# edgebus fleet ACL: generated by protocols.fleet.acl_lines; default deny",
             f"pattern read {p}/devices/%u/desired",
             f"pattern readwrite {p}/devices/%u/reported",
             f"pattern readwrite {p}/devices/%u/enrol",
             f"pattern readwrite {p}/devices/%u/presence",
             f"pattern read {p}/artifacts/#", ""]
    if operator:
        _check_name(operator, "operator")
        lines += [f"user {operator}", f"topic readwrite {p}/#", ""]
    for device, groups in sorted(devices.items()):
        _check_name(device, "device id")
        lines.append(f"user {device}")
        for g in sorted(set(groups)):
            _check_name(g, "group")
            lines.append(f"topic read {p}/groups/{g}/desired")
        lines.append("")
    return lines


def _check_name(name: str, what: str) -> None:
    if not NAME.match(name):
        raise FleetError(f"{what} {name[:70]!r} is not a valid name: letters, digits, '_.:-', "
                         "starting with a letter or digit, at most 128")
