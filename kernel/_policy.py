"""The policy the router enforces: principals and their credentials, run-time grants (with
expiry) and revocations from the security service, and CURVE key enrolment.

Enrolment has two sources: the configuration (``curve_public_key`` of a service configured
without a command; the kernel sends it at boot and at every reload) and the security
service's run-time decisions (enrolments and unenrolments), which win until reset.  A
session open with a key that is no longer enrolled for its principal ends at once, and the
peer is told why."""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable

from protocols import CapabilityEntry, EnrollmentEntry, Error, ErrorCode

from ._caps import CapabilitySet
from ._core import RouterCore, log
from ._peers import Peer, Principal


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
        #: CurveZMQ public key (Z85) -> principal name, for peers on the tcp endpoint: the
        #: keys in force (see _update_enrolment).  The ZAP handler's thread reads it: it is
        #: replaced whole, never changed in place.
        self.enrolled: dict[str, str] = {}
        #: principal name -> the key the configuration enrols for it.
        self._config_keys: dict[str, str] = {name: key for key, name in enrolled.items()}
        #: principal name -> the security service's run-time decision, which wins over the
        #: configuration until reset: a key (enrolled) or "" (unenrolled).
        self._runtime_keys: dict[str, str] = {}
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
        for peer in list(self._peers.values()):
            if peer.principal.name == principal.name and peer.principal.credential == principal.credential:
                peer.principal = principal
                peer.forget_permissions()
                self._end_uncovered_subscriptions(peer)
        self._topic_cache.clear()
        if principal.external or (old is not None and old.external):
            self._update_enrolment()

    def _remove_principal(self, name: str) -> None:
        """A reload removed ``name`` from the configuration: its sessions end now (the peers
        are told why) and its credential and enrolled key stop working."""
        principal = self._by_principal_name.pop(name, None)
        if principal is not None:
            self._principals.pop(principal.credential, None)
            for peer in [p for p in self._peers.values() if p.principal is principal]:
                self.disconnect(peer, f"{name!r} was removed from the configuration", tell=True)
            if principal.external:
                self._update_enrolment()

    def _apply_policy(self, principal: Principal) -> None:
        now = time.time()
        grants = self._grants.get(principal.name, {})
        revoked = self._revoked.get(principal.name, set())
        live = [cap for cap, expires in grants.items() if not expires or expires > now]
        principal.caps = CapabilitySet((*principal.base, *live), denied=revoked)
        for peer in list(self._peers.values()):
            if peer.principal is principal:
                peer.forget_permissions()
                self._end_uncovered_subscriptions(peer)
        self._topic_cache.clear()

    def _end_uncovered_subscriptions(self, peer: Peer) -> None:
        """A subscription whose prefix the peer's capabilities no longer cover (revoked,
        expired, or gone from the configuration) ends now, and the peer is told: a
        ``forbidden`` error with id 0 naming the capability, as the Subscribe would be
        answered now.  (A narrower revocation, of one topic under a prefix still covered,
        only stops the deliveries it matches: they are checked per topic.)"""
        caps = peer.principal.caps
        lost = sorted(p for p in peer.subscriptions if not caps.covers_prefix("subscribe", p))
        if not lost:
            return
        peer.subscriptions.difference_update(lost)
        self._topic_cache.clear()
        for prefix in lost:
            log.info("subscription_ended", service=peer.name, prefix=prefix, reason="capability no longer held")
            self.answer(peer, 0, Error(code=ErrorCode.FORBIDDEN, capability=f"subscribe:{prefix}*", message=(
                f"the subscription of {peer.name!r} to {prefix!r} ended: it no longer holds a capability "
                "covering it (revoked, expired or changed in the configuration)")))

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
                log.info("grant_expired", service=name, capability=capability)
                self._audit("grant-expired", name, capability=capability)
                if name in self._by_principal_name:
                    self._apply_policy(self._by_principal_name[name])

    # -- CURVE enrolment ---------------------------------------------------------------------

    def _enroll(self, name: str, public_key: str) -> None:
        """The key the configuration enrols for ``name`` (the kernel's EnrollKey, at boot and
        reload), or none with an empty key.  A run-time decision for ``name`` still wins."""
        if public_key:
            self._config_keys[name] = public_key
        else:
            self._config_keys.pop(name, None)
        self._update_enrolment()

    def _enroll_at_run_time(self, name: str, public_key: str) -> None:
        """The security service enrols ``public_key`` for ``name``, or unenrols it (empty
        key), whatever the configuration says, until ``_reset_enrolment``."""
        self._runtime_keys[name] = public_key
        self._update_enrolment()

    def _reset_enrolment(self, name: str) -> bool:
        """Withdraw the run-time decision for ``name``: the configuration's key (if any)
        applies again.  False if there was none."""
        if name not in self._runtime_keys:
            return False
        del self._runtime_keys[name]
        self._update_enrolment()
        return True

    def _key_in_force(self, name: str) -> str:
        return self._runtime_keys.get(name, self._config_keys.get(name, ""))

    def _may_enroll(self, name: str) -> bool:
        """Only a service configured without a command (an external principal) connects
        over tcp: the operator role and the services the kernel starts have credentials."""
        principal = self._by_principal_name.get(name)
        return principal is not None and principal.external

    def _update_enrolment(self) -> None:
        """Recompute the keys in force, and end at once every session opened with a key that
        is no longer enrolled for its principal (unenrolled, replaced, or its principal gone)."""
        enrolled: dict[str, str] = {}
        for name in sorted(self._by_principal_name):
            key = self._key_in_force(name) if self._may_enroll(name) else ""
            if key and key not in enrolled:
                enrolled[key] = name
        self.enrolled = enrolled  # one assignment: the ZAP thread reads it without a lock
        for identity, key in list(self._curve_keys.items()):
            peer = self._peers.get(identity)
            if peer is not None and enrolled.get(key) != peer.principal.name:
                self.disconnect(peer, self._why_not_enrolled(peer.principal.name, key), tell=True)

    def _why_not_enrolled(self, name: str, key: str) -> str:
        if not self._may_enroll(name):
            return f"{name!r} was removed from the configuration"
        runtime = self._runtime_keys.get(name)
        if runtime == "":
            return f"its CURVE key {key[:8]}... was unenrolled by the security service"
        if runtime is not None:
            return f"its CURVE key {key[:8]}... was replaced: the security service enrolled another key for {name!r}"
        if self._config_keys.get(name):
            return f"its CURVE key {key[:8]}... was replaced: the configuration enrols another key for {name!r}"
        return f"its CURVE key {key[:8]}... is no longer enrolled: the configuration does not enrol it any more"

    def enrolment_entries(self) -> list[EnrollmentEntry]:
        """Every service that may be enrolled, and any name with a run-time decision."""
        connected = {(self._peers[i].principal.name, key) for i, key in self._curve_keys.items() if i in self._peers}
        names = {n for n in self._by_principal_name if self._may_enroll(n)} | set(self._runtime_keys)
        entries = []
        for name in sorted(names):
            key = self._key_in_force(name) if self._may_enroll(name) else ""
            runtime = self._runtime_keys.get(name)
            origin = ("unenrolment" if runtime == "" else "enrolment" if runtime is not None
                      else "config" if key else "")
            entries.append(EnrollmentEntry(name=name, public_key=key, origin=origin,
                                           config_key=self._config_keys.get(name, ""),
                                           connected=bool(key) and (name, key) in connected))
        return entries

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
