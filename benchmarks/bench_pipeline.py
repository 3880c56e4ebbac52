"""Compute overlapped with storage (issue 9 item 2): a partition written serially (every batch forwarded, then the
whole partition written, as workers did before) vs streamed (``PartStream``: each batch's shards written by a
background thread while the next batch runs, at most ``max_inflight_bytes`` waiting).

* The store is throttled: an object-store-like fsspec filesystem (``pipe_file`` per shard) that waits ``latency``
  plus ``bytes / bandwidth`` per request, one request at a time (a single upload stream), and keeps no shard bytes.
* The forward is fake, of settable cost: ``--compute-ms`` per batch (``sleep``: releases the GIL as a GPU forward
  does; ``--busy`` spins torch matmuls on the CPU instead), then a batch ``[rows, P, d]`` of float32 appears.
* Both paths run the real storage code: serialisation, crc32c checksums, the part record and its commit; the streamed
  one runs ``distributed.pipeline.stream_part`` (slot layout, ``on_batch``) on a fake model.

Prints rows/s serial and pipelined, the ideal ``min(compute rate, store rate)`` and each ratio to it, and peak RSS
growth (sampled every 2 ms) against the budget. Run: python benchmarks/bench_pipeline.py [--batches 32 ...]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Any

import torch
from fsspec.implementations.memory import MemoryFileSystem

from easyroutine_dist.cache import ActivationCache
from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.distributed.pipeline import stream_part
from easyroutine_dist.slots import LAYOUT_KEY, POS, VALID_KEY, SlotLayout, mapping_of
from easyroutine_dist.storage.fs import Store
from easyroutine_dist.storage.runs import RunWriter
from easyroutine_dist.storage.streaming import PartStream, coalesce_target, coalesced

from _proc import rss_mb  # noqa: E402 (scripts run from benchmarks/)

MIB = 1024**2


class ThrottledFS(MemoryFileSystem):
    """An in-memory object store behind a throttled link: each ``pipe_file`` takes ``latency + bytes/bandwidth``,
    one at a time. Objects over 64 KiB (shards) are counted, not kept, so memory measures the writer, not the store."""

    def __init__(self, bandwidth: float, latency: float) -> None:
        super().__init__(skip_instance_cache=True)
        self.store = {}
        self.pseudo_dirs = [""]
        self.bandwidth, self.latency, self.link = bandwidth, latency, threading.Lock()
        self.sent = 0

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        with self.link:
            time.sleep(self.latency + len(value) / self.bandwidth)
            self.sent += len(value)
        super().pipe_file(path, value if len(value) <= 64 * 1024 else b"", *args, **kwargs)


class FakeModel:
    """The two methods ``stream_part`` uses: ``_prepare`` (masks) and ``extract_cache`` (one cache per batch)."""

    def __init__(self, d: int, compute_s: float, busy: bool) -> None:
        self.d, self.compute_s, self.busy = d, compute_s, busy
        self.w = torch.randn(256, 256)
        self.rows = torch.randn(64, d)  # batches are copies of these rows: making data costs ~nothing

    def _prepare(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs["input_ids"], inputs["attention_mask"]

    def _forward(self, rows: int) -> ActivationCache:
        """Costs ``compute_s`` in all, making its output included."""
        t0 = time.perf_counter()
        out = self.rows[torch.arange(rows) % 64].reshape(rows, 1, self.d)
        if self.busy:
            while time.perf_counter() - t0 < self.compute_s:
                self.w = torch.tanh(self.w @ self.w)
        else:
            time.sleep(max(0.0, self.compute_s - (time.perf_counter() - t0)))
        cache = ActivationCache()
        cache["resid_out_0"] = out
        cache[VALID_KEY] = torch.ones(rows, 1, dtype=torch.bool)
        lay = SlotLayout({POS: [("last", 1)]})
        lay.add_keys(["resid_out_0", VALID_KEY])
        cache["mapping_index"] = mapping_of(lay.axes[POS])
        cache["token_dict"] = {"last": [[0]] * rows}
        cache[LAYOUT_KEY] = lay.to_json()
        return cache

    def extract_cache(self, batches: list, positions: list, extraction_config: Any = None, on_batch: Any = None,
                      **_: Any) -> ActivationCache:
        out = ActivationCache()
        for b in batches:
            cache = self._forward(int(b["input_ids"].shape[0]))
            if on_batch is not None:
                on_batch(cache)
            else:
                out.cat(cache)
        out["metadata"] = {"model_name": "fake"}
        return out


class Peak:
    """Peak RSS growth (MiB) of this process while it runs, sampled every 2 ms."""

    def __enter__(self) -> "Peak":
        self.base, self.peak, self.stop = rss_mb(), 0.0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_mb() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def _setup(a: argparse.Namespace) -> tuple[RunWriter, Any, list, FakeModel]:
    fs = ThrottledFS(a.store_mbps * MIB, a.latency_ms / 1e3)
    writer = RunWriter(Store(fs=fs, root="/bench", protocol="memory"), max_shard_bytes=a.max_shard_mb * MIB)
    run = writer.begin_run("bench", "fake", {})
    ids = torch.zeros(a.rows, 4, dtype=torch.long)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for _ in range(a.batches)]
    return writer, run, batches, FakeModel(a.d, a.compute_ms / 1e3, a.busy)


def serial(a: argparse.Namespace, part_id: int) -> tuple[float, float]:
    writer, run, batches, model = _setup(a)
    with Peak() as peak:
        t0 = time.perf_counter()
        cache = model.extract_cache(batches, ["last"])
        writer.commit_part(run, writer.write_part(run, part_id, cache, check_committed=False))
        wall = time.perf_counter() - t0
    del cache
    return wall, peak.peak


def pipelined(a: argparse.Namespace, part_id: int) -> tuple[float, float, int]:
    writer, run, batches, model = _setup(a)
    with Peak() as peak:
        t0 = time.perf_counter()
        stream = PartStream(writer.store, writer.store.path(run.rel), part_id, checksum=writer.checksum,
                            max_shard_bytes=writer.max_shard_bytes, max_inflight_bytes=a.budget_mb * MIB)
        info = stream_part(model, stream, batches, ["last"], ExtractionConfig(extract_resid_out=True))
        writer.commit_part(run, stream.finish(info))
        wall = time.perf_counter() - t0
    return wall, peak.peak, stream.peak_inflight


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=32)
    p.add_argument("--rows", type=int, default=8, help="rows per batch")
    p.add_argument("--d", type=int, default=131072, help="floats per row (8 x 131072 x 4 B = 4 MiB per batch)")
    p.add_argument("--compute-ms", type=float, default=20.0, help="forward cost per batch")
    p.add_argument("--store-mbps", type=float, default=200.0, help="store bandwidth, MiB/s")
    p.add_argument("--latency-ms", type=float, default=2.0, help="store latency per request")
    p.add_argument("--budget-mb", type=int, default=32, help="max_inflight_bytes, MiB")
    p.add_argument("--max-shard-mb", type=int, default=1024)
    p.add_argument("--busy", action="store_true", help="a CPU-bound forward (torch matmuls) instead of sleep")
    p.add_argument("--repeat", type=int, default=3, help="best of N")
    a = p.parse_args()
    batch_bytes = a.rows * a.d * 4
    rows = a.rows * a.batches
    compute_rate = a.rows / (a.compute_ms / 1e3)
    # the store's time for the partition as the pipeline writes it: one request per write (small batches joined)
    writes = len(coalesced([batch_bytes] * a.batches, coalesce_target(a.max_shard_mb * MIB, a.budget_mb * MIB)))
    store_rate = rows / (writes * a.latency_ms / 1e3 + rows * batch_bytes / a.rows / (a.store_mbps * MIB))
    ideal = min(compute_rate, store_rate)
    s = min(serial(a, i) for i in range(a.repeat))
    q = min(pipelined(a, i) for i in range(a.repeat))
    print(f"partition: {a.batches} batches x {a.rows} rows, {batch_bytes / MIB:.1f} MiB per batch, "
          f"{rows * batch_bytes / a.rows / MIB:.0f} MiB in all; forward {a.compute_ms:g} ms/batch "
          f"({'busy CPU' if a.busy else 'sleep'}), store {a.store_mbps:g} MiB/s + {a.latency_ms:g} ms/request")
    print(f"compute {compute_rate:.0f} rows/s, store {store_rate:.0f} rows/s ({writes} writes), ideal min = "
          f"{ideal:.0f} rows/s")
    print("| path | rows/s | x ideal | peak RSS growth (MiB) | budget (MiB) |")
    print("|---|---|---|---|---|")
    print(f"| serial (forward all, then write) | {rows / s[0]:.0f} | {rows / s[0] / ideal:.2f} | {s[1]:.0f} | - |")
    print(f"| pipelined (streamed) | {rows / q[0]:.0f} | {rows / q[0] / ideal:.2f} | {q[1]:.0f} | {a.budget_mb} "
          f"(peak in flight {q[2] / MIB:.0f}) |")
    print(f"pipelined / serial = {s[0] / q[0]:.2f}x; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"cpus {os.cpu_count()}")


if __name__ == "__main__":
    main()
