"""Import an easyroutine 1.1.5 archive into easyroutine_dist runs, so queries and loads find it.

easyroutine's ActivationSaver wrote one folder per run::

    <DIR>/<experiment>/<model name with '/' -> '_'>/<YYYY-MM-DD_HH_MM_SS>/tensor.pt       torch.save of the object
                                                                           /metadata.json   tag, save_time, ...

Every run becomes one committed run of the same experiment, model, tag, positions, config and custom keys (those
go to ``other_metadata`` and the top level, as ``save`` does), with ``imported_from`` recording the source folder
and the sha256 of its ``tensor.pt``. The source files are only read. Importing again skips runs already imported.

Safety: every ``tensor.pt`` is scanned before anything is written (see legacy_pickle); one needing anything
beyond the allowlist refuses the whole import, naming each such file. Runs are then converted one at a time;
each is committed atomically.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import EasyRoutineError, UnsafeArchiveError
from . import compat, layout
from .fs import resolve
from .legacy_pickle import check_globals, safe_load, sha256_of, to_payload
from .query import normalise
from .runs import RunWriter

TENSOR_FILE = "tensor.pt"
FORMAT = "easyroutine-1.1.5"
#: metadata.json keys easyroutine's ``save`` wrote itself; every other key is a custom key
KNOWN_KEYS = frozenset({"tag", "save_time", "experiment_name", "model_name", "target_token_positions",
                        "interventions", "extraction_config", "pivot_positions"})


@dataclass
class LegacyRun:
    """One easyroutine run folder: ``rel`` is ``<experiment>/<model dir>/<time folder>`` under the archive."""

    rel: str
    folder: Path
    experiment: str
    model_name: str
    metadata: dict[str, Any]


@dataclass
class ImportReport:
    """``imported``: (source folder, new run location); ``skipped``: (source folder, why)."""

    imported: list[tuple[str, Union[Path, str]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _dirs(folder: Path, runs: bool = False) -> list[Path]:
    """Sub-folders that can hold runs: not symlinks (a run is only ever acted on inside the archive), not our
    internal folders (``_catalog``), not hidden ones; with ``runs``, not our run folders either (told by their
    names, before any file is looked at: a query lists folders next to many runs of ours)."""
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it
                      if not e.name.startswith(("_", ".")) and not (runs and _is_run_id(e.name))
                      and e.is_dir(follow_symlinks=False))


def _is_ours(folder: Path, meta: Any) -> bool:
    return (folder / layout.RUN_MARKER).exists() or (isinstance(meta, dict) and "schema_version" in meta)


def _is_run_id(name: str) -> bool:
    try:
        layout.check_run_id(name)
    except EasyRoutineError:
        return False
    return True


def find_runs(archive: Path, experiments: Optional[list[str]] = None,
              complete_only: bool = False) -> tuple[list[LegacyRun], list[tuple[str, str]], list[str]]:
    """Scan ``archive`` (reads metadata.json files only), or only its ``experiments`` folders. Returns (runs,
    skipped, problems): ``problems`` name each folder whose metadata cannot be imported and why;
    easyroutine_dist's own runs are ignored (a folder named like our run ids, with a ``_SUCCESS`` marker or
    with ``schema_version`` in its metadata). ``complete_only``: folders without ``tensor.pt`` are passed over
    before their metadata is read, and not reported (what a query needs: cheap next to many runs of ours)."""
    runs: list[LegacyRun] = []
    skipped: list[tuple[str, str]] = []
    problems: list[str] = []
    if experiments is None:
        exp_dirs = _dirs(archive)
    else:
        exp_dirs = [archive / e for e in experiments if (archive / e).is_dir() and not (archive / e).is_symlink()]
    for exp_dir in exp_dirs:
        for model_dir in _dirs(exp_dir):
            for run_folder in _dirs(model_dir, runs=True):  # our run ids: easyroutine never wrote such names
                rel = f"{exp_dir.name}/{model_dir.name}/{run_folder.name}"
                meta_path, tensor_path = run_folder / layout.METADATA_FILE, run_folder / TENSOR_FILE
                if complete_only and not tensor_path.is_file():
                    continue
                meta: Any = None
                if meta_path.exists():
                    try:
                        meta = json.loads(meta_path.read_text())
                    except (ValueError, UnicodeDecodeError) as exc:
                        problems.append(f"{meta_path}: not valid JSON ({exc})")
                        continue
                if _is_ours(run_folder, meta):
                    continue
                if meta is None or not tensor_path.exists():
                    missing = layout.METADATA_FILE if meta is None else TENSOR_FILE
                    skipped.append((rel, f"no {missing}: not a complete easyroutine run"))
                    continue
                problem = _check_run(exp_dir.name, model_dir.name, meta)
                if problem:
                    problems.append(f"{meta_path}: {problem}")
                    continue
                name = meta.get("model_name") or model_dir.name
                runs.append(LegacyRun(rel, run_folder, exp_dir.name, name, meta))
    return runs, skipped, problems


def _check_run(experiment: str, model_dir: str, meta: Any) -> Optional[str]:
    """Why this run's metadata cannot be imported, or None."""
    if not isinstance(meta, dict):
        return f"holds a {type(meta).__name__}, not a JSON object"
    try:
        layout.check_experiment(experiment)
        layout.model_slug(meta.get("model_name") or model_dir)
        layout.check_tag(meta.get("tag"))
        normalise(meta, "metadata.json")
    except EasyRoutineError as exc:
        return str(exc)
    return None


def _run_id(save_time: Any) -> str:
    """A run id whose time part is easyroutine's ``save_time`` (now, when it cannot be read)."""
    try:
        when = datetime.strptime(str(save_time), "%Y-%m-%d %H:%M:%S").timestamp()
    except ValueError:
        when = time.time()
    return layout.new_run_id(when)[0]


def run_fields(run: LegacyRun) -> dict[str, Any]:
    """The queryable fields of an easyroutine run in our metadata's shape (custom keys in ``other_metadata``):
    what an import stores, and what a query evaluates for a run read in place."""
    md = run.metadata
    interventions = md.get("interventions")
    return {
        "model_name": run.model_name,
        "target_token_positions": normalise(md.get("target_token_positions"), "target_token_positions"),
        "pivot_positions": normalise(md.get("pivot_positions"), "pivot_positions"),
        "interventions": None if interventions is None else normalise(interventions, "interventions"),
        "extraction_config": normalise(md.get("extraction_config"), "extraction_config"),
        "other_metadata": normalise({k: v for k, v in md.items() if k not in KNOWN_KEYS}, "custom keys"),
        "tag": md.get("tag"),
    }


def _run_metadata(run: LegacyRun, saved_as: str, digest: str) -> dict[str, Any]:
    md = run.metadata
    meta = {
        **run_fields(run),
        "model_config": None,
        compat.SAVED_AS: saved_as,
        "imported_from": {"format": FORMAT, "path": run.rel, "sha256": digest, "save_time": md.get("save_time"),
                          "experiment_name": md.get("experiment_name")},
    }
    return compat.with_top_level_custom_keys(meta)


def import_easyroutine(archive: Union[str, Path], base_dir: Union[str, Path, None] = None,
                       storage_options: Optional[dict] = None) -> ImportReport:
    """Convert every run of the easyroutine archive ``archive`` (a local folder) into runs under ``base_dir``
    (local folder or fsspec URL; default: ``archive`` itself, next to the old files, which are left as they are).

    Raises UnsafeArchiveError before writing anything when a ``tensor.pt`` needs more than the allowlist or a
    ``metadata.json`` cannot be imported, naming every such file. Returns what was imported and skipped.
    """
    src = Path(archive)
    if not src.is_dir():
        raise UnsafeArchiveError(f"{src} is not a folder; pass the folder easyroutine's ActivationSaver wrote to "
                                 "(its base_dir, holding <experiment>/<model>/<time>/tensor.pt).")
    runs, skipped, problems = find_runs(src)
    for run in runs:  # static scan of every pickle, before anything is written
        try:
            check_globals(run.folder / TENSOR_FILE)
        except UnsafeArchiveError as exc:
            problems.append(str(exc))
    if problems:
        raise UnsafeArchiveError(f"nothing was imported from {src}; fix or move away these files first:\n  - "
                                 + "\n  - ".join(problems))
    store = resolve(base_dir if base_dir is not None else src, storage_options)
    writer = RunWriter(store)
    report = ImportReport(skipped=list(skipped))
    done: dict[str, set[tuple[str, str]]] = {}
    for run in runs:
        if run.experiment not in done:
            done[run.experiment] = {(e["imported_from"].get("path"), e["imported_from"].get("sha256"))
                                    for e in writer.catalog.entries(run.experiment)
                                    if isinstance(e.get("imported_from"), dict)}
        tensor_path = run.folder / TENSOR_FILE
        digest = sha256_of(tensor_path)
        if (run.rel, digest) in done[run.experiment]:
            report.skipped.append((run.rel, "already imported"))
            continue
        saved_as, payload = to_payload(safe_load(tensor_path), str(tensor_path))
        flat = payload if isinstance(payload, tuple) else {"activations": payload}
        meta = _run_metadata(run, saved_as, digest)
        handle = writer.begin_run(run.experiment, run.model_name, meta, run_id=_run_id(run.metadata.get("save_time")))
        record = writer.write_part(handle, 0, flat, check_committed=False)
        writer.commit_part(handle, record)
        report.imported.append((run.rel, compat.location(store, writer.commit_run(handle, [record], verify=False))))
        done[run.experiment].add((run.rel, digest))
    return report
