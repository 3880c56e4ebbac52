"""The scheduler re-queues a partition whose storage calls still failed after their retries
(StorageUnavailableError in the worker), within max_part_attempts, keeps the worker in service, and gives the
resume hint only when it gives up (issue 9 item 4). Ray is replaced by fakes: this tests the scheduling decision."""

from __future__ import annotations

import pytest
from ray.exceptions import RayTaskError

from easyroutine_dist.distributed import scheduler
from easyroutine_dist.errors import DistributedError, StorageError
from easyroutine_dist.storage.fs import StorageUnavailableError
from easyroutine_dist.storage.runs import RunHandle

RUN = RunHandle("2026-01-01_00-00-00-000000_abcdef01", "exp", "m", "memory://x")


class _Bar:
    def update(self, n: int) -> None:
        pass


def _run(monkeypatch, fail_times: dict[int, int], error=StorageUnavailableError, max_part_attempts: int = 3):
    """Schedule parts 0..3 over 2 fake workers; part p fails ``fail_times[p]`` times with ``error`` first."""
    outcomes: dict[object, tuple[int, int]] = {}
    calls: list[tuple[int, int]] = []
    failed: dict[int, int] = {}

    class Part(tuple):
        pass

    def submit(worker, part):
        ref = object()
        outcomes[ref] = (worker, part[1]["part_id"])
        return ref

    def get(ref):
        w, pid = outcomes[ref]
        calls.append((w, pid))
        if failed.get(pid, 0) < fail_times.get(pid, 0):
            failed[pid] = failed.get(pid, 0) + 1
            raise RayTaskError("extract_part", "traceback", error(f"writing part {pid}: still failing"))
        return {"part_id": pid, "rows": 2, "skipped": False, "seconds": 0.0}

    monkeypatch.setattr(scheduler.ray, "wait", lambda refs, num_returns=1: ([refs[0]], refs[1:]))
    monkeypatch.setattr(scheduler.ray, "get", get)
    parts = iter([Part((None, {"part_id": p})) for p in range(4)])
    out = scheduler.schedule([0, 1], submit, parts, RUN, None, _Bar(), max_in_flight=2,
                             max_part_attempts=max_part_attempts, max_worker_restarts=0)
    return out, calls


def test_storage_fault_requeues_the_partition(monkeypatch):
    (rows, recomputed, skipped, retried, _), calls = _run(monkeypatch, {1: 2})
    assert (rows, recomputed, skipped, retried) == (8, 4, 0, 2)  # every part once; part 1 twice more
    assert sorted(pid for _, pid in calls) == [0, 1, 1, 1, 2, 3]


def test_gives_up_with_the_resume_hint_after_max_attempts(monkeypatch):
    with pytest.raises(DistributedError, match="partition 1 failed 3 times.*resume with extract"):
        _run(monkeypatch, {1: 5})


def test_other_storage_errors_are_not_requeued(monkeypatch):
    with pytest.raises(DistributedError, match="fix the cause"):
        _run(monkeypatch, {2: 1}, error=StorageError)
