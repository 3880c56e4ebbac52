"""Distributed engine figures on this machine (tiny random llama, CPU): driver memory, per-partition overhead,
rows/s with 1 vs 2 workers. Figures go to docs/performance.md ("## Distributed (issue 5)").

    python benchmarks/bench_distributed.py [--quick] [--json out.json]

Driver memory is measured with tracemalloc (Python allocations of the driver only, from just before ``extract``
to its return; the prompt list itself is created before and not counted) and with the driver's RSS growth.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import sys
import tempfile
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")



def _scratch(prefix: str) -> str:
    """A temporary folder removed when the benchmark exits."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measuring_extractor():
    """A DistributedExtractor that splits the driver's tracemalloc peak into scheduling and run-commit phases."""
    from easyroutine_dist.distributed import DistributedExtractor

    class Measured(DistributedExtractor):
        phases: dict = {}

        def _commit(self, writer, run, n_parts):
            _, peak = tracemalloc.get_traced_memory()
            self.phases["schedule_peak_mb"] = round(peak / 2**20, 2)
            tracemalloc.reset_peak()
            url = super()._commit(writer, run, n_parts)
            _, peak = tracemalloc.get_traced_memory()
            self.phases["commit_peak_mb"] = round(peak / 2**20, 2)
            return url

    return Measured


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import ray

    from easyroutine_dist.config import ExtractionConfig
    from easyroutine_dist.distributed import DistributedExtractor
    from easyroutine_dist.storage.api import ActivationSaver
    from tests.distributed.tiny import prompts, save_tiny_model

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    model = save_tiny_model(_scratch(prefix="bench-tiny-"))
    cfg = ExtractionConfig(extract_resid_out=True, save_logits=False)
    base = _scratch(prefix="bench-dist-")
    out: dict = {"machine": f"{os.cpu_count()} CPU cores", "model": "tiny llama (3 layers, d=32, vocab 96), CPU"}

    sizes = [500, 2000] if args.quick else [1000, 5000, 20000]
    with _measuring_extractor()(model, num_workers=2) as ex:
        ex.workers_info()  # model load outside the timings
        warm = ex.extract(prompts(64), ["last"], cfg, ActivationSaver(base, "warm"), batch_size=32, partition_size=32)
        mem = []
        for n in sizes:
            data = prompts(n, seed=n)
            saver = ActivationSaver(base, f"mem-{n}")
            rss0 = _rss_mb()
            tracemalloc.start()
            run = ex.extract(data, ["last"], cfg, saver, batch_size=32, partition_size=250)
            tracemalloc.stop()
            mem.append({"prompts": n, "partitions": run.n_partitions, **ex.phases,
                        "rss_growth_mb": round(_rss_mb() - rss0, 1), "seconds": round(run.seconds, 2),
                        "rows_per_s": round(n / run.seconds, 1)})
            print("driver memory", mem[-1], flush=True)
        out["driver_memory"] = mem
        out["driver_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

        # overhead per partition: 1 worker, tiny partitions, driver wall minus time inside the worker
        n_parts = 60 if args.quick else 200
        data = prompts(n_parts * 2, seed=7)
        runs = []
        for _ in range(2):
            runs.append(ex.extract(data, ["last"], cfg, ActivationSaver(base, "overhead"), batch_size=2,
                                   partition_size=2))
        r = min(runs, key=lambda x: x.seconds)
        out["overhead"] = {
            "partitions": r.n_partitions, "rows_per_partition": 2, "workers": 2,
            "wall_ms_per_partition": round(1000 * r.seconds / r.n_partitions, 2),
            "worker_ms_per_partition": round(1000 * r.worker_seconds / r.n_partitions, 2),
            "overhead_ms_per_partition": round(1000 * (r.seconds * 2 - r.worker_seconds) / r.n_partitions / 2, 2),
            "commit_run_ms": round(1000 * r.commit_seconds, 1),
        }
        print("overhead", out["overhead"], flush=True)
        del warm

    n = 2000 if args.quick else 8000
    data = prompts(n, seed=11)
    tput = []
    for workers in (1, 2):
        with DistributedExtractor(model, num_workers=workers) as ex:
            ex.workers_info()
            best = None
            for _ in range(2):
                run = ex.extract(data, ["last"], cfg, ActivationSaver(base, f"tput-{workers}"), batch_size=32,
                                 partition_size=500)
                best = run if best is None or run.seconds < best.seconds else best
            tput.append({"workers": workers, "rows": n, "seconds": round(best.seconds, 2),
                         "rows_per_s": round(n / best.seconds, 1)})
            print("throughput", tput[-1], flush=True)
    out["throughput"] = tput
    ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
