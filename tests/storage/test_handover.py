"""Batches handed from DataLoader workers in reused shared memory (storage/handover.py): a buffer is reused only
after the main process dropped every reference to the batch it carried, so held batches and views never change.
Expected values are each batch's number, written by the worker and known to the test without the pool."""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate

from easyroutine_dist.storage import handover
from easyroutine_dist.storage.handover import Handover, new_batch

N, WIDTH = 40, 2048


class Numbered(IterableDataset):
    """``N`` batches; batch ``i`` is ``{"x": [WIDTH] float32 all i, "tag": [i, slot, generation]}``, built in
    pooled shared memory (``replace``: the worker swaps ``x`` for a fresh tensor before yielding)."""

    def __init__(self, replace: bool = False, reuse: bool = True) -> None:
        self.replace, self.reuse = replace, reuse

    def __iter__(self):
        for i in range(N):
            b = new_batch({"x": ((WIDTH,), torch.float32), "tag": ((3,), torch.int64)}, shared=True,
                          reuse=self.reuse)
            b["x"].fill_(i)
            b["tag"].copy_(torch.tensor([i, getattr(b, "_slot", -1), getattr(b, "_gen", 0)]))
            if self.replace:
                b["x"] = torch.full((WIDTH,), float(i))
            yield b


def loader(ds, **kw):
    return DataLoader(ds, batch_size=None, num_workers=1, **kw)


def test_batches_dropped_as_read_reuse_their_buffers_and_stay_right():
    seen = []
    for b in loader(Numbered()):
        i, slot, gen = b["tag"].tolist()
        assert torch.equal(b["x"], torch.full((WIDTH,), float(i)))  # nothing overwrote the batch being read
        seen.append((i, slot, gen))
    assert [i for i, _, _ in seen] == list(range(N))
    assert all(0 <= slot < handover.SLOTS for _, slot, _ in seen)
    assert max(gen for _, _, gen in seen) > 2  # buffers were handed out again (the test could catch a reuse bug)
    assert len({slot for _, slot, _ in seen}) < N


def test_batches_and_views_held_by_the_main_process_are_never_overwritten():
    held = list(loader(Numbered()))
    assert [int(b["tag"][0]) for b in held] == list(range(N))
    for i, b in enumerate(held):
        assert torch.equal(b["x"], torch.full((WIDTH,), float(i)))
    views = [(int(b["tag"][0]), b["x"][5:9]) for b in loader(Numbered())]  # only a view of each batch kept
    for i, v in views:
        assert torch.equal(v, torch.full((4,), float(i)))


def test_batches_changed_or_collated_in_the_worker_are_sent_whole():
    for i, b in enumerate(loader(Numbered(replace=True))):  # a key replaced: pickled as a plain dict
        assert int(b["tag"][0]) == i and torch.equal(b["x"], torch.full((WIDTH,), float(i)))
    batches = list(DataLoader(Numbered(), batch_size=4, num_workers=1, collate_fn=default_collate))
    assert len(batches) == N // 4
    for j, b in enumerate(batches):  # collated inside the worker: the stacked tensors arrive, not the pool's
        for r in range(4):
            assert int(b["tag"][r, 0]) == 4 * j + r
            assert torch.equal(b["x"][r], torch.full((WIDTH,), float(4 * j + r)))


def test_without_reuse_every_batch_has_fresh_memory():
    for i, b in enumerate(loader(Numbered(reuse=False))):
        assert int(b["tag"][0]) == i and int(b["tag"][1]) == -1
        assert torch.equal(b["x"], torch.full((WIDTH,), float(i)))


def test_a_buffer_never_released_is_replaced_not_reused(monkeypatch):
    """In this process no main process ever marks a buffer released: the pool hands out each slot once, then
    fresh memory; after STALE batches a slot gets a new buffer, and the old one keeps its contents."""
    monkeypatch.setattr(handover, "_POOL", None)
    first = new_batch({"x": ((8,), torch.float32)}, shared=True)
    assert isinstance(first, Handover)
    first["x"].fill_(7.0)
    kept = [new_batch({"x": ((8,), torch.float32)}, shared=True) for _ in range(handover.SLOTS - 1)]
    assert sorted(b._slot for b in [first, *kept]) == list(range(handover.SLOTS))
    extra = new_batch({"x": ((8,), torch.float32)}, shared=True)
    assert not isinstance(extra, Handover)  # every slot out and none stale: unpooled memory
    for _ in range(handover.STALE):
        b = new_batch({"x": ((8,), torch.float32)}, shared=True)
        if isinstance(b, Handover):
            break
    assert isinstance(b, Handover) and b._slot == first._slot and b._gen == first._gen + 1
    b["x"].fill_(1.0)
    assert b["x"].data_ptr() != first["x"].data_ptr()
    assert torch.equal(first["x"], torch.full((8,), 7.0))  # the stale batch's memory was not reused


@pytest.mark.parametrize("shared", [False, True])
def test_new_batch_lays_keys_out_aligned(shared, monkeypatch):
    monkeypatch.setattr(handover, "_POOL", None)
    specs = {"a": ((3, 5), torch.float16), "b": ((7,), torch.int64), "c": ((2, 2), torch.bool)}
    out = new_batch(specs, shared=shared)
    for k, (shape, dtype) in specs.items():
        assert out[k].shape == shape and out[k].dtype == dtype and out[k].data_ptr() % 8 == 0
    values = {"a": 2.0, "b": 3, "c": True}
    for k, v in out.items():
        v.fill_(values[k])
    assert all(bool((out[k] == values[k]).all()) for k in out)  # the views do not overlap


def test_a_batch_pickled_twice_is_never_handed_out_again(monkeypatch):
    """The second pickling of a batch sends untracked views of its buffer; the buffer must then stay out of the
    pool even when the first copy is released."""
    import pickle

    from multiprocessing.reduction import ForkingPickler

    monkeypatch.setattr(handover, "_POOL", None)
    b = new_batch({"x": ((8,), torch.float32)}, shared=True)
    first = ForkingPickler.dumps(b)
    assert handover._POOL.sent == {(b._slot, b._gen)}
    again = pickle.loads(ForkingPickler.dumps(copy_of(b)))  # untracked copy
    assert (b._slot, b._gen) in handover._POOL.poisoned
    handover._POOL.board[b._slot] = b._gen  # the tracked copy released
    for _ in range(handover.SLOTS + 2):
        nb = new_batch({"x": ((8,), torch.float32)}, shared=True)
        assert not (isinstance(nb, Handover) and nb._slot == b._slot and nb._gen > b._gen)
    assert again["x"].shape == (8,) and first


def copy_of(b):
    import copy

    return copy.copy(b)


def test_spawned_workers_hand_over_and_reuse_too():
    """Workers started with ``spawn`` (no state inherited from this process): the same protocol, the same values."""
    seen = []
    for b in DataLoader(Numbered(), batch_size=None, num_workers=1, multiprocessing_context="spawn", timeout=120):
        i, slot, gen = b["tag"].tolist()
        assert torch.equal(b["x"], torch.full((WIDTH,), float(i)))
        seen.append((i, gen))
    assert [i for i, _ in seen] == list(range(N)) and max(g for _, g in seen) > 2


def test_buffers_the_main_process_maps_are_handed_over_by_reference(monkeypatch):
    """Once the main process has released a buffer (so maps it), later batches in it travel without their storage
    (no descriptor, no new mapping); three batches are kept meanwhile and must never change. When the worker
    has exited, the main process lets its buffers go."""
    monkeypatch.setattr(handover, "JANITOR_S", 0.05)
    before = set(handover._PEERS)  # other tests' workers, maybe still alive
    it = iter(loader(Numbered()))  # the worker is forked here, with the module as it is
    calls = {"full": 0, "mapped": 0}
    full, mapped = handover._receive, handover._receive_mapped

    def counting(kind, fn):
        def wrapped(*args):
            calls[kind] += 1
            return fn(*args)
        return wrapped

    monkeypatch.setattr(handover, "_receive", counting("full", full))  # what unpickling here looks up
    monkeypatch.setattr(handover, "_receive_mapped", counting("mapped", mapped))
    kept = []
    for b in it:
        i = int(b["tag"][0])
        assert torch.equal(b["x"], torch.full((WIDTH,), float(i)))
        if i in (0, 10, 20):  # each holds a slot for good; the other slots keep turning
            kept.append((i, b))
    assert calls["mapped"] >= N // 2 and calls["full"] <= 2 * handover.SLOTS
    for i, b in kept:  # batches kept while their neighbours' buffers were reused by reference
        assert torch.equal(b["x"], torch.full((WIDTH,), float(i)))
    ours = set(handover._PEERS) - before
    assert len(ours) == 1  # this loader's worker, its buffers mapped here
    del it
    for _ in range(200):  # the worker exits when the iterator goes; then its buffers are dropped here
        if not ours & set(handover._PEERS):
            break
        time.sleep(0.05)
    assert not ours & set(handover._PEERS)
