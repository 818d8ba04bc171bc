"""Stateful streams: a recurrent model's state kept by the scheduler between chunks.

A model whose manifest declares ``states`` (pairs of an input and the output that gives its
next value, e.g. silero-vad's ``state`` -> ``stateN``) can be streamed: ``OpenStream`` fixes
its parameters (inputs without a batch axis that are not state, e.g. a sample rate) and
starts each state from its initial value; each ``Infer(stream=ID)`` carries only the chunk's
own inputs and gets only the outputs that are not state.  The chunks of one stream run one
at a time, in order, on the driver the stream is pinned to; chunks of different streams
batch together like any requests (their states stacked along the state's batch axis, which
must be declared) when their parameters are equal.

What this module holds is bookkeeping, without the bus: a stream's state and parameters,
binding a chunk into the model's full inputs, taking the next state out of the outputs,
pinning and resets, and idle expiry.  A stream's state survives nothing: when its driver
stops, the stream is reset to its initial state (said by a ``StreamReset`` event and in
the next chunk's result) and pinned to another driver; it goes on.
"""

from __future__ import annotations

import secrets
import time
from typing import Sequence

import anyio
import numpy as np

from protocols import Tensor, dtype_name
from protocols.modelstore import Manifest, TensorSpec, check_tensors
from services import BadMessage, Forbidden, Overloaded, UnknownDestination

from ._contract import Plan

__all__ = ["Stream", "Streams"]


class Stream:
    """One open stream: its model, pinned driver, state, parameters and counters."""

    __slots__ = ("id", "model", "version", "plan", "owner", "pairs", "initial", "state", "params", "chunk_inputs",
                 "driver", "topic", "outputs", "idle_s", "last", "seq", "lock", "reset")

    def __init__(self, id: str, model: str, version: str, plan: Plan, owner: str, pairs: dict[str, str],
                 initial: dict[str, np.ndarray], params: dict[str, np.ndarray], driver: str | None, topic: str,
                 outputs: list[str], idle_s: float) -> None:
        self.id, self.model, self.version, self.plan, self.owner = id, model, version, plan, owner
        #: state input -> the output that gives its next value
        self.pairs = pairs
        self.initial = initial
        self.state = dict(initial)
        self.params = params
        #: what each chunk carries, in the contract's order
        self.chunk_inputs = [n for n in plan.names if n not in pairs and n not in params]
        self.driver = driver
        self.topic, self.outputs, self.idle_s = topic, outputs, idle_s
        self.last = time.monotonic()
        #: chunks run so far
        self.seq = 0
        #: one chunk at a time, in order
        self.lock = anyio.Lock()
        #: why the state went back to its initial value since the last chunk ("": it did not)
        self.reset = ""

    def bind(self, descs: Sequence[Tensor], arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The model's full inputs: this chunk's (named, or unnamed in ``chunk_inputs``'
        order), the state and the parameters; bad-message naming what does not fit."""
        model = f"{self.model} (stream {self.id})"
        named = bool(descs) and descs[0].name != ""
        if named:
            chunk = {d.name: a for d, a in zip(descs, arrays)}
            if len(chunk) != len(descs):
                raise BadMessage(f"{model}: an input is given twice")
            kept = [n for n in chunk if n in self.pairs or n in self.params]
            if kept:
                raise BadMessage(f"{model}: {', '.join(map(repr, kept))} is the stream's own (state or parameter); "
                                 f"a chunk carries {', '.join(map(repr, self.chunk_inputs))}")
        else:
            if len(arrays) != len(self.chunk_inputs):
                raise BadMessage(f"{model}: a chunk carries {len(self.chunk_inputs)} input(s) "
                                 f"({', '.join(map(repr, self.chunk_inputs))}), got {len(arrays)}")
            chunk = dict(zip(self.chunk_inputs, arrays))
        return self.plan.check({**chunk, **self.state, **self.params}, model)

    def advance(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Take the next state out of a chunk's ``outputs``; what the client gets."""
        for name, out in self.pairs.items():
            self.state[name] = np.array(outputs[out], order="C")  # its own memory, not a view of a batch
        self.seq += 1
        self.last = time.monotonic()
        state_outputs = set(self.pairs.values())
        if self.outputs:
            return {n: outputs[n] for n in self.outputs}
        return {n: o for n, o in outputs.items() if n not in state_outputs}

    def restart(self, reason: str) -> None:
        """Back to the initial state (the next chunk's result says ``reason``)."""
        self.state = dict(self.initial)
        self.reset = reason


class Streams:
    """The open streams, at most ``max_streams``."""

    def __init__(self, max_streams: int, idle_s: float) -> None:
        self.max_streams = max_streams
        self.idle_s = idle_s
        self.open: dict[str, Stream] = {}

    def __len__(self) -> int:
        return len(self.open)

    def create(self, model: str, version: str, manifest: Manifest, plan: Plan, owner: str,
               descs: Sequence[Tensor], arrays: Sequence[np.ndarray], driver: str | None, topic: str,
               outputs: Sequence[str], idle_s: float) -> Stream:
        """A new stream of ``model``: its parameters checked (the model's inputs without a
        batch axis that are not state), its states at their initial values."""
        if not manifest.states:
            raise BadMessage(f"{model} {version} declares no states, so it is not streamed: send it Infer requests "
                             "(a recurrent model's pack spec lists its state pairs under \"states\")")
        if len(self.open) >= self.max_streams:
            raise Overloaded(f"{len(self.open)} streams are open (the scheduler's max_streams setting); close one "
                             "or retry later")
        if topic and not topic.startswith("results."):
            raise BadMessage(f"a stream's topic must be under results. (the scheduler publishes there), not {topic!r}")
        specs = {s.name: s for s in plan.inputs}
        pairs = {st.input: st.output for st in manifest.states}
        initial = {st.input: _initial(model, specs[st.input], st.initial) for st in manifest.states}
        wanted_params = [s for s in plan.inputs if s.name not in pairs and s.batch() is None]
        if descs and not all(d.name for d in descs):
            raise BadMessage(f"{model}: name a stream's parameters ({', '.join(repr(s.name) for s in wanted_params)})")
        given = {d.name: a for d, a in zip(descs, arrays)}
        problem = check_tensors(wanted_params, {n: (dtype_name(a.dtype), a.shape) for n, a in given.items()},
                                "parameter")
        if problem:
            raise BadMessage(f"{model}: {problem}")
        params = {n: np.array(a, order="C") for n, a in given.items()}  # (ascontiguousarray makes 0-d 1-d)
        wanted = plan.wanted(outputs) if outputs else []
        stream = Stream(secrets.token_hex(8), model, version, plan, owner, pairs, initial, params, driver, topic,
                        wanted, idle_s or self.idle_s)
        self.open[stream.id] = stream
        return stream

    def get(self, stream_id: str, sender: str) -> Stream:
        stream = self.open.get(stream_id)
        if stream is None:
            raise UnknownDestination(f"no stream {stream_id!r} (closed, expired, or never opened)")
        if stream.owner != sender:
            raise Forbidden(f"stream {stream_id} belongs to {stream.owner!r}")
        return stream

    def close(self, stream: Stream) -> None:
        self.open.pop(stream.id, None)

    def pinned_to(self, driver: str) -> list[Stream]:
        return [s for s in self.open.values() if s.driver == driver]

    def load(self, driver: str) -> int:
        return sum(1 for s in self.open.values() if s.driver == driver)

    def idle(self, now: float) -> list[Stream]:
        """Streams without a chunk for longer than their idle time, and none running."""
        return [s for s in self.open.values() if now - s.last > s.idle_s and not s.lock.locked()]


def _initial(model: str, spec: TensorSpec, value: float) -> np.ndarray:
    """A state's initial value: the input's shape with one along its batch axis."""
    axis = spec.batch()
    shape = []
    for i, d in enumerate(spec.shape):
        if i == axis:
            shape.append(1)
        elif isinstance(d, int):
            shape.append(d)
        else:
            raise BadMessage(f"{model}: state {spec.name!r} is {spec.describe()}: axis {i} has no fixed size, so its "
                             "initial value has no shape; fix it in the pack spec")
    return np.full(shape, value, dtype=spec.dtype)
