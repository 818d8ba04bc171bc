"""What the registry is made of: an op with the parameters it takes and the tensors it takes
and gives, and pipelines of ops.

A manifest names each op and gives its parameters as JSON values (``{"op": "signal.frame",
"params": {"length": 2048}}``).  An ``Op`` knows which parameters its function takes and
how to check each one: checks turn JSON into what the function wants (a list of pairs into
a tuple of float pairs) and say what is wrong in words a manifest's author can act on.

An op also declares what it takes and gives (``Takes``, and a shape rule from the input's
``TensorType``, its dtype and symbolic shape, to the output's), so that a whole chain of ops
around a model can be checked without running it (``drivers.ops.check_chains``).  The kernel
itself is named by ``"module:function"`` and imported only when the op is bound to run: this
module, the declarations and the checks import neither numba nor numpy.

A ``Pipeline`` looks its ops up and checks all their parameters when it is built, when a
model is activated, so a bad manifest fails there and not on the first request.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from ._exceptions import OpInputError, OpParamsError, PipelineError, UnknownOp

__all__ = ["Check", "Op", "Pipeline", "integer", "number", "numbers", "boolean", "choice", "bands", "resource",
           "Ref", "Dim", "TensorType", "Takes", "Mismatch", "Rule", "show_dims"]

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


def resource(value: Any) -> "Ref | tuple[str, ...]":
    """Something the op reads from the model's bundle: ``"asset:NAME"`` (the bytes of the
    bundle's asset NAME), ``"metadata:KEY"`` (the manifest's metadata entry KEY), or the value
    itself, inline, as a list of strings."""
    if isinstance(value, str):
        kind, sep, key = value.partition(":")
        if sep and key and kind in ("asset", "metadata"):
            return Ref(kind, key)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"must be 'asset:NAME' (a file of the model's bundle), 'metadata:KEY' (an entry of the "
                     f"manifest's metadata) or a non-empty list of strings, not {_describe(value)}")


class Ref(NamedTuple):
    """A parameter's value that names a resource of the bundle: an asset or a metadata entry."""

    kind: str  # "asset" | "metadata"
    key: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.key}"


# -- what an op takes and gives ---------------------------------------------------------------------

#: One dimension of a symbolic shape: a fixed size, a name (the same name is the same size:
#: a model's symbolic dimension, or ``~H``, a size the client chooses, in a chain's input), or
#: None (any size).
Dim = int | str | None


def show_dims(shape: Sequence[Dim]) -> str:
    """``[N, 3, H, ?]``: sizes, names (a client's ``~H`` as ``H``) and ``?`` for any size."""
    return "[" + ", ".join("?" if d is None else d.lstrip("~") if isinstance(d, str) else str(d)
                           for d in shape) + "]"


@dataclasses.dataclass(frozen=True)
class TensorType:
    """A tensor as the checks see it: its dtype, its symbolic shape, and its batch axis
    (0 when axis 0 holds one row per request of a batch, None when it has none).  (Not a
    tuple: an op that gives several arrays gives a tuple of these.)"""

    dtype: str
    shape: tuple[Dim, ...]
    batch: int | None = None

    def __str__(self) -> str:
        return f"{self.dtype} {show_dims(self.shape)}"

    @property
    def rank(self) -> int:
        return len(self.shape)


class Mismatch(Exception):
    """Raised by a shape rule: the input it is given does not fit the op; the message says
    why (the op's ``Takes`` adds what it takes)."""


class Takes:
    """What an op takes: ``dtypes`` (the first is what a client sends when the op starts a
    pre chain), ``ranks`` (None: any rank of at least ``min_rank``), ``words`` (what it takes
    in words, or a function of the parameters giving them) and ``template`` (a function of the
    parameters giving the ``TensorType`` a client sends, sizes it chooses named ``~H``; by
    default ``[~N, ~D1, ...]`` of the least rank, batched on axis 0)."""

    def __init__(self, dtypes: Sequence[str], words: str | Callable[[Mapping[str, Any]], str], *,
                 ranks: Sequence[int] | None = None, min_rank: int = 1,
                 template: Callable[[Mapping[str, Any]], TensorType] | None = None) -> None:
        self.dtypes = tuple(dtypes)
        self.ranks = tuple(ranks) if ranks is not None else None
        self.min_rank = min(self.ranks) if self.ranks else min_rank
        self._words = words
        self._template = template

    def words(self, params: Mapping[str, Any]) -> str:
        return self._words(params) if callable(self._words) else self._words

    def template(self, params: Mapping[str, Any]) -> TensorType:
        if self._template is not None:
            return self._template(params)
        shape = ("~N", *(f"~D{i}" for i in range(1, self.min_rank)))[:self.min_rank]
        return TensorType(self.dtypes[0], shape, 0 if shape else None)

    def problem(self, x: TensorType) -> str:
        """Why ``x`` does not fit the dtype and rank taken ("" when it does)."""
        if x.dtype not in self.dtypes:
            return f"dtype {x.dtype} is not {' or '.join(self.dtypes)}"
        if self.ranks is not None and x.rank not in self.ranks:
            return f"{x.rank} axes, not {' or '.join(map(str, self.ranks))}"
        if x.rank < self.min_rank:
            return f"{x.rank} axes, not at least {self.min_rank}"
        return ""


#: A shape rule: the input's type, the op's checked parameters and a resolver of the bundle's
#: resources (``res(ref) -> str | None``, None where the text is not known at the check) give
#: the output's type, or a tuple of types (one per part).  Raises Mismatch.
Rule = Callable[[TensorType, Mapping[str, Any], Callable[[Any], "str | None"]], "TensorType | tuple[TensorType, ...]"]


def _load(name: str) -> Any:
    """``"module:function"`` of this package, imported."""
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


def _same(x: TensorType, params: Mapping[str, Any], res: Any) -> TensorType:
    return x


class Op:
    """A registered op: ``fn(array, **params)`` and the parameters a manifest may give it.

    ``kernel`` is the function, or ``"module:function"`` of this package, imported the first
    time the op runs (``fn``).  ``required`` and ``optional`` map each parameter to its
    check; an optional parameter left out takes the function's default.  ``relate`` checks
    parameters against each other (raising OpParamsError).  ``takes`` says what input the op
    takes (dtypes, ranks, in words, and what a client sends when it starts a pre chain);
    ``gives`` is the shape rule (None: the output is typed as the input).  ``parts`` names the
    arrays of an op that returns several (``post.topk``: indices, values), so nothing can
    follow it in a chain.  ``may_be_empty`` marks an op whose result may rightly hold nothing
    (no detection survives ``post.nms``); any other op's empty result is an error, never a
    result.  Call ``op(x, **params)``, or ``op.bind(params)`` to check the parameters once
    and get a function of the array alone.  ``prepare`` (a function or ``"module:function"``)
    turns parameters whose resources were read into what the kernel takes.
    """

    def __init__(self, name: str, kernel: Callable[..., Any] | str, *, required: Mapping[str, Check] | None = None,
                 optional: Mapping[str, Check] | None = None,
                 relate: Callable[[dict[str, Any]], None] | None = None, last: bool = False,
                 takes: Takes | None = None, gives: Rule | None = None, parts: Sequence[str] = (),
                 may_be_empty: bool = False,
                 prepare: Callable[[dict[str, Any]], dict[str, Any]] | str | None = None) -> None:
        self.name = name
        self._kernel = kernel
        self._prepare = prepare
        self.required = dict(required or {})
        self.optional = dict(optional or {})
        self.relate = relate
        self.parts = tuple(parts)
        self.last = last or bool(self.parts)
        self.takes = takes
        self.gives = gives or _same
        self.may_be_empty = may_be_empty

    @property
    def short(self) -> str:
        """The name without its family: ``softmax`` for ``post.softmax`` (a post chain's
        default output name)."""
        return self.name.partition(".")[2] or self.name

    @property
    def fn(self) -> Callable[..., Any]:
        """The kernel (imported on first use: the numba modules load here)."""
        if isinstance(self._kernel, str):
            self._kernel = _load(self._kernel)
        return self._kernel

    def prepare(self, params: dict[str, Any]) -> dict[str, Any]:
        """The checked parameters, their bundle resources already read (a text for each
        ``Ref``), as the kernel takes them (a vocabulary's text split into its entries once,
        not on every call)."""
        if isinstance(self._prepare, str):
            self._prepare = _load(self._prepare)
        return self._prepare(params) if self._prepare is not None else params

    def check(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters checked and converted (OpParamsError naming the first wrong one);
        imports no kernel."""
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
        return checked

    def bind(self, params: Mapping[str, Any]) -> Callable[[Any], Any]:
        checked = self.check(params)
        refs = [k for k, v in checked.items() if isinstance(v, Ref)]
        if refs:
            raise OpParamsError(self.name, refs[0], f"{checked[refs[0]]} names a resource of a model's bundle, "
                                                    "which only a model's chains can read (drivers.ops.build_chains)")
        return functools.partial(self.fn, **checked)

    def type_of(self, x: TensorType, params: Mapping[str, Any],
                res: Callable[[Any], str | None] = lambda ref: None) -> TensorType | tuple[TensorType, ...]:
        """What the op gives for an input of type ``x`` with ``params`` (already checked):
        one type, or one per part.  Raises Mismatch saying why ``x`` does not fit."""
        if self.takes is not None:
            problem = self.takes.problem(x)
            if problem:
                raise Mismatch(problem)
        return self.gives(x, params, res)

    def describe_input(self, params: Mapping[str, Any]) -> str:
        """What the op takes with ``params`` (already checked), in words; "" when unsaid."""
        return self.takes.words(params) if self.takes is not None else ""

    def __call__(self, x: Any, **params: Any) -> Any:
        return self.bind(params)(x)

    def __repr__(self) -> str:
        return f"Op({self.name!r}, required={list(self.required)}, optional={list(self.optional)})"


def _shape(x: Any) -> str:
    """``float32 [1, 7]``: an array as the errors name it."""
    import numpy as np

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
        self._fns: list[Callable[[Any], Any]] = []
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

    def __call__(self, x: Any) -> Any:
        import numpy as np

        for i, fn in enumerate(self._fns):
            y = fn(x)
            if isinstance(y, np.ndarray) and y.size == 0 and not self._ops[i].may_be_empty:
                raise self._refuse(i, x, f"gives an empty result ({_shape(y)})")
            x = y
        return x

    def rows(self, x: Any) -> Any:
        """The pipeline on a batch ``[N, ...]`` where each op must keep one row per input
        row (``N`` rows out for ``N`` in): an op that makes more or fewer rows, or no array,
        raises OpInputError naming it, the shape it was given and what it takes."""
        import numpy as np

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
