"""Storage benchmarks: save() write throughput vs raw fs.pipe_file, and query latency vs a scan of every run.

Run: python benchmarks/bench_storage.py [--quick]. Prints a markdown table (copied into docs/performance.md).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

import torch
from safetensors.torch import save as st_save

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.interpretability.activation_saver import ActivationLoader, ActivationSaver
from easyroutine_dist.storage import layout
from easyroutine_dist.storage.catalog import Catalog
from easyroutine_dist.storage.fs import resolve



def _scratch(prefix: str) -> str:
    """A temporary folder removed when the benchmark exits."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path

def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _sha_mbps(threads: int, mb: int = 128) -> float:
    """sha256 throughput of ``threads`` threads hashing ``mb`` MiB in all (hashlib releases the GIL)."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    bufs = [os.urandom(mb * 2**20 // threads) for _ in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        t = time.perf_counter()
        list(pool.map(lambda b: hashlib.sha256(b).digest(), bufs))
        return mb / (time.perf_counter() - t)


def _crc_mbps(mb: int = 128) -> float:
    """crc32c throughput of the shard writer's digest function on one thread (zero-copy, GIL released)."""
    from easyroutine_dist.storage.shards import _crc32c

    buf = memoryview(bytearray(os.urandom(mb * 2**20)))
    t = time.perf_counter()
    _crc32c(buf)
    return mb / (time.perf_counter() - t)


def _tensors(total_mb: int) -> dict[str, torch.Tensor]:
    n = 8
    per = total_mb * 2**20 // n // 4
    return {f"resid_out_{i}": torch.randn(per) for i in range(n)}


def _raw_durable(path: str, blob: bytes) -> None:
    with open(path, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def bench_write(url: str, options: dict | None, total_mb: int, reps: int, durable: bool = False,
                checksum: str = "crc32c") -> dict[str, float]:
    """Median seconds of save() (shards digested with ``checksum``) and of fs.pipe_file (+ fsync when ``durable``)
    of the same safetensors bytes, alternated in one process."""
    tensors = _tensors(total_mb)
    saver = ActivationSaver(url, "bench", storage_options=options, checksum=checksum)
    saver.store.durable = durable
    fs = saver.store.fs
    blob = st_save(tensors)
    raw_t, save_t = [], []
    def one_raw() -> None:
        path = saver.store.path("raw", f"{uuid.uuid4().hex}.safetensors")
        if saver.store.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        t = time.perf_counter()
        if durable:
            _raw_durable(path, blob)
        else:
            fs.pipe_file(path, blob)
        raw_t.append(time.perf_counter() - t)
        fs.rm(path)

    def one_save() -> None:
        t = time.perf_counter()
        saver.save(tensors, "bench-model", ["last"], None, ExtractionConfig())
        save_t.append(time.perf_counter() - t)
        ActivationLoader.from_saver(saver).query().remove(-1)

    for r in range(reps):  # alternate which goes first, so page-cache / writeback state biases neither
        for fn in ((one_raw, one_save) if r % 2 == 0 else (one_save, one_raw)):
            fn()
    raw, save = statistics.median(raw_t), statistics.median(save_t)
    mb = len(blob) / 2**20
    return {"MB": mb, "raw_MBps": mb / raw, "save_MBps": mb / save, "ratio": raw / save}


def _entry(i: int, t: float) -> dict:
    run_id, save_time, t = layout.new_run_id(t)
    return {"run_id": run_id, "experiment_name": "bench", "model_name": "gpt2", "save_time": save_time,
            "saved_at_unix": t, "tag": f"batch_{i}", "target_token_positions": ["last"],
            "pivot_positions": None, "interventions": [], "other_metadata": {"batch_id": i},
            "extraction_config": ExtractionConfig(extract_resid_out=True).to_dict(), "schema_version": 2,
            "n_parts": 1, "n_keys": 24}


def _populate(root: str, n: int) -> None:
    """n committed-looking runs: a catalog entry each (what queries read) and a metadata.json (what a scan reads)."""
    cat_dir = os.path.join(root, layout.CATALOG_DIR, "bench")
    os.makedirs(cat_dir, exist_ok=True)
    base = time.time() - n
    for i in range(n):
        entry = _entry(i, base + i)
        body = json.dumps(entry, sort_keys=True)
        with open(os.path.join(cat_dir, f"{entry['run_id']}.json"), "w") as f:
            f.write(body)
        rdir = os.path.join(root, "bench", "gpt2", entry["run_id"])
        os.makedirs(rdir)
        with open(os.path.join(rdir, "metadata.json"), "w") as f:
            f.write(body)


def _scan_query(root: str, tag: str) -> list[dict]:
    """The baseline: read every run's metadata.json on each query (easyroutine's approach)."""
    out = []
    exp = os.path.join(root, "bench")
    for model in os.listdir(exp):
        for run in os.listdir(os.path.join(exp, model)):
            with open(os.path.join(exp, model, run, "metadata.json")) as f:
                meta = json.load(f)
            if meta.get("tag") == tag:
                out.append(meta)
    return out


def _p50(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000


def bench_query(n: int, reps: int) -> dict[str, float]:
    root = _scratch(prefix=f"bench-q{n}-")
    _populate(root, n)
    loader = ActivationLoader(root, "bench")
    t = time.perf_counter()
    first = loader.query(tag="batch_7")  # first query of a process: reads entries, writes the snapshot
    first_ms = (time.perf_counter() - t) * 1000
    cold_ms = _p50(lambda: ActivationLoader(root, "bench").query(tag="batch_7"), max(3, reps // 10))
    time.sleep(2.1)  # steady state: an unchanged directory (mtime older than the 2 s margin) is not relisted
    warm_ms = _p50(lambda: loader.query(tag="batch_7"), reps)
    crit_ms = _p50(lambda: loader.query(custom_keys={"batch_id": 7}, model_name="gpt2",
                                        extraction_config=ExtractionConfig(extract_resid_out=True)), reps)
    # busy experiment: another writer adds a run before every query (listing, new entry, re-sort, re-index)
    other = Catalog(resolve(root))
    busy: list[float] = []
    for i in range(reps):
        other.add(_entry(n + i, time.time()))
        t = time.perf_counter()
        loader.query(tag="batch_7")
        busy.append(time.perf_counter() - t)
    listing_ms = statistics.median(busy) * 1000
    scan_ms = _p50(lambda: _scan_query(root, "batch_7"), max(3, reps // 10))
    if len(first) != 1 or len(_scan_query(root, "batch_7")) != 1:
        raise RuntimeError("benchmark query returned the wrong runs")
    return {"runs": n, "first_ms": first_ms, "cold_ms": cold_ms, "warm_ms": warm_ms, "multi_ms": crit_ms,
            "listing_ms": listing_ms,
            "scan_ms": scan_ms}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--no-query", action="store_true", help="write throughput only")
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} cpus")
    print(f"load average at start: {_load()}")
    print(f"sha256: {_sha_mbps(1):.0f} MB/s on one thread, {_sha_mbps(os.cpu_count() or 1):.0f} MB/s on "
          f"{os.cpu_count()} threads; crc32c: {_crc_mbps():.0f} MB/s on one thread (what the cores give right now)\n")
    print("| backend | checksum | MB | raw pipe_file MB/s | save MB/s | ratio |\n|---|---|---|---|---|---|")
    tmp = _scratch(prefix="bench-w-")
    algos = ("crc32c", "sha256")
    for algo in algos:
        r = bench_write(tmp, None, 64 if args.quick else 256, reps, checksum=algo)
        print(f"| local (page cache) | {algo} | {r['MB']:.0f} | {r['raw_MBps']:.0f} | {r['save_MBps']:.0f} "
              f"| {r['ratio']:.2f} | load {_load()}")
    for algo in algos:
        r = bench_write(tmp, None, 64 if args.quick else 256, reps, durable=True, checksum=algo)
        print(f"| local, fsync both (durable) | {algo} | {r['MB']:.0f} | {r['raw_MBps']:.0f} | {r['save_MBps']:.0f} "
              f"| {r['ratio']:.2f} | load {_load()}")
    if not args.no_s3:
        from _s3 import s3_endpoint

        with s3_endpoint("bench-bucket") as opts:
            for algo in algos:
                r = bench_write("s3://bench-bucket/acts", opts, 32 if args.quick else 128, reps, checksum=algo)
                print(f"| s3 (moto server process, 127.0.0.1) | {algo} | {r['MB']:.0f} | {r['raw_MBps']:.0f} "
                      f"| {r['save_MBps']:.0f} | {r['ratio']:.2f} | load {_load()}")
    if args.no_query:
        return
    print("\n| runs | first query ms | new loader p50 ms | p50 ms, a run added before each query (tag) "
          "| p50 ms steady (tag) | p50 ms steady (3 criteria) | scan-every-run p50 ms |\n|---|---|---|---|---|---|---|")
    for n in (100, 1000, 10000):
        q = bench_query(n, 20 if args.quick else 200)
        print(f"| {n} | {q['first_ms']:.1f} | {q['cold_ms']:.1f} | {q['listing_ms']:.2f} | {q['warm_ms']:.2f} "
              f"| {q['multi_ms']:.2f} "
              f"| {q['scan_ms']:.1f} |")


if __name__ == "__main__":
    main()
