"""Statistics stored with a run: one small safetensors shard per part, merged into ``statistics.*`` at run commit.

* Per part (written by the attempt that writes the part, before its record): a shard of the part,
  ``shards/part-PPPPP-SSSS-<attempt>.safetensors`` (index after the data shards), listed in the record's ``shards``
  (so it is checksummed, committed, copied by moves and cleaned up with the attempt like any shard) and named by
  ``record["statistics"] = {"version": 1, "file": <that shard>, "keys": {key: sample kind}}``. Its tensors
  (``"<key>/count|mean|m2|min|max|norm_sum"``, float64; count int64) are not cache keys: loads never return them.
* Per run (written by ``RunWriter.commit_run(..., statistics=True)`` before ``_SUCCESS``): the parts' statistics
  merged in part order, ``statistics.safetensors`` (same tensors) and ``statistics.json``
  ``{"version": 1, "parts": [ids], "keys": {key: {"samples", "count", "norm_mean", "shape"}}, "file": <shard
  record of statistics.safetensors>}``.

Readers (:func:`run_statistics`) use the run file, and merge the parts' shards instead when it is missing (a run
moved to another experiment, whose moves copy shards and records only, or a run committed without the hook).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from ..errors import StorageError
from ..statistics import Moments, cache_statistics, merge_statistics, statistics_from_tensors, statistics_to_tensors
from . import layout
from .fs import ObjectNotFoundError, Store, read_bytes, write_bytes
from .runs import as_flat, iter_records, read_manifest, read_record, run_dir
from .shards import read_shard, write_shard

VERSION = 1
FIELD = "statistics"
RUN_JSON = "statistics.json"
RUN_FILE = "statistics.safetensors"
#: part statistics read at once when merging (small objects: latency-bound on object stores)
READ_WINDOW = 8
_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")
_R = TypeVar("_R")
Stats = dict[str, tuple[str, Moments]]

__all__ = ["add_part_statistics", "write_part_statistics", "read_part_statistics", "write_run_statistics",
           "read_run_statistics", "run_statistics", "RUN_JSON", "RUN_FILE"]


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], window: int = READ_WINDOW) -> Iterator[_R]:
    """``map(fn, items)`` on ``window`` threads, results in order, at most ``window`` calls outstanding."""
    it = iter(items)
    with ThreadPoolExecutor(max(1, window), thread_name_prefix="stats-read") as pool:
        pending: deque = deque()
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                break
        while pending:
            fut = pending.popleft()
            nxt = next(it, _DONE)
            if nxt is not _DONE:
                pending.append(pool.submit(fn, nxt))
            yield fut.result()


_DONE = object()


def add_part_statistics(store: Store, rdir: str, record: dict[str, Any], data: Any) -> None:
    """Compute the statistics of ``data`` (what was just written as ``record``'s part: a cache, dict or tensor) over
    its real slots, write them as one more shard of the part and name it in ``record`` (before ``commit_part``)."""
    write_part_statistics(store, rdir, record, cache_statistics(as_flat(data)))


def write_part_statistics(store: Store, rdir: str, record: dict[str, Any], stats: Stats) -> None:
    """Write ``stats`` (a part's ``cache_statistics``, or their merge over its batches) as one more shard of the
    part and name it in ``record`` (before ``commit_part``)."""
    tensors, kinds = statistics_to_tensors(stats)
    part_id = layout.check_part_id(record["part_id"])
    attempt = record.get("attempt")
    index = len(record["shards"])
    name = layout.shard_name(part_id, index, attempt) if attempt else layout.shard_name(part_id, index)
    shard = write_shard(store, f"{rdir}/{name}", tensors)
    record["shards"].append(shard)
    record[FIELD] = {"version": VERSION, "file": shard["file"], "keys": kinds}


def read_part_statistics(store: Store, rdir: str, record: dict[str, Any]) -> Optional[Stats]:
    """The statistics a part record names (None when the part has none). The shard is checksummed on read."""
    info = record.get(FIELD)
    if info is None:
        return None
    where = f"of part {record.get('part_id')} in {store.url(rdir)}"
    if not isinstance(info, dict) or info.get("version") != VERSION or not isinstance(info.get("keys"), dict):
        raise StorageError(f"the statistics {where} are not version {VERSION} statistics; upgrade easyroutine_dist.")
    shard = next((sh for sh in record["shards"] if sh.get("file") == info.get("file")), None)
    if shard is None:  # only a file the record commits (and check_record validated) is ever read
        raise StorageError(f"the statistics {where} name {info.get('file')!r}, which is not a shard of the part; "
                           "the run is damaged.")
    tensors = read_shard(store, f"{rdir}/shards/{shard['file']}", shard)
    return statistics_from_tensors(tensors, info["keys"], where)


def _merge_parts(store: Store, rdir: str, sources: Iterable[Any],
                 fetch: Callable[[Any], dict[str, Any]]) -> tuple[Stats, list[int]]:
    """Merge the statistics of every part in ``sources`` (in order); also return the part ids that had none."""
    def one(src: Any) -> tuple[int, Optional[Stats]]:
        rec = fetch(src)
        return int(rec["part_id"]), read_part_statistics(store, rdir, rec)

    merged: Stats = {}
    missing: list[int] = []
    for pid, stats in ordered_map(one, sources):
        if stats is None:
            missing.append(pid)
        else:
            merged = merge_statistics(merged, stats)
    return merged, missing


def write_run_statistics(store: Store, rdir: str, ids: list[int],
                         records: Optional[list[dict[str, Any]]] = None) -> bool:
    """Merge the statistics of parts ``ids`` (from ``records`` when given, else read from ``records/``) and write
    ``statistics.safetensors`` then ``statistics.json`` in ``rdir``. False (WARNING, nothing written) when a part has
    no statistics."""
    if records is not None:
        merged, missing = _merge_parts(store, rdir, sorted(records, key=lambda r: int(r["part_id"])), lambda r: r)
    else:
        merged, missing = _merge_parts(store, rdir, ids, lambda pid: read_record(store, rdir, pid))
    if missing:
        _LOG.warning("run %s: parts %s have no statistics (extracted without statistics=True); no run statistics "
                     "were written", store.url(rdir), missing[:20])
        return False
    tensors, kinds = statistics_to_tensors(merged)
    shard = write_shard(store, f"{rdir}/{RUN_FILE}", tensors)
    keys = {k: {"samples": kind, "count": m.count, "norm_mean": m.norm_sum / m.count if m.count else None,
                "shape": list(m.mean.shape)} for k, (kind, m) in merged.items()}
    body = {"version": VERSION, "parts": sorted(ids), "keys": keys, "file": shard}
    write_bytes(store, f"{rdir}/{RUN_JSON}", json.dumps(body, sort_keys=True).encode())
    return True


def read_run_statistics(store: Store, rdir: str, part_ids: list[int]) -> Optional[Stats]:
    """The run-level statistics file of ``rdir`` when it exists and covers exactly ``part_ids``; else None."""
    path = f"{rdir}/{RUN_JSON}"
    try:
        raw = read_bytes(store, path)  # one request, not a check and then a read
    except ObjectNotFoundError:
        return None
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise StorageError(f"{store.url(path)} is unreadable ({exc}).") from None
    if not isinstance(body, dict) or body.get("version") != VERSION:
        raise StorageError(f"{store.url(path)} is not version {VERSION} statistics; upgrade easyroutine_dist.")
    shard, keys = body.get("file"), body.get("keys")
    if not isinstance(shard, dict) or shard.get("file") != RUN_FILE or not isinstance(keys, dict):
        raise StorageError(f"{store.url(path)} does not describe {RUN_FILE}; the run is damaged.")
    if sorted(body.get("parts") or []) != sorted(part_ids):
        return None  # written for another set of parts: merge the parts' own statistics instead
    tensors = read_shard(store, f"{rdir}/{RUN_FILE}", shard)
    return statistics_from_tensors(tensors, {k: v.get("samples") for k, v in keys.items()}, f"in {store.url(path)}")


def stored_statistics(store: Store, entry: dict[str, Any]) -> Stats:
    """The statistics of a committed run: its run file, or the merge of its parts' statistics (StorageError naming
    the parts without statistics when there is neither)."""
    from .runs import manifest_part_ids

    rdir = run_dir(store, entry)
    manifest = read_manifest(store, rdir)
    ids = manifest_part_ids(manifest)
    found = read_run_statistics(store, rdir, ids)
    if found is not None:
        return found
    if manifest["schema_version"] == 1:
        merged, missing = _merge_parts(store, rdir, list(iter_records(store, rdir, manifest)), lambda r: r)
    else:
        merged, missing = _merge_parts(store, rdir, ids, lambda pid: read_record(store, rdir, pid))
    if missing:
        raise StorageError(f"run {entry.get('run_id')} has no statistics for parts {missing[:20]}: extract it with "
                           "statistics=True (DistributedExtractor.extract, ActivationSaver.save/save_cache).")
    return merged


def run_statistics(store: Store, entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{key: {"count", "mean", "var", "norm_mean", "min", "max"}}`` of a committed run (float64 tensors)."""
    return {k: m.summary() for k, (_, m) in stored_statistics(store, entry).items()}
