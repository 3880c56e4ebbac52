"""``easyroutine-dist logit-lens``: the top lens token per layer of one example of a stored run, and its heatmap.

The lens comes from the run when its workers stored it (``logit_lens_<key>_topk_*``); otherwise it is computed
from the stored activations, on the Ray workers when a cluster is up (stored as a new run) or on this machine.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.table import Table

from ..errors import ConfigError, StorageError
from .app import command, console, fail
from .runs import ALL, open_loader


class Where(str, Enum):
    auto = "auto"
    local = "local"
    workers = "workers"


def model_of_run(meta: dict[str, Any]) -> str:
    """The model a run was extracted with, as ``--model`` takes it: a factory, 'smollm2', a folder or a hub id."""
    from ..models import DEFAULT_MODEL, SMOLLM2_GGUF

    loading = (meta.get("distributed") or {}).get("model_loading") or {}
    if loading.get("kind") == "factory" and loading.get("factory"):
        return str(loading["factory"])
    name = str(meta.get("model_name") or "")
    if (loading.get("kwargs") or {}).get("gguf_file") == SMOLLM2_GGUF or name == SMOLLM2_GGUF.rsplit(".gguf", 1)[0]:
        return DEFAULT_MODEL
    return name or DEFAULT_MODEL


def load_hooked(name: str) -> Any:
    """The HookedModel of a model name as ``--model`` takes it (factories included), on this machine."""
    from ..distributed.models import load_model, resolve_model_source

    return load_model(resolve_model_source(name))


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a model name/path (``"smollm2"``: the embedded GGUF model's; a factory: its model's)."""
    from ..distributed.models import resolve_model_source
    from ..tokenization import load_tokenizer as pretrained_tokenizer

    source = resolve_model_source(name)
    tokenizer = pretrained_tokenizer(source)
    return tokenizer if tokenizer is not None else load_hooked(name).hf_tokenizer


def load_row(store: Any, entry: dict[str, Any], row: int,
             select: Callable[[list[str]], list[str]]) -> tuple[Any, int, list[str]]:
    """The part holding dataset row ``row`` of a run, with the keys ``select(part keys)`` picks (masks added):
    ``(ActivationCache, row within the part, every key of the part)``. Reads only that part's shards."""
    from ..cache import ActivationCache
    from ..slots import MASK_KEYS
    from ..storage.runs import read_marker, run_dir
    from ..storage.shards import read_part_shards

    rdir = run_dir(store, entry)
    n_rows = entry.get("n_rows")
    offset = 0
    for rec in read_marker(store, rdir)["records"]:
        rows = int(rec.get("rows", 0))
        if row < offset + rows:
            keys = select(list(rec["keys"]))
            wanted = keys + [k for k in (*MASK_KEYS, "input_ids") if k in rec["keys"] and k not in keys]
            tensors: dict[str, Any] = read_part_shards(store, f"{rdir}/shards", rec["shards"], wanted,
                                                       rec.get("rows"))
            ordered = {k: tensors[k] for k in rec["keys"] if k in tensors}
            return ActivationCache.from_flat(ordered, rec["info"]), row - offset, list(rec["keys"])
        offset += rows
    n_rows = offset if n_rows is None else n_rows
    fail(f"--row {row} is out of range: run {entry['run_id']} has {n_rows} rows (0..{max(0, n_rows - 1)}).")


def _real_slots(cache: Any, row: int) -> Optional[list[int]]:
    """The slots of the position axis that are real tokens of example ``row``."""
    if "valid_mask" in cache:
        return [int(i) for i in cache["valid_mask"][row].nonzero().flatten()]
    token_dict = cache.get("token_dict") or {}
    if token_dict:
        return list(range(len(next(iter(token_dict.values()))[row])))
    return None


def show_lens(cache: Any, row: int, plot: Path, tokenizer: Any, grid: Any = None,
              target_key: str = "resid_out_{i}", example: Optional[int] = None) -> list[tuple[int, str, float]]:
    """Print the top lens token per layer at the last real position of example ``row`` of ``cache`` and write the
    heatmap PNG (layers x real positions). ``grid``: a computed ``(keys, ids, probs)`` (ids/probs
    ``[n_keys, P, k]``); default: the lens results stored in the run. ``example``: the dataset row shown in the
    title (default ``row``). Returns ``[(layer, token, prob)]``."""
    from ..interpretability.tools import _layer_of, plot_lens_heatmap, stored_topk_grid

    if not 0 <= row < _rows(cache):
        raise ConfigError(f"row {row} is out of range: the cache has {_rows(cache)} rows (0..{_rows(cache) - 1}).")
    slots = _real_slots(cache, row)
    if grid is None:
        grid = stored_topk_grid(cache, target_key, row, slots)
    elif slots is not None:
        grid = (grid[0], grid[1][:, slots], grid[2][:, slots])
    keys, ids, probs = grid
    shown = row if example is None else example
    table = Table(title=f"logit lens, example {shown}, last position (top-1 per layer)")
    for col in ("layer", "top token", "prob", "top-5"):
        table.add_column(col)
    out = []
    for key, kid, kprob in zip(keys, ids, probs):
        token, prob = tokenizer.decode([int(kid[-1, 0])]), float(kprob[-1, 0])
        out.append((_layer_of(key), token, prob))
        top5 = ", ".join(repr(tokenizer.decode([int(i)])) for i in kid[-1, :5])
        table.add_row(str(_layer_of(key)), repr(token), f"{prob:.3f}", top5)
    console.print(table)
    labels = None
    if "input_ids" in cache and cache["input_ids"].dim() == 2:
        ids_row = cache["input_ids"][row]
        ids_row = ids_row[slots] if slots is not None else ids_row[: ids.shape[1]]
        if len(ids_row) == ids.shape[1]:
            labels = [tokenizer.decode([int(t)]) for t in ids_row]  # the plot shows whitespace visibly
    path = plot_lens_heatmap(None, None, plot, tokenizer=tokenizer, grid=grid, position_labels=labels,
                             title="logit lens: top-1 token and probability per layer and position")
    console.print(f"heatmap: {path}")
    return out


def _rows(cache: Any) -> int:
    return int(next(v.shape[0] for k, v in cache.items() if hasattr(v, "shape") and v.dim() > 0))


def _cluster_up(ray_address: Optional[str]) -> bool:
    if ray_address or os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


@command("logit-lens")
def logit_lens_cmd(
    base_dir: str = typer.Option("./runs", help="Where the run was saved: a local folder or fsspec URL."),
    experiment: Optional[str] = typer.Option(None, help="The run's experiment. Default: every experiment."),
    run: str = typer.Option("-1", help="Run id, save time, or index in the query result (-1: the most recent)."),
    row: int = typer.Option(0, help="Which example (dataset row) of the run."),
    model: Optional[str] = typer.Option(
        None, "--model", "--tokenizer", help="Model whose tokenizer decodes the tokens (and that computes the lens "
                                            "when the run stored none). Default: the run's model."),
    target_key: str = typer.Option("resid_out_{i}", help="Activations the lens reads (a key or a {i} pattern)."),
    top_k: int = typer.Option(5, help="Tokens per layer and position when the lens is computed here."),
    compute: Where = typer.Option(
        Where.auto, help="Where to compute a lens the run did not store: 'workers' (the Ray cluster; stored as a "
                         "new run), 'local' (this machine), 'auto' (workers when a cluster is up, else local)."),
    ray_address: Optional[str] = typer.Option(
        None, help="Ray cluster for --compute workers. Default: RAY_ADDRESS, else a local cluster."),
    plot: Path = typer.Option(Path("runs/logit_lens.png"), help="Where to write the heatmap PNG."),
) -> None:
    """Table of the top lens token per layer for one example of a stored run, and its heatmap PNG."""
    loader = open_loader(base_dir, experiment)
    result = loader.query(experiment_name=experiment or ALL)
    if not len(result):
        where = f"experiment {experiment!r}" if experiment not in (None, ALL) else "any experiment"
        fail(f"no run to show in {where} of {loader.store.url(loader.store.root)}; extract one first (e.g. "
             "easyroutine-dist demo).")
    which: Any = int(run) if run.lstrip("-").isdigit() else run
    entry = result._entry(which)
    if row < 0:
        fail(f"--row {row} must be >= 0.")
    def lens_keys(keys: list[str]) -> list[str]:
        ids = [k[len("logit_lens_"):-len("_topk_ids")] for k in keys if k.startswith("logit_lens_")
               and k.endswith("_topk_ids")]
        found = _matching(ids, target_key)
        return [f"logit_lens_{k}_{s}" for k in found for s in ("topk_ids", "topk_probs")]

    cache, r, keys = load_row(loader.store, entry, row, lens_keys)
    name = model or model_of_run(entry)
    grid = None
    if not lens_keys(keys):
        acts = _matching(keys, target_key)
        if not acts:
            raise StorageError(f"run {entry['run_id']} has no stored lens and no activation matching "
                               f"{target_key!r} (keys: {sorted(keys)[:12]}); extract with --extract resid_out or "
                               f"--logit-lens {target_key!r}.")
        on_workers = compute == Where.workers or (compute == Where.auto and _cluster_up(ray_address))
        if on_workers:
            cache, r = _lens_on_workers(loader, entry, name, target_key, top_k, ray_address, row, lens_keys)
        else:
            cache, r, _ = load_row(loader.store, entry, row, lambda ks: _matching(ks, target_key))
            grid = _lens_here(cache, r, name, target_key, top_k)
            console.print(f"lens computed on this machine from the stored {target_key!r} activations "
                          f"({len(grid[0])} keys)", markup=False)
    show_lens(cache, r, plot, load_tokenizer(name), grid=grid, target_key=target_key, example=row)


def _matching(keys: list[str], target_key: str) -> list[str]:
    """``keys`` matching ``target_key`` (a key or a ``{i}`` pattern), possibly none."""
    from ..lens import match_keys

    try:
        return match_keys(keys, target_key) if keys else []
    except ConfigError:
        return []


def _lens_here(cache: Any, row: int, name: str, target_key: str, top_k: int) -> Any:
    from ..interpretability.tools import LogitLens, lens_topk_grid

    lens = LogitLens.from_model(load_hooked(name))
    return lens_topk_grid(lens, cache, target_key, top_k, row)


def _lens_on_workers(loader: Any, entry: dict[str, Any], name: str, target_key: str, top_k: int,
                     ray_address: Optional[str], row: int, lens_keys: Any) -> tuple[Any, int]:
    """The lens of the stored activations computed by a Ray worker into a new run of the same experiment; returns
    the part of that run holding ``row``."""
    from ..distributed import DistributedExtractor
    from ..interpretability.activation_saver import ActivationLoader, ActivationSaver

    saver = ActivationSaver(loader.store.url(loader.store.root), entry["experiment_name"],
                            storage_options=loader.store.storage_options or None)
    extractor = DistributedExtractor(name, num_workers=1, ray_address=ray_address or os.environ.get("RAY_ADDRESS"))
    try:
        lens = {"target_key": target_key, "top_k": top_k, "keep_activations": False}
        done = extractor.logit_lens(entry, saver, lens, tag=f"logit lens of {entry['run_id']}")
    finally:
        extractor.shutdown()
    console.print(f"lens computed on the workers, stored as run {done.run_id}", markup=False)
    new = ActivationLoader.from_saver(saver).query(experiment_name=entry["experiment_name"])
    lensed = next(e for e in new if e["run_id"] == done.run_id)
    cache, r, _ = load_row(saver.store, lensed, row, lens_keys)
    return cache, r
