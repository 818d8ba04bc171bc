"""Bus benchmark: the kernel's cost against raw pyzmq with no broker, side by side.

    python -m tools.bench_bus [--runs 5] [--out bench-results/bus.json] [--sdk-only] [--sdk-old DIR]

Three set-ups, measured in one run, alternating, ``--runs`` times each, medians reported;
each ratio is the median over runs of the set-up's figure over raw pyzmq's in the same run:

* ``raw``:     client DEALER <-> echo ROUTER, no broker (the baseline);
* ``relay``:   the same through a minimal Python ROUTER relay (swaps routing frames);
* ``edgebus``: client and echo service on the bus: HELLO-authenticated, every message
               capability-checked, sender-stamped and id-rewritten by the kernel;
* ``sdk-asyncio``, ``sdk-trio``: the same through the kernel, but both ends written with the
               SDK as users write them (``connect``, ``bus.call``, an ``on_request``
               handler: tools/_bench_sdk.py), each in its own process, on asyncio and on
               trio; compared with the idiomatic raw ends.  ``--sdk-old DIR`` adds
               ``old-sdk-*``: the SDK of another checkout (``git worktree add DIR REV``),
               measured in the same run; ``--sdk-only`` skips the rest.

Both ends are minimal Python loops written the same way in every set-up, in two styles:
``idiomatic`` (``send_multipart``/``recv_multipart``, as most pyzmq code is written; the
issue's reference figures were taken this way) and ``tuned`` (protocols.transport's
``recv_frames``/``send_frames``, as the edgebus SDK and kernel do: one call per message, in C
where protocols._native is built).  Measures:

* round trip:  one small request at a time, median and p99 latency;
* pipelined:   a window of 200 outstanding small requests, requests per second (SDK ends:
               200 tasks each calling in a loop); and the kernel's CPU time (router and
               I/O threads) per routed message while minimal ends pipeline;
* tensor:      a 4 MiB frame there and back (copy=False on both ends); the kernel forwards
               the frame it received, so Python never copies the payload.  GB/s, and
               the kernel's CPU time per routed MiB;
* capability check: cost per check with 1,000 rules, uncached and through the per-peer
               cache that the per-message path uses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import msgspec
import zmq

from protocols import SIGNATURE, Codec, Header, Hello, Kind, Ready
from protocols.transport import recv_frames, send_frames
from tools._benchkit import write_results

SMALL = b"x" * 64
TENSOR = 4 * 1024 * 1024
STYLES = ("idiomatic", "tuned")
SETUPS = ("raw", "relay", "edgebus")
#: SDK ends (tools/_bench_sdk.py: connect(), call(), an on_request handler) on each backend
SDK_SETUPS = ("sdk-asyncio", "sdk-trio")

BENCH_CONFIG = """
[bus]
# Long heartbeats: the minimal loops below do not answer them.
heartbeat_interval = 60.0
queue_limit = 100000
max_pending = 100000
tcp_endpoint = "{tcp}"

[services.echo-curve]
curve_public_key = "{echo_key}"

[services.client-curve]
capabilities = ["call:echo-curve.Echo"]
curve_public_key = "{client_key}"

[services.echo-idiomatic]
[services.echo-tuned]

[services.client-idiomatic]
capabilities = ["call:echo-idiomatic.Echo"]

[services.client-tuned]
capabilities = ["call:echo-tuned.Echo"]

[services.echo-sdk]
[services.client-sdk]
capabilities = ["call:echo-sdk.Echo"]
"""


def io(style: str) -> tuple[Callable[[zmq.Socket, list[Any]], None], Callable[[zmq.Socket], list[Any]]]:
    if style == "tuned":
        return send_frames, recv_frames
    return (lambda sock, parts: sock.send_multipart(parts, copy=False)), (lambda sock: sock.recv_multipart())


def _socket(kind: int) -> zmq.Socket:
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


# -- servers (child processes) ---------------------------------------------------------------


def serve_raw(endpoint: str, style: str) -> None:
    send, recv = io(style)
    sock = _socket(zmq.ROUTER)
    sock.bind(endpoint)
    print("ready", flush=True)
    while True:
        send(sock, recv_frames(sock, small=1) if style == "tuned" else recv(sock))  # payload zero-copy


def serve_relay(endpoint: str, style: str) -> None:
    """A minimal Python ROUTER relay: [from, to, payload] in, [to, from, payload] out."""
    send, recv = io(style)
    sock = _socket(zmq.ROUTER)
    sock.bind(endpoint)
    print("ready", flush=True)
    while True:
        parts = recv_frames(sock, small=2) if style == "tuned" else recv(sock)
        parts[0], parts[1] = parts[1], parts[0]
        send(sock, parts)


def serve_relay_echo(endpoint: str, style: str) -> None:
    send, recv = io(style)
    sock = _socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"echo")
    sock.connect(endpoint)
    # Ready once the relay can route to us: a message addressed to ourselves comes back.
    # (Until the relay has our connection it drops what is addressed to us, and a client
    # request sent then would be lost.)
    while True:
        send(sock, [b"echo", b"ping"])
        if sock.poll(100):
            recv(sock)
            break
    print("ready", flush=True)
    while True:
        send(sock, recv_frames(sock, small=1) if style == "tuned" else recv(sock))  # [client, payload] back


def serve_bus(endpoint: str, style: str, credential_file: str, name: str = "", curve_file: str = "") -> None:
    credential = Path(credential_file).read_text() if credential_file != "-" else ""
    send, recv = io(style)
    sock = _socket(zmq.DEALER)
    if curve_file:
        _set_curve(sock, json.loads(Path(curve_file).read_text()))
    sock.connect(endpoint)
    codec = Codec()
    send(sock, codec.pack(Header(kind=Kind.CONTROL, type="Hello", id=1),
                          Hello(service=name or f"echo-{style}", credential=credential, types=["Echo"])))
    recv(sock)
    send(sock, codec.pack(Header(kind=Kind.CONTROL, type="Ready"), Ready()))
    print("ready", flush=True)
    enc = msgspec.msgpack.Encoder().encode
    dec = msgspec.msgpack.Decoder(Header).decode
    while True:
        frames = recv(sock)
        hdr = dec(frames[1])
        if hdr.kind != Kind.REQUEST:
            continue
        frames[1] = enc(Header(kind=Kind.REPLY, type="Echoed", id=hdr.id))
        send(sock, frames)


# -- clients ------------------------------------------------------------------------------------


def _set_curve(sock: zmq.Socket, keys: dict[str, str]) -> None:
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys["server"].encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys["public"].encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys["secret"].encode())


class Client:
    def __init__(self, endpoint: str, style: str, curve: dict[str, str] | None = None) -> None:
        self.send, self.recv = io(style)
        self.sock = _socket(zmq.DEALER)
        if curve:
            _set_curve(self.sock, curve)
        self.sock.connect(endpoint)

    def frames(self, payload: Any, i: int) -> list[Any]:
        return [payload]


class RelayClient(Client):
    def __init__(self, endpoint: str, style: str) -> None:
        super().__init__(endpoint, style)
        self.sock.setsockopt(zmq.IDENTITY, f"client-{style}".encode())
        self.sock.disconnect(endpoint)
        self.sock.connect(endpoint)

    def frames(self, payload: Any, i: int) -> list[Any]:
        return [b"echo", payload]


class EdgebusClient(Client):
    def __init__(self, endpoint: str, style: str, credential: str, name: str = "", dest: str = "",
                 curve: dict[str, str] | None = None) -> None:
        super().__init__(endpoint, style, curve)
        codec = Codec()
        self.send(self.sock, codec.pack(Header(kind=Kind.CONTROL, type="Hello", id=1),
                                        Hello(service=name or f"client-{style}", credential=credential)))
        hdr, body, _ = codec.unpack(self.recv(self.sock))
        assert hdr.kind == Kind.REPLY, msgspec.msgpack.decode(body)
        self.enc = msgspec.msgpack.Encoder().encode
        self.body = msgspec.msgpack.encode({"type": "Echo"})
        self.dest = dest or f"echo-{style}"

    def frames(self, payload: Any, i: int) -> list[Any]:
        return [SIGNATURE, self.enc(Header(kind=Kind.REQUEST, type="Echo", dest=self.dest, id=i)), self.body, payload]


def round_trip(client: Client, n: int, payload: Any = SMALL) -> list[float]:
    sock, send, recv = client.sock, client.send, client.recv
    times = []
    for i in range(n):
        msg = client.frames(payload, i + 1)
        t0 = time.perf_counter()
        send(sock, msg)
        recv(sock)
        times.append(time.perf_counter() - t0)
    return times


def pipelined(client: Client, n: int, window: int = 200) -> float:
    sock, send, recv = client.sock, client.send, client.recv
    sent = received = 0
    t0 = time.perf_counter()
    while received < n:
        while sent < n and sent - received < window:
            sent += 1
            send(sock, client.frames(SMALL, sent))
        recv(sock)
        received += 1
    return n / (time.perf_counter() - t0)


def tensor_round_trip(client: Client, n: int) -> list[float]:
    """copy=False both ways in every style: nobody copies 4 MiB on purpose."""
    sock = client.sock
    frame = zmq.Frame(bytes(TENSOR))
    times = []
    for i in range(n):
        msg = client.frames(frame, i + 1)
        t0 = time.perf_counter()
        sock.send_multipart(msg, copy=False)
        sock.recv_multipart(copy=False)
        times.append(time.perf_counter() - t0)
    return times


# -- orchestration ------------------------------------------------------------------------------


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "tools.bench_bus", *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", args
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def capability_check_cost() -> dict[str, float]:
    from kernel import CapabilitySet

    rules = ([f"call:svc{i}.Type{i}" for i in range(500)] + [f"publish:topic{i}.*" for i in range(499)]
             + ["call:echo.*"])
    caps = CapabilitySet(rules)
    n = 200_000
    pairs = [(f"svc{i % 500}", f"Type{i % 500}") for i in range(1000)]
    t0 = time.perf_counter()
    for i in range(n):
        dest, typ = pairs[i % 1000]
        caps.allows("call", f"{dest}.{typ}")
    uncached = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for i in range(n // 10):
        caps.allows("publish", f"topic{i % 499}.x")
    wild = (time.perf_counter() - t0) / (n // 10)
    # exactly the router's per-message path: one dict lookup keyed by (service, type)
    calls: dict[tuple[str, str], bool] = {}
    t0 = time.perf_counter()
    for i in range(n):
        key = pairs[i % 1000]
        ok = calls.get(key)
        if ok is None:
            ok = calls[key] = caps.allows("call", f"{key[0]}.{key[1]}")
    cached = (time.perf_counter() - t0) / n
    return {"rules": len(rules), "uncached_us": uncached * 1e6, "wildcard_uncached_us": wild * 1e6,
            "cached_us": cached * 1e6}


def inproc_zero_copy(n: int = 200) -> dict[str, Any]:
    """The router in this process on an inproc endpoint, where libzmq passes buffers by
    reference: a 4 MiB tensor's round trip costs the same as a tiny message's, and the echo
    service receives the client's own buffer (same address), if and only if nothing on
    the path copies the payload."""
    from kernel import BusConfig, CapabilitySet, Principal, Router

    ctx = zmq.Context()
    client_p, echo_p = Principal("client", CapabilitySet(["call:echo.*"])), Principal("echo", CapabilitySet([]))
    router = Router("inproc://bench-bus", BusConfig(heartbeat_interval=60.0), [client_p, echo_p], ctx=ctx)
    with router.running():
        return _inproc_round_trips(ctx, client_p, echo_p, n)


def _inproc_round_trips(ctx: zmq.Context, client_p: Any, echo_p: Any, n: int) -> dict[str, Any]:
    import threading

    import numpy as np

    codec = Codec()

    def peer(name: str, cred: str, types: list[str]) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect("inproc://bench-bus")
        send_frames(sock, codec.pack(Header(kind=Kind.CONTROL, type="Hello", id=1),
                                     Hello(service=name, credential=cred, types=types)))
        recv_frames(sock)
        return sock

    echo = peer("echo", echo_p.credential, ["Echo"])
    seen: list[int] = []

    def serve() -> None:
        enc = msgspec.msgpack.Encoder().encode
        while True:
            frames = recv_frames(echo, small=3)
            hdr = msgspec.msgpack.decode(frames[1], type=Header)
            if hdr.kind == Kind.REQUEST:
                if len(seen) < 1:
                    seen.append(np.frombuffer(frames[3].buffer, np.uint8).__array_interface__["data"][0])
                frames[1] = enc(Header(kind=Kind.REPLY, type="Echoed", id=hdr.id))
                send_frames(echo, frames)
            elif hdr.type == "Bye":
                return

    send_frames(echo, codec.pack(Header(kind=Kind.CONTROL, type="Ready"), Ready()))
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = EdgebusClient.__new__(EdgebusClient)
    Client.__init__(client, "inproc://bench-bus", "tuned")
    client.sock.close(0)
    client.sock = peer("client", client_p.credential, [])
    client.enc, client.body, client.dest = msgspec.msgpack.Encoder().encode, msgspec.msgpack.encode({"type": "Echo"}), "echo"
    result: dict[str, Any] = {}
    for label, size in (("small", 64), ("tensor", TENSOR)):
        arr = np.ones(size, dtype=np.uint8)
        frame = zmq.Frame(arr, copy=False)
        for _ in range(20):  # until echo's Ready has been routed, then warm
            send_frames(client.sock, client.frames(frame, 1))
            recv_frames(client.sock, small=3)
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            send_frames(client.sock, client.frames(frame, i + 2))
            recv_frames(client.sock, small=3)
            times.append(time.perf_counter() - t0)
        result[f"{label}_rtt_us"] = statistics.median(times) * 1e6
        if label == "tensor":
            result["tensor_gbps"] = 2 * size / statistics.median(times) / 1e9
            result["same_buffer_at_the_service"] = bool(seen) and seen[0] == arr.__array_interface__["data"][0]
        seen.clear()
    return result


class _Done(Exception):
    """--sdk-only: the rest of the benchmark is skipped."""


def sdk_run(setup: str, bus_ep: str, creds: Path, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """SDK echo service and SDK client (tools/_bench_sdk.py), each in its own process on the
    backend the set-up names; ``old-`` set-ups import the SDK from --sdk-old."""
    backend = setup.rsplit("-", 1)[1]
    root = args.sdk_old if setup.startswith("old-") else str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root, "EDGEBUS_LOG_LEVEL": "warning"}
    script = str(Path(__file__).resolve().parent / "_bench_sdk.py")
    server = subprocess.Popen([sys.executable, script, "serve", bus_ep, str(creds / "echo-sdk"), backend],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready", setup
        out = subprocess.run([sys.executable, script, "client", bus_ep, str(creds / "client-sdk"), backend,
                              str(args.rtt_n), str(args.pipe_n), str(args.window)],
                             capture_output=True, text=True, env=env, timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"{setup} client failed:\n{out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.kill()
        server.wait()


def _ratio(series: dict[str, list[float]], setup: str, base: str = "raw") -> float:
    """The median over runs of ``setup`` / ``base``, each run against the figure of the same
    run (the machine's speed drifts between runs more than set-ups differ within one)."""
    return statistics.median(x / r for x, r in zip(series[setup], series[base]))


def sdk_summary(results: dict[str, dict[str, list[float]]], sdk_setups: list[str]) -> dict[str, Any]:
    """Medians of the SDK set-ups and their ratios to raw pyzmq (idiomatic ends), printed."""
    out: dict[str, Any] = {}
    if not sdk_setups or not results["rtt_us"]["raw"]:
        return out
    raw = {k: statistics.median(results[k]["raw"]) for k in ("rtt_us", "rtt_p99_us", "pipelined_rps")}
    relay = {k: statistics.median(results[k]["relay"]) for k in raw}
    print("\nSDK ends (connect/call/on_request) through the kernel, against raw pyzmq (idiomatic ends)")
    print(f"{'set-up':<18} {'rtt us':>9} {'x raw':>7} {'p99 us':>9} {'pipelined/s':>12} {'% raw':>7}")
    for name, key, med in (("raw pyzmq", "raw", raw), ("python relay", "relay", relay)):
        print(f"{name:<18} {med['rtt_us']:>9.1f} {_ratio(results['rtt_us'], key):>7.2f} {med['rtt_p99_us']:>9.1f} "
              f"{med['pipelined_rps']:>12.0f} {100 * _ratio(results['pipelined_rps'], key):>6.1f}%")
    out["raw"], out["relay"] = raw, relay
    for setup in sdk_setups:
        med = {k: statistics.median(results[k][setup]) for k in raw}
        med["rtt_ratio"] = _ratio(results["rtt_us"], setup)
        med["pipelined_share"] = _ratio(results["pipelined_rps"], setup)
        med["runs"] = {k: results[k][setup] for k in raw}
        out[setup] = med
        print(f"{setup:<18} {med['rtt_us']:>9.1f} {med['rtt_ratio']:>7.2f} {med['rtt_p99_us']:>9.1f} "
              f"{med['pipelined_rps']:>12.0f} {100 * med['pipelined_share']:>6.1f}%")
    for backend in ("", "old-"):
        asyncio_, trio_ = f"{backend}sdk-asyncio", f"{backend}sdk-trio"
        if asyncio_ in out and trio_ in out:
            rtt = _ratio(results["rtt_us"], trio_, asyncio_)
            pipe = _ratio(results["pipelined_rps"], asyncio_, trio_)
            out[f"{backend}trio_vs_asyncio"] = {"rtt": rtt, "pipelined": pipe}
            print(f"{backend}trio / asyncio: round trip {rtt:.2f}x, pipelined {pipe:.2f}x slower")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_bus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rtt-n", type=int, default=3000)
    parser.add_argument("--pipe-n", type=int, default=30000)
    parser.add_argument("--tensor-n", type=int, default=40)
    parser.add_argument("--out", default="bench-results/bus.json")
    parser.add_argument("--sdk-only", action="store_true",
                        help="only the SDK set-ups next to raw pyzmq and the relay (idiomatic ends)")
    parser.add_argument("--sdk-old", metavar="DIR",
                        help="also measure the SDK of another checkout (e.g. a git worktree of an older commit)")
    parser.add_argument("--window", type=int, default=200, help="outstanding requests when pipelined")
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        what, *rest = args.serve
        {"raw": serve_raw, "relay": serve_relay, "relay-echo": serve_relay_echo, "bus": serve_bus}[what](*rest)
        return

    tmp = Path(tempfile.mkdtemp(prefix="edgebus-bench-"))
    run_dir = tmp / "run"
    echo_pub, echo_sec = zmq.curve_keypair()
    client_pub, client_sec = zmq.curve_keypair()
    tcp = f"tcp://127.0.0.1:{_free_port()}"
    (tmp / "bench.toml").write_text(BENCH_CONFIG.format(tcp=tcp, echo_key=echo_pub.decode(),
                                                        client_key=client_pub.decode()))
    log = open(tmp / "kernel.log", "w")
    kernel = subprocess.Popen([str(Path(sys.executable).parent / "edgebus"), "boot", "--config",
                               str(tmp / "bench.toml"), "--run-dir", str(run_dir)], stdout=log, stderr=log,
                              env={**os.environ, "EDGEBUS_LOG_LEVEL": "warning"})
    children: list[subprocess.Popen[Any]] = [kernel]
    try:
        deadline = time.monotonic() + 20
        while not (run_dir / "credentials" / "operator").exists() or not (run_dir / "bus.curve.pub").exists():
            if time.monotonic() > deadline or kernel.poll() is not None:
                raise SystemExit(f"edgebus did not start; see {tmp / 'kernel.log'}")
            time.sleep(0.05)
        kpid = int((run_dir / "kernel.lock").read_text().split()[0])
        bus_ep = f"ipc://{run_dir / 'bus.sock'}"
        creds = run_dir / "credentials"

        def start(setup: str, style: str) -> tuple[Client, list[subprocess.Popen[Any]]]:
            """Only the servers of the set-up being measured run: idle extra processes and
            sockets were seen to cost up to 40% of pipelined throughput on 2 cores."""
            if setup == "raw":
                ep = f"ipc://{tmp}/raw-{style}.sock"
                return Client(ep, style), [_spawn(["--serve", "raw", ep, style])]
            if setup == "relay":
                ep = f"ipc://{tmp}/relay-{style}.sock"
                procs = [_spawn(["--serve", "relay", ep, style]), _spawn(["--serve", "relay-echo", ep, style])]
                return RelayClient(ep, style), procs
            procs = [_spawn(["--serve", "bus", bus_ep, style, str(creds / f"echo-{style}")])]
            return EdgebusClient(bus_ep, style, (creds / f"client-{style}").read_text()), procs

        sdk_setups = [*SDK_SETUPS, *(f"old-{s}" for s in SDK_SETUPS if args.sdk_old)]
        styles = ("idiomatic",) if args.sdk_only else STYLES
        all_setups = (*SETUPS, *sdk_setups)
        keys = ("rtt_us", "rtt_p99_us", "pipelined_rps", "tensor_rtt_ms", "tensor_gbps")
        results = {s: {k: {setup: [] for setup in all_setups} for k in keys} for s in STYLES}
        kernel_cpu_per_mib: list[float] = []
        kernel_cpu_per_msg: dict[str, list[float]] = {style: [] for style in STYLES}
        for run in range(args.runs):
            for style in styles:
                setups = [s for s in SETUPS if not (args.sdk_only and s == "edgebus")]
                if style == "idiomatic":  # the SDK has one style; compared with idiomatic ends
                    setups += sdk_setups
                order = setups if run % 2 == 0 else list(reversed(setups))
                for setup in order:
                    if setup.startswith(("sdk-", "old-sdk-")):
                        got = sdk_run(setup, bus_ep, creds, args, tmp)
                        for key, value in got.items():
                            results[style][key][setup].append(value)
                        continue
                    client, procs = start(setup, style)
                    try:
                        round_trip(client, 300)  # warm-up
                        r = results[style]
                        times = sorted(round_trip(client, args.rtt_n))
                        r["rtt_us"][setup].append(statistics.median(times) * 1e6)
                        r["rtt_p99_us"][setup].append(times[int(len(times) * 0.99)] * 1e6)
                        cpu0 = _cpu_seconds(kpid)
                        r["pipelined_rps"][setup].append(pipelined(client, args.pipe_n))
                        if setup == "edgebus":  # each request and its reply: two routed messages
                            kernel_cpu_per_msg[style].append((_cpu_seconds(kpid) - cpu0) / (2 * args.pipe_n) * 1e6)
                        if style == "tuned":
                            cpu0 = _cpu_seconds(kpid)
                            t = statistics.median(tensor_round_trip(client, args.tensor_n))
                            if setup == "edgebus":
                                routed_mib = args.tensor_n * 2 * TENSOR / 2**20
                                kernel_cpu_per_mib.append((_cpu_seconds(kpid) - cpu0) / routed_mib * 1e6)
                            r["tensor_rtt_ms"][setup].append(t * 1e3)
                            r["tensor_gbps"][setup].append(2 * TENSOR / t / 1e9)
                    finally:
                        client.sock.close(0)
                        for proc in procs:
                            proc.kill()
                            proc.wait()
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
        if args.sdk_only:
            raise _Done
        # the cost of CURVE over tcp against NULL over ipc, same minimal (tuned) ends
        server = (run_dir / "bus.curve.pub").read_text()
        (tmp / "echo.curve").write_text(json.dumps({"server": server, "public": echo_pub.decode(),
                                                     "secret": echo_sec.decode()}))
        client_keys = {"server": server, "public": client_pub.decode(), "secret": client_sec.decode()}
        transports: dict[str, dict[str, list[float]]] = {k: {"ipc_null": [], "tcp_curve": []}
                                                         for k in ("rtt_us", "pipelined_rps")}
        for run in range(args.runs):
            for transport in ("ipc_null", "tcp_curve") if run % 2 == 0 else ("tcp_curve", "ipc_null"):
                if transport == "ipc_null":
                    client, procs = start("edgebus", "tuned")
                else:
                    procs = [_spawn(["--serve", "bus", tcp, "tuned", "-", "echo-curve", str(tmp / "echo.curve")])]
                    client = EdgebusClient(tcp, "tuned", "", name="client-curve", dest="echo-curve", curve=client_keys)
                try:
                    round_trip(client, 300)
                    transports["rtt_us"][transport].append(statistics.median(round_trip(client, args.rtt_n)) * 1e6)
                    transports["pipelined_rps"][transport].append(pipelined(client, args.pipe_n))
                finally:
                    client.sock.close(0)
                    for proc in procs:
                        proc.kill()
                        proc.wait()
        caps = capability_check_cost()
        zero_copy = inproc_zero_copy()
    except _Done:
        pass
    finally:
        for c in reversed(children):
            c.send_signal(signal.SIGTERM)
        for c in children:
            try:
                c.wait(10)
            except subprocess.TimeoutExpired:
                c.kill()
        log.close()

    summary: dict[str, Any] = {"styles": {}}
    summary["sdk"] = sdk_summary(results["idiomatic"], sdk_setups)
    if args.sdk_only:
        summary["params"] = {k: v for k, v in vars(args).items() if k != "serve"}
        write_results(args.out, summary)
        return
    labels = {"rtt_us": ("small round trip, median (us)", "lower"),
              "rtt_p99_us": ("small round trip, p99 (us)", "lower"),
              "pipelined_rps": ("pipelined small requests (req/s)", "higher"),
              "tensor_rtt_ms": ("4 MiB tensor round trip (ms)", "lower"),
              "tensor_gbps": ("4 MiB tensor throughput (GB/s)", "higher")}
    for style in STYLES:
        print(f"\nends: {style}")
        print(f"{'measure':<34} {'raw pyzmq':>11} {'py relay':>11} {'edgebus':>11} {'relay/raw':>10} {'edgebus/raw':>12}")
        out: dict[str, Any] = {}
        for key, (label, _) in labels.items():
            series = results[style][key]
            if not series["raw"]:
                continue
            med = {s: statistics.median(series[s]) for s in SETUPS}
            relay, edgebus = _ratio(series, "relay"), _ratio(series, "edgebus")
            out[key] = {**{s: med[s] for s in SETUPS}, "relay_ratio": relay, "edgebus_ratio": edgebus,
                        "runs": series}
            print(f"{label:<34} {med['raw']:>11.1f} {med['relay']:>11.1f} {med['edgebus']:>11.1f} "
                  f"{relay:>10.2f} {edgebus:>12.2f}")
        if kernel_cpu_per_msg[style]:
            out["kernel_cpu_us_per_routed_message"] = statistics.median(kernel_cpu_per_msg[style])
            print(f"{'kernel CPU per routed message (us)':<34} {'':>11} {'':>11} "
                  f"{out['kernel_cpu_us_per_routed_message']:>11.2f}   (pipelined; router and I/O threads)")
        summary["styles"][style] = out
    summary["kernel_cpu_us_per_routed_mib"] = statistics.median(kernel_cpu_per_mib)
    summary["curve"] = {k: {t: statistics.median(v) for t, v in series.items()} | {"runs": series}
                        for k, series in transports.items()}
    summary["capability_check"] = caps
    summary["inproc_zero_copy"] = zero_copy
    summary["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "zmq": zmq.zmq_version(), "pyzmq": zmq.__version__, "platform": platform.platform()}
    summary["params"] = {k: v for k, v in vars(args).items() if k != "serve"}
    print(f"\nkernel CPU per routed MiB of tensor payload: {summary['kernel_cpu_us_per_routed_mib']:.0f} us")
    print(f"in-process (inproc) through the router: 64 B round trip {zero_copy['small_rtt_us']:.0f} us, "
          f"4 MiB round trip {zero_copy['tensor_rtt_us']:.0f} us ({zero_copy['tensor_gbps']:.0f} GB/s); "
          f"the service got the client's own buffer: {zero_copy['same_buffer_at_the_service']}")
    cv = summary["curve"]
    print(f"CURVE over tcp vs NULL over ipc (tuned ends): round trip {cv['rtt_us']['tcp_curve']:.0f} us vs "
          f"{cv['rtt_us']['ipc_null']:.0f} us ({cv['rtt_us']['tcp_curve'] / cv['rtt_us']['ipc_null']:.2f}x); "
          f"pipelined {cv['pipelined_rps']['tcp_curve']:.0f} vs {cv['pipelined_rps']['ipc_null']:.0f} req/s "
          f"({cv['pipelined_rps']['tcp_curve'] / cv['pipelined_rps']['ipc_null']:.2f}x)")
    print(f"capability check, {caps['rules']} rules: {caps['uncached_us']:.2f} us uncached "
          f"({caps['wildcard_uncached_us']:.2f} us through wildcards), {caps['cached_us']:.3f} us "
          "on the per-message path (cached per peer)")
    write_results(args.out, summary)


if __name__ == "__main__":
    main()
