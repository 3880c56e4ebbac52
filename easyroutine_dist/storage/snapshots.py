"""Incremental catalog snapshots: append-only segments, compacted rarely by one writer at a time.

A snapshot only caches the *contents* of catalog entries (the listing of ``_catalog/<experiment>/`` decides which
runs exist), so a stale, missing or duplicated segment costs time, never correctness.

* ``_catalog/_snapshots/<experiment>/seg-<unix ns>-<random>.json``: one JSON document of column arrays (format 2,
  :func:`encode`): ``{"format": 2, "groups": [{"keys": [k...], "names": ["<run id>.json"...], "columns": [[v...]
  per key]}]}``, entries grouped by their key list (so each entry comes back exactly, key order included). A
  reader that had to read at least ``COMPACT_AFTER`` entries one by one appends one segment holding *only those*
  entries (each segment is written whole, atomically), instead of rewriting the whole snapshot. Segments written
  before format 2 (``{"entries": {"<run id>.json": entry}}``) are still read.
* Names read back are checked before any entry is used (the rules of :mod:`.layout`): a whole group at once
  (:func:`_group_ok`: one regex pass over the run ids, each distinct model name checked once); a group that fails
  is checked entry by entry by the caller's validator, which warns about and skips the bad ones.
* When more than :data:`MAX_SEGMENTS` segments exist, the writer that noticed takes the compaction lock
  ``_compacting`` (created exclusively; one older than :data:`LOCK_STALE_S` is taken over), writes one merged
  segment, removes the segments it merged and releases the lock. It merges every segment but the largest, or all of
  them when that merge would be at least as large as the largest: a whole rewrite happens only when the snapshot
  has doubled since the last one, so each entry is rewritten O(log runs) times over the archive's life.
* ``_catalog/_snapshots/<experiment>.json`` (one whole file, written before this format) is still read.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
import uuid
from typing import Any, Callable, Iterator, Optional

from . import layout
from .fs import Store, create_exclusive, list_names, read_bytes, remove, write_bytes

#: the segment format :func:`append` writes (column arrays); format 1 (``{"entries": {...}}``) is still read
FORMAT = 2
#: segments beyond which the next writer compacts
MAX_SEGMENTS = 16
#: seconds after which a compaction lock is considered abandoned (its holder died)
LOCK_STALE_S = 300.0
LOCK_NAME = "_compacting"

#: validator(name, entry, where) -> True when the entry may be used (it warns about those it refuses)
Validator = Callable[[Any, Any, str], bool]


def segment_dir(store: Store, exp: str) -> str:
    return store.path(layout.CATALOG_DIR, layout.SNAPSHOT_DIR, exp)


def legacy_path(store: Store, exp: str) -> str:
    return store.path(layout.CATALOG_DIR, layout.SNAPSHOT_DIR, f"{exp}.json")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a snapshot is parsed: its ~10^5 fresh containers would trigger full
    collections over them (about half the parse time at 100k runs); they hold no cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def encode(entries: dict[str, dict[str, Any]]) -> bytes:
    """A segment's bytes (format 2): ``entries`` ({"<run id>.json": entry}) as column arrays, grouped by key list."""
    groups: dict[tuple[str, ...], tuple[list[str], list[dict[str, Any]]]] = {}
    for name, entry in entries.items():
        names, members = groups.setdefault(tuple(entry), ([], []))
        names.append(name)
        members.append(entry)
    return json.dumps({"format": FORMAT, "groups": [
        {"keys": list(keys), "names": names, "columns": [[e[k] for e in members] for k in keys]}
        for keys, (names, members) in groups.items()]}, separators=(",", ":")).encode()


def _groups(doc: Any) -> list[tuple[list[Any], list[Any], list[list[Any]]]]:
    """(names, keys, columns) of each group of a parsed segment, format 2 or 1; ValueError when it is neither."""
    if doc.get("format") == FORMAT:
        out = []
        for g in doc["groups"]:
            names, keys, columns = g["names"], g["keys"], g["columns"]
            if not (isinstance(names, list) and isinstance(keys, list) and isinstance(columns, list)
                    and len(keys) == len(columns) and all(isinstance(c, list) and len(c) == len(names)
                                                          for c in columns)):
                raise ValueError("malformed column group")
            out.append((names, keys, columns))
        return out
    if "format" in doc:
        raise ValueError(f"unknown snapshot format {doc['format']!r}")
    entries = dict(doc.get("entries", {}))
    return [(list(entries), [None], [list(entries.values())])]  # format 1: one column of whole entries


def _group_ok(exp: str, names: list[Any], keys: list[Any], columns: list[list[Any]]) -> bool:
    """True when every entry of a group passes what the per-entry validator checks (layout.check_entry, and the
    names match ``exp`` and the file name), decided column-wise; False: check them one by one."""
    try:
        layout.check_experiment(exp)
        if keys == [None]:  # format 1: whole entries
            members = columns[0]
            if not all(type(e) is dict for e in members):
                return False
            run_ids = [e.get("run_id") for e in members]
            exps = [e.get("experiment_name") for e in members]
            models = {e.get("model_name") for e in members}
        else:
            col = dict(zip(keys, columns))
            run_ids, exps = col["run_id"], col["experiment_name"]
            models = set(col.get("model_name", [None]))
        if exps.count(exp) != len(exps) or not all(type(n) is str and n.endswith(".json") for n in names):
            return False
        if [n[:-5] for n in names] != run_ids or not layout.all_run_ids(run_ids):
            return False
        for m in models:  # a handful of distinct models, each checked once
            layout.model_slug(m)
    except Exception:  # noqa: BLE001 - missing column, unhashable or invalid name: the per-entry check decides
        return False
    return True


def _read_one(store: Store, path: str, valid: Validator, exp: str) -> Optional[dict[str, dict[str, Any]]]:
    """The usable entries of one segment file (None when it cannot be read or parsed: it is only a cache)."""
    where = store.url(path)
    try:
        raw = read_bytes(store, path)
        with gc_paused():
            out: dict[str, dict[str, Any]] = {}
            for names, keys, columns in _groups(json.loads(raw)):
                ok = _group_ok(exp, names, keys, columns)
                members = (columns[0] if keys == [None] else [dict(zip(keys, row)) for row in zip(*columns)]
                           if keys else [{} for _ in names])
                if ok:
                    out.update(zip(names, members))
                else:
                    out.update((n, e) for n, e in zip(names, members) if valid(n, e, where))
            return out
    except Exception:  # noqa: BLE001 - a cache: skip it (its entries are read one by one)
        return None


def read(store: Store, exp: str, valid: Validator) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """(valid cached entries by file name, {segment name: entries in it}) of one experiment's snapshot."""
    out: dict[str, dict[str, Any]] = {}
    legacy = _read_one(store, legacy_path(store, exp), valid, exp)
    if legacy:
        out.update(legacy)
    sizes: dict[str, int] = {}
    try:
        names = sorted(n for n in list_names(store, segment_dir(store, exp))
                       if n.startswith("seg-") and n.endswith(".json"))
    except Exception:  # noqa: BLE001 - the snapshot is a cache; entries are read one by one then
        return out, sizes
    for name in names:
        seg = _read_one(store, store.path(layout.CATALOG_DIR, layout.SNAPSHOT_DIR, exp, name), valid, exp)
        if seg is not None:
            out.update(seg)
            sizes[name] = len(seg)
    return out, sizes


def append(store: Store, exp: str, entries: dict[str, dict[str, Any]]) -> Optional[str]:
    """Write one new segment holding ``entries``; its name, or None when it could not be written (a cache)."""
    name = f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
    try:
        write_bytes(store, store.path(layout.CATALOG_DIR, layout.SNAPSHOT_DIR, exp, name), encode(entries))
    except Exception:  # noqa: BLE001 - failing to write a cache costs speed only
        return None
    return name


def plan(sizes: dict[str, int]) -> list[str]:
    """The segments a compaction merges (none while there are at most MAX_SEGMENTS)."""
    if len(sizes) <= MAX_SEGMENTS:
        return []
    largest = max(sizes, key=lambda n: (sizes[n], n))
    rest = [n for n in sorted(sizes) if n != largest]
    if sum(sizes[n] for n in rest) >= sizes[largest]:
        return sorted(sizes)
    return rest


def compact(store: Store, exp: str, sizes: dict[str, int], valid: Validator) -> Optional[dict[str, int]]:
    """Merge the segments :func:`plan` picks into one, under the compaction lock; the new ``sizes``, or None when
    nothing was done (another writer holds the lock, or nothing to do)."""
    merge = plan(sizes)
    if not merge:
        return None
    lock = store.path(layout.CATALOG_DIR, layout.SNAPSHOT_DIR, exp, LOCK_NAME)
    token = uuid.uuid4().hex
    body = json.dumps({"owner": token, "at": time.time()}).encode()
    try:
        if not create_exclusive(store, lock, body):
            try:
                held = json.loads(read_bytes(store, lock))
                if time.time() - float(held["at"]) < LOCK_STALE_S:
                    return None  # another writer is compacting
            except Exception:  # noqa: BLE001 - an unreadable lock is taken over like a stale one
                pass
            remove(store, lock)
            if not create_exclusive(store, lock, body):
                return None
    except Exception:  # noqa: BLE001 - a cache: no compaction this time
        return None
    try:
        merged: dict[str, dict[str, Any]] = {}
        for name in merge:
            seg = _read_one(store, store.path(layout.CATALOG_DIR, layout.SNAPSHOT_DIR, exp, name), valid, exp)
            merged.update(seg or {})
        new = append(store, exp, merged)  # written whole before any merged segment goes
        if new is None:
            return None
        for name in merge:
            remove(store, store.path(layout.CATALOG_DIR, layout.SNAPSHOT_DIR, exp, name))
        out = {n: c for n, c in sizes.items() if n not in merge}
        out[new] = len(merged)
        return out
    except Exception:  # noqa: BLE001 - a cache; the segments left are still valid
        return None
    finally:
        try:
            remove(store, lock)
        except Exception:  # noqa: BLE001 - it goes stale and is taken over after LOCK_STALE_S
            pass
