"""DistributedExtractor: the driver. It validates, schedules partitions over worker actors, and commits runs.

The driver holds the dataset's *inputs* one partition at a time and a few counters; activations go from each
worker straight to storage. Scheduling is dynamic: every worker keeps at most ``max_in_flight_per_worker``
partitions queued and the next partition goes to the least loaded live worker as soon as ``ray.wait`` returns.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Optional, Union

import ray
from ray.exceptions import ActorUnavailableError, RayTaskError
from tqdm.auto import tqdm

from ..errors import ConfigError, DistributedError, StorageError
from ..storage.fs import read_bytes
from ..storage.layout import CATALOG_DIR, check_tag
from ..storage.layout import new_run_id as _new_run_id
from ..storage.query import normalise
from ..storage.runs import RunAlreadyCommittedError, RunHandle, RunWriter, read_marker, read_record, run_dir
from ..storage.streaming import check_inflight_bytes
from . import index as _index
from .evidence import RunEvidence
from .events import RunEvents
from .credentials import check_model_kwargs, check_storage_options, public_options
from .job import ExtractionJob, LensJob, LensSource, StorageSpec
from .lensing import check_lens_config, lens_metadata
from .models import ModelSource, describe_source, resolve_model_source
from .partitions import PartitionSpec, plan_dataset
from .records import read_all
from .resume import check_committed_parts, check_same_settings, never_begun, read_fingerprints
from .scheduler import ACTOR_ERRORS, schedule
from .preflight import probe_storage
from .result import DistributedRun
from .worker import ExtractionWorker, check_same_model

_LOG = logging.getLogger(__name__)


class DistributedExtractor:
    """Extract activations with ``num_workers`` Ray actors, each holding one HookedModel.

    Args:
        model_name: a folder or hub id for ``HookedModel.from_pretrained(model_name, **model_kwargs)``, a
            ``"module:function"`` factory or a callable returning a HookedModel (called in each worker).
        num_workers: worker actors (started on the first ``extract`` and reused; ``shutdown()`` stops them).
        num_gpus_per_worker: GPUs per worker; the model is sharded (accelerate) over exactly those GPUs.
        num_cpus_per_worker: CPUs Ray reserves per worker.
        ray_address: a running cluster (``"auto"``, ``"ray://host:10001"``...); None starts a local one if Ray
            is not initialised yet.
        ship_credentials: False (default): secrets in a saver's ``storage_options`` or a token in ``model_kwargs``
            are refused, since workers and the index take credentials from their own environment (env vars,
            instance role, mounted profile). True sends them through Ray: they then enter its object store (which
            may spill to disk) and the workers' creation arguments (docs/cluster.md, "Credentials").
        max_inflight_bytes: per worker, the most bytes of finished batches waiting for storage (default 512 MiB);
            a forward faster than its storage then waits (docs/design.md, "Streaming partitions").
        shared_base_dir: declare that a saver's local ``base_dir`` is one filesystem every node mounts at the
            same path; without it a local ``base_dir`` on a cluster of several nodes is refused before anything
            is written (object storage needs nothing).
    Each call logs its events (:mod:`.events`: the run id and how to resume it before any model loads, each part,
    a summary); ``resume_command``: None, or a function of the run id giving the command that resumes it.
    """

    def __init__(self, model_name: Union[str, Callable[..., Any]], num_workers: int = 1,
                 num_gpus_per_worker: float = 0, num_cpus_per_worker: float = 1,
                 model_kwargs: Optional[dict[str, Any]] = None, ray_address: Optional[str] = None,
                 max_in_flight_per_worker: int = 2, max_worker_restarts: int = 3, max_part_attempts: int = 4,
                 ship_credentials: bool = False, max_inflight_bytes: Optional[int] = None,
                 shared_base_dir: bool = False) -> None:
        self.max_inflight_bytes = check_inflight_bytes(max_inflight_bytes)  # per worker: batches awaiting storage
        problems = []
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            problems.append(f"num_workers={num_workers!r} must be an int >= 1")
        if not isinstance(num_gpus_per_worker, (int, float)) or num_gpus_per_worker < 0:
            problems.append(f"num_gpus_per_worker={num_gpus_per_worker!r} must be >= 0")
        if not isinstance(num_cpus_per_worker, (int, float)) or num_cpus_per_worker < 0:
            problems.append(f"num_cpus_per_worker={num_cpus_per_worker!r} must be >= 0")
        if not isinstance(max_in_flight_per_worker, int) or max_in_flight_per_worker < 1:
            problems.append("max_in_flight_per_worker must be an int >= 1")
        if problems:
            raise ConfigError("DistributedExtractor: " + "; ".join(problems) + ".")
        check_model_kwargs(model_kwargs, bool(ship_credentials))
        self.ship_credentials, self.shared_base_dir = bool(ship_credentials), bool(shared_base_dir)
        self.source: ModelSource = resolve_model_source(model_name, model_kwargs)  # no weights loaded
        self.num_workers = num_workers
        self.num_gpus_per_worker = float(num_gpus_per_worker)
        self.num_cpus_per_worker = float(num_cpus_per_worker)
        self.max_in_flight = max_in_flight_per_worker
        self.max_worker_restarts = max_worker_restarts
        self.max_part_attempts = max_part_attempts
        self._connect(ray_address)
        self._check_resources()
        self._workers: list[Any] = []
        self._info: Optional[dict[str, Any]] = None
        self._infos: list[dict[str, Any]] = []
        self.resume_command: Optional[Callable[[str], str]] = None

    # ------------------------------------------------------------------ cluster
    def _connect(self, address: Optional[str]) -> None:
        """Join ``address`` (or start a local cluster) with Ray's own authentication settings, untouched: a local
        cluster gets Ray's default token auth; an existing one is reached with the token this process' environment
        provides. A refused token raises a one-line DistributedError saying how to provide it."""
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if ray.is_initialized():
            return
        try:
            if address is None:
                cpus = max(int(os.cpu_count() or 1), int(self.num_workers * self.num_cpus_per_worker + 0.999))
                ray.init(address=None, num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
            if self._auth_refused(exc):
                where = "the local Ray cluster" if address is None else f"the Ray cluster at {address!r}"
                mode = os.environ.get("RAY_AUTH_MODE")
                raise DistributedError(
                    f"{where} refused this process' authentication token (missing or wrong; RAY_AUTH_MODE is "
                    f"{repr(mode) if mode else 'unset'} here): set RAY_AUTH_MODE=token and give the cluster's token "
                    "in RAY_AUTH_TOKEN, in a file named by RAY_AUTH_TOKEN_PATH, or in Ray's default file "
                    "~/.ray/auth_token (docs/cluster.md, Security).") from None
            if not isinstance(exc, (ConnectionError, RuntimeError, ValueError)):
                raise
            raise DistributedError(f"cannot connect to the Ray cluster at {address!r}: {exc}. Start it (ray start "
                                   "--head) or pass ray_address=None for a local cluster.") from exc

    @staticmethod
    def _auth_refused(exc: BaseException) -> bool:
        """Whether Ray refused the connection for its token (an AuthenticationError, raised directly or as the
        cause of the GCS connection failure that ``ray.init`` reports; Ray < 2.52 has no token auth)."""
        auth_error = getattr(ray.exceptions, "AuthenticationError", ())
        seen: set[int] = set()
        cur: Optional[BaseException] = exc
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            if isinstance(cur, auth_error) or any(
                    marker in str(cur) for marker in ("InvalidAuthToken", "AuthenticationError", "Unauthenticated")):
                return True
            cur = cur.__cause__ or cur.__context__
        return False

    def _check_resources(self) -> None:
        res = ray.cluster_resources()
        need_gpu = self.num_workers * self.num_gpus_per_worker
        need_cpu = self.num_workers * self.num_cpus_per_worker
        if need_gpu > res.get("GPU", 0):
            raise ConfigError(f"{self.num_workers} workers x {self.num_gpus_per_worker:g} GPUs need {need_gpu:g} GPUs "
                              f"but the cluster has {res.get('GPU', 0):g}; lower num_workers/num_gpus_per_worker "
                              "or add GPU nodes.")
        if need_cpu > res.get("CPU", 0):
            raise ConfigError(f"{self.num_workers} workers x {self.num_cpus_per_worker:g} CPUs need {need_cpu:g} CPUs "
                              f"but the cluster has {res.get('CPU', 0):g}; lower num_workers/num_cpus_per_worker.")

    def _ensure_workers(self) -> None:
        if self._workers:
            return
        cls = ray.remote(ExtractionWorker).options(
            num_cpus=self.num_cpus_per_worker, num_gpus=self.num_gpus_per_worker,
            max_restarts=self.max_worker_restarts, max_task_retries=0)
        self._workers = [cls.remote(self.source, self.num_gpus_per_worker) for _ in range(self.num_workers)]
        try:
            infos = ray.get([w.info.remote() for w in self._workers])
        except RayTaskError as exc:
            self.shutdown()
            raise DistributedError(f"a worker could not load model {self.source.name!r}: {exc.cause!r}") from exc
        except ACTOR_ERRORS as exc:
            self.shutdown()
            raise DistributedError(f"a worker died while loading model {self.source.name!r}: {exc}") from exc
        self._info, self._infos = infos[0], infos

    def workers_info(self) -> list[dict[str, Any]]:
        """``ExtractionWorker.info()`` of every worker (starts them if needed)."""
        self._ensure_workers()
        out = []
        for w in self._workers:
            for attempt in range(60):  # a worker that is restarting answers once its model is loaded again
                try:
                    out.append(ray.get(w.info.remote()))
                    break
                except ActorUnavailableError:
                    time.sleep(0.5)
            else:
                raise DistributedError("a worker stayed unavailable for 30 s; see the Ray logs.")
        return out

    @property
    def workers(self) -> list[Any]:
        """The worker actor handles (empty before the first extract)."""
        return list(self._workers)

    def shutdown(self) -> None:
        """Stop the workers (the index actor, detached, stays)."""
        for w in self._workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._workers = []

    def __enter__(self) -> "DistributedExtractor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ scheduling
    def _run_parts(self, submit: Callable[[Any, Any], Any], parts: Iterator[Any], run: RunHandle,
                   stop_after: Optional[int], total_rows: Optional[int] = None,
                   on_result: Optional[Callable[[dict[str, Any]], None]] = None,
                   events: Optional[RunEvents] = None) -> tuple[int, int, int, int, float]:
        """Schedule ``parts`` over this extractor's workers; returns ``(rows, recomputed, skipped, retried,
        worker_seconds)``. A progress bar counts committed rows (rows/s and ETA when ``total_rows`` is known);
        ``events`` logs each part, and the failure that stops the run."""
        with tqdm(total=total_rows, desc=f"run {run.run_id}", unit="rows", disable=None, dynamic_ncols=True) as bar:
            args = (self._workers, submit, parts, run, stop_after, bar, self.max_in_flight, self.max_part_attempts,
                    self.max_worker_restarts, on_result, events)
            return events.guard(schedule, *args) if events is not None else schedule(*args)

    def _commit(self, writer: RunWriter, run: RunHandle, n_parts: int, n_rows: Optional[int] = None,
                statistics: bool = False) -> str:
        """Publish the run once every part has its commit record; register it with the index.

        Only record *names* are listed (here and in ``commit_run``): memory is flat in the number of parts.
        """
        committed = set(writer.committed_part_ids(run))
        if committed != set(range(n_parts)):
            missing = sorted(set(range(n_parts)) - committed)
            raise DistributedError(f"run {run.run_id}: parts {missing[:20]} are not committed; nothing was published. "
                                   f"Resume with run_id={run.run_id!r}, resume=True.")
        try:
            url = writer.commit_run(run, n_rows=n_rows, statistics=statistics)  # statistics: merged before _SUCCESS
        except RunAlreadyCommittedError:  # another driver resuming the same run published it first: same parts
            _LOG.info("run %s was committed by another driver meanwhile; its parts are these", run.run_id)
            return run.url
        entry_path = writer.store.path(CATALOG_DIR, run.experiment, f"{run.run_id}.json")
        try:
            entry = json.loads(read_bytes(writer.store, entry_path))
        except (StorageError, ValueError):
            entry = dict(run.metadata)
        _index.register_run(writer.store, entry)
        return url

    def _open(self, writer: RunWriter, experiment: str, meta: dict[str, Any], run_id: Optional[str],
              resume: bool, compare: tuple[str, ...]) -> tuple[RunHandle, bool]:
        """Begin a run, or reopen it for resume after checking it describes the same work."""
        model_name = self._info["model_name"] if self._info else self.source.name
        if not resume:
            return writer.begin_run(experiment, model_name, meta, run_id=run_id), False
        try:
            run = writer.open_run(experiment, model_name, run_id or "")
        except StorageError as exc:
            if run_id and never_begun(writer.store, experiment, run_id):  # its driver stopped before writing anything
                _LOG.info("run %s was never begun (its driver stopped before writing anything): beginning it", run_id)
                return writer.begin_run(experiment, model_name, meta, run_id=run_id), False
            raise ConfigError(f"cannot resume run {run_id!r}: it was never begun in experiment {experiment!r} for "
                              f"model {model_name!r} ({exc}).") from None
        def same_work(m: dict[str, Any]) -> dict[str, Any]:  # the worker count may change between attempts
            out = {k: m.get(k) for k in compare}
            if isinstance(out.get("distributed"), dict):
                out["distributed"] = {k: v for k, v in out["distributed"].items() if k != "num_workers"}
            return out

        check_same_settings(str(run_id), normalise(same_work(meta)), same_work(run.metadata))
        return run, True

    # ------------------------------------------------------------------ public API
    def extract(self, dataset: Any, target_token_positions: list, extraction_config: Any, saver: Any,
                batch_size: int = 8, partition_size: int = 256, tag: Optional[str] = None,
                other_metadata: Optional[dict[str, Any]] = None, interventions: Optional[list[Any]] = None,
                logit_lens: Optional[dict[str, Any]] = None, run_id: Optional[str] = None, resume: bool = False,
                text_column: str = "text", tokenizer_kwargs: Optional[dict[str, Any]] = None,
                position_seed: int = 0, statistics: bool = False, self_check: str = "error",
                _inject_failure: Optional[dict[str, Any]] = None,
                _stop_after_parts: Optional[int] = None) -> DistributedRun:
        """Extract ``dataset`` into one run of ``saver``'s storage and experiment; return a :class:`DistributedRun`.

        Rows are stored in dataset order, partition ``i`` holding rows ``[i*partition_size, (i+1)*partition_size)``;
        each tensor is ``[rows, P, ...]`` exactly as ``HookedModel.extract_cache`` returns it. ``resume=True`` with
        the ``run_id`` of an interrupted run recomputes only partitions without a commit record. Random position
        specs draw from ``position_seed`` (stored in the metadata) and each row's dataset index, so they match a
        single-process ``extract_cache(..., position_seed=...)`` of the same rows. ``statistics=True``: each worker
        also stores its part's per-key statistics over real slots, merged at the run commit
        (``QueryResult.statistics``; docs/storage_format.md, "Statistics"). ``self_check``: each worker checks its
        first batch (``"error"``: it writes nothing when a check fails; ``"warn"``; ``"off"``); the metadata gets
        the worst check over workers and ``provenance`` (docs/provenance.md).
        """
        from ..config import ExtractionConfig
        from ..positions import validate_specs

        t0 = time.perf_counter()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be an int >= 1.")
        if resume and run_id is None:
            raise ConfigError("resume=True needs the run_id of the interrupted run (run_id=...).")
        if not all(hasattr(saver, a) for a in ("store", "writer", "experiment_name")):
            raise ConfigError(f"saver must be an ActivationSaver, got {type(saver).__name__}.")
        check_storage_options(saver.store.storage_options, f"the saver ({saver.store.url(saver.store.root)})",
                              self.ship_credentials)
        plan = plan_dataset(dataset, partition_size, text_column)
        evidence = RunEvidence(self_check)  # validates the mode
        validate_specs(list(target_token_positions))
        cfg = extraction_config if isinstance(extraction_config, ExtractionConfig) else (
            ExtractionConfig.from_dict(dict(extraction_config or {})))
        lens = check_lens_config(logit_lens)
        directions = lens["token_directions"] if lens else None  # sliced per partition, summarised in metadata
        if directions is not None and plan.n_rows is not None and len(directions) != plan.n_rows:
            raise ConfigError(f"logit_lens token_directions has {len(directions)} entries for {plan.n_rows} rows; "
                              "give one per row.")
        meta = {
            "target_token_positions": normalise(target_token_positions, "target_token_positions"),
            "position_seed": int(position_seed),
            "pivot_positions": None,
            "interventions": normalise(list(interventions or []), "interventions"),
            "extraction_config": normalise(cfg, "extraction_config"),
            "other_metadata": normalise(dict(other_metadata or {}), "other_metadata"),
            "tag": check_tag(tag),
            "logit_lens": lens_metadata(lens) if lens else None,
            "distributed": {"dataset": plan.describe(), "batch_size": batch_size, "num_workers": self.num_workers,
                            "model_loading": describe_source(self.source),
                            "tokenizer_kwargs": normalise(dict(tokenizer_kwargs or {}), "tokenizer_kwargs")},
        }
        if statistics:  # absent otherwise: runs begun before statistics existed resume unchanged
            meta["statistics"] = True
        probe_storage(saver, self.shared_base_dir)
        run_id = run_id or _new_run_id()[0]  # allocated and logged before any model loads: resumable from here on
        events = RunEvents("extract", run_id, saver.experiment_name, saver.store.url(saver.store.root), resume,
                           self.resume_command)
        events.started(plan.n_rows, partition_size)
        events.guard(self._ensure_workers)  # first model load happens only after every check above passed
        meta["model_config"] = self._info["model_config"] if self._info else None
        meta["provenance"] = evidence.provenance(self._info)
        writer: RunWriter = saver.writer
        run, resumed = self._open(writer, saver.experiment_name, meta, run_id, resume,
                                  ("target_token_positions", "position_seed", "interventions", "extraction_config",
                                   "logit_lens", "distributed", "statistics"))
        events.workers_ready(self._infos, run.url)
        done = set(writer.committed_part_ids(run)) if resumed else set()
        planned: Iterator[PartitionSpec] = plan.partitions(directions)
        if done:  # same inputs as the committed parts? checked before anything is scheduled
            rdir = writer.store.path(run.rel)
            stored = read_fingerprints(done, lambda pid: read_record(writer.store, rdir, pid))
            planned = check_committed_parts(run.run_id, planned, stored)
        if resumed and writer.is_committed(run):
            n = len(read_marker(writer.store, run_dir(writer.store, run.metadata))["records"])
            return events.finish(DistributedRun(run.run_id, run.experiment, str(run.metadata.get("model_name")),
                                                run.url, int(plan.n_rows or 0), n, 0, n, 0, time.perf_counter() - t0,
                                                True))
        job = ExtractionJob(run=run, storage=self._storage(saver), batch_size=batch_size,
                            target_token_positions=list(target_token_positions), extraction_config=cfg.to_dict(),
                            interventions=list(interventions or []) or None,
                            logit_lens={k: v for k, v in (lens or {}).items() if k != "token_directions"} or None,
                            tokenizer_kwargs=tokenizer_kwargs, position_seed=int(position_seed),
                            statistics=bool(statistics), self_check=evidence.mode, inject_failure=_inject_failure)
        job_ref = ray.put(job)  # shared by every task of the run
        n_parts = 0
        n_rows = 0
        pre_skipped = 0

        def parts() -> Iterator[PartitionSpec]:
            nonlocal n_parts, n_rows, pre_skipped
            for p in planned:
                n_parts, n_rows = n_parts + 1, n_rows + p.rows
                evidence.part(p)
                if p.part_id in done:
                    pre_skipped += 1
                    continue
                yield p

        rows, recomputed, skipped, retried, busy = self._run_parts(
            lambda w, p: w.extract_part.remote(job_ref, p), parts(), run, _stop_after_parts, plan.n_rows,
            evidence.result, events)
        evidence.add_stored(done, lambda pid: read_record(writer.store, writer.store.path(run.rel), pid))
        evidence.apply(run.metadata)  # dataset fingerprint and worst self-check, in the committed metadata
        tc = time.perf_counter()
        url = events.guard(self._commit, writer, run, n_parts, n_rows, bool(statistics))
        tc = time.perf_counter() - tc
        return events.finish(DistributedRun(run.run_id, run.experiment, str(run.metadata.get("model_name")), url,
                                            n_rows, n_parts, recomputed, skipped + pre_skipped, retried,
                                            time.perf_counter() - t0, resumed, busy, tc))

    def plan(self, dataset: Any, target_token_positions: list, extraction_config: Any, saver: Any,
             **kwargs: Any) -> Any:
        """Dry run of ``extract`` (same arguments) starting no worker: an ``ExtractionPlan`` (rows, keys, bytes,
        shards, requests, memory, time; :func:`easyroutine_dist.distributed.plan.plan_extraction`)."""
        from .plan import plan_extraction
        return plan_extraction(self.source, dataset, target_token_positions, extraction_config, saver,
                               num_workers=self.num_workers, num_gpus_per_worker=self.num_gpus_per_worker,
                               **{"max_inflight_bytes": self.max_inflight_bytes, **kwargs})

    def _storage(self, saver: Any, store: Any = None) -> StorageSpec:
        """What workers need to open ``saver``'s storage (or ``store``): without secrets unless ``ship_credentials``."""
        store = saver.store if store is None else store
        options = dict(store.storage_options) if self.ship_credentials else public_options(store.storage_options)
        writer = saver.writer if store is saver.store else None
        return StorageSpec(base_dir=store.url(store.root), storage_options=options,
                           max_shard_bytes=getattr(writer, "max_shard_bytes", None), durable=bool(store.durable),
                           checksum=getattr(writer, "checksum", None),
                           max_inflight_bytes=getattr(self, "max_inflight_bytes", None))

    def logit_lens(self, run: Any, saver: Any, logit_lens: dict[str, Any], tag: Optional[str] = None,
                   other_metadata: Optional[dict[str, Any]] = None, run_id: Optional[str] = None,
                   resume: bool = False) -> DistributedRun:
        """Run the logit lens on the workers over a stored run; write a new run into ``saver`` (one part per
        source part, same row order) whose metadata links the source (``metadata["source_run"]``).

        ``run``: a QueryResult (its most recent run), a catalog entry from one, or a run id in ``saver``'s storage.
        """
        t0 = time.perf_counter()
        lens = check_lens_config(logit_lens)
        if lens is None:
            raise ConfigError("logit_lens must be given, e.g. {'target_key': 'resid_out_{i}', 'top_k': 5}.")
        src_store, entry = self._source_entry(run, saver)
        check_storage_options(saver.store.storage_options, f"the saver ({saver.store.url(saver.store.root)})",
                              self.ship_credentials)
        check_storage_options(src_store.storage_options, f"the source run's storage ({src_store.url(src_store.root)})",
                              self.ship_credentials)
        manifest = read_marker(src_store, run_dir(src_store, entry))
        records = read_all(manifest["records"])  # each record read once, 16 at a time (was 3 times, one by one)
        n_rows = sum(int(r["rows"]) for r in records)
        directions = lens["token_directions"]
        if directions is not None and len(directions) != n_rows:
            raise ConfigError(f"token_directions has {len(directions)} entries for the run's {n_rows} rows.")
        probe_storage(saver, self.shared_base_dir)
        run_id = run_id or _new_run_id()[0]  # allocated and logged before any model loads: resumable from here on
        events = RunEvents("logit_lens", run_id, saver.experiment_name, saver.store.url(saver.store.root), resume,
                           self.resume_command)
        events.started(n_rows, None, len(records))
        events.guard(self._ensure_workers)
        check_same_model(self._info["model_name"] if self._info else self.source.name, entry.get("model_name"))
        src_meta = manifest["metadata"]
        meta = {k: src_meta.get(k) for k in ("target_token_positions", "pivot_positions", "interventions",
                                             "extraction_config", "model_config")}
        meta.update(other_metadata=normalise(dict(other_metadata or {}), "other_metadata"), tag=check_tag(tag),
                    logit_lens=lens_metadata(lens),
                    source_run={"run_id": entry["run_id"], "experiment_name": entry["experiment_name"],
                                "url": src_store.url(run_dir(src_store, entry))},
                    distributed={"dataset": {"kind": "stored_run", "n_rows": n_rows, "parts": len(records)},
                                 "num_workers": self.num_workers, "model_loading": describe_source(self.source)})
        writer: RunWriter = saver.writer
        new_run, resumed = self._open(writer, saver.experiment_name, meta, run_id, resume,
                                      ("logit_lens", "source_run", "distributed"))
        if resumed and writer.is_committed(new_run):  # already done: the committed run, as extract returns it
            n = len(read_marker(writer.store, run_dir(writer.store, new_run.metadata))["records"])
            return events.finish(DistributedRun(new_run.run_id, new_run.experiment,
                                                str(new_run.metadata.get("model_name")), new_run.url, n_rows, n, 0,
                                                n, 0, time.perf_counter() - t0, True))
        events.workers_ready(self._infos, new_run.url)
        job = LensJob(run=new_run, storage=self._storage(saver),
                      logit_lens={k: v for k, v in lens.items() if k != "token_directions"})
        src = self._storage(saver, src_store)
        source = LensSource(storage=StorageSpec(base_dir=src.base_dir, storage_options=src.storage_options),
                            run_dir=run_dir(src_store, entry), run_id=entry["run_id"])
        job_ref, source_ref = ray.put(job), ray.put(source)
        offsets = [0]
        for r in records:
            offsets.append(offsets[-1] + int(r["rows"]))

        def parts() -> Iterator[tuple[int, dict[str, Any]]]:
            for i, r in enumerate(records):
                yield i, r

        def submit(w: Any, item: tuple[int, dict[str, Any]]) -> Any:
            i, rec = item
            d = None if directions is None else list(directions[offsets[i]:offsets[i + 1]])
            return w.lens_part.remote(job_ref, source_ref, rec, d)

        rows, recomputed, skipped, retried, busy = self._run_parts(submit, parts(), new_run, None, events=events)
        tc = time.perf_counter()
        url = events.guard(self._commit, writer, new_run, len(records), n_rows)
        tc = time.perf_counter() - tc
        return events.finish(DistributedRun(new_run.run_id, new_run.experiment,
                                            str(new_run.metadata.get("model_name")), url, n_rows, len(records),
                                            recomputed, skipped, retried, time.perf_counter() - t0, resumed, busy, tc))

    @staticmethod
    def _source_entry(run: Any, saver: Any) -> tuple[Any, dict[str, Any]]:
        if hasattr(run, "results") and hasattr(run, "store"):  # a QueryResult: its most recent run
            if not len(run):
                raise ConfigError("the QueryResult is empty; query a run to lens first.")
            return run.store, run[-1]
        if isinstance(run, dict) and "run_id" in run and "experiment_name" in run:
            return saver.store, run
        if isinstance(run, str):
            found = _index.find_run(saver.store, run)  # one catalog read per experiment, not every entry
            if len(found) != 1:
                raise ConfigError(f"run id {run!r} matches {len(found)} runs in {saver.base_dir}; pass the "
                                  "QueryResult entry instead.")
            return saver.store, found[0]
        raise ConfigError(f"run must be a QueryResult, a catalog entry or a run id, got {type(run).__name__}.")


__all__ = ["DistributedExtractor", "DistributedRun"]
