"""Sessions: the handshake (Hello, credentials or CURVE identity, Welcome), control messages,
heartbeats and disconnects, and what a connection whose session ended is told."""

from __future__ import annotations

import collections
import itertools
import typing

from protocols import (
    PROTOCOL_MINOR,
    BodyDecoder,
    Bye,
    Control,
    DecodeError,
    Error,
    ErrorCode,
    Header,
    Heartbeat,
    Hello,
    Kind,
    Ready,
    Subscribe,
    SIGNATURE,
    Unsubscribe,
    Welcome,
)

from ._boundary import PeerGone, PeerReady
from ._config import SERVICE_NAME
from ._core import CONTROL, ERROR, KERNEL, SECURITY, RouterCore, log
from ._peers import Peer

_CONTROL_TYPES = frozenset(t.__struct_config__.tag for t in typing.get_args(Control))
#: How many recently ended sessions the kernel remembers the reason of (by connection).
ENDED_MEMORY = 1024


class Sessions(RouterCore):
    def _init_sessions(self) -> None:
        self._control = BodyDecoder(Control)
        self._shared_ids = itertools.count(1)
        #: The User-Id (ZAP-authenticated CURVE key) of the message being routed, over tcp.
        #: Set by the router thread's receive loop.
        self._user_id: str | None = None
        self._next_beat = 0.0
        self._beat_header = self._enc.encode(Header(kind=Kind.CONTROL, type="Heartbeat", sender=KERNEL))
        self._beat_body = self._enc.encode(Heartbeat())
        #: ROUTER identity -> why its session ended, for the ENDED_MEMORY latest (LRU): the
        #: connection's next message is answered with that reason.
        self._ended: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        #: ROUTER identity -> the CURVE key (Z85) of each session opened over tcp: the
        #: session ends when that key is no longer enrolled for its principal (_policy).
        self._curve_keys: dict[bytes, str] = {}
        #: False while CURVE peers wait for the security service to restore the run-time
        #: policy (its unenrolments, revocations) after the kernel started: see _hello.
        self._policy_restored = False

    def _hello(self, identity: bytes, hdr: Header, body: bytes) -> None:
        try:
            hello = self._control.decode(hdr.type, body)
        except DecodeError as exc:
            self._reject(identity, hdr, ErrorCode.BAD_MESSAGE, str(exc))
            return
        curve_key = self._curve_user_id()
        if curve_key and not self._policy_restored and SECURITY in self.known_services:
            # The configuration enrols keys at boot; the security service's run-time
            # decisions (an unenrolment, a revocation) come back only once it is ready.
            # Until then a tcp peer might be let in that the policy keeps out.
            self.answer(identity, hdr, Error(code=ErrorCode.UNAVAILABLE, message=(
                "the security service has not restored the run-time policy since the kernel started; "
                "try again in a moment")))
            return
        if curve_key:
            # Authenticated by CurveZMQ (ZAP admitted only enrolled keys): the key names it.
            principal = self._by_principal_name.get(self.enrolled.get(curve_key, ""))
            reason = f"CURVE key {curve_key[:8]}... is not enrolled (any more)"
            advice = "the CURVE key this connection uses is no longer enrolled; enrol it again"
        else:
            principal = self._principals.get(hello.credential) if hello.credential else None
            reason = "missing credential" if not hello.credential else "unknown credential"
            advice = ("Hello carries no valid credential; use the credential the kernel gave this "
                      "service (EDGEBUS_CREDENTIAL_FD or <run-dir>/credentials/)")
        if principal is None:
            self._authentication_failed(identity, hello.service, reason, pid=hello.pid)
            self.answer(identity, hdr, Error(code=ErrorCode.UNAUTHENTICATED, message=advice))
            return
        if principal.shared:
            if hello.service and not SERVICE_NAME.match(hello.service):
                self.answer(identity, hdr, Error(code=ErrorCode.BAD_MESSAGE, message=(
                    f"client label {hello.service!r} must be 1-63 of a-z, 0-9, '_' and '-'")))
                return
            name = f"{hello.service or principal.name}.{next(self._shared_ids)}"
        else:
            name = principal.name
            if hello.service and hello.service != name:
                self._authentication_failed(identity, hello.service, f"presented the credential of {name!r}",
                                            pid=hello.pid)
                self.answer(identity, hdr, Error(code=ErrorCode.UNAUTHENTICATED, message=(
                    f"this credential belongs to {name!r}, not {hello.service!r}")))
                return
            old = self._by_name.get(name)
            if old is not None:
                self.disconnect(old, "replaced by a new connection with the same credential")
        peer = Peer(identity, name, principal, hello)
        self._peers[identity] = peer
        self._ended.pop(identity, None)
        if curve_key:
            self._curve_keys[identity] = curve_key
        if not principal.shared:
            self._by_name[name] = peer
        self.answer(peer, hdr, Welcome(
            name=name,
            heartbeat_interval=self.config.heartbeat_interval,
            heartbeat_liveness=self.config.heartbeat_liveness,
            max_message_size=self.config.max_message_size,
            minor=PROTOCOL_MINOR,
            settings=principal.settings,
        ))
        # busctl's sessions (the operator's shared credential) come and go, and the
        # supervisor logs the states of the services it starts: debug level for both
        (log.debug if principal.shared or name in self._managed else log.info)(
            "peer_connected", service=name, pid=hello.pid, types=sorted(peer.types))

    def _sessionless(self, identity: bytes, hdr: Header) -> None:
        """A message other than Hello on a connection without a session: answered
        ``unauthenticated`` (unread), saying why when the kernel ended a session there
        lately (the peer learns that its session is over and may say Hello again).  On a
        connection it never knew, the peer skipped its Hello, or had a session with a kernel
        that has started again since (with fresh credentials: 5.1); either way the answer
        tells it to say Hello.  Logged at the 1st, 10th, 100th... of the connection (see
        Summary)."""
        why = self._ended.get(identity)
        if why is not None:
            self._ended.move_to_end(identity)
        count = self._rejections.count(identity)
        if count:
            log.info("message_after_session_end" if why else "message_without_session",
                     connection=identity.hex(), reason=why or "no Hello on this connection", type=hdr.type,
                     count=count, total=self._rejections.total)
        if hdr.kind != ERROR:  # errors are never answered
            self.answer(identity, hdr, _ended(why) if why is not None else _NO_SESSION)

    def _curve_user_id(self) -> str:
        return self._user_id or ""

    def _control_message(self, peer: Peer, hdr: Header, body: bytes) -> None:
        if hdr.type not in _CONTROL_TYPES:
            self._reject(peer.identity, hdr, ErrorCode.UNKNOWN_TYPE,
                         f"unknown control message {hdr.type!r}; known: {', '.join(sorted(_CONTROL_TYPES))}")
            return
        try:
            msg = self._control.decode(hdr.type, body)
        except DecodeError as exc:
            self._reject(peer.identity, hdr, ErrorCode.BAD_MESSAGE, str(exc))
            return
        match msg:
            case Heartbeat():
                pass
            case Ready():
                if not peer.ready:
                    peer.ready = True
                    (log.debug if peer.principal.shared or peer.name in self._managed else log.info)(
                        "peer_ready", service=peer.name)
                    if not peer.principal.shared:
                        self._notify(PeerReady(peer.name))
                        if peer.name == SECURITY:
                            self._policy_restored = True  # it re-applies its policy before Ready
            case Subscribe(topics=topics):
                self._subscribe(peer, hdr, topics)
            case Unsubscribe(topics=topics):
                self._unsubscribe(peer, hdr, topics)
            case Bye(reason=reason):
                self.disconnect(peer, f"said bye: {reason}" if reason else "said bye")
            case Hello():
                # A peer that restarted its session on the same socket: start afresh.
                self.disconnect(peer, "sent a new Hello")
                self._hello(peer.identity, hdr, body)

    def _heartbeats(self, now: float) -> None:
        """Every heartbeat interval: beat to each peer, and disconnect the silent ones."""
        if now < self._next_beat:
            return
        interval = self.config.heartbeat_interval
        self._next_beat = now + interval
        limit = interval * self.config.heartbeat_liveness
        for peer in list(self._peers.values()):
            if now - peer.last_seen > limit:
                self.disconnect(peer, f"no heartbeat for {now - peer.last_seen:.1f}s", silent=True)
            else:
                self._send([peer.identity, SIGNATURE, self._beat_header, self._beat_body], peer)

    def disconnect(self, peer: Peer, why: str, silent: bool = False, tell: bool = False) -> None:
        """Forget ``peer``: its requests are answered or dropped, its subscriptions and
        monitors end, and the supervisor hears of it (a service's, not a client's).

        ``tell``: the policy ended it (its key unenrolled, its principal removed): the peer
        is told at once, by an ``unauthenticated`` error with id 0 giving the reason, rather
        than at its next message (a peer whose session was taken over by a newer connection
        is not told, or the two would take it from each other in turn)."""
        if self._peers.pop(peer.identity, None) is None:
            return
        self._curve_keys.pop(peer.identity, None)
        if tell:
            self.answer(peer.identity, 0, _ended(why))
        if self._by_name.get(peer.name) is peer:
            del self._by_name[peer.name]
        self._monitors.pop(peer.identity, None)
        if peer.subscriptions:
            self._topic_cache.clear()
        self._drop_pending(peer, why)
        self._ended[peer.identity] = why
        if len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
        # (a managed service that says Bye is being stopped: the supervisor logs the stop)
        quiet = peer.principal.shared or (why.startswith("said bye") and peer.name in self._managed)
        (log.debug if quiet else log.info)("peer_disconnected", service=peer.name, reason=why)
        if not peer.principal.shared:
            self._notify(PeerGone(peer.name, why, peer.principal.credential, silent))

    def _disconnect_name(self, name: str, why: str) -> None:
        peer = self._by_name.get(name)
        if peer is not None:
            self.disconnect(peer, why)


#: The answer to a message on a connection this kernel never had a session on.
_NO_SESSION = Error(code=ErrorCode.UNAUTHENTICATED, message=(
    "this connection has no session with this kernel: it never said Hello, or its kernel started again "
    "since; say Hello (with the credential the kernel wrote, 5.1) to start one"))


def _ended(why: str) -> Error:
    return Error(code=ErrorCode.UNAUTHENTICATED, message=(
        f"this connection's session ended: {why}; say Hello (with the same credential) to start a new one"))
