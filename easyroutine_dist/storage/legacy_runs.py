"""Runs in easyroutine 1.1.5's layout, found in place: a read-mostly view next to our own runs (issue 14).

easyroutine's ActivationSaver wrote ``<base_dir>/<experiment>/<model dir>/<time folder>/{tensor.pt,
metadata.json}`` and its QueryResult held ``(experiment, model_dir, run_dir, metadata)`` tuples. Such runs are
listed by :meth:`ActivationLoader.query` (local ``base_dir`` only) as :class:`EasyroutineRun`, a NamedTuple with
those four fields, so scripts that unpack or append easyroutine's tuples keep working. What can be done with one:

* ``load``: ``tensor.pt`` is read only with torch's weights-only unpickler and the allowlist of
  :mod:`.legacy_pickle` (never a full unpickler); easyroutine's classes come back as ours (see ``to_object``).
* ``remove``: deletes ``tensor.pt`` and ``metadata.json``, then the (then empty) folder, as easyroutine did; a
  folder holding anything else is refused before anything is deleted.
* ``move`` (``update_run_experiment``): rewrites ``metadata.json``'s ``experiment_name`` and moves the folder with
  ``shutil.move`` to ``<base_dir>/<new experiment>/<model dir>/<time folder>``; an existing target is refused.

Everything else (parts, statistics, datasets, verification) needs the run in our format:
``easyroutine-dist import-easyroutine``. Our own runs are never taken for easyroutine ones (see
:func:`.import_easyroutine.find_runs`), and an imported run hides the folder it was imported from.
"""

from __future__ import annotations

import heapq
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple, Optional

from ..errors import MetadataError, StorageError
from . import layout
from .catalog import Catalog
from .fs import Store
from .import_easyroutine import FORMAT, TENSOR_FILE, LegacyRun, find_runs, run_fields
from .legacy_pickle import to_object, weights_only_load
from .query import compile_criteria

_LOG = logging.getLogger(__name__)


class EasyroutineRun(NamedTuple):
    """One run folder in easyroutine's layout: easyroutine's query-result tuple."""

    experiment: str
    model_dir: Path
    run_dir: Path
    metadata: dict


def is_legacy(item: Any) -> bool:
    """Whether a query-result item is an easyroutine-layout run (an EasyroutineRun or a plain 4-tuple)."""
    return isinstance(item, tuple) and len(item) == 4


def as_run(item: Any) -> EasyroutineRun:
    """``item`` (an EasyroutineRun or easyroutine's raw 4-tuple) as an EasyroutineRun with Path folders."""
    if isinstance(item, EasyroutineRun):
        return item
    experiment, model_dir, run_dir, metadata = item
    return EasyroutineRun(experiment, Path(model_dir), Path(run_dir), metadata if isinstance(metadata, dict) else {})


def names(run: EasyroutineRun) -> tuple[str, ...]:
    """What selects ``run`` by string: its time folder's name and its ``save_time``."""
    save_time = run.metadata.get("save_time")
    return (run.run_dir.name,) if save_time is None else (run.run_dir.name, str(save_time))


def describe(index: int, run: EasyroutineRun) -> list[str]:
    """easyroutine's lines for one run: ``0 - Experiment: e, Model: m, Time Folder: t`` (and its tag)."""
    lines = [f"{index} - Experiment: {run.experiment}, Model: {run.model_dir.name}, Time Folder: {run.run_dir.name}"]
    if run.metadata.get("tag") is not None:
        lines.append(f"  Tag: {run.metadata['tag']}")
    return lines


# ---------------------------------------------------------------------------------------------------- listing
def _imported_sources(catalog: Catalog, experiment: str) -> set[tuple[str, Any]]:
    """(source folder, easyroutine save_time) of every run of ``experiment`` imported from an easyroutine archive."""
    out = set()
    for entry in catalog.entries(experiment):
        src = entry.get("imported_from")
        if isinstance(src, dict) and src.get("format") == FORMAT:
            out.add((src.get("path"), src.get("save_time")))
    return out


def _fields(run: LegacyRun) -> dict[str, Any]:
    """What the query predicate sees for an easyroutine run: our entry's fields."""
    return {**run_fields(run), "experiment_name": run.experiment, "run_id": run.folder.name,
            "save_time": str(run.metadata.get("save_time", ""))}


def find_in_place(store: Store, catalog: Catalog, experiment: Optional[str],
                  crit: dict[str, Any]) -> list[EasyroutineRun]:
    """easyroutine-layout runs under ``store`` (of ``experiment``, or of all experiments when None) matching the
    normalised criteria ``crit``, sorted by time folder as easyroutine sorted them. Local stores only (an object
    store has no easyroutine runs: easyroutine wrote local folders); runs that were imported into this base
    folder are left out (the imported run is listed instead); runs whose metadata cannot be read are skipped
    with a WARNING naming them."""
    if not store.is_local:
        return []
    root = Path(store.root)
    if not root.is_dir():
        return []
    runs, _skipped, problems = find_runs(root, None if experiment is None else [experiment], complete_only=True)
    for problem in problems:
        _LOG.warning("query: skipping an easyroutine-layout run: %s", problem)
    pred = compile_criteria(crit)
    imported: dict[str, set[tuple[str, Any]]] = {}
    out = []
    for run in runs:
        if run.experiment not in imported:
            imported[run.experiment] = _imported_sources(catalog, run.experiment)
        if (run.rel, run.metadata.get("save_time")) in imported[run.experiment]:
            continue
        try:
            fields = _fields(run)
        except MetadataError as exc:
            _LOG.warning("query: skipping the easyroutine-layout run %s: %s", run.folder, exc)
            continue
        if pred(fields):
            out.append(EasyroutineRun(run.experiment, run.folder.parent, run.folder, run.metadata))
    return sorted(out, key=lambda r: r.run_dir.name)


def _time_key(text: str) -> str:
    return re.sub(r"\D", "", text)[:14]  # YYYYMMDDhhmmss, whatever the separators


def merge(entries: list[dict[str, Any]], runs: list[EasyroutineRun]) -> list[Any]:
    """Our entries and easyroutine-layout runs in one list by time (each list keeps its own order)."""
    if not runs:
        return entries

    def key(item: Any) -> str:
        if isinstance(item, dict):
            return _time_key(str(item.get("run_id", "")))
        return _time_key(str(item.metadata.get("save_time") or item.run_dir.name))

    return list(heapq.merge(entries, runs, key=key))


# ---------------------------------------------------------------------------------------------------- actions
def _check_folder_name(name: str, what: str) -> str:
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise MetadataError(f"{what} {name!r} is not a folder name; refused (paths must stay under base_dir).")
    return name


def _check_not_ours(folder: Path) -> None:
    """StorageError when ``folder`` is one of our runs or holds files easyroutine did not write there."""
    if (folder / layout.RUN_MARKER).exists():
        raise StorageError(f"{folder} is an easyroutine_dist run, not an easyroutine one; select it from a query "
                           "result as a run entry (a dict) instead.")
    if folder.is_dir():
        extra = sorted(p.name for p in folder.iterdir() if p.name not in (TENSOR_FILE, layout.METADATA_FILE))
        if extra:
            raise StorageError(f"{folder} also holds {extra}, which easyroutine did not write; nothing was "
                               "removed or moved. Move those files away first.")


def load(run: EasyroutineRun) -> tuple[Any, dict]:
    """``(object, metadata.json)`` of an easyroutine run: its ``tensor.pt`` read by torch's weights-only loader
    with the allowlist (a tensor stays a tensor ``[...]``; easyroutine's ActivationCache becomes ours), its
    metadata as saved. StorageError when a file is missing; UnsafeArchiveError when the pickle is refused."""
    tensor_path, meta_path = run.run_dir / TENSOR_FILE, run.run_dir / layout.METADATA_FILE
    missing = [p.name for p in (tensor_path, meta_path) if not p.is_file()]
    if missing:
        raise StorageError(f"the easyroutine run {run.run_dir} has no {' or '.join(missing)}; it cannot be loaded.")
    obj = weights_only_load(tensor_path)
    with open(meta_path, "r") as f:
        metadata = json.load(f)
    return to_object(obj), metadata


def remove(run: EasyroutineRun) -> None:
    """Delete an easyroutine run: ``tensor.pt``, ``metadata.json``, then its folder (as easyroutine did)."""
    folder = run.run_dir
    _check_folder_name(folder.name, "run folder")
    _check_not_ours(folder)
    (folder / TENSOR_FILE).unlink()
    (folder / layout.METADATA_FILE).unlink()
    folder.rmdir()


def move(run: EasyroutineRun, new_experiment_name: str) -> EasyroutineRun:
    """Move an easyroutine run to ``<base_dir>/<new experiment>/<model dir>/<time folder>`` (base_dir: three
    folders above the run, as easyroutine derived it) and set ``experiment_name`` in its ``metadata.json``.
    The new metadata is prepared before anything moves; an existing target folder is refused."""
    layout.check_experiment(new_experiment_name)
    src = run.run_dir
    model_folder = _check_folder_name(src.parent.name, "model folder")
    _check_folder_name(src.name, "run folder")
    base = src.parent.parent.parent
    target = base / new_experiment_name / model_folder / src.name
    if target == src:
        return run
    if target.exists() or target.is_symlink():
        raise StorageError(f"cannot move {src} to {target}: it already exists; nothing was moved.")
    _check_not_ours(src)
    with open(src / layout.METADATA_FILE, "r") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise StorageError(f"{src / layout.METADATA_FILE} holds a {type(data).__name__}, not a JSON object; "
                           "nothing was moved.")
    data["experiment_name"] = new_experiment_name
    text = json.dumps(data, indent=4)
    if base.is_dir():  # (no base_dir, no run to move: shutil.move says so, and no folder is made anywhere)
        target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(target))
    with open(target / layout.METADATA_FILE, "w") as f:
        f.write(text)
    return EasyroutineRun(new_experiment_name, target.parent, target, data)
