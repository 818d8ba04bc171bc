"""What a client sends a model and gets back (its contract), and what that means for
batching: which axis of each tensor is the batch, and which requests may share a run.

A model's contract is its manifest's inputs and outputs, with its ops folded in: an input
fed by a pre chain is sent as the chain's first op takes it (a camera's uint8 image for a
float NCHW model input), and the post chains add outputs.  Requests name their tensors
(``Tensor.name``) or send them unnamed in the contract's order.

Two requests may share a batch when every input with a batch axis has the same shape but
for that axis, and every input without one (a sample rate, a threshold) is equal: those
are parameters of the run, not rows of it.  A model with an output that has no batch axis
is never batched: there would be no way to tell whose part of it is whose.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from protocols import Tensor, dtype_name
from protocols.modelstore import Manifest, TensorSpec, check_tensors
from services import BadMessage

__all__ = ["Plan", "contract", "all_finite"]


def all_finite(a: np.ndarray) -> bool:
    """No NaN and no infinity in ``a``; for a large ``a`` without the temporary
    ``np.isfinite(a)`` would allocate (a pass of min and max: NaN propagates through both,
    and an infinity is one of them)."""
    if a.size <= 4096:  # (a reduction's fixed cost is what a small temporary saves)
        return bool(np.isfinite(a).all())
    return bool(np.isfinite(a.min()) and np.isfinite(a.max()))


def contract(manifest: Manifest) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs a client sends and the outputs it may ask for, ops folded in."""
    if not (manifest.pre or manifest.post):
        return list(manifest.inputs), list(manifest.outputs)
    from drivers.ops import OpsError, check_chains  # the ops' declarations only: numba stays unimported

    try:
        found = check_chains(manifest)
    except OpsError as exc:
        raise ValueError(str(exc)) from None
    return list(found.inputs), list(found.outputs)


class Plan:
    """One model version's contract, ready for the per-request checks and for batching."""

    __slots__ = ("model", "inputs", "outputs", "names", "axes", "out_axes", "batchable", "_unnamed")

    def __init__(self, model: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.model = model
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.names = [s.name for s in self.inputs]
        #: input name -> its batch axis (None: a parameter of the run, equal across a batch)
        self.axes = {s.name: s.batch() for s in self.inputs}
        self.out_axes = {s.name: s.batch() for s in self.outputs}
        self.batchable = any(a is not None for a in self.axes.values()) and \
            all(a is not None for a in self.out_axes.values())
        self._unnamed = ", ".join(f"{s.name!r} {s.describe()}" for s in self.inputs) or "none"

    @classmethod
    def of(cls, model: str, manifest: Manifest) -> "Plan":
        inputs, outputs = contract(manifest)
        return cls(model, inputs, outputs)

    def bind(self, descs: Sequence[Tensor], arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The request's tensors by input name, in the contract's order; bad-message naming
        the input, what it takes and what came, for anything that does not fit."""
        model = self.model
        if not arrays:
            raise BadMessage(f"{model}: no input tensor; it takes {self._unnamed}")
        named = descs[0].name != "" if descs else False
        if any((d.name != "") != named for d in descs):
            raise BadMessage(f"{model}: name every input tensor or none (unnamed ones are taken in the order "
                             f"{', '.join(map(repr, self.names))})")
        if named:
            given = {}
            for d, a in zip(descs, arrays):
                if d.name in given:
                    raise BadMessage(f"{model}: input {d.name!r} is given twice")
                given[d.name] = a
        else:
            if len(arrays) != len(self.inputs):
                raise BadMessage(f"{model} takes {len(self.inputs)} input(s) ({self._unnamed}), got "
                                 f"{len(arrays)} unnamed tensor(s)")
            given = dict(zip(self.names, arrays))
        return self.check(given)

    def check(self, given: dict[str, np.ndarray], who: str = "") -> dict[str, np.ndarray]:
        """``given`` (every input by name) checked against the contract, in the contract's
        order; bad-message (naming ``who``, the model by default) for anything that does not
        fit: a missing, extra, mistyped or misshaped input, NaN or infinity, no rows."""
        model = who or self.model
        if len(self.inputs) == 1 and len(given) == 1:  # the common case, without building a dict of shapes
            (name, a), = given.items()
            spec = self.inputs[0]
            problem = (spec.check(dtype_name(a.dtype), a.shape) if name == spec.name else
                       check_tensors(self.inputs, {name: (dtype_name(a.dtype), a.shape)}))
        else:
            problem = check_tensors(self.inputs, {n: (dtype_name(a.dtype), a.shape) for n, a in given.items()})
        if problem:
            raise BadMessage(f"{model}: {problem}")
        for name, a in given.items():
            if a.dtype.kind == "f" and not all_finite(a):
                raise BadMessage(f"{model}: input {name!r} contains NaN or infinity")
            axis = self.axes.get(name)
            if axis is not None and a.shape[axis] == 0:
                raise BadMessage(f"{model}: input {name!r} has no rows (size 0 on its batch axis {axis})")
        return given if list(given) == self.names else {n: given[n] for n in self.names}

    def rows(self, inputs: dict[str, np.ndarray]) -> int:
        """How many rows of the batch a request's inputs make (1 for a model without a batch axis)."""
        for name, axis in self.axes.items():
            if axis is not None:
                return inputs[name].shape[axis]
        return 1

    def wanted(self, names: Sequence[str]) -> list[str]:
        """The outputs asked for, checked: bad-message naming any the model does not give."""
        known = self.out_axes
        unknown = [n for n in names if n not in known]
        if unknown:
            raise BadMessage(f"{self.model} gives no output {', '.join(map(repr, unknown))}; its outputs are "
                             f"{', '.join(repr(s.name) for s in self.outputs)}")
        return list(names)
