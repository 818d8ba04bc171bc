"""``busctl``: inspect and steer a running edgebus from the command line.

Connects with the operator credential in ``<run-dir>/credentials/operator``.  Global options
(--run-dir, --bus, --credential-file, -o/--output, --json, --timeout, --deadline) go before
or after the verb; ``busctl`` alone lists the services.

Output: ``-o short`` (default: tables for a person), ``-o json`` (compact, one document a
line: streams such as monitor, sub and top are JSON lines; ``--json`` is the same), ``-o
json-pretty`` (indented).  JSON holds what the human view shows, every field, numbers as
numbers.

Time: ``--timeout`` bounds connecting to the bus (default 5 s), ``--deadline`` each request
(default 10 s; 90 s for start, stop, restart and reload; 120 s for model install; for
``wait``, how long to wait).  A kernel that is not running is seen at once: nothing holds
the lock on ``<run-dir>/kernel.lock``.

Exit status (also in ``busctl --help``):
  0 ok; 1 the request failed (its error says why); 2 usage (bad option, argument or input);
  3 cannot reach the bus (edgebus not running, no credential, connection lost);
  4 no such service or name (unknown-destination); 5 the service is not running or
  cannot take it now (unavailable, overloaded); 6 timeout (the deadline passed);
  7 forbidden (the operator lacks the capability, or is not authenticated).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import anyio
import zmq

from protocols import ProtocolError
from protocols.runtime import ENV_LOG_LEVEL, configure_logging
from services import (
    BusError,
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    Forbidden,
    Overloaded,
    RemoteError,
    Unauthenticated,
    Unavailable,
    UnknownDestination,
    connect,
    endpoint_for_run_dir,
)

from ._busctl_commands import (
    UsageError,
    cmd_attest,
    cmd_audit,
    cmd_call,
    cmd_caps,
    cmd_infer,
    cmd_introspect,
    cmd_list,
    cmd_metrics,
    cmd_model,
    cmd_reload,
    cmd_restart,
    cmd_sched,
    cmd_security,
    cmd_start,
    cmd_status,
    cmd_stop,
    cmd_stream,
    cmd_trust,
    cmd_wait,
)
from ._busctl_completion import SHELLS, completion_script
from ._busctl_live import cmd_monitor, cmd_pub, cmd_sub, cmd_top
from ._busctl_logs import add_logs_verb
from ._busctl_output import OUTPUTS, Output
from ._cli import finish, version

__all__ = ["main", "build_parser", "deadline_of", "EXIT_CODES"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_NO_SUCH, EXIT_UNAVAILABLE, EXIT_TIMEOUT, EXIT_FORBIDDEN = 4, 5, 6, 7
EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_FAILED: "the request failed (its error says why)",
    EXIT_USAGE: "usage: a bad option, argument or input",
    EXIT_UNREACHABLE: "cannot reach the bus (edgebus not running, no credential, connection lost)",
    EXIT_NO_SUCH: "no such service or name (unknown-destination)",
    EXIT_UNAVAILABLE: "the service is not running or cannot take it now (unavailable, overloaded)",
    EXIT_TIMEOUT: "timeout: the deadline passed (wait: the state was not reached in time)",
    EXIT_FORBIDDEN: "forbidden: the operator lacks the capability (or is not authenticated)",
}

CONNECT_TIMEOUT = 5.0
DEADLINE = 10.0
OPERATION_DEADLINE = 90.0
INSTALL_DEADLINE = 120.0


class NotRunning(Exception):
    """No kernel holds the run directory's lock: busctl exits 3 at once."""


# -- reaching the bus --------------------------------------------------------------------------


def _lock_held(lock: Path) -> bool | None:
    """Whether some process holds the flock on ``lock`` (from /proc/locks, which takes no
    lock itself: a kernel starting meanwhile is not disturbed); None when unknown."""
    try:
        st = lock.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in table.splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK":
            continue  # a POSIX lock, or "->" a waiter
        try:
            major, minor, inode = parts[5].split(":")
            if (int(inode), int(major, 16), int(minor, 16)) == (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)):
                return True
        except ValueError:
            continue
    return False


def kernel_pid(run_dir: Path) -> int | None:
    """The pid of the kernel that holds ``run_dir``; NotRunning when none does; None when
    that cannot be told from here (another user's run directory)."""
    lock = run_dir / "kernel.lock"
    hint = ("start it (edgebus boot), or give busctl the run directory it uses "
            "(--run-dir or EDGEBUS_RUN_DIR)")
    if not run_dir.is_dir():
        raise NotRunning(f"edgebus is not running with run directory {run_dir} (there is no such directory); {hint}")
    try:
        text = lock.read_text()
    except FileNotFoundError:
        raise NotRunning(f"edgebus is not running with run directory {run_dir} (no kernel holds {lock}: "
                         f"it does not exist); {hint}") from None
    except OSError:
        return None
    try:
        pid: int | None = int(text.split()[0])
    except (IndexError, ValueError):
        pid = None
    held = _lock_held(lock)
    if held is None and pid is not None:  # no /proc/locks: is the pid it names alive?
        try:
            os.kill(pid, 0)
            held = True
        except ProcessLookupError:
            held = False
        except PermissionError:
            held = True
    if held is False:
        raise NotRunning(f"edgebus is not running with run directory {run_dir} (no kernel holds {lock}"
                         + (f"; the last one was pid {pid}" if pid else "") + f"); {hint}")
    return pid


def _target(args: argparse.Namespace) -> tuple[str, str]:
    """The endpoint and the operator credential: --bus with --credential-file (or
    EDGEBUS_CREDENTIAL_FILE), else the run directory's socket and credentials/operator."""
    if args.bus == "" and args.command != "wait":
        raise UsageError("--bus needs an ENDPOINT (only `busctl wait --bus` takes none)")
    if args.bus:
        endpoint, cred_file = args.bus, args.credential_file or os.environ.get("EDGEBUS_CREDENTIAL_FILE")
        if not endpoint.startswith(("ipc://", "tcp://")):
            raise UsageError(f"--bus {endpoint}: give an endpoint such as ipc:///run/edgebus/bus.sock "
                             "or tcp://HOST:PORT")
        if not cred_file:
            raise UsageError("with --bus, give --credential-file (or EDGEBUS_CREDENTIAL_FILE)")
    else:
        run_dir = args.run_dir or os.environ.get("EDGEBUS_RUN_DIR")
        if not run_dir:
            from kernel import default_dirs

            run_dir = str(default_dirs(None, None)[0])
        args.kernel_pid = kernel_pid(Path(run_dir))
        endpoint = endpoint_for_run_dir(run_dir)
        cred_file = args.credential_file or str(Path(run_dir) / "credentials" / "operator")
    try:
        return endpoint, Path(cred_file).read_text().strip()
    except FileNotFoundError:
        raise ConnectError(endpoint, f"no credential at {cred_file}; is edgebus running with that run directory "
                                     "(it writes the credential once it listens)?") from None
    except PermissionError:
        raise ConnectError(endpoint, f"cannot read {cred_file}: permission denied (run busctl as the kernel's user)") from None
    except OSError as exc:
        raise ConnectError(endpoint, f"cannot read {cred_file}: {exc.strerror}") from None


async def _session(args: argparse.Namespace, out: Output) -> int:
    if args.command == "wait" and args.bus is not None:
        code = await _wait_for_bus(args, out)
        if code or args.name is None:
            return code
    elif args.command == "wait" and args.name is None:
        raise UsageError("busctl wait: give the SERVICE to wait for, or --bus to wait for the bus itself")
    endpoint, credential = _target(args)
    async with connect("busctl", endpoint=endpoint, credential=credential, connect_timeout=args.timeout,
                       reconnect=False) as bus:
        return await args.func(bus, args, out)


async def _wait_for_bus(args: argparse.Namespace, out: Output) -> int:
    """``busctl wait --bus``: until the bus accepts a handshake (a Hello answered with a
    Welcome), at most --timeout seconds.  While the kernel is starting, each attempt finds no
    kernel holding the run directory, no credential yet, or a stale one, or no answer: it is
    tried again 0.05 s later, the pause doubling to 1 s, until the deadline (exit 6)."""
    deadline = time.monotonic() + args.timeout
    pause, why = 0.05, "not tried"
    while True:
        left = deadline - time.monotonic()
        try:
            endpoint, credential = _target(args)
            async with connect("busctl", endpoint=endpoint, credential=credential, reconnect=False,
                               connect_timeout=max(min(left, 5.0), 0.05)) as bus:
                if out.json:
                    out.emit({"endpoint": endpoint, "name": bus.name})
                return EXIT_OK
        except (NotRunning, ConnectError, ConnectionLost) as exc:
            why = str(exc)
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"busctl: the bus did not accept a handshake within {args.timeout:g}s: {why}", file=sys.stderr)
            return EXIT_TIMEOUT
        await anyio.sleep(min(pause, left))
        pause = min(pause * 2, 1.0)


# -- the command line --------------------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text}: give a number of seconds > 0")
    return value


def _add_globals(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every verb takes, before or after it: on the main parser with their
    defaults, on each verb's parser with default=SUPPRESS, so that an option given before
    the verb is not reset by the verb's parser."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    g = parser.add_argument_group("global options (before or after the verb)")
    g.add_argument("--run-dir", metavar="DIR", default=default(None),
                   help="the kernel's run directory (default: $EDGEBUS_RUN_DIR, else the default of edgebus boot)"
                   ).complete = "dir"  # type: ignore[attr-defined]
    g.add_argument("--bus", metavar="ENDPOINT", nargs="?", const="", default=default(None),
                   help="a bus endpoint instead of the run directory's, e.g. ipc:///run/edgebus/bus.sock "
                        "(needs --credential-file); `wait --bus` without one waits for the run directory's bus")
    g.add_argument("--credential-file", metavar="FILE", default=default(None),
                   help="the credential to present (default: RUN_DIR/credentials/operator, or "
                        "$EDGEBUS_CREDENTIAL_FILE with --bus)").complete = "file"  # type: ignore[attr-defined]
    g.add_argument("-o", "--output", choices=OUTPUTS, default=default("short"),
                   help="short: tables for a person (default); json: compact JSON, one document a line "
                        "(streams are JSON lines); json-pretty: indented JSON")
    g.add_argument("--json", dest="output", action="store_const", const="json", default=default("short"),
                   help="the same as -o json")
    g.add_argument("--timeout", type=_seconds, metavar="SECONDS", default=default(CONNECT_TIMEOUT),
                   help=f"how long connecting to the bus may take (default {CONNECT_TIMEOUT:g})")
    g.add_argument("--deadline", type=_seconds, metavar="SECONDS", default=default(None),
                   help=f"how long the request may take (default {DEADLINE:g}; {OPERATION_DEADLINE:g} for start, "
                        f"stop, restart and reload; {INSTALL_DEADLINE:g} for model install; wait: how long to wait)")


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit status:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items()) + (
        "\n\nbusctl VERB --help tells more of a verb. Without a verb, busctl lists the services.")
    parser = argparse.ArgumentParser(prog="busctl", description="Inspect and steer a running edgebus.",
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version("busctl"), help="print the version and exit")
    _add_globals(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _add_globals(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="VERB", title="verbs")

    def verb(name: str, func: Callable[..., Any], text: str, deadline: float = DEADLINE) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text[:1].upper() + text[1:] + ".")
        p.set_defaults(func=func, verb_deadline=deadline)
        return p

    def service(p: argparse.ArgumentParser, name: str = "name", text: str = "the service's name") -> None:
        p.add_argument(name, metavar=name.upper(), help=text).complete = "service"  # type: ignore[attr-defined]

    verb("list", cmd_list, "services, their state, pid and restarts (also: busctl alone)")
    service(verb("status", cmd_status, "one service in detail, and its last log lines"))
    add_logs_verb(verb)
    p = verb("call", cmd_call, "send a request and print the reply: call SERVICE TYPE [JSON]")
    service(p, "service", "the service to call")
    p.add_argument("type", metavar="TYPE", help="the request's message type, e.g. Greet")
    p.add_argument("body", metavar="JSON", nargs="?", default="{}",
                   help="the request's fields as a JSON object (default {}; - reads it from standard input)")
    service(verb("introspect", cmd_introspect, "a service's message types and schemas"), "service",
            "the service to describe")
    for name, func, text in (
            ("start", cmd_start, "start a service and wait until it is ready (deadline 90 s)"),
            ("stop", cmd_stop, "stop a service; it stays stopped (deadline 90 s)"),
            ("restart", cmd_restart, "restart a service, and its dependents under rest_for_one (deadline 90 s)")):
        service(verb(name, func, text, OPERATION_DEADLINE))
    verb("reload", cmd_reload, "re-read the config file, as SIGHUP does (deadline 90 s)", OPERATION_DEADLINE)
    p = verb("wait", cmd_wait, "wait until a service is in a state, at most --deadline seconds (exit 6 if not); "
                               "wait --bus: until the bus accepts a handshake, at most --timeout seconds")
    p.add_argument("name", metavar="NAME", nargs="?", help="the service's name (none with --bus: only the bus)"
                   ).complete = "service"  # type: ignore[attr-defined]
    p.add_argument("--state", default="ready", help="the state to wait for (default ready)",
                   choices=["waiting", "starting", "ready", "stopping", "stopped", "backoff", "failed"])
    p = verb("caps", cmd_caps, "the capability table (origin, expiry; '!' marks a revocation); "
                               "caps grant|revoke|reset NAME CAP")
    p.add_argument("words", nargs="*", metavar="ARG",
                   help="NAME (one principal), or grant NAME CAP, revoke NAME CAP, reset NAME CAP"
                   ).complete = "grant revoke reset service"  # type: ignore[attr-defined]
    p.add_argument("--ttl", type=float, metavar="SECONDS",
                   help="with grant: seconds (> 0) until the grant expires; without: until revoked or reset")
    p = verb("audit", cmd_audit, "the audit log: tail, verify")
    p.add_argument("action", choices=["tail", "verify"], help="tail: the last records; verify: check the hash chain")
    p.add_argument("-n", type=int, default=20, metavar="N", help="with tail: how many records (default 20)")
    p = verb("trust", cmd_trust, "trusted signing keys (model bundles, fleet documents): add, remove, list")
    p.add_argument("action", choices=["add", "remove", "list"], help="what to do with the trust store")
    p.add_argument("key", nargs="?", help="add: an ed25519 public key (hex); remove: a key id")
    p.add_argument("--label", help="with add: a name for the key")
    p.add_argument("--role", choices=["model", "fleet"], default="model",
                   help="with add: what the key may sign: model bundles (default) or fleet deployment documents")
    p = verb("attest", cmd_attest, "a signed attestation report (JSON)")
    p.add_argument("--nonce", help="a verifier's challenge to include in the report")
    p = verb("security", cmd_security, "CURVE keys of tcp peers: security list [NAME] | enroll NAME KEY "
                                       "| unenroll NAME | reset NAME")
    p.add_argument("action", choices=["list", "enroll", "unenroll", "reset"],
                   help="list: each key and where it comes from; enroll: let NAME connect over tcp with KEY; "
                        "unenroll: no longer (its session ends); reset: back to what the configuration says")
    p.add_argument("name", metavar="NAME", nargs="?", help="a service configured without a command"
                   ).complete = "service"  # type: ignore[attr-defined]
    p.add_argument("public_key", metavar="KEY", nargs="?", help="with enroll: its CURVE public key (40 Z85 characters)")
    p = verb("model", cmd_model, "model bundles in the model store (install's deadline: 120 s)")
    p.add_argument("action", choices=["list", "install", "activate", "rollback", "split", "remove", "inspect", "asset"],
                   help="list | install BUNDLE | activate NAME VERSION | activate NAME [VERSION] variant VARIANT "
                        "(a trial of that variant of the active version) | rollback NAME | split NAME V=W... "
                        "| split NAME variants VARIANT=W... (A/B across the active version's variants) "
                        "| remove NAME VERSION | inspect NAME [VERSION] | asset NAME ASSET [FILE] (an asset of the "
                        "active version; no FILE: to standard output)")
    p.add_argument("words", nargs="*", metavar="ARG", help="the action's arguments"
                   ).complete = "file"  # type: ignore[attr-defined]
    p = verb("infer", cmd_infer, "run a model on its inputs (.npy, image, .wav files; numbers) and show its "
                                 "outputs (large ones summarised, text as strings)")
    p.add_argument("model", metavar="MODEL", help="the model's name")
    p.add_argument("--input", action="append", default=[], metavar="[NAME=]FILE",
                   help="an input of the model by name (once for each; without NAME: the first input not named, "
                        "in the model's order): a .npy array; an image (PNG, JPEG...: uint8 [H, W, 3] RGB, as the "
                        "model's pre ops take it); a .wav file (8/16/24/32-bit integer PCM, the first channel: "
                        "float32 [samples] in [-1, 1], not resampled). A batch axis of 1 is added where the "
                        "model's input has one and the array one axis fewer; floats are cast to the input's float type"
                   ).complete = "file"  # type: ignore[attr-defined]
    p.add_argument("--value", action="append", default=[], metavar="NAME=NUMBER[:DTYPE]",
                   help="a scalar input, e.g. sr=16000 (dtype: the model's for that input, else int64 for a "
                        "whole number and float32 for another)")
    p.add_argument("--only", action="append", default=[], metavar="OUTPUT",
                   help="send back only this output (once for each; default: all of them). "
                        "(-o/--output is busctl's output format)")
    p.add_argument("--variant", help="run this variant of the model (e.g. int8; default: the scheduler's pick)")
    p.add_argument("--version", help="a version of the model (default: the active one, or the split's pick)")
    p.add_argument("--priority", type=int, default=1, choices=[0, 1, 2],
                   help="0 high, 1 normal (default), 2 low")
    p.add_argument("--key", help="a request key for sticky A/B assignment")
    p.add_argument("--batch", action="store_true",
                   help="add a batch axis of 1 to every input that has one, whatever the array's rank")
    p = verb("stream", cmd_stream, "stream a .wav file through a stateful model (one whose manifest declares "
                                   "states) chunk by chunk, as fast as the answers come or in real time, and print "
                                   "each chunk's outputs and a latency summary")
    p.add_argument("model", metavar="MODEL", help="the model's name")
    p.add_argument("--input", required=True, metavar="FILE.wav",
                   help="a .wav file (8/16/24/32-bit integer PCM; the first channel, float32 in [-1, 1], not "
                        "resampled)").complete = "file"  # type: ignore[attr-defined]
    p.add_argument("--topic", metavar="TOPIC", help="also publish each chunk's result on this topic "
                                                    "(under results., e.g. results.vad.mic-1)")
    p.add_argument("--realtime", action="store_true",
                   help="send one chunk per chunk period, as a microphone would (default: as fast as answers come)")
    p.add_argument("--chunk", type=int, metavar="N",
                   help="samples per chunk (default: the model's fixed chunk size, else 512; the last chunk is "
                        "zero-padded)")
    p.add_argument("--value", action="append", default=[], metavar="NAME=NUMBER[:DTYPE]",
                   help="a parameter of the stream, fixed for its life, e.g. sr=16000:int64 (a model's int64 "
                        "scalar sr, when not given: the file's sample rate)")
    p.add_argument("--only", action="append", default=[], metavar="OUTPUT",
                   help="send back only this output (once for each; default: all but the states)")
    p.add_argument("--version", help="a version of the model (default: the active one, or the split's pick)")
    verb("sched", cmd_sched, "scheduler queues, batches, drivers, degradation")
    verb("metrics", cmd_metrics, "every service's metrics (Prometheus text; JSON: families and samples)")
    p = verb("top", cmd_top, "live view: services, message rates, CPU, memory, queues (q quits)")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between screens (default 1)")
    p.add_argument("--iterations", type=int, default=0, metavar="N", help="stop after N screens (default 0: until q or ^C)")
    p = verb("monitor", cmd_monitor, "watch the traffic the kernel routes, with decoded bodies")
    p.add_argument("--service", metavar="NAME", help="only messages from or to this service"
                   ).complete = "service"  # type: ignore[attr-defined]
    p.add_argument("--type", metavar="TYPE", help="only this message type")
    p.add_argument("--topic", metavar="PREFIX", help="only events whose topic starts with this")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="exit after N messages (default 0: never)")
    p.add_argument("--full", action="store_true", help="show whole bodies (default: cut to the terminal's width)")
    p = verb("pub", cmd_pub, "publish an event: pub TOPIC TYPE [JSON]")
    p.add_argument("topic", metavar="TOPIC", help="the topic, e.g. alerts.test")
    p.add_argument("type", metavar="TYPE", help="the event's message type, e.g. Tick")
    p.add_argument("body", metavar="JSON", nargs="?", default="{}",
                   help="the event's fields as a JSON object (default {}; - reads it from standard input)")
    p = verb("sub", cmd_sub, "print the events on topics starting with PREFIX as they come")
    p.add_argument("prefixes", nargs="+", metavar="PREFIX", help="a topic prefix ('' for every topic you may see)")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="exit after N events (default 0: never)")
    p.add_argument("--full", action="store_true", help="show whole bodies (default: cut to the terminal's width)")
    p = sub.add_parser("completion", help="print a shell completion script: completion bash|zsh",
                       description="Print a completion script for bash or zsh. Load it with "
                                   "`source <(busctl completion bash)`; see the script's first lines to install it.")
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    p.set_defaults(func=None, verb_deadline=DEADLINE)
    return parser


# -- running a command -------------------------------------------------------------------------


def deadline_of(args: argparse.Namespace) -> float:
    """The request's deadline: --deadline, else the verb's own default."""
    if args.deadline is not None:
        return float(args.deadline)
    if args.command == "model" and args.action == "install":
        return INSTALL_DEADLINE
    return float(args.verb_deadline)


def _lone(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _failure(exc: BaseException, command: str) -> tuple[int, str] | None:
    """The exit status and message for a failure busctl explains; None for others."""
    match exc:
        case UsageError():
            return EXIT_USAGE, str(exc)
        case NotRunning() | ConnectError() | ConnectionLost():
            return EXIT_UNREACHABLE, str(exc)
        case UnknownDestination():
            code = EXIT_NO_SUCH
        case Unavailable() | Overloaded():
            code = EXIT_UNAVAILABLE
        case DeadlineExceeded():
            code = EXIT_TIMEOUT
        case Forbidden() | Unauthenticated():
            code = EXIT_FORBIDDEN
        case RemoteError():
            code = EXIT_FAILED
        case BusError():
            return EXIT_UNREACHABLE, str(exc)
        case ProtocolError():
            return EXIT_FAILED, f"{command} failed: the answer {exc}"
        case zmq.ZMQError():
            return EXIT_UNREACHABLE, f"cannot reach the bus: {exc}"
        case _:
            return None
    missing = f" (missing capability {exc.capability})" if isinstance(exc, Forbidden) and exc.capability \
        and exc.capability not in str(exc) else ""
    return code, f"{command} failed: {exc}{missing}"


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if (extras and args.command == "security" and args.action == "enroll" and args.public_key is None
            and len(extras) == 1 and len(extras[0]) == 40):
        # A Z85 key may begin with "-", which argparse takes for an unknown option
        args.public_key = extras.pop()
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if args.command is None:  # as systemctl: no verb lists
        args.command, args.func, args.verb_deadline = "list", cmd_list, DEADLINE
    if args.command == "completion":
        sys.stdout.write(completion_script(parser, args.shell))
        return EXIT_OK
    args.deadline = deadline_of(args)
    configure_logging("busctl", level=os.environ.get(ENV_LOG_LEVEL) or "error", json=False)
    out = Output(args.output)
    try:
        return anyio.run(_session, args, out)
    except Exception as raised:  # a failure busctl explains in one line, or re-raised as it is
        exc = _lone(raised)
        failure = _failure(exc, args.command)
        if failure is None:
            if exc is raised:
                raise
            raise exc from None
        code, message = failure
        print(f"busctl: {message}", file=sys.stderr)
        return code


def main(argv: list[str] | None = None) -> None:
    finish("busctl", lambda: _run(argv))


if __name__ == "__main__":
    main()
