"""The kernel's own API (requests to ``kernel``): services and their statuses, interfaces,
the capability table, monitoring, the security service's policy changes, measurements, and
the operations the supervisor carries out (start, stop, restart, reload)."""

from __future__ import annotations

import math
import time
import typing
from collections.abc import Callable

import msgspec

from protocols import (
    BodyDecoder,
    CapabilityTable,
    DecodeError,
    Enroll,
    Enrollments,
    Error,
    ErrorCode,
    GetLogs,
    GetMeasurements,
    GetService,
    Grant,
    Granted,
    Header,
    Interface,
    Introspect,
    KernelRequest,
    ListCapabilities,
    ListEnrollments,
    ListServices,
    Measurements,
    Monitor,
    Monitoring,
    Reload,
    Reset,
    RestartService,
    Revoke,
    ServiceList,
    ServiceStateChanged,
    ServiceStatus,
    StartService,
    StopMonitor,
    StopService,
)

from ._boundary import FinishOperation, OperationRequested, ServiceUpdate
from ._caps import parse_capability
from ._core import SECURITY, RouterCore, log
from ._exceptions import CapabilityError
from ._peers import Peer
from ._proc import rss_bytes

_KERNEL_TYPES = frozenset(t.__struct_config__.tag for t in typing.get_args(KernelRequest))


class KernelApi(RouterCore):
    def _init_api(self, known_services: frozenset[str], measurements: Callable[[], Measurements] | None) -> None:
        self._kernel_api = BodyDecoder(KernelRequest)
        #: Configured service names: requests to others are answered unknown-destination.
        self.known_services = known_services
        #: The supervisor's last word on each managed service (pushed by it, see _boundary).
        self._managed: dict[str, ServiceUpdate] = {}
        self._measurements = measurements

    def _kernel_request(self, peer: Peer, hdr: Header, body: bytes) -> None:
        if hdr.type not in _KERNEL_TYPES:
            self.answer(peer, hdr, Error(code=ErrorCode.UNKNOWN_TYPE, message=(
                f"the kernel does not serve {hdr.type!r}; it serves {', '.join(sorted(_KERNEL_TYPES))}")))
            return
        try:
            msg = self._kernel_api.decode(hdr.type, body)
        except DecodeError as exc:
            self.answer(peer, hdr, Error(code=ErrorCode.BAD_MESSAGE, message=str(exc)))
            return
        reply = self._serve(peer, hdr, msg)
        if reply is not None:
            self.answer(peer, hdr, reply)

    def _serve(self, peer: Peer, hdr: Header, msg: msgspec.Struct) -> msgspec.Struct | None:
        """The answer to one kernel request: a reply, an Error, or None for an operation
        the supervisor answers later."""
        match msg:
            case ListServices():
                return ServiceList(services=self.statuses())
            case GetService(name=name) | Introspect(name=name) if not self._exists(name):
                return Error(code=ErrorCode.UNKNOWN_DESTINATION, message=f"no service named {name!r}")
            case GetService(name=name):
                return self.status(name)
            case Introspect(name=name):
                target = self._by_name.get(name)
                if target is None:
                    return Error(code=ErrorCode.UNAVAILABLE, message=(
                        f"service {name!r} is not connected; its interface is known once it says Hello"))
                h = target.hello
                return Interface(name=name, types=sorted(h.types), schema=h.schema,
                                 reply_schema=h.reply_schema, publishes=h.publishes)
            case ListCapabilities(name=name):
                table = self.capability_table()
                if name:
                    if name not in table:
                        return Error(code=ErrorCode.UNKNOWN_DESTINATION, message=f"no principal named {name!r}")
                    table = {name: table[name]}
                entries = self.capability_entries()
                return CapabilityTable(table=table, entries={n: entries.get(n, []) for n in table} if name else entries)
            case ListEnrollments(name=name):
                entries = self.enrolment_entries()
                if name:
                    entries = [e for e in entries if e.name == name]
                    if not entries:
                        return self._not_enrollable(name, "ListEnrollments")
                return Enrollments(entries=entries)
            case Monitor():
                self._monitors[peer.identity] = msg
                return Monitoring()
            case StopMonitor():
                self._monitors.pop(peer.identity, None)
                return Monitoring()
            case Grant() | Revoke() | Reset() | Enroll() if peer.name != SECURITY or peer.principal.shared:
                self._audit("denied", peer.name, detail=f"{hdr.type}: only the security service changes the policy")
                return Error(code=ErrorCode.FORBIDDEN, message=(
                    f"{hdr.type}: only the security service changes the policy; "
                    f"ask it (busctl caps grant|revoke|reset, busctl security enroll)"))
            case Grant(capability=cap) | Revoke(capability=cap) | Reset(capability=cap) if not _parses(cap):
                return Error(code=ErrorCode.BAD_MESSAGE, message=f"not a capability: {cap!r}")
            case Grant(name=name) | Revoke(name=name) | Reset(name=name) if not self.is_principal(name):
                return Error(code=ErrorCode.UNKNOWN_DESTINATION, message=(
                    f"no principal named {name!r}: {hdr.type} applies to a configured service or 'operator' "
                    f"(configured: {', '.join(sorted(self.known_services | set(self._by_principal_name)))})"))
            case Grant(expires=expires) if not (math.isfinite(expires) and expires >= 0):
                return Error(code=ErrorCode.BAD_MESSAGE, message=(
                    f"expires {expires!r} is not a Unix time: give a finite time in the future, or 0 for no expiry"))
            case Reset(name=name, capability=cap):
                if self._reset(name, cap):  # else nothing to withdraw: idempotent
                    log.info("reset", service=name, capability=cap)
                    self._audit("reset", name, capability=cap)
                return self._granted(name)
            case Grant(name=name, capability=cap, expires=expires):
                self._grant(name, cap, expires)
                log.info("granted", service=name, capability=cap, expires=expires or None)
                self._audit("granted", name, capability=cap,
                            detail=f"until {expires:.0f}" if expires else "without expiry")
                return self._granted(name)
            case Revoke(name=name, capability=cap):
                self._revoke(name, cap)
                log.info("revoked", service=name, capability=cap)
                self._audit("revoked", name, capability=cap)
                return self._granted(name)
            case Enroll(public_key=key, reset=True) if key:
                return Error(code=ErrorCode.BAD_MESSAGE, message=(
                    "Enroll with reset withdraws the run-time decision and takes no key; "
                    "enrol a key without reset"))
            case Enroll(name=name, reset=True):
                if self._reset_enrolment(name):
                    key = self._key_in_force(name) if self._may_enroll(name) else ""
                    log.info("enrolment_reset", service=name, key=key or None)
                    self._audit("enrolment-reset", name, detail=(
                        f"the configuration's key {key} applies again" if key else "the configuration enrols no key"))
                elif not self._may_enroll(name):
                    return self._not_enrollable(name, "Enroll")
                return self._granted(name)
            case Enroll(name=name) if not self._may_enroll(name):
                return self._not_enrollable(name, "Enroll")
            case Enroll(name=name, public_key=key) if self.enrolled.get(key, name) != name:
                return Error(code=ErrorCode.REJECTED, message=(
                    f"that CURVE key is enrolled for {self.enrolled[key]!r}; a key identifies one principal: "
                    f"unenroll it there first (busctl security unenroll {self.enrolled[key]})"))
            case Enroll(name=name, public_key=key):
                self._enroll_at_run_time(name, key)
                log.info("enrolled" if key else "unenrolled", service=name, key=key or None)
                self._audit("enrolled" if key else "unenrolled", name, detail=key)
                return self._granted(name)
            case GetMeasurements():
                if self._measurements is None:
                    return Error(code=ErrorCode.UNAVAILABLE, message="this kernel keeps no measurement log")
                return self._measurements()
            case StartService() | StopService() | RestartService() | Reload() | GetLogs() if self.notices is None:
                return Error(code=ErrorCode.UNAVAILABLE, message="this router has no supervisor to operate on")
            case StartService(name=name) | StopService(name=name) | RestartService(name=name) \
                    if name not in self._managed:
                return Error(code=ErrorCode.UNKNOWN_DESTINATION,
                             message=f"no service named {name!r} is started by the kernel")
            case StartService() | StopService() | RestartService() | Reload() | GetLogs():
                # Supervisor work takes time: it runs on the event loop and is answered
                # later (FinishOperation); this thread goes on routing meanwhile.  (The
                # kernel keeps the logs, on the event loop too.)
                self._notify(OperationRequested(msg, peer.identity, hdr.id))
                return None
        return Error(code=ErrorCode.INTERNAL, message=f"the kernel has no handler for {hdr.type!r}")

    def _not_enrollable(self, name: str, request: str) -> Error:
        """Why ``name`` has no CURVE enrolment: only a service configured without a command
        connects over tcp (PROTOCOL.md 1.4, 9.1.3)."""
        if name == "operator" or getattr(self._by_principal_name.get(name), "shared", False):
            return Error(code=ErrorCode.REJECTED, message=(
                f"{request}: the operator role is not enrolled: it is local, with its credential file in the run "
                "directory; give a remote tool a service of its own ([services.<name>] without a command, with "
                "the capabilities it needs) and enroll that"))
        if name in self.known_services or name in self._by_principal_name:
            return Error(code=ErrorCode.REJECTED, message=(
                f"{request}: {name!r} is started by the kernel, which hands it a new credential at each spawn; "
                f"only a service configured without a command connects over tcp: configure one "
                f"([services.<name>] without a command) for the remote peer and enroll that"))
        return Error(code=ErrorCode.UNKNOWN_DESTINATION, message=(
            f"{request}: no service named {name!r} is configured to connect over tcp; add [services.{name}] "
            "(without a command) to the config before enrolling its key"))

    def _granted(self, name: str) -> Granted:
        principal = self._by_principal_name.get(name)
        return Granted(name=name, capabilities=principal.caps.describe() if principal else [])

    def _finish_operation(self, op: FinishOperation) -> None:
        peer = self._peers.get(op.identity)
        if peer is None:
            return  # the requester left meanwhile
        result = op.result
        if isinstance(result, ServiceStatus):
            result = self.status(result.name)
        self.answer(peer, op.request_id, result)

    # -- service statuses --------------------------------------------------------------------

    def _service_update(self, update: ServiceUpdate) -> None:
        self._managed[update.status.name] = update
        if update.previous and update.previous != update.status.state and self._sock is not None:
            st = update.status
            self.publish_kernel_event("kernel.services", ServiceStateChanged(
                name=st.name, state=st.state, previous=update.previous, pid=st.pid, detail=update.detail))

    def _exists(self, name: str) -> bool:
        return name in self._by_name or name in self.known_services

    def status(self, name: str) -> ServiceStatus:
        """What the kernel knows of ``name``: the supervisor's status (for a managed service)
        and its connection's."""
        update = self._managed.get(name)
        if update is not None:
            st = msgspec.structs.replace(update.status)
            if st.pid and update.started_at:
                st.uptime = round(time.monotonic() - update.started_at, 3)
            st.memory = rss_bytes(st.pid)
        else:
            st = ServiceStatus(name=name, state="configured")
        peer = self._by_name.get(name)
        principal = self._by_principal_name.get(name)
        if principal is not None:
            st.capabilities = principal.caps.describe()
        if peer is not None:
            st.connected = True
            if not st.managed:
                st.state = "ready" if peer.ready else "connected"
                st.pid = peer.hello.pid
            st.types = sorted(peer.types)
            st.subscriptions = sorted(peer.subscriptions)
            st.requests_in, st.requests_out = peer.requests_in, peer.requests_out
            st.events_out, st.denied, st.pending = peer.events_out, peer.denied, peer.pending
            st.dropped = peer.dropped
        return st

    def statuses(self) -> list[ServiceStatus]:
        return [self.status(n) for n in sorted(self.known_services | set(self._by_name))]


def _parses(capability: str) -> bool:
    try:
        parse_capability(capability)
    except CapabilityError:
        return False
    return True
