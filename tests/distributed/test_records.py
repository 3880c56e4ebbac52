"""Issue 10 item 3: the lens driver reads each part record of its source run once, in parallel (not three times,
one by one)."""

from __future__ import annotations

import threading
import time

import torch

from easyroutine_dist.distributed.records import read_all
from easyroutine_dist.storage.runs import RunWriter, read_marker, run_dir


class _Counting:
    def __init__(self, inner):
        self.inner, self.reads, self.active, self.peak = inner, [], 0, 0
        self.lock = threading.Lock()

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        with self.lock:
            self.reads.append(i)
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.01)  # a GET's latency
        try:
            return self.inner[i]
        finally:
            with self.lock:
                self.active -= 1


def test_each_record_is_read_once_in_parallel_in_order(tmp_path):
    writer = RunWriter(str(tmp_path / "acts"))
    run = writer.begin_run("e", "m", {})
    for pid in range(40):
        writer.commit_part(run, writer.write_part(run, pid, {"x": torch.full((pid % 3 + 1, 2), float(pid))}))
    writer.commit_run(run)
    records = _Counting(read_marker(writer.store, run_dir(writer.store, run.metadata))["records"])
    got = read_all(records)
    assert sorted(records.reads) == list(range(40))  # each once
    assert [r["part_id"] for r in got] == list(range(40)) and [r["rows"] for r in got] == [p % 3 + 1 for p in range(40)]
    assert records.peak > 1  # concurrently
