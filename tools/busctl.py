"""``busctl``: inspect and steer a running edgebus from the command line.

Connects with the operator credential in ``<run-dir>/credentials/operator``.  Every
command takes ``--json``; failures print one clear line on stderr and exit non-zero:
1 for a failed call or bad input, 2 for usage, 3 when the bus cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import anyio
import msgspec

from protocols import (
    CapabilityTable,
    GetService,
    Interface,
    Introspect,
    ListCapabilities,
    ListServices,
    Monitor,
    Reload,
    Reloaded,
    RestartService,
    ServiceList,
    ServiceStatus,
    StartService,
    StopService,
    Traffic,
)
from services import BusClient, BusError, ConnectError, RemoteError, connect, endpoint_for_run_dir

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_UNREACHABLE = 3


class UsageError(Exception):
    pass


def _to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj)


def _print_json(obj: Any) -> None:
    print(json.dumps(_to_builtins(obj), indent=2, sort_keys=False, default=str))


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(c) for c in headers]] + [[("-" if c in ("", None) else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _uptime(seconds: float) -> str:
    if not seconds:
        return ""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -- commands ----------------------------------------------------------------------------------


async def cmd_list(bus: BusClient, args: argparse.Namespace) -> int:
    reply = await bus.call("kernel", ListServices(), ServiceList, timeout=args.timeout)
    if args.json:
        _print_json(reply.services)
        return 0
    rows = [(s.name, s.state, s.pid or "", s.restarts, _uptime(s.uptime), s.last_exit,
             ",".join(s.types)) for s in reply.services]
    print(_table(rows, ("NAME", "STATE", "PID", "RESTARTS", "UPTIME", "LAST EXIT", "TYPES")))
    return 0


async def cmd_status(bus: BusClient, args: argparse.Namespace) -> int:
    s = await bus.call("kernel", GetService(name=args.name), ServiceStatus, timeout=args.timeout)
    if args.json:
        _print_json(s)
        return 0
    fields = msgspec.structs.asdict(s)
    width = max(map(len, fields))
    for key, value in fields.items():
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        elif key == "uptime":
            value = _uptime(value) or "-"
        print(f"{key.replace('_', ' '):>{width}}: {value if value not in ('', None) else '-'}")
    return 0


async def cmd_call(bus: BusClient, args: argparse.Namespace) -> int:
    try:
        body = json.loads(args.body) if args.body else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise UsageError("the request body must be a JSON object, e.g. '{\"who\": \"world\"}'")
    body["type"] = args.type
    incoming = await bus.request(args.service, msgspec.msgpack.encode(body), type=args.type,
                                 timeout=args.timeout)
    reply = incoming.decode()
    if args.json:
        _print_json({"type": incoming.type, "sender": incoming.sender, "body": reply,
                     "frames": [len(f) for f in incoming.frames]})
    else:
        _print_json(reply)
    return 0


async def cmd_introspect(bus: BusClient, args: argparse.Namespace) -> int:
    iface = await bus.call("kernel", Introspect(name=args.service), Interface, timeout=args.timeout)
    if args.json:
        _print_json(iface)
        return 0
    print(f"service {iface.name}")
    defs = iface.schema.get("$defs", {})
    for t in iface.types:
        schema = defs.get(t, {})
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        fields = ", ".join(
            f"{k}{'' if k in required else '?'}: {_schema_type(v)}" for k, v in props.items() if k != "type"
        )
        print(f"  request {t}({fields})")
    rdefs = iface.reply_schema.get("$defs", {})
    for name, schema in rdefs.items():
        if "properties" in schema and schema.get("properties", {}).get("type"):
            props = schema["properties"]
            fields = ", ".join(f"{k}: {_schema_type(v)}" for k, v in props.items() if k != "type")
            print(f"  reply   {name}({fields})")
    for topic in iface.publishes:
        print(f"  publishes {topic}")
    return 0


def _schema_type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_schema_type(s) for s in schema["anyOf"])
    t = schema.get("type", "any")
    if t == "array":
        return f"[{_schema_type(schema.get('items', {}))}]"
    return str(t)


_CAPS_USAGE = ("usage: busctl caps [NAME] | caps grant NAME CAP [--ttl S] | caps revoke NAME CAP "
               "| caps reset NAME CAP")
_ORIGINS = {"config": "config", "grant": "run-time grant", "revocation": "run-time revocation"}


async def cmd_caps(bus: BusClient, args: argparse.Namespace) -> int:
    words = list(args.words)
    if words and words[0] in ("grant", "revoke", "reset"):
        verb = words[0]
        if len(words) != 3:
            raise UsageError(f"usage: busctl caps {verb} NAME CAPABILITY" + (" [--ttl S]" if verb == "grant" else ""))
        if args.ttl is not None and verb != "grant":
            raise UsageError(f"--ttl goes with caps grant, not caps {verb}")
        if args.ttl is not None and not (math.isfinite(args.ttl) and args.ttl > 0):
            raise UsageError(f"--ttl {args.ttl:g}: a grant lasts a number of seconds > 0; "
                             "leave --ttl out for a grant until revoked")
        from protocols.security import GrantCapability, Grants, ResetCapability, RevokeCapability

        name, cap = words[1], words[2]
        msg = {"grant": GrantCapability(name=name, capability=cap, ttl=args.ttl),
               "revoke": RevokeCapability(name=name, capability=cap),
               "reset": ResetCapability(name=name, capability=cap)}[verb]
        result = await bus.call("security", msg, Grants, timeout=args.timeout)
        if args.json:
            _print_json(result)
        else:
            done = {"grant": f"granted {cap} to {name}" + (f" for {args.ttl:g}s" if args.ttl is not None else ""),
                    "revoke": f"revoked {cap} from {name}",
                    "reset": f"reset {cap} of {name} to its configuration"}[verb]
            print(done)
            print(f"{name} now holds: {', '.join(result.effective) or '(nothing: default deny)'}")
        return 0
    if len(words) > 1 or args.ttl is not None:
        raise UsageError(_CAPS_USAGE)
    table = await bus.call("kernel", ListCapabilities(name=words[0] if words else ""), CapabilityTable,
                           timeout=args.timeout)
    if args.json:
        _print_json(table.table)
        return 0
    rows: list[tuple[str, str, str, str]] = []
    for name in sorted(table.entries or table.table):
        entries = table.entries.get(name)
        if entries is None:  # a kernel without origins: the effective patterns only
            rows += [(name, cap, "", "") for cap in table.table[name]]
        for e in entries or []:
            shown = f"!{e.capability}" if e.origin == "revocation" else e.capability
            expiry = (f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e.expires))} "
                      f"(in {max(e.expires - time.time(), 0):.0f}s)" if e.expires
                      else "never" if e.origin == "grant" else "")
            rows.append((name, shown, _ORIGINS.get(e.origin, e.origin), expiry))
        if entries == []:
            rows.append((name, "(none: default deny)", "", ""))
    print(_table(rows, ("PRINCIPAL", "CAPABILITY", "ORIGIN", "EXPIRES")))
    return 0


async def cmd_monitor(bus: BusClient, args: argparse.Namespace) -> int:
    sub = await bus.receive_unsolicited("kernel.monitor")
    await bus.call("kernel", Monitor(service=args.service or "", message_type=args.type or "",
                                     topic=args.topic or ""), timeout=args.timeout)
    decoder = msgspec.msgpack.Decoder(Traffic)
    seen = 0
    if not args.json:
        print(_table([], ("TIME", "KIND", "TYPE", "SENDER", "DEST", "ID", "BYTES", "OUTCOME")), flush=True)
    async for incoming in sub:
        if incoming.type != "Traffic" or incoming.sender != "kernel":
            continue
        t = decoder.decode(incoming.body)
        if args.json:
            print(msgspec.json.encode(t).decode(), flush=True)
        else:
            stamp = time.strftime("%H:%M:%S", time.localtime(t.time)) + f".{int(t.time % 1 * 1000):03d}"
            print(f"{stamp}  {t.kind:<8} {t.message_type:<20} {t.sender:<16} -> {t.dest or '-':<20} "
                  f"{t.id:<6} {t.size:<8} {t.outcome or 'ok'}", flush=True)
        seen += 1
        if args.limit and seen >= args.limit:
            break
    return 0


async def cmd_audit(bus: BusClient, args: argparse.Namespace) -> int:
    from protocols.security import AuditRecords, AuditTail, AuditVerdict, AuditVerify

    if args.action == "tail":
        records = (await bus.call("security", AuditTail(n=args.n), AuditRecords, timeout=args.timeout)).records
        if args.json:
            _print_json(records)
            return 0
        for r in records:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time))
            extra = " ".join(x for x in (r.capability, r.detail, f"by {r.by}" if r.by else "") if x)
            print(f"{r.seq:>6}  {stamp}  {r.kind:<22} {r.subject:<16} {extra}")
        return 0
    verdict = await bus.call("security", AuditVerify(), AuditVerdict, timeout=args.timeout)
    if args.json:
        _print_json(verdict)
    elif verdict.ok:
        print(f"audit log intact: {verdict.records} records in {verdict.files} file(s), "
              f"{verdict.checkpoints} signed checkpoint(s)")
    else:
        print(f"busctl: audit log broken at {verdict.where}: {verdict.problem} "
              f"({verdict.records} records before it are intact)", file=sys.stderr)
    return 0 if verdict.ok else EXIT_FAILED


async def cmd_trust(bus: BusClient, args: argparse.Namespace) -> int:
    from protocols.security import TrustAdd, TrustedKeys, TrustList, TrustRemove

    if args.action == "add":
        if not args.key:
            raise UsageError("usage: busctl trust add PUBLIC_KEY_HEX [--label L]")
        msg: msgspec.Struct = TrustAdd(public_key=args.key, label=args.label or "")
    elif args.action == "remove":
        if not args.key:
            raise UsageError("usage: busctl trust remove KEY_ID")
        msg = TrustRemove(key_id=args.key)
    else:
        msg = TrustList()
    keys = (await bus.call("security", msg, TrustedKeys, timeout=args.timeout)).keys
    if args.json:
        _print_json(keys)
    elif args.action == "list":
        print(_table([(k.key_id, k.label, k.source, k.public_key) for k in keys],
                     ("KEY ID", "LABEL", "SOURCE", "PUBLIC KEY")))
    else:
        print(f"{args.action}{'ed' if args.action == 'add' else 'd'} {keys[0].key_id} {keys[0].label}".rstrip())
    return 0


async def cmd_attest(bus: BusClient, args: argparse.Namespace) -> int:
    from protocols.security import Attest, SignedReport

    signed = await bus.call("security", Attest(nonce=args.nonce or ""), SignedReport, timeout=args.timeout)
    _print_json(signed)  # always JSON: it is meant for `edgebus attest verify`
    return 0


async def cmd_security(bus: BusClient, args: argparse.Namespace) -> int:
    from protocols.security import Enrolled, EnrollKey

    result = await bus.call("security", EnrollKey(name=args.name, public_key=args.public_key), Enrolled,
                            timeout=args.timeout)
    if args.json:
        _print_json(result)
    else:
        print(f"enrolled {result.name}: it may connect over tcp with CURVE key {result.public_key}")
    return 0


async def cmd_model(bus: BusClient, args: argparse.Namespace) -> int:
    from protocols.modelstore import (
        Activate, InspectModel, Install, Installed, ListModels, ModelList, ModelManifest, ModelState, Remove,
        Rollback, Split,
    )

    words, action = list(args.words), args.action

    def need(n: int, usage: str) -> None:
        if len(words) != n:
            raise UsageError(f"usage: busctl model {action} {usage}")

    if action == "list":
        models = (await bus.call("modelstore", ListModels(), ModelList, timeout=args.timeout)).models
        if args.json:
            _print_json(models)
        else:
            print(_table([(m.name, m.active, m.trial and "trial" or ("ok" if m.active else ""), m.previous,
                           " ".join(f"{v}={w:g}" for v, w in m.split.items()), " ".join(m.versions)) for m in models],
                         ("MODEL", "ACTIVE", "STATUS", "PREVIOUS", "SPLIT", "VERSIONS")))
        return 0
    if action == "install":
        need(1, "BUNDLE.ebm")
        try:
            data = Path(words[0]).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {words[0]}: {exc.strerror}") from exc
        incoming = await bus.request("modelstore", Install(), frames=[data], timeout=max(args.timeout, 120))
        result: msgspec.Struct = incoming.decode(Installed)
    elif action == "inspect":
        if len(words) not in (1, 2):
            raise UsageError("usage: busctl model inspect NAME [VERSION]")
        result = await bus.call("modelstore", InspectModel(name=words[0], version=words[1] if len(words) > 1 else ""),
                                ModelManifest, timeout=args.timeout)
        _print_json(result)
        return 0
    elif action == "activate":
        need(2, "NAME VERSION")
        result = await bus.call("modelstore", Activate(name=words[0], version=words[1]), ModelState, timeout=args.timeout)
    elif action == "rollback":
        need(1, "NAME")
        result = await bus.call("modelstore", Rollback(name=words[0]), ModelState, timeout=args.timeout)
    elif action == "remove":
        need(2, "NAME VERSION")
        result = await bus.call("modelstore", Remove(name=words[0], version=words[1]), ModelState, timeout=args.timeout)
    else:  # split NAME V=W ...
        if len(words) < 1:
            raise UsageError("usage: busctl model split NAME VERSION=WEIGHT ... (none: back to the active version)")
        weights = {}
        for item in words[1:]:
            version, sep, weight = item.partition("=")
            try:
                weights[version] = float(weight)
            except ValueError:
                raise UsageError(f"{item!r} is not VERSION=WEIGHT") from None
            if not sep:
                raise UsageError(f"{item!r} is not VERSION=WEIGHT")
        result = await bus.call("modelstore", Split(name=words[0], weights=weights), ModelState, timeout=args.timeout)
    if args.json:
        _print_json(result)
    elif isinstance(result, Installed):
        print(f"installed {result.name} {result.version} (variants {', '.join(result.variants)}; "
              f"signed by {result.key_id}); activate it with: busctl model activate {result.name} {result.version}")
    else:
        state = result
        print(f"{state.name}: active {state.active or '-'}" + (" (in trial)" if state.trial else "")
              + (f", previous {state.previous}" if state.previous else "")
              + (f", split {' '.join(f'{v}={w:g}' for v, w in state.split.items())}" if state.split else ""))
    return 0


def _load_input(path: str) -> Any:
    """A tensor from .npy, or an image (HWC uint8, via Pillow)."""
    import numpy as np

    p = Path(path)
    try:
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False)
        from PIL import Image

        with Image.open(p) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path} as .npy or an image: {exc}") from exc


async def cmd_infer(bus: BusClient, args: argparse.Namespace) -> int:
    import numpy as np

    from protocols import pack_tensors
    from services.scheduler import Infer, InferResult

    x = _load_input(args.input)
    if args.batch and (x.ndim == 0 or x.shape[0] != 1):
        x = x[None, ...]
    descs, frames = pack_tensors([x])
    incoming = await bus.request("scheduler", Infer(model=args.model, tensors=descs, version=args.version or "",
                                                    priority=args.priority, key=args.key or ""),
                                 frames=frames, timeout=args.timeout)
    result = incoming.decode(InferResult)
    outputs = [np.asarray(incoming.tensor(t)) for t in result.outputs]
    if args.json:
        _print_json({**msgspec.to_builtins(result), "outputs": [o.tolist() for o in outputs]})
    else:
        print(f"{result.model} {result.version} ({result.variant}, level {result.level}) on {result.driver}: "
              f"batch {result.batch}, queue {result.queue_ms:.2f} ms, compute {result.compute_ms:.2f} ms, "
              f"total {result.total_ms:.2f} ms")
        for i, o in enumerate(outputs):
            print(f"output {i}: {o.dtype}{list(o.shape)} {np.array2string(o, threshold=20, precision=4)}")
    return 0


async def cmd_sched(bus: BusClient, args: argparse.Namespace) -> int:
    from services.scheduler import GetSchedule, Schedule

    s = await bus.call("scheduler", GetSchedule(), Schedule, timeout=args.timeout)
    if args.json:
        _print_json(s)
        return 0
    names = {0: "full", 1: "smaller variant", 2: "rule-based fallback"}
    print(f"degradation level {s.level} ({names.get(s.level, '?')})" + (f": {s.pressure}" if s.pressure else ""))
    print(_table([(m.model, m.depth, m.served, m.expired, m.failed, m.batches, m.mean_batch) for m in s.models],
                 ("MODEL", "QUEUED", "SERVED", "EXPIRED", "FAILED", "BATCHES", "MEAN BATCH")))
    print(_table([(d.name, "up" if d.up else "down", d.in_flight, d.batches,
                   "" if d.temperature_c is None else f"{d.temperature_c:.0f} C") for d in s.drivers],
                 ("DRIVER", "STATE", "IN FLIGHT", "BATCHES", "TEMPERATURE")))
    return 0


async def cmd_metrics(bus: BusClient, args: argparse.Namespace) -> int:
    from protocols.telemetry import GetMetrics, MetricsText

    text = (await bus.call("telemetry", GetMetrics(), MetricsText, timeout=args.timeout)).text
    if args.json:
        _print_json([line for line in text.splitlines() if line and not line.startswith("#")])
    else:
        sys.stdout.write(text)
    return 0


async def cmd_top(bus: BusClient, args: argparse.Namespace) -> int:
    """A live view: services, message rates, CPU, RSS and queues (--iterations N to stop)."""
    from protocols.telemetry import GetMetrics, MetricsText

    previous: dict[str, tuple[float, int, int, float]] = {}
    shown = 0
    while True:
        listing = await bus.call("kernel", ListServices(), ServiceList, timeout=args.timeout)
        try:
            text = (await bus.call("telemetry", GetMetrics(), MetricsText, timeout=args.timeout)).text
        except RemoteError:
            text = ""
        cpu, rss = _per_service(text, "process_cpu_seconds"), _per_service(text, "process_resident_memory_bytes")
        depth = _per_service(text, "edgebus_inference_queue_depth")
        now = time.monotonic()
        rows = []
        for s in listing.services:
            t0, rin, rout, c0 = previous.get(s.name, (now, s.requests_in, s.requests_out, cpu.get(s.name, 0.0)))
            dt = max(now - t0, 1e-9)
            rate = ((s.requests_in - rin) + (s.requests_out - rout)) / dt if now > t0 else 0.0
            cpu_pct = (cpu.get(s.name, 0.0) - c0) / dt * 100 if now > t0 and s.name in cpu else None
            previous[s.name] = (now, s.requests_in, s.requests_out, cpu.get(s.name, 0.0))
            rows.append((s.name, s.state, s.pid or "", f"{rate:.0f}", "" if cpu_pct is None else f"{cpu_pct:.0f}%",
                         f"{rss[s.name] / 2**20:.0f}M" if s.name in rss else "", s.pending,
                         f"{depth.get(s.name):.0f}" if s.name in depth else "", s.denied))
        if not args.json:
            print("\033[H\033[J" if sys.stdout.isatty() else "", end="")
            print(_table(rows, ("NAME", "STATE", "PID", "MSG/S", "CPU", "RSS", "PENDING", "QUEUED", "DENIED")), flush=True)
        else:
            print(json.dumps([dict(zip(("name", "state", "pid", "msg_per_s", "cpu", "rss", "pending", "queued",
                                         "denied"), r)) for r in rows]), flush=True)
        shown += 1
        if args.iterations and shown >= args.iterations:
            return 0
        await anyio.sleep(args.interval)


def _per_service(text: str, metric: str) -> dict[str, float]:
    """Sum of a metric's samples per service label, from the exposition text."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(metric + "{") or line.startswith(metric + " "):
            labels, _, value = line.rpartition(" ")
            service = labels.split('service="', 1)[1].split('"', 1)[0] if 'service="' in labels else ""
            try:
                out[service] = out.get(service, 0.0) + float(value)
            except ValueError:
                continue
    return out


def _print_status_line(s: ServiceStatus, verb: str) -> None:
    print(f"{s.name}: {verb}; state {s.state}" + (f", pid {s.pid}" if s.pid else "")
          + (f" ({s.last_exit})" if s.last_exit and s.state != "ready" else ""))


async def _operation(bus: BusClient, args: argparse.Namespace, msg: msgspec.Struct, verb: str) -> int:
    s = await bus.call("kernel", msg, ServiceStatus, timeout=args.timeout)
    if args.json:
        _print_json(s)
    else:
        _print_status_line(s, verb)
    return 0 if (s.state == "ready") == (verb != "stopped") else EXIT_FAILED


async def cmd_start(bus: BusClient, args: argparse.Namespace) -> int:
    return await _operation(bus, args, StartService(name=args.name), "started")


async def cmd_stop(bus: BusClient, args: argparse.Namespace) -> int:
    return await _operation(bus, args, StopService(name=args.name), "stopped")


async def cmd_restart(bus: BusClient, args: argparse.Namespace) -> int:
    return await _operation(bus, args, RestartService(name=args.name), "restarted")


async def cmd_reload(bus: BusClient, args: argparse.Namespace) -> int:
    r = await bus.call("kernel", Reload(), Reloaded, timeout=args.timeout)
    if args.json:
        _print_json(r)
    else:
        for label, names in (("started", r.started), ("stopped", r.stopped), ("restarted", r.restarted)):
            print(f"{label}: {', '.join(names) or '-'}")
        print(f"unchanged: {len(r.unchanged)}")
    return 0


async def cmd_wait(bus: BusClient, args: argparse.Namespace) -> int:
    """Wait for a state: event-driven (kernel.services), checked against GetService."""
    sub = await bus.subscribe("kernel.services")
    s = None
    with anyio.move_on_after(args.timeout):
        while True:
            s = await bus.call("kernel", GetService(name=args.name), ServiceStatus, timeout=args.timeout)
            if s.state == args.state:
                if args.json:
                    _print_json(s)
                return 0
            await sub.receive()
    state = s.state if s else "unknown"
    print(f"busctl: {args.name} is {state!r} after {args.timeout:g}s, not {args.state!r}", file=sys.stderr)
    return EXIT_FAILED


# -- plumbing ----------------------------------------------------------------------------------


def _credential(args: argparse.Namespace) -> tuple[str, str]:
    """The endpoint and the operator credential: --bus with --credential-file (or
    EDGEBUS_CREDENTIAL_FILE), else the run directory's socket and credentials/operator."""
    if args.bus:
        endpoint, cred_file = args.bus, args.credential_file or os.environ.get("EDGEBUS_CREDENTIAL_FILE")
        if not cred_file:
            raise UsageError("with --bus, give --credential-file (or EDGEBUS_CREDENTIAL_FILE)")
    else:
        run_dir = args.run_dir or os.environ.get("EDGEBUS_RUN_DIR")
        if not run_dir:
            from kernel import default_dirs

            run_dir = str(default_dirs(None, None)[0])
        endpoint = endpoint_for_run_dir(run_dir)
        cred_file = args.credential_file or str(Path(run_dir) / "credentials" / "operator")
    try:
        return endpoint, Path(cred_file).read_text().strip()
    except FileNotFoundError:
        raise ConnectError(endpoint, f"no credential at {cred_file}; is edgebus running with that run directory?") from None
    except PermissionError:
        raise ConnectError(endpoint, f"cannot read {cred_file}: permission denied (run busctl as the kernel's user)") from None


async def _run(func: Callable[[BusClient, argparse.Namespace], Any], args: argparse.Namespace) -> int:
    endpoint, credential = _credential(args)
    async with connect("busctl", endpoint=endpoint, credential=credential,
                       connect_timeout=args.timeout) as bus:
        return await func(bus, args)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run-dir", help="the kernel's run directory (or EDGEBUS_RUN_DIR)")
    common.add_argument("--bus", help="bus endpoint, e.g. ipc:///run/edgebus/bus.sock")
    common.add_argument("--credential-file", help="credential to present (default: RUN_DIR/credentials/operator)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the bus (default 10)")
    parser = argparse.ArgumentParser(prog="busctl", description="Inspect and steer a running edgebus.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", parents=[common], help="services, their state, pid and restarts")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("status", parents=[common], help="one service in detail")
    p.add_argument("name")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("call", parents=[common], help="send a request: call SERVICE TYPE JSON")
    p.add_argument("service")
    p.add_argument("type")
    p.add_argument("body", nargs="?", default="{}")
    p.set_defaults(func=cmd_call)
    p = sub.add_parser("monitor", parents=[common], help="watch live traffic")
    p.add_argument("--service", help="only messages from or to this service")
    p.add_argument("--type", help="only this message type")
    p.add_argument("--topic", help="only events whose topic starts with this")
    p.add_argument("--limit", type=int, default=0, help="exit after N messages")
    p.set_defaults(func=cmd_monitor)
    p = sub.add_parser("introspect", parents=[common], help="a service's message types and schemas")
    p.add_argument("service")
    p.set_defaults(func=cmd_introspect)
    for name, func, text in (("start", cmd_start, "start a service and wait until it is ready"),
                             ("stop", cmd_stop, "stop a service (it stays stopped)"),
                             ("restart", cmd_restart, "restart a service (and its dependents under rest_for_one)")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("name")
        p.set_defaults(func=func, timeout=60.0)
    p = sub.add_parser("reload", parents=[common], help="re-read the config file, as SIGHUP does")
    p.set_defaults(func=cmd_reload, timeout=60.0)
    p = sub.add_parser("wait", parents=[common], help="wait until a service reaches a state")
    p.add_argument("name")
    p.add_argument("--state", default="ready",
                   choices=["starting", "ready", "stopping", "stopped", "backoff", "failed"])
    p.set_defaults(func=cmd_wait)
    p = sub.add_parser("caps", parents=[common],
                       help="the capability table (origin, expiry; '!' marks a revocation); "
                            "caps grant|revoke|reset NAME CAP")
    p.add_argument("words", nargs="*", metavar="[NAME | grant NAME CAP | revoke NAME CAP | reset NAME CAP]")
    p.add_argument("--ttl", type=float, help="with grant: seconds (> 0) until the grant expires; "
                                             "without: until revoked or reset")
    p.set_defaults(func=cmd_caps)
    p = sub.add_parser("audit", parents=[common], help="the audit log: tail, verify")
    p.add_argument("action", choices=["tail", "verify"])
    p.add_argument("-n", type=int, default=20, help="with tail: how many records")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("trust", parents=[common], help="model-signing keys: add, remove, list")
    p.add_argument("action", choices=["add", "remove", "list"])
    p.add_argument("key", nargs="?", help="add: ed25519 public key (hex); remove: key id")
    p.add_argument("--label")
    p.set_defaults(func=cmd_trust)
    p = sub.add_parser("attest", parents=[common], help="a signed attestation report (JSON)")
    p.add_argument("--nonce", help="a verifier's challenge to include")
    p.set_defaults(func=cmd_attest)
    p = sub.add_parser("metrics", parents=[common], help="every service's metrics (Prometheus text)")
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser("top", parents=[common], help="live view: services, message rates, CPU, RSS, queues")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--iterations", type=int, default=0, help="stop after N screens (0: until ^C)")
    p.set_defaults(func=cmd_top)
    p = sub.add_parser("infer", parents=[common], help="run a model on an input (.npy or an image)")
    p.add_argument("model")
    p.add_argument("--input", required=True)
    p.add_argument("--version")
    p.add_argument("--priority", type=int, default=1, choices=[0, 1, 2])
    p.add_argument("--key", help="request key for sticky A/B assignment")
    p.add_argument("--batch", action="store_true", help="add a batch axis of 1 to the input")
    p.set_defaults(func=cmd_infer)
    p = sub.add_parser("sched", parents=[common], help="scheduler queues, batches, drivers, degradation")
    p.set_defaults(func=cmd_sched)
    p = sub.add_parser("model", parents=[common], help="model bundles in the model store")
    p.add_argument("action", choices=["list", "install", "activate", "rollback", "split", "remove", "inspect"])
    p.add_argument("words", nargs="*", metavar="ARG")
    p.set_defaults(func=cmd_model)
    p = sub.add_parser("security", parents=[common], help="security enroll NAME CURVE_PUBLIC_KEY")
    p.add_argument("action", choices=["enroll"])
    p.add_argument("name")
    p.add_argument("public_key")
    p.set_defaults(func=cmd_security)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = anyio.run(_run, args.func, args)
    except UsageError as exc:
        print(f"busctl: {exc}", file=sys.stderr)
        code = 2
    except ConnectError as exc:
        print(f"busctl: {exc}", file=sys.stderr)
        code = EXIT_UNREACHABLE
    except RemoteError as exc:
        print(f"busctl: {args.command} failed: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    except BusError as exc:
        print(f"busctl: {exc}", file=sys.stderr)
        code = EXIT_UNREACHABLE
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
