"""An ``extract`` job from flags and a job YAML, checked before Ray starts or a model loads.

:func:`prepare` refuses bad input (ConfigError, PositionError, MetadataError, StorageError), cheapest checks
first, and writes nothing: the job YAML, the dataset (file, format, text column), names, extraction keys,
positions syntax, the model (config only), storage reachability (read-only), then the positions against the
first rows tokenised as the workers will (the tokenizer loads in about a second).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError, refuse_unknown

JOB_KEYS = {"model", "model_kwargs", "num_workers", "gpus_per_worker", "cpus_per_worker", "dataset", "batch_size",
            "partition_size", "target_token_positions", "extraction_config", "logit_lens", "base_dir", "experiment",
            "tag", "ray_address", "shared_base_dir", "max_inflight_bytes"}
DATASET_KEYS = {"path", "name", "split", "text_column"}
_DATASET_HELP = ("give a .txt file (one prompt per line), a .json/.jsonl file of objects with a text field, a "
                 "save_to_disk folder or a Hugging Face dataset name")
_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet", ".arrow")
SAMPLE_ROWS = 256  # rows whose positions are checked before the cluster starts


def load_job(path: Optional[Path]) -> dict[str, Any]:
    """A job YAML (schema in docs/cluster.md); a missing file, bad YAML or an unknown top-level key is refused."""
    if path is None:
        return {}
    import yaml

    if not Path(path).is_file():
        raise ConfigError(f"job config {str(path)!r} does not exist; pass a YAML file (see cluster/job-*.yaml).")
    try:
        job = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"job config {str(path)!r} is not valid YAML{line} ({getattr(exc, 'problem', exc)}); "
                          "fix its syntax.") from None
    if not isinstance(job, dict):
        raise ConfigError(f"job config {str(path)!r} must be a mapping of keys {sorted(JOB_KEYS)}, got a "
                          f"{type(job).__name__}.")
    refuse_unknown(job, JOB_KEYS, f"job config {str(path)!r}")
    return job


def _dataset_spec(spec: Any) -> dict[str, Any]:
    if isinstance(spec, (str, os.PathLike)):
        spec = {"path": str(spec)}
    if not isinstance(spec, dict):
        raise ConfigError(f"dataset must be a path or a mapping with keys {sorted(DATASET_KEYS)}, got "
                          f"{type(spec).__name__}.")
    refuse_unknown(spec, DATASET_KEYS, "dataset")
    if not spec.get("path"):
        raise ConfigError(f"dataset needs a path: {_DATASET_HELP}.")
    return spec


def check_dataset_path(spec: Any) -> None:
    """Cheap checks before anything is imported: a file-like dataset path must exist (no Hugging Face lookup)."""
    if spec is None:
        raise ConfigError(f"extract needs a dataset: --dataset prompts.txt, or dataset: in --config ({_DATASET_HELP}).")
    if isinstance(spec, list):
        return
    path = str(_dataset_spec(spec)["path"])
    if "://" in path:  # s3://... : checked when it is read
        return
    looks_local = path.endswith(_FILE_SUFFIXES) or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(f"dataset file {path!r} does not exist; {_DATASET_HELP}.")


def _read_text(path: str) -> str:
    """A local or remote (``s3://``: endpoint and credentials from the environment) UTF-8 text file."""
    try:
        if "://" in path:
            from ..storage.fs import resolve

            store = resolve(path)
            raw = store.fs.cat_file(store.root)
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"dataset file {path!r} does not exist; {_DATASET_HELP}.") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"dataset {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None


def _texts_from_json(path: str, column: str) -> list[str]:
    """Prompts of a .jsonl file (one object per line) or a .json file (a list of strings or objects)."""
    raw = _read_text(path)
    if path.endswith(".jsonl"):
        items = []
        for i, line in enumerate(raw.splitlines(), start=1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"dataset {path!r} line {i} is not JSON ({exc.msg}); one JSON object per "
                                      "line.") from None
    else:
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"dataset {path!r} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
        if isinstance(items, dict) and isinstance(items.get(column), list):
            items = items[column]
    if not isinstance(items, list):
        raise ConfigError(f"dataset {path!r} must hold a list of prompts or of objects with {column!r}.")
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            if not isinstance(item.get(column), str):
                raise ConfigError(f"dataset {path!r} row {i} has no string field {column!r} (fields: "
                                  f"{sorted(item)[:10]}); set text_column in the job's dataset entry.")
            item = item[column]
        if not isinstance(item, str):
            raise ConfigError(f"dataset {path!r} row {i} is a {type(item).__name__}, not a prompt string.")
        texts.append(item)
    return texts


def load_dataset(spec: Any) -> Any:
    """A dataset from a job entry or ``--dataset``: a list of prompts, or a datasets.Dataset with a text column."""
    if isinstance(spec, list):
        return spec
    spec = _dataset_spec(spec)
    path, column = os.path.expanduser(str(spec["path"])), spec.get("text_column", "text")
    if path.endswith(".txt"):
        texts = [line.rstrip("\r") for line in _read_text(path).split("\n") if line.strip()]
    elif path.endswith((".json", ".jsonl")):
        texts = _texts_from_json(path, column)
    else:
        return _hf_dataset(spec, path, column)
    if not texts:
        raise ConfigError(f"dataset {path!r} holds no prompts; {_DATASET_HELP}.")
    return texts


def _hf_dataset(spec: dict[str, Any], path: str, column: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"dataset {path!r} needs the datasets package: pip install 'easyroutine-dist[datasets]'.") \
            from None
    split = spec.get("split", "train")
    try:
        if os.path.isdir(path):
            ds = datasets.load_from_disk(path)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(path, spec.get("name"), split=split)
    except (OSError, ValueError, KeyError, FileNotFoundError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"dataset {path!r} (split {split!r}) cannot be loaded ({first}); {_DATASET_HELP}.") from None
    if column not in ds.column_names:
        raise ConfigError(f"dataset {path!r} has no column {column!r} (columns: {ds.column_names}); set text_column "
                          "in the job's dataset entry.")
    return ds.rename_column(column, "text") if column != "text" else ds


def extraction_config(job_cfg: Optional[dict[str, Any]], names: Optional[list[str]]) -> Any:
    """The ExtractionConfig of a job entry plus ``--extract NAME`` flags (``resid_out`` or ``extract_resid_out``)."""
    from ..config import ExtractionConfig

    fields = sorted(f for f in ExtractionConfig.__dataclass_fields__ if f.startswith("extract_"))
    cfg = dict(job_cfg or {})
    if not isinstance(job_cfg or {}, dict):
        raise ConfigError("extraction_config must be a mapping of ExtractionConfig fields, e.g. "
                          "{extract_resid_out: true}.")
    for name in names or []:
        key = name if name.startswith("extract_") else f"extract_{name}"
        if key not in fields:
            raise ConfigError(f"--extract {name!r} is not an activation; use one of "
                              f"{[f[len('extract_'):] for f in fields]}.")
        cfg[key] = True
    return ExtractionConfig.from_dict(cfg or {"extract_resid_out": True})


def positions(values: list[Any]) -> list[Any]:
    """``--positions`` values: digits become ints, ``a:b`` a (start, end) range; words stay as they are."""
    out: list[Any] = []
    for v in values:
        if isinstance(v, str) and v.lstrip("-").isdigit():
            out.append(int(v))
        elif isinstance(v, str) and ":" in v and all(p.lstrip("-").isdigit() or p == "" for p in v.split(":", 1)):
            a, b = v.split(":", 1)
            out.append((int(a) if a else None, int(b) if b else None))
        else:
            out.append(v)
    return out


@dataclass
class Job:
    """A checked extraction job: everything ``DistributedExtractor.extract`` / ``.plan`` take."""

    model: str
    model_kwargs: Optional[dict[str, Any]]
    source: Any
    dataset: Any
    positions: list[Any]
    config: Any
    lens: Optional[dict[str, Any]]
    saver: Any
    batch_size: int
    partition_size: int
    num_workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    tag: Optional[str]
    ray_address: Optional[str]
    shared_base_dir: bool = False  # a local base_dir that every node of the cluster mounts
    max_inflight_bytes: Optional[int] = None  # per worker, batches waiting for storage (None: 512 MiB)


def _int(value: Any, what: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{what}={value!r} must be an int >= {low}.")
    return value


def prepare(flags: dict[str, Any], config: Optional[Path]) -> Job:
    """Check a job (flags override the YAML) before anything starts, writing nothing; see the module docstring."""
    job = load_job(config)
    def pick(key: str, default: Any = None) -> Any:
        return flags[key] if flags.get(key) not in (None, []) else job.get(key, default)

    check_dataset_path(pick("dataset"))  # before any heavy import: a typo fails in a fraction of a second
    from ..distributed.lensing import check_lens_config
    from ..positions import validate_specs
    from ..storage.layout import check_experiment, check_tag

    experiment = check_experiment(pick("experiment", "default"))
    tag = check_tag(pick("tag"))
    cfg = extraction_config(job.get("extraction_config"), flags.get("extract"))
    specs = positions(list(pick("target_token_positions", ["last"])))
    validate_specs(specs)
    lens = check_lens_config(job.get("logit_lens") if not flags.get("logit_lens") else
                             {"target_key": flags["logit_lens"], "top_k": flags.get("top_k", 5)})
    batch_size = _int(pick("batch_size", 8), "batch_size")
    partition_size = _int(pick("partition_size", 64), "partition_size")
    num_workers = _int(pick("num_workers", 1), "num_workers")
    shared = pick("shared_base_dir", False)
    if not isinstance(shared, bool):
        raise ConfigError(f"shared_base_dir={shared!r} must be true or false (true: the local base_dir is one "
                          "filesystem every node mounts).")
    from ..storage.streaming import check_inflight_bytes

    inflight = pick("max_inflight_bytes")
    inflight = None if inflight is None else check_inflight_bytes(inflight)
    if flags.get("resume") and not flags.get("run_id"):
        raise ConfigError("--resume needs the id of the interrupted run: --run-id <id> (printed when it started).")
    dataset = load_dataset(pick("dataset"))
    from ..distributed.partitions import plan_dataset

    dplan = plan_dataset(dataset, partition_size)
    from ..distributed.credentials import check_model_kwargs
    from ..distributed.models import resolve_model_source
    from ..distributed.preflight import check_positions_on_sample, check_storage, sample_texts
    from ..tokenization import load_tokenizer
    from ..storage.api import ActivationSaver

    from ..storage.layout import model_slug

    model, model_kwargs = str(pick("model", "smollm2")), job.get("model_kwargs")
    if os.path.isdir(model):  # the run's model name: "./m" and "m" are the same folder
        model = os.path.abspath(model)
    check_model_kwargs(model_kwargs, False)
    source = resolve_model_source(model, model_kwargs)  # config only: an unknown model fails in seconds
    if source.kind == "pretrained":
        model_slug(source.name)
    saver = ActivationSaver(pick("base_dir", "./runs"), experiment)
    check_storage(saver)
    tokenizer = load_tokenizer(source)
    texts = sample_texts(dplan, SAMPLE_ROWS)
    if tokenizer is not None and texts:
        check_positions_on_sample(tokenizer, texts, specs, batch_size)
    gpus = pick("gpus_per_worker", 0)
    return Job(model, model_kwargs, source, dataset, specs, cfg, lens, saver, batch_size, partition_size,
               num_workers, gpus, pick("cpus_per_worker", 1), tag, pick("ray_address"), shared, inflight)
