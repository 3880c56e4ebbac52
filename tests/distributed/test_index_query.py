"""Issue 10 item 1: the index answers queries itself (only the matches and a count travel), registers a run in
O(1), holds a bounded number of storage roots, and resolves a run id without reading every entry."""

from __future__ import annotations

import json
import random

import ray
import torch

import easyroutine_dist.storage.catalog as catmod
from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.distributed import index as _index
from easyroutine_dist.distributed.index import MetadataIndex, get_index
from easyroutine_dist.storage import Catalog, layout
from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver
from easyroutine_dist.storage.fs import resolve
from easyroutine_dist.storage.query import build_criteria, matches


def _fill(root: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    cat = Catalog(resolve(root))
    out = []
    for i in range(n):
        run_id, save_time, t = layout.new_run_id(1.6e9 + i)
        e = {"run_id": run_id, "experiment_name": "big", "model_name": rng.choice(["a", "b"]),
             "save_time": save_time, "saved_at_unix": t, "tag": f"t{i}", "other_metadata": {"k": i % 7},
             "extraction_config": {}, "interventions": [], "target_token_positions": ["last"],
             "pivot_positions": None}
        cat.add(e)
        out.append(e)
    return out


def test_index_query_sends_only_the_matches(tmp_path):
    root = str(tmp_path / "acts")
    entries = _fill(root, 300)
    idx = MetadataIndex()
    for kw in ({"tag": "t42"}, {"custom_keys": {"k": 3}, "model_name": "a"}, {"model_name": "b"}, {}):
        crit = build_criteria(**kw)
        want = [e for e in entries if matches(e, crit)]  # entries oldest first by construction
        answer = idx.query(root, None, "big", crit)
        assert answer["count"] == len(want) and answer["entries"] == want, kw
    one = len(json.dumps(idx.query(root, None, "big", build_criteria(tag="t42"))))
    every = len(json.dumps(idx.entries(root, None, "big")))
    assert one * 100 < every  # the answer's size follows the matches (1 of 300), not the archive


def test_register_is_o1_and_roots_are_bounded(tmp_path, monkeypatch):
    roots = [str(tmp_path / f"r{i}") for i in range(3)]
    data = {r: _fill(r, 20, seed=i) for i, r in enumerate(roots)}
    idx = MetadataIndex(max_roots=2)
    for r in roots:
        assert idx.query(r, None, "big", {})["count"] == 20
    assert len(idx.status()["roots"]) == 2 and roots[0] not in idx.status()["roots"]  # least recently used out
    reads, lists = [], []
    real_read, real_list = catmod.read_bytes, catmod.list_names
    monkeypatch.setattr(catmod, "read_bytes", lambda s, p, *a, **k: (reads.append(p), real_read(s, p, *a, **k))[1])
    monkeypatch.setattr(catmod, "list_names", lambda s, p: (lists.append(p), real_list(s, p))[1])
    new = _fill(str(tmp_path / "other"), 1, seed=9)[0]  # a new run id
    Catalog(resolve(roots[2])).add(new)  # its committer wrote its entry
    assert idx.register(roots[2], None, new) == 21 and reads == [] and lists == []  # O(1): nothing listed or read
    # the evicted root reloads from storage and answers as before
    assert idx.query(roots[0], None, "big", build_criteria(tag="t3"))["entries"] == [data[roots[0]][3]]
    assert idx.find_run(roots[1], None, data[roots[1]][5]["run_id"]) == [data[roots[1]][5]]


def test_queries_through_the_actor_equal_the_catalog(ray_cluster, tmp_path):
    base = str(tmp_path / "acts")
    saver = ActivationSaver(base, "iq")
    for i in range(6):
        saver.save(torch.ones(2, 1, 3), "m" if i % 2 else "n", ["last"], None,
                   ExtractionConfig(extract_resid_out=True), {"i": i % 3}, tag=f"t{i % 2}")
    index = get_index()
    before = ray.get(index.status.remote())["queries"]
    store = saver.store
    for kw in ({"tag": "t1"}, {"custom_keys": {"i": 2}}, {"model_name": "n", "custom_keys": {"i": 0}}, {}):
        crit = build_criteria(**kw)
        via_index = _index._query_provider(store, "iq", crit)
        local = [e for e in Catalog(store).entries("iq") if matches(e, crit)]
        assert via_index is not None and via_index == local, kw
        assert [e["run_id"] for e in ActivationLoader(base, "iq").query(**kw)] == [e["run_id"] for e in local]
    assert ray.get(index.status.remote())["queries"] >= before + 8  # the actor answered them
    run = local[2]["run_id"]
    assert _index.find_run(store, run) == [e for e in local if e["run_id"] == run]


def test_a_local_root_is_served_only_to_callers_on_the_index_node(tmp_path):
    root = str(tmp_path / "acts")
    entries = _fill(root, 5)
    idx = MetadataIndex()
    idx.node_id = "node-a"  # the index's node (its disk holds this local path)
    crit = build_criteria(tag="t2")
    assert idx.query(root, None, "big", crit, caller_node="node-a")["entries"] == [entries[2]]
    # a caller on another node: its local path is another disk; the index declines and the caller reads itself
    assert idx.query(root, None, "big", crit, caller_node="node-b") is None
    assert idx.find_run(root, None, entries[1]["run_id"], caller_node="node-b") is None
    assert idx.register(root, None, entries[0], caller_node="node-b") == -1 and idx.registered == 0
    assert idx.query(root, None, "big", crit)["count"] == 1  # object-store roots send no node: always served


def test_lens_source_run_id_is_resolved_with_one_read_per_experiment(tmp_path, monkeypatch):
    import pytest

    from easyroutine_dist.distributed import DistributedExtractor
    from easyroutine_dist.errors import ConfigError

    saver = ActivationSaver(str(tmp_path / "acts"), "src")
    for tag in ("a", "b"):
        saver.save(torch.ones(2, 1, 3), "m", ["last"], None, ExtractionConfig(extract_resid_out=True), tag=tag)
    want = Catalog(saver.store).entries("src")[1]
    reads = []
    real = catmod.read_bytes
    monkeypatch.setattr(catmod, "read_bytes", lambda s, p, *a, **k: (reads.append(p), real(s, p, *a, **k))[1])
    monkeypatch.setattr(_index.ray, "is_initialized", lambda: False)  # no index: the catalog in this process
    store, entry = DistributedExtractor._source_entry(want["run_id"], saver)
    assert entry == want and reads == [saver.store.path("_catalog", "src", f"{want['run_id']}.json")]
    with pytest.raises(ConfigError, match="matches 0 runs"):
        DistributedExtractor._source_entry(layout.new_run_id(1.6e9)[0], saver)
