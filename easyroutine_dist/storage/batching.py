"""Samples of parts -> batches: in arrival order, or drawn at random from a shuffle pool that refers to the parts
(each sample copied once, straight into its batch). Used by :mod:`.reader`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ..cache import cat_rows
from .handover import new_batch

__all__ = ["Batcher", "Gather"]


@dataclass
class Gather:
    """``src.index_select(0, idx)``, done only where its rows land (the shuffle buffer): one copy, not two."""

    src: torch.Tensor
    idx: torch.Tensor

    def __len__(self) -> int:
        return int(self.idx.shape[0])

    def materialise(self) -> torch.Tensor:
        return self.src.index_select(0, self.idx)


def _n(d: dict[str, Any]) -> int:
    return len(next(iter(d.values())))


def _real(v: Any) -> torch.Tensor:
    return v.materialise() if isinstance(v, Gather) else v


@dataclass
class _Chunk:
    """One part's samples in the shuffle pool: its columns (``{key: (source, row index or None)}``), its samples in
    a random order drawn on arrival, and how many of them have been drawn."""

    cols: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]]
    order: torch.Tensor
    drawn: int = 0

    @property
    def left(self) -> int:
        return int(self.order.shape[0]) - self.drawn


class Batcher:
    """Batches of ``batch_size`` samples. Without a generator: in arrival order. With one: a shuffle pool of about
    ``capacity`` pending samples that *refers* to the parts they came from (nothing is copied into a buffer); each
    batch is ``batch_size`` samples drawn uniformly without replacement from the pool, gathered straight from their
    parts into the batch, so every sample is copied once.

    How a batch is drawn: each part's samples are put in a random order when the part arrives; a batch takes the
    *count* of samples per part of a uniform draw of ``batch_size`` of the pool's ``n`` pending samples (one
    multivariate hypergeometric draw, O(parts), from a numpy generator seeded from ``generator``), then that many
    samples from the front of each part's order. That is the same distribution as drawing the samples themselves
    (a uniform subset of a part's pending samples, of the drawn size), with one ``index_select`` per part and key.
    Within a batch, samples come grouped by part (the batch's contents are the random draw; its order does not
    matter to a loss averaged over the batch). A part is released when its last
    pending sample is drawn. When the parts referred to exceed ``4 x (capacity + batch_size)`` samples, the
    pending samples of the sparsest parts (at most half pending) are compacted into one chunk, so the pool refers
    to at most ``max(4 x (capacity + batch_size), 2 x pending)`` samples and copies at most as many as it frees."""

    def __init__(self, batch_size: int, capacity: int, generator: Optional[torch.Generator], shared: bool = False,
                 reuse: bool = True) -> None:
        self.batch_size, self.capacity, self.gen = batch_size, capacity, generator
        self.rng = None if generator is None else np.random.default_rng(
            int(torch.randint(0, 2**62, (1,), generator=generator)))
        self.shared, self.reuse = shared, reuse  # batches in (reused) shared memory: see .handover
        self.chunks: list[_Chunk] = []
        self.n = 0  # pending samples
        self.carry: list[dict[str, torch.Tensor]] = []  # in-order mode: samples not yet in a batch

    def _held(self) -> int:
        """Samples of the parts the pool still refers to (drawn or not): what it keeps in memory."""
        return sum(int(c.order.shape[0]) for c in self.chunks)

    def _append(self, samples: dict[str, Any]) -> None:
        m = _n(samples)
        cols = {k: (v.src, v.idx) if isinstance(v, Gather) else (v, None) for k, v in samples.items()}
        self.chunks.append(_Chunk(cols, torch.randperm(m, generator=self.gen)))
        self.n += m
        if self._held() > 4 * (self.capacity + self.batch_size):
            self._compact()

    def _gather(self, counts: list[int], batch: bool = True) -> dict[str, torch.Tensor]:
        """The next ``counts[i]`` samples of chunk ``i``'s order, each copied once into new contiguous tensors (for
        a ``batch``: shared memory in a DataLoader worker), and marked drawn."""
        first = self.chunks[0].cols
        out = new_batch({k: ((sum(counts), *src.shape[1:]), src.dtype) for k, (src, _) in first.items()},
                        batch and self.shared, self.reuse)
        a = 0
        for chunk, cnt in zip(self.chunks, counts):
            if not cnt:
                continue
            local = chunk.order[chunk.drawn:chunk.drawn + cnt]
            chunk.drawn += cnt
            for k, (src, idx) in chunk.cols.items():
                rows = local if idx is None else idx.index_select(0, local)
                torch.index_select(src, 0, rows, out=out[k][a:a + cnt])
            a += cnt
        return out

    def _compact(self) -> None:
        """Copy the pending samples of the sparsest parts (at most half of each part still pending) into one chunk,
        sparsest first, until the pool refers to at most half its bound: each copy frees at least as much memory
        as it copies, and parts still mostly pending are never copied."""
        target, held = 2 * (self.capacity + self.batch_size), self._held()
        picked: set[int] = set()
        for i in sorted(range(len(self.chunks)), key=lambda j: self.chunks[j].left / len(self.chunks[j].order)):
            c = self.chunks[i]
            if held <= target or 2 * c.left > len(c.order):
                break
            picked.add(i)
            held -= len(c.order) - c.left
        if not picked:
            return
        counts = [c.left if i in picked else 0 for i, c in enumerate(self.chunks)]
        total = sum(counts)
        merged = self._gather(counts, batch=False)
        rest = [c for i, c in enumerate(self.chunks) if i not in picked]
        order = torch.randperm(total, generator=self.gen)
        self.chunks = rest + [_Chunk({k: (v, None) for k, v in merged.items()}, order)]

    def _take(self, count: int) -> dict[str, torch.Tensor]:
        """``count`` samples drawn at random from the pool, removed from it."""
        lefts = [c.left for c in self.chunks]
        if count >= self.n:
            counts = lefts
        else:  # how many of each part a uniform draw of `count` pending samples holds
            counts = self.rng.multivariate_hypergeometric(lefts, count).tolist()
        batch = self._gather(counts)
        self.n -= count
        self.chunks = [c for c in self.chunks if c.left]  # a part whose last sample is out is released
        return batch

    def _in_order(self, final: bool) -> Iterator[dict[str, torch.Tensor]]:
        total = sum(_n(c) for c in self.carry)
        if not total or (total < self.batch_size and not final):
            return
        joined = self.carry[0] if len(self.carry) == 1 else {k: cat_rows([c[k] for c in self.carry])
                                                             for k in self.carry[0]}
        full = total - total % self.batch_size if not final else total
        for i in range(0, full, self.batch_size):
            views = {k: v[i:min(i + self.batch_size, full)] for k, v in joined.items()}
            if not self.shared:
                yield views
                continue
            out = new_batch({k: (tuple(v.shape), v.dtype) for k, v in views.items()}, True, self.reuse)
            for k, v in views.items():
                out[k].copy_(v)
            yield out
        self.carry = [{k: v[full:] for k, v in joined.items()}] if full < total else []

    def add(self, samples: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        if not _n(samples):
            return
        if self.gen is None:
            self.carry.append({k: _real(v) for k, v in samples.items()})
            yield from self._in_order(False)
            return
        self._append(samples)
        while self.n >= self.capacity + self.batch_size:
            yield self._take(self.batch_size)

    def flush(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.gen is None:
            yield from self._in_order(True)
            return
        while self.n:
            yield self._take(min(self.batch_size, self.n))
