"""Loads read parts ahead in threads (bounded), hand them out in order, and stop reading when the consumer stops."""

from __future__ import annotations

import threading
import time

import torch

from easyroutine_dist.storage import runs, shards
from easyroutine_dist.storage.api import ActivationLoader
from easyroutine_dist.storage.runs import RunWriter


def _run(tmp_path, n_parts: int = 12):
    writer = RunWriter(tmp_path)
    run = writer.begin_run("ahead", "m", {})
    want = []
    for pid in range(n_parts):
        x = torch.full((2, 3), float(pid)) + torch.arange(3.0)
        want.append(x)
        writer.commit_part(run, writer.write_part(run, pid, {"x": x}))
    writer.commit_run(run)
    return ActivationLoader(tmp_path, "ahead").query(), torch.cat(want)


def test_parts_are_read_concurrently_in_order_and_bounded(tmp_path, monkeypatch):
    q, want = _run(tmp_path)
    lock, state = threading.Lock(), {"now": 0, "max": 0, "calls": 0}
    real = shards.read_shard  # what every part read calls (shards.read_part_shards)

    def slow_read(*a, **k):
        with lock:
            state["now"] += 1
            state["calls"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.05)  # an object store's latency
        try:
            return real(*a, **k)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(shards, "read_shard", slow_read)
    t0 = time.perf_counter()
    cache, _ = q.load()
    elapsed = time.perf_counter() - t0
    assert torch.equal(cache["x"], want)  # the order of parts is the order of rows
    assert 1 < state["max"] <= runs.PREFETCH_PARTS
    assert elapsed < 12 * 0.05 * 0.8  # overlapped, not one after the other
    # a consumer that stops after two parts: at most the read-ahead window more is read
    state["calls"] = 0
    it = q.iter_parts()
    first = [next(it), next(it)]
    it.close()
    assert [p["x"][0, 0].item() for p in first] == [0.0, 1.0]
    assert state["calls"] <= 2 + runs.PREFETCH_PARTS
