"""The scenarios of ``edgebus conformance``, in the order they run: first against the real
kernel (the peer connected as a service without a command), then against the scripted
kernel.  Each returns a short detail on success or raises Check saying what went wrong."""

from __future__ import annotations

import os
import secrets
import signal
import time
from typing import Any, Callable

import msgspec

from protocols import SIGNATURE, Error, ErrorCode, GetService, Header, Hello, Kind, Ready, ServiceStatus, Subscribe, Tensor
from protocols import conformance as contract
from protocols.conformance import SERVICE

from tools._conformance import (
    MAX_MESSAGE_SIZE, SCRIPTED_INTERVAL, SCRIPTED_LIVENESS, Check, Link, Message, PeerProcess, Suite, check, pack,
)

__all__ = ["Scenario", "SCENARIOS"]


class Scenario(msgspec.Struct, frozen=True):
    name: str
    section: str
    title: str
    run: Callable[[Suite], str]


def _error(msg: Message) -> Error | None:
    if msg.header.kind != Kind.ERROR:
        return None
    try:
        return msgspec.msgpack.decode(msg.body, type=Error)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Check(f"an error whose body is not an Error (12): {exc}") from None


def _expect_reply(msg: Message, type_: str, what: str) -> Any:
    err = _error(msg)
    check(err is None, f"{what}: answered {msg.describe()}, not {type_}")
    check(msg.header.kind == Kind.REPLY and msg.header.type == type_,
          f"{what}: answered {msg.describe()}, not a reply {type_!r}")
    body = msg.decode()
    check(isinstance(body, dict) and body.get("type") == type_,
          f"{what}: the reply's body tag is {body.get('type') if isinstance(body, dict) else body!r}, "
          f"not its header's type {type_!r} (3.3)")
    return msg.decode(getattr(contract, type_))


def _expect_error(msg: Message, code: str, what: str) -> Error:
    err = _error(msg)
    check(err is not None, f"{what}: answered {msg.describe()}, not an error {code!r}")
    assert err is not None
    check(err.code.value == code, f"{what}: answered {msg.describe()}, not {code!r}")
    return err


# -- against the real kernel --------------------------------------------------------------------


def credentials(suite: Suite) -> str:
    """A copy of the peer given a credential the kernel never issued: its Hello is refused
    (unauthenticated) and it exits non-zero, while the real peer keeps its session."""
    op = suite.peer_on_kernel()
    wrong = suite.work / "wrong-credential"
    wrong.write_text(secrets.token_urlsafe(32))
    wrong.chmod(0o600)
    impostor = PeerProcess(suite.peer.argv, suite.work / "peer-wrong-credential.log", suite.pump)
    suite.extra.append(impostor)
    impostor.start(suite.endpoint, suite.run_dir, wrong)
    suite.pump.until(lambda: impostor.exited() is not None, 20.0)
    code = impostor.exited()
    impostor.stop()
    check(code is not None, "a peer whose Hello was refused (a credential the kernel never issued) was still "
                            "running after 20s: a refused Hello ends the attempts (1.3, Conformance)")
    check(code != 0, "a peer whose Hello was refused exited with status 0, not an error status")
    _expect_reply(op.call(SERVICE, "Echo", contract.Echo(text="still here")), "Echoed",
                  "Echo after another connection's refused Hello")
    return f"refused, exited with status {code}"


def handshake(suite: Suite) -> str:
    """The kernel took the peer's Hello (name, the contract's types) and its Ready."""
    op = suite.peer_on_kernel()
    answer = op.call("kernel", "GetService", GetService(name=SERVICE))
    status = _expect_reply_kernel(answer, ServiceStatus)
    check(status.connected, f"the kernel shows {SERVICE!r} not connected (state {status.state})")
    missing = [t for t in contract.TYPES if t not in status.types]
    check(not missing, f"Hello.types lacks {', '.join(missing)} (Conformance; the types were {status.types})")
    echoed = _expect_reply(op.call(SERVICE, "Echo", contract.Echo(text="ready?")), "Echoed", "Echo after Ready")
    check(echoed.text == "ready?", f"Echo answered text {echoed.text!r}, not 'ready?'")
    return f"types {', '.join(status.types)}"


def _expect_reply_kernel(msg: Message, type_: Any) -> Any:
    check(msg.header.kind == Kind.REPLY, f"the kernel answered {msg.describe()}")
    return msg.decode(type_)


def requests(suite: Suite) -> str:
    """Requests with their own ids, in flight together, each answered once with its id and
    the requester the kernel stamped; unknown map keys are ignored."""
    op = suite.peer_on_kernel()
    ids = {op.request(SERVICE, "Echo", contract.Echo(text=f"n{n}")): f"n{n}" for n in range(6)}
    extra = op.request(SERVICE, "Echo", {"type": "Echo", "text": "extra", "unknown_key": [1, 2]},
                       header_extra={"zz": "an unknown header key"})
    ids[extra] = "extra"
    for rid, text in ids.items():
        msg = op.answer_to(rid, 10.0, f"Echo {text!r}")
        echoed = _expect_reply(msg, "Echoed", f"Echo {text!r}")
        check(echoed.text == text, f"the answer to request {rid} carries {echoed.text!r}, not {text!r} (6.1)")
        check(echoed.sender == op.name, f"Echoed.sender is {echoed.sender!r}, not the stamped requester {op.name!r} (3.2)")
        check(msg.header.sender == SERVICE, f"the reply is stamped {msg.header.sender!r}")
    stray = op.take(lambda m: m.header.id in ids)
    check(stray is None, f"a second answer to request {stray.header.id if stray else 0} (6.4: exactly once)")
    slept = _expect_reply(op.call(SERVICE, "Sleep", contract.Sleep(seconds=0.05)), "Slept", "Sleep 0.05")
    check(abs(slept.seconds - 0.05) < 1e-9, f"Slept.seconds is {slept.seconds}, not 0.05")
    return f"{len(ids)} requests in flight together"


def error_codes(suite: Suite) -> str:
    """Fail answers an error of each code of section 12, stamped with the peer's name."""
    op = suite.peer_on_kernel()
    codes = [c.value for c in ErrorCode]
    pending = {op.request(SERVICE, "Fail", contract.Fail(code=c, message=f"asked for {c}")): c for c in codes}
    for rid, code in pending.items():
        msg = op.answer_to(rid, 10.0, f"Fail {code!r}")
        err = _expect_error(msg, code, f"Fail {code!r}")
        check(msg.header.type == "Error", f"an error whose header type is {msg.header.type!r}, not 'Error' (12)")
        check(msg.header.sender == SERVICE, f"the error is stamped {msg.header.sender!r}")
        check(err.message, f"the {code} error has an empty message (12: message is required)")
    return f"{len(codes)} codes"


def tag_mismatch(suite: Suite) -> str:
    """A request whose body tag differs from its header type is answered bad-message, its
    handler not run; an event with a mismatch is dropped, a good one recorded."""
    op = suite.peer_on_kernel()
    t0 = time.monotonic()
    msg = op.call(SERVICE, "Echo", {"type": "Sleep", "seconds": 4.0}, timeout=8.0)
    _expect_error(msg, "bad-message", "a request with header type Echo and body tag Sleep")
    check(time.monotonic() - t0 < 3.0, "the bad-message came after the smuggled Sleep ran (3.3: the handler MUST NOT run)")
    _expect_error(op.call(SERVICE, "Sleep", {"type": "Echo", "text": "x"}), "bad-message",
                  "a request with header type Sleep and body tag Echo")
    topic = contract.TOPICS + "tags"
    _listen(op, [contract.TOPICS + "tags"])
    op.send(Header(kind=Kind.EVENT, type="Note", dest=topic), {"type": "Echo", "text": "smuggled"})
    op.send(Header(kind=Kind.EVENT, type="Note", dest=topic), {"type": "Note", "text": "genuine"})
    notes = _notes_until(op, lambda ns: any(n.text == "genuine" for n in ns), "the Note 'genuine'")
    bad = [n for n in notes if n.text != "genuine"]
    if bad:
        raise Check(f"the peer took an event whose header says Note but whose body tag is Echo ({bad[0].text!r}): "
                    "3.3 says drop it")
    return "2 requests refused, 1 event dropped"


def _listen(op: Link, topics: list[str]) -> contract.Listening:
    listening = _expect_reply(op.call(SERVICE, "Listen", contract.Listen(topics=topics)), "Listening",
                              f"Listen {topics}")
    missing = [t for t in topics if t not in listening.topics]
    check(not missing, f"Listening.topics {listening.topics} lacks {missing} (the kernel's Subscribed.topics)")
    return listening


def _notes_until(op: Link, done: Callable[[list[contract.Seen]], bool], what: str, timeout: float = 5.0) -> list[contract.Seen]:
    seen: list[contract.Seen] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        notes = _expect_reply(op.call(SERVICE, "Received", contract.Received()), "Notes", "Received")
        seen.extend(notes.notes)
        if done(seen):
            return seen
        op.pump.run(0.1)
    raise Check(f"the peer did not report {what} in Received within {timeout:g}s (it reported {seen})")


def malformed_body(suite: Suite) -> str:
    """Request bodies that do not decode into their type are answered bad-message, and the
    peer goes on serving."""
    op = suite.peer_on_kernel()
    bodies: list[tuple[str, str, Any]] = [
        ("Echo", "a body that is not msgpack", b"\xc1"),
        ("Echo", "a body that is an array", msgspec.msgpack.encode([1, 2])),
        ("Echo", "a body without 'type'", msgspec.msgpack.encode({"text": "x"})),
        ("Echo", "a text that is an int", msgspec.msgpack.encode({"type": "Echo", "text": 5})),
        ("Sleep", "a Sleep without its required seconds", msgspec.msgpack.encode({"type": "Sleep"})),
        ("Fail", "a Fail whose code is nil", msgspec.msgpack.encode({"type": "Fail", "code": None})),
    ]
    for type_, what, body in bodies:
        _expect_error(op.call(SERVICE, type_, body), "bad-message", what)
    _expect_reply(op.call(SERVICE, "Echo", contract.Echo(text="after")), "Echoed", "Echo after the malformed bodies")
    return f"{len(bodies)} bodies refused"


def tensors(suite: Suite) -> str:
    """Tensors in raw frames come back byte for byte with their descriptors; descriptors
    that break section 3.4 are answered bad-message."""
    op = suite.peer_on_kernel()
    frames = [os.urandom(24), b"", os.urandom(8), bytes([0, 1, 1, 0]), os.urandom(1 << 18)]
    descs = [Tensor("float32", [2, 3], 0), Tensor("uint8", [0], 1), Tensor("int64", [], 2), Tensor("bool", [4], 3),
             Tensor("uint16", [3, 4], 0, "the first frame again"), Tensor("float16", [1 << 17], 4, "big")]
    msg = op.call(SERVICE, "Echo", contract.Echo(text="tensors", tensors=descs), frames)
    echoed = _expect_reply(msg, "Echoed", "Echo with tensors")
    check(echoed.tensors == descs, f"Echoed.tensors {echoed.tensors} differ from those sent {descs}")
    check(len(msg.raw) == len(frames), f"{len(msg.raw)} raw frames came back, not {len(frames)}")
    for i, (got, sent) in enumerate(zip(msg.raw, frames)):
        check(got == sent, f"raw frame {i} came back changed ({len(got)} bytes, sent {len(sent)}) (3.4)")
    bad = [
        (Tensor("complex64", [1], 0), "a dtype not in the list"),
        (Tensor("float32", [2], 5), "a frame that does not exist"),
        (Tensor("float32", [2, 2], 0), "a frame of 24 bytes for float32 [2, 2]"),
        (Tensor("uint8", [1] * 33, 0), "33 dimensions"),
        (Tensor("uint8", [-1], 0), "a negative dimension"),
        (Tensor("uint8", [(1 << 40) + 1], 0), "a dimension over 2^40"),
    ]
    for desc, what in bad:
        _expect_error(op.call(SERVICE, "Echo", contract.Echo(tensors=[desc]), frames[:1]), "bad-message",
                      f"a tensor with {what}")
    return f"{len(descs)} tensors echoed, {len(bad)} refused"


def events(suite: Suite) -> str:
    """The peer subscribes, receives an event with its stamped sender, and publishes one
    that the suite receives stamped with the peer's name."""
    op = suite.peer_on_kernel()
    listening = _listen(op, [contract.TOPICS + "in."])
    check(listening.topics == sorted(listening.topics), f"Listening.topics {listening.topics} is not sorted")
    sub = op.control("Subscribe", Subscribe(topics=[contract.TOPICS + "out."]))
    check(sub.header.type == "Subscribed", f"the kernel answered the suite's Subscribe with {sub.describe()}")
    op.send(Header(kind=Kind.EVENT, type="Note", dest=contract.TOPICS + "in.a"), contract.Note(text="to the peer"))
    notes = _notes_until(op, lambda ns: any(n.text == "to the peer" for n in ns), "the suite's Note")
    note = next(n for n in notes if n.text == "to the peer")
    check(note.topic == contract.TOPICS + "in.a", f"the Note was reported on {note.topic!r}")
    check(note.sender == op.name, f"the Note was reported from {note.sender!r}, not the stamped {op.name!r} (3.2)")
    topic = contract.TOPICS + "out.b"
    _expect_reply(op.call(SERVICE, "Publish", contract.Publish(topic=topic, text="from the peer")), "Published", "Publish")
    event = op.expect(lambda m: m.header.kind == Kind.EVENT and m.header.dest == topic, 5.0, f"event on {topic}")
    check(event.header.type == "Note" and event.header.sender == SERVICE,
          f"the event on {topic} is {event.describe()} from {event.header.sender!r}")
    body = event.decode()
    check(isinstance(body, dict) and body.get("type") == "Note" and body.get("text") == "from the peer",
          f"the event's body is {body!r}")
    check(event.header.id == 0, f"the event carries id {event.header.id}")
    return "one event each way"


def denials(suite: Suite) -> str:
    """A subscription the peer may not make is answered forbidden naming the capability;
    a publish it may not make is refused by the kernel (the peer answers no error and keeps
    its session)."""
    op = suite.peer_on_kernel()
    prefix = contract.DENIED
    err = _expect_error(op.call(SERVICE, "Listen", contract.Listen(topics=[prefix])), "forbidden", f"Listen {prefix!r}")
    check(err.capability == f"subscribe:{prefix}*",
          f"the forbidden error names {err.capability!r}, not 'subscribe:{prefix}*' (7.2)")
    _expect_reply(op.call(SERVICE, "Publish", contract.Publish(topic=prefix + "x", text="no")), "Published",
                  f"Publish on {prefix}x")
    op.pump.run(0.3)
    status = _expect_reply_kernel(op.call("kernel", "GetService", GetService(name=SERVICE)), ServiceStatus)
    check(status.denied >= 2, f"the kernel counted {status.denied} denials of the peer, not 2")
    _expect_reply(op.call(SERVICE, "Echo", contract.Echo(text="after")), "Echoed", "Echo after the denials")
    return f"forbidden {err.capability}"


def newest_wins(suite: Suite) -> str:
    """A second connection with the peer's credential takes its session (the kernel routes
    to it); the peer, refused at its next message, starts a new session or exits."""
    op = suite.peer_on_kernel()
    newest = suite.link(suite.credential(SERVICE), SERVICE, contract.TYPES)
    check(newest.name == SERVICE, f"the suite's connection was named {newest.name!r}")
    newest.send(Header(kind=Kind.CONTROL, type="Ready"), Ready())
    rid = op.request(SERVICE, "Echo", contract.Echo(text="whose?"))
    req = newest.expect(lambda m: m.header.kind == Kind.REQUEST, 5.0, "the request routed to the newest connection")
    newest.send(Header(kind=Kind.REPLY, type="Echoed", id=req.header.id), contract.Echoed(text="the newest"))
    echoed = _expect_reply(op.answer_to(rid, 5.0, "Echo"), "Echoed", "Echo while the suite holds the name")
    check(echoed.text == "the newest", "the kernel routed to the old connection")
    assert op.welcome is not None
    limit = op.welcome.heartbeat_interval * op.welcome.heartbeat_liveness + 5.0
    reacted = suite.pump.until(lambda: ("exited" if not suite.peer.running() else
                                        "said Hello again" if newest.take(_refused) else None), limit)
    newest.close(bye=reacted != "said Hello again")
    check(reacted, f"the peer neither said Hello again nor exited within {limit:g}s of losing its session "
                   "(5.5: its next message is answered unauthenticated; 1.3: start over or exit)")
    if reacted == "exited":
        code = suite.peer.exited()
        suite.peer_on = ""  # (started again for what follows, as a supervisor would)
        suite.peer_on_kernel()
        return f"the peer exited (status {code}) and was started again"
    suite.wait_serving(10.0)
    return "the peer started a new session"


def _refused(msg: Message) -> bool:
    err = _error(msg)
    return err is not None and err.code == ErrorCode.UNAUTHENTICATED


# -- against the scripted kernel ------------------------------------------------------------------


def hello(suite: Suite) -> str:
    """The peer's first message, byte for byte: the signature, a Hello with an id, its name,
    the credential of its file, the contract's types; Ready after the Welcome."""
    sk = suite.script()
    identity, msg = suite.start_on_script()
    h = msg.header
    check(h.kind == Kind.CONTROL and h.type == "Hello", f"the first message was {msg.describe()}, not Hello (5.2)")
    check(h.id != 0, "the Hello has id 0 (5.2: an id ≠ 0)")
    check(not h.dest and not h.sender and not h.deadline, f"the Hello's header sets d/s/dl: {h}")
    body = msg.decode()
    check(isinstance(body, dict) and body.get("type") == "Hello", f"the Hello's body tag is not 'Hello': {body!r}")
    hello_ = msg.decode(Hello)
    check(hello_.service in (SERVICE, ""), f"Hello.service is {hello_.service!r}, not EDGEBUS_SERVICE {SERVICE!r}")
    check(hello_.credential == sk.credential, "Hello.credential is not the content of EDGEBUS_CREDENTIAL_FILE (5.1)")
    missing = [t for t in contract.TYPES if t not in hello_.types]
    check(not missing, f"Hello.types lacks {', '.join(missing)}")
    sk.pump.run(0.3)
    if sk.inbox:
        _, _, early = sk.next(0.1, "message")
        raise Check(f"the peer sent {early.describe()} before the answer to its Hello (5.2: nothing but Hello until then)")
    sk.peer = identity
    sk.welcome(h.id)
    sk.expect(lambda m: m.header.kind == Kind.CONTROL and m.header.type == "Ready", 15.0, "Ready after the Welcome")
    return f"pid {hello_.pid}" if hello_.pid else "Hello and Ready"


def heartbeats(suite: Suite) -> str:
    """With a Welcome announcing a 0.25 s interval, the peer beats about every 0.25 s (no id,
    no raw frames) and answers none of the kernel's beats."""
    sk = suite.peer_on_script()
    window = 2.5
    sk.inbox.clear()
    start = time.monotonic()
    beats: list[float] = []
    while time.monotonic() - start < window:
        try:
            _, at, msg = sk.next(window - (time.monotonic() - start), "heartbeat")
        except Check:
            break
        check(msg.header.kind == Kind.CONTROL and msg.header.type == "Heartbeat",
              f"the peer sent {msg.describe()} while only heartbeats were due")
        check(msg.header.id == 0 and not msg.raw, "a heartbeat with an id or raw frames (5.4)")
        beats.append(at)
    limit = SCRIPTED_INTERVAL * SCRIPTED_LIVENESS
    check(suite.peer.running(), f"the peer exited (status {suite.peer.exited()}) while the kernel beat every "
                                f"{SCRIPTED_INTERVAL}s: a kernel's heartbeat is a sign of life (5.4)")
    check(len(beats) >= 4, f"{len(beats)} heartbeats in {window}s at an announced interval of {SCRIPTED_INTERVAL}s (5.4)")
    gaps = [b - a for a, b in zip([start, *beats], beats)]
    check(max(gaps) < limit, f"{max(gaps):.2f}s between two heartbeats: over interval x liveness = {limit:g}s")
    return f"{len(beats)} beats in {window}s, longest gap {max(gaps):.2f}s"


def malformed_input(suite: Suite) -> str:
    """Malformed messages, another major version, errors, stray replies and events are
    dropped unanswered; a request with another minor and unknown keys is served."""
    sk = suite.peer_on_script()
    echo_hdr = {"k": 1, "t": "Echo", "d": SERVICE, "s": "suite", "dl": time.time() + 30}
    body = msgspec.msgpack.encode({"type": "Echo", "text": "bad"})
    junk = [
        [SIGNATURE, msgspec.msgpack.encode({**echo_hdr, "i": 5})],
        [b"XX\x01\x00", msgspec.msgpack.encode({**echo_hdr, "i": 6}), body],
        [b"EB\x02\x00", msgspec.msgpack.encode({**echo_hdr, "i": 7}), body],
        [b"EB\x01", msgspec.msgpack.encode({**echo_hdr, "i": 8}), body],
        [SIGNATURE, b"\xc1", body],
        [SIGNATURE, msgspec.msgpack.encode({"t": "Echo", "i": 9}), body],
        [SIGNATURE, msgspec.msgpack.encode({**echo_hdr, "k": 9, "i": 10}), body],
        [SIGNATURE, msgspec.msgpack.encode({"k": 3, "t": "Error", "s": "kernel"}),
         msgspec.msgpack.encode({"type": "Error", "code": "internal", "message": "an error answering nothing"})],
        [SIGNATURE, msgspec.msgpack.encode({"k": 3, "t": "Error", "i": 11, "s": "kernel"}),
         msgspec.msgpack.encode({"type": "Error", "code": "a-code-from-the-future", "message": "?"})],
        [SIGNATURE, msgspec.msgpack.encode({"k": 2, "t": "Subscribed", "i": 12, "s": "kernel"}),
         msgspec.msgpack.encode({"type": "Subscribed", "topics": []})],
        [SIGNATURE, msgspec.msgpack.encode(Header(kind=Kind.EVENT, type="Note", dest="nobody.asked", sender="suite")),
         msgspec.msgpack.encode({"type": "Note", "text": "unasked"})],
        [SIGNATURE, msgspec.msgpack.encode({"k": 5, "t": "Frobnicate", "s": "kernel"}), msgspec.msgpack.encode({"type": "Frobnicate"})],
        [SIGNATURE, msgspec.msgpack.encode({**echo_hdr, "i": 13}),  # over Welcome.max_message_size (13.1)
         msgspec.msgpack.encode(contract.Echo(tensors=[Tensor("uint8", [MAX_MESSAGE_SIZE], 0)])), bytes(MAX_MESSAGE_SIZE)],
    ]
    for frames in junk:
        sk.send(frames)
    good = [b"EB\x01\x09", msgspec.msgpack.encode({**echo_hdr, "i": 77, "zz": 1}),
            msgspec.msgpack.encode({"type": "Echo", "text": "good", "unknown": {"a": 1}})]
    sk.send(good)
    reply = sk.expect(lambda m: m.header.id == 77, 5.0, "the answer to the good Echo after the junk")
    _expect_reply(reply, "Echoed", "a request with minor 9 and unknown keys, after malformed ones (14)")
    check(reply.header.kind == Kind.REPLY and not reply.header.dest and not reply.header.deadline,
          f"the reply's header sets d or dl: {reply.header}")
    sk.pump.run(0.5)  # anything answering the junk would have come by now
    while sk.inbox:
        _, _, msg = sk.next(0.1, "message")
        check(msg.header.kind == Kind.CONTROL and msg.header.type == "Heartbeat",
              f"the peer answered malformed or unanswerable input with {msg.describe()} (id {msg.header.id}) "
              "(2: drop it; 12: never answer an error)")
    return f"{len(junk)} dropped, the good one served"


def deadlines(suite: Suite) -> str:
    """A request whose deadline passes while it works, or has passed already, is answered
    timeout; one without a deadline (0) or with an integer deadline is served."""
    sk = suite.peer_on_script()

    def ask(rid: int, seconds: float, deadline: Any) -> None:
        hdr: dict[str, Any] = {"k": 1, "t": "Sleep", "d": SERVICE, "i": rid, "s": "suite"}
        if deadline:
            hdr["dl"] = deadline
        sk.send(pack(hdr, contract.Sleep(seconds=seconds)))

    sent = time.monotonic()
    ask(31, 4.0, time.time() + 0.6)
    ask(32, 0.01, time.time() - 5.0)
    ask(33, 0.05, 0)
    ask(34, 0.05, int(time.time()) + 60)
    got: dict[int, tuple[float, Message]] = {}
    while len(got) < 4:
        msg = sk.expect(lambda m: m.header.kind in (Kind.REPLY, Kind.ERROR), 6.0, "the answers to four Sleeps")
        got[msg.header.id] = (time.monotonic() - sent, msg)
    missing = {31, 32, 33, 34} - set(got)
    check(not missing, f"no answer to Sleep {sorted(missing)}")
    at, late = got[31]
    _expect_error(late, "timeout", "Sleep 4s with a deadline 0.6s away")
    check(0.3 <= at <= 2.5, f"the timeout came {at:.2f}s after the request, not at its deadline (0.6s) (6.3)")
    _expect_error(got[32][1], "timeout", "Sleep with a deadline 5s past")
    check(got[32][0] < 2.0, "a request already late was run before its timeout answer (6.3)")
    _expect_reply(got[33][1], "Slept", "Sleep without a deadline (dl 0)")
    _expect_reply(got[34][1], "Slept", "Sleep with an integer deadline (3.1: accept integers for floats)")
    return f"timeout {at:.2f}s after the request"


def bye(suite: Suite) -> str:
    """On SIGTERM the peer says Bye (no id) and exits with status 0."""
    sk = suite.peer_on_script()
    suite.peer.signal(signal.SIGTERM)
    msg = sk.expect(lambda m: m.header.kind == Kind.CONTROL and m.header.type == "Bye", 10.0, "Bye after SIGTERM")
    check(msg.header.id == 0, f"the Bye has id {msg.header.id} (5.5: no id)")
    gone = suite.pump.until(lambda: suite.peer.exited() is not None, 10.0)
    code = suite.peer.exited()
    check(gone is not None and code is not None, "the peer still ran 10s after its Bye")
    check(code == 0, f"the peer exited with status {code} after SIGTERM, not 0 (17)")
    suite.peer_on = ""
    sk.rotate()  # started again, the peer reads the credential the "kernel" wrote since
    identity, msg = suite.start_on_script()
    check(msg.header.type == "Hello", f"the restarted peer's first message was {msg.describe()}")
    check(msg.decode(Hello).credential == sk.credential,
          "the restarted peer said Hello with the old credential, not the one now in its file (5.1)")
    sk.peer = identity
    sk.welcome(msg.header.id)
    sk.expect(lambda m: m.header.kind == Kind.CONTROL and m.header.type == "Ready", 15.0, "Ready after the Welcome")
    return "Bye, exit 0; started again with the new credential"


def liveness(suite: Suite) -> str:
    """When the kernel says nothing for interval x liveness, the peer gives the session up:
    it exits, or says Hello again on a new connection."""
    sk = suite.peer_on_script(fresh=not suite.peer.running())
    old = sk.peer
    sk.beating = False
    silent = time.monotonic()
    limit = SCRIPTED_INTERVAL * SCRIPTED_LIVENESS + 3.0

    def gave_up() -> str | None:
        if not suite.peer.running():
            return f"exited with status {suite.peer.exited()}"
        while sk.inbox:
            identity, _, frames = sk.inbox.popleft()
            if identity != old:
                return "said Hello on a new connection"
            if len(frames) >= 3 and frames[0][:3] == SIGNATURE[:3] and _is_hello(frames[1]):
                return "said Hello again"
        return None

    outcome = suite.pump.until(gave_up, limit)
    took = time.monotonic() - silent
    suite.peer.stop()
    suite.peer_on = ""
    check(outcome, f"the peer kept its session {limit:g}s after the kernel fell silent (5.4: lost after "
                   f"interval x liveness = {SCRIPTED_INTERVAL * SCRIPTED_LIVENESS:g}s)")
    check(took >= SCRIPTED_INTERVAL * SCRIPTED_LIVENESS * 0.8,
          f"the peer gave up after {took:.2f}s, before interval x liveness")
    return f"{outcome} after {took:.2f}s"


def _is_hello(header: bytes) -> bool:
    try:
        return msgspec.msgpack.decode(header, type=Header).type == "Hello"
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False


SCENARIOS = [
    Scenario("credentials", "5.1 5.2", "a refused credential ends the attempts", credentials),
    Scenario("handshake", "5.2 5.3 17", "Hello with the contract's types, Ready, served", handshake),
    Scenario("requests", "6.1 6.4 3.1", "ids, one answer each, the stamped requester", requests),
    Scenario("error-codes", "12 6.4", "an error of every code", error_codes),
    Scenario("tag-mismatch", "3.3", "a body tag unlike the header's type", tag_mismatch),
    Scenario("malformed-body", "3.1 6.4", "bodies that do not decode", malformed_body),
    Scenario("tensors", "3.4", "tensors as raw frames", tensors),
    Scenario("events", "7.1 7.2", "subscribe, receive, publish", events),
    Scenario("denials", "8 7.1 7.2", "capability denials of subscriptions and events", denials),
    Scenario("newest-wins", "5.2 5.5 1.3", "the newest connection wins", newest_wins),
    Scenario("hello", "2 3.2 5.1 5.2", "the first message, byte for byte", hello),
    Scenario("heartbeats", "5.4", "heartbeats at the announced interval", heartbeats),
    Scenario("malformed-input", "2 12 13.1 14", "malformed input from the kernel side", malformed_input),
    Scenario("deadlines", "6.3 3.1", "deadlines", deadlines),
    Scenario("bye", "5.5 17 5.1", "Bye on SIGTERM, exit 0, started again", bye),
    Scenario("liveness", "5.4 1.3", "the kernel's silence", liveness),
]
