"""The model store service.

Install checks a bundle (files against the signed manifest, the signature against the
security service's trust store, no downgrade, the manifest's inputs and outputs against
each graph, ONNX Runtime loads every variant) before a single byte is stored; the store is
unchanged by a refused bundle.  It reads the bundle in bounded stages (``Archive``), the
signature verified before any model file is inflated, and does its long work (inflating,
hashing, encrypting, the load check) in worker threads and a throwaway process, so the
event loop keeps answering requests and heartbeats.  Activation is an
atomic switch of ``state.json``; the new version runs in ``trial`` until the health
reports of the scheduler or telemetry commit it, or roll it back by themselves.  The
variants of the active version have the same: a variant split (A/B across variants) and a
variant trial, whose commit makes the variant the version's default.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

import anyio
import msgspec

from protocols.runtime import ENV_STATE_DIR
from services import (
    BadMessage, Context, InternalError, Rejected, RemoteError, Service, SettingsError, Unavailable,
    UnknownDestination,
)
from protocols.security import AuditAppend, Appended, Seal, Sealed, SignatureValid, Unseal, Unsealed, VerifySignature

from ._bundle import Archive, Bundle, check_graph
from ._check import check_ops
from ._exceptions import (
    BundleError,
    DowngradeRefused,
    ModelLoadError,
    ModelStoreError,
    NoSuchModel,
    UnknownSigner,
)
from protocols.modelstore import (
    Activate,
    AssetBytes,
    GetAsset,
    GetModel,
    HealthRecorded,
    InspectModel,
    Manifest,
    Install,
    Installed,
    ListModels,
    ModelBytes,
    ModelEvent,
    ModelList,
    ModelManifest,
    ModelState,
    Remove,
    ReportHealth,
    Reply,
    Request,
    Resolve,
    Resolved,
    Rollback,
    Split,
    parse_version,
    pick_version,
)
from services import atomic_write

from ._settings import ModelStoreSettings
from ._store import ModelRecord, Store, StoreState
from ._trial import Trial

__all__ = ["ModelStoreService"]


class ModelStoreService(Service):
    name = "modelstore"
    Settings = ModelStoreSettings
    Request = Request
    Reply = Reply
    publishes = ["modelstore.*"]

    async def setup(self) -> None:
        root = Path(os.environ.get(ENV_STATE_DIR, ".")) / "modelstore"
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root = root
        sealed = root / "datakey.sealed"
        if sealed.exists():
            key = (await self.bus.call("security", Unseal(blob=sealed.read_bytes(), context="modelstore"),
                                       Unsealed)).key
        else:
            key = os.urandom(32)
            blob = (await self.bus.call("security", Seal(key=key, context="modelstore"), Sealed)).blob
            atomic_write(sealed, blob)  # fsync'd: losing it would make every blob unreadable
        self.store = Store(root, key, self._fault)
        #: one install at a time (memory: one bundle's files), and the store's writes
        #: (blobs, manifests, the sweep of a remove) never interleave
        self._installing = anyio.Lock()
        #: sha256 of the model files ONNX Runtime loaded in a throwaway process (preload's checks)
        self._loadable: set[str] = set()
        self._writing = anyio.Lock()
        #: the trials under way, by model: their windows are in memory only (a restarted
        #: store starts the trial of the version in trial again, from now)
        self.trials: dict[str, Trial] = {}
        for name in self.store.names():
            rec = self.store.record(name)
            if rec.trial and rec.previous:
                self._start_trial(name, rec.trial, rec.previous)
            elif rec.variant_trial and rec.active:
                self._start_variant_trial(name, rec.active, rec.variant_trial)
        await self._preload()
        for name in self.store.names():
            self.log.info("model_loaded", name=name, versions=self.store.versions(name),
                          active=self.store.record(name).active or None)

    async def _preload(self) -> None:
        """Install and activate the preload bundles (settings ``preload_demo``: the demo
        bundles shipped in this package; ``preload``: a directory's) whose models the store lacks."""
        directories = [Path(__file__).with_name("demo")] if self.settings.preload_demo else []
        if self.settings.preload is not None:
            if not self.settings.preload.is_dir():
                raise SettingsError(self.bus.name, "settings.preload",
                                    f"{self.settings.preload} is not a directory of .ebm bundles")
            directories.append(self.settings.preload)
        todo = []
        for path in sorted(p for directory in directories for p in directory.glob("*.ebm")):
            data = path.read_bytes()
            with Archive(data) as archive:
                name = archive.manifest.name
            if not self.store.versions(name):
                todo.append(data)
        # the models' load checks all at once (a process each: boot waits for the store), then
        # the bundles installed one by one as any other
        async with anyio.create_task_group() as tg:
            for data in todo:
                tg.start_soon(self._precheck, data)
        for data in todo:
            installed = await self._install(data, "preload")
            await self._activate(installed.name, installed.version, "preload")

    async def _precheck(self, data: bytes) -> None:
        """A bundle to preload checked as its install does up to its models' load checks
        (signed by a trusted key, files as signed), each model that loads remembered by its
        sha256; anything wrong is left to its install to say."""
        try:
            with Archive(data) as archive:
                sig = archive.verify_embedded()
                archive.check_entries()
                await self.bus.call("security", VerifySignature(data=archive.manifest_bytes,
                                                                signature=bytes.fromhex(sig.signature),
                                                                key_id=sig.key_id), SignatureValid)
                files = await anyio.to_thread.run_sync(archive.read_files)  # (views of the archive)
                for variant, spec in archive.manifest.variants.items():
                    await self._load_check(archive.manifest.name, variant, files[spec.file])
                    self._loadable.add(spec.sha256)
        except (BundleError, ModelLoadError, RemoteError, subprocess.TimeoutExpired):
            return

    def _fault(self, point: str) -> None:
        """Fault injection for crash tests: the point named in FAULT kills the process."""
        marker = self.root / "FAULT"
        if marker.exists() and marker.read_text().strip() == point:
            marker.unlink()
            os.kill(os.getpid(), signal.SIGKILL)

    async def handle(self, req: Request, ctx: Context) -> Reply | tuple[Reply, list]:
        try:
            return await self._handle(req, ctx)
        except UnknownSigner as exc:
            raise Rejected(str(exc)) from exc
        except (BundleError, ModelLoadError) as exc:
            raise BadMessage(str(exc)) from exc
        except DowngradeRefused as exc:
            raise Rejected(str(exc)) from exc
        except NoSuchModel as exc:
            raise UnknownDestination(str(exc)) from exc
        except ModelStoreError as exc:
            raise InternalError(str(exc)) from exc

    async def _handle(self, req: Request, ctx: Context) -> Reply | tuple[Reply, list]:
        store = self.store
        match req:
            case Install():
                if len(ctx.frames) != 1:
                    raise BadMessage("Install carries the bundle as exactly one raw frame")
                frame = ctx.frames[0]  # read in place: no copy of a large bundle
                return await self._install(frame.buffer if hasattr(frame, "buffer") else frame, ctx.sender)
            case Activate(name=name, version=version, variant=variant):
                if variant:
                    return await self._activate_variant(name, version, variant, ctx.sender)
                return await self._activate(name, version, ctx.sender)
            case Rollback(name=name):
                self._known(name)
                rec = store.record(name)
                if rec.variant_trial:  # the trial under way is the variant's: it ends
                    return await self._rollback_variant(name, "requested", ctx.sender)
                if not rec.previous:
                    raise Rejected(f"{name} has no previous version to roll back to")
                return await self._rollback(name, "requested", ctx.sender)
            case Remove(name=name, version=version):
                rec = store.record(name)
                if version not in store.versions(name):
                    raise NoSuchModel(name, version)
                if version in (rec.active, rec.trial) or version in rec.split:
                    raise Rejected(f"{name} {version} is active, in trial or in a split; activate another first")
                if version == rec.previous and rec.trial:
                    raise Rejected(f"{name} {version} is what the trial of {rec.trial} rolls back to; "
                                   "wait for the trial to end")
                if version == rec.previous:
                    self._commit_record(name, msgspec.structs.replace(rec, previous=""))
                async with self._writing:  # its sweep must not take an install's fresh blobs
                    store.remove_version(name, version)
                await self._announce("removed", name, version, ctx.sender)
                return self._state(name)
            case Split(name=name, weights=weights, variants=True):
                return await self._split_variants(name, weights, ctx.sender)
            case Split(name=name, weights=weights):
                self._known(name)
                have = store.versions(name)
                missing = [v for v in weights if v not in have]
                if missing:
                    raise NoSuchModel(name, ", ".join(missing))
                if weights and (any(not math.isfinite(w) or w < 0 for w in weights.values())
                                or sum(weights.values()) <= 0):
                    raise BadMessage("weights must be finite, non-negative and not all zero")
                self._commit_record(name, msgspec.structs.replace(store.record(name), split=dict(weights)))
                await self._announce("split", name, "", ctx.sender,
                                     detail=" ".join(f"{v}={w:g}" for v, w in weights.items()) or "none")
                return self._state(name)
            case ListModels():
                return ModelList(models=[self._state(n) for n in store.names()])
            case InspectModel(name=name, version=version):
                version = version or store.record(name).active or (store.versions(name) or [""])[-1]
                manifest, sig = store.manifest(name, version)
                return ModelManifest(manifest=manifest, key_id=sig.key_id)
            case GetModel(name=name, version=version, variant=variant):
                self._known(name)
                version = version or store.record(name).active
                if not version:
                    raise Unavailable(f"{name} has no active version; activate one")
                manifest, _ = store.manifest(name, version)
                if variant not in manifest.variants:
                    raise BadMessage(f"{name} {version} has no variant {variant!r}; it has {sorted(manifest.variants)}")
                sha = manifest.variants[variant].sha256
                data = await anyio.to_thread.run_sync(store.read_file, sha)  # decrypt off the event loop
                return ModelBytes(name=name, version=version, variant=variant, sha256=sha, manifest=manifest), [data]
            case GetAsset(name=name, asset=asset, version=version):
                self._known(name)
                version = version or store.record(name).active
                if not version:
                    raise Unavailable(f"{name} has no active version; activate one, or name a version")
                manifest, _ = store.manifest(name, version)
                entry = manifest.assets.get(asset)
                if entry is None:
                    raise BadMessage(f"{name} {version} has no asset {asset!r}; it has "
                                     f"{sorted(manifest.assets) or 'none'}")
                data = await anyio.to_thread.run_sync(store.read_file, entry.sha256)
                return AssetBytes(name=name, version=version, asset=asset, sha256=entry.sha256, size=entry.size,
                                  media_type=entry.media_type), [data]
            case Resolve(name=name, key=key):
                self._known(name)
                rec = store.record(name)
                if rec.split:
                    version = pick_version(name, key, rec.split)
                elif not rec.active:
                    raise Unavailable(f"{name} has no active version")
                else:
                    version = rec.active
                return Resolved(name=name, version=version, variant=self._state(name).variant(version, key))
            case ReportHealth():
                return await self._health(req)

    # -- operations -------------------------------------------------------------------------------

    async def _install(self, data: object, sender: str) -> Installed:
        async with self._installing:
            # Stages of PROTOCOL.md 11.4, each bounded: the directory, manifest and signature
            # under small caps, the signature verified, the entries held to the signed
            # manifest, and only then the model files inflated (in a worker thread).
            archive = await anyio.to_thread.run_sync(Archive, data)
            with archive:
                m = archive.manifest
                sig = archive.verify_embedded()
                archive.check_entries()
                # Then: is that key one the device trusts?
                try:
                    await self.bus.call("security", VerifySignature(data=archive.manifest_bytes,
                                                                    signature=bytes.fromhex(sig.signature),
                                                                    key_id=sig.key_id), SignatureValid)
                except BadMessage:
                    raise UnknownSigner(sig.key_id) from None
                self._check_newer(m.name, m.version)
                files = await anyio.to_thread.run_sync(archive.read_files)
                for spec in m.variants.values():
                    await anyio.to_thread.run_sync(check_graph, m, spec.file, files[spec.file])
                check_ops(m, files)  # the pre -> model -> post chains can run
                for variant, spec in m.variants.items():
                    if spec.sha256 not in self._loadable:  # (a preload's, checked: _precheck)
                        await self._load_check(m.name, variant, files[spec.file])
                bundle = Bundle(archive.manifest_bytes, files, sig)
            async with self._writing:
                self._check_newer(m.name, m.version)
                await anyio.to_thread.run_sync(self.store.add, bundle)  # encrypt and fsync off the loop
                pruned = self._prune(m.name)
            del bundle, files
        await self._announce("installed", m.name, m.version, sender, detail=f"signed by {sig.key_id}")
        for old in pruned:
            await self._announce("removed", m.name, old, "the store", detail=f"pruned: it keeps the newest {self.settings.keep}")
        return Installed(name=m.name, version=m.version, key_id=sig.key_id, variants=sorted(m.variants))

    def _check_newer(self, name: str, version: str) -> None:
        versions = self.store.versions(name)
        if versions and parse_version(version) <= parse_version(versions[-1]):
            raise DowngradeRefused(name, version, versions[-1])

    async def _load_check(self, name: str, variant: str, model: object) -> None:
        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run([sys.executable, "-m", "services.modelstore._check"], input=model,
                                  capture_output=True, timeout=120)
        proc = await anyio.to_thread.run_sync(run)
        if proc.returncode != 0:
            raise ModelLoadError(name, variant, proc.stdout.decode(errors="replace").strip() or
                                 proc.stderr.decode(errors="replace").strip()[-300:])

    async def _activate(self, name: str, version: str, sender: str) -> ModelState:
        if version not in self.store.versions(name):
            raise NoSuchModel(name, version)
        rec = self.store.record(name)
        if rec.active == version:
            return self._state(name)
        new = ModelRecord(active=version, previous=rec.active or rec.previous, trial=version if rec.active else "",
                          split={}, default_variants=rec.default_variants)
        self._fault("activate:before")
        self._commit_record(name, new)
        self._fault("activate:after")
        if new.trial:
            self._start_trial(name, version, new.previous)
        else:
            self.trials.pop(name, None)
        await self._announce("activated", name, version, sender, previous=rec.active,
                             detail="in trial until its health gates commit it" if new.trial else "first version")
        return self._state(name)

    async def _rollback(self, name: str, why: str, by: str) -> ModelState:
        rec = self.store.record(name)
        bad = rec.active
        self.trials.pop(name, None)
        self._commit_record(name, ModelRecord(active=rec.previous, previous="", trial="", split={},
                                              default_variants=rec.default_variants))
        await self._announce("rolledback", name, rec.previous, by, previous=bad, detail=why)
        return self._state(name)

    def _start_trial(self, name: str, version: str, baseline: str) -> None:
        self.trials[name] = Trial(version, baseline, time.monotonic(), self.settings.trial_window_s)

    # -- variants of the active version -------------------------------------------------------------

    def _check_variants(self, name: str, version: str, asked: Iterable[str]) -> Manifest:
        """The version's manifest; bad-message naming the variants it has when one asked is not."""
        manifest, _ = self.store.manifest(name, version)
        unknown = [v for v in asked if v not in manifest.variants]
        if unknown:
            raise BadMessage(f"{name} {version} has no variant {', '.join(map(repr, unknown))}; it has "
                             f"{', '.join(map(repr, manifest.variants))}")
        return manifest

    def _active(self, name: str, what: str) -> str:
        self._known(name)
        active = self.store.record(name).active
        if not active:
            raise Unavailable(f"{name} has no active version: {what} concerns the active version; activate one")
        return active

    async def _split_variants(self, name: str, weights: dict[str, float], sender: str) -> ModelState:
        active = self._active(name, "a variant split")
        self._check_variants(name, active, weights)
        if weights and (any(not math.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0):
            raise BadMessage("weights must be finite, non-negative and not all zero")
        rec = self.store.record(name)
        if rec.trial and weights:
            raise Rejected(f"{name} {rec.trial} is in trial against {rec.previous}: a variant split would mix variants "
                           "into that comparison; split its variants once the trial ends")
        self._commit_record(name, msgspec.structs.replace(rec, variant_split=dict(weights)))
        await self._announce("split", name, active, sender,
                             detail="variants " + (" ".join(f"{v}={w:g}" for v, w in weights.items()) or "none"))
        return self._state(name)

    async def _activate_variant(self, name: str, version: str, variant: str, sender: str) -> ModelState:
        active = self._active(name, "a variant trial")
        version = version or active
        if version not in self.store.versions(name):
            raise NoSuchModel(name, version)
        if version != active:
            raise Rejected(f"{name} {version} is not the active version ({active}): a variant trial runs on the "
                           f"active version; activate {version} first")
        self._check_variants(name, version, [variant])
        rec = self.store.record(name)
        if rec.trial:
            raise Rejected(f"{name} {rec.trial} is in trial against {rec.previous}: a variant trial waits until "
                           "that trial is committed or rolled back")
        baseline = rec.default_variants.get(version, "full")
        if variant == (rec.variant_trial or baseline):
            return self._state(name)  # serving already: nothing changes
        if variant == baseline:  # back to the variant serving the version: the trial ends
            return await self._rollback_variant(name, "requested", sender)
        self._commit_record(name, msgspec.structs.replace(rec, variant_trial=variant, variant_split={}))
        self._start_variant_trial(name, version, variant)
        await self._announce("activated", name, version, sender, variant=variant,
                             detail=f"variant {variant} in trial against {baseline} until its health gates commit it")
        return self._state(name)

    def _start_variant_trial(self, name: str, version: str, variant: str) -> None:
        baseline = self.store.record(name).default_variants.get(version, "full")
        self.trials[name] = Trial(version, version, time.monotonic(), self.settings.trial_window_s, variant=variant,
                                  baseline_variant=baseline)

    async def _rollback_variant(self, name: str, why: str, by: str) -> ModelState:
        rec = self.store.record(name)
        bad, baseline = rec.variant_trial, rec.default_variants.get(rec.active, "full")
        self.trials.pop(name, None)
        self._commit_record(name, msgspec.structs.replace(rec, variant_trial="", variant_split={}))
        await self._announce("rolledback", name, rec.active, by, variant=baseline,
                             detail=f"variant {bad} rolled back to {baseline}: {why}")
        return self._state(name)

    async def main(self) -> None:
        """Trials decide when a window ends, whether or not a report follows it, and end
        when they are ``trial_max_s`` old."""
        tick = min(1.0, self.settings.trial_window_s / 4)
        while True:
            await anyio.sleep(tick)
            for name, trial in list(self.trials.items()):
                await self._judge(name, trial)

    async def _health(self, report: ReportHealth) -> HealthRecorded:
        trial = self.trials.get(report.name)
        if trial is None or not trial.add(report, time.monotonic()):
            return HealthRecorded(name=report.name, version=report.version, variant=report.variant)
        verdict = await self._judge(report.name, trial)
        if verdict == "wait":
            verdict = "trial" if trial.side(report) == 0 else ""
        return HealthRecorded(name=report.name, version=report.version, verdict=verdict, variant=report.variant)

    async def _judge(self, name: str, trial: Trial) -> str:
        """Apply the trial gate (``_trial.decide``) to the trial's ended windows: "wait",
        "committed" or "rolled-back"."""
        decision = trial.decide(time.monotonic(), self.settings.trial_rule())
        rec = self.store.record(name)
        current = (rec.active == trial.version and rec.variant_trial == trial.variant if trial.variant
                   else rec.trial == trial.version)
        if decision.verdict == "wait" or self.trials.get(name) is not trial or not current:
            return "wait"
        del self.trials[name]  # before any await: one decision per trial
        if trial.variant:
            return await self._judge_variant(name, trial, decision.verdict, decision.reason)
        if decision.verdict == "rollback":
            await self._rollback(name, f"trial of {trial.version} failed its health gates against "
                                       f"{trial.baseline}: {decision.reason}", "health gates")
            return "rolled-back"
        # committed: the version serves all traffic (a split that ran the trial side by side ends)
        self._commit_record(name, msgspec.structs.replace(rec, trial="", split={}))
        await self._announce("committed", name, trial.version, "health gates",
                             detail=f"against {trial.baseline}: {decision.reason}"
                             + ("; the split is cleared" if rec.split else ""))
        return "committed"

    async def _judge_variant(self, name: str, trial: Trial, verdict: str, reason: str) -> str:
        what = f"variant {trial.variant} of {trial.version}"
        if verdict == "rollback":
            await self._rollback_variant(name, f"trial of {what} failed its health gates against "
                                               f"{trial.baseline_variant}: {reason}", "health gates")
            return "rolled-back"
        # committed: the variant is the version's default (a variant split that ran the trial ends)
        rec = self.store.record(name)
        defaults = {v: d for v, d in rec.default_variants.items() if v != trial.version}
        if trial.variant != "full":
            defaults[trial.version] = trial.variant
        self._commit_record(name, msgspec.structs.replace(rec, variant_trial="", variant_split={},
                                                          default_variants=defaults))
        await self._announce("committed", name, trial.version, "health gates", variant=trial.variant,
                             detail=f"{what} against {trial.baseline_variant}: {reason}; it is the version's "
                                    "default variant" + ("; the variant split is cleared" if rec.variant_split else ""))
        return "committed"

    # -- helpers ------------------------------------------------------------------------------------

    def _commit_record(self, name: str, record: ModelRecord) -> None:
        models = dict(self.store.state.models)
        models[name] = record
        self.store.commit(StoreState(models=models))

    def _known(self, name: str) -> None:
        if not self.store.versions(name):
            raise NoSuchModel(name)

    def _prune(self, name: str) -> list[str]:
        """Keep the newest ``keep`` versions, and always the active, previous and split ones."""
        rec = self.store.record(name)
        pinned = {rec.active, rec.previous, rec.trial, *rec.split}
        versions = self.store.versions(name)
        keep = self.settings.keep
        removed = [v for v in (versions[:-keep] if len(versions) > keep else []) if v not in pinned]
        for version in removed:
            self.store.remove_version(name, version)
        return removed

    def _state(self, name: str) -> ModelState:
        rec = self.store.record(name)
        return ModelState(name=name, versions=self.store.versions(name), active=rec.active, previous=rec.previous,
                          trial=rec.trial, split=dict(rec.split), variant_split=dict(rec.variant_split),
                          variant_trial=rec.variant_trial, default_variants=dict(rec.default_variants))

    async def _announce(self, what: str, name: str, version: str, by: str, *, previous: str = "",
                        detail: str = "", variant: str = "") -> None:
        """Publish on modelstore.<what> and append to the audit log."""
        self.log.info(f"model_{what}", name=name, version=version or None, previous=previous or None,
                      variant=variant or None, by=by, detail=detail or None)
        await self.bus.publish(f"modelstore.{what}", ModelEvent(name=name, version=version, previous=previous,
                                                                detail=detail, variant=variant))
        subject = f"{name} {version}".strip() + (f" variant {variant}" if variant else "")
        try:
            await self.bus.call("security", AuditAppend(kind=f"model-{what}", subject=subject,
                                                        detail=f"{detail} (by {by})".strip()), Appended, timeout=5)
        except Exception as exc:  # the operation is done; say loudly that its record is missing
            self.log.error("audit_append_failed", name=name, what=what, error=str(exc))
