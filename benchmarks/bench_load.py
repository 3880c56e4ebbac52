"""Load throughput: QueryResult.load() / iter_parts() of a run of many parts, against fetching its shard objects with
concurrent raw ``cat_file`` calls, one GET per object (same thread count as the loader's read-ahead), and against fetching every object
a load reads (each part's record, then its shards), on the local S3 endpoint (a moto server in its own process)
and on local disk.

Run: python benchmarks/bench_load.py [--parts 32] [--mib-per-part 4] [--reps 3]. Prints a markdown table
(copied into docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from _s3 import s3_endpoint  # noqa: E402 (scripts run from benchmarks/)
from bench_reader import _load, _scratch, get_whole  # noqa: E402
from easyroutine_dist.interpretability.activation_saver import ActivationLoader
from easyroutine_dist.storage import layout, runs
from easyroutine_dist.storage.runs import RunWriter, read_marker, run_dir


def make_run(url: str, options: dict | None, parts: int, mib: float) -> tuple[object, list[str], list]:
    """A committed run of ``parts`` parts of ``mib`` MiB each; returns its QueryResult, its shard paths and, per
    part, ``(record path, [shard paths])``."""
    writer = RunWriter(url, options)
    run = writer.begin_run("bench-load", "m", {})
    rows = max(1, int(mib * 2**20 / (4 * 256)))
    for pid in range(parts):
        writer.commit_part(run, writer.write_part(run, pid, {"x": torch.randn(rows, 256)}))
    writer.commit_run(run)
    q = ActivationLoader(url, "bench-load", storage_options=options).query()
    rdir = run_dir(q.store, q[-1])
    by_part = [(f"{rdir}/{layout.record_name(int(rec['part_id']))}", [f"{rdir}/shards/{sh['file']}" for sh in
                                                                    rec["shards"]])
               for rec in read_marker(q.store, rdir)["records"]]
    return q, [p for _, shards in by_part for p in shards], by_part


def bench(label: str, q, paths: list[str], by_part: list, reps: int) -> None:
    fs = q.store.fs
    sizes = {p: fs.size(p) for p in paths + [rec for rec, _ in by_part]}  # known up front: one GET per object
    nbytes = sum(sizes[p] for p in paths)

    def get(path: str) -> bytes:
        return get_whole(q.store, path, sizes[path])

    def raw() -> None:
        with ThreadPoolExecutor(runs.PREFETCH_PARTS) as pool:
            list(pool.map(get, paths))

    def raw_all() -> None:  # what a load reads: each part's record, then its shards
        def part(item: tuple[str, list[str]]) -> None:
            get(item[0])
            for path in item[1]:
                get(path)

        with ThreadPoolExecutor(runs.PREFETCH_PARTS) as pool:
            list(pool.map(part, by_part))

    def load() -> None:
        q.load()

    def stream() -> None:
        for _ in q.iter_parts():
            pass

    res = {}
    for name, fn in (("raw", raw), ("raw_all", raw_all), ("load", load), ("iter_parts", stream)):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        res[name] = nbytes / 2**20 / statistics.median(times)
    ra = res["raw_all"]
    print(f"| {label} | {len(paths)} | {nbytes / 2**20:.0f} | {res['raw']:.0f} | {ra:.0f} | {res['load']:.0f} "
          f"({res['load'] / res['raw']:.2f}x; {res['load'] / ra:.2f}x) | {res['iter_parts']:.0f} "
          f"({res['iter_parts'] / res['raw']:.2f}x; {res['iter_parts'] / ra:.2f}x) |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", type=int, default=32)
    ap.add_argument("--mib-per-part", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true")
    args = ap.parse_args()
    print(f"load average at start: {_load()}; read-ahead {runs.PREFETCH_PARTS} parts; raw = the same shard "
          f"objects fetched whole by {runs.PREFETCH_PARTS} threads\n")
    print("| storage | parts | MiB | raw shards MiB/s | raw records + shards MiB/s | load() MiB/s (vs each) | "
          "iter_parts() MiB/s (vs each) |\n|---|---|---|---|---|---|---|")
    q, paths, records = make_run(_scratch("bench-load-"), None, args.parts, args.mib_per_part)
    bench("local disk (page cache)", q, paths, records, args.reps)
    if not args.no_s3:
        with s3_endpoint("bench-load") as opts:
            q, paths, records = make_run("s3://bench-load/acts", opts, args.parts, args.mib_per_part)
            bench("S3 (moto server process)", q, paths, records, args.reps)


if __name__ == "__main__":
    main()
