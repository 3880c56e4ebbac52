"""Scheduler at cluster scale (issue 10 item 4, first part): the real ``scheduler.schedule`` driving simulated
workers that import no torch, sleep ``--compute-ms`` per partition and answer a part record.

The 64 "workers" are 64 worker slots served by ``--procs`` threaded Ray actors (``max_concurrency`` = slots per
actor, num_cpus=0), so a 2-core machine can host them; the driver-side cost measured (one ObjectRef per partition,
``ray.wait`` over the refs in flight, least-loaded choice) is the same as with 64 processes. Simulated workers do
not write shards (the RunWriter commit path is not simulated here).

Prints, per worker count: partitions/s, and scheduling overhead per partition = (wall - ideal) / partitions where
ideal = partitions * compute / workers; and the driver's peak RSS growth from 1k to 100k partitions.

Run: python benchmarks/bench_scheduler.py [--workers 8,32,64] [--partitions 20000] [--compute-ms 0]
"""

from __future__ import annotations

import argparse
import os
import resource
import threading
import time
from types import SimpleNamespace

import ray

from easyroutine_dist.distributed.scheduler import schedule


class SimWorker:
    """A worker that does no model work: it sleeps and answers the record a real worker answers."""

    def run(self, part: tuple[int, float]) -> dict:
        pid, compute_s = part
        if compute_s:
            time.sleep(compute_s)
        return {"part_id": pid, "rows": 4, "skipped": False, "seconds": compute_s}

    def ping(self) -> bool:
        return True


class _Bar:
    def update(self, n: int) -> None:
        pass


from _proc import rss_mb as _rss_mb  # noqa: E402 (scripts run from benchmarks/)


def run_sim(actors: list, n_workers: int, n_parts: int, compute_s: float, in_flight: int = 2) -> dict:
    slots = [actors[i % len(actors)] for i in range(n_workers)]
    run = SimpleNamespace(run_id="sim", experiment="sim")
    peak = [_rss_mb()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], _rss_mb())

    t_sampler = threading.Thread(target=sample, daemon=True)
    t_sampler.start()
    rss0 = _rss_mb()
    t = time.perf_counter()
    rows, recomputed, *_ = schedule(slots, lambda w, p: w.run.remote(p), ((i, compute_s) for i in range(n_parts)),
                                    run, None, _Bar(), in_flight, 4, 3)
    wall = time.perf_counter() - t
    stop.set()
    t_sampler.join()
    assert recomputed == n_parts and rows == 4 * n_parts
    ideal = n_parts * compute_s / n_workers
    return {"workers": n_workers, "partitions": n_parts, "wall_s": wall, "parts_per_s": n_parts / wall,
            "overhead_ms_per_part": (wall - ideal) / n_parts * 1e3, "rss_growth_mb": peak[0] - rss0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", default="8,32,64")
    p.add_argument("--partitions", type=int, default=20000)
    p.add_argument("--compute-ms", type=float, default=0.0)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--rss-sizes", default="1000,10000,100000")
    a = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    actor = ray.remote(SimWorker).options(num_cpus=0, max_concurrency=64)
    actors = [actor.remote() for _ in range(a.procs)]
    ray.get([x.ping.remote() for x in actors])
    rows = [run_sim(actors, int(w), a.partitions, a.compute_ms / 1e3) for w in a.workers.split(",")]
    rows += [run_sim(actors, 64, int(n), a.compute_ms / 1e3) for n in a.rss_sizes.split(",") if n]
    print("| workers | partitions | wall s | partitions/s | overhead ms/partition | driver RSS growth MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['partitions']} | {r['wall_s']:.1f} | {r['parts_per_s']:.0f} | "
              f"{r['overhead_ms_per_part']:.3f} | {r['rss_growth_mb']:.1f} |")
    print(f"peak RSS of the driver (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, cpus {os.cpu_count()}, "
          f"compute {a.compute_ms} ms, actor processes {a.procs}")


if __name__ == "__main__":
    main()
