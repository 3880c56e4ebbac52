"""Issue 9 item 2, storage side: ``PartStream`` writes a part's batches as shards in a background thread.

* Backpressure: with a slow store, the bytes waiting for (or in) a write never exceed ``max_inflight_bytes``, and
  ``put`` (the forward) blocks instead; every row arrives, in order.
* A streamed part's shards (row ranges) load as one part, equal to the rows handed over; a gap in the ranges or a
  shard with the wrong row count is refused, never silently joined.
* Small batches are joined into one shard write (as ``streaming.coalesced`` predicts for the dry-run plan).
* ``max_inflight_bytes`` is checked with a clear error.
On the previous main there was no streaming module, so these fail there.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import easyroutine_dist.storage.streaming as streaming
from easyroutine_dist.errors import ConfigError, CorruptShardError
from easyroutine_dist.storage.runs import RunWriter, load_run
from easyroutine_dist.storage.shards import read_part_shards
from easyroutine_dist.storage.streaming import PartStream, check_inflight_bytes

EXP, MODEL = "s", "m"


def _batch(i: int, rows: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"x": torch.randn(rows, 64, generator=g), "ids": torch.arange(rows) + 100 * i}  # 1056 bytes / 4 rows


def _stream(writer: RunWriter, run, part_id: int = 0, **kw) -> PartStream:
    return PartStream(writer.store, writer.store.path(run.rel), part_id, checksum=writer.checksum,
                      max_shard_bytes=writer.max_shard_bytes, **kw)


def test_backpressure_bounds_the_bytes_in_flight(tmp_path, monkeypatch):
    writer = RunWriter(str(tmp_path))
    run = writer.begin_run(EXP, MODEL, {})
    per_batch = sum(t.numel() * t.element_size() for t in _batch(0).values())
    budget = int(2.5 * per_batch)  # two batches fit, a third waits
    real, lock, in_flight, worst = streaming.write_shard, threading.Lock(), [0], [0]
    stream = _stream(writer, run, max_inflight_bytes=budget)

    def slow(store, path, tensors, checksum):  # a store 20x slower than the "forward" below
        with lock:
            worst[0] = max(worst[0], stream._inflight)  # the budget's count while a shard is being written
        time.sleep(0.05)
        return real(store, path, tensors, checksum)

    monkeypatch.setattr(streaming, "write_shard", slow)
    blocked = []
    for i in range(10):
        t0 = time.perf_counter()
        stream.put(_batch(i))  # the "forward" takes ~0 s: storage is the bottleneck
        blocked.append(time.perf_counter() - t0)
        assert stream._inflight <= budget
    record = stream.finish({})
    writer.commit_part(run, record)
    assert stream.peak_inflight <= budget and worst[0] <= budget
    assert stream.peak_inflight == 2 * per_batch  # the queue did fill up to the budget
    assert sum(b > 0.03 for b in blocked) >= 6  # the forward waited for storage (backpressure)
    assert stream.wait_seconds > 0.3
    writer.commit_run(run)
    cache, _ = load_run(writer.store, {"experiment_name": EXP, "model_name": MODEL, "run_id": run.run_id})
    want = [_batch(i) for i in range(10)]
    assert torch.equal(cache["x"], torch.cat([b["x"] for b in want]))
    assert torch.equal(cache["ids"], torch.cat([b["ids"] for b in want]))


def _three_batches(tmp_path, budget: int):
    """A part of three batches streamed with ``max_inflight_bytes=budget``: (writer, run, stream, its record)."""
    writer = RunWriter(str(tmp_path))
    run = writer.begin_run(EXP, MODEL, {})
    stream = _stream(writer, run, max_inflight_bytes=budget)
    for i in range(3):
        stream.put(_batch(i))
    return writer, run, stream, stream.finish({})


def test_one_batch_bigger_than_the_budget_goes_alone(tmp_path):
    writer, run, stream, rec = _three_batches(tmp_path, 10)
    assert [sh["rows"] for sh in rec["shards"]] == [[0, 4], [4, 8], [8, 12]] and rec["rows"] == 12
    assert stream.peak_inflight == sum(t.numel() * t.element_size() for t in _batch(0).values())


def test_row_ranges_must_tile_the_part(tmp_path):
    writer, run, stream, rec = _three_batches(tmp_path, 4)  # a tiny budget: no batch is joined with another
    sdir = writer.store.path(run.rel, "shards")
    got = read_part_shards(writer.store, sdir, rec["shards"], ["x"])
    assert list(got) == ["x"] and torch.equal(got["x"], torch.cat([_batch(i)["x"] for i in range(3)]))
    with pytest.raises(CorruptShardError, match="contiguous"):
        read_part_shards(writer.store, sdir, [rec["shards"][0], rec["shards"][2]])
    bad = [dict(rec["shards"][0], rows=[0, 5]), dict(rec["shards"][1], rows=[5, 8])]
    with pytest.raises(CorruptShardError, match="not 5 rows"):
        read_part_shards(writer.store, sdir, bad)


def test_small_batches_are_joined_into_fewer_shards(tmp_path):
    writer = RunWriter(str(tmp_path))
    run = writer.begin_run(EXP, MODEL, {})
    per = sum(t.numel() * t.element_size() for t in _batch(0).values())
    stream = _stream(writer, run, max_inflight_bytes=4 * 3 * per)  # joins up to 3 batches (a quarter of the budget)
    assert stream.coalesce == 3 * per
    for i in range(10):
        stream.put(_batch(i))
    rec = stream.finish({})
    assert [sh["rows"] for sh in rec["shards"]] == [[0, 12], [12, 24], [24, 36], [36, 40]]
    assert streaming.coalesced([per] * 10, 3 * per) == [3, 3, 3, 1]  # what the dry-run plan predicts
    assert streaming.coalesced([per, 5 * per, per], 3 * per) == [1, 1, 1]
    got = read_part_shards(writer.store, writer.store.path(run.rel, "shards"), rec["shards"])
    assert torch.equal(got["x"], torch.cat([_batch(i)["x"] for i in range(10)]))
    assert torch.equal(got["ids"], torch.cat([_batch(i)["ids"] for i in range(10)]))
    default = _stream(writer, run, part_id=1)  # default budget: 4 MiB groups, so these 10 batches are one shard
    for i in range(10):
        default.put(_batch(i))
    assert [sh["rows"] for sh in default.finish({})["shards"]] == [[0, 40]]


def test_keys_must_match_and_budget_is_checked(tmp_path):
    writer = RunWriter(str(tmp_path))
    run = writer.begin_run(EXP, MODEL, {})
    stream = _stream(writer, run)
    stream.put(_batch(0))
    with pytest.raises(Exception, match="same keys"):
        stream.put({"x": _batch(1)["x"]})
    stream.abort()
    assert check_inflight_bytes(None) == 512 * 1024**2
    for bad in (0, -1, 1.5, True, "1G"):
        with pytest.raises(ConfigError, match="max_inflight_bytes"):
            check_inflight_bytes(bad)


def test_row_ranges_must_reach_the_records_row_count(tmp_path):
    """A record whose streamed shards stop short of its rows (a lost last range) is refused, not read as fewer
    rows: every reader passes the record's row count."""
    writer, run, stream, rec = _three_batches(tmp_path, 4)
    sdir = writer.store.path(run.rel, "shards")
    rows = sum(int(_batch(i)["x"].shape[0]) for i in range(3))  # counted from the batches handed over
    assert read_part_shards(writer.store, sdir, rec["shards"], ["x"], rows)["x"].shape[0] == rows
    with pytest.raises(CorruptShardError, match=f"to row {rows}"):
        read_part_shards(writer.store, sdir, rec["shards"][:2], ["x"], rows)
    writer.commit_part(run, dict(rec, shards=rec["shards"][:2]))  # a damaged record: its last range is gone
    writer.commit_run(run, verify=False)
    from easyroutine_dist.interpretability.activation_saver import ActivationLoader

    with pytest.raises(CorruptShardError, match=f"to row {rows}"):
        ActivationLoader(str(tmp_path), EXP).query().load()
