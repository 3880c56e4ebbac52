"""A streaming PyTorch reader over a stored run: every row (or real token slot) once per epoch, across ranks and
DataLoader workers, with bounded prefetch and a reproducible shuffle buffer.

How an epoch is split (``T = world_size x DataLoader workers`` readers; reader ``g = rank x workers + worker id``):

1. The run's parts are put in one order for the epoch: part-id order, or (``shuffle=True``) a permutation drawn from
   ``(seed, epoch)`` only, so every rank and every worker computes the same order without talking to the others.
2. The rows of the parts, in that order, form one sequence of ``N`` rows; reader ``g`` takes positions
   ``[g*N//T, (g+1)*N//T)``. Uneven splits are **shared**: a part straddling a boundary is read by both readers and
   each keeps its own rows, so nothing is dropped or padded, every row goes to exactly one reader, and readers
   differ by at most one row (with ``unit="tokens"``, by the real slots of their rows). Readers beyond ``N`` get
   nothing.
3. A reader loads ``prefetch + 1`` parts at a time on a small thread pool, with at most ``prefetch`` requests in
   flight (only the requested keys, by byte ranges, each checksummed), pushes their rows or real token slots
   through a shuffle buffer of ``shuffle_buffer`` samples (seeded from ``(seed, epoch, g)``) and yields batches of
   ``batch_size`` (the reader's last batch may be smaller).

Memory per reader: about ``prefetch + 2`` parts' requested tensors (``prefetch + 1`` being read or waiting, one
being batched) plus the parts the shuffle pool still draws from (at most ``4 x (shuffle_buffer + batch_size)``
rows or slots of them, or twice its pending samples when parts are bigger: then the stragglers of the sparsest
parts are compacted), whatever the run's size; in a DataLoader worker, also up to ``handover.SLOTS`` (6) batches
of shared memory kept for reuse.
Call ``set_epoch(n)`` before each epoch: the epoch lives in shared memory, so the DataLoader's workers see it,
persistent ones included (``persistent_workers=True`` also keeps each worker's S3 client). The same
``(seed, epoch, world_size, num_workers)`` gives the same batches.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import ConfigError, StorageError
from ..slots import LAYOUT_KEY, MASK_KEYS, POS, VALID_KEY, SlotLayout, relayout
from ..statistics import sample_mask
from .fs import Store, resolve
from .batching import Batcher, Gather
from .runs import read_marker, run_dir
from .shards import read_part_shards
from .stats import ordered_map, stored_statistics

UNITS = ("rows", "tokens")
#: default requests in flight per reader: 3 keeps one worker's S3 reads ahead of its batching (docs/performance.md)
PREFETCH = 3
NORMALIZE = (None, "mean_std", "norm")

__all__ = ["PREFETCH", "RunDataset"]


@dataclass
class _Part:
    """What a reader needs of one part record: rows, its first global row, the shards to read and its layout."""

    part_id: int
    rows: int
    start: int
    shards: list[dict[str, Any]]
    layout: Optional[SlotLayout]


_STORES: dict[tuple[int, str, str], Store] = {}


def _process_store(store: Store) -> Store:
    """``store`` for this (DataLoader worker) process: object-store clients do not survive a fork, so each process
    opens its own, once (kept for later epochs of persistent workers)."""
    if store.is_local or store.protocol == "memory":
        return store
    key = (os.getpid(), store.url(store.root), json.dumps(_options_key(store.storage_options), sort_keys=True))
    if key not in _STORES:
        _STORES[key] = resolve(store.url(store.root), store.storage_options)
    return _STORES[key]


def _options_key(options: dict[str, Any]) -> Any:
    """A hashable description of storage options (values as their repr; only compared in this process)."""
    return {str(k): repr(v) for k, v in (options or {}).items()}


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (deterministic across processes, unlike ``hash``)."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def _default_rank(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
    rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size={world_size!r} must be an int >= 1.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank!r} must be an int in [0, world_size={world_size}).")
    return rank, world_size


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an int >= 1.")
    return value


class RunDataset(IterableDataset):
    """Batches of one stored run, streamed part by part (local disk, S3, any fsspec store).

    Yields dicts: the requested ``keys`` (``unit="rows"``: ``[B, P, ...]`` in the run's merged slot layout, as
    ``QueryResult.load`` returns them, plus ``valid_mask`` ``[B, P]`` when the run has one; ``unit="tokens"``: one
    sample per *real* slot of the ``"pos"`` axis, ``[B, *features]``, keys without position axis repeated for each
    slot of their row), ``row_index`` ``[B]`` (the row in the run) and, for tokens, ``slot`` ``[B]`` (the slot in the
    merged layout: ``mapping_index`` of the loaded run tells its group). ``normalize``: ``"mean_std"``
    (``(x - mean) / std`` per feature, std 0 counted as 1) or ``"norm"`` (``x / norm_mean``: mean L2 norm 1), from
    the run's stored statistics (float32 out; padded slots stay 0). The run must have been saved with
    ``statistics=True`` for that. The split over ranks and workers is described in :mod:`.reader`.

    In DataLoader workers, batches are built in shared memory that each worker reuses once the main process holds
    no tensor (nor view) of the batch any more (:mod:`.handover`); a batch kept, even as a view, is never
    overwritten. Clone a batch before sending it on to another process, or pass ``reuse_batch_memory=False``.
    ``prefetch``: shard requests in flight per reader (None: :data:`PREFETCH`, 3; memory grows by a part per
    request). From object storage, use ``num_workers >= 2``: one process's S3 client and batching share its CPU.
    """

    def __init__(self, store: Store, entry: dict[str, Any], keys: Optional[list[str]] = None, unit: str = "rows",
                 batch_size: int = 256, shuffle: bool = True, seed: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None, shuffle_buffer: int = 8192, prefetch: Optional[int] = None,
                 normalize: Optional[str] = None, reuse_batch_memory: bool = True) -> None:
        super().__init__()
        if unit not in UNITS:
            raise ConfigError(f"unit={unit!r} must be one of {list(UNITS)}.")
        if normalize not in NORMALIZE:
            raise ConfigError(f"normalize={normalize!r} must be one of {list(NORMALIZE)}.")
        self.batch_size = _positive("batch_size", batch_size)
        self.shuffle_buffer = _positive("shuffle_buffer", shuffle_buffer)
        self.prefetch = _positive("prefetch", PREFETCH if prefetch is None else prefetch)
        self.rank, self.world_size = _default_rank(rank, world_size)
        self.unit, self.shuffle, self.seed = unit, bool(shuffle), int(seed)
        self.reuse_batch_memory = bool(reuse_batch_memory)
        #: in shared memory: persistent DataLoader workers (forked or spawned) see set_epoch of the main process
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.store, self.run_id = store, entry.get("run_id")
        self.rdir = run_dir(store, entry)
        records = read_marker(store, self.rdir)["records"]
        if not len(records):
            raise StorageError(f"run {self.run_id} has no parts; there is nothing to read.")
        first = records[0]
        self.keys = [k for k in first["keys"] if k not in MASK_KEYS] if keys is None else list(keys)
        if not self.keys:
            raise ConfigError(f"no keys to read: run {self.run_id} has tensor keys {first['keys']}.")
        self.parts = self._read_parts(records)
        self.n_rows = sum(p.rows for p in self.parts)
        self.layout = self._run_layout()
        self._check_keys()
        self.norm = self._norm_constants(normalize, entry) if normalize else {}

    # ------------------------------------------------------------------ set-up (driver / main process)
    def _read_parts(self, records: Any) -> list[_Part]:
        wanted = set(self.keys) | set(MASK_KEYS)
        parts, start = [], 0

        def slim(i: int) -> _Part:
            rec = records[i]
            missing = [k for k in self.keys if k not in rec["keys"]]
            if missing:
                raise ConfigError(f"run {self.run_id}: part {rec['part_id']} has no keys {missing}; it has "
                                  f"{rec['keys']}.")
            raw = (rec.get("info") or {}).get(LAYOUT_KEY)
            shards = [sh for sh in rec["shards"] if wanted & set(sh.get("tensors", {}))]
            return _Part(int(rec["part_id"]), int(rec["rows"]), 0, shards,
                         None if raw is None else SlotLayout.from_json(raw))

        for p in ordered_map(slim, range(len(records))):  # records are small: read 8 at a time
            p.start, start = start, start + p.rows
            parts.append(p)
        return parts

    def _run_layout(self) -> Optional[SlotLayout]:
        layouts = [p.layout for p in self.parts]
        if all(lay is None for lay in layouts):
            return None
        if any(lay is None for lay in layouts):
            raise StorageError(f"run {self.run_id}: some parts have a slot layout and others not; it cannot be read "
                               "as one dataset.")
        merged = layouts[0]
        for lay in layouts[1:]:
            merged = merged.merge(lay)
        return merged

    def _axes(self, key: str) -> tuple[str, ...]:
        return tuple(self.layout.keys.get(key, ())) if self.layout is not None else ()

    def _check_keys(self) -> None:
        if self.unit != "tokens":
            return
        has_mask = all(any(VALID_KEY in sh.get("tensors", {}) for sh in p.shards) for p in self.parts)
        if self.layout is None or POS not in self.layout.axes or not has_mask:
            raise ConfigError(f"unit='tokens' needs a run with a slot layout and '{VALID_KEY}' (extracted with "
                              f"HookedModel.forward/extract_cache); run {self.run_id} has none. Use unit='rows'.")
        bad = [k for k in self.keys if self._axes(k) not in ((), (POS,))]
        if bad:
            raise ConfigError(f"unit='tokens' reads keys on the 'pos' axis (or per-row keys); {bad} carry "
                              f"{[self._axes(k) for k in bad]}. Read them with unit='rows'.")

    def _norm_constants(self, normalize: str, entry: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{key: (shift, scale)}`` float32, applied as ``(x - shift) / scale``."""
        stats = stored_statistics(self.store, entry)
        out = {}
        for k in self.keys:
            if k not in stats:
                continue
            m = stats[k][1].summary()
            if normalize == "mean_std":
                std = m["var"].sqrt()
                out[k] = (m["mean"].float(), torch.where(std > 0, std, torch.ones_like(std)).float())
            else:
                out[k] = (torch.zeros(()), torch.tensor(m["norm_mean"] if m["norm_mean"] > 0 else 1.0))
        return out

    # ------------------------------------------------------------------ epochs
    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: the part order and every shuffle derive from ``(seed, epoch)``. Call it before
        iterating; workers of a DataLoader with ``persistent_workers=True`` see it too."""
        self._epoch[0] = int(epoch)

    def part_order(self, epoch: Optional[int] = None) -> list[int]:
        """Indices into ``parts`` in the order of ``epoch`` (the same on every rank and worker)."""
        n = len(self.parts)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch if epoch is None else epoch))
        return torch.randperm(n, generator=g).tolist()

    def assignment(self, reader: int, readers: int, epoch: Optional[int] = None) -> list[tuple[int, int, int]]:
        """``[(part index, first row, end row)]`` of reader ``reader`` of ``readers`` in ``epoch``: its share of the
        epoch's row sequence (parts straddling a boundary are shared by row)."""
        lo, hi = self.n_rows * reader // readers, self.n_rows * (reader + 1) // readers
        out, off = [], 0
        for i in self.part_order(epoch):
            rows = self.parts[i].rows
            a, b = max(lo, off) - off, min(hi, off + rows) - off
            if a < b:
                out.append((i, a, b))
            off += rows
        return out

    # ------------------------------------------------------------------ reading (in the DataLoader worker)
    def _load(self, store: Store, i: int, a: int, b: int, gate: Any = None) -> dict[str, torch.Tensor]:
        """Rows ``a..b`` of part ``i`` as samples (``gate``: held around each request)."""
        part = self.parts[i]
        wanted = list(self.keys) + [k for k in MASK_KEYS if k not in self.keys]
        # rows joined; without a copy of the fetched bytes unless unshuffled rows are yielded as views of them
        tensors = read_part_shards(store, f"{self.rdir}/shards", part.shards, wanted, part.rows,
                                   copy=self.unit == "rows" and not self.shuffle, gate=gate)
        tensors = {k: v[a:b] for k, v in tensors.items()}
        first_row = part.start + a
        if self.unit == "tokens":
            return self._tokens(part, tensors, first_row)
        out: dict[str, torch.Tensor] = {}
        extra = [VALID_KEY] if VALID_KEY in tensors and any(POS in self._axes(k) for k in self.keys) else []
        for k in self.keys + extra:
            t = tensors[k]
            if part.layout is not None:
                t = relayout(t, k, part.layout, self.layout)
            out[k] = t
        moved = {k: relayout(tensors[k], k, part.layout, self.layout) if part.layout is not None else tensors[k]
                 for k in MASK_KEYS if k in tensors}
        for k in self.norm:
            mask = sample_mask(moved, self._axes(k), out[k])
            out[k] = self._normalise(k, out[k])
            if mask is not None:  # padded slots stay zero
                out[k] = out[k] * mask.reshape(*mask.shape, *([1] * (out[k].dim() - mask.dim())))
        out["row_index"] = torch.arange(first_row, first_row + (b - a), dtype=torch.int64)
        return out

    def _tokens(self, part: _Part, tensors: dict[str, torch.Tensor], first_row: int) -> dict[str, torch.Tensor]:
        mask = tensors[VALID_KEY].to(torch.bool)
        r, s = mask.nonzero(as_tuple=True)
        flat = r * mask.shape[1] + s
        out: dict[str, Any] = {}
        for k in self.keys:  # rows x slots flattened (a view), gathered later straight into the shuffle buffer
            t = tensors[k]
            out[k] = Gather(t.reshape(-1, *t.shape[2:]), flat) if self._axes(k) == (POS,) else Gather(t, r)
        out["row_index"] = r.to(torch.int64) + first_row
        out["slot"] = self._slot_map(part)[s]
        return out

    def _slot_map(self, part: _Part) -> torch.Tensor:
        """Part slot -> slot in the run's merged layout, ``[P_part]`` int64."""
        src, dst = part.layout.axes[POS], self.layout.axes[POS]
        out, d_off = [], 0
        for (_, ws), (_, wd) in zip(src, dst):
            out.extend(range(d_off, d_off + ws))
            d_off += wd
        return torch.tensor(out, dtype=torch.int64)

    def _finish(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Token batches are normalised here, once gathered (row batches are normalised per part, with padding):
        in place when float32 (the batch is this reader's own copy; in a worker its shared buffer stays in use)."""
        if self.unit == "tokens":
            for k in self.norm:
                batch[k] = self._normalise(k, batch[k], in_place=True)
        return batch

    def _normalise(self, key: str, x: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """``(x - shift) / scale`` as float32; ``in_place``: into ``x`` itself when it is float32 already."""
        shift, scale = self.norm[key]
        if in_place and x.dtype == torch.float32:
            return x.sub_(shift).div_(scale)
        return (x.float() - shift) / scale

    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + wid, self.world_size * workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        g, readers = self._reader()
        store = _process_store(self.store) if get_worker_info() is not None else self.store
        plan = self.assignment(g, readers)
        gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch, g, readers)) if self.shuffle else None
        batcher = Batcher(self.batch_size, self.shuffle_buffer, gen, shared=get_worker_info() is not None,
                          reuse=self.reuse_batch_memory)
        # prefetch + 1 parts under way, at most `prefetch` requests in flight (the gate): a thread checking a part
        # it fetched, or done before the part ahead of it is taken, does not hold back the next request
        pool = ThreadPoolExecutor(self.prefetch + 1, thread_name_prefix="run-reader")
        gate = threading.BoundedSemaphore(self.prefetch)
        pending: deque = deque()
        todo = iter(plan)
        try:
            for item in todo:
                pending.append(pool.submit(self._load, store, *item, gate))
                if len(pending) > self.prefetch:
                    break
            while pending:
                samples = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(self._load, store, *nxt, gate))
                for batch in batcher.add(samples):
                    yield self._finish(batch)
            for batch in batcher.flush():
                yield self._finish(batch)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
