"""Errors of the security service.

Hierarchy::

    SecurityError
    ├── KeyFileError        a key file is missing, unreadable, or has unsafe permissions
    ├── SealError           a sealed blob does not open (wrong master key, tampered, wrong context)
    └── AuditLogError       the audit log cannot be written
"""

from __future__ import annotations

__all__ = ["SecurityError", "KeyFileError", "SealError", "AuditLogError"]


class SecurityError(Exception):
    pass


class KeyFileError(SecurityError):
    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        super().__init__(f"key file {path}: {problem}")


class SealError(SecurityError):
    def __init__(self, problem: str) -> None:
        super().__init__(f"cannot unseal: {problem}")


class AuditLogError(SecurityError):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"audit log {path}: {problem}")
