"""Errors of the pre- and post-processing ops.

Hierarchy::

    OpsError
    ├── UnknownOp       a manifest names an op that is not in the registry
    ├── OpParamsError   an op's parameters are missing, unknown, of the wrong type or out of range
    ├── PipelineError   the ops cannot run in the order given
    └── OpInputError    the array given to an op does not fit it (dtype, shape, values)

Every message names the op as the manifest does (``signal.frame``), so the person who
wrote the manifest can find the line to fix.
"""

from __future__ import annotations

__all__ = ["OpsError", "UnknownOp", "OpParamsError", "PipelineError", "OpInputError"]


class OpsError(Exception):
    """Base class for everything the ops raise on purpose."""


class UnknownOp(OpsError):
    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        super().__init__(f"unknown op {name!r}; the ops are: {', '.join(known)}")


class OpParamsError(OpsError):
    def __init__(self, op: str, param: str, problem: str) -> None:
        self.op = op
        self.param = param
        self.problem = problem
        where = f"parameter {param!r}" if param else "parameters"
        super().__init__(f"op {op!r}, {where}: {problem}; fix the model's manifest")


class PipelineError(OpsError):
    def __init__(self, op: str, problem: str) -> None:
        self.op = op
        self.problem = problem
        super().__init__(f"op {op!r} {problem}; reorder the model's manifest")


class OpInputError(OpsError):
    def __init__(self, op: str, problem: str) -> None:
        self.op = op
        self.problem = problem
        super().__init__(f"op {op!r} cannot take its input: {problem}")
