"""Streamed part writes: a background thread writes a part's shards as its batches complete, memory bounded.

A worker hands each batch's tensors (``{key: [rows, ...]}`` on the host, already in the part's final slot layout:
every batch of a part has the same keys, dtypes and non-row dims) to a :class:`PartStream`. A writer thread
serialises, checksums and uploads each batch as shards of the part, ``shards/part-PPPPP-SSSS-<attempt>``, whose
records carry ``"rows": [a, b]`` (rows ``a..b`` of the part; a batch bigger than ``max_shard_bytes`` is split by
keys into several shards of the same rows), while the caller computes the next batch. Consecutive batches smaller
than :func:`coalesce_target` (4 MiB at most) are joined into one write, so small outputs make few objects.

Memory budget: the bytes handed to ``put`` and not yet written (queued, or being written) never exceed
``max_inflight_bytes`` (:data:`DEFAULT_MAX_INFLIGHT_BYTES`, 512 MiB); ``put`` blocks until they fit, so a forward
faster than its storage waits (backpressure) instead of growing memory. A single batch bigger than the budget
waits for an empty queue and then goes alone. An object-store upload also holds one shard's bytes joined into one
buffer while it runs (at most the batch, or ``max_shard_bytes``).

Commit protocol (unchanged): ``finish`` waits for the last shard and returns the part's record, which is not
committed; ``RunWriter.commit_part`` creates it afterwards, and only then is the part visible. A failed write stops
the stream: the next ``put`` or ``finish`` raises that error, no record is written, and ``abort`` removes the
shards this attempt wrote (what a crash leaves is listed as orphans by :mod:`.verify`, as for any attempt).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Optional

import torch

from ..cache import cat_rows
from ..errors import ConfigError, StorageError
from . import layout
from .fs import remove
from .shards import plan_shards, write_shard

#: default cap on a worker's batch bytes waiting for, or in, a shard write (``max_inflight_bytes``)
DEFAULT_MAX_INFLIGHT_BYTES = 512 * 1024**2
#: batches smaller than this are joined into one shard (fewer, larger objects: an object store is request-bound on
#: small ones); the target is also at most a quarter of the budget and at most ``max_shard_bytes``
COALESCE_BYTES = 4 * 1024**2
_MAX_SHARDS = 10_000  # shard indices have four digits (layout.shard_name)
_LOG = logging.getLogger(__name__)

__all__ = ["COALESCE_BYTES", "DEFAULT_MAX_INFLIGHT_BYTES", "PartStream", "check_inflight_bytes", "coalesce_target",
           "coalesced"]


def check_inflight_bytes(value: Any) -> int:
    """``value`` (None: the default) as a positive int of bytes; ConfigError naming the option otherwise."""
    if value is None:
        return DEFAULT_MAX_INFLIGHT_BYTES
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"max_inflight_bytes={value!r} must be an int >= 1 (bytes of batches waiting for storage "
                          f"per worker; default {DEFAULT_MAX_INFLIGHT_BYTES} = 512 MiB).")
    return int(value)


def coalesce_target(max_shard_bytes: int, budget: int) -> int:
    """Bytes up to which consecutive batches are joined into one shard write."""
    return max(1, min(int(max_shard_bytes), int(budget) // 4, COALESCE_BYTES))


def coalesced(sizes: list[int], target: int) -> list[int]:
    """How :meth:`PartStream.put` groups batches of ``sizes`` bytes into shard writes: batches per group, in order (a
    group is written once it reaches ``target``, or before a batch that would take it past ``target``)."""
    groups: list[int] = []
    count = acc = 0
    for n in sizes:
        if count and acc + n > target:
            groups.append(count)
            count = acc = 0
        count, acc = count + 1, acc + n
        if acc >= target:
            groups.append(count)
            count = acc = 0
    return groups + ([count] if count else [])


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class PartStream:
    """The shards of one attempt at one part, written by a background thread while batches keep coming.

    ``store``/``rdir``: where the run lives (``RunWriter.store``, ``store.path(run.rel)``); ``statistics=True``
    also merges each batch's statistics (over real slots, the parallel formula) into the part's statistics shard.
    """

    def __init__(self, store: Any, rdir: str, part_id: int, *, checksum: str, max_shard_bytes: int,
                 max_inflight_bytes: Optional[int] = None, statistics: bool = False) -> None:
        self.store, self.rdir, self.part_id = store, rdir, layout.check_part_id(part_id)
        self.attempt = layout.new_attempt()
        self.checksum, self.max_shard_bytes = checksum, int(max_shard_bytes)
        self.budget = check_inflight_bytes(max_inflight_bytes)
        self.coalesce = coalesce_target(self.max_shard_bytes, self.budget)
        self._group: list[tuple[int, int, dict[str, torch.Tensor]]] = []  # small batches joined into one write
        self._group_bytes = 0
        self._info: dict[str, Any] = {}
        self.rows = 0  # rows handed over so far
        self.shards: list[dict[str, Any]] = []  # written by the writer thread; read after it stopped
        self.peak_inflight = 0  # the most bytes ever waiting or being written (for tests and benchmarks)
        self.wait_seconds = 0.0  # how long put() blocked on the budget (backpressure)
        self._keys: Optional[list[str]] = None
        self._stats: Optional[dict[str, Any]] = {} if statistics else None
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._inflight = 0
        self._closed = False
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=f"part-{part_id}-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the caller's side
    def put(self, tensors: dict[str, torch.Tensor], info: Optional[dict[str, Any]] = None) -> None:
        """Hand over the next rows of the part, ``{key: [rows, ...]}`` (host tensors, the same keys in the same order
        in every call; ``info`` holds the ``slot_layout`` the statistics need). Blocks while the budget is full;
        raises the writer's error when a write failed."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if self._keys is None:
            self._keys = list(tensors)
        elif list(tensors) != self._keys:
            raise StorageError(f"part {self.part_id}: a batch has keys {list(tensors)}, the part's first batch had "
                               f"{self._keys}; every batch of a part must carry the same keys.")
        rows = {int(t.shape[0]) for t in tensors.values() if t.dim() > 0}
        if len(rows) != 1 or any(t.dim() == 0 for t in tensors.values()):
            raise StorageError(f"part {self.part_id}: a streamed batch needs [rows, ...] tensors with one row count, "
                               f"got {sorted(rows)} rows.")
        n, a = _nbytes(tensors), self.rows
        b = a + rows.pop()
        with self._cond:
            if self._group and self._group_bytes + n > self.coalesce:
                self._flush()  # before waiting: the group's bytes count in the budget until written
            t0 = time.perf_counter()
            while self._error is None and self._inflight > 0 and self._inflight + n > self.budget:
                self._cond.wait()
            self.wait_seconds += time.perf_counter() - t0
            if self._error is not None:
                raise self._error
            if self._closed:
                raise StorageError(f"part {self.part_id}: the stream is finished; nothing more can be written.")
            self._group.append((a, b, tensors))
            self._group_bytes += n
            self._inflight += n
            self._info = info or {}
            self.peak_inflight = max(self.peak_inflight, self._inflight)
            if self._group_bytes >= self.coalesce:
                self._flush()
        self.rows = b

    def _flush(self) -> None:
        """Queue the group of batches for the writer (the lock is held)."""
        if self._group:
            self._queue.append((self._group[0][0], self._group[-1][1], [t for _, _, t in self._group], self._info,
                                self._group_bytes))
            self._group, self._group_bytes = [], 0
            self._cond.notify_all()

    def finish(self, info: dict[str, Any]) -> dict[str, Any]:
        """Wait for the last shard; return the part's record ``{part_id, rows, keys, info, shards, attempt,
        checksum}`` (plus its statistics shard when asked). Not committed: ``RunWriter.commit_part`` does that."""
        with self._cond:
            if self._error is None:
                self._flush()
        self._close()
        if self._error is not None:
            raise self._error
        if self._keys is None:
            raise StorageError(f"part {self.part_id}: no batch was written; a part needs at least one row.")
        record = {"part_id": self.part_id, "rows": self.rows, "keys": list(self._keys), "info": info,
                  "shards": list(self.shards), "attempt": self.attempt, "checksum": self.checksum}
        if self._stats is not None:
            from .stats import write_part_statistics

            write_part_statistics(self.store, self.rdir, record, self._stats)
        return record

    def abort(self) -> None:
        """Stop the writer (after the write in progress) and remove the shards this attempt wrote (best effort)."""
        with self._cond:
            self._queue.clear()
            self._group, self._group_bytes = [], 0
            self._inflight = 0
            if self._error is None:
                self._error = StorageError(f"part {self.part_id}: the stream was aborted.")
            self._cond.notify_all()
        self._close()
        for sh in self.shards:
            try:
                remove(self.store, f"{self.rdir}/shards/{sh['file']}")
            except StorageError as exc:  # an orphan, listed by verify.scan_run
                _LOG.warning("part %d: cannot remove shard %s of a failed attempt (%s)", self.part_id, sh["file"], exc)

    def _close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    # ------------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed and self._error is None:
                    self._cond.wait()
                if not self._queue or self._error is not None:
                    return
                item = self._queue[0]  # counted in the budget until written
            try:
                self._write(*item[:4])
            except BaseException as exc:  # noqa: BLE001 - handed to the caller by put()/finish()
                with self._cond:
                    self._error = exc
                    self._queue.clear()
                    self._inflight = 0
                    self._cond.notify_all()
                return
            with self._cond:
                if self._queue and self._queue[0] is item:
                    self._queue.popleft()
                    self._inflight -= item[4]
                self._cond.notify_all()

    def _write(self, a: int, b: int, chunks: list[dict[str, torch.Tensor]], info: dict[str, Any]) -> None:
        tensors = chunks[0] if len(chunks) == 1 else {k: cat_rows([c[k] for c in chunks]) for k in chunks[0]}
        for keys in plan_shards(tensors, self.max_shard_bytes):
            index = len(self.shards)
            if index + 1 >= _MAX_SHARDS:  # one more index stays free for the statistics shard
                raise StorageError(f"part {self.part_id} would need more than {_MAX_SHARDS - 1} shards; use bigger "
                                   "batches, fewer rows per partition or a larger max_shard_bytes.")
            path = f"{self.rdir}/{layout.shard_name(self.part_id, index, self.attempt)}"
            shard = write_shard(self.store, path, {k: tensors[k] for k in keys}, self.checksum)
            shard["rows"] = [a, b]
            self.shards.append(shard)
        if self._stats is not None:
            from ..statistics import cache_statistics, merge_statistics

            self._stats = merge_statistics(self._stats, cache_statistics((tensors, info)))
