"""Issue 10 item 1: query evaluation shared by the loader and the index actor (storage/selection.py), O(1)
registration of a committed run (Catalog.note) and run-id resolution without reading every entry
(Catalog.find_run)."""

from __future__ import annotations

import random

import pytest

import easyroutine_dist.storage.catalog as catmod
from easyroutine_dist.storage import Catalog, layout
from easyroutine_dist.storage.fs import resolve
from easyroutine_dist.storage.query import build_criteria, matches
from easyroutine_dist.storage.selection import select


def _entry(rng: random.Random, exp: str) -> dict:
    run_id, save_time, t = layout.new_run_id(rng.uniform(1.6e9, 1.7e9))
    return {"run_id": run_id, "experiment_name": exp, "model_name": rng.choice(["a", "b", None]),
            "save_time": save_time, "saved_at_unix": t, "tag": rng.choice(["x", "y", None]),
            "other_metadata": {"k": rng.choice([1, 2, "1"])}, "extraction_config": {}, "interventions": [],
            "target_token_positions": ["last"], "pivot_positions": None}


class _Counter:
    def __init__(self, monkeypatch):
        self.reads, self.lists = [], []
        real_read, real_list = catmod.read_bytes, catmod.list_names
        monkeypatch.setattr(catmod, "read_bytes", lambda s, p, *a, **k: (self.reads.append(p), real_read(s, p, *a, **k))[1])
        monkeypatch.setattr(catmod, "list_names", lambda s, p: (self.lists.append(p), real_list(s, p))[1])


QUERIES = ({"tag": "x"}, {"tag": "y", "model_name": "a"}, {"custom_keys": {"k": 1}}, {"model_name": "b"}, {},
           {"custom_keys": {"k": "1"}, "tag": None})


def _archive(tmp_path, seed: int, per_experiment: int):
    """A local catalog of random entries in experiments e1, e2, e3: (its store, the entries added)."""
    rng = random.Random(seed)
    store = resolve(str(tmp_path / "acts"))
    cat = Catalog(store)
    entries = [_entry(rng, exp) for exp in ("e1", "e2", "e3") for _ in range(per_experiment)]
    for e in entries:
        cat.add(e)
    return store, entries


def test_note_takes_a_run_without_reading_and_queries_see_it(tmp_path, monkeypatch):
    rng = random.Random(1)
    store = resolve(str(tmp_path / "acts"))
    writer, reader = Catalog(store), Catalog(store)
    entries = [_entry(rng, "e") for _ in range(50)]
    for e in entries:
        writer.add(e)
    reader.lookup("e", "tag", "x")  # the reader holds the experiment and a tag index
    counter = _Counter(monkeypatch)
    for _ in range(5):
        e = _entry(rng, "e")
        writer.add(e)  # the committer's write, in storage
        entries.append(e)
        assert reader.note(e) == len(entries)
    assert counter.reads == [] and counter.lists == []  # note is O(1): no listing, no read
    for kw in QUERIES:
        crit = build_criteria(**{k: v for k, v in kw.items() if v is not None})
        want = sorted((e for e in entries if matches(e, crit)), key=lambda e: (e["saved_at_unix"], e["run_id"]))
        assert [e["run_id"] for e in select(reader, "e", crit)] == [e["run_id"] for e in want], kw
    assert counter.reads == []  # the noted entries were not read back


def test_select_equals_brute_force_over_all_experiments(tmp_path):
    store, entries = _archive(tmp_path, seed=2, per_experiment=30)
    fresh = Catalog(store)
    for scope in ("e2", None):
        for kw in QUERIES:
            crit = build_criteria(**{k: v for k, v in kw.items() if v is not None})
            want = {e["run_id"] for e in entries if matches(e, crit) and scope in (None, e["experiment_name"])}
            got = [e["run_id"] for e in select(fresh, scope, crit)]
            assert len(got) == len(want) and set(got) == want, (scope, kw)


def test_find_run_reads_one_entry_not_the_archive(tmp_path, monkeypatch):
    store, entries = _archive(tmp_path, seed=3, per_experiment=40)
    target = entries[57]
    counter = _Counter(monkeypatch)
    assert Catalog(store).find_run(target["run_id"]) == [target]
    # one read per experiment of the one file the run's entry can be (120 runs stored), one listing of experiments
    assert sorted(counter.reads) == [store.path(layout.CATALOG_DIR, exp, f"{target['run_id']}.json")
                                     for exp in ("e1", "e2", "e3")]
    assert counter.lists == [store.path(layout.CATALOG_DIR)]
    assert Catalog(store).find_run(target["run_id"], "e1") == []  # another experiment's run
    missing = layout.new_run_id(1.65e9)[0]
    assert Catalog(store).find_run(missing) == [] and Catalog(store).find_run("../etc") == []


def test_find_run_does_not_return_a_removed_run(tmp_path):
    store = resolve(str(tmp_path / "acts"))
    cat = Catalog(store)
    e = _entry(random.Random(4), "e")
    cat.add(e)
    assert cat.find_run(e["run_id"]) == [e]
    Catalog(store).discard("e", e["run_id"])  # another process removes it; this catalog still caches it
    assert cat.find_run(e["run_id"]) == []


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
