"""Query semantics for every criterion, on normalised values."""

from __future__ import annotations

import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.intervention_spec import Intervention


@pytest.fixture
def populated(local_backend):
    s = local_backend.saver("q")
    iv = [Intervention("full", "resid_out_0", [(0, 2)], "ablation")]
    s.save(torch.ones(1), "gpt2", [(0, 2), "last"], None, ExtractionConfig(extract_resid_out=True),
           {"batch_id": 0, "labels": (1, 2)}, tag="a", pivot_positions=[3])
    s.save(torch.ones(1), "gpt2", ["last"], iv, ExtractionConfig(extract_resid_out=True, extract_attn_pattern=True),
           {"batch_id": 1}, tag="b")
    s.save(torch.ones(1), "org/llama", ["all"], None, {"extract_mlp_out": True}, {"batch_id": 1}, tag="c")
    local_backend.saver("other").save(torch.ones(1), "gpt2", ["last"], None, ExtractionConfig(), tag="a")
    return local_backend.loader("q"), iv


def tags(res) -> list[str]:
    return [e["tag"] for e in res]


def test_experiment(populated):
    loader, _ = populated
    assert tags(loader.query()) == ["a", "b", "c"]
    assert tags(loader.query(experiment_name="other")) == ["a"]
    assert len(loader.query(experiment_name="missing")) == 0


def test_model_and_tag(populated):
    loader, _ = populated
    assert tags(loader.query(model_name="gpt2")) == ["a", "b"]
    assert tags(loader.query(model_name="org/llama")) == ["c"]
    assert tags(loader.query(tag="b")) == ["b"]
    assert tags(loader.query(model_name="gpt2", tag="c")) == []


def test_positions_tuple_matches_tuple(populated):
    loader, _ = populated
    assert tags(loader.query(target_token_positions=[(0, 2), "last"])) == ["a"]
    assert tags(loader.query(target_token_positions=[[0, 2], "last"])) == ["a"]
    assert tags(loader.query(target_token_positions=["last"])) == ["b"]
    assert tags(loader.query(target_token_positions=[(0, 3), "last"])) == []
    assert tags(loader.query(pivot_positions=[3])) == ["a"]
    assert tags(loader.query(pivot_positions=(3,))) == ["a"]


def test_custom_keys(populated):
    loader, _ = populated
    assert tags(loader.query(custom_keys={"batch_id": 1})) == ["b", "c"]
    assert tags(loader.query(custom_keys={"labels": (1, 2)})) == ["a"]
    assert tags(loader.query(custom_keys={"batch_id": 1, "labels": (1, 2)})) == []
    assert tags(loader.query(custom_keys={"nope": 1})) == []


def test_extraction_config(populated):
    loader, _ = populated
    assert tags(loader.query(extraction_config=ExtractionConfig(extract_attn_pattern=True))) == ["b"]
    assert tags(loader.query(extraction_config=ExtractionConfig(extract_resid_out=True))) == ["a", "b"]
    assert tags(loader.query(extraction_config={"extract_mlp_out": True})) == ["c"]
    assert tags(loader.query(extraction_config=ExtractionConfig(extract_mlp_out=True))) == ["c"]
    assert tags(loader.query(extraction_config=ExtractionConfig(extract_mlp_out=True, extract_resid_out=True))) == []
    assert tags(loader.query(extraction_config=ExtractionConfig(save_logits=False))) == []


def test_interventions(populated):
    loader, iv = populated
    assert tags(loader.query(interventions=iv)) == ["b"]
    assert tags(loader.query(interventions=[i.to_dict() for i in iv])) == ["b"]
    assert tags(loader.query(interventions=[])) == ["a", "c"]


def test_save_time(populated):
    loader, _ = populated
    res = loader.query()
    first = res[0]
    assert first["run_id"] in [e["run_id"] for e in loader.query(save_time=first["save_time"])]
    assert tags(loader.query(save_time=first["run_id"])) == ["a"]
    assert tags(loader.query(save_time=first["save_time"][:10])) == ["a", "b", "c"]
    assert tags(loader.query(save_time="1999")) == []


def test_result_slicing_and_printout(populated):
    loader, _ = populated
    res = loader.query()
    assert tags(res[1:]) == ["b", "c"]
    text = str(res)
    assert len(text.splitlines()) == 2 + 3
    for e in res:
        assert e["run_id"] in text
    assert len(res.get_paths()) == 3 and all(p.endswith(e["run_id"]) for p, e in zip(res.get_paths(), res))


def test_new_runs_seen_by_existing_loader(local_backend):
    loader = local_backend.loader("q")
    assert len(loader.query()) == 0
    local_backend.saver("q").save(torch.ones(1), "m", ["last"], None, ExtractionConfig())
    assert len(loader.query()) == 1
    loader.query().remove(0)
    assert len(loader.query()) == 0


def test_catalog_snapshot_is_only_a_cache(local_backend):
    """A new loader reads the compacted snapshot instead of every entry; the listing still decides what exists."""
    import os

    from easyroutine_dist.storage import Catalog, fs as fsmod
    from easyroutine_dist.storage.catalog import COMPACT_AFTER

    saver = local_backend.saver("snap")
    saved = [saver.save(torch.ones(1), "m", ["last"], None, ExtractionConfig(), tag=str(i))
             for i in range(COMPACT_AFTER + 2)]
    assert len(local_backend.loader("snap").query()) == COMPACT_AFTER + 2  # first query writes the snapshot
    snap = os.path.join(local_backend.url, "_catalog", "_snapshots", "snap")  # incremental segments (issue 10)
    assert [n for n in os.listdir(snap) if n.startswith("seg-")]
    victim = local_backend.loader("snap").query(tag="5")[0]["run_id"]
    os.unlink(os.path.join(local_backend.url, "_catalog", "snap", f"{victim}.json"))  # stale snapshot now
    reads = []
    real = fsmod.read_bytes

    def counting(store, path, *a, **k):
        reads.append(path)
        return real(store, path, *a, **k)

    import easyroutine_dist.storage.catalog as catmod

    catmod.read_bytes = counting
    try:
        res = local_backend.loader("snap").query()
    finally:
        catmod.read_bytes = real
    assert len(res) == COMPACT_AFTER + 1 and victim not in [e["run_id"] for e in res]
    assert len(reads) <= 2  # the snapshot, not one read per run
    # a fresh Catalog answers the same: every run saved (the paths save returned) but the one whose entry is gone,
    # oldest first, each with its own tag
    kept = [(str(p).rstrip("/").rsplit("/", 1)[-1], str(i)) for i, p in enumerate(saved)]
    kept = [(run_id, tag) for run_id, tag in kept if run_id != victim]
    assert len(kept) == COMPACT_AFTER + 1
    assert [(e["run_id"], e["tag"]) for e in Catalog(saver.store).entries("snap")] == kept
    assert [(e["run_id"], e["tag"]) for e in res] == kept


def test_catalog_mtime_fast_path(local_backend):
    """An unchanged (old) directory mtime skips the listing; any change to the directory is seen."""
    import os
    import time

    saver = local_backend.saver("mt")
    saver.save(torch.ones(1), "m", ["last"], None, ExtractionConfig(), tag="first")
    cat_dir = os.path.join(local_backend.url, "_catalog", "mt")
    old = time.time_ns() - 10_000_000_000
    os.utime(cat_dir, ns=(old, old))
    loader = local_backend.loader("mt")
    assert tags(loader.query()) == ["first"]
    local_backend.saver("mt").save(torch.ones(1), "m", ["last"], None, ExtractionConfig(), tag="second")
    assert tags(loader.query()) == ["first", "second"]  # mtime moved: relisted
    os.utime(cat_dir, ns=(old, old))
    assert tags(loader.query()) == ["first", "second"]  # relisted once more (mtime differs from the last seen)
    local_backend.saver("mt").save(torch.ones(1), "m", ["last"], None, ExtractionConfig(), tag="third")
    os.utime(cat_dir, ns=(old, old))  # pretend the change kept the old timestamp: the cached listing is used
    assert tags(loader.query()) == ["first", "second"]
    assert tags(local_backend.loader("mt").query()) == ["first", "second", "third"]  # a fresh loader lists


def test_index_follows_new_and_removed_runs(local_backend):
    loader = local_backend.loader("ix")
    saver = local_backend.saver("ix")
    saver.save(torch.ones(1), "m", ["last"], None, ExtractionConfig(), {"b": 1}, tag="x")
    assert len(loader.query(tag="x")) == 1 and len(loader.query(custom_keys={"b": 1})) == 1
    local_backend.saver("ix").save(torch.ones(1), "m", ["last"], None, ExtractionConfig(), {"b": 1}, tag="x")
    assert len(loader.query(tag="x")) == 2 and len(loader.query(custom_keys={"b": 1}, model_name="m")) == 2
    local_backend.loader("ix").query(tag="x").remove(0)
    assert len(loader.query(tag="x")) == 1 and len(loader.query(model_name="m")) == 1
    assert len(loader.query(custom_keys={"b": 2})) == 0 and len(loader.query(tag="y")) == 0


def test_indexed_queries_equal_brute_force(local_backend):
    """The catalog's incremental index answers exactly what filtering every entry with ``matches`` answers."""
    import random

    from easyroutine_dist.storage import Catalog, layout
    from easyroutine_dist.storage.query import build_criteria, matches

    rng = random.Random(0)
    saver = local_backend.saver("bf")
    writer_catalog = Catalog(saver.store)  # another writer: the loader sees its entries only through storage
    loader = local_backend.loader("bf")
    entries = []
    for step in range(6):
        for _ in range(15):
            run_id, save_time, t = layout.new_run_id(rng.uniform(1.6e9, 1.7e9))  # out of order on purpose
            e = {"run_id": run_id, "experiment_name": "bf", "model_name": rng.choice(["a", "b", None]),
                 "save_time": save_time, "saved_at_unix": t, "tag": rng.choice(["x", "y", None]),
                 "other_metadata": {"k": rng.choice([1, 2, "1", [1]]), **({"j": 1} if rng.random() < .5 else {})},
                 "extraction_config": {}, "interventions": [], "target_token_positions": ["last"],
                 "pivot_positions": None}
            writer_catalog.add(e)
            entries.append(e)
        if step == 3:
            gone = entries.pop(rng.randrange(len(entries)))
            writer_catalog.discard("bf", gone["run_id"])
        for kw in ({"tag": "x"}, {"tag": "y", "model_name": "a"}, {"custom_keys": {"k": 1}},
                   {"custom_keys": {"k": [1]}}, {"custom_keys": {"k": "1", "j": 1}}, {"model_name": "b"}, {}):
            crit = build_criteria(**kw)
            want = sorted((e["run_id"] for e in entries if matches(e, crit)))
            got = [e["run_id"] for e in loader.query(**kw)]
            assert got == sorted(got, key=lambda r: [x for x in entries if x["run_id"] == r][0]["saved_at_unix"])
            assert sorted(got) == want, kw
