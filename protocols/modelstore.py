"""The model store's channel, and the model manifest: the contract of a model bundle.

The manifest is a wire type: the model store keeps it, the scheduler, the accelerator
drivers and telemetry read it (``InspectModel``, ``GetModel``), the offline tools write
it.  Like every message it tolerates fields it does not know (a newer device's manifest
still decodes on an older one) and is strict on the types of the fields it knows.  A
bundle's signature covers the exact bytes of its ``manifest.json``, so a manifest read
from a bundle is never re-encoded for verification.

``pick_version`` is the A/B rule, shared by the store (``Resolve``) and the scheduler: a
pure function of the model, the request key and the split's weights; ``pick_variant`` the
same rule across the variants of one version (``ModelState.variant``: which variant serves a
request that names none).

The contract of a model is its ``inputs`` and ``outputs`` (``TensorSpec``): each dimension
fixed (an int), named-symbolic (a str: the same name is the same size in every tensor of one
request) or dynamic (None), and each tensor's batch axis or none.  ``TensorSpec.check``,
``bind_dims`` and ``check_tensors`` are the pure checks the inference path applies to a
request's tensors.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import msgspec

from ._tensors import DTYPES

__all__ = ["Install", "Activate", "Rollback", "Remove", "Split", "ListModels", "InspectModel", "GetModel",
           "Resolve", "ReportHealth", "Request", "Installed", "ModelState", "ModelList", "ModelManifest",
           "ModelBytes", "Resolved", "HealthRecorded", "Reply", "ModelEvent",
           "Manifest", "TensorSpec", "OpSpec", "Variant", "Asset", "Fallback", "FeatureStats", "Provenance",
           "GetAsset", "AssetBytes", "ManifestError", "ContractError", "Dim", "DIM_NAME", "ASSET_NAME", "show_shape", "bind_dims",
           "check_tensors", "parse_version", "pick", "pick_version", "pick_variant"]


# -- the manifest ------------------------------------------------------------------------------

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
#: a symbolic dimension's name, e.g. "batch", "N", "seq_len", "s0"
DIM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
#: an asset's name, e.g. "labels", "vocab.txt", "character"
ASSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ManifestError(ValueError):
    """A manifest that decodes but breaks a rule (name, version, variants, contract, assets)."""


class ContractError(ValueError):
    """Tensors that do not fit a model's contract (``bind_dims``); the message names the
    tensors, what they take and what they got."""


def parse_version(version: str) -> tuple[int, int, int, tuple[Any, ...]]:
    """Semantic version as a sortable key (a pre-release sorts before its release).

    Raises ManifestError for a version that is not MAJOR.MINOR.PATCH[-pre][+build]."""
    m = _SEMVER.match(version)
    if not m:
        raise ManifestError(f"version {version!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    pre = m.group(4)
    pre_key: tuple[Any, ...] = (1,) if pre is None else (0, *((0, int(p)) if p.isdigit() else (1, p)
                                                            for p in pre.split(".")))
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), pre_key


#: One dimension of a tensor's shape: a fixed size (int), a named symbolic size (str: the
#: same name is the same size in every tensor of one request), or dynamic (None).
Dim = int | str | None


def show_shape(shape: Sequence[Dim]) -> str:
    """``[?, 3, H, 640]``: fixed sizes as numbers, symbolic ones by name, dynamic ones as ``?``."""
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class TensorSpec(msgspec.Struct, omit_defaults=True):
    """A named input or output of the model graph: its contract.

    ``batch_axis`` is the axis along which requests are batched, or None for a tensor that
    has none (a scalar, a parameter, a recurrent state whose batch is elsewhere).  Manifests
    written before it existed do not carry it (UNSET): ``batch()`` then takes axis 0 when
    it is not a fixed size, as those manifests meant."""

    name: str
    #: numpy's name of the element type: "float32", "int64", "uint8"... (one of protocols.DTYPES)
    dtype: str
    #: one entry per axis: a fixed size (int), a symbolic one (str) or a dynamic one (None)
    shape: list[int | str | None]
    #: the batch axis, or None for none; UNSET (absent) in manifests older than the field
    batch_axis: int | None | msgspec.UnsetType = msgspec.UNSET

    def batch(self) -> int | None:
        """The batch axis, resolving an absent ``batch_axis``: axis 0 when the tensor has
        rank >= 1 and its axis 0 is not a fixed size, else none."""
        axis = self.batch_axis
        if axis is msgspec.UNSET:
            shape = self.shape
            return 0 if shape and shape[0].__class__ is not int else None
        return axis  # type: ignore[return-value]

    def describe(self) -> str:
        """``float32 [?, 3, H, W] (batch axis 0)``"""
        axis = self.batch()
        return f"{self.dtype} {show_shape(self.shape)} " + ("(no batch axis)" if axis is None else f"(batch axis {axis})")

    def check(self, dtype: str, shape: tuple[int, ...] | Sequence[int], kind: str = "input") -> str | None:
        """None when a tensor of ``dtype`` and ``shape`` fits this spec (its dtype, its rank,
        every fixed size; symbolic sizes are ``bind_dims``'s), else a message naming the
        tensor, what it takes and what it got."""
        want = self.shape
        if dtype == self.dtype and len(shape) == len(want):
            for d, n in zip(want, shape):
                if d.__class__ is int and d != n:
                    break
            else:
                return None
        if dtype != self.dtype:
            why = f"dtype {dtype}, not {self.dtype}"
        elif len(shape) != len(want):
            why = f"{len(shape)} axes, not {len(want)}"
        else:
            axis = next(i for i, (d, n) in enumerate(zip(want, shape)) if d.__class__ is int and d != n)
            why = f"axis {axis} is {shape[axis]}, not {want[axis]}"
        return (f"{kind} {self.name!r} takes {self.dtype} {show_shape(want)}, got {dtype} "
                f"{show_shape(list(shape))} ({why})")

    def problems(self, kind: str = "input") -> list[str]:
        """What makes this spec invalid (Manifest.check): an unknown dtype, a negative size,
        a bad symbolic name, a batch axis out of range."""
        out = []
        what = f"{kind} {self.name!r}"
        if self.dtype not in DTYPES:
            out.append(f"{what} has dtype {self.dtype!r}, which is not one of {', '.join(DTYPES)}")
        for i, d in enumerate(self.shape):
            if d.__class__ is int and d < 0:  # type: ignore[operator]
                out.append(f"{what} has size {d} on axis {i}: a size is >= 0; write null for a dynamic axis")
            elif isinstance(d, str) and not DIM_NAME.match(d):
                out.append(f"{what} has symbolic dimension {d!r} on axis {i}: a name is 1-64 of A-Z, a-z, 0-9, "
                           "'_', '.' and '-', starting with a letter or '_'; write null for a dynamic axis")
        axis = self.batch_axis
        if axis is not msgspec.UNSET and axis is not None and not 0 <= axis < len(self.shape):  # type: ignore[operator]
            out.append(f"{what} has batch_axis {axis}, outside its {len(self.shape)} axes "
                       f"{show_shape(self.shape)}; null for no batch axis")
        return out


def bind_dims(specs: Sequence[TensorSpec], shapes: Sequence[Sequence[int]], kind: str = "input") -> dict[str, int]:
    """The size of each symbolic dimension of ``specs`` (by name) in tensors of ``shapes``
    (in the same order, each already of its spec's rank: ``TensorSpec.check``).

    Raises ContractError when one name has two sizes, naming both tensors and axes."""
    bound: dict[str, int] = {}
    where: dict[str, tuple[str, int]] = {}
    for spec, shape in zip(specs, shapes):
        for axis, (d, n) in enumerate(zip(spec.shape, shape)):
            if d.__class__ is str:
                size = bound.setdefault(d, n)  # type: ignore[arg-type]
                if size != n:
                    first, first_axis = where[d]  # type: ignore[index]
                    raise ContractError(f"{kind}s {first!r} and {spec.name!r} disagree on dimension {d!r}: "
                                        f"{size} on axis {first_axis} of {first!r}, {n} on axis {axis} of "
                                        f"{spec.name!r}")
                where.setdefault(d, (spec.name, axis))  # type: ignore[arg-type]
    return bound


def check_tensors(specs: Sequence[TensorSpec], given: Mapping[str, tuple[str, Sequence[int]]],
                  kind: str = "input") -> str | None:
    """None when the tensors ``given`` (name -> (dtype, shape)) are exactly ``specs``, each
    fitting its spec, symbolic dimensions agreeing and the tensors with a batch axis
    agreeing on its size; else a message naming the first problem (missing, extra,
    mistyped or misshaped tensor, disagreeing sizes)."""
    names = [s.name for s in specs]
    missing = [n for n in names if n not in given]
    extra = [n for n in given if n not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {kind}(s) {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unknown {kind}(s) {', '.join(map(repr, extra))}")
        takes = "; ".join(f"{s.name!r} {s.describe()}" for s in specs) or "none"
        return f"{' and '.join(parts)}: the model takes {takes}"
    shapes = []
    for spec in specs:
        dtype, shape = given[spec.name]
        problem = spec.check(dtype, shape, kind)
        if problem:
            return problem
        shapes.append(shape)
    try:
        bind_dims(specs, shapes, kind)
    except ContractError as exc:
        return str(exc)
    batch: tuple[str, int, int] | None = None
    for spec, shape in zip(specs, shapes):
        axis = spec.batch()
        if axis is None:
            continue
        if batch is None:
            batch = (spec.name, axis, shape[axis])
        elif shape[axis] != batch[2]:
            return (f"{kind}s disagree on the batch size: {batch[0]!r} has {batch[2]} on axis {batch[1]}, "
                    f"{spec.name!r} has {shape[axis]} on axis {axis}")
    return None


class OpSpec(msgspec.Struct, omit_defaults=True):
    """A pre- or post-processing op (a numba kernel in drivers/, by name) and its parameters.

    The parameters are JSON values; each op's registry entry checks them when the chain is
    built (at install and load), so they stay untyped here.

    Ops form chains (PROTOCOL.md 11.2, "Pre and post chains"): an op with ``input`` starts
    one; the ops after it without ``input`` continue it.  A pre chain feeds the model input
    ``input`` names (default: the first); a post chain reads the tensor ``input`` names (a
    model output or an earlier post chain's output; default: the model's first output) and
    adds its result under ``output`` (on its last op; default: the op's short name)."""

    op: str
    params: dict[str, Any] = {}
    #: starts a chain: the model input it feeds (pre), the tensor it reads (post)
    input: str = ""
    #: post, on a chain's last op: the name of what the chain adds (``<output>.<part>`` per part)
    output: str = ""


class Variant(msgspec.Struct, omit_defaults=True):
    """One model file of the bundle; the signature covers it through ``sha256`` and ``size``."""

    file: str
    sha256: str
    size: int
    #: e.g. "int8 dynamic quantisation of full"
    description: str = ""


class StateSpec(msgspec.Struct, omit_defaults=True):
    """A recurrent state: the model reads it from ``input`` and gives the next one as
    ``output`` (silero-vad: ``state`` -> ``stateN``).  A stream starts from ``initial`` in
    every element (shape: the input's, one along its batch axis, which it must have)."""

    input: str
    output: str
    initial: float = 0.0


class Asset(msgspec.Struct, omit_defaults=True):
    """A file of the bundle that is not a model: labels, a vocabulary, a tokenizer, thresholds.
    The signature covers it through ``sha256`` and ``size``, as a variant's file."""

    file: str
    sha256: str
    size: int
    #: e.g. "text/plain", "application/json"; "" when unknown
    media_type: str = ""


class Fallback(msgspec.Struct, omit_defaults=True):
    """The rule-based path used when no model can run: a threshold on one input feature
    (named as in ``reference``, whose keys are the features in column order)."""

    feature: str
    threshold: float
    #: output when feature > threshold, and otherwise
    above: float = 1
    below: float = 0


class FeatureStats(msgspec.Struct, omit_defaults=True):
    """Reference statistics of one input or output feature, for drift detection."""

    mean: float
    std: float
    #: Histogram bin edges and reference proportions (for PSI).
    bins: list[float] = []
    proportions: list[float] = []
    #: how many samples the statistics come from (the KS test treats it as a two-sample test)
    count: int = 0


class Provenance(msgspec.Struct, omit_defaults=True):
    training_data_sha256: str = ""
    source_revision: str = ""
    tools: dict[str, str] = {}


class Manifest(msgspec.Struct, omit_defaults=True):
    """A model bundle's ``manifest.json``.  The field order is the encoding's: changing it
    changes the bytes new bundles sign (old bundles keep theirs)."""

    name: str
    version: str
    created: float
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    #: by variant name: "full" always; "small", "int8"... for the degradation ladder
    variants: dict[str, Variant]
    author: str = ""
    description: str = ""
    pre: list[OpSpec] = []
    post: list[OpSpec] = []
    fallback: Fallback | None = None
    #: by feature name, in the column order of the model's input features
    reference: dict[str, FeatureStats] = {}
    provenance: Provenance = msgspec.field(default_factory=Provenance)
    #: the model graph's ``metadata_props`` (e.g. a text recogniser's dictionary), as packed
    metadata: dict[str, str] = {}
    #: by asset name: the bundle's files that are not models (labels, vocabularies...)
    assets: dict[str, Asset] = {}
    #: a recurrent model's state pairs: what the scheduler keeps between a stream's chunks
    states: list[StateSpec] = []

    def check(self) -> None:
        """The rules beyond types; raises ManifestError naming what to fix."""
        if not _NAME.match(self.name):
            raise ManifestError(f"model name {self.name!r} must be 1-63 of a-z, 0-9, '_' and '-'")
        parse_version(self.version)
        if "full" not in self.variants:
            raise ManifestError("a bundle needs a 'full' variant")
        if self.fallback is not None and self.reference and self.fallback.feature not in self.reference:
            raise ManifestError(f"the fallback's feature {self.fallback.feature!r} is not one of the reference's "
                                f"features {list(self.reference)}")
        problems: list[str] = []
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            seen: set[str] = set()
            for spec in specs:
                if spec.name in seen:
                    problems.append(f"two {kind}s are named {spec.name!r}")
                seen.add(spec.name)
                problems += spec.problems(kind)
        for name in self.assets:
            if not ASSET_NAME.match(name):
                problems.append(f"asset name {name!r} must be 1-63 of A-Z, a-z, 0-9, '_', '.' and '-', "
                                "starting with a letter or digit")
        inputs, outputs = {t.name: t for t in self.inputs}, {t.name: t for t in self.outputs}
        for i, st in enumerate(self.states):
            tin, tout = inputs.get(st.input), outputs.get(st.output)
            if tin is None or tout is None:
                problems.append(f"states[{i}] pairs input {st.input!r} with output {st.output!r}, but the model has "
                                f"no {'input' if tin is None else 'output'} "
                                f"{st.input if tin is None else st.output!r}")
            elif tin.dtype != tout.dtype or len(tin.shape) != len(tout.shape):
                problems.append(f"states[{i}]: input {st.input!r} is {tin.describe()} but output {st.output!r} is "
                                f"{tout.describe()}; a state's next value must have its type and rank")
            elif tin.batch() is None or tin.batch() != tout.batch():
                problems.append(f"states[{i}]: input {st.input!r} and output {st.output!r} need the same batch axis "
                                f"(they have {tin.batch()} and {tout.batch()}); set batch_axis in the pack spec")
        if problems:
            raise ManifestError("; ".join(problems))


def pick(name: str, key: str, weights: Mapping[str, float], order: Callable[[str], Any] = str) -> str:
    """Sticky weighted choice among the names of ``weights`` (PROTOCOL.md 11.6): a point from
    sha256(``name`` NUL ``key``) on [0, total), walked through the names in ``order``.  The
    same key always lands on the same name; weights need not sum to 100 and a weight <= 0 is
    never picked."""
    total = sum(w for w in weights.values() if w > 0)
    point = int.from_bytes(hashlib.sha256(f"{name}\0{key}".encode()).digest()[:8], "big") / 2**64 * total
    for choice in sorted(weights, key=order):
        w = weights[choice]
        if w <= 0:
            continue
        if point < w:
            return choice
        point -= w
    return max(weights, key=order)


def pick_version(name: str, key: str, weights: Mapping[str, float]) -> str:
    """Sticky weighted choice among a split's versions, walked in version order (11.3)."""
    return pick(name, key, weights, parse_version)


def pick_variant(name: str, version: str, key: str, weights: Mapping[str, float]) -> str:
    """Sticky weighted choice among the variants of one version (a variant split), walked in
    the order of their names; hashed as the model ``<name>@<version>``, so a key's variant
    does not follow from its version under a version split too."""
    return pick(f"{name}@{version}", key, weights)


# -- requests ----------------------------------------------------------------------------------


class Install(msgspec.Struct, tag=True):
    """Install a bundle; its bytes are raw frame 0."""


class Activate(msgspec.Struct, tag=True, omit_defaults=True):
    """Make ``version`` the active one (in trial against the one it replaces); with
    ``variant``, start a trial of that variant of the active version (``version`` is the
    active one, or empty) against the variant serving it (its default variant)."""

    name: str
    version: str
    variant: str = ""


class Rollback(msgspec.Struct, tag=True):
    name: str


class Remove(msgspec.Struct, tag=True):
    name: str
    version: str


class Split(msgspec.Struct, tag=True, omit_defaults=True):
    """A/B or canary weights: {"1.2.0": 90, "1.3.0": 10}; empty: back to the active version.
    With ``variants``, the weights are by variant of the active version ({"full": 90,
    "int8": 10}; empty: back to its default variant), and the version split is unchanged."""

    name: str
    weights: dict[str, float]
    variants: bool = False


class ListModels(msgspec.Struct, tag=True):
    pass


class InspectModel(msgspec.Struct, tag=True, omit_defaults=True):
    name: str
    version: str = ""


class GetModel(msgspec.Struct, tag=True, omit_defaults=True):
    """The model bytes (decrypted in memory) as raw frame 0: for accelerator drivers."""

    name: str
    version: str = ""
    variant: str = "full"


class GetAsset(msgspec.Struct, tag=True, omit_defaults=True):
    """An asset's bytes (decrypted in memory) as raw frame 0: labels, a vocabulary..."""

    name: str
    asset: str
    version: str = ""


class Resolve(msgspec.Struct, tag=True, omit_defaults=True):
    """Which version serves this request key (sticky under a split)."""

    name: str
    key: str = ""


class ReportHealth(msgspec.Struct, tag=True, omit_defaults=True):
    """Serving health of one version (of one of its variants, with ``variant``) since the last
    report (from scheduler or telemetry).

    ``latency_hist`` lets the store combine reports soundly (a p95 of p95s is not a p95): the
    requests' latencies by bucket, bucket ``k`` counting those of more than 2**((k-1)/8) ms
    and at most 2**(k/8) ms (``bucket``, ``histogram``: 8 buckets a doubling, each 9% wide).
    A reporter that sends it may leave ``p95_ms`` out."""

    name: str
    version: str
    requests: int
    errors: int = 0
    p95_ms: float = 0.0
    #: bucket -> requests (``histogram(latencies_ms)``); empty from older reporters
    latency_hist: dict[int, int] = {}
    #: the variant that served them ("full", "int8", "fallback"...); empty: the version as a whole
    variant: str = ""

    #: buckets a doubling of latency
    BUCKETS_PER_DOUBLING: ClassVar[int] = 8

    @staticmethod
    def bucket(ms: float) -> int:
        """The histogram bucket of a latency in ms: ceil(8 * log2(ms)), ms taken as at least 0.001."""
        return math.ceil(8 * math.log2(max(ms, 0.001)))

    @staticmethod
    def bucket_ms(k: int) -> float:
        """The upper bound of bucket ``k`` in ms: 2**(k/8)."""
        return 2.0 ** (k / 8)

    @staticmethod
    def histogram(latencies_ms: Iterable[float]) -> dict[int, int]:
        """``latency_hist`` of these latencies (ms)."""
        hist: dict[int, int] = {}
        for ms in latencies_ms:
            k = math.ceil(8 * math.log2(max(ms, 0.001)))
            hist[k] = hist.get(k, 0) + 1
        return hist


Request = (Install | Activate | Rollback | Remove | Split | ListModels | InspectModel | GetModel | Resolve
           | ReportHealth | GetAsset)


class Installed(msgspec.Struct, tag=True):
    name: str
    version: str
    key_id: str
    variants: list[str]


class ModelState(msgspec.Struct, tag=True, omit_defaults=True):
    name: str
    versions: list[str]
    active: str = ""
    previous: str = ""
    #: the version in trial (it is also the active one) until its health gates commit it
    trial: str = ""
    split: dict[str, float] = {}
    #: the active version's variants side by side, by variant name: {"full": 90, "int8": 10}
    variant_split: dict[str, float] = {}
    #: the variant of the active version in trial against its default variant (it serves the
    #: requests that name none while there is no variant split) until its health gates commit it
    variant_trial: str = ""
    #: by version: the variant serving requests that name none, when it is not "full" (a
    #: committed variant trial)
    default_variants: dict[str, str] = {}

    def default_variant(self, version: str) -> str:
        """The variant serving ``version`` when no split or trial says otherwise."""
        return self.default_variants.get(version, "full")

    def variant(self, version: str, key: str) -> str:
        """The variant for a request of ``version`` with ``key`` that names none: for the active
        version the variant split's sticky pick, else the variant in trial, else its default
        variant; for another version its default variant.  (The degradation ladder may still
        run a smaller one.)"""
        if version == self.active:
            if self.variant_split:
                return pick_variant(self.name, version, key, self.variant_split)
            if self.variant_trial:
                return self.variant_trial
        return self.default_variants.get(version, "full")


class ModelList(msgspec.Struct, tag=True):
    models: list[ModelState]


class ModelManifest(msgspec.Struct, tag=True):
    manifest: Manifest
    key_id: str


class ModelBytes(msgspec.Struct, tag=True):
    name: str
    version: str
    variant: str
    sha256: str
    manifest: Manifest


class AssetBytes(msgspec.Struct, tag=True, omit_defaults=True):
    name: str
    version: str
    asset: str
    sha256: str
    size: int
    media_type: str = ""


class Resolved(msgspec.Struct, tag=True):
    name: str
    version: str
    #: the variant for this key (``ModelState.variant``)
    variant: str = "full"


class HealthRecorded(msgspec.Struct, tag=True, omit_defaults=True):
    name: str
    version: str
    #: "trial", "committed" or "rolled-back" when the report decided a trial
    verdict: str = ""
    #: the report's variant
    variant: str = ""


Reply = (Installed | ModelState | ModelList | ModelManifest | ModelBytes | Resolved | HealthRecorded | AssetBytes)


class ModelEvent(msgspec.Struct, tag=True, omit_defaults=True):
    """On modelstore.installed|activated|committed|rolledback|removed|split."""

    name: str
    version: str = ""
    previous: str = ""
    detail: str = ""
    #: an event about a variant of ``version``: the variant in trial (activated), committed, or
    #: serving again (rolledback)
    variant: str = ""
