"""Capability patterns: ``<action>:<target>`` with ``*`` wildcards, default deny.

* ``call:<service>.<Type>``  send a request of that type to that service
* ``publish:<topic>``        publish an event on that topic
* ``subscribe:<topic>``      receive events on that topic

``*`` matches any run of characters, dots included: ``call:modelstore.*``,
``publish:sensor.*``, ``call:*``.
"""

from __future__ import annotations

import re
from typing import Iterable

from ._exceptions import CapabilityError

__all__ = ["ACTIONS", "CapabilitySet", "parse_capability"]

ACTIONS = ("call", "publish", "subscribe")
_TARGET = re.compile(r"^[A-Za-z0-9_.*/-]+$")


def parse_capability(pattern: str) -> tuple[str, str]:
    action, sep, target = pattern.partition(":")
    if not sep:
        raise CapabilityError(pattern, "has no ':'; write <action>:<target>, e.g. call:modelstore.ListModels")
    if action not in ACTIONS:
        raise CapabilityError(pattern, f"has unknown action {action!r}; use one of {', '.join(ACTIONS)}")
    if not target or not _TARGET.match(target):
        raise CapabilityError(pattern, "needs a target of letters, digits, '_', '-', '.', '/' and '*'")
    return action, target


class _Rules:
    __slots__ = ("exact", "regex", "prefixes")

    def __init__(self, targets: list[str]) -> None:
        self.exact = frozenset(t for t in targets if "*" not in t)
        wild = [t for t in targets if "*" in t]
        # Trailing-star patterns are kept as prefixes: they decide subscription coverage.
        self.prefixes = tuple(t[:-1] for t in wild if t.endswith("*") and "*" not in t[:-1])
        self.regex = (
            re.compile("|".join("(?:" + ".*".join(map(re.escape, t.split("*"))) + r")\Z" for t in wild))
            if wild else None
        )

    def match(self, target: str) -> bool:
        return target in self.exact or (self.regex is not None and self.regex.match(target) is not None)


class CapabilitySet:
    """The compiled capabilities of one principal.  Checks are O(1) for exact patterns and
    one precompiled regex for the wildcard ones; callers cache results per (action, target)."""

    __slots__ = ("patterns", "denied", "_rules", "_deny")

    def __init__(self, patterns: Iterable[str] = (), denied: Iterable[str] = ()) -> None:
        self.patterns: tuple[str, ...] = tuple(dict.fromkeys(patterns))
        #: Revoked patterns: they win over any grant, wildcards included, so revoking
        #: call:calc.Add from a holder of call:calc.* refuses calc.Add.
        self.denied: tuple[str, ...] = tuple(dict.fromkeys(denied))
        self._rules = self._compile(self.patterns)
        self._deny = self._compile(self.denied)

    @staticmethod
    def _compile(patterns: tuple[str, ...]) -> dict[str, _Rules]:
        by_action: dict[str, list[str]] = {a: [] for a in ACTIONS}
        for p in patterns:
            action, target = parse_capability(p)
            by_action[action].append(target)
        return {a: _Rules(t) for a, t in by_action.items()}

    def allows(self, action: str, target: str) -> bool:
        return self._rules[action].match(target) and not (self.denied and self._deny[action].match(target))

    def covers_prefix(self, action: str, prefix: str) -> bool:
        """True if every target starting with ``prefix`` is allowed (subscriptions are
        prefixes, so ``subscribe:sensor.*`` covers ``sensor.`` and ``sensor.vib1``)."""
        rules = self._rules[action]
        if self.denied and self._deny[action].match(prefix):
            return False
        if any(prefix.startswith(p) for p in rules.prefixes):
            return True
        # An exact pattern covers the subscription to exactly that topic; delivery is
        # still checked per topic, so a longer topic sharing the prefix is not leaked.
        return prefix in rules.exact

    def describe(self) -> list[str]:
        """The patterns, then the revoked ones marked ``!``."""
        return [*self.patterns, *(f"!{d}" for d in self.denied)]

    def __repr__(self) -> str:
        return f"CapabilitySet({list(self.patterns)!r}, denied={list(self.denied)!r})"
