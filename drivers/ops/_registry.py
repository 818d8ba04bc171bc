"""What the registry is made of: an op with the parameters it takes, and pipelines of ops.

A manifest names each op and gives its parameters as JSON values (``{"op": "signal.frame",
"params": {"length": 2048}}``).  An ``Op`` knows which parameters its function takes and
how to check each one: checks turn JSON into what the function wants (a list of pairs into
a tuple of float pairs) and say what is wrong in words a manifest's author can act on.
A ``Pipeline`` looks its ops up and checks all their parameters when it is built, when a
model is activated, so a bad manifest fails there and not on the first request.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ._exceptions import OpInputError, OpParamsError, PipelineError, UnknownOp

__all__ = ["Check", "Op", "Pipeline", "integer", "number", "numbers", "boolean", "choice", "bands"]

#: Checks a parameter's JSON value and returns what to pass on; raises ValueError saying
#: what the value must be.
Check = Callable[[Any], Any]


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    """An integer in ``[lo, hi]``."""
    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or (lo is not None and value < lo) \
                or (hi is not None and value > hi):
            bounds = " and ".join(b for b in (lo is not None and f">= {lo}", hi is not None and f"<= {hi}") if b)
            raise ValueError(f"must be an integer{' ' + bounds if bounds else ''}, not {_describe(value)}")
        return value
    return check


def number(lo: float | None = None, hi: float | None = None, *, above: float | None = None) -> Check:
    """A finite number in ``[lo, hi]``, or greater than ``above``."""
    def check(value: Any) -> float:
        if not _is_number(value) or (lo is not None and value < lo) or (hi is not None and value > hi) \
                or (above is not None and value <= above):
            bounds = " and ".join(b for b in (lo is not None and f">= {lo}", hi is not None and f"<= {hi}",
                                              above is not None and f"> {above}") if b)
            raise ValueError(f"must be a finite number{' ' + bounds if bounds else ''}, not {_describe(value)}")
        return float(value)
    return check


def numbers(*, above: float | None = None) -> Check:
    """A non-empty list of finite numbers, each greater than ``above`` if given."""
    def check(value: Any) -> tuple[float, ...]:
        if not isinstance(value, (list, tuple)) or not value or not all(_is_number(v) for v in value) \
                or (above is not None and any(v <= above for v in value)):
            bound = f" greater than {above}" if above is not None else ""
            raise ValueError(f"must be a non-empty list of finite numbers{bound}, not {_describe(value)}")
        return tuple(float(v) for v in value)
    return check


def boolean(value: Any) -> bool:
    """true or false."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {_describe(value)}")
    return value


def choice(*options: str) -> Check:
    """One of ``options``."""
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(map(repr, options))}, not {_describe(value)}")
        return value
    return check


def bands(value: Any) -> tuple[tuple[float, float], ...]:
    """Frequency bands ``[[lo, hi], ...]`` in Hz, each with ``0 <= lo < hi``."""
    ok = isinstance(value, (list, tuple)) and value and all(
        isinstance(b, (list, tuple)) and len(b) == 2 and all(_is_number(f) for f in b) and 0 <= b[0] < b[1]
        for b in value)
    if not ok:
        raise ValueError(f"must be a non-empty list of [lo, hi] bands in Hz with 0 <= lo < hi, not {_describe(value)}")
    return tuple((float(lo), float(hi)) for lo, hi in value)


class Op:
    """A registered op: ``fn(array, **params)`` and the parameters a manifest may give it.

    ``required`` and ``optional`` map each parameter to its check; an optional parameter
    left out takes the function's default.  ``relate`` checks parameters against each other
    (raising OpParamsError).  ``last`` marks an op that returns several arrays, so nothing
    can follow it in a pipeline.  ``takes(params)`` says in words what input the op takes
    with those parameters (for the errors a pipeline raises).  ``may_be_empty`` marks an op
    whose result may rightly hold nothing (no detection survives ``post.nms``); any other
    op's empty result is an error, never a result.  Call ``op(x, **params)``, or
    ``op.bind(params)`` to check the parameters once and get a function of the array alone.
    """

    def __init__(self, name: str, fn: Callable[..., Any], *, required: Mapping[str, Check] | None = None,
                 optional: Mapping[str, Check] | None = None,
                 relate: Callable[[dict[str, Any]], None] | None = None, last: bool = False,
                 takes: Callable[[Mapping[str, Any]], str] | None = None, may_be_empty: bool = False) -> None:
        self.name = name
        self.fn = fn
        self.required = dict(required or {})
        self.optional = dict(optional or {})
        self.relate = relate
        self.last = last
        self.takes = takes
        self.may_be_empty = may_be_empty

    def bind(self, params: Mapping[str, Any]) -> Callable[[np.ndarray], Any]:
        if not isinstance(params, Mapping):
            raise OpParamsError(self.name, "", f"must be a mapping of names to values, not {_describe(params)}")
        takes = {**self.required, **self.optional}
        for key in params:
            if key not in takes:
                raise OpParamsError(self.name, key, f"is not a parameter of this op; it takes "
                                                    f"{', '.join(takes) or 'none'}")
        for key in self.required:
            if key not in params:
                raise OpParamsError(self.name, key, "is required")
        checked = {}
        for key, value in params.items():
            try:
                checked[key] = takes[key](value)
            except ValueError as exc:
                raise OpParamsError(self.name, key, str(exc)) from None
        if self.relate is not None:
            self.relate(checked)
        return functools.partial(self.fn, **checked)

    def describe_input(self, params: Mapping[str, Any]) -> str:
        """What the op takes with ``params`` (already checked), in words; "" when unsaid."""
        return self.takes(params) if self.takes is not None else ""

    def __call__(self, x: np.ndarray, **params: Any) -> Any:
        return self.bind(params)(x)

    def __repr__(self) -> str:
        return f"Op({self.name!r}, required={list(self.required)}, optional={list(self.optional)})"


def _shape(x: Any) -> str:
    """``float32 [1, 7]``: an array as the errors name it."""
    a = np.asarray(x) if not isinstance(x, np.ndarray) else x
    return f"{a.dtype} {list(a.shape)}"


class Pipeline:
    """Ops looked up in ``registry`` by name, their parameters checked, to apply in order.

    ``steps`` is what a manifest's ``pre`` or ``post`` list holds: ``(name, params)`` pairs.
    Calling the pipeline on an array runs each op on the previous one's result; an op whose
    result is empty raises OpInputError (unless the op may rightly give nothing), so an
    input the ops cannot use never turns into an empty answer.  ``rows(batch)`` runs it
    on a batch whose every row must give exactly one row (a model's pre ops on the
    scheduler's batches).
    """

    def __init__(self, registry: Mapping[str, Op], steps: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        self.names: list[str] = []
        self._ops: list[Op] = []
        self._params: list[Mapping[str, Any]] = []
        self._fns: list[Callable[[np.ndarray], Any]] = []
        for name, params in steps:
            op = registry.get(name)
            if op is None:
                raise UnknownOp(name, sorted(registry))
            if self.names and registry[self.names[-1]].last:
                raise PipelineError(self.names[-1], f"gives several arrays, so it must be the last op, "
                                                    f"but {name!r} follows it")
            fn = op.bind(params)
            self._fns.append(fn)
            self._ops.append(op)
            self._params.append(fn.keywords if isinstance(fn, functools.partial) else params)
            self.names.append(name)

    def _refuse(self, i: int, x: Any, problem: str) -> OpInputError:
        takes = self._ops[i].describe_input(self._params[i])
        return OpInputError(self.names[i], f"{_shape(x)} {problem}" + (f"; it takes {takes}" if takes else ""))

    def __call__(self, x: np.ndarray) -> Any:
        for i, fn in enumerate(self._fns):
            y = fn(x)
            if isinstance(y, np.ndarray) and y.size == 0 and not self._ops[i].may_be_empty:
                raise self._refuse(i, x, f"gives an empty result ({_shape(y)})")
            x = y
        return x

    def rows(self, x: np.ndarray) -> np.ndarray:
        """The pipeline on a batch ``[N, ...]`` where each op must keep one row per input
        row (``N`` rows out for ``N`` in): an op that makes more or fewer rows, or no array,
        raises OpInputError naming it, the shape it was given and what it takes."""
        n = len(x)
        for i, fn in enumerate(self._fns):
            y = fn(x)
            if not isinstance(y, np.ndarray) or y.ndim == 0 or len(y) != n or (y.size == 0 and n):
                got = f"{len(y)} row(s) ({_shape(y)})" if isinstance(y, np.ndarray) and y.ndim else type(y).__name__
                raise self._refuse(i, x, f"gives {got} for {n} input row(s); each row must give exactly one")
            x = y
        return x

    def takes(self) -> str:
        """What the first op takes, in words ("" when it does not say)."""
        return self._ops[0].describe_input(self._params[0]) if self._ops else ""

    def __repr__(self) -> str:
        return f"Pipeline({' -> '.join(self.names) or 'identity'})"
