"""ActivationSaver, ActivationLoader and QueryResult (easyroutine's API) on the storage layer."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from ..cache import ActivationCache
from ..errors import MetadataError, StorageError
from . import compat, layout, legacy_runs
from .catalog import Catalog
from .fs import Store, resolve
from .providers import provided_entries
from .query import build_criteria, compile_criteria, jsonable, normalise
from .runs import RunWriter, as_flat, iter_parts, load_run, move_run, remove_run, run_dir
from .shards import DEFAULT_CHECKSUM, check_checksum
from .selection import candidates, select

ALL_EXPERIMENTS = "*"
_LOG = logging.getLogger(__name__)


def _valid_entries(entries: list[Any], source: str) -> list[dict[str, Any]]:
    """``entries`` whose names are safe path parts; others are skipped with a WARNING (never used as paths)."""
    out = []
    for e in entries:
        try:
            out.append(layout.check_entry(e))
        except MetadataError as exc:
            _LOG.warning("query: skipping an entry from %s: %s", source, exc)
    return out


def _model_config_summary(cfg: Any) -> Any:
    """A JSON-safe description of a model config (only JSON-friendly fields are kept)."""
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        raw = cfg
    elif callable(getattr(cfg, "to_dict", None)):
        raw = cfg.to_dict()
    elif dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        raw = dataclasses.asdict(cfg)
    else:
        raw = {k: v for k, v in vars(cfg).items() if not k.startswith("_")} if hasattr(cfg, "__dict__") else str(cfg)
    if not isinstance(raw, dict):
        return str(raw)
    out = {}
    for k, v in raw.items():
        try:
            out[str(k)] = normalise(v)
        except MetadataError:
            continue  # model configs may hold objects (dtypes, callables); their JSON fields are enough
    return out


class ActivationSaver:
    """Saves activations with metadata under ``base_dir/<experiment>`` (local path or fsspec URL).

    ``checksum``: digest of the shards, ``"crc32c"`` (default, hardware-accelerated) or ``"sha256"``.
    """

    exp_name = compat.exp_name_alias

    def __init__(self, base_dir: Union[Path, str], experiment_name: str = "default",
                 storage_options: Optional[dict] = None, max_shard_bytes: Optional[int] = None,
                 checksum: str = DEFAULT_CHECKSUM) -> None:
        check_checksum(checksum)  # before anything is resolved or written
        store = resolve(base_dir, storage_options)
        self._init(store, experiment_name, max_shard_bytes, checksum)

    def _init(self, store: Store, experiment_name: str, max_shard_bytes: Optional[int],
              checksum: str = DEFAULT_CHECKSUM) -> None:
        self.experiment_name = layout.check_experiment(experiment_name)
        self.store = store
        kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        self.writer = RunWriter(store, checksum=checksum, **kw)
        self.base_dir = compat.location(store, store.url(store.root))  # a Path on local disk

    @classmethod
    def from_env(cls, experiment_name: str = "default", storage_options: Optional[dict] = None) -> "ActivationSaver":
        """A saver on ``$ACTIVATION_BASE_DIR`` (S3 endpoint/credentials from options or AWS env vars); ValueError
        (ConfigError) when the variable is unset."""
        self = cls.__new__(cls)
        self._init(compat.env_store(storage_options), experiment_name, None)
        return self

    def save(self, activations: Any, model: Any, target_token_positions: Any, interventions: Any,
             extraction_config: Any, other_metadata: Optional[dict] = None, tag: Optional[str] = None,
             pivot_positions: Any = None, statistics: bool = False, self_check: str = "off",
             inputs: Any = None) -> Union[Path, str]:
        """Save one run; return its location (a Path on local disk). Metadata is checked before anything is
        written. ``other_metadata`` keys are also readable at the top level of the run's metadata (as in
        easyroutine) unless they are library keys; loading returns the kind of object saved (tensor, dict, cache).
        ``statistics=True`` also stores per-key statistics over real slots (``QueryResult.statistics``).
        ``metadata["provenance"]`` records what produced the run; ``inputs`` (the batch the activations came from)
        gives its dataset fingerprint and, with ``self_check="warn"``/``"error"``, the batch the self-check runs
        on (``"error"``: nothing is written when it fails). See docs/provenance.md."""
        model_name = compat.model_name_of(model)
        model_config = None if isinstance(model, str) or model is None else getattr(model, "model_config", None)
        meta = {
            "model_name": model_name,
            "target_token_positions": normalise(target_token_positions, "target_token_positions"),
            "pivot_positions": normalise(pivot_positions, "pivot_positions"),
            "interventions": None if interventions is None else normalise(list(interventions), "interventions"),
            "extraction_config": normalise(extraction_config, "extraction_config"),
            "other_metadata": normalise(dict(other_metadata or {}), "other_metadata"),
            "tag": layout.check_tag(tag),
            "model_config": _model_config_summary(model_config),
        }
        from ..evidence import for_save

        meta["provenance"], meta["self_check"] = for_save(model, activations, self_check, inputs, extraction_config)
        return self._save_one(activations, model_name, meta, statistics)

    def save_cache(self, cache: ActivationCache, other_metadata: Optional[dict] = None,
                   tag: Optional[str] = None, statistics: bool = False, self_check: str = "off") -> Union[Path, str]:
        """Save a cache whose ``cache["metadata"]`` holds model name, positions, config and interventions
        (``statistics=True``: with per-key statistics over real slots, see ``QueryResult.statistics``), with the
        provenance and self-check ``extract_cache`` recorded; ``self_check="warn"``/``"error"`` also asks that the
        recorded check passed (``"error"``: nothing is written otherwise)."""
        info = cache.get("metadata") if isinstance(cache, ActivationCache) else None
        if not isinstance(info, dict) or not info.get("model_name"):
            raise MetadataError(
                "save_cache needs cache['metadata'] with at least 'model_name' (HookedModel.extract_cache adds it); "
                "for a cache from HookedModel.forward use save(activations, model, target_token_positions, "
                "interventions, extraction_config) so the run records where it came from.")
        meta = {
            "model_name": info.get("model_name"),
            "target_token_positions": normalise(info.get("target_token_positions"), "target_token_positions"),
            "pivot_positions": normalise(info.get("pivot_positions"), "pivot_positions"),
            "interventions": (None if info.get("interventions") is None
                              else normalise(list(info["interventions"]), "interventions")),
            "extraction_config": normalise(info.get("extraction_config"), "extraction_config"),
            "other_metadata": normalise(dict(other_metadata or {}), "other_metadata"),
            "tag": layout.check_tag(tag),
            "model_config": None,
        }
        from ..evidence import for_save_cache

        meta["provenance"], meta["self_check"] = for_save_cache(info, self_check)
        return self._save_one(cache, info.get("model_name"), meta, statistics)

    def _save_one(self, activations: Any, model_name: Any, meta: dict[str, Any],
                  statistics: bool = False) -> Union[Path, str]:
        layout.model_slug(model_name)
        flat = as_flat(activations)  # refuses non-JSON info before any write
        meta = compat.with_top_level_custom_keys({**meta, compat.SAVED_AS: compat.saved_as(activations)})
        run = self.writer.begin_run(self.experiment_name, model_name, meta)
        record = self.writer.write_part(run, 0, flat, check_committed=False)  # a run id nobody else has
        if statistics:
            from .stats import add_part_statistics

            add_part_statistics(self.store, self.store.path(run.rel), record, flat)
        self.writer.commit_part(run, record)
        return compat.location(self.store, self.writer.commit_run(run, [record], verify=False, statistics=statistics))

    def save_object_to_path(self, obj: Any, metadata: dict, activation_dir: Any) -> None:
        """easyroutine's raw ``torch.save`` writer; refused here (no pickle is ever written, docs/compat.md)."""
        raise MetadataError("save_object_to_path writes a pickle (tensor.pt), which easyroutine_dist never does; "
                            "use save(...) or save_cache(...), which write safetensors shards and JSON metadata.")

    def rename_experiment(self, new_experiment_name: str) -> None:
        """Move every committed run of this experiment to ``new_experiment_name`` and switch to it; the old
        experiment's folders are removed once empty (an uncommitted run keeps its folder)."""
        layout.check_experiment(new_experiment_name)
        old = self.experiment_name
        for entry in self.writer.catalog.entries(old):
            move_run(self.store, self.writer.catalog, entry, new_experiment_name)
        self.experiment_name = new_experiment_name
        if old != new_experiment_name:
            compat.prune_empty_experiment(self.store, old)


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


class QueryResult:
    """Runs matching a query, oldest first (index -1 is the most recent): catalog entries (dicts) of our runs,
    and :class:`~easyroutine_dist.storage.legacy_runs.EasyroutineRun` tuples ``(experiment, model_dir, run_dir,
    metadata)`` for runs in easyroutine's layout found in place (easyroutine's own 4-tuples are accepted too)."""

    def __init__(self, store: Optional[Store] = None, catalog: Optional[Catalog] = None,
                 results: Optional[list[Any]] = None) -> None:
        self.store = store
        self.catalog = catalog
        self.results = [] if results is None else results

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.results)

    def __getitem__(self, item: Union[int, slice]) -> Any:
        if isinstance(item, slice):
            return QueryResult(self.store, self.catalog, self.results[item])
        return self.results[item]

    def __repr__(self) -> str:
        if not self.results:
            return ""  # as easyroutine prints an empty result
        cols = ("#", "save_time", "run_id", "experiment", "model", "tag", "parts", "keys")
        rows = [(str(i), e.get("save_time", ""), e["run_id"], e["experiment_name"], str(e.get("model_name")),
                 str(e.get("tag")), _cell(e.get("n_parts")), _cell(e.get("n_keys")))
                for i, e in enumerate(self.results) if not legacy_runs.is_legacy(e)]
        legacy = [line for i, e in enumerate(self.results) if legacy_runs.is_legacy(e)
                  for line in legacy_runs.describe(i, legacy_runs.as_run(e))]
        if not rows:  # easyroutine's lines only
            return "\n".join(legacy)
        widths = [max(len(c), *(len(r[j]) for r in rows)) for j, c in enumerate(cols)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        extra = ["easyroutine-layout runs (read in place):", *legacy] if legacy else []
        return "\n".join([f"QueryResult({len(self.results)} runs)", fmt.format(*cols),
                          *(fmt.format(*r) for r in rows), *extra])

    __str__ = __repr__

    def get_paths(self) -> list[str]:
        """Location of every run."""
        return [str(legacy_runs.as_run(e).run_dir) if legacy_runs.is_legacy(e)
                else self.store.url(run_dir(self.store, e)) for e in self.results]

    def _item(self, which: Union[int, str]) -> Any:
        """The selected result: by index, or by run id / save time (an easyroutine run: its time folder's name
        or its save_time)."""
        if isinstance(which, int):
            try:
                return self.results[which]
            except IndexError:
                raise StorageError(f"run index {which} is out of range ({len(self.results)} runs).") from None
        found = [e for e in self.results
                 if which in (legacy_runs.names(legacy_runs.as_run(e)) if legacy_runs.is_legacy(e)
                              else (e["run_id"], e.get("save_time")))]
        if len(found) == 1:
            return found[0]
        if not found:
            raise StorageError(f"no run with id, save time or time folder {which!r} in this result.")
        ids = [str(legacy_runs.as_run(e).run_dir) if legacy_runs.is_legacy(e) else e["run_id"] for e in found]
        raise StorageError(f"{which!r} matches {len(found)} runs {ids}; pass a run id or an index.")

    def _entry(self, which: Union[int, str], what: str = "this") -> dict[str, Any]:
        """The selected run's catalog entry; StorageError for an easyroutine-layout run (read in place)."""
        item = self._item(which)
        if legacy_runs.is_legacy(item):
            raise StorageError(f"{legacy_runs.as_run(item).run_dir} is an easyroutine-layout run read in place; "
                               f"{what} needs it in easyroutine_dist's format: run `easyroutine-dist "
                               "import-easyroutine BASE_DIR` first (load, remove and update_run_experiment work "
                               "on it as it is).")
        return item

    def load(self, which: Union[int, str] = -1, keys: Optional[list[str]] = None) -> tuple[Any, Optional[dict]]:
        """Load a run (by index, save time or run id) as ``(activations, metadata)``: the tensor or dict it was
        saved from, else an ActivationCache (always a cache when ``keys`` limits the tensors). An empty result
        gives ``(None, None)``. An easyroutine-layout run gives what easyroutine's load gave (its ``tensor.pt``
        read with torch's weights-only loader, easyroutine's classes as ours) and its ``metadata.json``."""
        if not self.results:
            return None, None
        item = self._item(which)
        if legacy_runs.is_legacy(item):
            if keys is not None:
                self._entry(which, "keys=")  # raises: a tensor.pt is one object
            return legacy_runs.load(legacy_runs.as_run(item))
        cache, meta = load_run(self.store, item, keys)
        return (compat.as_saved(cache, meta) if keys is None else cache), meta

    def iter_parts(self, which: Union[int, str] = -1, keys: Optional[list[str]] = None) -> Iterator[ActivationCache]:
        """Yield the run's parts one ActivationCache at a time, in order."""
        return iter_parts(self.store, self._entry(which, "iter_parts"), keys)

    def statistics(self, which: Union[int, str] = -1) -> dict[str, dict[str, Any]]:
        """Per-key statistics of a run saved with ``statistics=True``, over real slots only (padding excluded):
        ``{key: {"count": int, "mean", "var", "min", "max": float64 Tensor [*features], "norm_mean": float}}``
        (``var`` is the population variance). StorageError when the run has none."""
        from .stats import run_statistics

        return run_statistics(self.store, self._entry(which, "statistics"))

    def torch_dataset(self, which: Union[int, str] = -1, keys: Optional[list[str]] = None, unit: str = "rows",
                      batch_size: int = 256, shuffle: bool = True, seed: int = 0, rank: Optional[int] = None,
                      world_size: Optional[int] = None, shuffle_buffer: int = 8192, prefetch: Optional[int] = None,
                      normalize: Optional[str] = None, reuse_batch_memory: bool = True) -> Any:
        """A ``torch.utils.data.IterableDataset`` streaming the run's parts (local or S3) as batches; see
        :class:`easyroutine_dist.storage.reader.RunDataset` (``prefetch=None``: its default, ``reader.PREFETCH``). Use
        ``DataLoader(ds, batch_size=None, num_workers=n)``."""
        from .reader import RunDataset

        return RunDataset(self.store, self._entry(which, "torch_dataset"), keys=keys, unit=unit, batch_size=batch_size,
                          shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                          shuffle_buffer=shuffle_buffer, prefetch=prefetch, normalize=normalize,
                          reuse_batch_memory=reuse_batch_memory)

    def verify(self, which: Union[int, str] = -1, threads: int = 8, remove_orphans: bool = False) -> Any:
        """Read every shard of a run (``threads`` at a time) and check checksums, sizes and that every committed
        part has its shards; list orphaned files (``remove_orphans=True`` deletes only files no commit record
        references). Returns a :class:`easyroutine_dist.storage.integrity.VerifyReport` (``.intact``, ``.problems``)."""
        from .integrity import verify_run

        entry = self._entry(which, "verify")
        return verify_run(self.store, run_dir(self.store, entry), entry["run_id"], threads, remove_orphans)

    def remove(self, which: Union[int, str] = -1) -> None:
        """Delete a run from storage (and from this result). An easyroutine-layout run: its ``tensor.pt``,
        ``metadata.json`` and then its folder, as easyroutine did."""
        entry = self._item(which)
        if legacy_runs.is_legacy(entry):
            legacy_runs.remove(legacy_runs.as_run(entry))
        else:
            remove_run(self.store, self.catalog, entry)
        self.results = [e for e in self.results if e is not entry]

    def update_run_experiment(self, which: Union[int, str], new_experiment_name: str) -> None:
        """Move a run to another experiment. An easyroutine-layout run: its folder is moved with ``shutil.move``
        and ``experiment_name`` in its ``metadata.json`` rewritten, as easyroutine did (an existing target is
        refused)."""
        entry = self._item(which)
        if legacy_runs.is_legacy(entry):
            fresh: Any = legacy_runs.move(legacy_runs.as_run(entry), new_experiment_name)
        else:
            fresh = move_run(self.store, self.catalog, entry, new_experiment_name)
        self.results = [fresh if e is entry else e for e in self.results]


class ActivationLoader:
    """Queries runs saved by :class:`ActivationSaver` through the catalog."""

    exp_name = compat.exp_name_alias

    def __init__(self, base_dir: Union[Path, str], experiment_name: str = "default",
                 storage_options: Optional[dict] = None) -> None:
        self._init(resolve(base_dir, storage_options), experiment_name)

    def _init(self, store: Store, experiment_name: str) -> None:
        self.experiment_name = layout.check_experiment(experiment_name)
        self.store = store
        self.catalog = Catalog(store)
        self.base_dir = compat.location(store, store.url(store.root))  # a Path on local disk

    @classmethod
    def from_env(cls, experiment_name: str = "default", storage_options: Optional[dict] = None) -> "ActivationLoader":
        self = cls.__new__(cls)
        self._init(compat.env_store(storage_options), experiment_name)
        return self

    @classmethod
    def from_saver(cls, saver: ActivationSaver) -> "ActivationLoader":
        self = cls.__new__(cls)
        self._init(saver.store, saver.experiment_name)
        return self

    def query(self, experiment_name: Optional[str] = None, model_name: Optional[str] = None,
              target_token_positions: Any = None, pivot_positions: Any = None, save_time: Optional[str] = None,
              custom_keys: Optional[dict] = None, extraction_config: Any = None, interventions: Any = None,
              tag: Optional[str] = None, verbose: bool = False, provenance: Optional[dict] = None) -> QueryResult:
        """Runs matching every given criterion (``None`` = any). ``experiment_name="*"`` searches all experiments.
        ``provenance={...}`` matches ``metadata["provenance"]``: every given (nested) key must be equal.
        ``verbose`` is accepted for easyroutine scripts and has no effect. Runs written by easyroutine into a
        local base_dir are listed too, as ``EasyroutineRun`` tuples (see storage/legacy_runs.py)."""
        crit = build_criteria(model_name=model_name, target_token_positions=target_token_positions,
                              pivot_positions=pivot_positions, save_time=save_time, custom_keys=custom_keys,
                              extraction_config=extraction_config, interventions=interventions, tag=tag,
                              provenance=provenance)
        exp = experiment_name or self.experiment_name
        scope = None if exp == ALL_EXPERIMENTS else exp
        # e.g. the Ray index actor, when reachable: it runs selection.select itself and sends only the matches
        provided = provided_entries(self.store, scope, crit)
        if provided is not None:
            pred = compile_criteria(crit)  # the same predicate again: cheap on the matches, and a provider's
            found = [e for e in _valid_entries(provided, "a query provider") if pred(e)]  # answer is never trusted
        else:
            found = select(self.catalog, scope, crit)
        # runs in easyroutine's layout under base_dir (local only), merged in by time
        found = legacy_runs.merge(found, legacy_runs.find_in_place(self.store, self.catalog, scope, crit))
        if not found and provided is None:  # looked in the wrong place? one WARNING line says where it looked
            from .hints import where_problem

            hint = where_problem(self.store, self.catalog, scope)
            if hint:
                _LOG.warning("query found no run: %s", hint)
        return QueryResult(self.store, self.catalog, found)

    def _indexed(self, scope: Optional[str], crit: dict[str, Any]) -> list[dict[str, Any]]:
        """Candidate entries: from the catalog's equality index on one exact criterion when there is one."""
        return candidates(self.catalog, scope, crit)

    def rebuild_catalog(self) -> int:
        """Rebuild the catalog from the run markers in storage; returns the number of runs found."""
        return self.catalog.rebuild()


__all__ = ["ActivationSaver", "ActivationLoader", "QueryResult", "jsonable"]
