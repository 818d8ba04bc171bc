"""A model's pre and post ops as chains around it: checked without running (``check_chains``),
then run (``build_chains``).

**Pre.** An op with ``input`` starts a chain feeding that model input (without it, the first
op starts one feeding the model's first input); the ops after it without ``input`` continue
it.  The client sends that input, under the model input's name, in the form the chain's first
op takes (uint8 ``[N, H, W, C]`` images as a camera gives them, float32 ``[N, samples]``
signals); the chain's last op must give what the model input's ``TensorSpec`` says (its dtype,
rank and fixed sizes).  Inputs without a chain are sent as the model takes them.

**Post.** An op with ``input`` starts a chain reading that tensor: a model output, or what an
earlier post chain added (without it, the first op reads the model's first output).  The
chain's last op may say ``output``, the name of what the chain adds (by default the op's short
name: ``softmax`` for ``post.softmax``); an op that gives several arrays adds each as
``<output>.<part>`` (``topk.indices``, ``topk.values``) and ends its chain.  The model's own
outputs are all still there: a reply carries the model's outputs, then what the chains add.

``check_chains(manifest)`` walks pre -> model -> post and gives the ``Contract``: the tensors
a client sends (``inputs``: the model's, each chained one replaced by what its chain's first
op takes) and can receive (``outputs``), or raises ChainError naming the op by position and
name, what it is given and what it takes.  It imports neither numba nor numpy: the model store
and the scheduler call it.  ``build_chains(manifest, resources)`` gives the ``Chains`` a driver
runs (the kernels are imported there).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from protocols.modelstore import Manifest, OpSpec, TensorSpec

from ._catalog import OPS
from ._exceptions import OpInputError, OpParamsError, OpsError
from ._registry import Mismatch, Op, Ref, TensorType, show_dims

__all__ = ["ChainError", "Contract", "Chain", "Step", "Chains", "check_chains", "build_chains", "texts"]


class ChainError(OpsError):
    """A manifest whose pre -> model -> post chains cannot run: an unknown op, bad
    parameters, an op given what it does not take, a chain whose end does not fit the model
    input it feeds, a post chain reading a tensor that does not exist, two chains feeding one
    input, two outputs of one name, a resource of the bundle that is not there.  ``where`` is
    the op's position (``pre[1]``), ``op`` its name."""

    def __init__(self, problem: str, where: str = "", op: str = "") -> None:
        self.problem = problem
        self.where = where
        self.op = op
        at = f"{where} {op}: " if where and op else f"{where} " if where else ""
        super().__init__(f"{at}{problem}; fix the model's manifest")


@dataclass(frozen=True)
class Step:
    """One op of a chain, checked: where the manifest has it (``pre[1]``), the op, its
    checked parameters, the type it is given and the type(s) it gives."""

    where: str
    op: Op
    params: dict[str, Any]
    given: TensorType
    gives: TensorType | tuple[TensorType, ...]


@dataclass(frozen=True)
class Chain:
    """A pre chain feeding model input ``target`` from the client's tensor of the same name,
    or a post chain reading tensor ``source`` and adding ``outputs`` (one name, or one per
    part)."""

    kind: str
    source: str
    target: str
    steps: list[Step]
    outputs: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return " -> ".join(f"{s.where} {s.op.name}" for s in self.steps)

    def name(self) -> str:
        """``the chain feeding input 'x'``, ``the chain reading 'y'``"""
        if self.kind == "pre":
            return f"the chain feeding input {self.target!r}"
        return f"the chain reading {self.source!r}"


@dataclass(frozen=True)
class Contract:
    """What a client of the model sends (``inputs``) and can receive (``outputs``), as
    TensorSpecs: the model's inputs with each chained one replaced by what its chain's first
    op takes; the model's outputs, then what the post chains add.  ``assets`` are the bundle's
    assets the ops read (a driver fetches them for ``build_chains``)."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    pre: list[Chain] = field(default_factory=list)
    post: list[Chain] = field(default_factory=list)
    assets: list[str] = field(default_factory=list)

    @property
    def batchable(self) -> bool:
        """Whether requests can be batched: some input has a batch axis and every output has
        one to split the batch's result along (an output without one, e.g. ``post.nms``'s
        detections, belongs to the whole batch)."""
        return any(s.batch() is not None for s in self.inputs) and all(s.batch() is not None for s in self.outputs)


def _type_of(spec: TensorSpec) -> TensorType:
    return TensorType(spec.dtype, tuple(spec.shape), 0 if spec.batch() == 0 else None)


def _spec(name: str, t: TensorType) -> TensorSpec:
    """The TensorSpec of a type: a client's ``~H`` (a size it chooses) is any size."""
    shape = [None if isinstance(d, str) and d.startswith("~") else d for d in t.shape]
    return TensorSpec(name=name, dtype=t.dtype, shape=shape, batch_axis=t.batch)


def _group(kind: str, specs: Sequence[OpSpec]) -> list[list[tuple[int, OpSpec]]]:
    """The manifest's ops of ``kind`` cut into chains: an op with ``input`` starts one."""
    chains: list[list[tuple[int, OpSpec]]] = []
    for i, spec in enumerate(specs):
        if not chains or spec.input:
            chains.append([])
        chains[-1].append((i, spec))
    for chain in chains:
        for position, (i, spec) in enumerate(chain):
            where = f"{kind}[{i}]"
            if spec.output and kind == "pre":
                raise ChainError(f"'output' names what a post chain adds; a pre chain feeds the model input its "
                                 f"first op names with 'input'", where, spec.op)
            if spec.output and position < len(chain) - 1:
                nxt, after = chain[position + 1]
                raise ChainError(f"'output' names what a chain adds and goes on its last op, but {kind}[{nxt}] "
                                 f"{after.op} continues the chain; give {kind}[{nxt}] an 'input' to start a new "
                                 f"chain, or move 'output' to the chain's last op", where, spec.op)
    return chains


def _op(where: str, spec: OpSpec) -> tuple[Op, dict[str, Any]]:
    op = OPS.get(spec.op)
    if op is None:
        close = difflib.get_close_matches(spec.op, OPS, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ChainError(f"names op {spec.op!r}, which is not an op the accelerator drivers have; {hint}"
                         f"the ops: {', '.join(sorted(OPS))}", where)
    try:
        return op, op.check(spec.params)
    except OpParamsError as exc:
        raise ChainError(_params_problem(exc), where, op.name) from None


def _params_problem(exc: OpParamsError) -> str:
    return f"parameter {exc.param!r}: {exc.problem}" if exc.param else f"parameters {exc.problem}"


class _Resources:
    """The bundle's resources as the checks read them: the manifest's metadata, and the
    assets' texts where given (``build_chains``); None for an asset not given (the check of a
    manifest alone knows it exists, not what it says)."""

    def __init__(self, manifest: Manifest, assets: Mapping[str, bytes] | None) -> None:
        self.manifest = manifest
        self.assets = assets
        self.used: list[str] = []

    def check(self, where: str, op: Op, params: Mapping[str, Any]) -> None:
        for key, value in params.items():
            if not isinstance(value, Ref):
                continue
            if value.kind == "metadata" and value.key not in self.manifest.metadata:
                known = ", ".join(map(repr, self.manifest.metadata)) or "none"
                raise ChainError(f"parameter {key!r} reads metadata {value.key!r}, which the manifest does not "
                                 f"have (its metadata: {known})", where, op.name)
            if value.kind == "asset":
                if value.key not in self.manifest.assets:
                    known = ", ".join(map(repr, self.manifest.assets)) or "none"
                    raise ChainError(f"parameter {key!r} reads asset {value.key!r}, which the bundle does not have "
                                     f"(its assets: {known}; add it with `edgebus model pack --asset "
                                     f"{value.key}=FILE`)", where, op.name)
                if self.assets is not None and value.key not in self.assets:
                    raise ChainError(f"parameter {key!r} reads asset {value.key!r}, which the driver did not fetch "
                                     f"(give its bytes to build_chains)", where, op.name)
                if value.key not in self.used:
                    self.used.append(value.key)

    def text(self, ref: Any) -> str | None:
        if not isinstance(ref, Ref):
            return None
        if ref.kind == "metadata":
            return self.manifest.metadata.get(ref.key)
        if self.assets is None or ref.key not in self.assets:
            return None
        try:
            return bytes(self.assets[ref.key]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ChainError(f"asset {ref.key!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _chain_ops(kind: str, steps: list[tuple[int, OpSpec]],
               res: _Resources) -> tuple[str, list[tuple[Op, dict[str, Any]]]]:
    """Where a chain starts (``pre[3]``) and its ops with their params checked: first each
    op's name and params, then what they read from the bundle's resources."""
    ops = [_op(f"{kind}[{i}]", s) for i, s in steps]
    for (i, _), (op, params) in zip(steps, ops):
        res.check(f"{kind}[{i}]", op, params)
    return f"{kind}[{steps[0][0]}]", ops


def _walk(kind: str, steps: list[tuple[int, OpSpec]], start: TensorType, res: _Resources,
          ops: list[tuple[Op, dict[str, Any]]]) -> list[Step]:
    """The types along a chain from ``start``; ChainError at the first op that cannot take
    what it is given."""
    out: list[Step] = []
    x: TensorType | tuple[TensorType, ...] = start
    for (i, spec), (op, params) in zip(steps, ops):
        where = f"{kind}[{i}]"
        if isinstance(x, tuple):
            prev = out[-1]
            raise ChainError(f"follows {prev.where} {prev.op.name}, which gives several arrays "
                             f"({', '.join(prev.op.parts)}) and so ends its chain; start a new chain on one of them "
                             f"with 'input' (e.g. \"{prev.op.short}.{prev.op.parts[0]}\")", where, op.name)
        try:
            y = op.type_of(x, params, res.text)
        except Mismatch as exc:
            takes = op.describe_input(params)
            raise ChainError(f"is given {x}{_batch(x)}, which it cannot take ({exc})"
                             + (f"; it takes {takes}" if takes else ""), where, op.name) from None
        except OpParamsError as exc:
            raise ChainError(_params_problem(exc), where, op.name) from None
        out.append(Step(where, op, params, x, y))
        x = y
    return out


def _batch(t: TensorType) -> str:
    return " (batch axis 0)" if t.batch == 0 else ""


def _fit(end: TensorType, spec: TensorSpec) -> tuple[dict[str, Any], str]:
    """Bindings of the client's sizes (``~H``) that make ``end`` fit model input ``spec``,
    and why it cannot ("" when it can)."""
    if end.dtype != spec.dtype:
        return {}, f"dtype {end.dtype}, not {spec.dtype}"
    if end.rank != len(spec.shape):
        return {}, f"{end.rank} axes, not {len(spec.shape)}"
    bound: dict[str, Any] = {}
    for axis, (a, b) in enumerate(zip(end.shape, spec.shape)):
        if isinstance(a, int):
            if isinstance(b, int) and a != b:
                return bound, f"axis {axis} is {a}, not {b}"
        elif isinstance(a, str) and a.startswith("~") and b is not None:
            if bound.setdefault(a, b) != b:
                return bound, f"axis {axis} is {a[1:]}, which another axis makes {bound[a]}, not {b}"
    want = spec.batch()
    if want is not None and end.batch != want:
        return bound, ("no batch axis (one row per request: an op does not keep the rows)" if end.batch is None
                       else f"batch axis {end.batch}, not {want}")
    return bound, ""


def _pre(manifest: Manifest, res: _Resources) -> tuple[list[Chain], dict[str, TensorSpec]]:
    chains: list[Chain] = []
    clients: dict[str, TensorSpec] = {}
    inputs = {s.name: s for s in manifest.inputs}
    fed: dict[str, str] = {}
    for steps in _group("pre", manifest.pre):
        first = steps[0][1]
        where, ops = _chain_ops("pre", steps, res)
        if not manifest.inputs:  # a manifest that declares no contract: the ops alone are checked
            chains.append(Chain("pre", first.input, first.input, []))
            continue
        target = first.input or manifest.inputs[0].name
        if target not in inputs:
            raise ChainError(f"'input' {target!r} is not an input of the model; its inputs: "
                             f"{', '.join(map(repr, inputs))}", where, first.op)
        if target in fed:
            raise ChainError(f"starts a second chain feeding input {target!r}, which {fed[target]} already feeds; "
                             "one chain feeds an input", where, first.op)
        fed[target] = f"{where} {first.op}"
        op, params = ops[0]
        if op.takes is None:
            raise ChainError("cannot start a pre chain: it does not say what a client sends it", where, op.name)
        spec = inputs[target]
        template = op.takes.template(params)
        if spec.batch() is None:  # an input without a batch axis (a state, a parameter): no rows to keep
            template = dataclasses.replace(template, batch=None)
        walked = _walk("pre", steps, template, res, ops)
        end = walked[-1].gives
        problem = "it gives several arrays" if isinstance(end, tuple) else ""
        bound: dict[str, Any] = {}
        if not problem:
            bound, problem = _fit(end, spec)  # type: ignore[arg-type]
        if not problem and bound:  # the model fixes sizes the client chose: again, with them
            template = dataclasses.replace(template, shape=tuple(bound.get(d, d) for d in template.shape))
            walked = _walk("pre", steps, template, res, ops)
            _, problem = _fit(walked[-1].gives, spec)  # type: ignore[arg-type]
        if problem:
            last = walked[-1]
            if isinstance(last.gives, tuple):
                raise ChainError(f"gives several arrays ({', '.join(last.op.parts)}) at the end of the chain feeding "
                                 f"input {target!r}, which takes one, {spec.describe()}", last.where, last.op.name)
            raise ChainError(f"gives {last.gives}{_batch(last.gives)} at the end of the chain feeding input "
                             f"{target!r} ({problem}), which takes {spec.describe()}", last.where, last.op.name)
        client = _spec(target, template)
        client.batch_axis = 0 if spec.batch() is not None and template.batch == 0 else None
        clients[target] = client
        chains.append(Chain("pre", target, target, walked))
    return chains, clients


def _post(manifest: Manifest, res: _Resources) -> tuple[list[Chain], list[TensorSpec]]:
    chains: list[Chain] = []
    added: list[TensorSpec] = []
    tensors: dict[str, TensorType] = {s.name: _type_of(s) for s in manifest.outputs}
    origin: dict[str, str] = {s.name: "the model gives" for s in manifest.outputs}
    for steps in _group("post", manifest.post):
        first = steps[0][1]
        where, ops = _chain_ops("post", steps, res)
        if not manifest.outputs:  # no contract declared: the ops alone are checked
            chains.append(Chain("post", first.input, "", []))
            continue
        source = first.input or manifest.outputs[0].name
        if source not in tensors:
            raise ChainError(f"reads {source!r}, which is neither an output of the model nor added by an earlier "
                             f"post chain; there are: {', '.join(map(repr, tensors))}", where, first.op)
        walked = _walk("post", steps, tensors[source], res, ops)
        last_i, last_spec = steps[-1]
        last = walked[-1]
        name = last_spec.output or last.op.short
        gives = last.gives if isinstance(last.gives, tuple) else (last.gives,)
        names = [f"{name}.{part}" for part in last.op.parts] if isinstance(last.gives, tuple) else [name]
        for n, t in zip(names, gives):
            if n in tensors:
                raise ChainError(f"adds output {n!r}, which {origin[n]} already; name what it adds with 'output'",
                                 last.where, last.op.name)
            tensors[n] = t
            origin[n] = f"{last.where} {last.op.name} adds"
            added.append(_spec(n, t))
        chains.append(Chain("post", source, "", walked, names))
    return chains, added


def check_chains(manifest: Manifest, assets: Mapping[str, bytes] | None = None) -> Contract:
    """The contract of ``manifest``'s model with its pre and post chains; raises ChainError
    (an OpsError) for chains that cannot run.  ``assets`` (name -> bytes), where given, also
    checks what the ops read from them (``build_chains`` gives them).  Imports no kernel."""
    res = _Resources(manifest, assets)
    pre, clients = _pre(manifest, res)
    post, added = _post(manifest, res)
    return Contract(inputs=[clients.get(s.name, s) for s in manifest.inputs],
                    outputs=[*manifest.outputs, *added], pre=pre, post=post, assets=res.used)


# -- running ----------------------------------------------------------------------------------------


#: Sets of a chain's scratch buffers kept between calls: one per call running at the same time
#: (a driver's threads), up to this many.
_SPARE_SETS = 2


class _Bound:
    """A chain's ops bound to their kernels and parameters.

    With ``reuse``, an op inside the chain that writes into a given array (an ``out``
    parameter: the image ops) writes into the array it gave on the chain's previous call,
    when it is given an input of the same shape and dtype as then (so its result has the same
    shape): a camera's frames cost no new intermediate image each.  The chain's last op always
    gives a new array: that one leaves the chain (to ONNX Runtime and, as the model's
    features, to the client; a post chain's to the reply, sent without a copy).  A call takes
    a set of buffers for itself and puts it back when it ends, so calls on several threads at
    once never share one (a call finding no spare set starts a new one)."""

    def __init__(self, chain: Chain, res: _Resources, reuse: bool = True) -> None:
        self.chain = chain
        self.fns = []
        self.writes_out: list[bool] = []
        for i, step in enumerate(chain.steps):
            params = {k: (res.text(v) if isinstance(v, Ref) else v) for k, v in step.params.items()}
            self.fns.append(functools.partial(step.op.fn, **step.op.prepare(params)))
            inner = i < len(chain.steps) - 1
            self.writes_out.append(reuse and inner and "out" in inspect.signature(step.op.fn).parameters)
        #: spare scratch sets: per step, (the input's shape and dtype, the array it gave) or None
        self._spare: list[list[Any]] = []

    def __call__(self, x: Any) -> Any:
        if not any(self.writes_out):
            return self._run(x, None)
        try:
            scratch = self._spare.pop()  # atomic: two threads never take the same set
        except IndexError:
            scratch = [None] * len(self.fns)
        try:
            y = self._run(x, scratch)
            self._release(scratch, y)
        finally:
            if len(self._spare) < _SPARE_SETS:
                self._spare.append(scratch)
        return y

    @staticmethod
    def _release(scratch: list[Any], y: Any) -> None:
        """Drop from the set any buffer the chain's result shares memory with (an op that gave
        a view of its input): the result leaves the chain and must not be written again."""
        import numpy as np

        for i, held in enumerate(scratch):
            if held is not None and any(isinstance(a, np.ndarray) and np.may_share_memory(a, held[1])
                                        for a in (y if isinstance(y, tuple) else (y,))):
                scratch[i] = None

    def _run(self, x: Any, scratch: list[Any] | None) -> Any:
        import numpy as np

        for i, (step, fn) in enumerate(zip(self.chain.steps, self.fns)):
            if scratch is not None and self.writes_out[i] and isinstance(x, np.ndarray):
                key = (x.shape, x.dtype.str)
                held = scratch[i]
                if held is not None and held[0] == key:
                    y = fn(x, out=held[1])
                else:
                    y = fn(x)
                    scratch[i] = (key, y) if isinstance(y, np.ndarray) else None
            else:
                y = fn(x)
            arrays = y if isinstance(y, tuple) else (y,)
            n = len(x) if step.given.batch == 0 and np.ndim(x) else None
            gives = step.gives if isinstance(step.gives, tuple) else (step.gives,)
            for part, (a, t) in enumerate(zip(arrays, gives)):
                what = f"part {step.op.parts[part]!r} " if step.op.parts else ""
                if not isinstance(a, np.ndarray):
                    raise self._refuse(step, x, f"gives {what}{type(a).__name__}, not an array")
                if n is not None and t.batch == 0 and (a.ndim == 0 or len(a) != n):
                    got = f"{len(a)} row(s) ({a.dtype} {list(a.shape)})" if a.ndim else f"{a.dtype} {list(a.shape)}"
                    raise self._refuse(step, x, f"gives {what}{got} for {n} input row(s); each row must give "
                                                "exactly one")
                if a.size == 0 and np.size(x) and not step.op.may_be_empty:
                    raise self._refuse(step, x, f"gives {what}an empty result ({a.dtype} {list(a.shape)})")
            x = y
        return x

    def _refuse(self, step: Step, x: Any, problem: str) -> OpInputError:
        import numpy as np

        takes = step.op.describe_input(step.params)
        return OpInputError(step.op.name, f"{step.where} in {self.chain.name()}: {np.asarray(x).dtype} "
                                          f"{list(np.shape(x))} {problem}" + (f"; it takes {takes}" if takes else ""))


class Chains:
    """A model's chains, ready to run on a batch (``build_chains``).

    ``pre(inputs)`` takes what a client sends (by the contract's input names) and gives the
    model's feed: each chained input through its chain (checked to fit the model's input),
    the others as they are.  ``post(outputs)`` takes the model's outputs by name and gives
    them followed by what the post chains add.  An op that makes more or fewer rows than
    it was given along a batch axis, an empty result, or a feed that does not fit the model
    raises OpInputError naming the op, what it was given and what it takes.

    With ``reuse`` (the default), the image ops inside a chain write into the buffers they
    filled on its previous call of the same shapes (see ``_Bound``); every result ``pre`` and
    ``post`` give is a new array all the same."""

    def __init__(self, manifest: Manifest, contract: Contract, assets: Mapping[str, bytes],
                 reuse: bool = True) -> None:
        res = _Resources(manifest, assets)
        self.manifest = manifest
        self.contract = contract
        self._model_inputs = {s.name: s for s in manifest.inputs}
        self._pre = [(c, _Bound(c, res, reuse)) for c in contract.pre if c.steps]
        self._post = [(c, _Bound(c, res, reuse)) for c in contract.post if c.steps]

    def pre(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        feed = dict(inputs)
        for chain, run in self._pre:
            if chain.source not in feed:
                raise OpInputError(chain.steps[0].op.name, f"input {chain.source!r}, which its chain "
                                                           f"({chain.describe()}) feeds, was not given")
            y = run(feed[chain.source])
            spec = self._model_inputs[chain.target]
            problem = spec.check(y.dtype.name, y.shape)
            if problem:
                last = chain.steps[-1]
                raise OpInputError(last.op.name, f"{last.where} ends {chain.name()} with what the model does not "
                                                 f"take: {problem}")
            feed[chain.target] = y
        return feed

    def post(self, outputs: Mapping[str, Any]) -> dict[str, Any]:
        result = dict(outputs)
        for chain, run in self._post:
            y = run(result[chain.source])
            for name, a in zip(chain.outputs, y if isinstance(y, tuple) else (y,)):
                result[name] = a
        return result

    def __repr__(self) -> str:
        chains = [c.describe() for c, _ in (*self._pre, *self._post)]
        return f"Chains({'; '.join(chains) or 'none'})"


def build_chains(manifest: Manifest, resources: Mapping[str, bytes] | None = None, *, reuse: bool = True) -> Chains:
    """The manifest's chains, checked (``check_chains``, with the assets' bytes) and bound to
    their kernels (numba loads here) to run around the model.  ``resources`` maps each asset
    the ops read (``Contract.assets``) to its bytes; a parameter ``"metadata:KEY"`` reads the
    manifest's own metadata.  ``reuse``: see ``Chains``."""
    assets = dict(resources or {})
    contract = check_chains(manifest, assets)
    return Chains(manifest, contract, assets, reuse)


def texts(codes: Any) -> list[str]:
    """The strings of a text output: uint32 Unicode code points ``[N, L]``, zero-padded
    (``text.ctc_greedy``'s ``text``); a single row ``[L]`` gives one string."""
    import numpy as np

    a = np.ascontiguousarray(codes, dtype="<u4")
    if a.ndim == 1:
        a = a[None]
    rows, width = (a.shape[0] if a.ndim else 0), a.shape[-1]
    if width == 0:
        return [""] * rows
    return a.reshape(rows, width).view(f"<U{width}")[:, 0].tolist()

