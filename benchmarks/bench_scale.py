"""Control plane at scale (issue 10): the catalog and the metadata-index actor at 1k, 10k and 100k runs.

Measures, on local disk:
* register throughput: ``MetadataIndex.register`` (O(1), ``Catalog.note``) after ``Catalog.add`` wrote the entry;
* the first query of a fresh process (no snapshot, then with the incremental snapshot);
* query p50/p99 by tag (one match) from the catalog in this process, and through the index actor (criteria sent,
  evaluated inside it, only the matches sent back), plus the answer's size;
* the old protocol for comparison: the actor ships every entry of the experiment and the loader filters them.

Run: python benchmarks/bench_scale.py [--sizes 1000,10000,100000] [--no-ray]. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import tempfile
import time

from easyroutine_dist.storage import Catalog, layout
from easyroutine_dist.storage.fs import resolve
from easyroutine_dist.storage.query import build_criteria
from easyroutine_dist.storage.selection import select


def _scratch() -> str:
    path = tempfile.mkdtemp(prefix="bench-scale-")
    atexit.register(shutil.rmtree, path, True)
    return path


def _entry(i: int) -> dict:
    run_id, save_time, t = layout.new_run_id(1.6e9 + i)
    return {"run_id": run_id, "experiment_name": "big", "model_name": f"model-{i % 4}", "save_time": save_time,
            "saved_at_unix": t, "tag": f"t{i}", "other_metadata": {"batch": i % 100, "note": "x" * 64},
            "extraction_config": {"extract_resid_out": True, "extract_attn_pattern": False},
            "interventions": [], "target_token_positions": ["last", -2], "pivot_positions": None,
            "n_parts": 8, "n_keys": 24, "n_rows": 1024}


def _fill(root: str, n: int) -> list[dict]:
    """n entries written as a committer writes them (one file each, under _catalog/big/)."""
    d = os.path.join(root, layout.CATALOG_DIR, "big")
    os.makedirs(d, exist_ok=True)
    out = []
    for i in range(n):
        e = _entry(i)
        with open(os.path.join(d, f"{e['run_id']}.json"), "w") as f:
            json.dump(e, f, sort_keys=True)
        out.append(e)
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def bench(n: int, use_ray: bool, reps: int) -> dict:
    root = os.path.join(_scratch(), "acts")
    entries = _fill(root, n)
    store = resolve(root)
    row: dict = {"runs": n}
    t = time.perf_counter()
    assert len(Catalog(store).entries("big")) == n  # reads every entry; writes the first snapshot segment
    row["first_query_no_snapshot_s"] = time.perf_counter() - t
    t = time.perf_counter()
    assert len(Catalog(store).entries("big")) == n  # a fresh process with the snapshot
    row["first_query_snapshot_s"] = time.perf_counter() - t
    seg_dir = os.path.join(root, layout.CATALOG_DIR, layout.SNAPSHOT_DIR, "big")
    row["snapshot_mb"] = sum(os.path.getsize(os.path.join(seg_dir, f)) for f in os.listdir(seg_dir)) / 2**20
    time.sleep(2.2)  # past the catalog's directory-mtime margin, as a steady state is
    cat = Catalog(store)
    want = entries[n // 2]
    crit = build_criteria(tag=want["tag"])
    assert select(cat, "big", crit) == [want]
    row["catalog_p50_ms"], row["catalog_p99_ms"] = (
        lambda xs: (statistics.median(xs), _pct(xs, 0.99)))(_time(lambda: select(cat, "big", crit), reps))
    if not use_ray:
        return row
    import ray

    from easyroutine_dist.distributed import index as _index
    from easyroutine_dist.distributed.index import MetadataIndex

    idx = _index.get_index()
    ray.get(idx.query.remote(root, None, "big", crit), timeout=600)  # loads the root (snapshot) in the actor
    time.sleep(2.2)
    assert _index._query_provider(store, "big", crit) == [want]
    xs = _time(lambda: _index._query_provider(store, "big", crit), reps)
    row["actor_p50_ms"], row["actor_p99_ms"] = statistics.median(xs), _pct(xs, 0.99)
    row["answer_bytes"] = len(json.dumps(ray.get(idx.query.remote(root, None, "big", crit))))  # JSON size
    xs = _time(lambda: [e for e in ray.get(idx.entries.remote(root, None, "big")) if e["tag"] == want["tag"]],
               max(3, reps // 20))
    row["old_ship_all_p50_ms"] = statistics.median(xs)
    row["old_answer_mb"] = len(json.dumps(ray.get(idx.entries.remote(root, None, "big")))) / 2**20
    # register throughput: the committer's entry write (Catalog.add) and the index's O(1) note, in-process
    local = MetadataIndex()
    local.query(root, None, "big", crit)
    extra = [_entry(n + i) for i in range(500)]
    writer = Catalog(store)
    for e in extra:
        writer.add(e)
    t = time.perf_counter()
    for e in extra:
        local.register(root, None, e)
    row["register_per_s"] = len(extra) / (time.perf_counter() - t)
    t = time.perf_counter()
    for e in extra[:100]:
        ray.get(idx.register.remote(root, None, e))
    row["register_actor_ms"] = (time.perf_counter() - t) * 10  # per call, round trip included
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--no-ray", action="store_true")
    a = p.parse_args()
    use_ray = not a.no_ray
    if use_ray:
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = [bench(int(n), use_ray, a.reps) for n in a.sizes.split(",")]
    cols = list(rows[-1])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r.get(c, float('nan')):.3g}" if isinstance(r.get(c), float) else str(r.get(c))
                                for c in cols) + " |")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, cpus: {os.cpu_count()}")


if __name__ == "__main__":
    main()
