"""Run commit at scale (issue 10 item 3): ``RunWriter.commit_run`` of a run with N committed parts, as the
distributed driver calls it (``records=None``: record names are listed, no record is read), on local disk.

Part records are planted as tiny files named as ``commit_part`` names them (the commit lists names only).
Prints the commit time and the driver's RSS growth. Run: python benchmarks/bench_commit.py [--parts 1000,100000]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
import time

from easyroutine_dist.storage import layout
from easyroutine_dist.storage.runs import RunWriter


from _proc import rss_mb as _rss_mb  # noqa: E402 (scripts run from benchmarks/)


def bench(n: int) -> tuple[float, float, int]:
    root = tempfile.mkdtemp(prefix="bench-commit-")
    atexit.register(shutil.rmtree, root, True)
    writer = RunWriter(root)
    run = writer.begin_run("big", "m", {"positions": ["last"]})
    rec_dir = writer.store.path(run.rel, "records") if hasattr(run, "rel") else os.path.join(run.url, "records")
    os.makedirs(rec_dir, exist_ok=True)
    for pid in range(n):
        with open(os.path.join(rec_dir, layout.record_name(pid).split("/", 1)[1]), "w") as f:
            f.write("{}")
    rss0 = _rss_mb()
    t = time.perf_counter()
    writer.commit_run(run, n_rows=4 * n)
    wall = time.perf_counter() - t
    marker = os.path.join(os.path.dirname(rec_dir), layout.RUN_MARKER)
    return wall, _rss_mb() - rss0, os.path.getsize(marker)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="1000,10000,100000")
    a = p.parse_args()
    print("| parts | commit_run (s) | RSS growth (MB) | _SUCCESS (bytes) |")
    print("|---|---|---|---|")
    for n in (int(x) for x in a.parts.split(",")):
        wall, rss, size = bench(n)
        print(f"| {n} | {wall:.3f} | {rss:.1f} | {size} |")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, cpus {os.cpu_count()}")


if __name__ == "__main__":
    main()
