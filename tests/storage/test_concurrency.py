"""Concurrent savers (threads and spawned processes) into one experiment: every run lands, none collides."""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ThreadPoolExecutor

import torch

from easyroutine_dist.config import ExtractionConfig


def _worker(url: str, options, worker: int, n: int) -> list[str]:
    from easyroutine_dist.interpretability.activation_saver import ActivationSaver

    saver = ActivationSaver(url, "shared", storage_options=options)
    return [saver.save({"v": torch.tensor([worker * 100 + i])}, "m", ["last"], None, ExtractionConfig(),
                       {"w": worker, "i": i}) for i in range(n)]


def _check(backend, expected: set[int]) -> None:
    loader = backend.loader("shared")
    res = loader.query()
    values = {int(res.load(e["run_id"])[0]["v"][0]) for e in res}
    assert values == expected
    assert loader.rebuild_catalog() == len(expected)
    assert len(backend.loader("shared").query()) == len(expected)


def test_threads(backend):
    with ThreadPoolExecutor(4) as pool:
        paths = [p for f in [pool.submit(_worker, backend.url, backend.options, w, 5) for w in range(4)]
                 for p in f.result()]
    assert len(set(paths)) == 20
    _check(backend, {w * 100 + i for w in range(4) for i in range(5)})


def test_processes_spawn(local_backend):
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_worker, [(local_backend.url, None, w, 4) for w in range(3)])
    assert len({p for r in results for p in r}) == 12
    _check(local_backend, {w * 100 + i for w in range(3) for i in range(4)})
