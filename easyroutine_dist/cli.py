"""``easyroutine-dist``: a thin command line over the library. Parse, call, print."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Extract activations from HF transformers on a Ray cluster, find them again, run the lens.")
console = Console()


@app.callback()
def _logging(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """Show the library's INFO lines (e.g. ``run <id> started ... (resume it with run_id=...)``) on stderr,
    so a job that dies still leaves the run id to resume in its log."""
    import logging

    from rich.logging import RichHandler

    log = logging.getLogger("easyroutine_dist")
    if not log.handlers:
        log.addHandler(RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False))
    log.setLevel(logging.DEBUG if verbose else logging.INFO)

DEMO_PROMPTS = [
    "The capital of France is", "The capital of Germany is", "The capital of Italy is", "The capital of Spain is",
    "The capital of Japan is", "The largest planet in the solar system is", "Water is made of hydrogen and",
    "The opposite of hot is", "One, two, three, four,", "The sun rises in the", "Monday, Tuesday,",
    "The chemical symbol for gold is", "A baby cat is called a", "Paris is a city in", "The color of the sky is",
    "Shakespeare wrote Romeo and",
]


JOB_KEYS = {"model", "model_kwargs", "num_workers", "gpus_per_worker", "cpus_per_worker", "dataset", "batch_size",
            "partition_size", "target_token_positions", "extraction_config", "logit_lens", "base_dir", "experiment",
            "tag", "ray_address"}


def _load_yaml(path: Optional[Path]) -> dict[str, Any]:
    """A job config (schema in docs/cluster.md); unknown top-level keys are refused."""
    if path is None:
        return {}
    import yaml

    with open(path) as f:
        job = yaml.safe_load(f) or {}
    unknown = sorted(set(job) - JOB_KEYS)
    if unknown:
        raise typer.BadParameter(f"{path}: unknown keys {unknown}; allowed keys: {sorted(JOB_KEYS)}")
    return job


def _load_dataset(spec: Any) -> Any:
    """A dataset from a job config entry or a CLI value: a .txt (one prompt per line), .json/.jsonl file,
    a ``save_to_disk`` folder, or a Hugging Face dataset name (``{"path", "split", "text_column"}``)."""
    if isinstance(spec, list):
        return spec
    if isinstance(spec, str):
        spec = {"path": spec}
    unknown = sorted(set(spec) - {"path", "name", "split", "text_column"})
    if unknown:
        raise typer.BadParameter(f"dataset has unknown keys {unknown}; allowed: path, name, split, text_column")
    path, name, split = spec.get("path"), spec.get("name"), spec.get("split", "train")
    if path is None:
        raise typer.BadParameter("dataset needs a path (file, folder or HF dataset name)")
    if str(path).endswith(".txt"):
        return [line.rstrip("\n") for line in open(path) if line.strip()]
    import datasets

    if str(path).endswith((".json", ".jsonl")):
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    elif os.path.isdir(path):
        ds = datasets.load_from_disk(path)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(path, name, split=split)
    column = spec.get("text_column", "text")
    return ds.rename_column(column, "text") if column != "text" else ds


def _positions(values: list[str]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        out.append(int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v)
    return out


@app.command()
def extract(
    model: Optional[str] = typer.Option(None, help="HF id, local folder, or 'smollm2' (the embedded model)."),
    dataset: Optional[str] = typer.Option(None, help=".txt/.jsonl file, save_to_disk folder or HF dataset name."),
    base_dir: Optional[str] = typer.Option(None, help="Local folder or fsspec URL (s3://bucket/prefix)."),
    experiment: Optional[str] = typer.Option(None),
    num_workers: Optional[int] = typer.Option(None),
    gpus_per_worker: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    partition_size: Optional[int] = typer.Option(None),
    positions: Optional[list[str]] = typer.Option(None, "--positions", help="Repeatable: last, all, 3, ..."),
    extract_: Optional[list[str]] = typer.Option(None, "--extract", help="Repeatable: resid_out, attn_out, ..."),
    logit_lens: Optional[str] = typer.Option(None, help="Run the lens on the workers, e.g. 'resid_out_{i}'."),
    top_k: int = typer.Option(5),
    tag: Optional[str] = typer.Option(None),
    run_id: Optional[str] = typer.Option(None, help="Resume this run (with --resume)."),
    resume: bool = typer.Option(False),
    ray_address: Optional[str] = typer.Option(None, help="'auto' to join a running cluster."),
    config: Optional[Path] = typer.Option(None, help="Job YAML (see cluster/job-*.yaml); flags override it."),
) -> None:
    """Distributed extraction into ``base_dir``; prints the run id and where it was saved."""
    from .config import ExtractionConfig
    from .distributed import DistributedExtractor
    from .errors import DistributedError
    from .interpretability.activation_saver import ActivationSaver

    job = _load_yaml(config)
    pick = lambda flag, key, default=None: flag if flag not in (None, []) else job.get(key, default)  # noqa: E731
    cfg = dict(job.get("extraction_config") or {})
    for name in extract_ or []:
        cfg[f"extract_{name}"] = True
    lens_cfg = job.get("logit_lens")
    if logit_lens:
        lens_cfg = {"target_key": logit_lens, "top_k": top_k}
    try:
        extractor = DistributedExtractor(
            pick(model, "model", "smollm2"), num_workers=pick(num_workers, "num_workers", 1),
            num_gpus_per_worker=pick(gpus_per_worker, "gpus_per_worker", 0),
            num_cpus_per_worker=job.get("cpus_per_worker", 1), model_kwargs=job.get("model_kwargs"),
            ray_address=pick(ray_address, "ray_address"))
    except DistributedError as exc:  # e.g. the cluster refused our Ray token: its one line, nothing written
        Console(stderr=True).print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    saver = ActivationSaver(pick(base_dir, "base_dir", "./runs"), pick(experiment, "experiment", "default"))
    try:
        handle = extractor.extract(
            _load_dataset(pick(dataset, "dataset")), _positions(pick(positions, "target_token_positions", ["last"])),
            ExtractionConfig.from_dict(cfg or {"extract_resid_out": True}), saver,
            batch_size=pick(batch_size, "batch_size", 8), partition_size=pick(partition_size, "partition_size", 64),
            tag=pick(tag, "tag"), logit_lens=lens_cfg, run_id=run_id, resume=resume)
    finally:
        extractor.shutdown()
    console.print(f"run [bold]{handle.run_id}[/bold] saved at {handle.url}", soft_wrap=True)


def _n_rows(entry: dict[str, Any]) -> str:
    """Rows of a run from its catalog entry: ``n_rows`` when the entry has it, else the distributed dataset's."""
    n = entry.get("n_rows")
    if n is None:
        n = ((entry.get("distributed") or {}).get("dataset") or {}).get("n_rows")
    return "?" if n is None else str(n)


def _runs_table(result: Any) -> Table:
    """One row per run; the run id is never truncated or folded (it is what ``--run``/``--run-id`` take)."""
    from rich import box

    ids = [str(e.get("run_id")) for e in result]
    experiments = sorted({str(e.get("experiment_name")) for e in result})
    where = f" in experiment {experiments[0]!r}" if len(experiments) == 1 else ""
    table = Table(title=f"{len(result)} run(s){where}", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    table.add_column("#", justify="right")
    table.add_column("run id", no_wrap=True, min_width=max([len("run id"), *map(len, ids)]))
    columns = (["experiment"] if len(experiments) > 1 else []) + ["model", "tag"]
    for col in columns:
        table.add_column(col, overflow="fold")
    table.add_column("rows", justify="right", no_wrap=True)
    table.add_column("parts", justify="right", no_wrap=True)
    for i, (e, run_id) in enumerate(zip(result, ids)):
        cells = {"experiment": str(e.get("experiment_name")), "model": str(e.get("model_name")),
                 "tag": str(e.get("tag") or "")}
        table.add_row(str(i), run_id, *(cells[c] for c in columns), _n_rows(e),
                      "" if e.get("n_parts") is None else str(e.get("n_parts")))
    return table


@app.command()
def query(
    base_dir: str = typer.Option("./runs"), experiment: Optional[str] = typer.Option(None),
    model: Optional[str] = typer.Option(None), tag: Optional[str] = typer.Option(None),
    custom: Optional[str] = typer.Option(None, help='JSON dict of custom metadata keys, e.g. \'{"batch": 1}\''),
) -> None:
    """Find saved runs (a table, one row per run)."""
    from .interpretability.activation_saver import ActivationLoader

    loader = ActivationLoader(base_dir, experiment or "default")
    result = loader.query(experiment_name=experiment, model_name=model, tag=tag,
                          custom_keys=json.loads(custom) if custom else None)
    console.print(_runs_table(result))


@app.command("logit-lens")
def logit_lens_cmd(
    base_dir: str = typer.Option("./runs"), experiment: str = typer.Option("default"),
    run: str = typer.Option("-1", help="Run id, time folder or index in the query result."),
    row: int = typer.Option(0, help="Which example of the run."),
    tokenizer: str = typer.Option("smollm2", help="Model whose tokenizer decodes the token ids."),
    plot: Path = typer.Option(Path("runs/logit_lens.png")),
) -> None:
    """Table of the top lens token per layer for one example of a stored run, and its heatmap PNG."""
    from .interpretability.activation_saver import ActivationLoader

    result = ActivationLoader(base_dir, experiment).query(experiment_name=experiment)
    which: Any = int(run) if run.lstrip("-").isdigit() else run
    cache, _ = result.load(which)
    show_lens(cache, row, plot, load_tokenizer(tokenizer))


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a model name/path (``"smollm2"``: the embedded GGUF model's)."""
    from transformers import AutoTokenizer

    from .models import resolve_model, source_kwargs

    path, kwargs = resolve_model(name)
    return AutoTokenizer.from_pretrained(path, **source_kwargs(kwargs))


def show_lens(cache: Any, row: int, plot: Path, tokenizer: Any) -> list[tuple[int, str, float]]:
    """Print the top lens token per layer at the last position of example ``row`` (from lens results stored by
    the workers) and write the heatmap PNG (layers x positions). Returns ``[(layer, token, prob)]``."""
    from .interpretability.tools import _layer_of, plot_lens_heatmap, stored_topk_grid

    token_dict = cache.get("token_dict") or {}
    n_real = len(next(iter(token_dict.values()))[row]) if token_dict else None
    grid = stored_topk_grid(cache, "resid_out_{i}", row, range(n_real) if n_real else None)
    keys, ids, probs = grid
    table = Table(title=f"logit lens, example {row}, last position (top-1 per layer)")
    for col in ("layer", "top token", "prob", "top-5"):
        table.add_column(col)
    rows = []
    for key, kid, kprob in zip(keys, ids, probs):
        token, prob = tokenizer.decode([int(kid[-1, 0])]), float(kprob[-1, 0])
        rows.append((_layer_of(key), token, prob))
        top5 = ", ".join(repr(tokenizer.decode([int(i)])) for i in kid[-1, :5])
        table.add_row(str(_layer_of(key)), repr(token), f"{prob:.3f}", top5)
    console.print(table)
    ids_row = cache["input_ids"][row, : ids.shape[1]].tolist() if "input_ids" in cache else None
    labels = [tokenizer.decode([int(t)]) for t in ids_row] if ids_row else None
    path = plot_lens_heatmap(None, None, plot, tokenizer=tokenizer, grid=grid, position_labels=labels,
                             title="logit lens: top-1 token and probability per layer and position")
    console.print(f"heatmap: {path}")
    return rows


@app.command()
def index(
    action: str = typer.Argument("stats", help="'rebuild' or 'stats'"), base_dir: str = typer.Option("./runs"),
) -> None:
    """Rebuild the catalog from storage (a scan), or print how many runs each experiment holds."""
    from .interpretability.activation_saver import ActivationLoader

    loader = ActivationLoader(base_dir)
    if action == "rebuild":
        console.print(f"catalog rebuilt: {loader.rebuild_catalog()} run(s)")
        return
    if action != "stats":
        raise typer.BadParameter("action must be 'rebuild' or 'stats'")
    table = Table(title="runs per experiment")
    table.add_column("experiment")
    table.add_column("runs")
    for exp in loader.catalog.experiments():
        table.add_row(exp, str(len(loader.catalog.entries(exp))))
    console.print(table)


@app.command("import-easyroutine")
def import_easyroutine_cmd(
    directory: Path = typer.Argument(..., help="The folder easyroutine's ActivationSaver wrote to."),
    base_dir: Optional[str] = typer.Option(None, help="Where to write the runs (default: DIRECTORY itself)."),
) -> None:
    """Convert runs saved by easyroutine 1.1.5 (tensor.pt + metadata.json per run) into easyroutine_dist runs.
    Pickles are read with torch's weights-only loader and easyroutine's classes only; others are refused."""
    from .errors import EasyRoutineError
    from .storage.import_easyroutine import import_easyroutine

    try:
        report = import_easyroutine(directory, base_dir)
    except EasyRoutineError as exc:
        Console(stderr=True).print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    table = Table(title=f"{len(report.imported)} run(s) imported, {len(report.skipped)} skipped")
    table.add_column("easyroutine run", no_wrap=True)
    table.add_column("result", overflow="fold")
    for rel, where in report.imported:
        table.add_row(rel, str(where))
    for rel, why in report.skipped:
        table.add_row(rel, f"skipped: {why}")
    console.print(table)


@app.command()
def demo(
    base_dir: str = typer.Option("./runs"), num_workers: int = typer.Option(2),
    model: str = typer.Option("smollm2", help="Model to run (the embedded SmolLM2 by default)."),
    plot: Path = typer.Option(Path("runs/logit_lens.png")),
) -> None:
    """The main job end to end: local Ray cluster, workers, shards in ./runs, lens on the workers, a query."""
    from .config import ExtractionConfig
    from .distributed import DistributedExtractor
    from .interpretability.activation_saver import ActivationLoader, ActivationSaver

    console.rule("easyroutine_dist demo")
    console.print(f"{len(DEMO_PROMPTS)} prompts, model {model}, {num_workers} Ray workers, storage {base_dir}")
    extractor = DistributedExtractor(model, num_workers=num_workers)
    saver = ActivationSaver(base_dir, "demo")
    config = ExtractionConfig(extract_resid_out=True, save_logits=False, save_input_ids=True)
    try:
        handle = extractor.extract(DEMO_PROMPTS, ["all"], config, saver, batch_size=4, partition_size=4,
                                   tag="demo", logit_lens={"target_key": "resid_out_{i}", "top_k": 5})
    finally:
        extractor.shutdown()
    console.print(f"run [bold]{handle.run_id}[/bold] committed at {handle.url}", soft_wrap=True)
    result = ActivationLoader.from_saver(saver).query(tag="demo")
    console.print(_runs_table(result))
    cache, _ = result.load(handle.run_id)
    rows = show_lens(cache, 0, plot, load_tokenizer(model))
    console.print(f"{DEMO_PROMPTS[0]!r} -> {rows[-1][1]!r} at the last layer (p={rows[-1][2]:.2f})")


if __name__ == "__main__":
    app()
