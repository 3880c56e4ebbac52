"""What a run's directory holds beyond its committed data: orphans and strays, listed and (on request) removed.

Every attempt at a part writes shards under names of its own, and the part's record names the files it commits
(:mod:`.runs`). A losing or crashed attempt therefore leaves files that no record references:

* **orphans**: shard files of a part whose record exists but does not name them (a losing attempt that died before
  removing its shards), and, in a committed run, every shard no record of the run references. Never read; always
  safe to remove (a record is never rewritten, so nothing can come to reference them).
* **uncommitted**: shard files of a part without a record in a run that is not committed yet: an attempt that
  crashed, or one still running. Removed only with ``include_uncommitted=True`` (when no writer is live).
* **strays**: temp files of interrupted writes and names this layout never writes. In a committed run they are
  garbage; in an uncommitted one they may be a write in progress (``include_uncommitted=True`` again).
* **unreferenced records**: records of a committed run that its marker does not list (a commit of a subset).
* **invalid records**: records that cannot be read or fail validation. Reported, never removed, and their part's
  shards are left alone: a damaged run is for a person to look at.

The CLI's ``verify`` command reports :func:`scan_run` for each run and calls :func:`remove_garbage`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from ..errors import MetadataError, StorageError
from . import layout
from .fs import Store, file_exists, list_names, remove
from .runs import _RECORD_RE, embedded_record, manifest_part_ids, read_manifest, read_record

_LOG = logging.getLogger(__name__)
_TOP_LEVEL = {layout.METADATA_FILE, layout.RUN_MARKER, "shards", "records",
              "statistics.json", "statistics.safetensors"}  # run statistics (storage/stats.py)


@dataclass(frozen=True)
class RunScan:
    """What :func:`scan_run` found in one run directory. Paths are relative to the run directory."""

    run_dir: str
    committed: bool
    parts: tuple[int, ...]
    orphans: tuple[str, ...]
    uncommitted: tuple[str, ...]
    strays: tuple[str, ...]
    unreferenced_records: tuple[str, ...]
    invalid_records: tuple[str, ...]

    def garbage(self, include_uncommitted: bool = False) -> tuple[str, ...]:
        """The paths :func:`remove_garbage` removes with the same flag."""
        out = [*self.orphans, *self.unreferenced_records]
        if self.committed or include_uncommitted:
            out += [*self.uncommitted, *self.strays]
        return tuple(out)

    @property
    def clean(self) -> bool:
        """Nothing but committed data (and, in an uncommitted run, nothing but resumable state)."""
        return not (self.orphans or self.uncommitted or self.strays or self.unreferenced_records
                    or self.invalid_records)


def scan_run(store: Store, run_dir: str) -> RunScan:
    """List the orphans, uncommitted files, strays and bad records of the run in ``run_dir`` (a path in ``store``,
    e.g. ``runs.run_dir(store, entry)``). Reads the marker and the records; never a shard."""
    committed = file_exists(store, f"{run_dir}/{layout.RUN_MARKER}")
    record_names = list_names(store, f"{run_dir}/records")
    strays = [n for n in list_names(store, run_dir) if n not in _TOP_LEVEL]
    strays += [f"records/{n}" for n in record_names if not _RECORD_RE.match(n)]
    on_disk = sorted(int(m.group(1)) for m in map(_RECORD_RE.match, record_names) if m is not None)
    manifest = read_manifest(store, run_dir) if committed else None
    counting = manifest_part_ids(manifest) if manifest is not None else on_disk
    unreferenced = [layout.record_name(p) for p in on_disk if p not in set(counting)]
    referenced: set[str] = set()
    invalid: list[str] = []
    unknown: set[int] = set()  # parts whose record is damaged: their shards are left alone
    embedded = manifest["records"] if manifest is not None and manifest["schema_version"] == 1 else None
    for i, pid in enumerate(counting):
        try:
            if embedded is not None:
                rec = embedded_record(store, run_dir, embedded[i])
            else:
                rec = read_record(store, run_dir, pid)
        except StorageError as exc:
            _LOG.warning("run %s: part %d has a bad record (%s)", store.url(run_dir), pid, exc)
            invalid.append(layout.record_name(pid))
            unknown.add(pid)
            continue
        referenced.update(sh["file"] for sh in rec["shards"])
    with_record = set(counting)
    orphans, uncommitted = [], []
    for name in list_names(store, f"{run_dir}/shards"):
        try:
            layout.check_shard_file(name)
        except MetadataError:
            strays.append(f"shards/{name}")  # temp files of interrupted writes, foreign names
            continue
        pid = int(name[5:10])
        if name in referenced or pid in unknown:
            continue
        if pid in with_record or committed:
            orphans.append(f"shards/{name}")
        else:
            uncommitted.append(f"shards/{name}")
    return RunScan(store.url(run_dir), committed, tuple(counting), tuple(sorted(orphans)), tuple(sorted(uncommitted)),
                   tuple(sorted(strays)), tuple(unreferenced), tuple(invalid))


def remove_garbage(store: Store, run_dir: str, scan: RunScan, include_uncommitted: bool = False) -> list[str]:
    """Remove ``scan.garbage(include_uncommitted)`` from the run in ``run_dir``; return the paths removed.

    Orphans and unreferenced records are always safe to remove. ``include_uncommitted=True`` also removes the
    uncommitted shards and strays of a run that is not committed: only when no attempt at it is still running.
    """
    removed = []
    for rel in scan.garbage(include_uncommitted):
        name = rel.rsplit("/", 1)[-1]
        if name in ("", ".", "..") or rel.count("/") > 1:
            continue  # names come from listings of the run directory; anything else is never a path here
        remove(store, f"{run_dir}/{rel}", recursive=True)
        removed.append(rel)
    return removed


def iter_run_dirs(store: Store, experiment: Optional[str] = None) -> Iterator[tuple[dict[str, Any], str]]:
    """Every run directory under the root (begun runs, committed or not) as ``({"experiment_name", "model_slug",
    "run_id"}, path)``; names that are not valid run layout names are skipped with a warning."""
    exps = [layout.check_experiment(experiment)] if experiment is not None else [
        n for n in list_names(store, store.root) if not n.startswith(("_", "."))]
    for exp in sorted(exps):
        try:
            layout.check_experiment(exp)
        except MetadataError:
            _LOG.warning("skipping %s: not an experiment name", store.url(store.path(exp)))
            continue
        for slug in sorted(list_names(store, store.path(exp))):
            for rid in sorted(list_names(store, store.path(exp, slug))):
                try:
                    layout.check_run_id(rid)
                    if slug in (".", "..") or "/" in slug:
                        raise MetadataError(f"{slug!r} is not a model directory")
                except MetadataError:
                    _LOG.warning("skipping %s: not a run directory", store.url(store.path(exp, slug, rid)))
                    continue
                yield {"experiment_name": exp, "model_slug": slug, "run_id": rid}, store.path(exp, slug, rid)
