"""busctl's commands that ask once and show the answer: services, calls, capabilities, the
audit log, trust, attestation, models, inference, the scheduler and metrics.  Each is
``async def cmd_x(bus, args, out) -> exit status``; ``args.deadline`` is the request's
deadline in seconds (see busctl's --deadline)."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec

from protocols import (
    CapabilityTable,
    GetService,
    Interface,
    Introspect,
    ListCapabilities,
    ListServices,
    ProtocolError,
    Reload,
    Reloaded,
    RestartService,
    ServiceList,
    ServiceStatus,
    StartService,
    StopService,
    check_tag,
)
from services import BusClient

from ._busctl_logs import show_status_tail, status_details, status_tail
from ._busctl_output import Output, plain
from ._busctl_schema import interface_lines

__all__ = [
    "UsageError", "EXIT_FAILED", "EXIT_TIMEOUT", "uptime_text", "read_json_object",
    "cmd_list", "cmd_status", "cmd_call", "cmd_introspect", "cmd_start", "cmd_stop", "cmd_restart",
    "cmd_reload", "cmd_wait", "cmd_caps", "cmd_audit", "cmd_trust", "cmd_attest", "cmd_security",
    "cmd_model", "cmd_infer", "cmd_stream", "cmd_sched", "cmd_metrics", "parse_metrics",
]

EXIT_FAILED = 1
EXIT_TIMEOUT = 6


class UsageError(Exception):
    """Bad input on the command line: busctl exits 2 with this message."""


def uptime_text(seconds: float) -> str:
    if not seconds:
        return ""
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def read_json_object(text: str, what: str, example: str) -> dict[str, Any]:
    """A JSON object typed on the command line (``-``: read from standard input)."""
    if text == "-":
        text = sys.stdin.read()
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"the {what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise UsageError(f"the {what} must be a JSON object, e.g. '{example}'")
    return value


# -- services ----------------------------------------------------------------------------------


async def cmd_list(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    reply = await bus.call("kernel", ListServices(), ServiceList, timeout=args.deadline)
    if out.json:
        out.emit(reply.services)
        return 0
    rows = [(s.name, s.state, s.pid or "", s.restarts, uptime_text(s.uptime), s.last_exit,
             ",".join(s.types)) for s in reply.services]
    out.line(out.table(rows, ("NAME", "STATE", "PID", "RESTARTS", "UPTIME", "LAST EXIT", "TYPES"),
                       styles={1: out.state}))
    return 0


async def cmd_status(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    s = await bus.call("kernel", GetService(name=args.name), ServiceStatus, timeout=args.deadline)
    tail = await status_tail(bus, args.name, args.deadline)  # its last log lines
    if out.json:
        out.emit({**plain(s), "logs": plain(tail)})
        return 0
    fields, shown = plain(s), status_details(s)  # since, command, memory as a person reads them
    width = max(map(len, fields))
    for key, value in fields.items():
        if key in shown:
            value = shown[key]
        elif isinstance(value, list):
            value = ", ".join(value) or "-"
        elif key == "uptime":
            value = uptime_text(value) or "-"
        elif key == "state":
            value = out.state(value)
        out.line(f"{key.replace('_', ' '):>{width}}: {value if value not in ('', None) else '-'}")
    show_status_tail(tail, out)
    return 0


async def cmd_call(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    body = read_json_object(args.body, "request body", '{"who": "world"}')
    body["type"] = args.type
    incoming = await bus.request(args.service, msgspec.msgpack.encode(body), type=args.type,
                                 timeout=args.deadline)
    # PROTOCOL.md 3.3: a reply whose body tag is not its header's type fails the call as a
    # protocol error (TypeMismatch: busctl says so and exits 1), as the SDK's call() does.
    check_tag(incoming.type, incoming.body)
    out.pretty(incoming.decode())
    return 0


async def cmd_introspect(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    iface = await bus.call("kernel", Introspect(name=args.service), Interface, timeout=args.deadline)
    if out.json:
        out.emit(iface)
        return 0
    out.line(f"service {iface.name}")
    for line in interface_lines(iface.types, iface.schema, iface.reply_schema):
        out.line(line)
    for topic in iface.publishes:
        out.line(f"  publishes {topic}")
    return 0


async def _operation(bus: BusClient, args: argparse.Namespace, out: Output, msg: msgspec.Struct, verb: str) -> int:
    s = await bus.call("kernel", msg, ServiceStatus, timeout=args.deadline)
    if out.json:
        out.emit(s)
    else:
        out.line(f"{s.name}: {verb}; state {out.state(s.state)}" + (f", pid {s.pid}" if s.pid else "")
                 + (f" ({s.last_exit})" if s.last_exit and s.state != "ready" else ""))
    return 0 if (s.state == "ready") == (verb != "stopped") else EXIT_FAILED


async def cmd_start(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    return await _operation(bus, args, out, StartService(name=args.name), "started")


async def cmd_stop(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    return await _operation(bus, args, out, StopService(name=args.name), "stopped")


async def cmd_restart(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    return await _operation(bus, args, out, RestartService(name=args.name), "restarted")


async def cmd_reload(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    r = await bus.call("kernel", Reload(), Reloaded, timeout=args.deadline)
    if out.json:
        out.emit(r)
    else:
        for label, names in (("started", r.started), ("stopped", r.stopped), ("restarted", r.restarted)):
            out.line(f"{label}: {', '.join(names) or '-'}")
        out.line(f"unchanged: {len(r.unchanged)}")
    return 0


async def cmd_wait(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    """Until the service is in the state: event-driven (kernel.services), checked with
    GetService; exit 6 when the deadline comes first."""
    end = time.monotonic() + args.deadline
    s = None
    async with bus.subscribe("kernel.services") as sub:
        with anyio.move_on_after(args.deadline):
            while True:
                s = await bus.call("kernel", GetService(name=args.name), ServiceStatus,
                                   timeout=max(end - time.monotonic(), 0.001))
                if s.state == args.state:
                    if out.json:
                        out.emit(s)
                    return 0
                await sub.receive()
    state = s.state if s else "unknown"
    print(f"busctl: {args.name} is {state!r} after {args.deadline:g}s, not {args.state!r}", file=sys.stderr)
    return EXIT_TIMEOUT


# -- capabilities and security -----------------------------------------------------------------

_CAPS_USAGE = ("usage: busctl caps [NAME] | caps grant NAME CAP [--ttl S] | caps revoke NAME CAP "
               "| caps reset NAME CAP")
_ORIGINS = {"config": "config", "grant": "run-time grant", "revocation": "run-time revocation"}


async def cmd_caps(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    words = list(args.words)
    if words and words[0] in ("grant", "revoke", "reset"):
        return await _caps_change(bus, args, out, words)
    if len(words) > 1 or args.ttl is not None:
        raise UsageError(_CAPS_USAGE)
    table = await bus.call("kernel", ListCapabilities(name=words[0] if words else ""), CapabilityTable,
                           timeout=args.deadline)
    principals: dict[str, list[dict[str, Any]]] = {}
    for name in sorted(table.entries or table.table):
        entries = table.entries.get(name)
        if entries is None:  # a kernel without origins: the effective patterns only
            principals[name] = [{"capability": c.lstrip("!"), "origin": "revocation" if c.startswith("!") else "config",
                                 "expires": None} for c in table.table[name]]
        else:
            principals[name] = [{"capability": e.capability, "origin": e.origin, "expires": e.expires or None}
                                for e in entries]
    if out.json:
        out.emit(principals)
        return 0
    rows: list[tuple[str, str, str, str]] = []
    for name, entries in principals.items():
        for e in entries:
            shown = f"!{e['capability']}" if e["origin"] == "revocation" else e["capability"]
            expires = e["expires"]
            expiry = (f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(expires))} "
                      f"(in {max(expires - time.time(), 0):.0f}s)" if expires
                      else "never" if e["origin"] == "grant" else "")
            rows.append((name, shown, _ORIGINS.get(e["origin"], e["origin"]), expiry))
        if not entries:
            rows.append((name, "(none: default deny)", "", ""))
    out.line(out.table(rows, ("PRINCIPAL", "CAPABILITY", "ORIGIN", "EXPIRES")))
    return 0


async def _caps_change(bus: BusClient, args: argparse.Namespace, out: Output, words: list[str]) -> int:
    from protocols.security import GrantCapability, Grants, ResetCapability, RevokeCapability

    verb = words[0]
    if len(words) != 3:
        raise UsageError(f"usage: busctl caps {verb} NAME CAPABILITY" + (" [--ttl S]" if verb == "grant" else ""))
    if args.ttl is not None and verb != "grant":
        raise UsageError(f"--ttl goes with caps grant, not caps {verb}")
    if args.ttl is not None and not (math.isfinite(args.ttl) and args.ttl > 0):
        raise UsageError(f"--ttl {args.ttl:g}: a grant lasts a number of seconds > 0; "
                         "leave --ttl out for a grant until revoked")
    name, cap = words[1], words[2]
    msg = {"grant": GrantCapability(name=name, capability=cap, ttl=args.ttl),
           "revoke": RevokeCapability(name=name, capability=cap),
           "reset": ResetCapability(name=name, capability=cap)}[verb]
    result = await bus.call("security", msg, Grants, timeout=args.deadline)
    if out.json:
        out.emit(result)
        return 0
    out.line({"grant": f"granted {cap} to {name}" + (f" for {args.ttl:g}s" if args.ttl is not None else ""),
              "revoke": f"revoked {cap} from {name}",
              "reset": f"reset {cap} of {name} to its configuration"}[verb])
    out.line(f"{name} now holds: {', '.join(result.effective) or '(nothing: default deny)'}")
    return 0


async def cmd_audit(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    from protocols.security import AuditRecords, AuditTail, AuditVerdict, AuditVerify

    if args.action == "tail":
        if args.n < 1:
            raise UsageError(f"-n {args.n}: show at least 1 record")
        records = (await bus.call("security", AuditTail(n=args.n), AuditRecords, timeout=args.deadline)).records
        if out.json:
            out.emit(records)
            return 0
        for r in records:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time))
            extra = " ".join(x for x in (r.capability, r.detail, f"by {r.by}" if r.by else "") if x)
            out.line(f"{r.seq:>6}  {stamp}  {r.kind:<22} {r.subject:<16} {extra}")
        return 0
    verdict = await bus.call("security", AuditVerify(), AuditVerdict, timeout=args.deadline)
    if out.json:
        out.emit(verdict)
    elif verdict.ok:
        out.line(f"audit log intact: {verdict.records} records in {verdict.files} file(s), "
                 f"{verdict.checkpoints} signed checkpoint(s)")
    else:
        print(f"busctl: audit log broken at {verdict.where}: {verdict.problem} "
              f"({verdict.records} records before it are intact)", file=sys.stderr)
    return 0 if verdict.ok else EXIT_FAILED


async def cmd_trust(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    from protocols.security import TrustAdd, TrustedKeys, TrustList, TrustRemove

    if args.action == "add":
        if not args.key:
            raise UsageError("usage: busctl trust add PUBLIC_KEY_HEX [--label L] [--role model|fleet]")
        msg: msgspec.Struct = TrustAdd(public_key=args.key, label=args.label or "", role=args.role)
    elif args.action == "remove":
        if not args.key:
            raise UsageError("usage: busctl trust remove KEY_ID")
        msg = TrustRemove(key_id=args.key)
    else:
        msg = TrustList()
    keys = (await bus.call("security", msg, TrustedKeys, timeout=args.deadline)).keys
    if out.json:
        out.emit(keys)
    elif args.action == "list":
        out.line(out.table([(k.key_id, k.label, k.role, k.source, k.public_key) for k in keys],
                           ("KEY ID", "LABEL", "ROLE", "SOURCE", "PUBLIC KEY")))
    else:
        out.line(f"{args.action}{'ed' if args.action == 'add' else 'd'} {keys[0].key_id} {keys[0].label}".rstrip())
    return 0


async def cmd_attest(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    from protocols.security import Attest, SignedReport

    signed = await bus.call("security", Attest(nonce=args.nonce or ""), SignedReport, timeout=args.deadline)
    out.pretty(signed)  # JSON in every mode: it is meant for `edgebus attest verify`
    return 0


_SECURITY_USAGE = "usage: busctl security list [NAME] | enroll NAME KEY | unenroll NAME | reset NAME"
_KEY_ORIGINS = {"config": "config", "enrolment": "run-time enrolment", "unenrolment": "run-time unenrolment"}


async def cmd_security(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    """CURVE enrolment of tcp peers: run-time decisions (enroll, unenroll) win over the
    configuration's keys until reset; list shows each key and where it comes from."""
    from protocols import Enrollments, ListEnrollments
    from protocols.security import Enrolled, EnrollKey, ResetEnrollment, UnenrollKey

    action, name, key = args.action, args.name, args.public_key
    if action == "list":
        if key is not None:
            raise UsageError(_SECURITY_USAGE)
    elif name is None or (action == "enroll") != (key is not None):
        raise UsageError(f"usage: busctl security {action} NAME" + (" KEY" if action == "enroll" else ""))
    if action == "enroll" and not key:
        raise UsageError(f"an empty key does not unenroll: busctl security unenroll {name}")
    if action != "list":
        msg = {"enroll": EnrollKey(name=name, public_key=key or ""), "unenroll": UnenrollKey(name=name),
               "reset": ResetEnrollment(name=name)}[action]
        result = await bus.call("security", msg, Enrolled, timeout=args.deadline)
        if out.json:
            out.emit(result)
            return 0
        out.line({"enroll": f"enrolled {name}: it may connect over tcp with CURVE key {key} (until reset)",
                  "unenroll": f"unenrolled {name}: it may not connect over tcp (until reset); "
                              "a session it had has ended",
                  "reset": f"reset the enrolment of {name}: its configuration applies again"}[action])
    listing = await bus.call("kernel", ListEnrollments(name=name or ""), Enrollments, timeout=args.deadline)
    if out.json:
        if action == "list":
            out.emit(listing.entries)
        return 0
    out.line(out.table([(e.name, e.public_key, _KEY_ORIGINS.get(e.origin, e.origin),
                         e.config_key if e.config_key and e.config_key != e.public_key else "",
                         "connected" if e.connected else "") for e in listing.entries],
                       ("NAME", "CURVE KEY", "ORIGIN", "CONFIG KEY", "SESSION")))
    return 0


# -- models, inference, scheduler, metrics ------------------------------------------------------


async def cmd_model(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    from protocols.modelstore import (
        Activate, AssetBytes, GetAsset, InspectModel, Install, Installed, ListModels, ModelList, ModelManifest,
        ModelState, Remove, Rollback, Split,
    )

    words, action = list(args.words), args.action

    def need(n: int, usage: str) -> None:
        if len(words) != n:
            raise UsageError(f"usage: busctl model {action} {usage}")

    if action == "list":
        need(0, "")
        models = (await bus.call("modelstore", ListModels(), ModelList, timeout=args.deadline)).models
        if out.json:
            out.emit(models)
        else:
            out.line(out.table([(m.name, m.active, m.trial and "trial" or ("ok" if m.active else ""), m.previous,
                                 " ".join(f"{v}={w:g}" for v, w in m.split.items()), _variants_shown(m),
                                 " ".join(m.versions))
                                for m in models],
                               ("MODEL", "ACTIVE", "STATUS", "PREVIOUS", "SPLIT", "VARIANT", "VERSIONS")))
        return 0
    if action == "install":
        need(1, "BUNDLE.ebm")
        try:
            data = Path(words[0]).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {words[0]}: {exc.strerror}") from exc
        incoming = await bus.request("modelstore", Install(), frames=[data], timeout=args.deadline)
        result: msgspec.Struct = incoming.decode(Installed)
    elif action == "inspect":
        if len(words) not in (1, 2):
            raise UsageError("usage: busctl model inspect NAME [VERSION]")
        manifest = await bus.call("modelstore", InspectModel(name=words[0], version=words[1] if len(words) > 1 else ""),
                                  ModelManifest, timeout=args.deadline)
        out.pretty(manifest)  # JSON in every mode: a manifest is a document
        return 0
    elif action == "asset":
        if len(words) not in (2, 3):
            raise UsageError("usage: busctl model asset MODEL ASSET [FILE] (no FILE: the bytes on standard output)")
        incoming = await bus.request("modelstore", GetAsset(name=words[0], asset=words[1]), timeout=args.deadline)
        asset = incoming.decode(AssetBytes)
        frame = incoming.frames[0] if incoming.frames else b""
        data = bytes(frame.buffer if hasattr(frame, "buffer") else frame)
        if hashlib.sha256(data).hexdigest() != asset.sha256:
            raise ProtocolError(f"asset {asset.asset} of {asset.name} {asset.version} arrived with another sha256 "
                                f"than the manifest's {asset.sha256[:16]}...")
        if len(words) == 2:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return 0
        try:
            Path(words[2]).write_bytes(data)
        except OSError as exc:
            raise UsageError(f"cannot write {words[2]}: {exc.strerror}") from exc
        if out.json:
            out.emit({**plain(asset), "file": words[2]})
        else:
            out.line(f"asset {asset.asset} of {asset.name} {asset.version}: {len(data)} bytes"
                     + (f" ({asset.media_type})" if asset.media_type else "") + f" written to {words[2]}")
        return 0
    elif action == "activate":  # NAME VERSION | NAME [VERSION] variant VARIANT (a variant trial)
        variant = ""
        if len(words) in (3, 4) and words[-2] == "variant":
            variant, words = words[-1], words[:-2]
            if len(words) == 1:
                words.append("")  # the active version
        if len(words) != 2:
            raise UsageError("usage: busctl model activate NAME VERSION | NAME [VERSION] variant VARIANT")
        result = await bus.call("modelstore", Activate(name=words[0], version=words[1], variant=variant), ModelState,
                                timeout=args.deadline)
    elif action == "rollback":
        need(1, "NAME")
        result = await bus.call("modelstore", Rollback(name=words[0]), ModelState, timeout=args.deadline)
    elif action == "remove":
        need(2, "NAME VERSION")
        result = await bus.call("modelstore", Remove(name=words[0], version=words[1]), ModelState,
                                timeout=args.deadline)
    else:  # split NAME V=W ... | split NAME variants VARIANT=W ...
        if len(words) < 1:
            raise UsageError("usage: busctl model split NAME VERSION=WEIGHT ... (none: back to the active version) | "
                             "split NAME variants VARIANT=WEIGHT ... (the active version's variants; none: back to "
                             "its default variant)")
        variants = len(words) > 1 and words[1] == "variants"
        what = "VARIANT" if variants else "VERSION"
        weights = {}
        for item in words[2 if variants else 1:]:
            version, sep, weight = item.partition("=")
            try:
                weights[version] = float(weight)
            except ValueError:
                raise UsageError(f"{item!r} is not {what}=WEIGHT") from None
            if not sep or not math.isfinite(weights[version]) or weights[version] < 0:
                raise UsageError(f"{item!r} is not {what}=WEIGHT (a weight >= 0)")
        result = await bus.call("modelstore", Split(name=words[0], weights=weights, variants=variants), ModelState,
                                timeout=args.deadline)
    if out.json:
        out.emit(result)
    elif isinstance(result, Installed):
        out.line(f"installed {result.name} {result.version} (variants {', '.join(result.variants)}; "
                 f"signed by {result.key_id}); activate it with: busctl model activate {result.name} {result.version}")
    else:
        state: Any = result
        out.line(f"{state.name}: active {state.active or '-'}" + (" (in trial)" if state.trial else "")
                 + (f", previous {state.previous}" if state.previous else "")
                 + (f", split {' '.join(f'{v}={w:g}' for v, w in state.split.items())}" if state.split else "")
                 + (f", variant {_variants_shown(state)}" if state.active else ""))
    return 0


def _variants_shown(state: Any) -> str:
    """The active version's variants as ``busctl model`` shows them: ``int8``, ``small (in
    trial against full)``, ``full=90 int8=10 (int8 in trial against full)``."""
    if not state.active:
        return ""
    shown = (" ".join(f"{v}={w:g}" for v, w in state.variant_split.items()) if state.variant_split
             else state.variant_trial or state.default_variant(state.active))
    if state.variant_trial:
        shown += (f" ({state.variant_trial} in trial" if state.variant_split else " (in trial") \
            + f" against {state.default_variant(state.active)})"
    return shown


async def _contract_inputs(bus: BusClient, args: argparse.Namespace) -> list[Any] | None:
    """The inputs a client sends the model (its manifest's, with its pre ops folded in), or
    None when the model store cannot say (the scheduler will judge the inputs alone): for
    ``busctl infer`` and ``busctl stream``."""
    from protocols.modelstore import InspectModel, ModelManifest
    from services import RemoteError

    try:
        found = await bus.call("modelstore", InspectModel(name=args.model, version=args.version or ""),
                               ModelManifest, timeout=args.deadline)
    except RemoteError:
        return None
    manifest = found.manifest
    if manifest.pre or manifest.post:
        try:
            from drivers.ops import OpsError, check_chains  # the ops' declarations: what a pre chain takes
        except ImportError:
            return list(manifest.inputs)
        try:
            return list(check_chains(manifest).inputs)
        except OpsError:
            return list(manifest.inputs)
    return list(manifest.inputs)


async def cmd_infer(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    import numpy as np

    from protocols import pack_tensors
    from services.scheduler import Infer, InferResult

    from ._busctl_tensors import (
        InputError, contract_spec, fit_input, load_input, name_inputs, output_json, parse_value, show_output,
        split_input,
    )

    if not (args.input or args.value):
        raise UsageError("busctl infer MODEL needs inputs: --input [NAME=]FILE (each), --value NAME=NUMBER[:DTYPE]")
    try:
        given: list[tuple[str, Any]] = [(name, load_input(path)) for name, path in map(split_input, args.input)]
        contract = await _contract_inputs(bus, args)
        specs = contract or []
        given += [parse_value(v, contract_spec(specs, v.partition("=")[0])) for v in args.value]
        if contract is not None:
            named = name_inputs(given, contract, args.model)
            tensors: Any = {n: fit_input(a, contract_spec(contract, n), force_batch=args.batch)
                            for n, a in named.items()}
        elif all(n for n, _ in given):
            tensors = {n: fit_input(a, None, force_batch=args.batch) for n, a in given}
        elif not any(n for n, _ in given):
            tensors = [fit_input(a, None, force_batch=args.batch) for _, a in given]
        else:
            raise InputError(f"the model store could not say what {args.model} takes: name every input "
                             "(--input NAME=FILE) or none")
    except InputError as exc:
        raise UsageError(str(exc)) from None
    descs, frames = pack_tensors(tensors)
    incoming = await bus.request("scheduler", Infer(model=args.model, tensors=descs, version=args.version or "",
                                                    priority=args.priority, key=args.key or "",
                                                    variant=args.variant or "", outputs=list(args.only)),
                                 frames=frames, timeout=args.deadline)
    result = incoming.decode(InferResult)
    outputs = [(t.name or f"output{i}", np.asarray(incoming.tensor(t))) for i, t in enumerate(result.outputs)]
    if out.json:
        out.emit({**plain(result), "outputs": {name: output_json(name, o) for name, o in outputs}})
        return 0
    if result.stages:  # a graph of the scheduler's (a pipeline): its stages' models, items and times
        out.line(f"{result.model} (graph; {result.version or 'no model ran'}) on {result.driver or '-'}: "
                 f"batch {result.batch}, queue {result.queue_ms:.2f} ms, compute {result.compute_ms:.2f} ms, "
                 f"total {result.total_ms:.2f} ms")
        for t in result.stages:
            out.line(f"  stage {t.stage} ({t.model}): {t.items} item{'' if t.items == 1 else 's'}, {t.ms:.2f} ms")
    else:
        out.line(f"{result.model} {result.version} ({result.variant}, level {result.level}) on {result.driver}: "
                 f"batch {result.batch}, queue {result.queue_ms:.2f} ms, compute {result.compute_ms:.2f} ms, "
                 f"total {result.total_ms:.2f} ms")
    for name, o in outputs:
        for line in show_output(name, o, out.width):
            out.line(line)
    return 0


#: samples per chunk when the model's chunk input has no fixed size (32 ms at 16 kHz)
STREAM_CHUNK = 512


def _chunk_shape(spec: Any, chunk: int | None) -> tuple[int, list[int]]:
    """How the samples fill one chunk of the input ``spec``: (samples per chunk, the array's
    shape): a batch axis of 1, fixed sizes kept, the one free axis the samples (``chunk``,
    else the fixed sizes' product, else STREAM_CHUNK)."""
    if spec is None:
        n = chunk or STREAM_CHUNK
        return n, [1, n]
    axis = spec.batch()
    dims = [1 if i == axis else d for i, d in enumerate(spec.shape)]
    free = [i for i, d in enumerate(dims) if not isinstance(d, int)]
    fixed = int(math.prod(d for d in dims if isinstance(d, int)))
    if len(free) > 1:
        raise UsageError(f"input {spec.name!r} is {spec.describe()}: busctl stream fills one axis of free size with "
                         "the samples, this input has several")
    if not free:
        if not spec.shape:
            raise UsageError(f"input {spec.name!r} is a scalar ({spec.describe()}): it cannot take the file's samples")
        if chunk is not None and chunk != fixed:
            raise UsageError(f"--chunk {chunk}: input {spec.name!r} is {spec.describe()}, it takes {fixed} samples "
                             "a chunk")
        return fixed, [int(d) for d in dims]
    n = chunk or STREAM_CHUNK * fixed
    if n % fixed:
        raise UsageError(f"--chunk {n}: input {spec.name!r} is {spec.describe()}, so a chunk is a multiple of {fixed} "
                         "samples")
    return n, [n // fixed if i == free[0] else int(d) for i, d in enumerate(dims)]


def _chunk_text(name: str, arr: Any) -> str:
    """One output of one chunk, on part of a line: its values when small, else a summary."""
    import numpy as np

    from ._busctl_tensors import SHOW_IN_FULL, decode_text, is_text, summarise

    if is_text(name, arr):
        try:
            return f"{name}={decode_text(arr)!r}"
        except ValueError:
            pass
    if arr.size <= SHOW_IN_FULL:
        values = arr.reshape(-1) if arr.size == 1 else arr
        text = np.array2string(values, separator=",", threshold=SHOW_IN_FULL + 1, max_line_width=10_000,
                               formatter={"float_kind": lambda x: f"{x:.4g}"})
        return f"{name}={text.replace(chr(10), '')}"
    s = summarise(arr)
    fmt = lambda x: "-" if x is None else f"{x:.4g}"  # noqa: E731
    top = f" top {s['top'][0][0]}" if "top" in s else ""
    return (f"{name}: {arr.dtype.name} {list(arr.shape)} min {fmt(s['min'])} max {fmt(s['max'])} "
            f"mean {fmt(s['mean'])}{top}")


def _percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


async def cmd_stream(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    """A .wav file through a stateful stream, chunk by chunk: as fast as the answers come
    or (--realtime) one chunk per chunk period on a monotonic schedule; one line per chunk,
    a summary at the end; the stream is closed however busctl ends (Ctrl-C, a closed pipe)."""
    import wave

    import numpy as np

    from protocols import pack_tensors
    from services import BusError, RemoteError
    from services.scheduler import CloseStream, Infer, InferResult, OpenStream, StreamClosed, StreamOpened

    from ._busctl_tensors import InputError, contract_spec, output_json, parse_value, read_wav

    if args.chunk is not None and args.chunk < 1:
        raise UsageError(f"--chunk {args.chunk}: give a number of samples >= 1")
    try:
        samples = read_wav(args.input)
        with wave.open(str(args.input), "rb") as w:
            rate = w.getframerate()
    except InputError as exc:
        raise UsageError(str(exc)) from None
    except (OSError, EOFError, wave.Error) as exc:
        raise UsageError(f"cannot read {args.input} as a .wav file: {exc}") from None
    if not samples.size:
        raise UsageError(f"{args.input} holds no samples")
    specs = await _contract_inputs(bus, args) or []
    notes: list[str] = []
    try:
        params = dict(parse_value(v, contract_spec(specs, v.partition("=")[0])) for v in args.value)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    sr = contract_spec(specs, "sr")
    if sr is not None and "sr" not in params and sr.dtype == "int64" and sr.batch() is None \
            and all(d == 1 for d in sr.shape):
        params["sr"] = np.full([int(d) for d in sr.shape], rate, dtype=np.int64)
        notes.append(f"sr={rate}: the file's sample rate (give --value sr=N to set another)")

    descs, frames = pack_tensors(params) if params else ([], [])
    incoming = await bus.request("scheduler", OpenStream(model=args.model, tensors=descs, version=args.version or "",
                                                         topic=args.topic or "", outputs=list(args.only)),
                                 frames=frames, timeout=args.deadline)
    opened = incoming.decode(StreamOpened)
    latencies: list[float] = []
    late: list[float] = []
    resets: list[tuple[int, str]] = []
    done, chunks, period, interrupted = 0, -1, 0.0, False
    t_start = time.monotonic()
    try:
        if len(opened.inputs) != 1:
            raise UsageError(f"{args.model}'s chunks carry {len(opened.inputs)} inputs "
                             f"({', '.join(map(repr, opened.inputs))}): busctl stream feeds one, from the .wav file")
        name = opened.inputs[0]
        per_chunk, shape = _chunk_shape(contract_spec(specs, name), args.chunk)
        chunks = -(-samples.size // per_chunk)
        pad = chunks * per_chunk - samples.size
        padded = np.zeros(chunks * per_chunk, dtype=np.float32)
        padded[:samples.size] = samples
        if pad:
            notes.append(f"the last chunk is zero-padded with {pad} samples")
        period = per_chunk / rate
        head = {"stream": opened.stream, "model": opened.model, "version": opened.version, "driver": opened.driver,
                "file": str(args.input), "rate": rate, "seconds": samples.size / rate, "chunks": chunks,
                "chunk_samples": per_chunk, "chunk_ms": period * 1e3, "realtime": bool(args.realtime),
                "topic": args.topic or "", "notes": notes}
        if out.json:
            out.emit({"kind": "opened", **head}, flush=True)
        else:
            out.line(f"stream {opened.stream}: {opened.model} {opened.version} on {opened.driver or '?'}, "
                     f"{args.input} ({rate} Hz, {samples.size / rate:.2f} s) in {chunks} chunks of {per_chunk} "
                     f"samples ({period * 1e3:.1f} ms)" + (", in real time" if args.realtime else "")
                     + (f"; results also on {args.topic}" if args.topic else ""), flush=True)
            for note in notes:
                out.line(f"  note: {note}", flush=True)
        t_start = time.monotonic()
        for i in range(chunks):
            due = t_start + i * period
            if args.realtime:
                await anyio.sleep(max(due - time.monotonic(), 0.0))  # the schedule is absolute: no drift
            tensors = {name: padded[i * per_chunk:(i + 1) * per_chunk].reshape(shape)}
            cdescs, cframes = pack_tensors(tensors)
            sent = time.monotonic()
            reply = await bus.request("scheduler", Infer(model=args.model, tensors=cdescs, stream=opened.stream),
                                      frames=cframes, timeout=args.deadline)
            answered = time.monotonic()
            done += 1
            result = reply.decode(InferResult)
            latency = (answered - sent) * 1e3
            latencies.append(latency)
            if args.realtime:
                late.append((answered - due) * 1e3)
            if result.reset:
                resets.append((result.seq, result.reset))
            outputs = [(t.name or f"output{j}", np.asarray(reply.tensor(t))) for j, t in enumerate(result.outputs)]
            if out.json:
                out.emit({"kind": "chunk", "seq": result.seq, "time_s": i * period, "latency_ms": latency,
                          **({"late_ms": late[-1]} if args.realtime else {}), "batch": result.batch,
                          "queue_ms": result.queue_ms, "compute_ms": result.compute_ms, "driver": result.driver,
                          "reset": result.reset,
                          "outputs": {n: output_json(n, o) for n, o in outputs}}, flush=True)
            else:
                if result.reset:
                    out.line(out.paint(f"  reset before chunk {result.seq}: {result.reset}", "yellow"), flush=True)
                out.line(f"{result.seq:>6} {i * period:9.3f}s  " + "  ".join(_chunk_text(n, o) for n, o in outputs)
                         + f"  ({latency:.2f} ms, batch {result.batch})", flush=True)
    except (KeyboardInterrupt, anyio.get_cancelled_exc_class()):
        interrupted = True  # Ctrl-C: the stream is closed and what was done summed up, then busctl exits 130
        raise
    finally:
        closed = None
        with anyio.CancelScope(shield=True), anyio.move_on_after(min(args.deadline, 5.0)):
            try:
                closed = (await bus.request("scheduler", CloseStream(stream=opened.stream),
                                            timeout=min(args.deadline, 5.0))).decode(StreamClosed)
            except (BusError, RemoteError):
                pass  # gone already (the scheduler restarted, or the stream expired): nothing to close
        if done == chunks or interrupted:
            _stream_summary(out, opened.stream, time.monotonic() - t_start, latencies, late, resets, closed,
                            period if args.realtime else None, interrupted)
    return 0


def _stream_summary(out: Output, stream: str, wall: float, latencies: list[float], late: list[float],
                    resets: list[tuple[int, str]], closed: Any, period: float | None, interrupted: bool) -> None:
    """busctl stream's last line: chunks, latency, lateness (in real time), resets."""
    summary: dict[str, Any] = {
        "kind": "summary", "stream": stream, "chunks": len(latencies), "seconds": wall, "interrupted": interrupted,
        "latency_ms": {"mean": sum(latencies) / len(latencies) if latencies else None,
                       "p50": _percentile(latencies, 50), "p99": _percentile(latencies, 99),
                       "max": max(latencies) if latencies else None},
        "resets": [{"seq": s, "reason": r} for s, r in resets], "closed": closed is not None}
    if period is not None:
        summary["late_chunks"] = sum(1 for x in late if x > period * 1e3)
        summary["max_late_ms"] = max(late) if late else None
    if out.json:
        out.emit(summary, flush=True)
        return
    lat = {k: "-" if v is None else f"{v:.2f} ms" for k, v in summary["latency_ms"].items()}
    out.line(("interrupted after " if interrupted else "") + f"{len(latencies)} chunks in {wall:.2f} s: latency "
             f"mean {lat['mean']}, p50 {lat['p50']}, p99 {lat['p99']}, max {lat['max']}; "
             + (f"answered more than a chunk period after it was due: {summary['late_chunks']}; "
                if period is not None else "")
             + f"resets: {len(resets)}; stream " + ("closed" if closed else "not closed (it expires when idle)"),
             flush=True)


async def cmd_sched(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    from services.scheduler import GetSchedule, Schedule

    s = await bus.call("scheduler", GetSchedule(), Schedule, timeout=args.deadline)
    if out.json:
        out.emit(s)
        return 0
    names = {0: "full", 1: "smaller variant", 2: "rule-based fallback"}
    out.line(f"degradation level {s.level} ({names.get(s.level, '?')})" + (f": {s.pressure}" if s.pressure else ""))
    out.line(out.table([(m.model, m.depth, m.served, m.expired, m.failed, m.batches, m.mean_batch,
                         "inline" if m.inline else "drivers", m.batching) for m in s.models],
                       ("MODEL", "QUEUED", "SERVED", "EXPIRED", "FAILED", "BATCHES", "MEAN BATCH", "RUNS ON",
                        "BATCHING")))
    out.line(out.table([(d.name, "up" if d.up else "down", d.in_flight, d.batches,
                         "" if d.temperature_c is None else f"{d.temperature_c:.0f} C") for d in s.drivers],
                       ("DRIVER", "STATE", "IN FLIGHT", "BATCHES", "TEMPERATURE")))
    return 0


def parse_metrics(text: str) -> list[dict[str, Any]]:
    """The Prometheus exposition text as metric families: name, type, help and samples
    (name, labels, value as a number)."""
    families: dict[str, dict[str, Any]] = {}

    def family(name: str) -> dict[str, Any]:
        return families.setdefault(name, {"name": name, "type": "untyped", "help": "", "samples": []})

    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, what, rest = line.split(" ", 2)
            name, _, value = rest.partition(" ")
            family(name)["help" if what == "HELP" else "type"] = value
            continue
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, labels = series, {}
        if "{" in series:
            name, _, inner = series.partition("{")
            labels = _labels(inner.rstrip("}"))
        base = name
        for suffix in ("_bucket", "_count", "_sum", "_total", "_created"):
            if name.endswith(suffix) and name[: -len(suffix)] in families:
                base = name[: -len(suffix)]
                break
        try:
            number: float | None = float(value)
        except ValueError:
            continue
        family(base)["samples"].append({"name": name, "labels": labels, "value": number})
    return list(families.values())


def _labels(inner: str) -> dict[str, str]:
    labels, i = {}, 0
    while i < len(inner):
        eq = inner.index("=", i)
        key = inner[i:eq].strip().lstrip(",").strip()
        j, value = eq + 2, []
        while j < len(inner) and inner[j] != '"':
            if inner[j] == "\\" and j + 1 < len(inner):
                j += 1
                value.append({"n": "\n"}.get(inner[j], inner[j]))
            else:
                value.append(inner[j])
            j += 1
        labels[key] = "".join(value)
        i = j + 1
        while i < len(inner) and inner[i] in ", ":
            i += 1
    return labels


async def cmd_metrics(bus: BusClient, args: argparse.Namespace, out: Output) -> int:
    from protocols.telemetry import GetMetrics, MetricsText

    text = (await bus.call("telemetry", GetMetrics(), MetricsText, timeout=args.deadline)).text
    if out.json:
        out.emit(parse_metrics(text))
    else:
        out.stream.write(text)
    return 0
