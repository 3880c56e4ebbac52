"""Incremental catalog snapshots: append-only segments, compacted rarely by one writer at a time.

A snapshot only caches the *contents* of catalog entries (the listing of ``_catalog/<experiment>/`` decides which
runs exist), so a stale, missing or duplicated segment costs time, never correctness.

* ``_catalog/_snapshots/<experiment>/seg-<unix ns>-<random>.json`` = ``{"entries": {"<run id>.json": entry}}``.
  A reader that had to read at least ``COMPACT_AFTER`` entries one by one appends one segment holding *only those*
  entries (each segment is written whole, atomically), instead of rewriting the whole snapshot.
* When more than :data:`MAX_SEGMENTS` segments exist, the writer that noticed takes the compaction lock
  ``_compacting`` (created exclusively; one older than :data:`LOCK_STALE_S` is taken over), writes one merged
  segment, removes the segments it merged and releases the lock. It merges every segment but the largest, or all of
  them when that merge would be at least as large as the largest: a whole rewrite happens only when the snapshot
  has doubled since the last one, so each entry is rewritten O(log runs) times over the archive's life.
* ``_catalog/_snapshots/<experiment>.json`` (one whole file, written before this format) is still read.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Optional

from . import layout
from .fs import Store, create_exclusive, list_names, read_bytes, remove, write_bytes

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


def _read_one(store: Store, path: str, valid: Validator) -> Optional[dict[str, dict[str, Any]]]:
    try:
        entries = dict(json.loads(read_bytes(store, path)).get("entries", {}))
    except (OSError, ValueError, AttributeError, TypeError, Exception):  # noqa: BLE001 - a cache: skip it
        return None
    return {name: e for name, e in entries.items() if valid(name, e, store.url(path))}


def read(store: Store, exp: str, valid: Validator) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """(valid cached entries by file name, {segment name: entries in it}) of one experiment's snapshot."""
    out: dict[str, dict[str, Any]] = {}
    legacy = _read_one(store, legacy_path(store, exp), valid)
    if legacy:
        out.update(legacy)
    sizes: dict[str, int] = {}
    try:
        names = sorted(n for n in list_names(store, segment_dir(store, exp))
                       if n.startswith("seg-") and n.endswith(".json"))
    except Exception:  # noqa: BLE001 - the snapshot is a cache; entries are read one by one then
        return out, sizes
    for name in names:
        seg = _read_one(store, store.path(layout.CATALOG_DIR, layout.SNAPSHOT_DIR, exp, name), valid)
        if seg is not None:
            out.update(seg)
            sizes[name] = len(seg)
    return out, sizes


def append(store: Store, exp: str, entries: dict[str, dict[str, Any]]) -> Optional[str]:
    """Write one new segment holding ``entries``; its name, or None when it could not be written (a cache)."""
    name = f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
    try:
        write_bytes(store, store.path(layout.CATALOG_DIR, layout.SNAPSHOT_DIR, exp, name),
                    json.dumps({"entries": entries}).encode())
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
            seg = _read_one(store, store.path(layout.CATALOG_DIR, layout.SNAPSHOT_DIR, exp, name), valid)
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
