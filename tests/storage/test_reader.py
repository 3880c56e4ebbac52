"""QueryResult.torch_dataset (storage/reader.py): every row / real token slot exactly once over 2 ranks x 2 DataLoader
workers (local disk, memory://, S3), values equal to the loaded run, reproducible shuffles, normalisation from the
stored statistics, bounded prefetch."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.distributed import tokenize_batches
from easyroutine_dist.errors import ConfigError, StorageError

from ..distributed.tiny import char_tokenizer, prompts
from ..models import hooked
from .test_statistics import write_run

CHUNKS = [(0, 7), (7, 9), (9, 19), (19, 23)]
KEYS = ["resid_out_1", "logits"]


@pytest.fixture(scope="module")
def part_caches():
    model = hooked("llama")
    texts = prompts(23, seed=5)
    cfg = ExtractionConfig(extract_resid_out=True, save_logits=True)
    return [model.extract_cache(tokenize_batches(char_tokenizer(), texts[a:b], 4), ["all", "last"],
                                extraction_config=cfg, row_offset=a) for a, b in CHUNKS]


@pytest.fixture
def stored(local_backend, part_caches):
    """(QueryResult, the loaded run) of a 4-part local run with statistics."""
    write_run(local_backend.saver("reader"), part_caches)
    q = local_backend.loader("reader").query()
    return q, q.load()[0]


def epoch(q, world_size=2, workers=2, epoch_no=0, **kw):
    """Every batch of one epoch over ``world_size`` ranks, each through a DataLoader with ``workers`` workers."""
    out = []
    for rank in range(world_size):
        ds = q.torch_dataset(rank=rank, world_size=world_size, **kw)
        ds.set_epoch(epoch_no)
        out.extend(DataLoader(ds, batch_size=None, num_workers=workers))
    return out


def check_rows(batches, cache, keys=KEYS):
    rows = torch.cat([b["row_index"] for b in batches])
    assert sorted(rows.tolist()) == list(range(cache["valid_mask"].shape[0]))  # each row exactly once
    for b in batches:
        for k in keys:
            assert torch.equal(b[k], cache[k][b["row_index"]]), k
        assert torch.equal(b["valid_mask"], cache["valid_mask"][b["row_index"]])


def check_tokens(batches, cache, keys=KEYS):
    pairs = [(r, s) for b in batches for r, s in zip(b["row_index"].tolist(), b["slot"].tolist())]
    real = {tuple(p) for p in cache["valid_mask"].nonzero().tolist()}
    assert len(pairs) == len(set(pairs)) == len(real) and set(pairs) == real  # each real slot exactly once
    for b in batches:
        for k in keys:
            assert torch.equal(b[k], cache[k][b["row_index"], b["slot"]]), k


def test_exactly_once_over_two_ranks_and_two_workers(backend, part_caches):
    write_run(backend.saver("reader"), part_caches)
    q = backend.loader("reader").query()
    cache = q.load()[0]
    assert not cache["valid_mask"].all()
    check_rows(epoch(q, keys=KEYS, unit="rows", batch_size=3, shuffle_buffer=6), cache)
    check_tokens(epoch(q, keys=KEYS, unit="tokens", batch_size=16, shuffle_buffer=40), cache)


def test_shuffles_are_reproducible_and_change_with_the_epoch_and_seed(stored):
    q, cache = stored

    def order(**kw):
        batches = epoch(q, unit="tokens", keys=["resid_out_1"], batch_size=8, shuffle_buffer=32, **kw)
        return [(b["row_index"].tolist(), b["slot"].tolist()) for b in batches], batches

    first, batches = order(epoch_no=0)
    again, batches_again = order(epoch_no=0)
    assert first == again
    assert all(torch.equal(a["resid_out_1"], b["resid_out_1"]) for a, b in zip(batches, batches_again))
    second, later = order(epoch_no=1)
    assert second != first
    check_tokens(later, cache, ["resid_out_1"])  # another epoch: still every real slot once
    assert order(epoch_no=0, seed=7)[0] != first
    # the shuffle is real: rows of several parts meet in one batch, and not in dataset order
    flat = [r for rows, _ in first for r in rows]
    assert flat != sorted(flat)
    part_of = [sum(r >= a for a, _ in CHUNKS) for r in range(23)]
    assert any(len({part_of[r] for r in rows}) > 1 for rows, _ in first)
    plain, _ = order(shuffle=False)
    for rows, slots in plain:  # no shuffle: each reader yields its rows in order
        assert [(r, s) for r, s in zip(rows, slots)] == sorted(zip(rows, slots))


def test_more_readers_than_rows_and_uneven_shares(stored):
    q, cache = stored
    batches = []
    for rank in range(30):  # 30 readers for 23 rows: some get nothing
        batches.extend(q.torch_dataset(rank=rank, world_size=30, keys=KEYS, batch_size=2, shuffle=True))
    check_rows(batches, cache)
    ds = q.torch_dataset(rank=0, world_size=3, keys=KEYS)
    shares = [sum(b - a for _, a, b in ds.assignment(g, 3)) for g in range(3)]
    assert sum(shares) == 23 and max(shares) - min(shares) <= 1  # shared parts: balanced to one row


def test_normalisation_uses_the_stored_statistics(stored):
    q, cache = stored
    vm = cache["valid_mask"]
    x = cache["resid_out_1"][vm].double()  # expected constants, with plain torch over the real slots
    mean, std = x.mean(0), x.var(0, correction=0).sqrt()
    norm_mean = x.norm(dim=1).mean()
    for b in epoch(q, world_size=1, workers=0, unit="tokens", keys=["resid_out_1"], normalize="mean_std"):
        raw = cache["resid_out_1"][b["row_index"], b["slot"]].double()
        torch.testing.assert_close(b["resid_out_1"].double(), (raw - mean) / std, rtol=1e-4, atol=1e-4)
    for b in epoch(q, world_size=1, workers=0, unit="rows", keys=["resid_out_1"], normalize="norm"):
        raw = cache["resid_out_1"][b["row_index"]].double()
        torch.testing.assert_close(b["resid_out_1"].double(), raw / norm_mean, rtol=1e-4, atol=1e-5)
        assert (b["resid_out_1"][~b["valid_mask"]] == 0).all()  # padding stays zero


def test_prefetch_is_bounded(stored, monkeypatch):
    from easyroutine_dist.storage.reader import RunDataset

    q, _ = stored
    started = []
    real = RunDataset._load

    def counting(self, store, i, a, b, *gate):
        started.append(i)
        return real(self, store, i, a, b, *gate)

    monkeypatch.setattr(RunDataset, "_load", counting)
    ds = q.torch_dataset(keys=["resid_out_1"], batch_size=1, shuffle=False, prefetch=1)
    consumed_parts = set()
    for batch in ds:
        row = int(batch["row_index"][0])
        consumed_parts.add(next(i for i, p in enumerate(ds.parts) if p.start <= row < p.start + p.rows))
        # the part being batched, one read and waiting, one being read: never more
        assert len(started) <= len(consumed_parts) + 2
    assert sorted(started) == [0, 1, 2, 3]


def test_default_prefetch_keeps_that_many_requests_in_flight(stored, monkeypatch):
    """By default a reader keeps ``reader.PREFETCH`` (3) shard requests in flight, never more."""
    import threading
    import time

    from easyroutine_dist.storage import shards
    from easyroutine_dist.storage.reader import PREFETCH

    q, _ = stored
    lock, now, peak = threading.Lock(), [0], [0]
    real = shards.read_bytes

    def slow(*args, **kwargs):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.2)  # long enough that every request the reader may start is started meanwhile
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(shards, "read_bytes", slow)
    ds = q.torch_dataset(keys=["resid_out_1"], batch_size=64, shuffle=False)
    assert ds.prefetch == PREFETCH == 3 and len(ds.parts) > PREFETCH
    rows = sum(int(b["row_index"].shape[0]) for b in ds)
    assert rows == ds.n_rows and peak[0] == PREFETCH


def test_bad_requests_are_refused_before_reading(stored, local_backend):
    q, _ = stored
    with pytest.raises(ConfigError, match="unit"):
        q.torch_dataset(unit="sentences")
    with pytest.raises(ConfigError, match="no keys"):
        q.torch_dataset(keys=["resid_out_9"])
    with pytest.raises(ConfigError, match="rank"):
        q.torch_dataset(rank=2, world_size=2)
    saver = local_backend.saver("plain")
    saver.save(torch.randn(4, 3), "m", ["last"], None, {})
    plain = local_backend.loader("plain").query()
    with pytest.raises(ConfigError, match="tokens"):
        plain.torch_dataset(unit="tokens")
    with pytest.raises(StorageError, match="statistics=True"):
        plain.torch_dataset(normalize="mean_std")
    rows = [b["activations"] for b in plain.torch_dataset(batch_size=3, shuffle=False)]
    assert torch.equal(torch.cat(rows), plain.load()[0])


def test_forked_workers_read_whole_shards_after_the_parent_used_the_hash_pool(local_backend):
    """DataLoader workers are forked from a process whose shard hashing threads ran (write, load); a whole-shard read
    in a worker must not wait on the parent's threads, which do not exist in the child."""
    x = torch.randn(40, 6)
    local_backend.saver("fork").save(x, "m", ["last"], None, {})
    q = local_backend.loader("fork").query()
    assert torch.equal(q.load()[0], x)  # whole-shard reads in this process
    ds = q.torch_dataset(batch_size=8, shuffle=False)  # "activations" is the shard's only tensor: whole reads
    out = torch.zeros_like(x)
    for b in DataLoader(ds, batch_size=None, num_workers=2, timeout=30):
        out[b["row_index"]] = b["activations"]
    assert torch.equal(out, x)


def test_batches_dropped_as_read_stay_right_while_worker_memory_is_reused(stored):
    """The way a trainer reads: each batch checked against the loaded run when it arrives, then dropped, so the
    workers hand their shared buffers out again (storage/handover.py); the normalised key is normalised in place."""
    from easyroutine_dist.storage import handover

    q, cache = stored
    vm = cache["valid_mask"]
    consts = {}  # expected constants per key, with plain torch over the real slots
    for k in KEYS:
        x = cache[k][vm].double()
        std = x.var(0, correction=0).sqrt()
        consts[k] = (x.mean(0), torch.where(std > 0, std, torch.ones_like(std)))
    before, boards = set(handover._PEERS), {}
    ds = q.torch_dataset(unit="tokens", keys=KEYS, batch_size=4, shuffle_buffer=8, normalize="mean_std")
    pairs = []
    for b in DataLoader(ds, batch_size=None, num_workers=2):
        # the workers' release boards, kept here: the main process forgets a worker's once it has exited
        boards.update({t: p.board for t, p in list(handover._PEERS.items()) if t not in before})
        r, s = b["row_index"], b["slot"]
        for k, (mean, std) in consts.items():
            want = (cache[k][r, s].double() - mean) / std
            torch.testing.assert_close(b[k].double(), want, rtol=1e-4, atol=1e-4)
        pairs.extend(zip(r.tolist(), s.tolist()))
    assert sorted(pairs) == sorted(map(tuple, vm.nonzero().tolist()))  # every real slot once
    assert len(boards) == 2 and max(int(bd.max()) for bd in boards.values()) > 1  # buffers were handed out again


def test_an_epoch_left_early_does_not_spoil_the_next(stored):
    """Persistent workers, an epoch abandoned after two batches (its batches in flight are dropped), then a whole
    epoch: every real slot once, each with its own values, though the workers' buffers carried the dropped ones."""
    q, cache = stored
    ds = q.torch_dataset(unit="tokens", keys=KEYS, batch_size=4, shuffle_buffer=8)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    for n, b in enumerate(loader):
        if n == 2:
            break
    ds.set_epoch(1)
    pairs = []
    for b in loader:
        r, s = b["row_index"], b["slot"]
        for k in KEYS:
            assert torch.equal(b[k], cache[k][r, s]), k
        pairs.extend(zip(r.tolist(), s.tolist()))
    assert sorted(pairs) == sorted(map(tuple, cache["valid_mask"].nonzero().tolist()))


def test_shuffle_draws_are_uniform_over_the_pool():
    """A batch is a uniform draw from everything pending: each sample of two unequal parts has the same chance
    (batch / pool) to be in the first batch, whichever part it came from (checked over 4,000 seeds)."""
    from easyroutine_dist.storage.batching import Batcher

    sizes, batch, trials = (30, 10), 8, 4000
    hits = torch.zeros(sum(sizes))
    from_first = torch.zeros(batch + 1)  # how many of the first part's samples the first batch holds
    for seed in range(trials):
        pool = Batcher(batch, sum(sizes) - batch, torch.Generator().manual_seed(seed))
        out = []
        for p, n in enumerate(sizes):
            out.extend(pool.add({"id": torch.arange(sum(sizes[:p]), sum(sizes[:p]) + n)}))
        hits[out[0]["id"]] += 1
        from_first[int((out[0]["id"] < sizes[0]).sum())] += 1
    expected = trials * batch / sum(sizes)  # 800; binomial sd ~25
    assert (hits - expected).abs().max() < 5 * (expected * (1 - batch / sum(sizes))) ** 0.5
    # and the split between parts is that of a draw without replacement (hypergeometric), not a fixed share
    pmf = torch.tensor([math.comb(sizes[0], j) * math.comb(sizes[1], batch - j) / math.comb(sum(sizes), batch)
                        for j in range(batch + 1)], dtype=torch.float64)
    assert ((from_first - trials * pmf).abs() <= 5 * (trials * pmf * (1 - pmf)).sqrt() + 1).all(), from_first
    assert (from_first > 0).sum() >= 5


def test_set_epoch_reaches_persistent_workers(stored):
    q, cache = stored
    kw = dict(unit="tokens", keys=["resid_out_1"], batch_size=8, shuffle_buffer=32)
    ds = q.torch_dataset(**kw)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    seen = []
    for n in (0, 1):
        ds.set_epoch(n)
        seen.append([b["row_index"].tolist() + b["slot"].tolist() for b in loader])
    fresh = []
    for n in (0, 1):  # the same epochs through new workers
        ds_n = q.torch_dataset(**kw)
        ds_n.set_epoch(n)
        fresh.append([b["row_index"].tolist() + b["slot"].tolist() for b in DataLoader(ds_n, batch_size=None,
                                                                                         num_workers=2)])
    assert seen == fresh and seen[0] != seen[1]


@pytest.mark.parametrize("part_rows", [40, 1000])  # parts smaller than the pool, and far bigger than its bound
def test_shuffle_pool_draws_each_sample_once_and_holds_bounded_memory(part_rows):
    """The shuffle pool refers to parts instead of copying them: every sample comes out exactly once with its own
    values, and the stragglers of parts drawn down are compacted, so the rows held stay within the documented bound
    while compaction copies few samples (none of a part still mostly pending)."""
    from easyroutine_dist.storage.batching import Batcher as _Batcher, Gather as _Gather

    batch, capacity, parts = 16, 64, 30
    pool = _Batcher(batch, capacity, torch.Generator().manual_seed(3))
    copied, gather = [0], pool._gather

    def counting(counts, batch=True):  # samples copied by compaction (batch=False), not into batches
        copied[0] += 0 if batch else sum(counts)
        return gather(counts, batch)

    pool._gather = counting
    seen, peak = [], 0
    for p in range(parts):
        ids = torch.arange(p * part_rows, (p + 1) * part_rows)
        feats = ids.to(torch.float64)[:, None].repeat(1, 3)  # each sample's features are its own id
        src = feats.flip(0)  # a gathered key: sample j lives at row part_rows - 1 - j of its source
        samples = {"x": _Gather(src, torch.arange(part_rows - 1, -1, -1)), "id": ids}
        for b in pool.add(samples):
            seen.append(b)
        peak = max(peak, pool._held())
    seen.extend(pool.flush())
    ids = torch.cat([b["id"] for b in seen])
    assert sorted(ids.tolist()) == list(range(parts * part_rows))  # exactly once
    for b in seen:
        assert torch.equal(b["x"], b["id"].to(torch.float64)[:, None].repeat(1, 3))  # values travel with their id
    assert all(len(b["id"]) == batch for b in seen[:-1])
    # the documented bound: 4 x (pool + batch), or twice the pending samples (at most pool + batch + one part)
    assert peak <= max(4 * (capacity + batch), 2 * (capacity + batch + part_rows))
    if part_rows < capacity:
        assert peak <= 4 * (capacity + batch) and copied[0] > 0  # small parts: compaction did run
    assert copied[0] <= parts * part_rows // 4  # stragglers only, never whole parts again
    assert ids.tolist() != sorted(ids.tolist())  # and it did shuffle
