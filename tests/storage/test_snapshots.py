"""Issue 10 item 2: catalog snapshots are incremental (a reader appends only what it read, never rewrites the
whole snapshot) and compacted rarely, by one writer at a time (storage/snapshots.py)."""

from __future__ import annotations

import json
import os
import time

import pytest

import easyroutine_dist.storage.catalog as catmod
from easyroutine_dist.storage import Catalog, layout, snapshots
from easyroutine_dist.storage.fs import resolve


def _entries(n: int, exp: str = "e", start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        run_id, save_time, t = layout.new_run_id(1.6e9 + i)
        out.append({"run_id": run_id, "experiment_name": exp, "model_name": "m", "save_time": save_time,
                    "saved_at_unix": t, "tag": f"t{i}", "other_metadata": {}, "extraction_config": {},
                    "interventions": [], "target_token_positions": ["last"], "pivot_positions": None})
    return out


def _decode(doc: dict) -> dict[str, dict]:
    """A segment's entries by file name, decoded here by hand: format 2 (column arrays) or format 1."""
    if "format" not in doc:
        return doc["entries"]
    assert doc["format"] == 2
    out = {}
    for g in doc["groups"]:
        for i, name in enumerate(g["names"]):
            out[name] = {k: g["columns"][j][i] for j, k in enumerate(g["keys"])}
    return out


def _segments(root: str, exp: str = "e") -> dict[str, dict]:
    d = os.path.join(root, layout.CATALOG_DIR, layout.SNAPSHOT_DIR, exp)
    return {n: _decode(json.load(open(os.path.join(d, n)))) for n in sorted(os.listdir(d)) if n.startswith("seg-")}


def test_a_reader_appends_only_what_it_read(tmp_path):
    root = str(tmp_path / "acts")
    store = resolve(root)
    writer = Catalog(store)
    first = _entries(catmod.COMPACT_AFTER + 6)
    for e in first:
        writer.add(e)
    assert len(Catalog(store).entries("e")) == len(first)  # reads each, writes the first segment
    (seg1, body1), = _segments(root).items()
    assert sorted(body1) == sorted(f"{e['run_id']}.json" for e in first)
    stat1 = os.stat(os.path.join(root, "_catalog", "_snapshots", "e", seg1))
    more = _entries(catmod.COMPACT_AFTER, start=1000)
    for e in more:
        writer.add(e)
    assert [e["run_id"] for e in Catalog(store).entries("e")] == [e["run_id"] for e in first + more]
    segs = _segments(root)
    assert len(segs) == 2 and segs[seg1] == body1  # the first segment is not rewritten
    assert os.stat(os.path.join(root, "_catalog", "_snapshots", "e", seg1)).st_mtime_ns == stat1.st_mtime_ns
    (new,) = [b for n, b in segs.items() if n != seg1]
    assert sorted(new) == sorted(f"{e['run_id']}.json" for e in more)  # only what this reader read
    assert not os.path.exists(os.path.join(root, "_catalog", "_snapshots", "e.json"))


def test_compaction_is_rare_and_keeps_every_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(catmod, "COMPACT_AFTER", 2)
    root = str(tmp_path / "acts")
    store = resolve(root)
    writer = Catalog(store)
    everything = []
    for r in range(snapshots.MAX_SEGMENTS):
        batch = _entries(2 if r else 40, start=100 * r)
        for e in batch:
            writer.add(e)
        everything += batch
        assert len(Catalog(store).entries("e")) == len(everything)  # a new reader each round: one segment each
        assert len(_segments(root)) == r + 1  # no compaction while there are at most MAX_SEGMENTS
    batch = _entries(2, start=10_000)
    for e in batch:
        writer.add(e)
    everything += batch
    assert len(Catalog(store).entries("e")) == len(everything)  # the 17th segment triggers one compaction
    segs = _segments(root)
    sizes = sorted(len(b) for b in segs.values())
    assert sizes == [16 * 2, 40]  # the large first segment is not rewritten: the 16 small ones are merged
    assert sorted(n for b in segs.values() for n in b) == sorted(f"{e['run_id']}.json" for e in everything)
    assert not os.path.exists(os.path.join(root, "_catalog", "_snapshots", "e", snapshots.LOCK_NAME))
    reads = []
    real = catmod.read_bytes
    monkeypatch.setattr(catmod, "read_bytes", lambda s, p, *a, **k: (reads.append(p), real(s, p, *a, **k))[1])
    assert [e["run_id"] for e in Catalog(store).entries("e")] == [e["run_id"] for e in everything]
    assert reads == []  # every entry came from the two segments (read by snapshots.read)


def test_plan_rewrites_everything_only_when_the_snapshot_doubled():
    small = {f"s{i:02d}": 10 for i in range(snapshots.MAX_SEGMENTS)}
    assert snapshots.plan({**small}) == []
    assert snapshots.plan({"big": 1000, **small}) == sorted(small)  # 160 < 1000: the big one stays
    assert snapshots.plan({"big": 150, **small}) == sorted(["big", *small])  # 160 >= 150: merge all


@pytest.mark.parametrize("age_s, compacted", [(0.0, False), (snapshots.LOCK_STALE_S + 5, True)])
def test_one_compactor_at_a_time(tmp_path, age_s, compacted):
    root = str(tmp_path / "acts")
    store = resolve(root)
    entries = _entries(snapshots.MAX_SEGMENTS + 1)
    sizes = {snapshots.append(store, "e", {f"{e['run_id']}.json": e}): 1 for e in entries}
    lock = os.path.join(root, "_catalog", "_snapshots", "e", snapshots.LOCK_NAME)
    with open(lock, "w") as f:
        json.dump({"owner": "someone", "at": time.time() - age_s}, f)
    done = snapshots.compact(store, "e", sizes, lambda n, e, w: True)
    if compacted:  # an abandoned lock is taken over, then released
        assert done is not None and len(_segments(root)) == 1 and not os.path.exists(lock)
    else:  # a live lock: nothing is touched
        assert done is None and len(_segments(root)) == len(entries) and os.path.exists(lock)
    assert sorted(n for b in _segments(root).values() for n in b) == sorted(f"{e['run_id']}.json" for e in entries)
