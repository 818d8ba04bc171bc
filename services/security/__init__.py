"""The security service (``python -m services.security``): identities, capability policy
at run time, the tamper-evident audit log, the trust store, key sealing, attestation."""

from ._audit import AuditLog, verify_log
from ._exceptions import AuditLogError, KeyFileError, SealError, SecurityError
from ._keys import FileKeyStore, key_id, verify_ed25519
from protocols.security import *  # noqa: F401,F403
from protocols.security import __all__ as _message_names
from ._service import SecurityService
from ._trust import TrustStore

__all__ = ["AuditLog", "verify_log", "SecurityError", "KeyFileError", "SealError", "AuditLogError",
           "FileKeyStore", "key_id", "verify_ed25519", "SecurityService", "TrustStore", *_message_names]
