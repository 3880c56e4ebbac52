"""Resume checks: a resumed run must do the same work as the run it continues, checked before anything runs.

* Settings: the stored run metadata (positions, config, lens, dataset description, batch size, model loading and
  tokenizer kwargs) must equal the new call's; the error names the first differing setting.
* Content: each committed part's record holds the fingerprint of its inputs (``PartitionSpec.fingerprint``,
  written by the worker); the new dataset's partition must have the same one, or the error names the part.
No Ray here.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Optional

from ..errors import ConfigError
from .partitions import PartitionSpec

_MISSING = object()


def first_difference(want: Any, have: Any, path: str = "") -> Optional[tuple[str, Any, Any]]:
    """The first (in sorted key order) leaf where ``want`` and ``have`` differ, as ``(dotted path, want, have)``;
    None when they are equal. A key missing on one side shows as None there."""
    if isinstance(want, dict) and isinstance(have, dict):
        for key in sorted(set(want) | set(have), key=str):
            a, b = want.get(key, _MISSING), have.get(key, _MISSING)
            if a is _MISSING or b is _MISSING:
                return (f"{path}{key}", None if a is _MISSING else a, None if b is _MISSING else b)
            found = first_difference(a, b, f"{path}{key}.")
            if found:
                return found
        return None
    if want != have:
        return (path.rstrip(".") or "(value)", want, have)
    return None


def check_same_settings(run_id: str, want: dict[str, Any], have: dict[str, Any]) -> None:
    """Refuse (ConfigError) a resume whose settings ``want`` differ from the stored run's ``have``."""
    diff = first_difference(want, have)
    if diff:
        path, now, stored = diff
        raise ConfigError(f"cannot resume run {run_id}: setting {path} differs from the stored run (stored "
                          f"{_short(stored)}, now {_short(now)}); resume with the same dataset, partition_size, "
                          "batch_size, positions, config, model and tokenizer kwargs and lens, or start a new run.")


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_fingerprints(done: Iterable[int], read_record: Callable[[int], dict[str, Any]],
                      threads: int = 16) -> dict[int, Optional[str]]:
    """``{part id: stored fingerprint or None}`` of the committed parts ``done`` (records read in parallel)."""
    ids = sorted(done)
    if not ids:
        return {}
    with ThreadPoolExecutor(max_workers=min(threads, len(ids))) as pool:
        records = list(pool.map(read_record, ids))
    return {pid: rec.get("fingerprint") for pid, rec in zip(ids, records)}


def check_committed_parts(run_id: str, parts: Iterator[PartitionSpec],
                          stored: dict[int, Optional[str]]) -> Iterator[PartitionSpec]:
    """Compare every committed part's stored fingerprint with the new dataset's partition of the same id, *before*
    anything is scheduled; return an iterator over all partitions (the ones read ahead, then the rest).

    Reading ahead stops at the highest committed part id, so the driver holds at most the inputs of the
    uncommitted partitions below it (committed ones are kept without their inputs). Raises ConfigError naming the
    first differing part, a committed part the new dataset does not reach, or a record without a fingerprint.
    """
    if not stored:
        return parts
    last = max(stored)
    ahead: list[PartitionSpec] = []
    for p in parts:
        if p.part_id in stored:
            have = stored[p.part_id]
            if have is None:
                raise ConfigError(f"cannot resume run {run_id}: committed part {p.part_id} has no content fingerprint "
                                  "(written by an older version), so it cannot be checked against this dataset; "
                                  "start a new run.")
            if have != p.fingerprint:
                raise ConfigError(f"cannot resume run {run_id}: part {p.part_id} (rows {p.row_start}.."
                                  f"{p.row_stop - 1}) of this dataset differs from the committed part (fingerprint "
                                  f"{have[:19]}... "
                                  f"stored, {str(p.fingerprint)[:19]}... now); resume with the same dataset in the "
                                  "same order, or start a new run.")
            p = replace(p, texts=None, batches=None, token_directions=None)  # skipped later: inputs not needed
        ahead.append(p)
        if p.part_id >= last:
            break
    reached = {p.part_id for p in ahead}
    missing = sorted(set(stored) - reached)
    if missing:
        raise ConfigError(f"cannot resume run {run_id}: part {missing[0]} is committed but this dataset ends before "
                          f"it ({len(reached)} partitions); resume with the same dataset, or start a new run.")
    return itertools.chain(ahead, parts)


def never_begun(store: Any, experiment: str, run_id: str) -> bool:
    """True when no model folder of ``experiment`` holds run ``run_id`` (its driver stopped before writing the run's
    metadata, e.g. while the workers loaded the model): a resume may then begin it under that id."""
    from ..storage.fs import file_exists, list_names
    from ..storage.layout import METADATA_FILE, check_run_id

    check_run_id(run_id)
    slugs = list_names(store, store.path(experiment))  # [] when the experiment has no folder yet
    return not any(file_exists(store, store.path(experiment, slug, run_id, METADATA_FILE)) for slug in slugs)
