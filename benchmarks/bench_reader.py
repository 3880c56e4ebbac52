"""Reader benchmark: tokens/s of ``QueryResult.torch_dataset(unit="tokens")`` through a DataLoader with 1, 2 and 4
workers vs raw concurrent object reads of the same shard bytes (same number of requests in flight), on the local
S3 endpoint (moto server in its own process) and on local disk.

Two raw baselines on S3: the stock client (s3fs with botocore's default, which checks each response's CRC32
against the endpoint's checksum header: every byte checked once, as the reader checks every byte once against the
crc32c recorded at save time), and the client the reader's shard reads use (``fs.shard_store``: botocore's
blocking client, storage/s3_reads.py) with no byte checked: a bound no checked read reaches. The target is about
the first; the ratio to the second is printed too.

Run: PYTHONPATH=. python benchmarks/bench_reader.py [--quick] [--no-s3] [--no-local] [--workers 0,1] [--pairs N].
Prints a markdown table (copied into docs/performance.md). Per cell, one DataLoader with persistent workers runs a
first epoch (starting the workers and their S3 clients), then N epochs, each between two raw passes of each kind;
each epoch's ratio is the mean of the raw passes around it over the epoch's seconds, and the cell reports the
median ratio (the target is about it) and its quartiles. Pairing keeps load that drifts on a shared machine out of
the ratio.
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
from easyroutine_dist.storage.fs import shard_store
from easyroutine_dist.storage.reader import PREFETCH  # the reader's default requests in flight (3)
from easyroutine_dist.storage.runs import read_marker, run_dir


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


def get_whole(store, path: str, size: int) -> bytes:
    """One object fetched whole in one request: a GET of its byte range on object storage (s3fs would ask the size
    first otherwise), a plain read on local disk."""
    return store.fs.cat_file(path) if store.is_local else store.fs.cat_file(path, start=0, end=size)


def shard_list(q) -> list[tuple[str, int]]:
    """``(path, bytes)`` of every shard of the run (read once per cell, outside the timed passes)."""
    rdir = run_dir(q.store, q[-1])
    return [(f"{rdir}/shards/{sh['file']}", sh["bytes"]) for rec in read_marker(q.store, rdir)["records"]
            for sh in rec["shards"]]


def raw_seconds(q, shards: list[tuple[str, int]], threads: int, checked: bool = True) -> float:
    """``shards`` fetched whole by ``threads`` concurrent reads, one GET each with the byte range of the whole
    object (no size lookup first, no parsing). ``checked``: through the stock client (on S3, s3fs, and botocore
    checks each response's CRC32); otherwise through the client shard reads use (on S3, botocore's blocking client,
    no check)."""
    store = q.store if checked else shard_store(q.store)
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(len(b) for b in pool.map(lambda s: get_whole(store, *s), shards))
    assert total > 0
    return time.perf_counter() - t


def paired(q, workers: int, pairs: int, batch_size: int = 4096
           ) -> tuple[float, list[float], list[float], list[float], int]:
    """One DataLoader with persistent workers over ``torch_dataset(unit="tokens")``: a first epoch (worker start-up,
    S3 clients, filling the shuffle pool), then ``pairs`` epochs, each between two raw passes of each kind
    (:func:`raw_seconds` with ``max(1, workers) x PREFETCH`` threads, checked and unchecked). Returns the first
    epoch's seconds, the steady epochs' seconds, the checked and the unchecked raw passes' seconds (``pairs + 1``
    each) and the tokens per epoch. Pairing each epoch with the raw passes around it makes the ratio robust to the
    load drifting on a shared machine."""
    ds = q.torch_dataset(keys=["resid"], unit="tokens", batch_size=batch_size, shuffle=True,
                         shuffle_buffer=4 * batch_size, prefetch=PREFETCH)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    def epoch(n: int) -> tuple[float, int]:
        ds.set_epoch(n)
        t = time.perf_counter()
        count = 0
        for b in loader:
            count += int(b["resid"].shape[0])
        return time.perf_counter() - t, count

    first, n = epoch(0)
    threads, shards = max(1, workers) * PREFETCH, shard_list(q)
    raw, bare, steady = [raw_seconds(q, shards, threads)], [raw_seconds(q, shards, threads, False)], []
    for i in range(pairs):
        secs, count = epoch(i + 1)
        assert count == n, (count, n)
        steady.append(secs)
        raw.append(raw_seconds(q, shards, threads))
        bare.append(raw_seconds(q, shards, threads, False))
    del loader
    return first, steady, raw, bare, n


def bench(label: str, q, tokens: int, nbytes: int, pairs: int, counts: tuple[int, ...]) -> None:
    for workers in counts:  # 0: read in this process (no worker processes, no IPC)
        first, steady, raw, bare, n = paired(q, workers, pairs)
        assert n == tokens, (n, tokens)
        ratios = sorted((raw[i] + raw[i + 1]) / 2 / steady[i] for i in range(pairs))
        to_bare = sorted((bare[i] + bare[i + 1]) / 2 / steady[i] for i in range(pairs))
        med = statistics.median
        lo, hi = ratios[len(ratios) // 4], ratios[-1 - len(ratios) // 4]
        print(f"| {label} | {workers} | {nbytes / 2**20:.0f} | {tokens / med(raw):,.0f} | {tokens / med(bare):,.0f} "
              f"| {tokens / first:,.0f} ({med(raw) / first:.2f}) | {tokens / med(steady):,.0f} | **{med(ratios):.2f}** "
              f"| {lo:.2f}-{hi:.2f} | {med(to_bare):.2f} | load {_load()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--no-local", action="store_true")
    ap.add_argument("--workers", default="0,1,2,4", help="DataLoader worker counts, comma-separated")
    ap.add_argument("--pairs", type=int, default=None, help="paired epochs per cell; default 8, 2 with --quick")
    args = ap.parse_args()
    counts = tuple(int(x) for x in args.workers.split(","))
    parts, rows, slots, d = (6, 256, 16, 256) if args.quick else (48, 512, 16, 256)
    pairs = args.pairs or (2 if args.quick else 8)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} cpus, "
          f"load average at start: {_load()}")
    print(f"run: {parts} parts x {rows} rows x {slots} slots x d={d} float32 (~25% padded slots), "
          f"prefetch {PREFETCH}; raw = same shards fetched whole by workers x {PREFETCH} threads (stock client: s3fs, "
          "responses' CRC32 checked; unchecked: the reader's blocking botocore client, nothing checked)\n")
    print("| storage | DataLoader workers | MiB | raw tokens/s | raw, reader's client unchecked "
          "| reader, 1st epoch (ratio) | reader, steady | ratio (median of pairs) | ratio, quartiles "
          "| ratio to unchecked |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    if not args.no_local:
        q, tokens, nbytes = make_run(_scratch("bench-reader-"), None, parts, rows, slots, d)
        bench("local disk (page cache)", q, tokens, nbytes, pairs, counts)
    if args.no_s3:
        return
    from _s3 import s3_endpoint

    with s3_endpoint("bench-bucket") as opts:
        q, tokens, nbytes = make_run("s3://bench-bucket/acts", opts, parts, rows, slots, d)
        bench("S3 (moto server process)", q, tokens, nbytes, pairs, counts)


if __name__ == "__main__":
    main()
