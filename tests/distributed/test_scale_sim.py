"""Issue 10 item 4 (small CI version of benchmarks/bench_scheduler.py): the real scheduler over 64 simulated worker
slots (no torch, no model) completes every partition once, and pulls partitions lazily: the driver never holds more
than workers x max_in_flight of them, so its memory does not grow with the number of partitions."""

from __future__ import annotations

import time
from types import SimpleNamespace

import ray

from easyroutine_dist.distributed.scheduler import schedule


class _SimWorker:
    def run(self, pid: int) -> dict:
        return {"part_id": pid, "rows": 3, "skipped": False, "seconds": 0.0}

    def ping(self) -> bool:
        return True


class _Bar:
    def update(self, n: int) -> None:
        pass


def test_64_simulated_workers_complete_every_partition_lazily(ray_cluster):
    actors = [ray.remote(_SimWorker).options(num_cpus=0, max_concurrency=64).remote() for _ in range(2)]
    slots = [actors[i % 2] for i in range(64)]
    n, in_flight = 3000, 2
    pulled, done, worst = [0], [], [0]

    def parts():
        for pid in range(n):
            pulled[0] += 1
            worst[0] = max(worst[0], pulled[0] - len(done))
            yield pid

    def on_result(res: dict) -> None:
        done.append(res["part_id"])

    t = time.perf_counter()
    rows, recomputed, skipped, retried, _ = schedule(
        slots, lambda w, p: w.run.remote(p), parts(), SimpleNamespace(run_id="sim", experiment="sim"), None, _Bar(),
        in_flight, 4, 3, on_result=on_result)
    wall = time.perf_counter() - t
    assert sorted(done) == list(range(n)) and (rows, recomputed, skipped, retried) == (3 * n, n, 0, 0)
    assert worst[0] <= 64 * in_flight + 1  # partitions are pulled only as slots free up
    assert wall < 60, wall  # ~3 s on an idle 2-core machine (about 1 ms per partition)
