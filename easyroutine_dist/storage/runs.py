"""Two-phase run writing (begin / write parts / commit parts / commit run) and run reading.

Workers call :meth:`RunWriter.write_part` and :meth:`RunWriter.commit_part` independently; only small JSON records
travel back to the driver, which calls :meth:`RunWriter.commit_run`. A run is visible only once its ``_SUCCESS``
marker exists; a part counts only once its record (the part's commit marker) exists.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch

from ..cache import ActivationCache
from ..errors import ConfigError, MetadataError, StorageError
from . import layout
from .catalog import Catalog, entry_from_metadata
from .fs import Store, create_exclusive, exists, list_names, read_bytes, remove, resolve, write_bytes
from .query import normalise
from .shards import DEFAULT_MAX_SHARD_BYTES, plan_shards, read_shard, write_shard

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RunHandle:
    """Where a run lives. Small and JSON-able (``to_dict``/``from_dict``) so it can be sent to workers."""

    run_id: str
    experiment: str
    model_slug: str
    url: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def rel(self) -> str:
        return layout.run_rel(self.experiment, self.model_slug, self.run_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunHandle":
        return cls(**d)


def as_flat(data: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """ActivationCache | dict | Tensor | ``(tensors, info)`` -> ``(contiguous cpu tensors, JSON info)``."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], dict):
        tensors, info = data
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        return tensors, normalise(info or {}, "cache info")
    if isinstance(data, torch.Tensor):
        data = {"activations": data}
    if isinstance(data, dict):
        data = ActivationCache.from_flat({k: v for k, v in data.items() if isinstance(v, torch.Tensor)},
                                         {k: v for k, v in data.items() if not isinstance(v, torch.Tensor)})
    if not isinstance(data, ActivationCache):
        raise MetadataError(f"cannot store a {type(data).__name__}; pass an ActivationCache, a dict or a tensor.")
    try:
        tensors, info = data.to_flat()
    except ConfigError as exc:
        raise MetadataError(str(exc)) from None
    return tensors, normalise(info, "cache info")


class RunWriter:
    """Writes runs under one storage root; safe to construct in every worker from the same base_dir."""

    def __init__(self, base_dir: Any, storage_options: dict[str, Any] | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.store = base_dir if isinstance(base_dir, Store) else resolve(base_dir, storage_options)
        self.max_shard_bytes = int(max_shard_bytes)
        self.catalog = Catalog(self.store)

    def _p(self, run: RunHandle, name: str = "") -> str:
        return self.store.path(run.rel, name)

    def begin_run(self, experiment: str, model_name: str | None, metadata: dict[str, Any],
                  run_id: str | None = None) -> RunHandle:
        """Allocate a unique run id (or use ``run_id``, e.g. from ``layout.new_run_id()``, so that a crashed
        driver can resume the run) and write its ``metadata.json``. Nothing is visible to queries yet.

        ``metadata`` must be JSON-serialisable (checked before anything is written). A caller-chosen ``run_id``
        that already has a ``metadata.json`` is refused (StorageError); reopen it with :meth:`open_run`.
        """
        layout.check_experiment(experiment)
        slug = layout.model_slug(model_name)
        meta = normalise(metadata, "metadata")
        layout.check_tag(meta.get("tag"))
        if run_id is None:
            run_id, save_time, now = layout.new_run_id()
        else:
            import time

            run_id, save_time, now = layout.check_run_id(run_id), run_id[:19], time.time()
            taken = self.store.path(layout.run_rel(experiment, slug, run_id), layout.METADATA_FILE)
            if exists(self.store, taken):
                raise StorageError(f"run {run_id} already exists in experiment {experiment!r}; reopen it with "
                                   "open_run(...) to resume it, or pick a new id (layout.new_run_id()).")
        meta.update(schema_version=SCHEMA_VERSION, run_id=run_id, experiment_name=experiment,
                    model_name=model_name, save_time=save_time, saved_at_unix=now)
        handle = RunHandle(run_id=run_id, experiment=experiment, model_slug=slug, url="", metadata=meta)
        handle = RunHandle(run_id, experiment, slug, self.store.url(self._p(handle)), meta)
        write_bytes(self.store, self._p(handle, layout.METADATA_FILE), json.dumps(meta, sort_keys=True).encode())
        return handle

    def open_run(self, experiment: str, model_name: str | None, run_id: str) -> RunHandle:
        """Reopen a begun run (committed or not) from its ``metadata.json``, e.g. to resume it after a crash.

        Raises StorageError when the run was never begun under ``experiment``/``model_name``.
        """
        layout.check_experiment(experiment)
        slug = layout.model_slug(model_name)
        rel = layout.run_rel(experiment, slug, layout.check_run_id(run_id))
        meta = json.loads(read_bytes(self.store, self.store.path(rel, layout.METADATA_FILE)))
        return RunHandle(run_id, experiment, slug, self.store.url(self.store.path(rel)), meta)

    def is_committed(self, run: RunHandle) -> bool:
        """True once the run's ``_SUCCESS`` marker exists."""
        return exists(self.store, self._p(run, layout.RUN_MARKER))

    def write_part(self, run: RunHandle, part_id: int, data: Any, *, check_committed: bool = True) -> dict[str, Any]:
        """Write one part's shards (deterministic names); return its JSON record. Not committed yet.

        Refuses (StorageError) when the part is already committed, so a retry never overwrites a committed part.
        ``check_committed=False`` skips that lookup for a run this process just began (one request less on S3).
        """
        layout.check_part_id(part_id)
        tensors, info = as_flat(data)
        if check_committed and exists(self.store, self._p(run, layout.record_name(part_id))):
            raise StorageError(f"part {part_id} of run {run.run_id} is already committed; it will not be rewritten.")
        shards = []
        for i, keys in enumerate(plan_shards(tensors, self.max_shard_bytes)):
            path = self._p(run, layout.shard_name(part_id, i))
            shards.append(write_shard(self.store, path, {k: tensors[k] for k in keys}))
        rows = next((int(t.shape[0]) for t in tensors.values() if t.dim() > 0), 0)
        return {"part_id": part_id, "rows": rows, "keys": list(tensors), "info": info, "shards": shards}

    def commit_part(self, run: RunHandle, record: dict[str, Any]) -> bool:
        """Write the part's record by exclusive create; False when an identical record was already there."""
        path = self._p(run, layout.record_name(layout.check_part_id(record["part_id"])))
        body = json.dumps(record, sort_keys=True).encode()
        if create_exclusive(self.store, path, body):
            return True
        if json.loads(read_bytes(self.store, path)) != json.loads(body):
            raise StorageError(
                f"part {record['part_id']} of run {run.run_id} was committed by another attempt with different "
                "shards; only one attempt of a part may run at a time."
            )
        return False

    def committed_parts(self, run: RunHandle) -> dict[int, dict[str, Any]]:
        """Records of every committed part, by part id."""
        out = {}
        for name in list_names(self.store, self._p(run, "records")):
            if name.startswith("part-") and name.endswith(".json") and ".tmp-" not in name:
                rec = json.loads(read_bytes(self.store, self._p(run, f"records/{name}")))
                out[int(rec["part_id"])] = rec
        return dict(sorted(out.items()))

    def commit_run(self, run: RunHandle, records: list[dict[str, Any]] | None = None, *, verify: bool = True) -> str:
        """Write the run marker (last, exclusive) and register the run in the catalog; return the run's URL.

        ``records`` defaults to every committed part. Each given record must be committed (checked against storage
        unless ``verify=False``, for records whose ``commit_part`` this process has just seen succeed).
        """
        if records is not None and not verify:
            committed = {r["part_id"]: r for r in records}
        else:
            committed = self.committed_parts(run)
        recs = list(committed.values()) if records is None else sorted(records, key=lambda r: r["part_id"])
        ids = [r["part_id"] for r in recs]
        if len(set(ids)) != len(ids):
            raise StorageError(f"run {run.run_id}: duplicate part ids in records {ids}.")
        missing = [i for i in ids if i not in committed]
        if missing:
            raise StorageError(f"run {run.run_id}: parts {missing} are not committed; call commit_part first.")
        manifest = {"schema_version": SCHEMA_VERSION, "metadata": run.metadata, "records": [committed[i] for i in ids]}
        if not create_exclusive(self.store, self._p(run, layout.RUN_MARKER), json.dumps(manifest).encode()):
            raise StorageError(f"run {run.run_id} is already committed.")
        self.catalog.add(entry_from_metadata(run.metadata, manifest))
        return run.url


def read_marker(store: Store, run_dir: str) -> dict[str, Any]:
    """The manifest in a run's ``_SUCCESS`` marker (StorageError when the run is not committed)."""
    raw = read_bytes(store, f"{run_dir}/{layout.RUN_MARKER}")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise StorageError(f"run marker {store.url(run_dir)}/_SUCCESS is unreadable ({exc}).") from None


def run_dir(store: Store, entry: dict[str, Any]) -> str:
    return store.path(layout.run_rel(entry["experiment_name"], layout.model_slug(entry.get("model_name")),
                                     entry["run_id"]))


def iter_parts(store: Store, entry: dict[str, Any], keys: list[str] | None = None) -> Iterator[ActivationCache]:
    """Yield each part of a run as an ActivationCache, in part-id order (rows in dataset order)."""
    rdir = run_dir(store, entry)
    manifest = read_marker(store, rdir)
    for rec in manifest["records"]:
        tensors: dict[str, torch.Tensor] = {}
        for sh in rec["shards"]:
            tensors.update(read_shard(store, f"{rdir}/shards/{sh['file']}", sh, keys))
        if keys is not None:
            unknown = [k for k in keys if k not in rec["keys"] and k not in rec["info"]]
            if unknown:
                raise StorageError(f"run {entry['run_id']} has no keys {unknown}; it has {rec['keys']}.")
        ordered = {k: tensors[k] for k in rec["keys"] if k in tensors}
        yield ActivationCache.from_flat(ordered, rec["info"])


def load_run(store: Store, entry: dict[str, Any], keys: list[str] | None = None) -> tuple[ActivationCache, dict]:
    """Load a whole run (parts concatenated in order) and its metadata."""
    parts = list(iter_parts(store, entry, keys))
    cache = parts[0] if len(parts) == 1 else ActivationCache.concat(parts)
    manifest = read_marker(store, run_dir(store, entry))
    return cache, dict(manifest["metadata"])


def remove_run(store: Store, catalog: Catalog, entry: dict[str, Any]) -> None:
    """Remove a run: catalog entry, then marker (invisible from here on), then its files."""
    rdir = run_dir(store, entry)
    catalog.discard(entry["experiment_name"], entry["run_id"])
    remove(store, f"{rdir}/{layout.RUN_MARKER}")
    remove(store, rdir, recursive=True)


def move_run(store: Store, catalog: Catalog, entry: dict[str, Any], new_experiment: str) -> dict[str, Any]:
    """Move a committed run to another experiment (copy, commit the copy, then remove the original)."""
    layout.check_experiment(new_experiment)
    src = run_dir(store, entry)
    manifest = read_marker(store, src)
    meta = dict(manifest["metadata"], experiment_name=new_experiment)
    new_entry = dict(entry, experiment_name=new_experiment)
    dst = run_dir(store, new_entry)
    if store.is_local:
        import os

        os.makedirs(f"{dst}/shards", exist_ok=True)
    for rec in manifest["records"]:
        for sh in rec["shards"]:
            try:
                store.fs.copy(f"{src}/shards/{sh['file']}", f"{dst}/shards/{sh['file']}")
            except OSError as exc:
                raise StorageError(f"cannot copy {store.url(src)}/shards/{sh['file']}: {exc}") from exc
    write_bytes(store, f"{dst}/{layout.METADATA_FILE}", json.dumps(meta, sort_keys=True).encode())
    new_manifest = dict(manifest, metadata=meta)
    if not create_exclusive(store, f"{dst}/{layout.RUN_MARKER}", json.dumps(new_manifest).encode()):
        raise StorageError(f"run {entry['run_id']} already exists in experiment {new_experiment!r}.")
    fresh = entry_from_metadata(meta, new_manifest)
    catalog.add(fresh)
    remove_run(store, catalog, entry)
    return fresh
