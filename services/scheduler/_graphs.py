"""Pipelines as graphs: one ``Infer`` on a graph's name runs its stages inside the scheduler.

    [services.scheduler.settings.graphs.ocr]
    inputs = ["image"]
    outputs = { text = "rec.ctc_greedy.text", boxes = "crop.boxes", counts = "det.db_boxes.counts" }
    [[services.scheduler.settings.graphs.ocr.stages]]
    name = "det"
    model = "text-det"
    inputs = { x = "image" }
    [[services.scheduler.settings.graphs.ocr.stages]]
    name = "crop"
    op = "crop"
    for_each = "det.db_boxes.boxes"
    inputs = { image = "image", boxes = "det.db_boxes.boxes", map = "det.sigmoid_0.tmp_0" }
    params = { height = 48, width = 320 }
    [[services.scheduler.settings.graphs.ocr.stages]]
    name = "rec"
    model = "text-rec"
    inputs = { x = "crop.crops" }

* **Tensors.**  A graph tensor is a graph input (``image``) or a stage's output
  (``det.db_boxes.boxes``: the stage's name, a dot, the output's name).  A tensor has its rows
  along axis 0, one per row of the request (a model input or output whose batch axis is
  elsewhere is moved there and back), or one per *item* after a fan-out.  A graph input sent
  with one axis fewer than the first stage taking it expects is taken as one row.
* **Stages.**  ``model``: an installed model, run through ``Scheduler.infer`` as a client's
  request is (its queue, batches shared with other requests, the version and variant picks
  for the request's key; ``version`` pins one); ``inputs`` maps each of the model's inputs to
  a graph tensor, and the model is asked for the outputs the graph uses.  ``op``: an op the
  scheduler runs itself (``GRAPH_OPS``), with ``params``: numba kernels, on the event loop
  when small, in a worker thread when large (and the first time, while numba loads).
* **Fan-out.**  ``for_each = T`` runs the stage once per item of ``T``: a padded ``[N, K, ...]``
  tensor whose ``counts`` (int ``[N]``; by default its sibling ``....counts`` when the stage
  giving it has one, else all K) say how many of each row's K are items.  A stage input
  naming ``T`` gets the items; one naming another per-row tensor gets each item's row (a
  model stage: repeated; an op: with each item's owner).  A stage that takes items (a fan-out
  stage's outputs, as ``crop.crops``) runs per item too.  Either way a model stage sends all
  of a request's items as ONE request of that many rows: they batch together, and with other
  requests' items.  No items: the stage does not run and gives empty tensors.
* **Fan-in.**  A graph output that is per item comes back per row, padded: ``[N, most items,
  ...]``, zeros after each row's items (N = 1: the items, in order); output the counts too to
  tell items from padding.
* **Order.**  Stages run in waves: each wave the stages whose inputs are all there, together.
* **Answer.**  One ``InferResult``: the graph's outputs by name (``Infer.outputs`` picks
  some); ``stages``, each stage's model (or op), items and milliseconds in the order they
  finished; ``version`` the models' (``det=1.0.0 rec=1.0.0``); ``queue_ms``/``compute_ms``
  summed over the stages, ``total_ms`` the graph's.  A failed stage answers with its error's
  code and the graph and stage named: ``bad-message: graph ocr, stage rec: ...``.
* **Checks.**  When the settings are decoded (``check_graph``: names, references, a model or
  an op, op inputs and params, cycles, fan-outs that meet, stages nothing uses), and against
  each model's contract when a version first runs (every input mapped, the outputs used
  given, with a batch axis).
* **Metrics.**  ``edgebus_graph_stage_seconds{graph, stage}``, ``edgebus_graph_seconds{graph}``.

A graph's name is what ``Infer.model`` names: it hides an installed model of the same name.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import anyio
import numpy as np

from protocols import Tensor, pack_tensors, unpack_tensor
from protocols.scheduler import InferResult, StageTime
from services import BadMessage, InternalError, RemoteError

from ._settings import GraphSettings, StageSettings

if TYPE_CHECKING:
    from ._contract import Plan
    from ._service import Scheduler

__all__ = ["GRAPH_OPS", "GraphOp", "Layout", "check_graph", "Graph", "Graphs", "FanOut", "THREAD_WORK"]

_NAME = re.compile(r"[A-Za-z0-9_-]+")

#: an op whose work (output pixels) is at least this runs in a worker thread, not on the loop
THREAD_WORK = 1 << 17


# -- the ops a graph may run in the scheduler ------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """An integer parameter: its default and bounds."""

    default: int
    lo: int
    hi: int | None = None

    def check(self, name: str, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, int) or value < self.lo or \
                (self.hi is not None and value > self.hi):
            bounds = f"from {self.lo} to {self.hi}" if self.hi is not None else f">= {self.lo}"
            return f"params.{name} must be an integer {bounds}, not {value!r}"
        return ""


@dataclass(frozen=True)
class GraphOp:
    """An op a graph stage may name (``op = "crop"``): what it takes, gives and runs."""

    name: str
    summary: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    #: the inputs that take items (a fan-out's); the others take whole rows
    items: tuple[str, ...]
    #: each row input's rank, its batch axis included (a graph input one axis short is one row)
    ranks: Mapping[str, int]
    params: Mapping[str, Param]
    outputs: tuple[str, ...]
    #: ``run(inputs, fan, params) -> outputs`` (``fan``: the items' owners; None per row)
    run: Callable[[dict[str, np.ndarray], "FanOut | None", dict[str, Any]], dict[str, np.ndarray]]
    #: ``work(inputs, fan, params)``: its cost in output pixels (THREAD_WORK or more: a thread)
    work: Callable[[dict[str, np.ndarray], "FanOut | None", dict[str, Any]], int]
    #: inputs of a small run, which loads (and if need be compiles) its kernels
    sample: Callable[[], tuple[dict[str, np.ndarray], "FanOut | None"]]

    def warm(self) -> None:
        inputs, fan = self.sample()
        self.run(inputs, fan, {k: p.default for k, p in self.params.items()})


def _crop(inputs: dict[str, np.ndarray], fan: "FanOut | None", p: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each item's box cut out of its row's image, upright at (height, width)
    (``drivers.ops.text.crop_rotated``); boxes found on a map of another size than the image
    (``map``: its last two axes) scaled to the image first (``text.scale_boxes``)."""
    from drivers.ops import text  # numba: loaded when a graph first crops

    assert fan is not None
    image, boxes, frame = inputs["image"], inputs["boxes"], inputs.get("map")
    if image.dtype != np.uint8 or image.ndim != 4:
        raise ValueError(f"input 'image' must be uint8 images [N, H, W, C], not {image.dtype} {list(image.shape)}")
    if image.shape[0] != fan.rows:
        raise ValueError(f"input 'image' has {image.shape[0]} row(s) but the items come from {fan.rows}")
    if boxes.ndim != 3 or boxes.shape[1:] != (4, 2) or boxes.dtype.kind not in "fiu":
        raise ValueError(f"input 'boxes' must be four (x, y) corners per item [items, 4, 2], not {boxes.dtype} "
                         f"{list(boxes.shape)}")
    if frame is not None and frame.ndim < 2:
        raise ValueError(f"input 'map' must have the boxes' height and width as its last two axes, not "
                         f"{list(frame.shape)}")
    height, width, pad = p["height"], p["width"], p["pad"]
    h, w, c = image.shape[1:]
    crops = np.empty((fan.items, height, width, c), np.uint8)
    widths = np.empty(fan.items, np.int32)
    scaled = np.empty((fan.items, 4, 2), np.float32)
    for row in range(fan.rows):
        lo, hi = int(fan.offsets[row]), int(fan.offsets[row + 1])
        if lo == hi:
            continue
        b = boxes[lo:hi]
        if frame is not None and tuple(frame.shape[-2:]) != (h, w):
            b = text.scale_boxes(b, frame.shape[-2:], (h, w))
        scaled[lo:hi] = b
        img = image[row]  # (a frame's view is read-only: the kernels are compiled for writable arrays)
        crops[lo:hi], widths[lo:hi] = text.crop_rotated(img if img.flags.writeable else img.copy(), b,
                                                        height, width, pad)
    return {"crops": crops, "boxes": scaled, "widths": widths}


#: name -> the op
GRAPH_OPS: dict[str, GraphOp] = {op.name: op for op in [
    GraphOp("crop", "each item's box (four corners) cut out of its image, upright, at height x width",
            required=("image", "boxes"), optional=("map",), items=("boxes",), ranks={"image": 4},
            params={"height": Param(48, 1), "width": Param(320, 1), "pad": Param(0, 0, 255)},
            outputs=("crops", "boxes", "widths"), run=_crop,
            work=lambda inputs, fan, p: (fan.items if fan else 0) * p["height"] * p["width"],
            sample=lambda: ({"image": np.zeros((1, 32, 64, 3), np.uint8), "map": np.zeros((1, 1, 16, 32), np.float32),
                             "boxes": np.array([[[1, 1], [20, 1], [20, 8], [1, 8]]], np.float32)},
                            FanOut(np.ones(1, np.int64)))),
]}


# -- the graph's layout, checked when the settings are decoded -------------------------------------


@dataclass
class Stage:
    """One stage as the layout sees it."""

    name: str
    settings: StageSettings
    op: GraphOp | None
    params: dict[str, Any]
    #: the stages it takes something from
    deps: list[str]
    #: the fan-out its items come from (the stage that made it), None: it runs per row
    level: str | None = None
    #: its for_each is per row: this stage makes the fan-out (its items are ``for_each``'s)
    fans_out: bool = False
    #: ``for_each``'s counts: a graph tensor, "" for all K, or a sibling the producer may give
    counts: str = ""
    counts_maybe: bool = False
    #: its outputs the graph uses, and those it may use if the model gives them
    wanted: list[str] = field(default_factory=list)
    maybe: list[str] = field(default_factory=list)


class Layout:
    """A graph's stages checked: references, order (``waves``), fan-outs (``level_of``)."""

    def __init__(self, name: str, g: GraphSettings) -> None:
        self.name = name
        self.settings = g
        self.inputs = list(g.inputs)
        for i in self.inputs:
            if not _NAME.fullmatch(i):
                raise self._error(f"input {i!r}: a graph input's name is letters, digits, '_' and '-' (no dots: "
                                  "STAGE.OUTPUT names a stage's output)")
        if len(set(self.inputs)) != len(self.inputs):
            raise self._error(f"inputs {self.inputs} name one input twice")
        self.stages: dict[str, Stage] = {}
        for s in g.stages:
            if not _NAME.fullmatch(s.name):
                raise self._error(f"stage {s.name!r}: a stage's name is letters, digits, '_' and '-' (no dots)")
            if s.name in self.stages:
                raise self._error(f"two stages are named {s.name!r}")
            if s.name in self.inputs:
                raise self._error(f"stage {s.name!r} has the name of a graph input")
            self.stages[s.name] = self._stage(s)
        for st in self.stages.values():
            self._references(st)
        for out, ref in g.outputs.items():
            self._ref(ref, f"graph {name}: outputs.{out}")
        self.order = self._order()
        self.waves = self._waves()
        for st in self.order:
            self._fan(st)
        self._uses()

    def _error(self, problem: str, stage: str = "") -> ValueError:
        return ValueError(f"graph {self.name}{', stage ' + stage if stage else ''}: {problem}")

    def _stage(self, s: StageSettings) -> Stage:
        if bool(s.model) == bool(s.op):
            raise self._error("give either model (an installed model) or op (one of "
                              f"{', '.join(GRAPH_OPS)}), not {'both' if s.model else 'neither'}", s.name)
        if not s.inputs:
            raise self._error("no inputs: map the stage's inputs to graph tensors (inputs = { x = \"image\" })", s.name)
        if s.counts and not s.for_each:
            raise self._error("counts is for_each's: without for_each the stage has no items to count", s.name)
        op, params = None, {}
        if s.op:
            op = GRAPH_OPS.get(s.op)
            if op is None:
                raise self._error(f"no op {s.op!r}; the ops are {', '.join(GRAPH_OPS)}", s.name)
            if s.version:
                raise self._error("version is a model stage's; an op has none", s.name)
            unknown = sorted(set(s.params) - set(op.params))
            if unknown:
                raise self._error(f"op {op.name} has no params {', '.join(unknown)}; it takes "
                                  f"{', '.join(op.params) or 'none'}", s.name)
            for k, spec in op.params.items():
                value = s.params.get(k, spec.default)
                problem = spec.check(k, value)
                if problem:
                    raise self._error(problem, s.name)
                params[k] = value
            missing = [i for i in op.required if i not in s.inputs]
            extra = sorted(set(s.inputs) - set(op.required) - set(op.optional))
            if missing or extra:
                takes = ", ".join(op.required) + (f" (and optionally {', '.join(op.optional)})" if op.optional else "")
                what = f"misses input(s) {', '.join(missing)}" if missing else f"has no input(s) {', '.join(extra)}"
                raise self._error(f"op {op.name} {what}; it takes {takes}", s.name)
        elif s.params:
            raise self._error("params are an op's; a model stage has none", s.name)
        return Stage(s.name, s, op, params, deps=[])

    def _ref(self, ref: str, where: str) -> tuple[str | None, str]:
        """(stage, output) for a stage's output, (None, name) for a graph input; ValueError
        saying what ``ref`` names that does not exist."""
        if ref in self.inputs:
            return None, ref
        stage, dot, output = ref.partition(".")
        if not dot or not output:
            raise ValueError(f"{where}: {ref!r} is neither a graph input ({', '.join(self.inputs)}) nor a stage's "
                             "output (STAGE.OUTPUT)")
        st = self.stages.get(stage)
        if st is None:
            raise ValueError(f"{where}: {ref!r} names no stage {stage!r}; the stages are {', '.join(self.stages)}")
        if st.op is not None and output not in st.op.outputs:
            raise ValueError(f"{where}: {ref!r}: op {st.op.name} (stage {stage}) gives "
                             f"{', '.join(st.op.outputs)}, not {output!r}")
        return stage, output

    def _references(self, st: Stage) -> None:
        s = st.settings
        where = f"graph {self.name}, stage {st.name}"
        refs = [(f"inputs.{k}", v) for k, v in s.inputs.items()]
        refs += [("for_each", s.for_each)] if s.for_each else []
        refs += [("counts", s.counts)] if s.counts else []
        for key, ref in refs:
            stage, _ = self._ref(ref, f"{where}: {key}")
            if stage is not None and stage not in st.deps:
                st.deps.append(stage)

    def _order(self) -> list[Stage]:
        """The stages in an order where each comes after those it takes from (declaration
        order among the free ones); ValueError naming a cycle."""
        done: set[str] = set()
        order: list[Stage] = []
        while len(order) < len(self.stages):
            ready = [st for st in self.stages.values() if st.name not in done and all(d in done for d in st.deps)]
            if not ready:
                raise self._error(f"stages {' -> '.join(self._cycle(done))} form a cycle: a stage can only take what "
                                  "stages before it give")
            for st in ready:
                done.add(st.name)
                order.append(st)
        return order

    def _cycle(self, done: set[str]) -> list[str]:
        """A cycle among the stages not in ``done`` (each has a dependency not done), in the
        direction tensors flow."""
        start = next(n for n in self.stages if n not in done)
        path = [start]
        while True:
            nxt = next(d for d in self.stages[path[-1]].deps if d not in done)
            if nxt in path:
                return list(reversed(path[path.index(nxt):] + [nxt]))
            path.append(nxt)

    def _waves(self) -> list[list[Stage]]:
        depth: dict[str, int] = {}
        for st in self.order:
            depth[st.name] = 1 + max((depth[d] for d in st.deps), default=-1)
        waves: list[list[Stage]] = [[] for _ in range(max(depth.values()) + 1)]
        for st in self.order:
            waves[depth[st.name]].append(st)
        return waves

    def level_of(self, ref: str) -> str | None:
        """The fan-out a tensor's items come from (None: one per row)."""
        stage = ref.partition(".")[0] if ref not in self.inputs else ""
        return self.stages[stage].level if stage else None

    def _fan(self, st: Stage) -> None:
        """Which fan-out the stage runs in, if any; ValueError where fan-outs meet."""
        s = st.settings
        levels = {self.level_of(ref) for ref in s.inputs.values()} - {None}
        if s.for_each:
            own = self.level_of(s.for_each)
            if own is None:
                st.fans_out, st.level = True, st.name
                if levels:
                    raise self._error(f"fans out over {s.for_each} but also takes items of stage "
                                      f"{sorted(levels)[0]}'s fan-out: one fan-out at a time", st.name)
                if s.counts:
                    if self.level_of(s.counts) is not None:
                        raise self._error(f"counts {s.counts} is per item; it must be per row (int [N])", st.name)
                    st.counts = s.counts
                else:  # the sibling, as a padded op gives it (db_boxes.boxes -> db_boxes.counts)
                    producer, _, output = s.for_each.partition(".")
                    head, dot, _ = output.rpartition(".")
                    sibling = f"{producer}.{head}.counts" if dot else ""
                    if sibling and self.stages[producer].op is None:
                        st.counts, st.counts_maybe = sibling, True
                    elif sibling and f"{head}.counts" in self.stages[producer].op.outputs:  # type: ignore[union-attr]
                        st.counts = sibling
            else:
                if s.counts:
                    raise self._error(f"for_each {s.for_each} is items already (one per item); counts is for a "
                                      "padded per-row tensor: a fan-out within a fan-out is not supported", st.name)
                levels.add(own)
        if len(levels) > 1:
            raise self._error(f"takes items of two fan-outs ({', '.join(sorted(levels))}); a stage's items must "
                              "all come from one", st.name)
        if not st.fans_out:
            st.level = levels.pop() if levels else None
        if st.op is not None:
            for name in st.op.required + st.op.optional:
                ref = s.inputs.get(name)
                if ref is None:
                    continue
                per_item = (st.fans_out and ref == s.for_each) or self.level_of(ref) is not None
                if name in st.op.items and not per_item:
                    raise self._error(f"op {st.op.name} takes {name!r} per item: fan out with for_each "
                                      f"(for_each = {ref!r}) or give it items", st.name)
                if name not in st.op.items and per_item:
                    raise self._error(f"op {st.op.name} takes {name!r} per row, not per item ({ref})", st.name)

    def _uses(self) -> None:
        """Each stage's outputs the graph uses; ValueError for a stage nothing uses."""
        refs = list(self.settings.outputs.values())
        for st in self.stages.values():
            s = st.settings
            refs += list(s.inputs.values()) + [r for r in (s.for_each, s.counts) if r and not st.counts_maybe]
        for ref in refs:
            if ref not in self.inputs:
                stage, _, output = ref.partition(".")
                if output not in self.stages[stage].wanted:
                    self.stages[stage].wanted.append(output)
        for st in self.stages.values():
            if st.counts_maybe:
                producer, _, output = st.counts.partition(".")
                if output not in self.stages[producer].wanted:
                    self.stages[producer].maybe.append(output)
        unused = [st.name for st in self.order if not st.wanted]
        if unused:
            raise self._error(f"stage(s) {', '.join(unused)}: nothing takes their outputs (no stage, no graph "
                              "output); remove them or use them")


def check_graph(name: str, g: GraphSettings) -> Layout:
    """The graph's layout, or ValueError naming the graph and the stage that is wrong."""
    if not name or any(ch.isspace() for ch in name):
        raise ValueError(f"graph {name!r}: a graph's name is what Infer.model names; no spaces")
    return Layout(name, g)


# -- running a graph -------------------------------------------------------------------------------


class FanOut:
    """The items of one fan-out: how many each row has, and whose each item is."""

    __slots__ = ("counts", "offsets", "owner", "rows", "items")

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = counts.astype(np.int64)
        self.rows = len(counts)
        self.offsets = np.zeros(self.rows + 1, np.int64)
        np.cumsum(self.counts, out=self.offsets[1:])
        self.items = int(self.offsets[-1])
        self.owner = np.repeat(np.arange(self.rows), self.counts)

    def unpad(self, x: np.ndarray) -> np.ndarray:
        """``[N, K, ...]`` -> the items ``[sum(counts), ...]``, row by row."""
        if self.rows == 1:
            return x[0, :self.items]
        return x[np.arange(x.shape[1]) < self.counts[:, None]]

    def spread(self, x: np.ndarray) -> np.ndarray:
        """A per-row tensor as one row per item (each item's owner's)."""
        if x.shape[0] != self.rows:
            raise ValueError(f"has {x.shape[0]} row(s) on axis 0, but the items come from {self.rows}")
        return np.take(x, self.owner, axis=0)

    def pad(self, y: np.ndarray) -> np.ndarray:
        """Items ``[M, ...]`` back per row: ``[N, most items, ...]``, zeros after each row's."""
        if self.rows == 1:
            return y[None]
        most = int(self.counts.max()) if self.rows else 0
        out = np.zeros((self.rows, most, *y.shape[1:]), y.dtype)
        out[np.arange(most) < self.counts[:, None]] = y
        return out


class _Run:
    """One request's way through a graph."""

    __slots__ = ("priority", "key", "deadline", "env", "fans", "items", "plans", "times", "results", "versions",
                 "op_ms")

    def __init__(self, priority: int, key: str, deadline: float) -> None:
        self.priority, self.key, self.deadline = priority, key, deadline
        #: graph tensors by reference (a fan-out stage's outputs: its items)
        self.env: dict[str, np.ndarray] = {}
        self.fans: dict[str, FanOut] = {}
        #: per fan-out stage: its for_each's items
        self.items: dict[str, np.ndarray] = {}
        self.plans: dict[str, tuple[str, "Plan"]] = {}
        self.times: list[StageTime] = []
        #: the model stages' results, and "stage=version" of each
        self.results: list[InferResult] = []
        self.versions: list[str] = []
        self.op_ms = 0.0


def _named(exc: Exception, graph: str, stage: str) -> RemoteError:
    if isinstance(exc, RemoteError):
        return type(exc)(f"graph {graph}, stage {stage}: {exc.message}", capability=exc.capability)
    return BadMessage(f"graph {graph}, stage {stage}: {exc}")


def _empty(plan: "Plan", output: str) -> np.ndarray:
    """An output of no rows, as the contract shapes it (symbolic sizes 0), rows first."""
    spec = next(s for s in plan.outputs if s.name == output)
    axis = spec.batch()
    dims = [d if isinstance(d, int) else 0 for i, d in enumerate(spec.shape) if i != axis]
    return np.zeros([0, *dims], spec.dtype)


class Graph:
    """One graph of the settings, run for requests by its scheduler."""

    def __init__(self, layout: Layout, scheduler: "Scheduler", m_stage: Any, m_total: Any, warm: set[str]) -> None:
        self.name = layout.name
        self.layout = layout
        self.scheduler = scheduler
        self.m_stage, self.m_total = m_stage, m_total
        #: (stage, version) checked against that version's contract -> the outputs to ask for
        self._checked: dict[tuple[str, str], list[str]] = {}
        #: ops whose kernels are loaded (Graphs.warm, or a first run): small work stays on the loop
        self._warm = warm

    async def infer(self, arrays: Sequence[np.ndarray], descs: Sequence[Tensor], version: str, variant: str,
                    priority: int, key: str, deadline: float, outputs: Sequence[str]) -> tuple[InferResult, list]:
        started = time.monotonic()
        g = self.layout.settings
        if version or variant:
            raise BadMessage(f"graph {self.name} has no {'version' if version else 'variant'}: its model stages "
                             "run the active version (or the split's pick; a stage's version pins one)")
        unknown = [o for o in outputs if o not in g.outputs]
        if unknown:
            raise BadMessage(f"graph {self.name} gives no output {', '.join(map(repr, unknown))}; its outputs are "
                             f"{', '.join(map(repr, g.outputs))}")
        run = _Run(priority, key, deadline)
        for st in self.layout.order:  # every model there and fitting, before any stage runs
            if st.op is None:
                try:
                    self._check(st, *await self._contract(st, run))
                except RemoteError as exc:
                    raise _named(exc, self.name, st.name) from None
        run.env.update(await self._bind(arrays, descs, run))
        for wave in self.layout.waves:
            if len(wave) == 1:
                await self._stage(wave[0], run)
                continue
            errors: list[RemoteError] = []
            async with anyio.create_task_group() as tg:
                for st in wave:
                    tg.start_soon(self._stage_or_stop, st, run, errors, tg.cancel_scope)
            if errors:
                raise errors[0]
        given = {}
        for out, ref in g.outputs.items():
            if outputs and out not in outputs:
                continue
            level = self.layout.level_of(ref)
            given[out] = run.env[ref] if level is None else run.fans[level].pad(run.env[ref])
        descs_out, frames = pack_tensors(given, zero_copy=True)
        total = time.monotonic() - started
        self.m_total.observe(total, self.name)
        rs = run.results
        rows = next(iter(run.env.values())).shape[0] if run.env else 1
        result = InferResult(
            model=self.name, version=" ".join(run.versions), variant="", outputs=descs_out,
            level=max((r.level for r in rs), default=0), driver=",".join(sorted({r.driver for r in rs if r.driver})),
            batch=rows, queue_ms=sum(r.queue_ms for r in rs), compute_ms=sum(r.compute_ms for r in rs) + run.op_ms,
            total_ms=total * 1e3, stages=run.times)
        return result, frames

    async def _bind(self, arrays: Sequence[np.ndarray], descs: Sequence[Tensor], run: _Run) -> dict[str, np.ndarray]:
        """The request's tensors as the graph's inputs (named, or unnamed in its order)."""
        names = self.layout.inputs
        takes = ", ".join(map(repr, names))
        if not arrays:
            raise BadMessage(f"graph {self.name}: no input tensor; it takes {takes}")
        if descs and descs[0].name:
            given = {}
            for d, a in zip(descs, arrays):
                if not d.name:
                    raise BadMessage(f"graph {self.name}: name every input tensor or none (unnamed ones are taken "
                                     f"in the order {takes})")
                given[d.name] = a
            unknown = [n for n in given if n not in names]
            missing = [n for n in names if n not in given]
            if unknown or missing:
                raise BadMessage(f"graph {self.name}: " + "; ".join(
                    ([f"unknown input(s) {', '.join(map(repr, unknown))}"] if unknown else []) +
                    ([f"missing input(s) {', '.join(map(repr, missing))}"] if missing else [])) + f"; it takes {takes}")
        else:
            if len(arrays) != len(names):
                raise BadMessage(f"graph {self.name} takes {len(names)} input(s) ({takes}), got {len(arrays)}")
            given = dict(zip(names, arrays))
        for name, a in given.items():
            rank = await self._rank(name, run)
            if rank is not None and a.ndim == rank - 1:
                given[name] = a[None]  # one row
            elif a.ndim == 0:
                raise BadMessage(f"graph {self.name}: input {name!r} is a scalar; a graph input has rows on axis 0")
        return given

    async def _rank(self, name: str, run: _Run) -> int | None:
        """The rank the first stage taking graph input ``name`` expects, its batch axis included."""
        for st in self.layout.order:
            for key, ref in st.settings.inputs.items():
                if ref != name or (st.fans_out and ref == st.settings.for_each):
                    continue
                if st.op is not None:
                    rank = st.op.ranks.get(key)
                else:
                    _, plan = await self._contract(st, run)  # (checked: in run.plans)
                    spec = next((s for s in plan.inputs if s.name == key), None)
                    rank = len(spec.shape) if spec is not None and spec.batch() is not None else None
                if rank is not None:
                    return rank
        return None

    async def _contract(self, st: Stage, run: _Run) -> tuple[str, "Plan"]:
        """The version of the stage's model serving this request (as ``Scheduler.infer``
        picks it for the request's key, or the stage's pinned one) and its contract."""
        found = run.plans.get(st.name)
        if found is None:
            sched, model, version = self.scheduler, st.settings.model, st.settings.version
            if not version and model not in sched.models:
                await sched._refresh_models()  # installed a moment ago: its event may be on its way
            version, _ = sched._resolve(model, run.key, version)
            plan = sched._plan(model, version, await sched._manifest(model, version))
            found = run.plans[st.name] = (version, plan)
        return found

    async def _stage_or_stop(self, st: Stage, run: _Run, errors: list[RemoteError], scope: Any) -> None:
        try:
            await self._stage(st, run)
        except RemoteError as exc:
            errors.append(exc)
            scope.cancel()

    async def _stage(self, st: Stage, run: _Run) -> None:
        t0 = time.monotonic()
        try:
            fan = self._fan_out(st, run) if st.fans_out else run.fans.get(st.level) if st.level else None
            if st.op is not None:
                outputs = await self._op(st, run, fan)
                what = st.op.name
            else:
                outputs = await self._model(st, run, fan)
                what = st.settings.model
        except Exception as exc:  # whatever broke, the answer names the stage
            if not isinstance(exc, (RemoteError, ValueError)) and not _ops_error(exc):
                self.scheduler.log.exception("graph_stage_failed", graph=self.name, stage=st.name)
                raise InternalError(f"graph {self.name}, stage {st.name}: {type(exc).__name__}: {exc}") from None
            raise _named(exc, self.name, st.name) from None
        for out, arr in outputs.items():
            run.env[f"{st.name}.{out}"] = arr
        seconds = time.monotonic() - t0
        self.m_stage.observe(seconds, self.name, st.name)
        if st.op is not None:
            run.op_ms += seconds * 1e3
        run.times.append(StageTime(stage=st.name, model=what, items=fan.items if fan is not None else
                                   _rows(outputs), ms=seconds * 1e3))

    def _fan_out(self, st: Stage, run: _Run) -> FanOut:
        """The stage's for_each unpadded into items, and the fan-out they make."""
        s = st.settings
        x = run.env[s.for_each]
        if x.ndim < 2:
            raise ValueError(f"for_each {s.for_each} is {x.dtype} {list(x.shape)}: it needs rows of items [N, K, ...]")
        counts = run.env.get(st.counts) if st.counts else None
        if counts is None:
            counts = np.full(x.shape[0], x.shape[1], np.int64)
        elif counts.dtype.kind not in "iu" or counts.shape != (x.shape[0],):
            raise ValueError(f"counts {st.counts} is {counts.dtype} {list(counts.shape)}: it must be integers, one per "
                             f"row of {s.for_each} [{x.shape[0]}]")
        elif counts.size and (int(counts.min()) < 0 or int(counts.max()) > x.shape[1]):
            raise ValueError(f"counts {st.counts} holds {counts.tolist()[:8]}: each must be from 0 to {x.shape[1]} "
                             f"(the items {s.for_each} has per row)")
        fan = run.fans[st.name] = FanOut(counts)
        run.items[st.name] = fan.unpad(x)
        return fan

    def _input(self, st: Stage, ref: str, run: _Run, fan: FanOut | None, spread: bool) -> np.ndarray:
        """A stage input's tensor: the items for for_each, a per-row tensor spread over the
        items (``spread``: a model's; an op takes rows and owners), else as it is."""
        if st.fans_out and ref == st.settings.for_each:
            return run.items[st.name]
        x = run.env[ref]
        if spread and fan is not None and self.layout.level_of(ref) is None:
            try:
                return fan.spread(x)
            except ValueError as exc:
                raise ValueError(f"{ref} {exc}") from None
        return x

    async def _op(self, st: Stage, run: _Run, fan: FanOut | None) -> dict[str, np.ndarray]:
        op = st.op
        assert op is not None
        inputs = {name: self._input(st, ref, run, fan, spread=False) for name, ref in st.settings.inputs.items()}
        call = functools.partial(op.run, inputs, fan, st.params)
        if op.name in self._warm and op.work(inputs, fan, st.params) < THREAD_WORK:
            return call()
        outputs = await anyio.to_thread.run_sync(call)
        self._warm.add(op.name)
        return outputs

    async def _model(self, st: Stage, run: _Run, fan: FanOut | None) -> dict[str, np.ndarray]:
        s = st.settings
        version, plan = await self._contract(st, run)
        wanted = self._check(st, version, plan)
        if fan is not None and fan.items == 0:  # nothing to run on
            return {out: _empty(plan, out) for out in wanted}
        arrays, descs = [], []
        for name in plan.names:
            axis = plan.axes[name]
            x = self._input(st, s.inputs[name], run, fan, spread=axis is not None)
            if axis:
                x = np.moveaxis(x, 0, axis)
            arrays.append(x)
            descs.append(Tensor(dtype=x.dtype.name, shape=list(x.shape), name=name))
        result, frames = await self.scheduler.infer(s.model, arrays, version, run.priority, run.key, run.deadline,
                                                    descs, "", wanted)
        run.results.append(result)
        run.versions.append(f"{st.name}={result.version}")
        outputs = {}
        for t in result.outputs:
            y = unpack_tensor(t, frames)
            axis = plan.out_axes[t.name]
            outputs[t.name] = np.moveaxis(y, axis, 0) if axis else y
        return outputs

    def _check(self, st: Stage, version: str, plan: "Plan") -> list[str]:
        """The stage against its model version's contract (once per version): the outputs
        to ask it for; BadMessage for what does not fit."""
        wanted = self._checked.get((st.name, version))
        if wanted is not None:
            return wanted
        s, model = st.settings, f"{st.settings.model} {version}"
        missing = [n for n in plan.names if n not in s.inputs]
        if missing:
            raise BadMessage(f"{model} takes input(s) {', '.join(map(repr, missing))}: map each to a graph tensor "
                             f"(inputs = {{ {missing[0]} = \"...\" }})")
        extra = [n for n in s.inputs if n not in plan.axes]
        if extra:
            raise BadMessage(f"{model} has no input(s) {', '.join(map(repr, extra))}; it takes "
                             f"{', '.join(map(repr, plan.names))}")
        wanted = plan.wanted(st.wanted) + [o for o in st.maybe if o in plan.out_axes and o not in st.wanted]
        flat = [o for o in wanted if plan.out_axes[o] is None]
        if flat:
            raise BadMessage(f"{model}: output {flat[0]!r} has no batch axis; a graph's tensors have one row per "
                             "request row (or item)")
        if not any(plan.axes[n] is not None for n in plan.names):
            raise BadMessage(f"{model} has no input with a batch axis; a graph stage runs on rows")
        for name, ref in s.inputs.items():
            per_item = (st.fans_out and ref == s.for_each) or self.layout.level_of(ref) is not None
            if plan.axes[name] is None and per_item:
                raise BadMessage(f"{model}: input {name!r} has no batch axis (one value for a run), but {ref} is "
                                 "per item; feed it a per-row tensor")
        self._checked[(st.name, version)] = wanted
        return wanted


def _rows(outputs: Mapping[str, np.ndarray]) -> int:
    for y in outputs.values():
        return int(y.shape[0]) if y.ndim else 1
    return 0


def _ops_error(exc: Exception) -> bool:
    from drivers.ops import OpsError  # (declarations only: numba stays unimported)

    return isinstance(exc, OpsError)


class Graphs:
    """The scheduler's graphs (``graphs`` of its settings), by name."""

    def __init__(self, scheduler: "Scheduler", settings: Mapping[str, GraphSettings]) -> None:
        m = scheduler.metrics
        m_stage = m.histogram("edgebus_graph_stage_seconds", "Time of one stage of a graph (a pipeline) for one "
                                                              "request", ("graph", "stage"))
        m_total = m.histogram("edgebus_graph_seconds", "Time of one request through a graph, all its stages",
                              ("graph",))
        #: the ops whose kernels are loaded
        self.warmed: set[str] = set()
        self.graphs = {name: Graph(check_graph(name, g), scheduler, m_stage, m_total, self.warmed)
                       for name, g in settings.items()}

    async def warm(self) -> None:
        """Load the kernels of the ops the graphs use (numba: half a second or so from its
        cache, in a worker thread; the scheduler starts it when it is ready, and its sensor
        pipelines skip a graph's frames until it is done); nothing without graphs."""
        for name in sorted({st.op.name for g in self.graphs.values() for st in g.layout.order if st.op is not None}):
            await anyio.to_thread.run_sync(GRAPH_OPS[name].warm)
            self.warmed.add(name)

    def loading(self, name: str) -> bool:
        """Whether graph ``name`` has ops whose kernels ``warm`` has not loaded yet."""
        g = self.graphs.get(name)
        return g is not None and any(st.op is not None and st.op.name not in self.warmed for st in g.layout.order)

    def __contains__(self, name: str) -> bool:
        return name in self.graphs

    async def infer(self, model: str, arrays: Sequence[np.ndarray], version: str, priority: int, key: str,
                    deadline: float, descs: Sequence[Tensor] = (), variant: str = "",
                    outputs: Sequence[str] = ()) -> tuple[InferResult, list]:
        """``Scheduler.infer`` for a graph: its stages run, its outputs and stage times answered."""
        return await self.graphs[model].infer(arrays, descs, version, variant, priority, key, deadline, outputs)
