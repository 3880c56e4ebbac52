"""ExtractionWorker: the Ray actor that holds one HookedModel and turns partitions into committed parts.

A worker tokenises its partition (left padding) and streams it (:mod:`.pipeline`): each batch of
``HookedModel.extract_cache`` is reduced by the logit lens when asked and written as shards of the part by a
background thread while the next batch runs (memory bounded by ``max_inflight_bytes``); after the last shard the
part is committed (``RunWriter.commit_part``). It returns only a small record (part id, rows, timings). A part whose
commit record already exists is never recomputed nor rewritten.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Optional

from ..errors import ConfigError, StorageError
from ..storage import layout
from ..storage.fs import ObjectNotFoundError, read_bytes, retrying
from ..storage.runs import PartAlreadyCommittedError, RunHandle, RunWriter, check_record
from .credentials import credential_fingerprint, public_options
from ..slots import LAYOUT_KEY, VALID_KEY, SlotLayout
from .lensing import apply_lens, needed_keys
from .models import ModelSource, load_model
from .job import ExtractionJob, LensJob, LensSource, StorageSpec, WorkerJob
from .partitions import PartitionSpec
from ..tokenization import tokenize_batches
from .pipeline import stream_part
from .placement import check_shared_run_dir
from ..provenance import collect as collect_provenance
from ..selfcheck import RunChecks


class ExtractionWorker:
    """Holds one HookedModel (sharded over the GPUs Ray assigned, or on CPU).

    Wrapped with ``ray.remote`` by :class:`DistributedExtractor`; usable as a plain object in-process (tests).
    """

    def __init__(self, source: ModelSource, num_gpus: float = 0) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        t0 = time.perf_counter()
        self.model = load_model(source, num_gpus)
        self.load_seconds = time.perf_counter() - t0
        self.num_gpus = num_gpus
        self._writers: dict[str, tuple[str, RunWriter]] = {}  # root -> (credential digest, writer)
        self._lens: Any = None
        self.parts_done = 0
        self._checks = RunChecks()  # one self-check per run, on the first batch this worker processes

    # ------------------------------------------------------------------ introspection
    def info(self) -> dict[str, Any]:
        """Small description: model name and shape, process, node, GPUs, where inputs go, load time."""
        try:
            import ray

            gpu_ids = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
            node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
            node_ip = ray.util.get_node_ip_address() if ray.is_initialized() else None
        except Exception:  # noqa: BLE001 - introspection only
            gpu_ids, node_id, node_ip = [], None, None
        device_map = getattr(self.model.hf_model, "hf_device_map", None)
        return {"model_name": self.model.model_name, "model_config": self.model.model_config.to_dict(),
                "pid": os.getpid(), "node": socket.gethostname(), "node_ip": node_ip, "node_id": node_id,
                "gpu_ids": gpu_ids,
                "device": str(self.model.device), "device_map": {str(k): str(v) for k, v in (device_map or {}).items()},
                "load_seconds": self.load_seconds, "parts_done": self.parts_done,
                "provenance": collect_provenance(self.model)}

    def ping(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------ helpers
    def _writer(self, storage: StorageSpec | dict[str, Any]) -> RunWriter:
        """The writer of one storage root, rebuilt when the credentials it would use change (rotated keys in this
        process' environment or its credential files, or other shipped secrets): nothing is cached past them."""
        storage = StorageSpec.coerce(storage)
        options = storage.storage_options or {}
        key = json.dumps([storage.base_dir, public_options(options), storage.max_shard_bytes, storage.checksum,
                          bool(storage.durable)], sort_keys=True, default=repr)
        creds = credential_fingerprint(options)
        held = self._writers.get(key)
        if held is None or held[0] != creds:  # credentials live in this process' memory only
            kw = {} if storage.max_shard_bytes is None else {"max_shard_bytes": storage.max_shard_bytes}
            if storage.checksum is not None:  # the saver's choice (crc32c by default, or sha256)
                kw["checksum"] = storage.checksum
            writer = RunWriter(storage.base_dir, options, **kw)
            if storage.durable:
                writer.store.durable = True
            self._writers[key] = held = (creds, writer)
        return held[1]

    def _get_lens(self) -> Any:
        if self._lens is None:
            from ..lens import LogitLens

            self._lens = LogitLens.from_model(self.model)
        return self._lens

    @staticmethod
    def _existing(writer: RunWriter, run: RunHandle, part_id: int) -> Optional[dict[str, Any]]:
        path = writer.store.path(run.rel, layout.record_name(part_id))
        where = writer.store.url(path)  # retried like the write path: throttling and outages are not fatal
        try:  # one request, not a check and then a read
            return json.loads(retrying(lambda: read_bytes(writer.store, path), f"reading {where}", write=True))
        except ObjectNotFoundError:
            return None

    @staticmethod
    def _maybe_fail(job: WorkerJob, part_id: int) -> None:
        """Test hook: die (like a killed process) on the first attempt at one partition."""
        fail = job.inject_failure
        if not fail or int(fail["part_id"]) != part_id:
            return
        marker = fail["marker"]
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # already failed once: this attempt succeeds
        os.close(fd)
        os._exit(1)

    def _finish(self, job: WorkerJob, writer: RunWriter, run: RunHandle, part_id: int, data: Any,
                t0: float, rows: int, fingerprint: Optional[str] = None,
                self_check: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Write ``data`` (a whole part, in memory) as the part's shards, then commit it (:meth:`_commit`)."""
        try:
            record = writer.write_part(run, part_id, data)  # shards under this attempt's own names
        except PartAlreadyCommittedError:  # another attempt committed the part meanwhile: its bytes stay as they are
            return {"part_id": part_id, "rows": rows, "skipped": True, "seconds": time.perf_counter() - t0,
                    "pid": os.getpid()}
        if job.statistics:  # this part's per-key statistics over real slots: one more shard of the part
            from ..storage.stats import add_part_statistics

            add_part_statistics(writer.store, writer.store.path(run.rel), record, data)
        return self._commit(job, writer, run, record, t0, rows, fingerprint, self_check)

    def _commit(self, job: WorkerJob, writer: RunWriter, run: RunHandle, record: dict[str, Any], t0: float,
                rows: int, fingerprint: Optional[str] = None,
                self_check: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Commit a part whose shards are all written: its record, created exclusively, makes it visible."""
        part_id = int(record["part_id"])
        if fingerprint is not None:  # the driver's digest of this part's inputs: resume compares it
            record["fingerprint"] = fingerprint
        if self_check is not None:  # this worker's self-check of the run (its first batch)
            record["self_check"] = self_check
        self._maybe_fail(job, part_id)  # after the shards, before the commit record: the worst moment to die
        created = writer.commit_part(run, record)  # False: another attempt won; this one's shards are dropped
        self.parts_done += 1
        return {"part_id": part_id, "rows": record["rows"] if record["rows"] else rows, "skipped": not created,
                "bytes": sum(int(sh.get("bytes", 0)) for sh in record["shards"]) if created else 0,
                "seconds": time.perf_counter() - t0, "pid": os.getpid(), "self_check": self_check}

    # ------------------------------------------------------------------ work
    def extract_part(self, job: ExtractionJob | dict[str, Any], part: PartitionSpec) -> dict[str, Any]:
        """Extract, reduce, write and commit one partition; return ``{"part_id", "rows", "skipped", ...}``.

        Streamed (:mod:`.pipeline`): each batch's shards are written by a background thread while the next batch
        runs, at most ``max_inflight_bytes`` waiting (the job's storage option); the record is committed after the
        last shard. A failure anywhere removes this attempt's shards and writes no record (the part is re-queued)."""
        t0 = time.perf_counter()
        job = ExtractionJob.coerce(job)
        writer, run = self._writer(job.storage), job.run
        check_shared_run_dir(writer.store, run)  # a local base_dir must be the driver's folder, shared
        done = self._existing(writer, run, part.part_id)
        if done is not None:
            return {"part_id": part.part_id, "rows": done["rows"], "skipped": True, "seconds": 0.0,
                    "pid": os.getpid()}
        from ..config import ExtractionConfig
        from ..storage.query import normalise
        from ..storage.streaming import PartStream

        cfg = ExtractionConfig.from_dict(job.extraction_config)
        if part.batches is not None:
            batches = part.batches
        else:
            batches = tokenize_batches(self.model.hf_tokenizer, part.texts or [], job.batch_size,
                                       job.tokenizer_kwargs)
        check = self._checks.once(run.run_id, job.self_check, self.model, batches[0],
                                  cfg) if batches else None  # "error": raises here, before anything is written
        lens_cfg = job.logit_lens
        stream = PartStream(writer.store, writer.store.path(run.rel), part.part_id, checksum=writer.checksum,
                            max_shard_bytes=writer.max_shard_bytes, max_inflight_bytes=job.storage.max_inflight_bytes,
                            statistics=job.statistics)
        try:
            info = stream_part(self.model, stream, batches, job.target_token_positions, cfg,
                               interventions=job.interventions, position_seed=int(job.position_seed or 0),
                               row_offset=part.row_start, lens=self._get_lens() if lens_cfg is not None else None,
                               lens_cfg=lens_cfg, directions=part.token_directions)
            record = stream.finish(normalise(info, "cache info"))
        except BaseException:
            stream.abort()  # no record: this attempt's shards are removed, the part stays uncommitted
            raise
        return self._commit(job, writer, run, record, t0, part.rows, part.fingerprint, check)

    def lens_part(self, job: LensJob | dict[str, Any], source: LensSource | dict[str, Any], record: dict[str, Any],
                  directions: Optional[list[Any]]) -> dict[str, Any]:
        """Post-hoc logit lens over one committed part of a stored run; writes the same part id in the new run."""
        t0 = time.perf_counter()
        from ..cache import ActivationCache
        from ..storage.shards import read_part_shards

        job, source = LensJob.coerce(job), LensSource.coerce(source)
        writer, run = self._writer(job.storage), job.run
        check_shared_run_dir(writer.store, run)
        part_id = int(record["part_id"])
        done = self._existing(writer, run, part_id)
        if done is not None:
            return {"part_id": part_id, "rows": done["rows"], "skipped": True, "seconds": 0.0, "pid": os.getpid()}
        check_record(record, part_id, f"part {part_id} of run {source.run_id}")  # shard names become paths
        src_writer = self._writer(source.storage)
        lens_cfg = job.logit_lens
        keys = needed_keys(lens_cfg, list(record["keys"]))
        masks = [k for k in (VALID_KEY,) if k in record["keys"]]  # which slots are real travels with the lens
        tensors = read_part_shards(src_writer.store, f"{source.run_dir}/shards", record["shards"], keys + masks,
                                   record.get("rows"))
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise StorageError(f"part {part_id} of run {source.run_id} lacks {missing}; it cannot be lensed.")
        cache = ActivationCache.from_flat(tensors, {})
        out = apply_lens(self._get_lens(), cache, lens_cfg, directions)
        if lens_cfg["keep_activations"]:
            out = {**{k: tensors[k] for k in keys}, **out}
        out.update({k: tensors[k] for k in masks})
        info = {k: v for k, v in record["info"].items() if k in ("mapping_index", "token_dict", "metadata",
                                                                   LAYOUT_KEY)}
        if LAYOUT_KEY in info:
            layout = SlotLayout.from_json(info[LAYOUT_KEY])
            layout.add_keys([k for k in out if k not in layout.keys])
            info[LAYOUT_KEY] = layout.restrict(list(out)).to_json()
        flat = ActivationCache.from_flat(out, info)
        rows = int(next(iter(out.values())).shape[0])
        return self._finish(job, writer, run, part_id, flat, t0, rows)


def check_same_model(worker_model: str, run_model: Any) -> None:
    """A stored run must be lensed with the model it was extracted with."""
    if run_model is not None and str(run_model) != str(worker_model):
        raise ConfigError(f"the run was extracted with model {run_model!r} but the workers hold {worker_model!r}; "
                          "create a DistributedExtractor with the run's model to lens it.")
