"""Fleet rollout benchmark (issue 16): 1,000 simulated devices against one mosquitto.

    python -m tools.bench_fleet [--devices 1000] [--workers 2] [--size 1048576] [--json]

Each device is the real agent core (``services.fleet.Agent``, ``MemoryStorage``) behind an
in-memory model store whose trials commit after ``--trial`` seconds (``tools._fleet_sim``),
with its own MQTT connection: ``--workers`` processes of ``devices / workers`` devices, each
process one thread driving its clients from one selector loop.  Own connections, not one
shared connection with per-device topics: the broker then does per device what it does for a
real fleet (a retained chunk sent once per device that asks for it, a session and
subscriptions each), so its messages and bytes per device are the real ones.

The controller (``tools._fleet_controller``, state in SQLite) runs in this process: it pushes a
``--size`` bundle (chunks of 64 KiB, retained), deploys it to the group of every device in
three waves (a 5% canary, then two waves; gate trial=committed, 2 s soak, quorum 0.7) and
publishes the group's document after the last.  ``--offline`` of the devices (20%) are
offline from before the rollout until it is complete; they then reconnect, and the time each
takes to converge (report the new version committed) is measured from its reconnection.

Reported: the rollout's time (deploy to the group's document) and to every online device
converged; per device the MQTT messages and payload bytes the broker sent it and it sent;
the broker's own totals ($SYS); its retained messages and their size; and what that gives for
a broker cluster of 100,000 devices.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

GROUP = "all"
MODEL = "detector"
OLD, NEW = "1.0.0", "2.0.0"


# -- a worker: devices in one process ------------------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    from protocols import fleet
    from tools._fleet_sim import Fleet, SimStore

    pub = bytes.fromhex(args.pubkey)
    sim = Fleet("127.0.0.1", args.port)
    names = [f"dev{i:05d}" for i in range(args.start, args.start + args.count)]
    rng = random.Random(args.start)
    offline = set(rng.sample(names, round(len(names) * args.offline)))
    for n in names:
        sim.add(n, [GROUP], SimStore({MODEL: OLD}, trial_s=args.trial), trusted={fleet.key_id(pub): pub},
                public_key="00" * 32, fleet_id="bench")
    for d in sim.devices.values():
        sim.connect(d)
        sim.step(0)
    # online (presence), enrolled and reported
    sim.run_until(lambda: all(d.tx >= 3 for d in sim.devices.values()), 120)
    out = sys.stdout

    def say(**kw: Any) -> None:
        out.write(json.dumps(kw) + "\n")
        out.flush()

    say(event="ready", devices=len(names))
    commands: list[str] = []
    lock = threading.Lock()

    def read() -> None:
        for line in sys.stdin:
            with lock:
                commands.append(line.strip())
        with lock:
            commands.append("quit")

    threading.Thread(target=read, daemon=True).start()
    converged: dict[str, float] = {}
    reconnected: dict[str, float] = {}
    last_status = 0.0
    while True:
        sim.step(0.02)
        now = time.time()
        for n, d in sim.devices.items():
            if n not in converged and d.store.models[MODEL].active == NEW and not d.store.models[MODEL].trial:
                s = d.agent.state.status
                if s is not None and s.outcome == "succeeded":
                    converged[n] = now
        with lock:
            todo, commands[:] = list(commands), []
        for cmd in todo:
            match cmd:
                case "offline":
                    for n in offline:
                        sim.disconnect(sim.devices[n])
                    say(event="offline", devices=len(offline))
                case "online":
                    for n in offline:
                        sim.connect(sim.devices[n])
                        reconnected[n] = time.time()
                    say(event="online", devices=len(offline))
                case "stats" | "quit":
                    ds = sim.devices.values()
                    say(event="stats", devices=len(names), offline=sorted(offline),
                        converged={n: t for n, t in converged.items()}, reconnected=reconnected,
                        rx=sum(d.rx for d in ds), rx_bytes=sum(d.rx_bytes for d in ds),
                        tx=sum(d.tx for d in ds), tx_bytes=sum(d.tx_bytes for d in ds))
                    if cmd == "quit":
                        sim.close()
                        return 0
        if now - last_status > 0.5:
            last_status = now
            say(event="progress", converged=len(converged))


# -- the benchmark -----------------------------------------------------------------------------------


class Worker:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.events.append(json.loads(line))
                self.cond.notify_all()

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def wait(self, event: str, timeout: float) -> dict[str, Any]:
        with self.cond:
            ok = self.cond.wait_for(lambda: any(e["event"] == event for e in self.events), timeout)
            if not ok:
                raise SystemExit(f"bench_fleet: a worker sent no {event!r} within {timeout:g} s")
            found = next(e for e in self.events if e["event"] == event)
            self.events.remove(found)
            return found

    def converged(self) -> int:
        with self.cond:
            progress = [e for e in self.events if e["event"] == "progress"]
            return progress[-1]["converged"] if progress else 0

    def stop(self) -> None:
        try:
            self.send("quit")
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sys(link: Any) -> dict[str, float]:
    got = link.retained(["$SYS/broker/messages/sent", "$SYS/broker/messages/received", "$SYS/broker/bytes/sent",
                         "$SYS/broker/bytes/received", "$SYS/broker/retained messages/count"], quiet=1.5)
    out = {}
    for topic, payload in got.items():
        try:
            out[topic.removeprefix("$SYS/broker/")] = float(payload)
        except ValueError:
            pass
    return out


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from protocols.fleet import Topics
    from tools._fleet_broker import BrokerOptions, Link
    from tools._fleet_controller import Controller
    from tools._fleet_rollout import Gate, Policy
    from tools._fleet_state import State

    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(mosquitto):
        raise SystemExit("bench_fleet: mosquitto is not installed (apt-get install mosquitto)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    port = _free_port()
    (tmp / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nsys_interval 1\n"
        "max_queued_messages 100000\nmax_inflight_messages 0\n" + ("user root\n" if os.geteuid() == 0 else ""))
    broker = subprocess.Popen([mosquitto, "-c", str(tmp / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    workers: list[Worker] = []
    link = None
    try:
        end = time.monotonic() + 20
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > end or broker.poll() is not None:
                raise SystemExit("bench_fleet: mosquitto did not start")
            time.sleep(0.05)
        key = Ed25519PrivateKey.generate()
        pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        per = -(-args.devices // args.workers)
        t_connect = time.monotonic()
        for w in range(args.workers):
            start, count = w * per, min(per, args.devices - w * per)
            workers.append(Worker([sys.executable, "-m", "tools.bench_fleet", "--worker", "--port", str(port),
                                   "--start", str(start), "--count", str(count), "--pubkey", pub.hex(),
                                   "--offline", str(args.offline), "--trial", str(args.trial)]))
        for w in workers:
            w.wait("ready", 300)
        connect_s = time.monotonic() - t_connect
        state = State(tmp / "fleet.sqlite")
        link = Link(BrokerOptions(port=port)).connect()
        controller = Controller(state, link, Topics(), private_key=key.private_bytes_raw(), fleet_id="bench",
                                log=(lambda line: print(f"  {line}", file=sys.stderr)) if args.verbose else None)
        controller.refresh(quiet=1.0)
        devices = sorted(controller.reports)
        state.create_group(GROUP, time.time())
        state.add_members(GROUP, devices)
        sys_before = _sys(link)
        for w in workers:
            w.send("offline")
        offline = sum(w.wait("offline", 60)["devices"] for w in workers)
        # the rollout
        t0 = time.time()
        data = random.Random(1).randbytes(args.size)
        sha, _ = controller.push(data, f"{MODEL}@{NEW}")
        pushed_s = time.time() - t0
        policy = Policy(canary_pct=5, waves=3, soak_s=args.soak, gates=(Gate("trial"),), quorum=0.7,
                        wave_timeout_s=300)
        dep = controller.create(GROUP, sha, "", policy)
        waves = [len(w) for w in (state.deployment(dep).waves or [])]  # type: ignore[union-attr]
        wave_at: list[float] = []

        def finished() -> bool:
            d = state.deployment(dep)
            assert d is not None
            if len(wave_at) < d.wave + 1:
                wave_at.append(time.time() - t0)
            return d.state != "running"

        controller.run(tick=0.25, until=finished, stop=lambda: time.time() - t0 > args.timeout)
        d = state.deployment(dep)
        assert d is not None
        rollout_s = time.time() - t0
        online = len(devices) - offline
        end = time.monotonic() + args.timeout
        while sum(w.converged() for w in workers) < online and time.monotonic() < end:
            time.sleep(0.1)
        converged_online_s = time.time() - t0
        # the offline devices come back
        for w in workers:
            w.send("online")
        for w in workers:
            w.wait("online", 60)
        end = time.monotonic() + args.timeout
        while sum(w.converged() for w in workers) < len(devices) and time.monotonic() < end:
            time.sleep(0.1)
        time.sleep(1.5)  # $SYS is refreshed each second
        sys_after = _sys(link)
        retained = link.retained([f"{controller.topics.prefix}/#"], quiet=1.5, timeout=60)
        for w in workers:
            w.send("stats")
        stats = [w.wait("stats", 60) for w in workers]
    finally:
        for w in workers:
            w.stop()
        if link is not None:
            link.close()
        broker.terminate()
        broker.wait(15)
        shutil.rmtree(tmp, ignore_errors=True)

    converged: dict[str, float] = {}
    reconnected: dict[str, float] = {}
    for s in stats:
        converged.update(s["converged"])
        reconnected.update(s["reconnected"])
    after_reconnect = [converged[n] - reconnected[n] for n in reconnected if n in converged]
    online_times = [converged[n] - t0 for n in converged if n not in reconnected]
    n = len(devices)
    rx, rx_bytes = sum(s["rx"] for s in stats), sum(s["rx_bytes"] for s in stats)
    tx, tx_bytes = sum(s["tx"] for s in stats), sum(s["tx_bytes"] for s in stats)
    delta = {k: sys_after.get(k, 0) - sys_before.get(k, 0) for k in sys_after}
    kinds: dict[str, list[int]] = {}
    for topic, payload in retained.items():
        kind = Topics().parse(topic)[0]
        kinds.setdefault(kind, []).append(len(payload) + len(topic))
    return {
        "devices": n, "workers": args.workers, "bundle_bytes": args.size, "offline": offline,
        "connect_s": round(connect_s, 2), "push_s": round(pushed_s, 2), "waves": waves,
        "wave_started_s": [round(x, 2) for x in wave_at],
        "rollout_state": d.state, "rollout_s": round(rollout_s, 2),
        "online_converged": len(online_times), "online_converged_s": round(max(online_times, default=0), 2),
        "all_online_converged_s": round(converged_online_s, 2),
        "reconnected_converged": len(after_reconnect),
        "after_reconnect_p50_s": round(statistics.median(after_reconnect), 2) if after_reconnect else None,
        "after_reconnect_max_s": round(max(after_reconnect), 2) if after_reconnect else None,
        "per_device": {"received_messages": round(rx / n, 1), "received_bytes": round(rx_bytes / n),
                       "sent_messages": round(tx / n, 1), "sent_bytes": round(tx_bytes / n)},
        "broker": {k: int(v) for k, v in delta.items() if "retained" not in k},
        "retained": {k: {"count": len(v), "bytes": sum(v)} for k, v in sorted(kinds.items())},
    }


def show(r: dict[str, Any]) -> None:
    pd, b = r["per_device"], r["broker"]
    print(f"{r['devices']} simulated devices in {r['workers']} processes (own MQTT connection each), "
          f"{r['bundle_bytes'] / 1e6:.2f} MB bundle, waves {r['waves']}, {r['offline']} offline during the rollout")
    print(f"  connect+enrol       {r['connect_s']:7.2f} s")
    print(f"  push (retained)     {r['push_s']:7.2f} s")
    print(f"  waves started at    {', '.join(f'{x:.1f}' for x in r['wave_started_s'])} s")
    print(f"  rollout             {r['rollout_s']:7.2f} s  ({r['rollout_state']}: the group's document published)")
    print(f"  online converged    {r['online_converged_s']:7.2f} s  ({r['online_converged']} devices on {NEW}, committed)")
    if r["after_reconnect_max_s"] is not None:
        print(f"  offline devices     {r['reconnected_converged']} converged after reconnecting: "
              f"median {r['after_reconnect_p50_s']:.2f} s, max {r['after_reconnect_max_s']:.2f} s")
    print(f"  per device          received {pd['received_messages']:.1f} messages / {pd['received_bytes'] / 1e6:.3f} MB, "
          f"sent {pd['sent_messages']:.1f} messages / {pd['sent_bytes'] / 1e3:.1f} kB")
    if b:
        print(f"  broker ($SYS)       sent {b.get('messages/sent', 0)} MQTT packets (all kinds) / "
              f"{b.get('bytes/sent', 0) / 1e6:.0f} MB, received {b.get('messages/received', 0)} / "
              f"{b.get('bytes/received', 0) / 1e6:.1f} MB")
    total = sum(v["bytes"] for v in r["retained"].values())
    print(f"  retained            {sum(v['count'] for v in r['retained'].values())} messages, {total / 1e6:.2f} MB: "
          + ", ".join(f"{k} {v['count']} ({v['bytes'] / 1e3:.0f} kB)" for k, v in r["retained"].items()))
    x = scale(r)
    print(f"  100,000 devices     {x['publishes_per_rollout'] / 1e6:.1f} M publishes and {x['bytes_per_rollout'] / 1e9:.0f} GB "
          f"through the brokers per rollout; over one hour: {x['publishes_per_s_1h']:.0f} publishes/s, "
          f"{x['mbytes_per_s_1h']:.0f} MB/s; at this run's pace ({x['devices_per_s']:.0f} devices/s): "
          f"{x['publishes_per_s_pace']:.0f} publishes/s; retained {x['retained_mb']:.0f} MB "
          f"(+ {x['wave_documents_mb']:.0f} MB of wave documents while a rollout runs)")


def scale(r: dict[str, Any], devices: int = 100_000) -> dict[str, float]:
    """This run's per-device figures for a fleet of ``devices``."""
    pd = r["per_device"]
    publishes = (pd["received_messages"] + pd["sent_messages"]) * devices
    nbytes = (pd["received_bytes"] + pd["sent_bytes"]) * devices
    per_device_retained = sum(v["bytes"] for k, v in r["retained"].items() if k in ("enrol", "reported")) / r["devices"]
    shared = sum(v["bytes"] for k, v in r["retained"].items() if k not in ("enrol", "reported"))
    doc = r["retained"].get("group-desired", {"bytes": 400})["bytes"]
    pace = r["devices"] / max(r["online_converged_s"], 1e-9)
    return {"publishes_per_rollout": publishes, "bytes_per_rollout": nbytes,
            "publishes_per_s_1h": publishes / 3600, "mbytes_per_s_1h": nbytes / 3600 / 1e6,
            "devices_per_s": pace, "publishes_per_s_pace": publishes / devices * pace,
            "retained_mb": (per_device_retained * devices + shared) / 1e6,
            "wave_documents_mb": doc * devices / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=1 << 20, help="bundle bytes (default 1 MiB)")
    p.add_argument("--offline", type=float, default=0.2, help="share of devices offline during the rollout")
    p.add_argument("--soak", type=float, default=2.0)
    p.add_argument("--trial", type=float, default=1.0, help="seconds a simulated trial takes to commit")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--pubkey", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    result = bench(args)
    if args.json:
        print(json.dumps({**result, "scaled_100k": scale(result)}))
    else:
        show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
