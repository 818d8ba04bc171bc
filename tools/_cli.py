"""What every command-line tool of edgebus does the same way: its version, quiet exit on a
closed pipe (``busctl list | head``), a path error as one line instead of a traceback."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from typing import Callable

__all__ = ["version", "finish"]


def version(prog: str) -> str:
    try:
        return f"{prog} {importlib.metadata.version('edgebus')}"
    except importlib.metadata.PackageNotFoundError:
        return f"{prog} (not installed)"


def finish(prog: str, run: Callable[[], int]) -> None:
    """Run a tool's command and exit with its status.  A reader that went away (SIGPIPE)
    ends the tool quietly, as with any Unix filter; a file the user named that cannot be
    read or written is reported in one line (exit 1)."""
    try:
        code = run()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that is silent too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, as a shell reports it
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: {where}{exc.strerror or exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
