"""The catalog: derived, rebuildable index of committed runs that lets queries skip reading every run.

* One small JSON entry per committed run at ``_catalog/<experiment>/<run_id>.json``, written right after the run
  marker. Entries are immutable and named by run id, so concurrent writers never read-modify-write a shared file
  and cannot lose each other's runs.
* The listing of ``_catalog/<experiment>/`` is authoritative. Entry contents are cached in memory and in an
  incremental snapshot under ``_catalog/_snapshots/<experiment>/`` (append-only segments, compacted rarely by one
  writer at a time: :mod:`.snapshots`); the snapshot is only a cache of contents (a stale or missing one costs
  time, never correctness).
* ``rebuild()`` rescans every run marker and rewrites the entries: the catalog is always derivable from the runs.
  It never removes the entry of a run whose marker exists (a run committed while it scanned included).
* Nothing read back is trusted as a path: an entry (or snapshot entry) whose experiment, run id or model name is
  not a valid name, or does not match where it was found, is skipped with a WARNING naming the file.
* A read error is never taken for "no such run": reads are retried (:func:`.fs.retrying`); an entry that still
  cannot be read is rebuilt from its run marker, and when that fails too the query raises StorageError.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import threading
import time
from typing import Any, Optional

from ..errors import MetadataError, StorageError
from . import layout, providers, snapshots
from .markers import read_manifest  # (not .runs: runs imports catalog, never the reverse)
from .fs import ObjectNotFoundError, Store, file_exists, list_names, read_bytes, remove, retrying, write_bytes

_LOG = logging.getLogger(__name__)

#: entries read one by one in a refresh beyond which a new snapshot is written
COMPACT_AFTER = 64
#: a local directory mtime is trusted to mean "unchanged" only when it is this much older than the listing
MTIME_MARGIN_NS = 2_000_000_000
_clock = time.monotonic  # (the clock of ``trust_s``; tests move it)


class Catalog:
    """Index of committed runs of one storage root. Thread-safe; a Ray actor can wrap one instance.

    ``trust_s`` > 0: an experiment whose listing ended less than ``trust_s`` seconds ago is not listed again (runs
    taken in by :meth:`note` or :meth:`add` are seen at once; others, committed by writers that bypass this
    instance, within ``trust_s`` plus the time of one listing). 0 (default): every query checks the listing."""

    def __init__(self, store: Store, trust_s: float = 0.0) -> None:
        self.store = store
        self.trust_s = trust_s
        self._lock = threading.Lock()
        self._cache: dict[str, dict[str, dict[str, Any]]] = {}  # experiment -> {file name: entry}
        self._snap_loaded: set[str] = set()
        self._segments: dict[str, dict[str, int]] = {}  # experiment -> {snapshot segment: entries} known
        # experiment -> (listed names, sorted entries, directory mtime before listing, listing time, _clock() then)
        self._listing: dict[str, tuple[set[str], list[dict[str, Any]], int | None, int, float]] = {}
        # experiment -> (the sorted entry list it was built from, {(field, subkey): {json value: entries}})
        self._index: dict[str, tuple[list[dict[str, Any]], dict[tuple[str, str | None], dict[str, list]]]] = {}
        self._warned: set[str] = set()  # files already warned about (one WARNING per file and cause)
        self._warn_lock = threading.Lock()

    # ------------------------------------------------------------------ paths
    def _dir(self, experiment: str) -> str:
        return self.store.path(layout.CATALOG_DIR, experiment)

    def _snapshot_path(self, experiment: str) -> str:
        return self.store.path(layout.CATALOG_DIR, layout.SNAPSHOT_DIR, f"{experiment}.json")

    # ------------------------------------------------------------------ API
    def experiments(self) -> list[str]:
        """Experiments that have catalog entries (directories whose name is not a valid experiment are skipped)."""
        names = retrying(lambda: list_names(self.store, self.store.path(layout.CATALOG_DIR)), "listing the catalog")
        out = []
        for n in sorted(names):
            if n.startswith("_") or n.startswith("."):
                continue
            try:
                out.append(layout.check_experiment(n))
            except MetadataError:
                _LOG.warning("catalog: skipping %s: not a valid experiment name",
                             self.store.url(self.store.path(layout.CATALOG_DIR, n)))
        return out

    def add(self, entry: dict[str, Any]) -> None:
        """Register a committed run (idempotent: the entry is named by its run id)."""
        exp = layout.check_experiment(entry["experiment_name"])
        run_id = layout.check_run_id(entry["run_id"])
        path = self.store.path(layout.CATALOG_DIR, exp, f"{run_id}.json")
        body = json.dumps(entry, sort_keys=True).encode()
        retrying(lambda: write_bytes(self.store, path, body), f"writing {self.store.url(path)}", write=True)
        with self._lock:
            self._cache.setdefault(exp, {})[f"{run_id}.json"] = entry
            self._listing.pop(exp, None)
        providers.mark_changed(self.store, exp)  # this process' next query through an index re-lists it

    def note(self, entry: dict[str, Any]) -> int:
        """Take a run whose entry is already in storage (written by its committer) into memory, in O(1) time.

        The next query needs no read of it: the cached listing, sorted entries and equality indexes are extended
        in place. Returns the number of runs of its experiment known in memory."""
        layout.check_entry(entry)
        exp, name = entry["experiment_name"], f"{entry['run_id']}.json"
        with self._lock:
            cache = self._cache.setdefault(exp, {})
            if name in cache:
                return len(cache)
            cache[name] = entry
            last = self._listing.get(exp)
            if last is not None:
                names, current = last[0], last[1]
                names.add(name)
                if current and _order(entry) < _order(current[-1]):
                    bisect.insort(current, entry, key=_order)
                else:
                    current.append(entry)
                state = self._index.get(exp)
                if state is not None and state[0] is current:
                    for (field, sub), table in state[1].items():
                        _index_into(table, [entry], field, sub, copy_lists=True)
            return len(cache)

    def find_run(self, run_id: str, experiment: Optional[str] = None) -> list[dict[str, Any]]:
        """The entries of run ``run_id`` (one, or none): one read per experiment searched, not one per run."""
        try:
            layout.check_run_id(run_id)
        except MetadataError:
            return []  # not a run id: no run has it
        exps = [layout.check_experiment(experiment)] if experiment is not None else self.experiments()
        name = f"{run_id}.json"
        found = []
        for exp in exps:
            with self._lock:
                entry = self._cache.get(exp, {}).get(name)
            if entry is None or not file_exists(self.store, self.store.path(layout.CATALOG_DIR, exp, name)):
                entry = self._read_entry(exp, name)
            if entry is not None:
                found.append(entry)
        return found

    def discard(self, experiment: str, run_id: str) -> None:
        """Drop a run's entry (used when a run is removed or moved)."""
        layout.check_experiment(experiment)
        layout.check_run_id(run_id)
        remove(self.store, self.store.path(layout.CATALOG_DIR, experiment, f"{run_id}.json"))
        with self._lock:
            self._cache.get(experiment, {}).pop(f"{run_id}.json", None)
            self._listing.pop(experiment, None)
        providers.mark_changed(self.store, experiment)

    def forget(self, experiment: Optional[str] = None) -> None:
        """Drop the listing of ``experiment`` (None: all) so the next query lists it again (``trust_s`` aside)."""
        with self._lock:
            for exp in list(self._listing) if experiment is None else [experiment]:
                self._listing.pop(exp, None)

    def entries(self, experiment: str | None = None) -> list[dict[str, Any]]:
        """Entries of one experiment (or all), sorted oldest first. Reads only entries not seen before."""
        exps = [layout.check_experiment(experiment)] if experiment is not None else self.experiments()
        if len(exps) == 1:
            return list(self._refresh(exps[0]))
        out: list[dict[str, Any]] = []
        for exp in exps:
            out.extend(self._refresh(exp))
        out.sort(key=_order)
        return out

    def lookup(self, experiment: str, field: str, value: Any,
               subkey: str | None = None) -> list[dict[str, Any]] | None:
        """Entries of ``experiment`` whose ``field`` (or ``field[subkey]``) == ``value`` (a str/number/None).

        Served from an equality index built on first use and extended as runs are added, so repeated queries on a
        large experiment cost O(matches), not O(runs). Returns None for values the index does not cover (lists,
        dicts): filter ``entries()`` then.
        """
        if _ikey(value) is _UNINDEXABLE:
            return None
        current = self._refresh(layout.check_experiment(experiment))
        with self._lock:
            state = self._index.get(experiment)
            if state is None or state[0] is not current:
                state = (current, {})
                self._index[experiment] = state
            table = state[1].get((field, subkey))
            if table is None:  # built under the lock: note() may extend `current` meanwhile
                table = {}
                with snapshots.gc_paused():  # (10^5 fresh lists: no full collections over them meanwhile)
                    _index_into(table, current, field, subkey)
                state[1][(field, subkey)] = table
        found = table.get(_ikey(value), [])
        return sorted(found, key=_order) if len(found) > 1 else list(found)

    def rebuild(self) -> int:
        """Rescan every run marker in storage and rewrite the catalog from them; returns the number of runs indexed.

        Safe beside concurrent commits and removals: an entry is removed only when its run has no marker when the
        entry is looked at (a run committed after the scan keeps the entry its commit wrote), and an entry written
        for a run removed meanwhile is taken back. A marker that cannot be read keeps its entry (WARNING); one
        whose names are invalid or do not match its directory is skipped (WARNING).
        """
        markers = self._glob(self.store.path("*", "*", "*", layout.RUN_MARKER))
        found: dict[str, set[str]] = {}
        n = 0
        root = self.store.root.rstrip("/")
        for m in markers:
            rel = m[len(root) + 1:] if m.startswith(root + "/") else m
            parts = rel.split("/")
            if rel.startswith("_") or len(parts) != 4:
                continue
            exp, slug, run_id = parts[:3]
            try:
                layout.check_experiment(exp)
                layout.check_run_id(run_id)
                entry = self._marker_entry(exp, slug, run_id)
            except ObjectNotFoundError:
                continue  # removed since the scan
            except MetadataError as exc:
                _LOG.warning("catalog rebuild: skipping the run marker %s: %s", self.store.url(m), exc)
                continue
            except StorageError as exc:
                _LOG.warning("catalog rebuild: cannot read the run marker %s (%s); its catalog entry is kept",
                             self.store.url(m), exc)
                found.setdefault(exp, set()).add(f"{run_id}.json")
                continue
            self.add(entry)
            if not file_exists(self.store, m):  # removed while this rebuild ran (remove_run drops the entry first)
                self.discard(exp, run_id)
                continue
            found.setdefault(exp, set()).add(f"{run_id}.json")
            n += 1
        for exp in self.experiments():
            for name in list_names(self.store, self._dir(exp)):
                if not name.endswith(".json") or name in found.get(exp, set()):
                    continue
                run_id = name[: -len(".json")]
                try:
                    if self._marker_paths(exp, layout.check_run_id(run_id)):
                        continue  # committed after the scan: its commit wrote this entry
                except MetadataError:
                    pass  # not a run id: not an entry this package writes
                remove(self.store, self.store.path(layout.CATALOG_DIR, exp, name))
        remove(self.store, self.store.path(layout.CATALOG_DIR, layout.SNAPSHOT_DIR), recursive=True)
        with self._lock:
            self._cache.clear()
            self._snap_loaded.clear()
            self._segments.clear()
            self._listing.clear()
        return n

    # ------------------------------------------------------------------ internals
    def _glob(self, pattern: str) -> list[str]:
        def scan() -> list[str]:
            try:
                return sorted(self.store.fs.glob(pattern))
            except FileNotFoundError:
                return []
            except OSError as exc:
                raise StorageError(f"cannot scan {self.store.url(pattern)}: {exc}") from exc

        return retrying(scan, f"scanning {self.store.url(pattern)}")

    def _marker_paths(self, exp: str, run_id: str) -> list[str]:
        """The run markers of run ``run_id`` in experiment ``exp`` (one, or none when it is not committed)."""
        return self._glob(self.store.path(exp, "*", run_id, layout.RUN_MARKER))

    def _marker_entry(self, exp: str, slug: str, run_id: str) -> dict[str, Any]:
        """The entry of a run, from its marker; MetadataError when its names do not match its directory."""
        rdir = self.store.path(exp, slug, run_id)
        manifest = retrying(lambda: read_manifest(self.store, rdir), f"reading {self.store.url(rdir)}/_SUCCESS")
        entry = entry_from_metadata(manifest["metadata"], manifest)
        problem = _entry_problem(entry, exp, run_id, slug)
        if problem:
            raise MetadataError(problem)
        return entry

    def _read_entry(self, exp: str, name: str) -> Optional[dict[str, Any]]:
        """One entry file, validated; None when it is gone or is not a valid entry (WARNING naming the file).

        A read that keeps failing falls back to the run marker; StorageError when that cannot be read either.
        """
        path = self.store.path(layout.CATALOG_DIR, exp, name)
        where = self.store.url(path)
        run_id = name[: -len(".json")]
        try:
            layout.check_run_id(run_id)
        except MetadataError:
            self._warn(where, "catalog: skipping %s: its name is not '<run id>.json'", where)
            return None
        try:
            raw = retrying(lambda: read_bytes(self.store, path), f"reading {where}")
            entry = json.loads(raw)
        except ObjectNotFoundError:
            return None  # removed between listing and reading
        except (StorageError, ValueError) as exc:
            return self._fallback(exp, run_id, where, exc)
        problem = _entry_problem(entry, exp, run_id)
        if problem:
            self._warn(where + problem, "catalog: skipping %s: %s", where, problem)
            return None
        return entry

    def _warn(self, key: str, msg: str, *args: Any) -> None:
        with self._warn_lock:  # (not self._lock: snapshots are read while it is held)
            first = key not in self._warned
            self._warned.add(key)
        (_LOG.warning if first else _LOG.debug)(msg, *args)

    def _fallback(self, exp: str, run_id: str, where: str, exc: Exception) -> Optional[dict[str, Any]]:
        """The entry of a run whose catalog entry cannot be read, from its run marker."""
        try:
            markers = self._marker_paths(exp, run_id)
            if len(markers) == 1:
                slug = markers[0].rsplit("/", 3)[-3]
                entry = self._marker_entry(exp, slug, run_id)
                _LOG.warning("catalog entry %s cannot be read (%s); using its run marker", where, exc)
                return entry
        except (StorageError, MetadataError) as marker_exc:
            raise StorageError(f"catalog entry {where} cannot be read ({exc}), nor can its run marker "
                               f"({marker_exc}); the query would miss run {run_id}. Retry, or check the storage "
                               "(ActivationLoader.rebuild_catalog() rewrites the catalog).") from None
        if markers:
            raise StorageError(f"catalog entry {where} cannot be read ({exc}) and run {run_id} has several markers "
                               f"{markers}; the storage is damaged.")
        _LOG.warning("catalog: skipping %s: it cannot be read (%s) and run %s has no run marker (not committed, "
                     "or removed)", where, exc, run_id)
        return None

    def _dir_mtime(self, exp: str) -> int | None:
        if not self.store.is_local:
            return None
        try:
            return os.stat(self._dir(exp)).st_mtime_ns
        except OSError:
            return None

    def _refresh(self, exp: str) -> list[dict[str, Any]]:
        with self._lock:
            last = self._listing.get(exp)
            if last is not None and _clock() - last[4] < self.trust_s:
                return last[1]  # listed moments ago: trusted for trust_s seconds
        mtime = self._dir_mtime(exp)
        with self._lock:
            last = self._listing.get(exp)
            # Local disk: the directory's mtime changes whenever an entry is added, replaced or removed. It is
            # trusted only when it is older than the listing by MTIME_MARGIN_NS, so a change in the same clock
            # tick as the listed one cannot go unseen.
            if last is not None and mtime is not None and last[2] == mtime and last[3] - mtime > MTIME_MARGIN_NS:
                return last[1]
        listed_at = time.time_ns()
        names = set(retrying(lambda: list_names(self.store, self._dir(exp)),
                             f"listing {self.store.url(self._dir(exp))}"))
        listed_clock = _clock()  # trusted from its end: a listing longer than trust_s is not redone at once
        with self._lock:
            last = self._listing.get(exp)
            if last is not None and last[0] == names:
                self._listing[exp] = (names, last[1], mtime, listed_at, listed_clock)
                return last[1]  # directory unchanged since the last query: reuse the sorted entries
            cache = self._cache.setdefault(exp, {})
            wanted = [n for n in names if n.endswith(".json") and ".tmp-" not in n]
            missing = [n for n in wanted if n not in cache]
            if missing and exp not in self._snap_loaded:
                self._snap_loaded.add(exp)
                for name, entry in self._read_snapshot(exp).items():
                    cache.setdefault(name, entry)
                missing = [n for n in wanted if n not in cache]
        fresh: dict[str, dict[str, Any]] = {}
        skipped: set[str] = set()  # removed since the listing, or not a valid entry (warned)
        for name in missing:
            entry = self._read_entry(exp, name)  # retries; raises rather than drop a run it cannot read
            if entry is None:
                skipped.add(name)
            else:
                fresh[name] = entry
        with snapshots.gc_paused(), self._lock:  # (sorting 10^5 entries with the cyclic GC on costs twice as much)
            if skipped:
                wanted = [n for n in wanted if n not in skipped]
                missing = [n for n in missing if n not in skipped]
            cache.update(fresh)
            prev = last[1] if last is not None else None
            # every listed name known and nothing else cached => the listing is exactly prev + fresh
            grew = len(fresh) == len(missing) and len(cache) == len(wanted) == len(prev or ()) + len(fresh)
            if prev is not None and grew:
                # only additions since the last listing (the usual case): extend instead of re-sorting everything
                new = sorted(fresh.values(), key=_order)
                if new and prev and _order(new[0]) < _order(prev[-1]):
                    current = sorted(prev + new, key=_order)
                else:
                    current = prev + new
                state = self._index.get(exp)
                if state is not None and state[0] is prev:
                    tables = {}
                    for (field, sub), table in state[1].items():
                        grown = dict(table)
                        _index_into(grown, new, field, sub, copy_lists=True)
                        tables[(field, sub)] = grown
                    self._index[exp] = (current, tables)
            else:
                listed = set(wanted)
                for gone in [n for n in cache if n not in listed]:
                    del cache[gone]
                current = sorted(cache.values(), key=_order)  # (listed names only; snapshot order: ~linear)
            if len(current) == len(wanted):  # every listed entry is known: safe to reuse for this listing
                self._listing[exp] = (names, current, mtime, listed_at, listed_clock)
            snapshot = fresh if len(fresh) >= COMPACT_AFTER else None
        if snapshot is not None:
            self._write_snapshot(exp, snapshot)
        return current

    def _valid_snapshot_entry(self, name: Any, entry: Any, where: str, exp: str) -> bool:
        run_id = name[: -len(".json")] if isinstance(name, str) and name.endswith(".json") else None
        problem = _entry_problem(entry, exp, run_id) if run_id else f"{name!r} is not '<run id>.json'"
        if problem:
            self._warn(f"{where}:{name}:{problem}", "catalog snapshot %s: skipping entry %r: %s", where, name, problem)
        return not problem

    def _read_snapshot(self, exp: str) -> dict[str, dict[str, Any]]:
        """The snapshot's entries that are valid (others skipped with a WARNING naming the snapshot file)."""
        entries, sizes = snapshots.read(self.store, exp, lambda n, e, w: self._valid_snapshot_entry(n, e, w, exp))
        self._segments[exp] = sizes  # (called with self._lock held)
        return entries

    def _write_snapshot(self, exp: str, fresh: dict[str, dict[str, Any]]) -> None:
        """Append the entries read one by one as a new segment; compact when there are too many segments."""
        name = snapshots.append(self.store, exp, dict(sorted(fresh.items(), key=lambda kv: _order(kv[1]))))
        with self._lock:
            sizes = dict(self._segments.setdefault(exp, {}))
            if name is not None:
                sizes[name] = len(fresh)
                self._segments[exp][name] = len(fresh)
        if snapshots.plan(sizes):
            done = snapshots.compact(self.store, exp, sizes,
                                     lambda n, e, w: self._valid_snapshot_entry(n, e, w, exp))
            if done is not None:
                with self._lock:
                    self._segments[exp] = done


_UNINDEXABLE = object()


def _order(entry: dict[str, Any]) -> tuple[float, str]:
    return entry.get("saved_at_unix", 0.0), entry["run_id"]


def _entry_problem(entry: Any, exp: str, run_id: Optional[str], slug: Optional[str] = None) -> Optional[str]:
    """Why ``entry`` (read back from storage at ``exp``/``run_id``, under model dir ``slug``) cannot be used, or None.

    Its names must pass the checks names pass when written, and match where the entry was found."""
    try:
        layout.check_entry(entry)
    except MetadataError as exc:
        return str(exc)
    if entry["experiment_name"] != exp or entry["run_id"] != run_id:
        return (f"it describes run {entry['run_id']!r} of experiment {entry['experiment_name']!r} but was found as "
                f"run {run_id!r} of experiment {exp!r}")
    if slug is not None and layout.model_slug(entry.get("model_name")) != slug:
        return f"its model {entry.get('model_name')!r} does not match the model directory {slug!r}"
    return None


def _ikey(value: Any) -> Any:
    """Index key: scalars index as themselves (so 1 == 1.0 == True, like the query's ``==``)."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    return _UNINDEXABLE


def _index_into(table: dict[Any, list], entries: list[dict[str, Any]], field: str, subkey: str | None,
                copy_lists: bool = False) -> None:
    for e in entries:
        v = e.get(field)
        if subkey is not None:
            if not isinstance(v, dict) or subkey not in v:
                continue
            v = v[subkey]
        k = _ikey(v)
        if k is _UNINDEXABLE:
            continue  # a list/dict never equals a scalar query value
        if copy_lists:
            table[k] = [*table.get(k, ()), e]
        else:
            table.setdefault(k, []).append(e)


def entry_from_metadata(metadata: dict[str, Any], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The catalog entry of a run: its query-relevant metadata plus where it lives."""
    skip = {"model_config"}
    entry = {k: v for k, v in metadata.items() if k not in skip}
    if manifest is not None:
        if "parts" in manifest:  # schema 2: part ids only; n_keys when the committer knew the records
            entry["n_parts"] = len(manifest["parts"])
            for count in ("n_keys", "n_rows"):
                if manifest.get(count) is not None:
                    entry[count] = int(manifest[count])
        else:  # schema 1: every record embedded
            entry["n_parts"] = len(manifest.get("records", []))
            entry["n_keys"] = len({k for r in manifest.get("records", []) for k in r.get("keys", [])})
            entry["n_rows"] = sum(int(r.get("rows", 0)) for r in manifest.get("records", []))
    return entry
