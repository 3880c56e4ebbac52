"""The catalog: derived, rebuildable index of committed runs that lets queries skip reading every run.

* One small JSON entry per committed run at ``_catalog/<experiment>/<run_id>.json``, written right after the run
  marker. Entries are immutable and named by run id, so concurrent writers never read-modify-write a shared file
  and cannot lose each other's runs.
* The listing of ``_catalog/<experiment>/`` is authoritative. Entry contents are cached in memory and in a
  compacted snapshot ``_catalog/_snapshots/<experiment>.json``; the snapshot is only a cache of contents (a stale or
  missing one costs time, never correctness).
* ``rebuild()`` rescans every run marker and rewrites the entries: the catalog is always derivable from the runs.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from ..errors import StorageError
from . import layout
from .fs import Store, list_names, read_bytes, remove, write_bytes

#: entries read one by one in a refresh beyond which a new snapshot is written
COMPACT_AFTER = 64
#: a local directory mtime is trusted to mean "unchanged" only when it is this much older than the listing
MTIME_MARGIN_NS = 2_000_000_000


class Catalog:
    """Index of committed runs of one storage root. Thread-safe; a Ray actor can wrap one instance."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._cache: dict[str, dict[str, dict[str, Any]]] = {}  # experiment -> {file name: entry}
        self._snap_loaded: set[str] = set()
        # experiment -> (listed names, sorted entries, directory mtime before listing, listing time)
        self._listing: dict[str, tuple[list[str], list[dict[str, Any]], int | None, int]] = {}
        # experiment -> (the sorted entry list it was built from, {(field, subkey): {json value: entries}})
        self._index: dict[str, tuple[list[dict[str, Any]], dict[tuple[str, str | None], dict[str, list]]]] = {}

    # ------------------------------------------------------------------ paths
    def _dir(self, experiment: str) -> str:
        return self.store.path(layout.CATALOG_DIR, experiment)

    def _snapshot_path(self, experiment: str) -> str:
        return self.store.path(layout.CATALOG_DIR, layout.SNAPSHOT_DIR, f"{experiment}.json")

    # ------------------------------------------------------------------ API
    def experiments(self) -> list[str]:
        """Experiments that have catalog entries."""
        names = list_names(self.store, self.store.path(layout.CATALOG_DIR))
        return sorted(n for n in names if not n.startswith("_") and not n.startswith("."))

    def add(self, entry: dict[str, Any]) -> None:
        """Register a committed run (idempotent: the entry is named by its run id)."""
        exp = layout.check_experiment(entry["experiment_name"])
        run_id = layout.check_run_id(entry["run_id"])
        write_bytes(self.store, self.store.path(layout.CATALOG_DIR, exp, f"{run_id}.json"),
                    json.dumps(entry, sort_keys=True).encode())
        with self._lock:
            self._cache.setdefault(exp, {})[f"{run_id}.json"] = entry
            self._listing.pop(exp, None)

    def discard(self, experiment: str, run_id: str) -> None:
        """Drop a run's entry (used when a run is removed or moved)."""
        remove(self.store, self.store.path(layout.CATALOG_DIR, experiment, f"{run_id}.json"))
        with self._lock:
            self._cache.get(experiment, {}).pop(f"{run_id}.json", None)
            self._listing.pop(experiment, None)

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
        if table is None:
            table = {}
            _index_into(table, current, field, subkey)
            with self._lock:
                state[1][(field, subkey)] = table
        found = table.get(_ikey(value), [])
        return sorted(found, key=_order) if len(found) > 1 else list(found)

    def rebuild(self) -> int:
        """Rescan every run marker in storage and rewrite the catalog from them; returns the number of runs."""
        from .runs import read_manifest  # local import: runs imports catalog

        pattern = self.store.path("*", "*", "*", layout.RUN_MARKER)
        try:
            markers = sorted(self.store.fs.glob(pattern))
        except OSError as exc:
            raise StorageError(f"cannot scan {self.store.url(self.store.root)}: {exc}") from exc
        found: dict[str, set[str]] = {}
        for m in markers:
            rel = m[len(self.store.root.rstrip("/")) + 1:] if m.startswith(self.store.root.rstrip("/")) else m
            if rel.startswith("_"):
                continue
            manifest = read_manifest(self.store, m.rsplit("/", 1)[0])  # the marker only, no part record
            entry = entry_from_metadata(manifest["metadata"], manifest)
            self.add(entry)
            found.setdefault(entry["experiment_name"], set()).add(f"{entry['run_id']}.json")
        for exp in self.experiments():
            for name in list_names(self.store, self._dir(exp)):
                if name.endswith(".json") and name not in found.get(exp, set()):
                    remove(self.store, self.store.path(layout.CATALOG_DIR, exp, name))
        remove(self.store, self.store.path(layout.CATALOG_DIR, layout.SNAPSHOT_DIR), recursive=True)
        with self._lock:
            self._cache.clear()
            self._snap_loaded.clear()
            self._listing.clear()
        return len(markers)

    # ------------------------------------------------------------------ internals
    def _dir_mtime(self, exp: str) -> int | None:
        if not self.store.is_local:
            return None
        try:
            return os.stat(self._dir(exp)).st_mtime_ns
        except OSError:
            return None

    def _refresh(self, exp: str) -> list[dict[str, Any]]:
        mtime = self._dir_mtime(exp)
        with self._lock:
            last = self._listing.get(exp)
            # Local disk: the directory's mtime changes whenever an entry is added, replaced or removed. It is
            # trusted only when it is older than the listing by MTIME_MARGIN_NS, so a change in the same clock
            # tick as the listed one cannot go unseen.
            if last is not None and mtime is not None and last[2] == mtime and last[3] - mtime > MTIME_MARGIN_NS:
                return last[1]
        listed_at = time.time_ns()
        names = list_names(self.store, self._dir(exp))
        with self._lock:
            if last is not None and last[0] == names:
                self._listing[exp] = (names, last[1], mtime, listed_at)
                return last[1]  # directory unchanged since the last query: reuse the sorted entries
            last = self._listing.get(exp)
            cache = self._cache.setdefault(exp, {})
            wanted = [n for n in names if n.endswith(".json") and ".tmp-" not in n]
            missing = [n for n in wanted if n not in cache]
            if missing and exp not in self._snap_loaded:
                self._snap_loaded.add(exp)
                for name, entry in self._read_snapshot(exp).items():
                    cache.setdefault(name, entry)
                missing = [n for n in wanted if n not in cache]
        fresh: dict[str, dict[str, Any]] = {}
        for name in missing:
            try:
                fresh[name] = json.loads(read_bytes(self.store, self.store.path(layout.CATALOG_DIR, exp, name)))
            except StorageError:
                continue  # removed between listing and reading
            except ValueError:
                continue  # entries are written whole; an unreadable foreign file is not a run
        with self._lock:
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
                current = sorted((cache[n] for n in wanted if n in cache), key=_order)
            if len(current) == len(wanted):  # every listed entry is known: safe to reuse for this listing
                self._listing[exp] = (names, current, mtime, listed_at)
            snapshot = dict(cache) if len(fresh) >= COMPACT_AFTER else None
        if snapshot is not None:
            self._write_snapshot(exp, snapshot)
        return current

    def _read_snapshot(self, exp: str) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(read_bytes(self.store, self._snapshot_path(exp)))
            return dict(data.get("entries", {}))
        except (StorageError, ValueError, AttributeError):
            return {}  # no snapshot (or a damaged one): entries are read individually

    def _write_snapshot(self, exp: str, entries: dict[str, dict[str, Any]]) -> None:
        try:
            write_bytes(self.store, self._snapshot_path(exp), json.dumps({"entries": entries}).encode())
        except StorageError:
            pass  # the snapshot is a cache; failing to write it costs speed only


_UNINDEXABLE = object()


def _order(entry: dict[str, Any]) -> tuple[float, str]:
    return entry.get("saved_at_unix", 0.0), entry["run_id"]


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
