"""Statistics stored with a run (storage/stats.py): per part, merged at commit, read by QueryResult.statistics; equal
to plain torch over the loaded run's real slots, on local disk, memory:// and S3."""

from __future__ import annotations

import os

import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.distributed import tokenize_batches
from easyroutine_dist.errors import StorageError
from easyroutine_dist.storage.runs import run_dir
from easyroutine_dist.storage.stats import RUN_FILE, RUN_JSON, add_part_statistics

from ..distributed.tiny import char_tokenizer, prompts
from ..models import hooked

POSITIONS = ["all", "last"]
CHUNKS = [(0, 7), (7, 9), (9, 19), (19, 23)]  # uneven parts: each pads "all" to its own longest row


@pytest.fixture(scope="module")
def part_caches():
    model = hooked("llama")
    texts = prompts(23)
    cfg = ExtractionConfig(extract_resid_out=True, save_logits=True)
    return [model.extract_cache(tokenize_batches(char_tokenizer(), texts[a:b], 3), POSITIONS, extraction_config=cfg,
                                row_offset=a) for a, b in CHUNKS]


def write_run(saver, caches, statistics=(True, True, True, True), commit_statistics=True):
    """A multi-part run written the way workers write it (part statistics before each part's commit)."""
    w = saver.writer
    run = w.begin_run(saver.experiment_name, "tiny-llama", {"tag": None})
    for i, c in enumerate(caches):
        rec = w.write_part(run, i, c)
        if statistics[i]:
            add_part_statistics(w.store, w.store.path(run.rel), rec, c)
        w.commit_part(run, rec)
    w.commit_run(run, statistics=commit_statistics)
    return run


def assert_matches_torch(stats, cache, keys=("resid_out_0", "resid_out_2", "logits")):
    """``stats`` equal (float32 tolerance) plain-torch statistics of ``cache``'s real slots."""
    vm = cache["valid_mask"]
    assert not vm.all()
    for k in keys:
        x = cache[k][vm].double()
        s = stats[k]
        assert s["count"] == x.shape[0] == int(vm.sum())
        torch.testing.assert_close(s["mean"], x.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["var"], x.var(0, correction=0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["min"], x.amin(0), rtol=0, atol=0)
        torch.testing.assert_close(s["max"], x.amax(0), rtol=0, atol=0)
        assert s["norm_mean"] == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-6)
    assert set(stats) == {k for k in cache.tensor_keys() if cache[k].is_floating_point()}


def test_run_statistics_equal_torch_over_the_loaded_run(backend, part_caches):
    saver = backend.saver("stats")
    run = write_run(saver, part_caches)
    q = backend.loader("stats").query()
    cache, _ = q.load()
    assert cache["valid_mask"].shape[0] == 23
    assert_matches_torch(q.statistics(), cache)
    store = saver.store
    assert store.fs.exists(store.path(run.rel, RUN_JSON)) and store.fs.exists(store.path(run.rel, RUN_FILE))
    # the statistics shards are not cache keys: a load returns what was extracted, nothing more
    assert sorted(cache.tensor_keys()) == sorted(part_caches[0].tensor_keys())


def test_merge_of_part_statistics_when_the_run_file_is_missing(local_backend, part_caches):
    saver = local_backend.saver("stats")
    run = write_run(saver, part_caches)
    q = local_backend.loader("stats").query()
    from_file = q.statistics()
    os.remove(saver.store.path(run.rel, RUN_JSON))
    merged = q.statistics()  # read from each part's statistics shard
    for k in from_file:
        for f in ("mean", "var", "min", "max"):
            torch.testing.assert_close(merged[k][f], from_file[k][f], rtol=0, atol=0)
        assert merged[k]["count"] == from_file[k]["count"]
    assert_matches_torch(merged, q.load()[0])


def test_statistics_survive_a_move_to_another_experiment(local_backend, part_caches):
    saver = local_backend.saver("stats")
    write_run(saver, part_caches)
    q = local_backend.loader("stats").query()
    q.update_run_experiment(-1, "moved")
    moved = local_backend.loader("moved").query()
    assert_matches_torch(moved.statistics(), moved.load()[0])


def test_save_cache_with_statistics(local_backend, part_caches):
    saver = local_backend.saver("single")
    c = part_caches[2]
    saver.save_cache(c, statistics=True, tag="with")
    saver.save_cache(c, tag="without")
    loader = local_backend.loader("single")
    assert_matches_torch(loader.query(tag="with").statistics(), c)
    with pytest.raises(StorageError, match="statistics=True"):
        loader.query(tag="without").statistics()


def test_a_part_without_statistics_is_named_and_no_run_file_is_written(local_backend, part_caches):
    saver = local_backend.saver("stats")
    run = write_run(saver, part_caches, statistics=(True, False, True, True))
    assert not os.path.exists(saver.store.path(run.rel, RUN_JSON))
    q = local_backend.loader("stats").query()
    assert len(q) == 1  # the run itself is committed and loads
    with pytest.raises(StorageError, match=r"parts \[1\]"):
        q.statistics()


def test_verify_finds_nothing_to_remove_in_a_run_with_statistics(local_backend, part_caches):
    scan_run = pytest.importorskip("easyroutine_dist.storage.verify").scan_run  # the verify tool's module

    saver = local_backend.saver("stats")
    write_run(saver, part_caches)
    entry = local_backend.loader("stats").query()[-1]
    scan = scan_run(saver.store, run_dir(saver.store, entry))
    assert scan.clean and not scan.garbage(include_uncommitted=True), scan
