"""A dry-run plan of a distributed extraction: what a run will write and cost, without Ray or any worker.

:func:`plan_extraction` (``DistributedExtractor.plan``, ``easyroutine-dist extract --dry-run``):

1. tokenises the dataset as the workers do and resolves ``target_token_positions`` per partition, which gives
   every partition's rows and position-axis width exactly (and refuses positions a row cannot take);
2. calibrates on this machine: one :class:`ExtractionWorker`, in this process, loads the model and runs the real
   worker code on two small partitions of the first rows into an in-memory store: the model load time, the first
   partition (with the self-check) and a warm one give the timings; the shards and the record written give every
   key's dtype and per-row shape and the JSON overheads;
3. extrapolates: per partition, tensor bytes from its rows and widths, the shard split and safetensors headers
   as :mod:`..storage.shards` writes them, the record as :mod:`..storage.runs` writes it.

Nothing is written to the saver's storage. The model is loaded once, on CPU (or where ``model_kwargs`` place it).
"""

from __future__ import annotations

import copy
import heapq
import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch

from ..errors import ConfigError, PositionError

#: s3fs uploads a shard of this size or more in parts (one request each, plus create and complete)
MULTIPART_BYTES = 50 * 1024**2


@dataclass
class ExtractionPlan:
    """What :func:`plan_extraction` found. ``bytes``: the run folder on storage (shards, records, metadata);
    ``requests``: write requests (shards, multipart parts, records, metadata, marker, catalog entry);
    ``keys``: per key ``{"dtype", "shape_per_row", "bytes"}`` (``shape_per_row`` without the row axis, position
    axes at their widest partition); ``peak_host_bytes``: per worker; ``estimated_seconds``: wall time."""

    rows: Optional[int]
    partitions: int
    num_workers: int
    keys: dict[str, dict[str, Any]]
    bytes: int
    tensor_bytes: int
    shards: int
    requests: int
    peak_host_bytes: int
    estimated_seconds: float
    storage: str
    calibration: dict[str, Any] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> list[str]:
        """Human-readable lines (what ``--dry-run`` prints)."""
        out = [f"rows: {self.rows if self.rows is not None else '?'} in {self.partitions} partition(s), "
               f"{self.num_workers} worker(s); storage {self.storage}"]
        for k, v in self.keys.items():
            out.append(f"  {k}: {v['dtype']} {v['shape_per_row']} per row, {_human(v['bytes'])}")
        out += [f"bytes on storage: {self.bytes} ({_human(self.bytes)}; tensors {_human(self.tensor_bytes)})",
                f"shards: {self.shards}; write requests: {self.requests}",
                f"peak host memory per worker: {_human(self.peak_host_bytes)}",
                f"estimated wall time: {self.estimated_seconds:.1f} s"]
        out += [f"assumes: {a}" for a in self.assumptions]
        return out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class _Part:
    """One scanned partition: rows, group widths on the position axis, per-row selections, token counts."""

    part_id: int
    rows: int
    widths: dict[str, int]
    token_dict: dict[str, list[list[int]]]
    padded_tokens: int
    longest: int  # tokens of the longest padded batch row
    batch_rows: list[int]  # rows of each batch: a worker writes each batch's own shards (streamed)


def _scan(dataset_plan: Any, tokenizer: Any, specs: list[Any], batch_size: int, seed: int,
          tokenizer_kwargs: Optional[dict[str, Any]], directions: Any,
          max_rows: int) -> tuple[list[_Part], int, int, list]:
    """Tokenise partitions as workers do (every one, or an even sample past ``max_rows`` rows); returns the scanned
    parts, the dataset's rows and partitions, and the first partitions' specs (for calibration)."""
    from ..positions import resolve_positions
    from ..tokenization import tokenize_batches
    from .preflight import check_positions_on_sample

    n_parts = dataset_plan.n_partitions
    step = 1 if not n_parts or dataset_plan.n_rows <= max_rows else math.ceil(dataset_plan.n_rows / max_rows)
    scanned, firsts, rows, count = [], [], 0, 0
    for spec in dataset_plan.partitions(directions):
        count, rows = count + 1, rows + spec.rows
        if len(firsts) < 2:
            firsts.append(spec)
        if spec.part_id % step:
            continue
        batches = spec.batches if spec.batches is not None else tokenize_batches(
            tokenizer, spec.texts or [], batch_size, tokenizer_kwargs)
        widths: dict[str, int] = {}
        token_dict: dict[str, list[list[int]]] = {}
        padded, longest, offset, batch_rows = 0, 0, spec.row_start, []
        for b in batches:
            mask = torch.as_tensor(b.get("attention_mask", torch.ones_like(torch.as_tensor(b["input_ids"]))))
            try:
                res = resolve_positions(specs, mask, b.get("pivot_positions"), seed=seed, row_offset=offset)
            except PositionError:
                if spec.texts is not None:  # names the dataset row
                    check_positions_on_sample(tokenizer, spec.texts, specs, batch_size, seed, tokenizer_kwargs,
                                              first_row=spec.row_start)
                raise
            for g, sel in res.token_dict.items():
                widths[g] = max(widths.get(g, 0), max(len(s) for s in sel))
                token_dict.setdefault(g, []).extend(sel)
            padded += int(mask.shape[0]) * int(mask.shape[1])
            longest = max(longest, int(mask.shape[1]))
            offset += int(mask.shape[0])
            batch_rows.append(int(mask.shape[0]))
        scanned.append(_Part(spec.part_id, spec.rows, widths, token_dict, padded, longest, batch_rows))
    return scanned, rows, count, firsts


def _meta_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(list(shape), dtype=dtype, device="meta")


class _Template:
    """The calibration part's record and shard headers: per key dtype, per-row shape and position axes."""

    def __init__(self, record: dict[str, Any], headers: dict[str, dict[str, Any]]) -> None:
        from ..slots import LAYOUT_KEY, SlotLayout
        from ..storage.shards import _FROM_CODE

        self.record = record
        self.rows = int(record["rows"])
        info = record.get("info") or {}
        self.layout = SlotLayout.from_json(info[LAYOUT_KEY]) if info.get(LAYOUT_KEY) else None
        self.keys = [k for k in record["keys"] if k in headers]
        self.dtype = {k: _FROM_CODE[headers[k]["dtype"]] for k in self.keys}
        self.shape = {k: list(headers[k]["shape"]) for k in self.keys}
        self.fixed_shards = [sh for sh in record["shards"] if not set(sh.get("tensors", {})) & set(self.keys)]

    def shape_for(self, key: str, part: _Part) -> list[int]:
        """The shape ``key`` has in ``part``: its rows, and each position axis as wide as the part's groups."""
        shape = list(self.shape[key])
        if not shape or shape[0] != self.rows:
            return shape  # not per row (e.g. averaged over examples): the same in every part
        shape[0] = part.rows
        axes = self.layout.keys.get(key, ()) if self.layout is not None else ()
        for dim, axis in enumerate(axes, start=1):
            shape[dim] = sum(part.widths.get(g, w) for g, w in self.layout.axes[axis])
        return shape

    def record_size(self, part: _Part, shards: list[tuple[list[str], int, int]], self_check: bool) -> int:
        """Bytes of ``part``'s record: the calibration record with this part's rows, selections and shards."""
        from ..slots import LAYOUT_KEY, mapping_of

        rec = copy.deepcopy(self.record)
        rec["part_id"], rec["rows"] = part.part_id, part.rows
        info = rec.get("info") or {}
        if "token_dict" in info and part.token_dict:
            info["token_dict"] = part.token_dict
        if self.layout is not None:
            axes = {a: [[g, part.widths.get(g, w)] for g, w in groups] for a, groups in self.layout.axes.items()}
            info[LAYOUT_KEY] = {**info[LAYOUT_KEY], "axes": axes}
            if "mapping_index" in info and "pos" in axes:
                info["mapping_index"] = mapping_of([(g, w) for g, w in axes["pos"]])
        template = next((sh for sh in self.record["shards"] if sh not in self.fixed_shards), None)
        digest = next(iter(template["tensors"].values()), "") if template else ""
        rec["shards"] = [{**(template or {}), "bytes": total, "header_bytes": head,
                          "tensors": {k: digest for k in keys}} for keys, total, head in shards]
        rec["shards"] += self.fixed_shards
        if not self_check:
            rec.pop("self_check", None)
        return len(json.dumps(rec, sort_keys=True).encode())


def _part_files(tpl: _Template, part: _Part, max_shard_bytes: int,
                coalesce: int) -> tuple[int, list[tuple[list[str], int, int]]]:
    """``(tensor bytes, [(keys, shard bytes, header bytes)])`` of one partition, split as a worker streams it: its
    batches' rows, small batches joined up to ``coalesce`` bytes (``streaming.coalesced``; a part averaged over
    examples is one write), each write split by size as ``plan_shards`` does."""
    from ..storage.shards import _header, plan_shards
    from ..storage.streaming import coalesced

    full = {k: tpl.shape_for(k, part) for k in tpl.keys}
    per_row = all(full[k] and full[k][0] == part.rows for k in tpl.keys)
    chunks = [part.rows]
    if per_row:
        row_bytes = sum(math.prod(full[k][1:]) * tpl.dtype[k].itemsize for k in tpl.keys)
        chunks, i = [], 0
        for g in coalesced([r * row_bytes for r in part.batch_rows], coalesce):
            chunks, i = chunks + [sum(part.batch_rows[i:i + g])], i + g
    out, total = [], 0
    for rows in chunks:
        tensors = {k: _meta_tensor([rows, *full[k][1:]] if per_row else full[k], tpl.dtype[k]) for k in tpl.keys}
        for keys in plan_shards(tensors, max_shard_bytes):
            group = {k: tensors[k] for k in keys}
            head, _ = _header(group, sorted(group, key=lambda k: -group[k].element_size()))
            data = sum(t.numel() * t.element_size() for t in group.values())
            out.append((keys, len(head) + data, len(head)))
            total += data
    return total, out


def _calibrate(worker: Any, firsts: list[Any], saver: Any, meta: dict[str, Any], settings: dict[str, Any],
               batch_size: int) -> dict[str, Any]:
    """Run the worker code on up to two small partitions of the first rows into a fresh in-memory store; return the
    first one's record and shard headers, the sizes of ``metadata.json`` and the timings."""
    from ..storage.fs import read_bytes, remove
    from ..storage.runs import RunWriter
    from ..storage.shards import _parse_header
    from ..tokenization import tokenize_batches
    from .job import ExtractionJob, StorageSpec
    from .partitions import PartitionSpec, fingerprint_texts

    first = firsts[0]
    if first.texts is not None:
        texts = first.texts[:2 * batch_size]
        a, b = texts[:batch_size], texts[batch_size:] or texts[:batch_size]
        dirs = first.token_directions
        da, db = (None, None) if dirs is None else (dirs[:len(a)], dirs[:len(b)])
        specs = [PartitionSpec(0, first.row_start, first.row_start + len(a), texts=a,
                               token_directions=da, fingerprint=fingerprint_texts(a)),
                 PartitionSpec(1, first.row_start + len(a) % len(texts), first.row_start + len(a) % len(texts) + len(b),
                               texts=b,
                               token_directions=db, fingerprint=fingerprint_texts(b))]
    else:  # pre-tokenised batches: the first partition, then the second (or the first again)
        second = firsts[1] if len(firsts) > 1 else first
        specs = [first, PartitionSpec(1, second.row_start, second.row_stop, batches=second.batches,
                                      token_directions=second.token_directions, fingerprint=second.fingerprint)]
    writer = RunWriter(f"memory://easyroutine-plan-{uuid.uuid4().hex}", max_shard_bytes=saver.writer.max_shard_bytes)
    try:
        run = writer.begin_run(saver.experiment_name, worker.model.model_name, meta)
        storage = StorageSpec(base_dir=writer.store.url(writer.store.root), max_shard_bytes=writer.max_shard_bytes)
        job = ExtractionJob(run=run, storage=storage, **settings)  # the job extract() would send, in memory
        seconds = []
        for spec in specs:
            t0 = time.perf_counter()
            worker.extract_part(job, spec)
            seconds.append(time.perf_counter() - t0)
        rdir = writer.store.path(run.rel)
        record = writer.committed_parts(run)[0]
        headers: dict[str, dict[str, Any]] = {}
        for sh in record["shards"]:
            raw = read_bytes(writer.store, f"{rdir}/shards/{sh['file']}", 0, sh["header_bytes"])
            for k, h in _parse_header(raw, sh["file"])[1].items():
                if k in headers and sh.get("rows") is not None:  # a streamed part: its row ranges add up
                    h = {**h, "shape": [headers[k]["shape"][0] + h["shape"][0], *h["shape"][1:]]}
                headers[k] = h
        meta_bytes = len(read_bytes(writer.store, writer.store.path(run.rel, "metadata.json")))
    finally:
        remove(writer.store, writer.store.root, recursive=True)
    second = specs[1]
    batches = second.batches if second.batches is not None else tokenize_batches(
        worker.model.hf_tokenizer, second.texts or [], batch_size, settings.get("tokenizer_kwargs"))
    padded = sum(int(torch.as_tensor(b["input_ids"]).numel()) for b in batches)
    return {"record": record, "headers": headers, "metadata_bytes": meta_bytes, "metadata": run.metadata,
            "first_seconds": seconds[0], "warm_seconds": seconds[1], "warm_padded_tokens": padded,
            "rows": [s.rows for s in specs]}


def _model_bytes(model: Any) -> int:
    hf = model.hf_model
    return sum(t.numel() * t.element_size() for t in [*hf.parameters(), *hf.buffers()] if t.device.type != "meta")


def _makespan(costs: list[float], workers: int) -> float:
    """Greedy dynamic scheduling (the next partition to the first free worker), as the driver does."""
    heap = [0.0] * max(1, workers)
    for c in costs:
        heapq.heappush(heap, heapq.heappop(heap) + c)
    return max(heap)


def plan_extraction(source: Any, dataset: Any, target_token_positions: list, extraction_config: Any, saver: Any, *,
                    num_workers: int = 1, num_gpus_per_worker: float = 0, batch_size: int = 8,
                    partition_size: int = 256, logit_lens: Optional[dict[str, Any]] = None,
                    interventions: Optional[list[Any]] = None, tokenizer_kwargs: Optional[dict[str, Any]] = None,
                    position_seed: int = 0, statistics: bool = False, self_check: str = "error",
                    text_column: str = "text", other_metadata: Optional[dict[str, Any]] = None,
                    tag: Optional[str] = None, max_rows: int = 20_000,
                    max_inflight_bytes: Optional[int] = None) -> ExtractionPlan:
    """Plan ``DistributedExtractor(source...).extract(dataset, ...)`` without Ray: see the module docstring.

    ``source``: a :class:`ModelSource` (``resolve_model_source``). Datasets over ``max_rows`` rows are tokenised on
    an even sample of partitions and scaled. A one-shot iterator dataset is consumed: pass a list or a Dataset."""
    from ..config import ExtractionConfig
    from ..positions import validate_specs
    from ..storage.layout import check_tag
    from ..storage.query import normalise
    from ..storage.runs import SCHEMA_VERSION
    from ..storage.streaming import check_inflight_bytes, coalesce_target
    from .lensing import check_lens_config, lens_metadata
    from .models import describe_source
    from .partitions import plan_dataset
    from .worker import ExtractionWorker

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be an int >= 1.")
    specs = validate_specs(list(target_token_positions))
    cfg = extraction_config if isinstance(extraction_config, ExtractionConfig) else (
        ExtractionConfig.from_dict(dict(extraction_config or {})))
    lens = check_lens_config(logit_lens)
    from ..selfcheck import check_mode

    mode = check_mode(self_check)
    dplan = plan_dataset(dataset, partition_size, text_column)
    directions = lens["token_directions"] if lens else None
    t0 = time.perf_counter()
    worker = ExtractionWorker(source, 0)  # in this process: no Ray, no actor
    load_seconds = time.perf_counter() - t0
    parts, n_rows, n_parts, firsts = _scan(dplan, worker.model.hf_tokenizer, specs, batch_size, int(position_seed),
                                          tokenizer_kwargs, directions, max_rows)
    info = worker.info()
    meta = {"target_token_positions": normalise(target_token_positions, "target_token_positions"),
            "position_seed": int(position_seed), "pivot_positions": None,
            "interventions": normalise(list(interventions or []), "interventions"),
            "extraction_config": normalise(cfg, "extraction_config"),
            "other_metadata": normalise(dict(other_metadata or {}), "other_metadata"), "tag": check_tag(tag),
            "logit_lens": lens_metadata(lens) if lens else None,
            "distributed": {"dataset": {**dplan.describe(), "n_rows": n_rows}, "batch_size": batch_size,
                            "num_workers": num_workers, "model_loading": describe_source(source),
                            "tokenizer_kwargs": normalise(dict(tokenizer_kwargs or {}), "tokenizer_kwargs")},
            "model_config": info["model_config"],
            "provenance": (None if info.get("provenance") is None
                           else {**info["provenance"], "dataset_fingerprint": None})}
    if statistics:
        meta["statistics"] = True
    settings = {"batch_size": batch_size, "target_token_positions": list(target_token_positions),
                "extraction_config": cfg.to_dict(), "interventions": list(interventions or []) or None,
                "logit_lens": {k: v for k, v in (lens or {}).items() if k != "token_directions"} or None,
                "tokenizer_kwargs": tokenizer_kwargs, "position_seed": int(position_seed),
                "statistics": bool(statistics), "self_check": mode}
    cal = _calibrate(worker, firsts, saver, meta, settings, batch_size)
    tpl = _Template(cal["record"], cal["headers"])
    max_shard = int(saver.writer.max_shard_bytes)
    budget = check_inflight_bytes(max_inflight_bytes)
    remote = not saver.store.is_local

    scanned_rows = sum(p.rows for p in parts)
    scale = n_rows / scanned_rows if scanned_rows else 1.0
    tensor_bytes = record_bytes = shard_bytes = n_shards = requests = 0
    part_max = shard_max = batch_max = 0
    key_bytes = {k: 0 for k in tpl.keys}
    widest: dict[str, list[int]] = {}
    fixed = sum(int(sh["bytes"]) for sh in tpl.fixed_shards)
    for i, part in enumerate(parts):
        data, shards = _part_files(tpl, part, max_shard, coalesce_target(max_shard, budget))
        tensor_bytes += data
        part_max = max(part_max, data)
        batch_max = max(batch_max, data * max(part.batch_rows or [part.rows]) // max(1, part.rows))
        record_bytes += tpl.record_size(part, shards, self_check=i < num_workers)
        for k in tpl.keys:
            shape = tpl.shape_for(k, part)
            key_bytes[k] += math.prod(shape) * tpl.dtype[k].itemsize
            widest[k] = [max(a, b) for a, b in zip(widest.get(k, shape[1:]), shape[1:])]
        sizes = [total for _, total, _ in shards] + [int(sh["bytes"]) for sh in tpl.fixed_shards]
        shard_bytes += sum(sizes)
        shard_max = max([shard_max, *sizes])
        n_shards += len(sizes)
        requests += 1 + sum(1 if not remote or s < MULTIPART_BYTES else math.ceil(s / MULTIPART_BYTES) + 2
                            for s in sizes)  # shards, then the record
    manifest = {"schema_version": SCHEMA_VERSION, "metadata": {**cal["metadata"], "self_check": None},
                "parts": list(range(n_parts)), "n_rows": n_rows}
    run_files = cal["metadata_bytes"] + len(json.dumps(manifest).encode())  # metadata.json, _SUCCESS
    total = int(round((shard_bytes + record_bytes) * scale)) + run_files
    requests = int(round(requests * scale)) + 3  # + metadata.json, _SUCCESS, the catalog entry

    spt = cal["warm_seconds"] / max(1, cal["warm_padded_tokens"])  # seconds per padded token, warm
    first_extra = max(0.0, cal["first_seconds"] - cal["warm_seconds"] * cal["rows"][0] / max(1, cal["rows"][1]))
    costs = [p.padded_tokens * spt for p in parts] * max(1, round(scale))
    seconds = load_seconds + first_extra + _makespan(costs, num_workers)
    shape = info["model_config"]
    hidden, vocab = int(shape.get("hidden_size") or 0), int(shape.get("vocab_size") or 0)
    longest = max((p.longest for p in parts), default=0)
    forward = 4 * batch_size * (longest * hidden * 12 + vocab)  # a layer's buffers (attention, MLP) + last logits
    weights = _model_bytes(worker.model)
    waiting = min(part_max, max(budget, batch_max))  # batches awaiting storage
    peak = (weights if num_gpus_per_worker <= 0 else 0) + waiting + batch_max + forward + (shard_max if remote else 0)
    assumptions = [
        f"workers compute as fast as this machine: {cal['rows'][1]} rows took {cal['warm_seconds']:.2f} s warm "
        f"({spt * 1e3:.3f} ms per padded token), the first partition {cal['first_seconds']:.2f} s (self-check), "
        f"the model loaded in {load_seconds:.1f} s; GPU workers will be faster",
        f"{num_workers} worker(s) load the model in parallel and take partitions as they free up; Ray start-up "
        "and storage latency are not included",
        "peak host memory: " + ("the model weights, " if num_gpus_per_worker <= 0 else "")
        + "the batches waiting for storage (max_inflight_bytes, or the largest partition if smaller), the batch "
        "being computed, one forward's working set"
        + (" and one shard's upload buffer" if remote else ""),
    ]
    if scale != 1.0:
        assumptions.append(f"{scanned_rows} of {n_rows} rows were tokenised (an even sample of partitions); "
                           "the rest is scaled by rows")
    keys = {k: {"dtype": str(tpl.dtype[k]).replace("torch.", ""), "shape_per_row": widest.get(k, []),
                "bytes": int(round(key_bytes[k] * scale))} for k in tpl.keys}
    return ExtractionPlan(rows=n_rows, partitions=n_parts, num_workers=num_workers, keys=keys, bytes=total,
                          tensor_bytes=int(round(tensor_bytes * scale)), shards=int(round(n_shards * scale)),
                          requests=requests, peak_host_bytes=int(peak), estimated_seconds=round(seconds, 2),
                          storage=saver.store.url(saver.store.root),
                          calibration={"load_seconds": round(load_seconds, 3),
                                       "first_partition_seconds": round(cal["first_seconds"], 3),
                                       "warm_seconds": round(cal["warm_seconds"], 3), "rows": cal["rows"],
                                       "seconds_per_padded_token": spt, "model_bytes": weights,
                                       "fixed_shard_bytes_per_partition": fixed},
                          assumptions=assumptions)


__all__ = ["ExtractionPlan", "plan_extraction"]
