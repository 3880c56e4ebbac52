"""Issue 10 item 2 (first query at 100k runs): snapshot segments are one JSON document of column arrays (format 2),
parsed in one call, whose names are checked a group at once; format-1 segments stay readable, and every name read
back is still checked before it is used (a group with one bad entry is checked entry by entry, the bad one skipped
with a WARNING naming the segment)."""

from __future__ import annotations

import gc
import json
import logging
import os

import pytest

import easyroutine_dist.storage.catalog as catmod
from easyroutine_dist.storage import Catalog, layout, snapshots
from easyroutine_dist.storage.fs import resolve


def _entries(n: int, exp: str = "e", start: int = 0, models: int = 3) -> list[dict]:
    out = []
    for i in range(start, start + n):
        run_id, save_time, t = layout.new_run_id(1.7e9 + i)
        e = {"run_id": run_id, "experiment_name": exp, "model_name": f"org/model-{i % models}",
             "save_time": save_time, "saved_at_unix": t, "tag": f"t{i}", "other_metadata": {"i": i, "s": "x\n\"y"},
             "extraction_config": {"extract_resid_out": True}, "interventions": [], "pivot_positions": None,
             "target_token_positions": ["last", -2]}
        if i % 5 == 0:  # entries of another shape (older writers had fewer keys, newer ones more)
            e["n_rows"] = i
            del e["tag"]
        out.append(e)
    return out


def _seg_dir(root: str, exp: str = "e") -> str:
    return os.path.join(root, layout.CATALOG_DIR, layout.SNAPSHOT_DIR, exp)


def _put(root: str, name: str, doc: dict, exp: str = "e") -> None:
    os.makedirs(_seg_dir(root, exp), exist_ok=True)
    with open(os.path.join(_seg_dir(root, exp), name), "w") as f:
        json.dump(doc, f)


def _fill(root: str, entries: list[dict]) -> Catalog:
    writer = Catalog(resolve(root))
    for e in entries:
        writer.add(e)
    return writer


def test_segments_are_column_arrays_and_come_back_exactly(tmp_path):
    root = str(tmp_path / "acts")
    entries = _entries(catmod.COMPACT_AFTER + 11)
    _fill(root, entries)
    assert Catalog(resolve(root)).entries("e") == entries  # reads each entry; writes one segment
    (seg,) = os.listdir(_seg_dir(root))
    doc = json.load(open(os.path.join(_seg_dir(root), seg)))
    assert doc["format"] == 2 and set(doc) == {"format", "groups"}
    assert sorted(len(g["names"]) for g in doc["groups"]) == sorted([len(entries) - len(entries[::5]),
                                                                     len(entries[::5])])
    for g in doc["groups"]:  # one column per key, one value per run, in the order of the runs
        assert all(len(col) == len(g["names"]) for col in g["columns"])
        runs = g["columns"][g["keys"].index("run_id")]
        assert g["names"] == [f"{r}.json" for r in runs] and runs == sorted(runs)
    fresh = Catalog(resolve(root))
    got = fresh.entries("e")
    assert got == entries and [list(e) for e in got] == [sorted(e) for e in entries]  # key order (add sorts keys)
    assert [e["other_metadata"]["s"] for e in got] == ["x\n\"y"] * len(entries)


def test_format_1_segments_and_the_whole_file_snapshot_are_still_read(tmp_path, monkeypatch):
    root = str(tmp_path / "acts")
    old, older = _entries(10), _entries(10, start=100)
    _fill(root, old + older)
    _put(root, "seg-00000000000000000001-abcdef01.json", {"entries": {f"{e['run_id']}.json": e for e in old}})
    os.makedirs(os.path.dirname(_seg_dir(root)), exist_ok=True)
    with open(snapshots.legacy_path(resolve(root), "e"), "w") as f:
        json.dump({"entries": {f"{e['run_id']}.json": e for e in older}}, f)
    reads = []
    real = catmod.read_bytes
    monkeypatch.setattr(catmod, "read_bytes", lambda s, p, *a, **k: (reads.append(p), real(s, p, *a, **k))[1])
    assert Catalog(resolve(root)).entries("e") == old + older
    assert reads == []  # every entry came from the two old-format files


def _planted(root: str, good: list[dict]) -> tuple[dict, list[str]]:
    """A format-2 segment of the runs ``good`` whose copies of some of them are corrupted; the names corrupted."""
    copies = [dict(e) for e in good]
    bad = {0: ("model_name", "../../../victim"), 1: ("run_id", good[2]["run_id"]), 2: ("experiment_name", "other"),
           3: ("model_name", ["unhashable"]), 4: ("run_id", "../x")}
    for i, (key, value) in bad.items():
        copies[i][key] = value
    body = json.loads(snapshots.encode({f"{e['run_id']}.json": c for e, c in zip(good, copies)}))
    return body, [f"{good[i]['run_id']}.json" for i in bad]


def test_bad_names_in_a_column_segment_are_skipped_and_the_rest_kept(tmp_path, monkeypatch, caplog):
    root = str(tmp_path / "acts")
    good = _entries(12)
    _fill(root, good)
    body, corrupted = _planted(root, good)
    _put(root, "seg-00000000000000000001-abcdef01.json", body)
    reads = []
    real = catmod.read_bytes
    monkeypatch.setattr(catmod, "read_bytes", lambda s, p, *a, **k: (reads.append(p), real(s, p, *a, **k))[1])
    caplog.set_level(logging.WARNING)
    # the runs are those of the listing, each with its own entry: the corrupted copies were refused and their
    # entries read from their own files (one read each), the others taken from the segment
    assert Catalog(resolve(root)).entries("e") == good
    assert sorted(os.path.basename(p) for p in reads) == sorted(corrupted)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in corrupted:
        assert any(name in m and "seg-00000000000000000001-abcdef01.json" in m for m in warned), name


@pytest.mark.parametrize("mutate", [
    lambda d: d["groups"][0]["names"].__setitem__(0, "../../evil.json"),
    lambda d: d["groups"][0]["names"].__setitem__(0, 7),
    lambda d: d["groups"][0]["columns"][d["groups"][0]["keys"].index("experiment_name")].__setitem__(0, "../e"),
    lambda d: [d["groups"][0]["columns"].pop(d["groups"][0]["keys"].index("run_id")),
               d["groups"][0]["keys"].remove("run_id")],
])
def test_no_bad_entry_passes_the_group_check(tmp_path, mutate):
    """Whatever the corruption, an entry the per-entry rules refuse is never returned (its group is then checked
    entry by entry), and the entries the corruption did not touch are."""
    store = resolve(str(tmp_path / "acts"))
    good = _entries(6, models=1)
    doc = json.loads(snapshots.encode({f"{e['run_id']}.json": e for e in good}))
    mutate(doc)
    _put(store.root, "seg-00000000000000000001-abcdef01.json", doc)
    checked = []

    def valid(name, entry, where):
        checked.append(name)
        return catmod._entry_problem(entry, "e", name[:-5] if isinstance(name, str) else None) is None

    got, _ = snapshots.read(store, "e", valid)
    # the first group holds the runs of the first entry's shape (good[0] and good[5]); a missing run id column
    # spoils all of them, the other mutations only good[0]
    spoilt = [good[0], good[5]] if "run_id" not in doc["groups"][0]["keys"] else [good[0]]
    assert got == {f"{e['run_id']}.json": e for e in good if e not in spoilt}
    assert checked  # the group check refused the group: each entry went through the per-entry rules


def test_names_are_checked_per_group_not_per_entry(tmp_path, monkeypatch):
    root = str(tmp_path / "acts")
    entries = _entries(catmod.COMPACT_AFTER * 3, models=2)
    _fill(root, entries)
    Catalog(resolve(root)).entries("e")  # writes the segment
    calls = {"model_slug": 0, "check_run_id": 0, "check_entry": 0}
    for fn in calls:
        real = getattr(layout, fn)

        def counting(*a, _fn=fn, _real=real, **k):
            calls[_fn] += 1
            return _real(*a, **k)

        monkeypatch.setattr(layout, fn, counting)
    assert Catalog(resolve(root)).entries("e") == entries
    # each of the 2 models once (per group, of which there are 2), no per-entry call
    assert calls["model_slug"] <= 4 and calls["check_entry"] == 0 and calls["check_run_id"] == 0


def test_the_garbage_collector_is_left_as_found(tmp_path):
    root = str(tmp_path / "acts")
    _fill(root, _entries(catmod.COMPACT_AFTER))
    Catalog(resolve(root)).entries("e")
    _put(root, "seg-00000000000000000001-abcdef01.json", {"format": 2, "groups": "not a list"})
    assert gc.isenabled()
    assert len(Catalog(resolve(root)).entries("e")) == catmod.COMPACT_AFTER  # one segment unreadable: skipped
    assert gc.isenabled()
    gc.disable()
    try:
        Catalog(resolve(root)).entries("e")
        assert not gc.isenabled()
    finally:
        gc.enable()
