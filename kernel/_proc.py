"""What /proc tells of a process."""

from __future__ import annotations

import os

__all__ = ["rss_bytes"]


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` in bytes (/proc/PID/statm); 0 when it is
    gone or ``pid`` is 0."""
    if pid <= 0:
        return 0
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
