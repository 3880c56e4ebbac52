"""Two-phase run writing (begin / write parts / commit parts / commit run) and run reading.

Workers call :meth:`RunWriter.write_part` and :meth:`RunWriter.commit_part` independently; only small JSON records
travel back to the driver, which calls :meth:`RunWriter.commit_run`. A run is visible only once its ``_SUCCESS``
marker exists; a part counts only once its record (the part's commit marker) exists.

Exactly once: every attempt at a part writes shards under its own names (``part-PPPPP-SSSS-<attempt>``) and the
record, created exclusively, names the files it commits. Two attempts at one part (a re-queued partition whose
first worker still runs, two drivers resuming one run) never write the same file: the first record wins, the
loser's shards are removed by the loser (or left as orphans that :mod:`.verify` lists), and committed bytes never
change. Every name read back from storage is validated before it is used as a path (:mod:`.layout`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, overload

import torch

from ..cache import ActivationCache
from ..slots import MASK_KEYS
from ..errors import ConfigError, MetadataError, StorageError
from . import layout
from .catalog import Catalog, entry_from_metadata
from .fs import (ObjectNotFoundError, Store, create_exclusive, file_exists, list_names, read_bytes, remove, resolve,
                 retrying, write_bytes)
from .markers import READABLE_SCHEMA_VERSIONS, read_manifest  # noqa: F401 - re-exported
from .query import normalise
from .shards import (DEFAULT_CHECKSUM, DEFAULT_MAX_SHARD_BYTES, check_checksum, plan_shards, read_part_shards,
                     write_shard)

#: 3: as 2, and a part's shards may split it by rows (``"rows": [a, b]``, streamed parts); readers that know only
#: 1 and 2 would join such shards wrongly, so they must refuse these runs (they do: unknown version -> upgrade)
SCHEMA_VERSION = 3
_RECORD_RE = re.compile(r"^part-(\d{5,7})\.json$")  # ids padded to 5 digits (layout.record_name)
_LOG = logging.getLogger(__name__)


class PartAlreadyCommittedError(StorageError):
    """``write_part`` found the part committed (by another attempt): nothing was written; the attempt is done."""


class RunAlreadyCommittedError(StorageError):
    """``commit_run`` found the run's marker already there (another driver committed it): the run is intact."""


def record_part_ids(names: list[str]) -> list[int]:
    """Part ids of the committed records among directory entry ``names`` (temp files and strays ignored), sorted."""
    return sorted(int(m.group(1)) for m in map(_RECORD_RE.match, names)
                  if m is not None and m.group(1) == f"{int(m.group(1)):05d}")


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
    """Writes runs under one storage root; safe to construct in every worker from the same base_dir.

    ``checksum``: the digest of new shards, ``"crc32c"`` (default) or ``"sha256"``; runs of either are read.
    """

    def __init__(self, base_dir: Any, storage_options: dict[str, Any] | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, checksum: str = DEFAULT_CHECKSUM) -> None:
        self.checksum = check_checksum(checksum)
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
            if file_exists(self.store, taken):
                raise StorageError(f"run {run_id} already exists in experiment {experiment!r}; reopen it with "
                                   "open_run(...) to resume it, or pick a new id (layout.new_run_id()).")
        meta.update(schema_version=SCHEMA_VERSION, run_id=run_id, experiment_name=experiment,
                    model_name=model_name, save_time=save_time, saved_at_unix=now)
        handle = RunHandle(run_id=run_id, experiment=experiment, model_slug=slug, url="", metadata=meta)
        handle = RunHandle(run_id, experiment, slug, self.store.url(self._p(handle)), meta)
        meta_path, body = self._p(handle, layout.METADATA_FILE), json.dumps(meta, sort_keys=True).encode()
        retrying(lambda: write_bytes(self.store, meta_path, body), f"writing {self.store.url(meta_path)}", write=True)
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
        return file_exists(self.store, self._p(run, layout.RUN_MARKER))

    def write_part(self, run: RunHandle, part_id: int, data: Any, *, check_committed: bool = True) -> dict[str, Any]:
        """Write one part's shards under names of their own (a fresh attempt token); return its JSON record, which
        names those files. Not committed yet (:meth:`commit_part`).

        Raises PartAlreadyCommittedError (a StorageError) when the part is already committed: nothing is written.
        Whether or not that check races with another attempt's commit, no committed file is ever overwritten, since
        no two attempts share a file name. ``check_committed=False`` skips the lookup (one request less on S3) for
        a run this process just began.
        """
        layout.check_part_id(part_id)
        tensors, info = as_flat(data)
        rec_path = self._p(run, layout.record_name(part_id))
        if check_committed and retrying(lambda: file_exists(self.store, rec_path),
                                        f"checking {self.store.url(rec_path)}", write=True):
            raise PartAlreadyCommittedError(f"part {part_id} of run {run.run_id} is already committed; it will not "
                                            "be rewritten.")
        attempt = layout.new_attempt()
        shards = []
        for i, keys in enumerate(plan_shards(tensors, self.max_shard_bytes)):
            path = self._p(run, layout.shard_name(part_id, i, attempt))
            shards.append(write_shard(self.store, path, {k: tensors[k] for k in keys}, self.checksum))
        rows = next((int(t.shape[0]) for t in tensors.values() if t.dim() > 0), 0)
        return {"part_id": part_id, "rows": rows, "keys": list(tensors), "info": info, "shards": shards,
                "attempt": attempt, "checksum": self.checksum}

    def commit_part(self, run: RunHandle, record: dict[str, Any]) -> bool:
        """Create the part's record (exclusive create); True when this call committed the part.

        False when the part was already committed: by this same record (a retried call), or by another attempt,
        which won. A losing attempt's shards are not referenced by the committed record; they are removed here
        (best effort: what a crash leaves is listed as orphans by :func:`easyroutine_dist.storage.verify.scan_run`).
        """
        part_id = layout.check_part_id(record["part_id"])
        check_record(record, part_id, f"the record of part {part_id}")
        path = self._p(run, layout.record_name(part_id))
        body = json.dumps(record, sort_keys=True).encode()
        # retried on transient faults: when an attempt that seemed to fail did create the record, the next one finds
        # it and the comparison below sees this very record
        if retrying(lambda: create_exclusive(self.store, path, body), f"committing part {part_id} "
                    f"({self.store.url(path)})", write=True):
            return True
        winner = read_record(self.store, self._p(run), part_id)
        if winner == json.loads(body):
            return False  # this record was committed by an earlier call
        keep = {sh["file"] for sh in winner["shards"]}
        for sh in record["shards"]:
            if sh["file"] not in keep:
                try:
                    remove(self.store, self._p(run, f"shards/{sh['file']}"))
                except StorageError as exc:  # an orphan, listed by verify.scan_run
                    _LOG.warning("part %d of run %s: cannot remove the losing attempt's shard %s (%s)", part_id,
                                 run.run_id, sh["file"], exc)
        _LOG.info("part %d of run %s was committed by another attempt; this attempt's shards were dropped",
                  part_id, run.run_id)
        return False

    def committed_part_ids(self, run: RunHandle) -> list[int]:
        """Ids of every committed part, sorted. Lists record names only; reads no record."""
        where = self._p(run, "records")
        return record_part_ids(retrying(lambda: list_names(self.store, where), f"listing {self.store.url(where)}",
                                        write=True))

    def committed_parts(self, run: RunHandle) -> dict[int, dict[str, Any]]:
        """Records of every committed part, by part id (reads every record: for resumes and tools, not commits)."""
        rdir = self._p(run)
        return {pid: read_record(self.store, rdir, pid) for pid in self.committed_part_ids(run)}

    def commit_run(self, run: RunHandle, records: list[dict[str, Any]] | None = None, *, verify: bool = True,
                   n_rows: int | None = None, statistics: bool = False) -> str:
        """Write the run marker (last, exclusive) and register the run in the catalog; return the run's URL.

        ``records`` defaults to every committed part. Each given record must be committed (checked against the
        listing of ``records/`` unless ``verify=False``, for records whose ``commit_part`` this process has just
        seen succeed). The marker references the committed records by part id (schema 2); no record is read, so
        the memory this takes is a list of part ids, whatever the rows per part. ``n_rows`` (the run's examples)
        goes into the marker and the catalog entry; with ``records`` it is their sum. ``statistics=True`` first
        merges the parts' statistics into the run's ``statistics.*`` files (:mod:`.stats`; reads the records).
        """
        if records is None:
            ids = self.committed_part_ids(run)
            n_keys = None  # would need the records' bodies; the catalog entry then has no key count
        else:
            ids = sorted(layout.check_part_id(r["part_id"]) for r in records)
            if len(set(ids)) != len(ids):
                raise StorageError(f"run {run.run_id}: duplicate part ids in records {ids}.")
            if verify:
                committed = set(self.committed_part_ids(run))
                missing = [i for i in ids if i not in committed]
                if missing:
                    raise StorageError(f"run {run.run_id}: parts {missing} are not committed; call commit_part first.")
            n_keys = len({k for r in records for k in r.get("keys", [])})
            n_rows = sum(int(r.get("rows", 0)) for r in records)
        manifest: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "metadata": run.metadata, "parts": ids}
        if n_keys is not None:
            manifest["n_keys"] = n_keys
        if n_rows is not None:
            manifest["n_rows"] = int(n_rows)
        if statistics and not self.is_committed(run):  # before the marker: a committed run's files never change
            from .stats import write_run_statistics

            write_run_statistics(self.store, self._p(run), ids, records)
        marker, body = self._p(run, layout.RUN_MARKER), json.dumps(manifest).encode()
        tries: list[bool] = []
        if not retrying(lambda: tries.append(True) or create_exclusive(self.store, marker, body),
                        f"committing run {run.run_id} ({self.store.url(marker)})", write=True):
            # found there: another driver's marker, unless an earlier try failed but landed (then it is this one)
            if len(tries) < 2 or _read_or_none(self.store, marker) != body:
                raise RunAlreadyCommittedError(f"run {run.run_id} is already committed.")
        self.catalog.add(entry_from_metadata(run.metadata, manifest))
        return run.url


def _read_or_none(store: Store, path: str) -> bytes | None:
    try:
        return retrying(lambda: read_bytes(store, path), f"reading {store.url(path)}")
    except StorageError:
        return None


def check_record(rec: Any, part_id: int, where: str) -> dict[str, Any]:
    """Return a part record whose part id is ``part_id`` and whose shard ``file`` names are names this layout
    writes for that part; else raise StorageError naming ``where``. Shard names are used as paths only after this."""
    if not isinstance(rec, dict) or rec.get("part_id") != part_id:
        raise StorageError(f"part record {where} does not describe part {part_id}; the run is damaged.")
    shards = rec.get("shards")
    if not isinstance(shards, list) or not all(isinstance(sh, dict) for sh in shards):
        raise StorageError(f"part record {where} has no list of shards; the run is damaged.")
    for sh in shards:
        try:
            layout.check_shard_file(sh.get("file"), part_id)
        except MetadataError as exc:
            raise StorageError(f"part record {where} is refused: {exc}") from None
    if not isinstance(rec.get("keys"), list) or not isinstance(rec.get("info", {}), dict):
        raise StorageError(f"part record {where} has no list of keys; the run is damaged.")
    return rec


def read_record(store: Store, rdir: str, part_id: int) -> dict[str, Any]:
    """The committed record of one part of the run in ``rdir``, validated (:func:`check_record`); StorageError when
    missing, unreadable or invalid. Transient read errors are retried."""
    path = f"{rdir}/{layout.record_name(layout.check_part_id(part_id))}"
    try:
        raw = retrying(lambda: read_bytes(store, path), f"reading {store.url(path)}")
    except ObjectNotFoundError as exc:
        raise StorageError(f"run {store.url(rdir)}: the record of part {part_id} is missing ({exc}); the run "
                           "is damaged, re-save it.") from None
    try:
        rec = json.loads(raw)
    except ValueError as exc:
        raise StorageError(f"part record {store.url(path)} is unreadable ({exc}).") from None
    return check_record(rec, part_id, store.url(path))


def manifest_part_ids(manifest: dict[str, Any]) -> list[int]:
    """Part ids of a run, in load order, from a raw marker of either schema."""
    if manifest["schema_version"] == 1:
        return [int(r["part_id"]) for r in manifest["records"]]
    return [layout.check_part_id(p) for p in manifest["parts"]]


def iter_records(store: Store, run_dir: str, manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each part record of a run in part-id order, read one at a time (schema 2) or from the marker (schema 1)."""
    if manifest["schema_version"] == 1:
        for rec in manifest["records"]:
            yield embedded_record(store, run_dir, rec)
        return
    for pid in manifest_part_ids(manifest):
        yield read_record(store, run_dir, pid)


def embedded_record(store: Store, run_dir: str, rec: Any) -> dict[str, Any]:
    """A record embedded in a schema-1 marker, validated like a record file."""
    pid = rec.get("part_id") if isinstance(rec, dict) else None
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise StorageError(f"run marker {store.url(run_dir)}/_SUCCESS embeds a record without a part id.")
    return check_record(rec, pid, f"{store.url(run_dir)}/_SUCCESS (part {pid})")


class PartRecords(Sequence):
    """The part records of a committed run as a read-only sequence: ``len`` costs nothing, items are read from
    ``records/`` when accessed (nothing is cached, so iterating holds one record at a time)."""

    def __init__(self, store: Store, run_dir: str, manifest: dict[str, Any]) -> None:
        self._store, self._dir, self._ids = store, run_dir, manifest_part_ids(manifest)
        self._embedded = manifest["records"] if manifest["schema_version"] == 1 else None

    def __len__(self) -> int:
        return len(self._ids)

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self._embedded is not None:
            return embedded_record(self._store, self._dir, self._embedded[i])
        return read_record(self._store, self._dir, self._ids[i])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"PartRecords({len(self)} parts of {self._store.url(self._dir)})"


def read_marker(store: Store, run_dir: str) -> dict[str, Any]:
    """The run's manifest in the shape every schema shares: ``{"schema_version", "metadata", "records"}``, where
    ``records`` is a :class:`PartRecords` (cheap ``len``; each record read from storage when accessed).

    StorageError when the run is not committed.
    """
    manifest = read_manifest(store, run_dir)
    return dict(manifest, records=PartRecords(store, run_dir, manifest))


def run_dir(store: Store, entry: dict[str, Any]) -> str:
    """The directory of the run an entry describes. Its names are checked first (MetadataError for a name that
    could leave the storage root), whoever built the entry: the catalog, an index, a user."""
    layout.check_entry(entry)
    return store.path(layout.run_rel(entry["experiment_name"], layout.model_slug(entry.get("model_name")),
                                     entry["run_id"]))


def iter_parts(store: Store, entry: dict[str, Any], keys: list[str] | None = None) -> Iterator[ActivationCache]:
    """Yield each part of a run as an ActivationCache, in part-id order (rows in dataset order).

    Reads the marker, then each part's record and shards just before yielding that part.
    """
    rdir = run_dir(store, entry)
    manifest = read_manifest(store, rdir)
    yield from _iter_parts(store, rdir, manifest, entry, keys)


#: parts read ahead of the one being handed out by loads and ``iter_parts`` (memory: at most this many parts in
#: flight besides the one in use); each is read by its own thread, so object-store latency overlaps
PREFETCH_PARTS = 4


def _read_part(store: Store, rdir: str, manifest: dict[str, Any], i: int, entry: dict[str, Any],
               keys: list[str] | None) -> ActivationCache:
    """Part ``i`` (in load order) of a run: its record, then its shards, verified."""
    rec = (embedded_record(store, rdir, manifest["records"][i]) if manifest["schema_version"] == 1
           else read_record(store, rdir, manifest_part_ids(manifest)[i]))
    if keys is not None:
        unknown = [k for k in keys if k not in rec["keys"] and k not in rec["info"]]
        if unknown:
            raise StorageError(f"run {entry['run_id']} has no keys {unknown}; it has {rec['keys']}.")
    # a partial load keeps the validity masks: which slots are real is part of every positional key
    wanted = None if keys is None else list(keys) + [k for k in MASK_KEYS if k in rec["keys"] and k not in keys]
    tensors = read_part_shards(store, f"{rdir}/shards", rec["shards"], wanted, rec.get("rows"))  # rows joined
    ordered = {k: tensors[k] for k in rec["keys"] if k in tensors}
    return ActivationCache.from_flat(ordered, rec["info"])


def _iter_parts(store: Store, rdir: str, manifest: dict[str, Any], entry: dict[str, Any],
                keys: list[str] | None, prefetch: int = PREFETCH_PARTS) -> Iterator[ActivationCache]:
    """Each part in load order, the next ``prefetch`` parts downloading (and verifying) in threads meanwhile."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    n = len(manifest["records"]) if manifest["schema_version"] == 1 else len(manifest_part_ids(manifest))
    if n == 0:
        return
    pool = ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="easyroutine-read")
    pending: deque = deque()
    try:
        nxt = 0
        while nxt < n and len(pending) < max(1, prefetch):
            pending.append(pool.submit(_read_part, store, rdir, manifest, nxt, entry, keys))
            nxt += 1
        while pending:
            part = pending.popleft().result()
            if nxt < n:
                pending.append(pool.submit(_read_part, store, rdir, manifest, nxt, entry, keys))
                nxt += 1
            yield part
    finally:  # a consumer that stops early: drop what was read ahead
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)


def load_run(store: Store, entry: dict[str, Any], keys: list[str] | None = None) -> tuple[ActivationCache, dict]:
    """Load a whole run (parts concatenated in order) and its metadata."""
    rdir = run_dir(store, entry)
    manifest = read_manifest(store, rdir)
    parts = list(_iter_parts(store, rdir, manifest, entry, keys))
    if not parts:
        raise StorageError(f"run {entry['run_id']} has no parts; there is nothing to load.")
    try:
        cache = parts[0] if len(parts) == 1 else ActivationCache.concat(parts)
    except ConfigError as exc:
        raise StorageError(f"run {entry['run_id']}: its parts cannot be joined into one cache ({exc})") from None
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
    manifest = read_manifest(store, src)
    meta = dict(manifest["metadata"], experiment_name=new_experiment)
    new_entry = dict(entry, experiment_name=new_experiment)
    dst = run_dir(store, new_entry)
    if store.is_local:
        import os

        os.makedirs(f"{dst}/shards", exist_ok=True)
        os.makedirs(f"{dst}/records", exist_ok=True)

    def copy(rel: str) -> None:
        try:
            store.fs.copy(f"{src}/{rel}", f"{dst}/{rel}")
        except OSError as exc:
            raise StorageError(f"cannot copy {store.url(src)}/{rel}: {exc}") from exc

    for rec in iter_records(store, src, manifest):  # one record at a time
        for sh in rec["shards"]:
            copy(f"shards/{sh['file']}")
        if manifest["schema_version"] >= 2:
            copy(layout.record_name(int(rec["part_id"])))  # the new marker references it
    write_bytes(store, f"{dst}/{layout.METADATA_FILE}", json.dumps(meta, sort_keys=True).encode())
    new_manifest = dict(manifest, metadata=meta)
    if not create_exclusive(store, f"{dst}/{layout.RUN_MARKER}", json.dumps(new_manifest).encode()):
        raise StorageError(f"run {entry['run_id']} already exists in experiment {new_experiment!r}.")
    fresh = entry_from_metadata(meta, new_manifest)
    catalog.add(fresh)
    remove_run(store, catalog, entry)
    return fresh
