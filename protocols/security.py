"""The security service's channel: one tagged union of requests, one of replies."""

from __future__ import annotations

import msgspec

__all__ = [
    "AuditAppend", "AuditTail", "AuditVerify", "GrantCapability", "RevokeCapability", "ResetCapability",
    "ListGrants",
    "EnrollKey", "UnenrollKey", "ResetEnrollment", "TrustAdd", "TrustRemove", "TrustList", "VerifySignature", "Seal", "Unseal", "Attest",
    "DeviceKey", "Request",
    "AuditRecord", "AuditRecords", "AuditVerdict", "GrantEntry", "Grants", "Enrolled", "TrustedKey",
    "TrustedKeys", "SignatureValid", "Sealed", "Unsealed", "AttestationReport", "SignedReport",
    "PublicKey", "Appended", "Reply",
]


# -- requests ----------------------------------------------------------------------------------


class AuditAppend(msgspec.Struct, tag=True, omit_defaults=True):
    """Append a record (model installs, activations, rollbacks...).  The subject is the
    caller unless it says otherwise; the caller is recorded in any case."""

    kind: str
    subject: str = ""
    detail: str = ""


class AuditTail(msgspec.Struct, tag=True, omit_defaults=True):
    n: int = 20


class AuditVerify(msgspec.Struct, tag=True):
    pass


class GrantCapability(msgspec.Struct, tag=True, omit_defaults=True):
    #: A principal: a configured service or ``operator``.
    name: str
    capability: str
    #: Seconds the grant lasts (finite, > 0); absent: until revoked or reset.
    ttl: float | None = None


class RevokeCapability(msgspec.Struct, tag=True):
    name: str
    capability: str


class ResetCapability(msgspec.Struct, tag=True):
    """Remove the run-time grant or revocation of exactly ``capability`` from ``name``."""

    name: str
    capability: str


class ListGrants(msgspec.Struct, tag=True):
    pass


class EnrollKey(msgspec.Struct, tag=True, omit_defaults=True):
    """Let a CurveZMQ public key (Z85, 40 characters) connect over tcp as ``name``, instead
    of any key it had (the configuration's included), until reset.  An empty key is
    refused: unenrolling is ``UnenrollKey``."""

    name: str
    public_key: str = ""


class UnenrollKey(msgspec.Struct, tag=True):
    """``name`` may no longer connect over tcp, whatever key the configuration enrols for
    it, until reset; a session open with its key ends at once."""

    name: str


class ResetEnrollment(msgspec.Struct, tag=True):
    """Withdraw the run-time enrolment or unenrolment of ``name``: the configuration's key
    (if any) applies again."""

    name: str


class TrustAdd(msgspec.Struct, tag=True, omit_defaults=True):
    #: An ed25519 public key, 64 hex characters.
    public_key: str
    label: str = ""
    #: what the key may sign: ``model`` bundles, or ``fleet`` deployment documents
    role: str = "model"


class TrustRemove(msgspec.Struct, tag=True):
    key_id: str


class TrustList(msgspec.Struct, tag=True):
    pass


class VerifySignature(msgspec.Struct, tag=True, omit_defaults=True):
    """Is ``signature`` a valid ed25519 signature of ``data`` by a trusted key?"""

    data: bytes
    signature: bytes
    #: Optional: the key the signer claims; otherwise every trusted key is tried.
    key_id: str = ""
    #: only keys of this role count (``model``: bundles; ``fleet``: deployment documents)
    role: str = "model"


class Seal(msgspec.Struct, tag=True, omit_defaults=True):
    """Wrap a data key with the device master key (AES-256-GCM, ``context`` as AAD)."""

    key: bytes
    context: str = ""


class Unseal(msgspec.Struct, tag=True, omit_defaults=True):
    blob: bytes
    context: str = ""


class Attest(msgspec.Struct, tag=True, omit_defaults=True):
    #: A verifier's challenge, echoed in the signed report (freshness).
    nonce: str = ""


class DeviceKey(msgspec.Struct, tag=True):
    pass


Request = (AuditAppend | AuditTail | AuditVerify | GrantCapability | RevokeCapability | ResetCapability | ListGrants
           | EnrollKey | UnenrollKey | ResetEnrollment | TrustAdd | TrustRemove | TrustList | VerifySignature | Seal
           | Unseal | Attest | DeviceKey)


# -- replies -----------------------------------------------------------------------------------


class AuditRecord(msgspec.Struct, tag=True, omit_defaults=True):
    """One line of the audit log.  ``hash`` = sha256 of this record encoded with an empty
    ``hash``; ``prev`` = the previous record's hash (64 zeros for the first ever).
    A ``checkpoint`` record signs (``signature``, ed25519 by the device key) the hash of
    the record before it."""

    seq: int
    time: float
    kind: str
    subject: str
    prev: str
    detail: str = ""
    capability: str = ""
    by: str = ""
    signature: str = ""
    hash: str = ""


class AuditRecords(msgspec.Struct, tag=True):
    records: list[AuditRecord]


class AuditVerdict(msgspec.Struct, tag=True, omit_defaults=True):
    ok: bool
    records: int
    files: int
    checkpoints: int = 0
    #: Where the chain first breaks: "audit-000002.log line 17 (seq 1041)".
    where: str = ""
    problem: str = ""


class Appended(msgspec.Struct, tag=True):
    seq: int
    hash: str


class GrantEntry(msgspec.Struct, tag=True, omit_defaults=True):
    name: str
    capability: str
    action: str  # grant | revoke
    expires: float = 0.0


class Grants(msgspec.Struct, tag=True):
    grants: list[GrantEntry]
    #: The principal's effective capabilities after the change (for Grant/Revoke).
    effective: list[str] = []


class Enrolled(msgspec.Struct, tag=True):
    name: str
    public_key: str


class TrustedKey(msgspec.Struct, tag=True, omit_defaults=True):
    key_id: str
    public_key: str
    label: str = ""
    #: config | runtime
    source: str = "runtime"
    #: what it may sign: ``model`` (bundles) | ``fleet`` (deployment documents)
    role: str = "model"


class TrustedKeys(msgspec.Struct, tag=True):
    keys: list[TrustedKey]


class SignatureValid(msgspec.Struct, tag=True):
    key_id: str
    label: str = ""


class Sealed(msgspec.Struct, tag=True):
    blob: bytes


class Unsealed(msgspec.Struct, tag=True):
    key: bytes


class AttestationReport(msgspec.Struct, tag=True, omit_defaults=True):
    """What the device signs: the measurement log and PCR of what its kernel started."""

    device: str
    time: float
    pcr: str
    log: list[dict]
    nonce: str = ""


class SignedReport(msgspec.Struct, tag=True):
    report: AttestationReport
    #: ed25519 over msgspec.json.encode(report), hex.
    signature: str
    public_key: str


class PublicKey(msgspec.Struct, tag=True):
    public_key: str
    key_id: str


Reply = (AuditRecords | AuditVerdict | Appended | Grants | Enrolled | TrustedKeys | SignatureValid
         | Sealed | Unsealed | SignedReport | PublicKey)
