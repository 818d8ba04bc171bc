"""The restart policy, as pure functions: what the supervisor does when a service ends.

OTP's rules, decided without processes or clocks (the caller passes ``now``):

* **restart type** (``restart``): ``permanent`` services are always restarted,
  ``transient`` ones unless they exited 0 on their own, ``temporary`` ones never;
* **exit 78** (``EXIT_CONFIG``): the service said restarting cannot help (bad settings, a
  missing model...): it is marked failed, whatever its restart type;
* **restart intensity**: more than ``max_restarts`` restarts within ``restart_window``
  seconds mark the service failed, and for a ``critical`` one the system gives up;
* **back-off**: the first restart in a window is immediate; repeated ones wait
  ``backoff_initial``, doubling up to ``backoff_max``; a service that ran longer than the
  window starts afresh (immediate restart, initial back-off);
* **strategy**: ``one_for_one`` restarts the service alone; ``rest_for_one`` also restarts
  every service that requires it, directly or not.

Counting (``count``: the restart times within the window) is kept apart from the decision
(``decide``), which the supervisor's keeper acts on through an ``Intent``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from protocols.runtime import EXIT_CONFIG

from ._config import ServiceConfig

__all__ = ["Intent", "Ended", "History", "Decision", "count", "decide", "dependents", "also_restart"]


class Intent(enum.Enum):
    #: Start it again now.
    RESTART = "restart"
    #: Start it again after ``Decision.delay`` seconds.
    BACKOFF = "backoff"
    #: Leave it stopped: its restart type says so (not a failure).
    STOP = "stop"
    #: Mark it failed and leave it so: exit 78, or too many restarts.
    FAIL = "fail"
    #: Mark it failed, and the whole system gives up (a critical service failed).
    GIVE_UP = "give_up"


@dataclass(frozen=True, slots=True)
class Ended:
    """How one run of a service ended."""

    #: Its exit status; None when a signal killed it.
    code: int | None
    #: Seconds from its start to its exit.
    ran_for: float
    #: The supervisor killed it for not saying READY within ``start_timeout``.
    timed_out: bool = False
    #: ``exited with status 1``, ``killed by SIGKILL``: for the reasons given.
    description: str = ""


@dataclass(frozen=True, slots=True)
class History:
    """What intensity and back-off are computed from: one per service."""

    #: Monotonic times of the restarts within the last window, oldest first.
    times: tuple[float, ...] = ()
    #: The delay of the next repeated restart; 0: ``backoff_initial``.
    backoff: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    intent: Intent
    #: Seconds to wait before the restart (BACKOFF).
    delay: float = 0.0
    #: Why, in words, for the service's state and the log.
    reason: str = ""
    #: The history to keep for the next decision.
    history: History = History()


def count(times: tuple[float, ...], now: float, window: float) -> tuple[float, ...]:
    """The restart times within ``window`` seconds before ``now``, with a restart at ``now``."""
    return (*(t for t in times if t >= now - window), now)


def decide(spec: ServiceConfig, ended: Ended, history: History, now: float) -> Decision:
    """What to do about a service that ended (not one the supervisor stopped on purpose)."""
    last = ended.description or ("killed by a signal" if ended.code is None else f"exited with status {ended.code}")
    if ended.code == EXIT_CONFIG:
        return Decision(Intent.FAIL, reason=f"{last}: permanent failure, not restarted", history=history)
    if spec.restart == "temporary" or (spec.restart == "transient" and ended.code == 0 and not ended.timed_out):
        return Decision(Intent.STOP, reason=f"{last}; restart = {spec.restart}", history=history)
    times = count(history.times, now, spec.restart_window)
    if len(times) > spec.max_restarts:
        reason = (f"{len(times)} restarts within {spec.restart_window:g}s "
                  f"(max_restarts = {spec.max_restarts}); last: {last}")
        return Decision(Intent.GIVE_UP if spec.critical else Intent.FAIL, reason=reason,
                        history=History(times, history.backoff))
    if len(times) == 1 or ended.ran_for > spec.restart_window:
        # The first restart in a window, or after a long run: at once, back-off afresh.
        return Decision(Intent.RESTART, reason=f"{last}; restarting in 0s", history=History(times))
    delay = history.backoff or spec.backoff_initial
    return Decision(Intent.BACKOFF, delay=delay, reason=f"{last}; restarting in {delay:g}s",
                    history=History(times, min(delay * 2, spec.backoff_max)))


def dependents(name: str, requires: Mapping[str, Sequence[str]], order: Sequence[str]) -> list[str]:
    """The services that require ``name``, directly or not, in start order."""
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for other, deps in requires.items():
            if other not in found and any(d == name or d in found for d in deps):
                found.add(other)
                changed = True
    return [n for n in order if n in found]


def also_restart(strategy: str, name: str, requires: Mapping[str, Sequence[str]], order: Sequence[str]) -> list[str]:
    """The services that restart with ``name`` under ``strategy``, in start order (they are
    stopped in the reverse order, and start again once ``name`` is ready)."""
    if strategy == "rest_for_one":
        return dependents(name, requires, order)
    return []
