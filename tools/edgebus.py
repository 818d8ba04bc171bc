"""The ``edgebus`` command: boot the system, check configs."""

from __future__ import annotations

import argparse
import sys

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
    from kernel import ConfigError, load_config

    try:
        config, source = load_config(args.file)
    except ConfigError as exc:
        print(f"edgebus: {exc}", file=sys.stderr)
        return 78
    print(f"{source}: ok ({len(config.services)} services)")
    return 0


def _config_default(args: argparse.Namespace) -> int:
    from kernel import default_config_text

    sys.stdout.write(default_config_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgebus", description="edgebus: the operating layer for AI at the edge")
    sub = parser.add_subparsers(dest="command", required=True)
    boot = sub.add_parser("boot", help="run the kernel and its services in the foreground")
    boot.add_argument("--config", help="system config (TOML); the built-in default when omitted")
    boot.add_argument("--run-dir", help="bus socket and runtime files (default /run/edgebus, or per user)")
    boot.add_argument("--state-dir", help="persistent state (default /var/lib/edgebus, or RUN_DIR/state)")
    boot.set_defaults(func=_boot)
    config = sub.add_parser("config", help="check or print configs")
    csub = config.add_subparsers(dest="config_command", required=True)
    check = csub.add_parser("check", help="validate a config file")
    check.add_argument("file")
    check.set_defaults(func=_config_check)
    default = csub.add_parser("default", help="print the built-in default config")
    default.set_defaults(func=_config_default)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
