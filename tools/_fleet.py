"""``edgebus fleet``: the operator's side of the fleet (DESIGN.md "Fleet", issue 16).

The controller keeps its state in one SQLite file (``--state``, default
``$XDG_STATE_HOME/edgebus/fleet.sqlite``) and reaches devices only through the MQTT broker
(``--broker HOST:PORT``; mutual TLS with ``--ca --cert --key``).  The broker options given
last are remembered in the state, so later commands need not repeat them.

Exit status: 0 ok; 1 the operation failed (a rollout halted, stalled or was rolled back
under ``deploy --follow``; a deployment not in a state that allows it); 2 usage (bad option,
file or policy; no signing key); 3 cannot reach the broker; 4 no such group, device,
deployment or artifact; 5 the state file cannot be used.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from protocols import fleet
from protocols.fleet import ReportedState, Topics

from ._fleet_broker import BrokerError, BrokerOptions, Link, parse_broker
from ._fleet_controller import Controller, FleetError, view_of
from ._fleet_rollout import Policy, PolicyError, check_device, parse_canary, parse_gate
from ._fleet_state import State, StateError

__all__ = ["add_commands", "main"]

EXIT_FAILED, EXIT_USAGE, EXIT_BROKER, EXIT_MISSING, EXIT_STATE = 1, 2, 3, 4, 5


class Usage(Exception):
    pass


def _default_state() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "edgebus" / "fleet.sqlite")


# -- plumbing ----------------------------------------------------------------------------------


class Ctx:
    """What every command uses: the state, the broker options, the output."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json = args.output in ("json", "json-pretty")
        self.pretty = args.output == "json-pretty"
        self.state = State(args.state)
        if args.prefix is not None and (not args.prefix.strip("/") or any(c in args.prefix for c in "+#")):
            raise FleetError(f"--prefix {args.prefix!r}: topic levels without + or #, e.g. edgebus/fleet", EXIT_USAGE)
        self.topics = Topics(args.prefix or self.state.meta("prefix", fleet.DEFAULT_PREFIX))
        if args.prefix:
            self.state.set_meta("prefix", args.prefix)
        self._link: Link | None = None
        self._given: dict[str, Any] | None = None

    def options(self) -> BrokerOptions:
        a, s = self.args, self.state
        saved = json.loads(s.meta("broker", "{}"))
        if a.broker:
            host, port = parse_broker(a.broker)
            saved.update(host=host, port=port)
        for name in ("ca", "cert", "key"):
            value = getattr(a, name)
            if value:
                saved[name] = str(Path(value).resolve())
        if not saved.get("host"):
            raise FleetError("no broker: give --broker HOST:PORT (remembered in the state afterwards)", EXIT_USAGE)
        self._given = saved if (a.broker or a.ca or a.cert or a.key) else None
        return msgspec.convert(saved, BrokerOptions)

    def link(self) -> Link:
        if self._link is None:
            self._link = Link(self.options()).connect(timeout=self.args.timeout)
            if self._given is not None:  # they work: remembered
                self.state.set_meta("broker", json.dumps(self._given))
        return self._link

    def controller(self, *, broker: bool = True, signing: bool = False) -> Controller:
        key = self.signing_key() if signing else None
        return Controller(self.state, self.link() if broker else None, self.topics, private_key=key,
                          fleet_id=self.state.meta("fleet", "edgebus"), log=self.log)

    def key_path(self) -> Path:
        if self.args.signing_key:
            return Path(self.args.signing_key)
        return Path(self.args.state).with_suffix(".signing-key")

    def signing_key(self) -> bytes:
        path = self.key_path()
        try:
            raw = bytes.fromhex(path.read_text().split()[0])
            if len(raw) != 32:
                raise ValueError
        except FileNotFoundError:
            raise FleetError(f"no fleet signing key at {path}: run `edgebus fleet keygen` first "
                             "(or give --signing-key)", EXIT_USAGE) from None
        except (ValueError, IndexError):
            raise FleetError(f"{path} is not an ed25519 private key (64 hex characters, from "
                             "`edgebus fleet keygen`)", EXIT_USAGE) from None
        return raw

    def log(self, line: str) -> None:
        if not self.args.quiet:
            stamp = datetime.datetime.now().strftime("%H:%M:%S")
            print(f"{stamp} {line}", file=sys.stderr, flush=True)

    def emit(self, obj: Any) -> None:
        data = msgspec.to_builtins(obj)
        print(json.dumps(data, indent=2 if self.pretty else None, separators=None if self.pretty else (",", ":"),
                         ensure_ascii=False))

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
        self.state.close()


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [["-" if c in ("", None) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "never"
    d = max(0.0, now - t)
    if d < 90:
        return f"{d:.0f}s ago"
    if d < 5400:
        return f"{d / 60:.0f}m ago"
    if d < 172800:
        return f"{d / 3600:.0f}h ago"
    return f"{d / 86400:.0f}d ago"


# -- commands ----------------------------------------------------------------------------------


def cmd_keygen(ctx: Ctx) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    path = ctx.key_path()
    if path.exists() and not ctx.args.force:
        raise FleetError(f"{path} exists: devices trust its public key; pass --force to replace it (every "
                         "device must then trust the new one)", EXIT_USAGE)
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.private_bytes_raw().hex() + "\n")
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    if ctx.args.fleet:
        if not fleet.NAME.match(ctx.args.fleet):
            raise FleetError(f"--fleet {ctx.args.fleet!r}: letters, digits, '_.:-'", EXIT_USAGE)
        ctx.state.set_meta("fleet", ctx.args.fleet)
    ctx.state.set_meta("public_key", public.hex())
    if ctx.json:
        ctx.emit({"public_key": public.hex(), "key_id": fleet.key_id(public), "private_key_file": str(path),
                  "fleet": ctx.state.meta("fleet", "edgebus")})
    else:
        print(public.hex())
        print(f"the fleet signing key is in {path} (mode 0600); put the public key above in each device's trust "
              f"store with role fleet (key id {fleet.key_id(public)})", file=sys.stderr)
    return 0


def _device_rows(ctx: Ctx) -> list[dict[str, Any]]:
    now = time.time()
    out = []
    for row in ctx.state.devices():
        report = row.decoded("reported", ReportedState)
        requested: list[str] = []
        attested = "no"
        enrol = row.decoded("enrol", fleet.Enrolment)
        if enrol is not None:
            requested = list(enrol.groups)
            if enrol.attestation is not None:
                attested = "valid" if _attestation_ok(enrol) else "INVALID"
        item: dict[str, Any] = {"device": row.id, "groups": row.groups, "requested_groups": requested,
                                "enrolled": row.enrolled_at is not None, "public_key": row.pubkey,
                                "attestation": attested, "last_seen": row.last_seen,
                                "last_seen_ago": _ago(row.last_seen, now)}
        presence = row.decoded("presence", fleet.Presence)
        # online: as its presence topic (its MQTT will) says; null: it never published one
        item.update(online=presence.online if presence is not None else None,
                    presence_changed=row.presence_at if presence is not None else None)
        if report is not None:
            item.update(reported=report.time, reported_ago=_ago(report.time, now),
                        applied_version=report.applied_version,
                        models={m.name: m.active for m in report.models},
                        deployment=(msgspec.to_builtins(report.current) if report.current else None),
                        refused=(msgspec.to_builtins(report.refused) if report.refused else None),
                        config_digest=report.config_digest,
                        health=(msgspec.to_builtins(report.health) if report.health else None))
        out.append(item)
    return out


def _attestation_ok(enrol: Any) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(enrol.public_key))
        key.verify(bytes.fromhex(enrol.attestation.signature), msgspec.json.encode(enrol.attestation.report))
        return True
    except (ValueError, InvalidSignature):
        return False


def _health(h: dict[str, Any] | None) -> str:
    if not h:
        return ""
    ready, total = h.get("services_ready", 0), h.get("services_total", 0)
    failing = h.get("failing") or []
    return f"{ready}/{total} ready" + (f", failing {','.join(failing)}" if failing else "")


def cmd_devices(ctx: Ctx) -> int:
    if not ctx.args.cached:
        ctx.controller().refresh()
    rows = _device_rows(ctx)
    if ctx.json:
        ctx.emit(rows)
        return 0
    shown = []
    for r in rows:
        dep = r.get("deployment") or {}
        shown.append([r["device"], ",".join(r["groups"]) or (f"(asks {','.join(r['requested_groups'])})"
                                                             if r["requested_groups"] else ""),
                      {True: "yes", False: "no"}.get(r.get("online"), "?"),
                      r.get("reported_ago", "never"),
                      r.get("applied_version", ""),
                      f"{dep.get('deployment', '')} {dep.get('outcome', '')}".strip(),
                      " ".join(f"{k}@{v}" for k, v in (r.get("models") or {}).items()),
                      _health(r.get("health"))])
    print(table(shown, ["DEVICE", "GROUPS", "ONLINE", "LAST REPORT", "VERSION", "DEPLOYMENT", "MODELS", "HEALTH"]))
    return 0


def cmd_groups(ctx: Ctx) -> int:
    a = ctx.args
    now = time.time()
    match a.groups_command:
        case None | "list":
            groups = ctx.state.groups()
            if ctx.json:
                ctx.emit([{"group": g, "devices": d} for g, d in groups.items()])
            else:
                print(table([[g, len(d), " ".join(d)] for g, d in groups.items()], ["GROUP", "DEVICES", "MEMBERS"]))
            return 0
        case "create":
            _check_name(a.group, "group")
            if not ctx.state.create_group(a.group, now):
                raise FleetError(f"group {a.group} exists already", EXIT_FAILED)
        case "delete":
            if any(d.group == a.group for d in ctx.state.deployments(("running",))):
                raise FleetError(f"a deployment to {a.group} is running; halt it first", EXIT_FAILED)
            if not ctx.state.delete_group(a.group):
                raise FleetError(f"no group {a.group}", EXIT_MISSING)
        case "add" | "remove":
            if a.group not in ctx.state.groups():
                raise FleetError(f"no group {a.group}; create it with `edgebus fleet groups create {a.group}`",
                                 EXIT_MISSING)
            for d in a.devices:
                _check_name(d, "device id")
            if a.groups_command == "add":
                ctx.state.add_members(a.group, a.devices)
            else:
                ctx.state.remove_members(a.group, a.devices)
            if not a.quiet:
                print("the broker's ACL grants group topics: regenerate it (`edgebus fleet acl`) and reload the "
                      "broker", file=sys.stderr)
    return 0


def _check_name(name: str, what: str) -> None:
    if not fleet.NAME.match(name):
        raise FleetError(f"{what} {name!r}: letters, digits and '_.:-', starting with a letter or digit", EXIT_USAGE)


def _read_bundle(path: str) -> tuple[bytes, str]:
    """The bundle's bytes and "name@version" (from its manifest)."""
    from services.modelstore import Bundle, BundleError

    data = Path(path).read_bytes()
    try:
        bundle = Bundle.from_bytes(data)
    except BundleError as exc:
        raise FleetError(f"{path} is not a model bundle: {exc}", EXIT_USAGE) from None
    if bundle.signature is None:
        raise FleetError(f"{path} is not signed: devices refuse it; sign it (`edgebus model sign`)", EXIT_USAGE)
    return data, f"{bundle.manifest.name}@{bundle.manifest.version}"


def _push(ctx: Ctx, controller: Controller, path: str) -> str:
    data, name = _read_bundle(path)
    sha, sent = controller.push(data, name, ctx.args.chunk_size if "chunk_size" in ctx.args else fleet.DEFAULT_CHUNK_SIZE)
    ctx.log(f"{name} {sha[:16]}: " + (f"published in {-(-len(data) // fleet.DEFAULT_CHUNK_SIZE)} chunks"
                                      if sent else "the broker holds it already"))
    return sha


def cmd_push(ctx: Ctx) -> int:
    if not 1024 <= ctx.args.chunk_size <= fleet.MAX_CHUNK_SIZE:
        raise FleetError(f"--chunk-size {ctx.args.chunk_size}: 1024..{fleet.MAX_CHUNK_SIZE}", EXIT_USAGE)
    sha = _push(ctx, ctx.controller(), ctx.args.bundle)
    if ctx.json:
        ctx.emit({"sha256": sha})
    else:
        print(sha)
    return 0


def _policy(a: argparse.Namespace) -> Policy:
    count, pct = parse_canary(a.canary)
    try:
        return Policy(canary_count=count or 1, canary_pct=pct, waves=a.waves, soak_s=a.soak,
                      gates=tuple(parse_gate(g) for g in a.gate or ()), quorum=a.quorum,
                      wave_timeout_s=a.wave_timeout, rollback_on_failure=not a.no_rollback,
                      validity_s=a.expires * 86400)
    except msgspec.ValidationError as exc:
        raise PolicyError(str(exc)) from None


def cmd_deploy(ctx: Ctx) -> int:
    a = ctx.args
    policy = _policy(a)
    if not a.bundle and not a.artifact and not a.config:
        raise FleetError("deploy what? give --bundle FILE (or --artifact SHA256) and/or --config FRAGMENT.toml",
                         EXIT_USAGE)
    config = ""
    if a.config:
        config = Path(a.config).read_text()
        try:
            tomllib.loads(config)
        except tomllib.TOMLDecodeError as exc:
            raise FleetError(f"{a.config} is not TOML: {exc}", EXIT_USAGE) from None
        if len(config.encode()) > fleet.MAX_DOCUMENT // 2:
            raise FleetError(f"{a.config} is over {fleet.MAX_DOCUMENT // 2} bytes", EXIT_USAGE)
    controller = ctx.controller(signing=True)
    artifact = _push(ctx, controller, a.bundle) if a.bundle else a.artifact
    dep = controller.create(a.group, artifact, config, policy)
    locked = _loop_lock(ctx) is not None
    if locked:
        controller.step()  # the canary's documents go now (else the running controller sends them)
    d = ctx.state.deployment(dep)
    assert d is not None
    ctx.log(f"deployment {dep} to {a.group}: {len(d.waves)} waves of "
            f"{'/'.join(str(len(w)) for w in d.waves)} devices; {d.reason}")
    if not ctx.json:
        print(dep, flush=True)
    if a.follow:
        code = _follow(ctx, controller, dep, locked)
        if ctx.json:
            ctx.emit(_status_of(ctx, controller, dep))
        return code
    if ctx.json:
        ctx.emit({"deployment": dep, "waves": d.waves, "state": d.state})
    return 0


def _loop_lock(ctx: Ctx) -> int | None:
    """One controller loop advances the rollouts of a state at a time: the lock on
    STATE.lock (held until the process ends), or None when another process holds it."""
    import fcntl

    fd = os.open(f"{ctx.args.state}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _follow(ctx: Ctx, controller: Controller, dep: int, locked: bool) -> int:
    deadline = time.monotonic() + ctx.args.follow_timeout if ctx.args.follow_timeout else None

    def ended() -> bool:
        d = ctx.state.deployment(dep)
        return d is None or d.state != "running" or (deadline is not None and time.monotonic() > deadline)

    if locked:
        _run_loop(ctx, controller, until=ended)
    else:  # another controller (edgebus fleet run) advances it: watch the state
        ctx.log("another controller advances the rollouts of this state: following it")
        while not ended():
            time.sleep(ctx.args.tick)
    d = ctx.state.deployment(dep)
    assert d is not None
    ctx.log(f"deployment {dep}: {d.state}: {d.reason}")
    if d.state == "running":
        ctx.log("still running after --follow-timeout: `edgebus fleet run` carries it on")
        return EXIT_FAILED
    return 0 if d.state == "complete" else EXIT_FAILED


class _Term:
    """SIGTERM asks the loop to end at its next pass (exit 0), as SIGINT does (130)."""

    def __init__(self) -> None:
        self.stopping: list[int] = []

    def __enter__(self) -> "_Term":
        self.previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.stopping.append(signum))
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def __bool__(self) -> bool:
        return bool(self.stopping)


def _run_loop(ctx: Ctx, controller: Controller, until: Any = None) -> None:
    with _Term() as term:
        controller.run(tick=ctx.args.tick, until=until, stop=lambda: bool(term))


def cmd_run(ctx: Ctx) -> int:
    with _Term() as term:
        if _loop_lock(ctx) is None:
            if ctx.args.once:
                raise FleetError(f"another controller (edgebus fleet run, or deploy --follow) advances the rollouts "
                                 f"of {ctx.args.state}; one at a time", EXIT_FAILED)
            ctx.log(f"standby: another controller advances the rollouts of {ctx.args.state}; this one takes over "
                    "when it ends")
            while _loop_lock(ctx) is None:  # polled: SIGTERM ends the wait
                if term:
                    return 0
                time.sleep(0.5)
        controller = ctx.controller(signing=True)
        ctx.log(f"controller on {ctx.options().describe()}, prefix {ctx.topics.prefix}, state {ctx.args.state}")
        if ctx.args.once:
            controller.reconcile()
            controller.refresh()
            for dep, decision in controller.step():
                ctx.log(f"deployment {dep}: {decision.action}: {decision.reason}")
            return 0
        controller.run(tick=ctx.args.tick, stop=lambda: bool(term))
    return 0


def _status_of(ctx: Ctx, controller: Controller, dep: int) -> dict[str, Any]:
    d = ctx.state.deployment(dep)
    if d is None:
        raise FleetError(f"no deployment {dep} (`edgebus fleet status` lists them)", EXIT_MISSING)
    names = [b.name for b in controller.bundles_of(d.artifact)]
    devices = []
    for p in ctx.state.progress(dep):
        view = view_of(p.device, controller.reports.get(p.device), names, controller.presence.get(p.device))
        if p.version and p.state == "rolling-back":  # sent the rollback document, p.version
            acted = view.version == p.version
            state = ("rolled-back" if view.outcome == "succeeded" else f"rolling-back ({view.outcome})") if acted \
                else "rolling-back"
            reason = p.reason if acted and view.outcome == "succeeded" else \
                check_device(view, p.version, (), p.device).reason
        elif p.version and view.version > p.version and view.deployment == str(d.id):
            # a later document of this deployment: the group's, or the rollback
            which = "the group's document" if view.version == d.group_version else "a later document"
            state, reason = view.outcome, f"{which} v{view.version}" + (f": {view.reason}" if view.reason else "")
        elif p.version:
            check = check_device(view, p.version, d.policy.gates if d.state == "running" else (), p.device)
            state = view.outcome if view.version == p.version else check.state
            reason = check.reason if check.state != "passed" else (view.reason or "")
        else:
            state, reason = "planned", ""
        if state == "pending" and not view.online:  # waiting for a device its presence says is away
            state = "waiting"
        devices.append({"device": p.device, "wave": p.wave + 1, "document": p.version, "state": state,
                        "reason": reason, "online": view.online})
    bundle = controller.bundles_of(d.artifact)
    return {"deployment": d.id, "group": d.group, "state": d.state, "reason": d.reason,
            "bundle": f"{bundle[0].name} {bundle[0].version}" if bundle else None,
            "config": fleet.config_digest(d.config)[:12] if d.config else None,
            "wave": d.wave + 1, "waves": len(d.waves), "created": d.created_at, "updated": d.updated_at,
            "policy": {"canary": f"{d.policy.canary_pct:g}%" if d.policy.canary_pct else d.policy.canary_count,
                       "soak_s": d.policy.soak_s, "gates": [str(g) for g in d.policy.gates],
                       "quorum": d.policy.quorum},
            "devices": devices}


def cmd_status(ctx: Ctx) -> int:
    controller = ctx.controller(broker=not ctx.args.cached)
    if not ctx.args.cached:
        controller.refresh()
    if ctx.args.deployment is None:
        rows = []
        for d in ctx.state.deployments():
            bundle = controller.bundles_of(d.artifact)
            rows.append({"deployment": d.id, "group": d.group, "state": d.state,
                         "bundle": f"{bundle[0].name} {bundle[0].version}" if bundle else None,
                         "wave": d.wave + 1, "waves": len(d.waves), "reason": d.reason})
        if ctx.json:
            ctx.emit(rows)
        else:
            print(table([[r["deployment"], r["group"], r["bundle"] or "(config)", r["state"],
                          f"{r['wave']}/{r['waves']}", r["reason"]] for r in rows],
                        ["ID", "GROUP", "BUNDLE", "STATE", "WAVE", "REASON"]))
        return 0
    s = _status_of(ctx, controller, ctx.args.deployment)
    if ctx.json:
        ctx.emit(s)
        return 0
    print(f"deployment {s['deployment']} to {s['group']}: {s['state']} (wave {s['wave']} of {s['waves']})")
    print(f"  {s['bundle'] or ''}{' config ' + s['config'] if s['config'] else ''}; canary {s['policy']['canary']}, "
          f"soak {s['policy']['soak_s']:g} s, gates {', '.join(s['policy']['gates']) or 'none'}")
    if s["reason"]:
        print(f"  {s['reason']}")
    print(table([[x["device"], x["wave"], x["document"] or "", x["state"], x["reason"]] for x in s["devices"]],
                ["DEVICE", "WAVE", "DOCUMENT", "STATE", "REASON"]))
    return 0


def cmd_halt(ctx: Ctx) -> int:
    d = ctx.controller(broker=False).halt(ctx.args.deployment, ctx.args.reason or "halted by the operator")
    ctx.log(f"deployment {d.id}: halted; devices keep what they were sent (`edgebus fleet rollback {d.id}` "
            "sends them the group's previous deployment)")
    return 0


def cmd_rollback(ctx: Ctx) -> int:
    controller = ctx.controller(signing=True)
    n = controller.rollback(ctx.args.deployment, ctx.args.reason or "rolled back by the operator")
    ctx.log(f"deployment {ctx.args.deployment}: {n} documents sent")
    return 0


def cmd_acl(ctx: Ctx) -> int:
    devices: dict[str, list[str]] = {row.id: row.groups for row in ctx.state.devices()}
    for group, members in ctx.state.groups().items():
        for d in members:
            devices.setdefault(d, [])
            if group not in devices[d]:
                devices[d].append(group)
    try:
        lines = fleet.acl_lines(devices, ctx.topics.prefix, operator=ctx.args.operator)
    except fleet.FleetError as exc:
        raise FleetError(str(exc), EXIT_USAGE) from None
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_artifacts(ctx: Ctx) -> int:
    rows = [{"sha256": sha, "bundle": name, "size": size, "pushed": at} for sha, name, size, at in ctx.state.artifacts()]
    if ctx.json:
        ctx.emit(rows)
    else:
        print(table([[r["sha256"][:16], r["bundle"], r["size"],
                      datetime.datetime.fromtimestamp(r["pushed"]).isoformat(timespec="seconds")] for r in rows],
                    ["SHA256", "BUNDLE", "BYTES", "PUSHED"]))
    return 0


# -- the parser ----------------------------------------------------------------------------------

def _globals(p: argparse.ArgumentParser, suppress: bool) -> None:
    """The global options, accepted before or after the verb."""
    d = argparse.SUPPRESS if suppress else None
    p.add_argument("--state", default=argparse.SUPPRESS if suppress else _default_state(),
                   help=f"the controller's state (SQLite; default {_default_state()})")
    p.add_argument("--signing-key", default=d, help="the fleet signing key (default: the state's path with "
                                                    "suffix .signing-key)")
    p.add_argument("--broker", default=d, help="the MQTT broker, HOST:PORT")
    p.add_argument("--ca", default=d, help="CA certificate of the broker (turns TLS on)")
    p.add_argument("--cert", default=d, help="the operator's client certificate (mutual TLS)")
    p.add_argument("--key", default=d, help="the client certificate's private key")
    p.add_argument("--prefix", default=d, help=f"topic prefix (default {fleet.DEFAULT_PREFIX}; remembered)")
    p.add_argument("-o", "--output", default=argparse.SUPPRESS if suppress else "short",
                   choices=("short", "json", "json-pretty"))
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="no progress lines on stderr")
    p.add_argument("--timeout", type=float, default=argparse.SUPPRESS if suppress else 10.0,
                   help="seconds to wait for the broker's CONNACK (default 10)")


def add_commands(sub: Any) -> None:
    fleet_p = sub.add_parser("fleet", help="the fleet: devices, groups, signed deployments and staged rollouts over MQTT",
                             description=(__doc__ or "").split("\n\n", 1)[1],
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    _globals(fleet_p, suppress=False)
    fsub = fleet_p.add_subparsers(dest="fleet_command", required=True, metavar="COMMAND")

    def verb(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = fsub.add_parser(name, help=help, description=help)
        _globals(p, suppress=True)
        p.set_defaults(fleet_func=func)
        return p

    p = verb("keygen", cmd_keygen, "create the fleet signing key; prints its public key for the devices' trust stores")
    p.add_argument("--fleet", help="the fleet's id in every document (default edgebus; devices may check it)")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p = verb("devices", cmd_devices, "enrolled devices: groups, last seen, document version, deployment, models, health")
    p.add_argument("--cached", action="store_true", help="as last seen, without asking the broker")
    p = verb("groups", cmd_groups, "list groups, or create/delete one, add/remove devices")
    gsub = p.add_subparsers(dest="groups_command")
    g = gsub.add_parser("list")
    _globals(g, suppress=True)
    for name in ("create", "delete"):
        g = gsub.add_parser(name)
        _globals(g, suppress=True)
        g.add_argument("group")
    for name in ("add", "remove"):
        g = gsub.add_parser(name)
        _globals(g, suppress=True)
        g.add_argument("group")
        g.add_argument("devices", nargs="+", metavar="DEVICE")
    p = verb("push", cmd_push, "publish a bundle as a retained artifact (info and chunks), once per content hash")
    p.add_argument("bundle")
    p.add_argument("--chunk-size", type=int, default=fleet.DEFAULT_CHUNK_SIZE, help="bytes (default 65536)")
    p = verb("deploy", cmd_deploy, "deploy a bundle and/or config fragment to a group in staged waves")
    p.add_argument("--group", required=True)
    p.add_argument("--bundle", help="the signed model bundle (pushed if the broker does not hold it)")
    p.add_argument("--artifact", help="a pushed artifact's sha256 instead of --bundle")
    p.add_argument("--config", help="a TOML fragment of [services.<name>.settings] tables")
    p.add_argument("--canary", default="1", help="devices in the first wave: N, or PCT%% of the group (default 1)")
    p.add_argument("--waves", type=int, default=3, help="waves, the canary's included (default 3)")
    p.add_argument("--soak", type=float, default=60.0, help="seconds each wave runs before the next (default 60)")
    p.add_argument("--gate", action="append", metavar="GATE",
                   help="error_rate<=X, p95_ms<=MS, drift<=ok|warn, trial=committed (repeatable)")
    p.add_argument("--quorum", type=float, default=1.0,
                   help="share of the touched devices that must have passed to go on (default 1: all)")
    p.add_argument("--wave-timeout", type=float, default=3600.0,
                   help="seconds a wave may take to reach its quorum before the rollout stalls (default 3600)")
    p.add_argument("--expires", type=float, default=30.0, help="days the documents are valid (default 30)")
    p.add_argument("--no-rollback", action="store_true", help="on a failed gate, halt without rolling back")
    p.add_argument("--follow", action="store_true", help="run the controller until the rollout ends")
    p.add_argument("--follow-timeout", type=float, default=0.0, help="with --follow: give up after SECONDS")
    p.add_argument("--tick", type=float, default=0.5, help=argparse.SUPPRESS)
    p = verb("status", cmd_status, "deployments, or one deployment's per-device progress and reasons")
    p.add_argument("deployment", type=int, nargs="?")
    p.add_argument("--cached", action="store_true", help="as last seen, without asking the broker")
    p = verb("halt", cmd_halt, "stop a rollout where it is (devices keep what they were sent)")
    p.add_argument("deployment", type=int)
    p.add_argument("--reason")
    p = verb("rollback", cmd_rollback, "send the touched devices the group's previous deployment (a new version)")
    p.add_argument("deployment", type=int)
    p.add_argument("--reason")
    p = verb("run", cmd_run, "the controller loop: advance rollouts, re-publish what a broker lost")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.add_argument("--tick", type=float, default=0.5, help="seconds between passes (default 0.5)")
    p = verb("acl", cmd_acl, "print the mosquitto ACL file for the enrolled devices and groups")
    p.add_argument("--operator", default="operator", help="the controller's user name (its certificate's CN)")
    verb("artifacts", cmd_artifacts, "artifacts pushed from this state")
    fleet_p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run a parsed ``edgebus fleet`` command; errors as one line and an exit status."""
    try:
        ctx = Ctx(args)
    except StateError as exc:
        print(f"edgebus fleet: {exc}", file=sys.stderr)
        return EXIT_STATE
    except FleetError as exc:
        print(f"edgebus fleet: {exc}", file=sys.stderr)
        return exc.code
    try:
        return args.fleet_func(ctx)
    except FleetError as exc:
        print(f"edgebus fleet: {exc}", file=sys.stderr)
        return exc.code
    except BrokerError as exc:
        print(f"edgebus fleet: {exc}", file=sys.stderr)
        return EXIT_BROKER
    except PolicyError as exc:
        print(f"edgebus fleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StateError as exc:
        print(f"edgebus fleet: {exc}", file=sys.stderr)
        return EXIT_STATE
    finally:
        ctx.close()
