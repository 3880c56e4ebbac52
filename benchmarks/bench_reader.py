"""Reader benchmark: tokens/s of ``QueryResult.torch_dataset(unit="tokens")`` through a DataLoader with 1, 2 and 4
workers vs raw concurrent object reads of the same shard bytes (same number of requests in flight), on the local
S3 endpoint (moto server in its own process) and on local disk.

Run: PYTHONPATH=. python benchmarks/bench_reader.py [--quick] [--no-s3] [--no-local] [--workers 0,1] [--reps N].
Prints a markdown table (copied into docs/performance.md). The reader runs three epochs on persistent workers: the
first includes starting the workers and their S3 clients; the median of the other two is the steady state (the
ratio the target is about).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import DataLoader

from easyroutine_dist.cache import ActivationCache
from easyroutine_dist.interpretability.activation_saver import ActivationLoader, ActivationSaver
from easyroutine_dist.storage.runs import read_marker, run_dir

PREFETCH = 2


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _scratch(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


def _part(rows: int, slots: int, d: int, seed: int) -> ActivationCache:
    """A part like HookedModel's: ``resid`` ``[rows, slots, d]`` float32, ``valid_mask`` with ~25% padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(slots // 2, slots + 1, (rows,), generator=g)
    mask = torch.arange(slots)[None, :] < lengths[:, None]
    c = ActivationCache()
    c["resid"] = torch.randn(rows, slots, d, generator=g) * mask[..., None]
    c["valid_mask"] = mask
    c["mapping_index"] = {"all": list(range(slots))}
    c["slot_layout"] = {"axes": {"pos": [["all", slots]]}, "keys": {"pos": ["resid", "valid_mask"]}}
    return c


def make_run(url: str, options: dict | None, parts: int, rows: int, slots: int, d: int) -> tuple[object, int, int]:
    """Write a run of ``parts`` parts; return (its QueryResult, real tokens, shard bytes)."""
    saver = ActivationSaver(url, "bench-reader", storage_options=options)
    w = saver.writer
    run = w.begin_run("bench-reader", "bench-model", {"tag": None})
    tokens = 0
    for i in range(parts):
        c = _part(rows, slots, d, i)
        tokens += int(c["valid_mask"].sum())
        w.commit_part(run, w.write_part(run, i, c))
    w.commit_run(run)
    q = ActivationLoader(url, "bench-reader", storage_options=options).query()
    nbytes = sum(sh["bytes"] for rec in read_marker(q.store, run_dir(q.store, q[-1]))["records"]
                 for sh in rec["shards"])
    return q, tokens, nbytes


def raw_seconds(q, threads: int) -> float:
    """Every shard of the run fetched whole by ``threads`` concurrent reads (no parsing, no checks)."""
    store = q.store
    rdir = run_dir(store, q[-1])
    paths = [f"{rdir}/shards/{sh['file']}" for rec in read_marker(store, rdir)["records"] for sh in rec["shards"]]
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(len(b) for b in pool.map(store.fs.cat_file, paths))
    assert total > 0
    return time.perf_counter() - t


def reader_seconds(q, workers: int, batch_size: int = 4096, epochs: int = 3) -> tuple[float, float, int]:
    """``epochs`` epochs of ``torch_dataset(unit="tokens")`` through one DataLoader with persistent workers: seconds
    of the first (worker start-up and S3 clients included) and the median of the others (steady state), and the
    tokens per epoch."""
    ds = q.torch_dataset(keys=["resid"], unit="tokens", batch_size=batch_size, shuffle=True,
                         shuffle_buffer=4 * batch_size, prefetch=PREFETCH)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    out = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        t = time.perf_counter()
        n = 0
        for b in loader:
            n += int(b["resid"].shape[0])
        out.append(time.perf_counter() - t)
    del loader
    return out[0], statistics.median(out[1:]), n


def bench(label: str, q, tokens: int, nbytes: int, reps: int, counts: tuple[int, ...]) -> None:
    for workers in counts:  # 0: read in this process (no worker processes, no IPC)
        raw, cold, warm = [], [], []
        for _ in range(reps):  # alternate so that load changes hit both sides alike
            raw.append(raw_seconds(q, max(1, workers) * PREFETCH))
            c, w, n = reader_seconds(q, workers)
            assert n == tokens, (n, tokens)
            cold.append(c)
            warm.append(w)
        r, c, w = (sorted(x)[len(x) // 2] for x in (raw, cold, warm))
        print(f"| {label} | {workers} | {nbytes / 2**20:.0f} | {tokens / r:,.0f} | {tokens / c:,.0f} ({r / c:.2f}) | "
              f"{tokens / w:,.0f} | **{r / w:.2f}** | load {_load()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--no-local", action="store_true")
    ap.add_argument("--workers", default="0,1,2,4", help="DataLoader worker counts, comma-separated")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (median); default 3, 1 with --quick")
    args = ap.parse_args()
    counts = tuple(int(x) for x in args.workers.split(","))
    parts, rows, slots, d = (6, 256, 16, 256) if args.quick else (48, 512, 16, 256)
    reps = args.reps or (1 if args.quick else 3)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} cpus, "
          f"load average at start: {_load()}")
    print(f"run: {parts} parts x {rows} rows x {slots} slots x d={d} float32 (~25% padded slots), "
          f"prefetch {PREFETCH}; raw = same shards fetched whole by workers x {PREFETCH} threads\n")
    print("| storage | DataLoader workers | MiB | raw tokens/s | reader, 1st epoch (ratio) | reader, epochs 2-3 "
          "| ratio |\n|---|---|---|---|---|---|---|")
    if not args.no_local:
        q, tokens, nbytes = make_run(_scratch("bench-reader-"), None, parts, rows, slots, d)
        bench("local disk (page cache)", q, tokens, nbytes, reps, counts)
    if args.no_s3:
        return
    from _s3 import s3_endpoint

    with s3_endpoint("bench-bucket") as opts:
        q, tokens, nbytes = make_run("s3://bench-bucket/acts", opts, parts, rows, slots, d)
        bench("S3 (moto server process)", q, tokens, nbytes, reps, counts)


if __name__ == "__main__":
    main()
