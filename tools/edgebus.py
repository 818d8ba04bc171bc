"""The ``edgebus`` command: boot the system, check configs."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import anyio

__all__ = ["main"]


def _boot(args: argparse.Namespace) -> int:
    from kernel import EXIT_CONFIG, EXIT_ERROR, ConfigError, Kernel, KernelError, default_dirs, load_config
    from services import configure_logging

    log = configure_logging("kernel")
    try:
        config, source = load_config(args.config)
    except ConfigError as exc:
        log.error("config_invalid", error=str(exc))
        print(f"edgebus: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    run_dir, state_dir = default_dirs(args.run_dir, args.state_dir)
    kernel = Kernel(config, run_dir, state_dir, source, config_path=args.config)
    try:
        return anyio.run(kernel.run, backend="asyncio")
    except KernelError as exc:
        log.error("kernel_failed", error=str(exc))
        print(f"edgebus: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _config_check(args: argparse.Namespace) -> int:
    """The kernel's checks, each program's existence, and every service's settings table
    against the type its service declares; nothing is started."""
    from kernel import EXIT_CONFIG, ConfigError, config_dir, load_config

    try:
        config, source = load_config(args.file)
        checked, unchecked = check_services(config, source, config_dir(args.file))
    except ConfigError as exc:
        print(f"edgebus: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not args.quiet:
        print(f"{source}: ok ({len(config.services)} services; settings checked: {', '.join(checked) or 'none'})")
        for name, why in unchecked:
            print(f"  services.{name}.settings not checked: {why}")
    return 0


def check_services(config: Any, source: str, base: Any) -> tuple[list[str], list[tuple[str, str]]]:
    """Raise ConfigError for a missing program or settings that do not decode; return the
    services whose settings were checked and those that could not be (and why)."""
    import os
    import shutil

    from kernel import ConfigError
    from services import SettingsError, decode_settings, service_class

    checked, unchecked = [], []
    for name, svc in config.services.items():
        key = f"services.{name}"
        if not svc.command:
            if svc.settings:
                unchecked.append((name, "the service is configured without a command (an external service)"))
            continue
        program = svc.command[0]
        found = program == "{python}" or (os.access(program, os.X_OK) if "/" in program else shutil.which(program))
        if not found:
            raise ConfigError(source, f"{key}.command",
                              f"program {program!r} does not exist or is not executable"
                              + ("" if "/" in program else " (looked up in PATH)"))
        cls, why = service_class(svc.command, svc.working_directory)
        if cls is None:
            if svc.settings:
                unchecked.append((name, why))
            continue
        try:
            decode_settings(svc.settings, cls.Settings, base=base, service=name)
        except SettingsError as exc:
            raise ConfigError(source, f"{key}.{exc.key}", exc.problem) from None
        checked.append(name)
    return checked, unchecked


def _config_default(args: argparse.Namespace) -> int:
    from kernel import default_config_text

    sys.stdout.write(default_config_text())
    return 0


def _attest_verify(args: argparse.Namespace) -> int:
    """Check a report from `busctl attest` offline, as a fleet server would."""
    import hashlib
    import json
    from pathlib import Path

    import msgspec

    from kernel import ZERO_PCR, extend_pcr as extend
    from services.security import SignedReport, verify_ed25519

    try:
        signed = msgspec.convert(json.loads(Path(args.report).read_text()), SignedReport)
    except (OSError, ValueError, msgspec.ValidationError) as exc:
        print(f"edgebus: {args.report} is not an attestation report: {exc}", file=sys.stderr)
        return 2
    key_text = Path(args.pubkey).read_text().strip() if Path(args.pubkey).is_file() else args.pubkey
    try:
        pubkey = bytes.fromhex(key_text)
        assert len(pubkey) == 32
    except (ValueError, AssertionError):
        print("edgebus: --pubkey must be the device's ed25519 public key, 64 hex characters (or a file)",
              file=sys.stderr)
        return 2
    report = signed.report
    if not verify_ed25519(pubkey, bytes.fromhex(signed.signature), msgspec.json.encode(report)):
        print("edgebus: INVALID: the signature does not verify with that device key "
              "(another device, or the report was altered)", file=sys.stderr)
        return 1
    pcr = ZERO_PCR
    for i, entry in enumerate(report.log):
        digest = hashlib.sha256(bytes.fromhex(entry["code"]) + bytes.fromhex(entry["config"])).hexdigest()
        if digest != entry["digest"]:
            print(f"edgebus: INVALID: log entry {i} ({entry.get('service')}) digest does not match its "
                  "code and config", file=sys.stderr)
            return 1
        pcr = extend(pcr, digest)
    if pcr != report.pcr:
        print("edgebus: INVALID: replaying the measurement log does not give the reported PCR", file=sys.stderr)
        return 1
    if args.nonce is not None and report.nonce != args.nonce:
        print(f"edgebus: INVALID: nonce {report.nonce!r} is not the challenge {args.nonce!r}", file=sys.stderr)
        return 1
    print(f"valid: signed by device {report.device[:16]}..., pcr {report.pcr}")
    for entry in report.log:
        print(f"  {entry['service']:<16} code {entry['code'][:16]}  config {entry['config'][:16]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tools._cli import version

    parser = argparse.ArgumentParser(prog="edgebus", description="edgebus: the operating layer for AI at the edge")
    parser.add_argument("--version", action="version", version=version("edgebus"))
    sub = parser.add_subparsers(dest="command", required=True)
    boot = sub.add_parser("boot", help="run the kernel and its services in the foreground")
    boot.add_argument("--config", help="system config (TOML); the built-in default when omitted")
    boot.add_argument("--run-dir", help="bus socket and runtime files (default /run/edgebus, or per user)")
    boot.add_argument("--state-dir", help="persistent state (default /var/lib/edgebus, or RUN_DIR/state)")
    boot.set_defaults(func=_boot)
    config = sub.add_parser("config", help="check or print configs")
    csub = config.add_subparsers(dest="config_command", required=True)
    check = csub.add_parser("check", help="validate a config file and every service's settings, starting nothing")
    check.add_argument("file", help="the system config (TOML)")
    check.add_argument("-q", "--quiet", action="store_true", help="print nothing when the config is valid")
    check.set_defaults(func=_config_check)
    default = csub.add_parser("default", help="print the built-in default config")
    default.set_defaults(func=_config_default)
    from tools._model_tools import add_commands

    add_commands(sub)
    from tools._conformance import add_command as add_conformance

    add_conformance(sub)
    attest = sub.add_parser("attest", help="attestation reports")
    asub = attest.add_subparsers(dest="attest_command", required=True)
    verify = asub.add_parser("verify", help="verify a report from `busctl attest` offline")
    verify.add_argument("report", help="the JSON report file")
    verify.add_argument("--pubkey", required=True, help="the device's ed25519 public key (hex) or a file holding it")
    verify.add_argument("--nonce", help="the challenge the report must carry")
    verify.set_defaults(func=_attest_verify)
    from tools._fleet import add_commands as add_fleet_commands

    add_fleet_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    from tools._cli import finish

    args = build_parser().parse_args(argv)
    finish("edgebus", lambda: args.func(args))


if __name__ == "__main__":
    main()
