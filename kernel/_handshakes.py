"""CURVE handshakes that fail before the ZAP handler is asked.

The ZAP handler (_kernel.py) sees, logs and audits every handshake with a key that is not
enrolled.  A peer whose keys do not match (an enrolled public key used with another secret
key, or the wrong server key) fails earlier, in libzmq's CURVE exchange: only the router
socket's events tell.  They are read here, on the event loop, and logged and audited like a
key that is not enrolled (summarised: the 1st, 10th, 100th... of each kind and of all).
The events name no key (libzmq has not learnt a trustworthy one) and no peer address.
"""

from __future__ import annotations

from collections.abc import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from protocols.runtime import get_logger
from protocols.transport import AsyncSocket

from ._boundary import Audit, Command
from ._core import Summary

__all__ = ["monitor_handshakes", "watch_handshakes"]

log = get_logger(component="kernel")

_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: (
        "the CURVE handshake failed: the peer's keys do not match (a public key used with another "
        "secret key, or not this kernel's server key)"),
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: (
        "the peer does not speak CURVE (the tcp endpoint takes CURVE only, never NULL or PLAIN)"),
}


def monitor_handshakes(sock: zmq.Socket) -> zmq.Socket:
    """A monitor socket for ``sock``'s failed handshakes.  Call before the router thread
    takes ``sock`` over (zmq sockets are not shared between threads)."""
    return sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


async def watch_handshakes(monitor: zmq.Socket, submit: Callable[[Command], None]) -> None:
    """Log and audit (through ``submit``: the router publishes on kernel.audit) each failed
    CURVE handshake on the tcp endpoint, until cancelled; closes ``monitor`` then."""
    failures = Summary()
    asock = AsyncSocket(monitor)
    try:
        while True:
            event = parse_monitor_message(await asock.recv())
            endpoint = event["endpoint"].decode(errors="replace")
            if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL or not endpoint.startswith("tcp://"):
                continue  # the ipc endpoint has no CURVE: garbage there is counted by the router
            value = int(event["value"])
            reason = _REASONS.get(value, f"the CURVE handshake failed (ZMTP protocol error 0x{value:x})")
            count = failures.count(value)
            if count:
                log.warning("authentication_failed", mechanism="CURVE", endpoint=endpoint, reason=reason,
                            count=count, total=failures.total)
            submit(Audit("authentication-failed", "tcp peer", reason))
    finally:
        asock.close()
