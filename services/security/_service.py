"""The security service: policy and keys.  The kernel enforces; this service decides.

* capability grants and revocations (with expiry), the only peer the kernel takes them
  from, persisted in ``grants.json`` and re-applied when either side restarts;
* CurveZMQ enrolment of peers that connect over tcp: run-time enrolments and unenrolments,
  which win over the configuration's keys until reset, persisted in ``enrollments.json``
  and re-applied when either side restarts;
* the audit log (kernel events on ``kernel.audit`` and ``AuditAppend`` from services);
* the trust store of model-signing keys, and signature checks against it;
* sealing of data keys under the device master key;
* attestation reports over the kernel's measurement log, signed by the device key.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Annotated

import anyio
import msgspec

from protocols import AuditEvent, Enroll, GetMeasurements, Grant, Granted, Measurements, Reset, Revoke
from protocols.runtime import ENV_STATE_DIR
from services import (
    BadMessage,
    Context,
    InternalError,
    Rejected,
    Service,
    Settings,
    UnknownDestination,
    atomic_write,
)

from ._audit import AuditLog, verify_log
from ._exceptions import SealError, SecurityError
from ._keys import FileKeyStore
from protocols.security import (
    Appended,
    AttestationReport,
    Attest,
    AuditAppend,
    AuditRecords,
    AuditTail,
    AuditVerify,
    DeviceKey,
    EnrollKey,
    Enrolled,
    GrantCapability,
    GrantEntry,
    Grants,
    ListGrants,
    PublicKey,
    Reply,
    Request,
    ResetCapability,
    ResetEnrollment,
    RevokeCapability,
    Seal,
    Sealed,
    SignatureValid,
    SignedReport,
    TrustAdd,
    TrustedKeys,
    TrustList,
    TrustRemove,
    UnenrollKey,
    Unseal,
    Unsealed,
    VerifySignature,
)
from ._trust import TrustStore

__all__ = ["SecurityService", "SecuritySettings", "TrustedKeySetting"]

#: Kernel audit kinds this service records itself, with the requester (``by``).
_RECORDED_HERE = {"granted", "revoked", "reset", "enrolled", "unenrolled", "enrolment-reset"}


class TrustedKeySetting(Settings):
    """A key the configuration trusts (``busctl trust remove`` cannot drop it)."""

    label: str
    #: the ed25519 public key, 64 hex characters
    public_key: Annotated[str, msgspec.Meta(pattern="^[0-9a-fA-F]{64}$")]
    #: what it may sign: ``model`` bundles, or ``fleet`` deployment documents
    role: Annotated[str, msgspec.Meta(pattern="^(model|fleet)$")] = "model"


class SecuritySettings(Settings):
    """``[services.security.settings]``."""

    #: seconds between signed checkpoints of the audit chain (each only if records were added)
    audit_checkpoint_interval: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    #: a signed checkpoint after this many records
    audit_checkpoint_every: Annotated[int, msgspec.Meta(ge=1)] = 100
    #: the audit file is rotated (the chain kept) when a record would make it larger
    audit_max_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 1 << 20
    #: ``[[services.security.settings.trusted_keys]]``: label, public_key
    trusted_keys: list[TrustedKeySetting] = []


class SecurityService(Service):
    name = "security"
    Settings = SecuritySettings
    Request = Request
    Reply = Reply
    publishes = ["security.checkpoint"]

    async def setup(self) -> None:
        settings: SecuritySettings = self.settings
        state = Path(os.environ.get(ENV_STATE_DIR, ".")) / "security"
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state = state
        self.keys = FileKeyStore(state)
        self.audit = AuditLog(state / "audit", self.keys.sign, max_bytes=settings.audit_max_bytes,
                              checkpoint_every=settings.audit_checkpoint_every)
        self.trust = TrustStore(state / "trust.json", [(k.label, k.public_key, k.role) for k in settings.trusted_keys])
        self.grants_path = state / "grants.json"
        self.grants: list[GrantEntry] = (msgspec.json.decode(self.grants_path.read_bytes(), type=list[GrantEntry])
                                         if self.grants_path.exists() else [])
        self.enrollments_path = state / "enrollments.json"
        #: name -> the key enrolled at run time, or "" for a run-time unenrolment
        self.enrollments: dict[str, str] = (msgspec.json.decode(self.enrollments_path.read_bytes(), type=dict[str, str])
                                            if self.enrollments_path.exists() else {})
        # Subscribed before READY, so that no kernel event after it goes unrecorded.
        self._subscriptions = contextlib.AsyncExitStack()
        self.kernel_events = await self._subscriptions.enter_async_context(
            self.bus.subscribe("kernel.audit", max_pending=10000))
        self._appended = anyio.Event()
        # The kernel forgets run-time policy when it restarts; give it back.
        now = time.time()
        self.grants = [g for g in self.grants if g.action == "revoke" or not g.expires or g.expires > now]
        kept = len(self.grants)
        for g in list(self.grants):
            msg = (Grant(name=g.name, capability=g.capability, expires=g.expires) if g.action == "grant"
                   else Revoke(name=g.name, capability=g.capability))
            try:
                await self.bus.call("kernel", msg, Granted, timeout=10)
            except (UnknownDestination, BadMessage) as exc:
                # Its principal left the configuration (or an older version stored what the
                # kernel now refuses): kept, it would lie dormant for any later namesake.
                self.log.warning("policy_dropped", principal=g.name, capability=g.capability,
                                 action=g.action, reason=exc.message)
                self.grants.remove(g)
                self.audit.append("policy-dropped", g.name, capability=g.capability,
                                  detail=f"{g.action}: {exc.message}", by="security")
        if len(self.grants) != kept:
            _save(self.grants_path, self.grants)
        # Enrolments and unenrolments too: they win over the keys the configuration enrols
        # (the kernel holds tcp peers back until this service is ready).
        for name, key in list(self.enrollments.items()):
            try:
                await self.bus.call("kernel", Enroll(name=name, public_key=key), Granted, timeout=10)
            except (UnknownDestination, BadMessage, Rejected) as exc:
                action = "enroll" if key else "unenroll"
                self.log.warning("policy_dropped", principal=name, action=action, reason=exc.message)
                del self.enrollments[name]
                _save(self.enrollments_path, self.enrollments)
                self.audit.append("policy-dropped", name, detail=f"{action}: {exc.message}", by="security")
        self.audit.append("security-started", "security", detail=f"device key {self.keys.key_id}")

    async def main(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._checkpoints)
            tg.start_soon(self._sync_audit)
            await self._record_kernel_events()

    async def _record_kernel_events(self) -> None:
        """Append kernel audit events as they arrive, unsynced; ``_sync_audit`` fsyncs
        (group commit: one fsync for a burst)."""
        decoder = msgspec.msgpack.Decoder(AuditEvent)
        async for incoming in self.kernel_events:
            if incoming.sender != "kernel" or incoming.type != "AuditEvent":
                continue
            ev = decoder.decode(incoming.body)
            if ev.kind in _RECORDED_HERE:
                continue
            self.audit.append(ev.kind, ev.subject, detail=ev.detail, capability=ev.capability,
                              by="kernel", when=ev.time or None, sync=False)
            self._appended.set()

    async def _sync_audit(self) -> None:
        while True:
            await self._appended.wait()
            self._appended = anyio.Event()
            self.audit.sync()

    async def _checkpoints(self) -> None:
        """Sign the chain every interval and publish the checkpoint on security.checkpoint
        (telemetry sends it upstream, so a fleet server holds the device's signed chain)."""
        while True:
            await anyio.sleep(self.settings.audit_checkpoint_interval)
            record = self.audit.checkpoint()
            if record is not None:
                await self.bus.publish("security.checkpoint", record)

    async def teardown(self) -> None:
        await self._subscriptions.aclose()
        self.audit.checkpoint()
        self.audit.close()

    # -- requests -----------------------------------------------------------------------------

    async def handle(self, req: Request, ctx: Context) -> Reply:
        try:
            return await self._handle(req, ctx)
        except SealError as exc:
            raise BadMessage(str(exc)) from exc
        except SecurityError as exc:
            raise InternalError(str(exc)) from exc

    async def _handle(self, req: Request, ctx: Context) -> Reply:
        match req:
            case AuditAppend(kind=kind, subject=subject, detail=detail):
                rec = self.audit.append(kind, subject or ctx.sender, detail=detail, by=ctx.sender)
                return Appended(seq=rec.seq, hash=rec.hash)
            case AuditTail(n=n):
                return AuditRecords(records=self.audit.tail(max(1, min(n, 10000))))
            case AuditVerify():
                self.audit.sync()
                return verify_log(self.audit.directory, self.keys.public_key)
            case GrantCapability(ttl=ttl) if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
                raise BadMessage(f"ttl {ttl:g} is not a number of seconds > 0; leave ttl out "
                                 "for a grant until revoked (busctl caps grant NAME CAP without --ttl)")
            case GrantCapability(name=name, capability=cap, ttl=ttl):
                # The kernel refuses a name that is no principal (unknown-destination) and a
                # bad pattern (bad-message): its error goes back as is, and nothing is kept.
                expires = time.time() + ttl if ttl is not None else 0.0
                granted = await self.bus.call("kernel", Grant(name=name, capability=cap, expires=expires), Granted)
                self._remember(GrantEntry(name=name, capability=cap, action="grant", expires=expires))
                self.audit.append("granted", name, capability=cap, by=ctx.sender,
                                  detail=f"for {ttl:g}s" if ttl is not None else "until revoked")
                return Grants(grants=self._of(name), effective=granted.capabilities)
            case RevokeCapability(name=name, capability=cap):
                granted = await self.bus.call("kernel", Revoke(name=name, capability=cap), Granted)
                self._remember(GrantEntry(name=name, capability=cap, action="revoke"))
                self.audit.append("revoked", name, capability=cap, by=ctx.sender)
                return Grants(grants=self._of(name), effective=granted.capabilities)
            case ResetCapability(name=name, capability=cap):
                entry = next((g for g in self.grants if (g.name, g.capability) == (name, cap)), None)
                if entry is None:
                    raise Rejected(f"{name!r} has no run-time grant or revocation of {cap!r} to reset; "
                                   f"busctl caps {name} lists its capabilities and their origin")
                granted = await self.bus.call("kernel", Reset(name=name, capability=cap), Granted)
                self.grants.remove(entry)
                _save(self.grants_path, self.grants)
                self.audit.append("reset", name, capability=cap, by=ctx.sender, detail=f"was a {entry.action}")
                return Grants(grants=self._of(name), effective=granted.capabilities)
            case ListGrants():
                now = time.time()
                return Grants(grants=[g for g in self.grants if g.action == "revoke" or not g.expires or g.expires > now])
            case EnrollKey(public_key=""):
                raise BadMessage("an empty key does not unenroll: UnenrollKey does "
                                 "(busctl security unenroll NAME)")
            case EnrollKey(public_key=key) if len(key) != 40:
                raise BadMessage("a CurveZMQ public key is 40 Z85 characters (zmq.curve_keypair)")
            case EnrollKey(name=name, public_key=key):
                return await self._enroll(name, key, ctx.sender)
            case UnenrollKey(name=name):
                return await self._enroll(name, "", ctx.sender)
            case ResetEnrollment(name=name):
                if name not in self.enrollments:
                    raise Rejected(f"{name!r} has no run-time enrolment or unenrolment to reset; "
                                   "busctl security list shows each key and where it comes from")
                await self.bus.call("kernel", Enroll(name=name, reset=True), Granted)
                was = self.enrollments.pop(name)
                _save(self.enrollments_path, self.enrollments)
                self.audit.append("enrolment-reset", name, by=ctx.sender,
                                  detail=f"was an enrolment of {was}" if was else "was an unenrolment")
                return Enrolled(name=name, public_key="")
            case TrustAdd(public_key=key, label=label, role=role):
                try:
                    added = self.trust.add(key, label, role)
                except ValueError as exc:
                    raise BadMessage(str(exc)) from exc
                self.audit.append("trust-added", added.key_id, detail=label if role == "model" else f"{label} (role {role})",
                                  by=ctx.sender)
                return TrustedKeys(keys=[added])
            case TrustRemove(key_id=kid):
                try:
                    removed = self.trust.remove(kid)
                except KeyError:
                    raise UnknownDestination(f"no trusted key with id {kid!r}") from None
                except PermissionError as exc:
                    raise BadMessage(str(exc)) from exc
                self.audit.append("trust-removed", kid, by=ctx.sender)
                return TrustedKeys(keys=[removed])
            case TrustList():
                return TrustedKeys(keys=list(self.trust.keys.values()))
            case VerifySignature(data=data, signature=sig, key_id=kid, role=role):
                key = self.trust.verify(data, sig, kid, role)
                if key is None:
                    who = f"key {kid}" if kid else "any trusted key"
                    raise BadMessage(f"the signature does not verify with {who}"
                                     + ("" if not kid or kid in self.trust.keys else " (that key is not trusted)"))
                return SignatureValid(key_id=key.key_id, label=key.label)
            case Seal(key=key, context=context):
                return Sealed(blob=self.keys.seal(key, context))
            case Unseal(blob=blob, context=context):
                return Unsealed(key=self.keys.unseal(blob, context))
            case Attest(nonce=nonce):
                m = await self.bus.call("kernel", GetMeasurements(), Measurements)
                report = AttestationReport(device=self.keys.public_key.hex(), time=time.time(), pcr=m.pcr,
                                           log=[msgspec.to_builtins(e) for e in m.log], nonce=nonce)
                signature = self.keys.sign(msgspec.json.encode(report)).hex()
                return SignedReport(report=report, signature=signature, public_key=self.keys.public_key.hex())
            case DeviceKey():
                return PublicKey(public_key=self.keys.public_key.hex(), key_id=self.keys.key_id)

    async def _enroll(self, name: str, key: str, by: str) -> Enrolled:
        """Enrol ``key`` for ``name``, or unenrol it (empty key), over the configuration's
        key until reset.  The kernel refuses a name that may not be enrolled (its error goes
        back as is, and nothing is kept) and ends at once the sessions of a key no longer
        enrolled."""
        await self.bus.call("kernel", Enroll(name=name, public_key=key), Granted)
        self.enrollments[name] = key
        _save(self.enrollments_path, self.enrollments)
        self.audit.append("enrolled" if key else "unenrolled", name, detail=key, by=by)
        return Enrolled(name=name, public_key=key)

    def _remember(self, entry: GrantEntry) -> None:
        self.grants = [g for g in self.grants if (g.name, g.capability) != (entry.name, entry.capability)]
        self.grants.append(entry)
        _save(self.grants_path, self.grants)

    def _of(self, name: str) -> list[GrantEntry]:
        return [g for g in self.grants if g.name == name]


def _save(path: Path, value: object) -> None:
    atomic_write(path, msgspec.json.encode(value))
