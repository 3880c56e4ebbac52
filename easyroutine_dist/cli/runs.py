"""Finding and checking saved runs: ``query``, ``verify``, ``index``, ``import-easyroutine``."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..errors import ConfigError
from .app import command, console, err_console, fail

ALL = "*"


def open_loader(base_dir: str, experiment: Optional[str] = None) -> Any:
    """A loader on ``base_dir``; exits 2 when the base dir, or ``experiment`` (None or '*': any), does not exist."""
    import os

    if "://" not in str(base_dir) and not os.path.isdir(base_dir):  # before importing torch: a typo fails at once
        fail(f"base dir {os.path.abspath(base_dir)} does not exist (nothing was saved there); pass the base dir the "
             "runs were saved to with --base-dir.")
    from ..interpretability.activation_saver import ActivationLoader
    from ..storage.fs import exists
    from ..storage.layout import check_experiment

    if experiment not in (None, ALL):
        check_experiment(experiment)
    loader = ActivationLoader(base_dir)
    store = loader.store
    if store.protocol != "memory" and not exists(store, store.root):
        fail(f"base dir {store.url(store.root)} does not exist (nothing was saved there); pass the base dir the "
             "runs were saved to with --base-dir.")
    if experiment not in (None, ALL):
        known = loader.catalog.experiments()
        if experiment not in known:
            fail(f"experiment {experiment!r} has no committed run in {store.url(store.root)} (experiments there: "
                 f"{', '.join(map(repr, known)) or 'none'}); pass one of them, or omit --experiment to search all.")
    return loader


def human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def run_sizes(result: Any) -> list[Optional[int]]:
    """Bytes each run of a QueryResult takes on storage (its folder), a few runs at a time."""
    from ..storage.runs import run_dir

    store = result.store

    def size(entry: dict[str, Any]) -> Optional[int]:
        try:
            return int(store.fs.du(run_dir(store, entry), total=True))
        except Exception:  # noqa: BLE001 - a size is informative only
            return None

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(size, list(result)))


def _n_rows(entry: dict[str, Any]) -> str:
    """Rows of a run from its catalog entry: ``n_rows`` when the entry has it, else the distributed dataset's."""
    n = entry.get("n_rows")
    if n is None:
        n = ((entry.get("distributed") or {}).get("dataset") or {}).get("n_rows")
    return "?" if n is None else str(n)


def runs_table(result: Any, all_experiments: bool = False) -> Table:
    """One row per run; the run id and the model name are never folded (the run id is what ``--run`` and
    ``verify`` take). ``all_experiments``: the query searched every experiment (said in the title)."""
    from rich import box

    ids = [str(e.get("run_id")) for e in result]
    models = [str(e.get("model_name")) for e in result]
    experiments = sorted({str(e.get("experiment_name")) for e in result})
    where = (" in all experiments" if all_experiments
             else f" in experiment {experiments[0]!r}" if len(experiments) == 1 else "")
    table = Table(title=f"{len(result)} run(s){where}", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("#", justify="right")
    table.add_column("run id", no_wrap=True, min_width=max([len("run id"), *map(len, ids)]))
    if all_experiments or len(experiments) > 1:
        table.add_column("experiment", no_wrap=True, min_width=max([10, *map(len, experiments)]))
    table.add_column("model", no_wrap=True, min_width=max([len("model"), *map(len, models)]))
    table.add_column("tag", overflow="fold")
    for col in ("rows", "parts", "size"):
        table.add_column(col, justify="right", no_wrap=True)
    sizes = run_sizes(result) if len(result) else []
    for i, (e, run_id, model) in enumerate(zip(result, ids, models)):
        cells = [str(i), run_id]
        if all_experiments or len(experiments) > 1:
            cells.append(str(e.get("experiment_name")))
        cells += [model, str(e.get("tag") or ""), _n_rows(e), "" if e.get("n_parts") is None else str(e["n_parts"]),
                  human_bytes(sizes[i])]
        table.add_row(*cells)
    return table


def print_table(table: Table) -> None:
    """Print a table as wide as its cells need (up to 240 columns; a narrower terminal wraps whole lines)."""
    from rich.measure import Measurement

    need = min(Measurement.get(console, console.options.update(max_width=100_000), table).maximum, 240)
    width = console.width
    console.width = max(width, need)  # rich never renders wider than its console
    try:
        console.print(table, crop=False)
    finally:
        console.width = width


def parse_custom(custom: Optional[str]) -> Optional[dict[str, Any]]:
    if custom is None:
        return None
    try:
        value = json.loads(custom)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--custom {custom!r} is not JSON ({exc.msg}); pass an object, e.g. "
                          "--custom '{\"batch\": 1}'.") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--custom {custom!r} is a JSON {type(value).__name__}; pass an object of custom metadata "
                          "keys, e.g. --custom '{\"batch\": 1}'.")
    return value


@command()
def query(
    base_dir: str = typer.Option("./runs", help="Where the runs were saved: a local folder or fsspec URL."),
    experiment: Optional[str] = typer.Option(
        None, help="Only this experiment. Default: every experiment (same as '*')."),
    model: Optional[str] = typer.Option(None, help="Only runs of this model name. Default: any model."),
    tag: Optional[str] = typer.Option(None, help="Only runs with this tag. Default: any tag."),
    custom: Optional[str] = typer.Option(
        None, help='Only runs whose custom metadata holds these keys and values: a JSON object, e.g. '
                   '\'{"batch": 1}\'. Default: any.'),
) -> None:
    """Find saved runs: a table, one row per run, oldest first (index -1 is the most recent)."""
    custom_keys = parse_custom(custom)
    loader = open_loader(base_dir, experiment)
    result = loader.query(experiment_name=experiment or ALL, model_name=model, tag=tag, custom_keys=custom_keys)
    print_table(runs_table(result, all_experiments=experiment in (None, ALL)))


def find_run(loader: Any, run_id: str, experiment: Optional[str]) -> tuple[Any, Optional[str]]:
    """``(QueryResult holding the committed run, None)``, or ``(None, path)`` of an uncommitted run directory."""
    from ..storage.verify import iter_run_dirs

    result = loader.query(experiment_name=experiment or ALL)
    found = [e for e in result if e["run_id"] == run_id]
    if len(found) > 1:
        fail(f"run id {run_id!r} is in experiments {[e['experiment_name'] for e in found]}; pass --experiment.")
    if found:
        i = next(i for i, e in enumerate(result) if e is found[0])
        return result[i:i + 1], None
    for names, path in iter_run_dirs(loader.store, None if experiment in (None, ALL) else experiment):
        if names["run_id"] == run_id:
            return None, path
    where = f"experiment {experiment!r}" if experiment not in (None, ALL) else "any experiment"
    fail(f"no run {run_id!r} in {where} of {loader.store.url(loader.store.root)}; list the runs with "
         f"easyroutine-dist query --base-dir {loader.store.url(loader.store.root)}")


@command()
def verify(
    run_id: str = typer.Argument(..., help="The run to check: its run id, as query prints it, or 'latest' (the "
                                           "most recent committed run of --experiment, or of any experiment)."),
    experiment: Optional[str] = typer.Option(None, help="The run's experiment. Default: search every experiment."),
    base_dir: str = typer.Option("./runs", help="Where the run was saved: a local folder or fsspec URL."),
    remove_orphans: bool = typer.Option(
        False, help="Delete the files no commit record references (orphans of lost or crashed attempts); "
                    "committed data is never touched."),
    threads: int = typer.Option(8, help="Shards read and checksummed at once (bounds memory)."),
) -> None:
    """Is a run intact? Reads every shard, checks checksums and sizes, that every committed part has its shards,
    and lists orphaned files. Exit 0 with a one-line summary when intact; exit 1 with one line per problem."""
    from ..storage.integrity import verify_run

    loader = open_loader(base_dir, experiment)
    if run_id == "latest":
        runs = loader.query(experiment_name=experiment or ALL)
        if not len(runs):
            fail(f"no committed run in {loader.store.url(loader.store.root)} to verify.")
        run_id = runs[-1]["run_id"]
    result, path = find_run(loader, run_id, experiment)
    if result is not None:
        report = result.verify(0, threads=threads, remove_orphans=remove_orphans)
    else:
        report = verify_run(loader.store, path, run_id, threads, remove_orphans)
    for line in report.lines():
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    for rel in report.removed:
        console.print(f"removed: {report.url}/{rel}", markup=False, highlight=False, soft_wrap=True)
    console.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
    if not report.intact:
        raise typer.Exit(1)


@command()
def index(
    action: str = typer.Argument("stats", help="'stats': runs per experiment; 'rebuild': rescan storage."),
    base_dir: str = typer.Option("./runs", help="Where the runs were saved: a local folder or fsspec URL."),
) -> None:
    """Rebuild the catalog from storage (a scan), or print how many runs each experiment holds."""
    if action not in ("rebuild", "stats"):
        raise ConfigError(f"index action {action!r} is unknown; use 'rebuild' or 'stats'.")
    loader = open_loader(base_dir)
    if action == "rebuild":
        console.print(f"catalog rebuilt: {loader.rebuild_catalog()} run(s)")
        return
    table = Table(title="runs per experiment")
    table.add_column("experiment")
    table.add_column("runs")
    for exp in loader.catalog.experiments():
        table.add_row(exp, str(len(loader.catalog.entries(exp))))
    console.print(table)


@command("import-easyroutine")
def import_easyroutine_cmd(
    directory: Path = typer.Argument(..., help="The folder easyroutine's ActivationSaver wrote to."),
    base_dir: Optional[str] = typer.Option(None, help="Where to write the runs. Default: DIRECTORY itself."),
) -> None:
    """Convert runs saved by easyroutine 1.1.5 (tensor.pt + metadata.json per run) into easyroutine_dist runs.
    Pickles are read with torch's weights-only loader and easyroutine's classes only; others are refused."""
    from ..storage.import_easyroutine import import_easyroutine

    report = import_easyroutine(directory, base_dir)
    table = Table(title=f"{len(report.imported)} run(s) imported, {len(report.skipped)} skipped")
    table.add_column("easyroutine run", no_wrap=True)
    table.add_column("result", overflow="fold")
    for rel, where in report.imported:
        table.add_row(rel, str(where))
    for rel, why in report.skipped:
        table.add_row(rel, f"skipped: {why}")
    console.print(table)
    if report.skipped:
        err_console().print(f"{len(report.skipped)} run(s) skipped (see the table)", markup=False)
