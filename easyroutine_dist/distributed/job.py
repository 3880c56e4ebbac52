"""What travels from the driver to the workers for one run: small frozen dataclasses, ``ray.put`` once per run.

* :class:`StorageSpec`: how a worker opens the saver's storage (URL, options *without secrets* unless the
  extractor ships credentials, shard size, checksum, durability, the streaming memory budget). Workers take
  credentials from their own environment (:mod:`.credentials`); ``storage_options`` is kept out of ``repr``.
* :class:`ExtractionJob`: one extraction run (run handle, storage, positions, extraction config, interventions,
  lens config, tokenisation, statistics, self-check).
* :class:`LensJob` and :class:`LensSource`: a post-hoc logit lens run and the stored run it reads.

Every class is plain data (picklable by Ray); ``coerce`` also accepts the dict form scripts and older tests build.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional, TypeVar

from ..errors import ConfigError, refuse_unknown
from ..storage.runs import RunHandle

_J = TypeVar("_J")

__all__ = ["StorageSpec", "WorkerJob", "ExtractionJob", "LensJob", "LensSource"]


def _from_dict(cls: type[_J], d: Any, what: str, convert: dict[str, Any]) -> _J:
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a {cls.__name__} or a dict of its fields, got {type(d).__name__}.")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    refuse_unknown(d, known, f"{what} ({cls.__name__})", "field(s)")
    kw = {k: (convert[k](v) if k in convert and v is not None else v) for k, v in d.items()}
    try:
        return cls(**kw)
    except TypeError as exc:
        raise ConfigError(f"{what}: {exc}.") from None


@dataclass(frozen=True, kw_only=True)
class StorageSpec:
    """Where a worker writes (or reads): ``base_dir`` (a local folder or fsspec URL) and how to open it."""

    base_dir: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # no secrets unless shipped
    max_shard_bytes: Optional[int] = None  # None: RunWriter's default (1 GiB)
    checksum: Optional[str] = None  # None: the default, crc32c
    durable: bool = False  # fsync local files and directories
    max_inflight_bytes: Optional[int] = None  # per worker, batches awaiting storage; None: 512 MiB

    @classmethod
    def coerce(cls, value: Any) -> "StorageSpec":
        return _from_dict(cls, value, "the job's storage", {})


def _run(value: Any) -> RunHandle:
    return value if isinstance(value, RunHandle) else RunHandle.from_dict(value)


@dataclass(frozen=True, kw_only=True)
class WorkerJob:
    """What every worker task of a run shares: the run it writes and the storage it writes to."""

    run: RunHandle
    storage: StorageSpec
    statistics: bool = False  # per-part statistics over real slots, merged at run commit
    inject_failure: Optional[dict[str, Any]] = None  # tests: {"part_id", "marker"}: die once before that commit


@dataclass(frozen=True, kw_only=True)
class ExtractionJob(WorkerJob):
    """One extraction run: each worker extracts partitions with these settings (``ExtractionWorker.extract_part``)."""

    target_token_positions: list[Any]
    extraction_config: dict[str, Any]  # ExtractionConfig.to_dict()
    batch_size: int = 8
    interventions: Optional[list[Any]] = None
    logit_lens: Optional[dict[str, Any]] = None  # checked config without token_directions (they travel per part)
    tokenizer_kwargs: Optional[dict[str, Any]] = None
    position_seed: int = 0
    self_check: str = "off"

    @classmethod
    def coerce(cls, value: Any) -> "ExtractionJob":
        return _from_dict(cls, value, "the extraction job", {"run": _run, "storage": StorageSpec.coerce})


@dataclass(frozen=True, kw_only=True)
class LensJob(WorkerJob):
    """A logit lens over a stored run, written as a new run (``ExtractionWorker.lens_part``)."""

    logit_lens: dict[str, Any]

    @classmethod
    def coerce(cls, value: Any) -> "LensJob":
        return _from_dict(cls, value, "the lens job", {"run": _run, "storage": StorageSpec.coerce})


@dataclass(frozen=True, kw_only=True)
class LensSource:
    """The stored run a lens reads: its storage, directory and id."""

    storage: StorageSpec
    run_dir: str
    run_id: str

    @classmethod
    def coerce(cls, value: Any) -> "LensSource":
        return _from_dict(cls, value, "the lens source", {"storage": StorageSpec.coerce})
