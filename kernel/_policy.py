"""The policy the router enforces: principals and their credentials, run-time grants (with
expiry) and revocations from the security service, and CURVE key enrolment."""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable

from protocols import CapabilityEntry

from ._caps import CapabilitySet
from ._core import RouterCore, log
from ._peers import Principal


class Policy(RouterCore):
    def _init_policy(self, principals: Iterable[Principal], enrolled: dict[str, str]) -> None:
        #: credential -> principal
        self._principals: dict[str, Principal] = {}
        self._by_principal_name: dict[str, Principal] = {}
        #: principal name -> capability -> expiry (epoch seconds; 0: none)
        self._grants: dict[str, dict[str, float]] = {}
        self._revoked: dict[str, set[str]] = {}
        #: (expiry, principal name, capability), a heap
        self._grant_expiry: list[tuple[float, str, str]] = []
        #: CurveZMQ public key (Z85) -> principal name, for peers on the tcp endpoint.  The
        #: ZAP handler's thread reads it: it is replaced whole, never changed in place.
        self.enrolled: dict[str, str] = dict(enrolled)
        for p in principals:
            self._add_principal(p)

    def _add_principal(self, principal: Principal) -> None:
        """Register (or replace) a principal.  Peers connected with the same credential
        take its new capabilities; a new credential (a respawned service) leaves the old
        incarnation's connection with what it had until it goes."""
        old = self._by_principal_name.pop(principal.name, None)
        if old is not None:
            self._principals.pop(old.credential, None)
        self._principals[principal.credential] = principal
        self._by_principal_name[principal.name] = principal
        self._apply_policy(principal)
        for peer in self._peers.values():
            if peer.principal.name == principal.name and peer.principal.credential == principal.credential:
                peer.principal = principal
                peer.forget_permissions()
        self._topic_cache.clear()

    def _remove_principal(self, name: str) -> None:
        principal = self._by_principal_name.pop(name, None)
        if principal is not None:
            self._principals.pop(principal.credential, None)
            for peer in [p for p in self._peers.values() if p.principal is principal]:
                self.disconnect(peer, "its credential was revoked")

    def _apply_policy(self, principal: Principal) -> None:
        now = time.time()
        grants = self._grants.get(principal.name, {})
        revoked = self._revoked.get(principal.name, set())
        live = [cap for cap, expires in grants.items() if not expires or expires > now]
        principal.caps = CapabilitySet((*principal.base, *live), denied=revoked)
        for peer in self._peers.values():
            if peer.principal is principal:
                peer.forget_permissions()
        self._topic_cache.clear()

    def _grant(self, name: str, capability: str, expires: float = 0.0) -> None:
        self._grants.setdefault(name, {})[capability] = expires
        self._revoked.get(name, set()).discard(capability)
        if expires:
            heapq.heappush(self._grant_expiry, (expires, name, capability))
        if name in self._by_principal_name:
            self._apply_policy(self._by_principal_name[name])

    def _revoke(self, name: str, capability: str) -> None:
        self._grants.get(name, {}).pop(capability, None)
        self._revoked.setdefault(name, set()).add(capability)
        if name in self._by_principal_name:
            self._apply_policy(self._by_principal_name[name])

    def _reset(self, name: str, capability: str) -> bool:
        """Withdraw the run-time grant or revocation of exactly ``capability``; False if
        there was none."""
        granted = self._grants.get(name, {}).pop(capability, None) is not None
        revoked = capability in self._revoked.get(name, ())
        self._revoked.get(name, set()).discard(capability)
        for table in (self._grants, self._revoked):
            if name in table and not table[name]:
                del table[name]
        if name in self._by_principal_name:
            self._apply_policy(self._by_principal_name[name])
        return granted or revoked

    def is_principal(self, name: str) -> bool:
        """A name the policy may speak of: the operator, a configured service (started or
        not) or a connected external one."""
        return name in self._by_principal_name or name in self.known_services

    def _expire_grants(self) -> None:
        now = time.time()
        heap = self._grant_expiry
        while heap and heap[0][0] <= now:
            expires, name, capability = heapq.heappop(heap)
            if self._grants.get(name, {}).get(capability) == expires:
                del self._grants[name][capability]
                log.info("grant_expired", principal=name, capability=capability)
                self._audit("grant-expired", name, capability=capability)
                if name in self._by_principal_name:
                    self._apply_policy(self._by_principal_name[name])

    def _enroll(self, name: str, public_key: str) -> None:
        """Bind a CurveZMQ public key (Z85) to a principal, or unbind with an empty key."""
        enrolled = {k: v for k, v in self.enrolled.items() if v != name}
        if public_key:
            enrolled[public_key] = name
        self.enrolled = enrolled  # one assignment: the ZAP thread reads it without a lock

    def capability_table(self) -> dict[str, list[str]]:
        return {name: p.caps.describe() for name, p in sorted(self._by_principal_name.items())}

    def capability_entries(self) -> dict[str, list[CapabilityEntry]]:
        """Every principal's configured patterns, live run-time grants (with expiry) and
        revocations; also those of a configured service that has not started yet."""
        now = time.time()
        names = set(self._by_principal_name) | set(self._grants) | set(self._revoked)
        result: dict[str, list[CapabilityEntry]] = {}
        for name in sorted(names):
            principal = self._by_principal_name.get(name)
            entries = [CapabilityEntry(capability=c, origin="config") for c in (principal.base if principal else ())]
            entries += [CapabilityEntry(capability=c, origin="grant", expires=e)
                        for c, e in sorted(self._grants.get(name, {}).items()) if not e or e > now]
            entries += [CapabilityEntry(capability=c, origin="revocation") for c in sorted(self._revoked.get(name, ()))]
            if entries or principal is not None:
                result[name] = entries
        return result
