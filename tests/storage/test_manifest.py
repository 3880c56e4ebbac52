"""Run marker schemas 2 and 3: ``_SUCCESS`` references part records by id; commit_run reads no record body."""

from __future__ import annotations

import json
import tracemalloc

import pytest
import torch

from easyroutine_dist.errors import StorageError
from easyroutine_dist.storage import layout, runs
from easyroutine_dist.storage.runs import RunWriter, read_manifest, read_marker, run_dir

ROWS = {0: 2, 1: 3, 2: 1, 3: 4}


def _part(pid: int, rows: int, info_items: int = 3):
    x = torch.arange(rows * 4, dtype=torch.float32).reshape(rows, 4) + 100 * pid
    info = {"token_dict": [{"row": i, "text": f"part {pid} row {i}"} for i in range(info_items)]}
    return {"x": x, "ids": torch.full((rows, 2), pid, dtype=torch.int64)}, info


def _writer(backend) -> RunWriter:
    return RunWriter(backend.url, backend.options)


def _begin(writer: RunWriter, tag: str = "t"):
    return writer.begin_run("exp", "org/m", {"tag": tag, "other_metadata": {}})


def _write_parts(writer, run, order=(3, 0, 2, 1), info_items: int = 3):
    recs = {}
    for pid in order:  # out of order, like workers finishing in any order
        rec = writer.write_part(run, pid, _part(pid, ROWS.get(pid, 2), info_items))
        writer.commit_part(run, rec)
        recs[pid] = rec
    return recs


class _ReadSpy:
    """Records every path read through the storage helpers and the fsspec filesystem of ``store``."""

    def __init__(self, monkeypatch, store) -> None:
        self.paths: list[str] = []
        real = runs.read_bytes

        def spy_read(st, path, *a, **kw):
            self.paths.append(path)
            return real(st, path, *a, **kw)

        monkeypatch.setattr(runs, "read_bytes", spy_read)
        for name in ("cat_file", "cat", "open", "read_bytes", "read_text"):
            orig = getattr(store.fs, name, None)
            if orig is None:
                continue

            def wrapped(path, *a, _orig=orig, _name=name, **kw):
                mode = a[0] if (a and _name == "open") else kw.get("mode", "rb")
                if _name != "open" or "r" in str(mode):
                    self.paths.append(str(path))
                return _orig(path, *a, **kw)

            monkeypatch.setattr(store.fs, name, wrapped)

    def record_reads(self) -> list[str]:
        return [p for p in self.paths if "/records/" in p]


@pytest.mark.parametrize("given", ["none", "records", "records_unverified"])
def test_commit_run_reads_no_record_body_and_loads_in_order(backend, monkeypatch, given):
    writer = _writer(backend)
    run = _begin(writer)
    recs = _write_parts(writer, run)
    spy = _ReadSpy(monkeypatch, writer.store)
    if given == "none":
        writer.commit_run(run)
    else:
        writer.commit_run(run, [recs[i] for i in (2, 0, 3, 1)], verify=given == "records")
    assert spy.record_reads() == []
    monkeypatch.undo()

    rdir = writer.store.path(run.rel)
    marker = read_manifest(writer.store, rdir)
    assert marker["schema_version"] == 3 and marker["parts"] == [0, 1, 2, 3]
    assert "records" not in marker and "token_dict" not in json.dumps(marker)

    res = backend.loader("exp").query()
    assert len(res) == 1 and res[0]["n_parts"] == 4
    if given != "none":
        assert res[0]["n_keys"] == 2
    table = str(res)  # the table prints without a key count too, naming the run
    assert run.run_id in table and "QueryResult(1 runs)" in table, table
    cache, meta = res.load()
    assert meta["run_id"] == run.run_id
    want = torch.cat([_part(p, ROWS[p])[0]["x"] for p in range(4)])
    assert torch.equal(cache["x"], want)
    assert cache["ids"][:, 0].tolist() == [p for p in range(4) for _ in range(ROWS[p])]
    parts = list(res.iter_parts(-1, keys=["ids"]))  # partial load, part by part
    assert [p["ids"][0, 0].item() for p in parts] == [0, 1, 2, 3]
    assert [p["ids"].shape[0] for p in parts] == [ROWS[p] for p in range(4)]
    assert all("x" not in p.keys() for p in parts)
    assert parts[2]["token_dict"][0]["text"] == "part 2 row 0"
    # read_marker keeps its manifest shape for callers (records as a lazy sequence)
    m = read_marker(writer.store, rdir)
    assert len(m["records"]) == 4
    assert [r["part_id"] for r in m["records"]] == [0, 1, 2, 3]
    assert sum(int(r["rows"]) for r in m["records"]) == sum(ROWS.values())
    assert m["records"][-1]["part_id"] == 3 and [r["part_id"] for r in m["records"][1:3]] == [1, 2]


def test_commit_run_refuses_uncommitted_part_without_reading_records(local_backend, monkeypatch):
    writer = _writer(local_backend)
    run = _begin(writer)
    recs = _write_parts(writer, run, order=(0, 1))
    extra = writer.write_part(run, 2, _part(2, 2))  # written, never committed
    spy = _ReadSpy(monkeypatch, writer.store)
    with pytest.raises(StorageError, match=r"parts \[2\] are not committed"):
        writer.commit_run(run, [recs[0], recs[1], extra])
    with pytest.raises(StorageError, match="duplicate part ids"):
        writer.commit_run(run, [recs[0], recs[0]])
    assert spy.record_reads() == []
    assert not writer.is_committed(run)
    writer.commit_run(run, [recs[1], recs[0]])
    assert spy.record_reads() == []
    with pytest.raises(StorageError, match="already committed"):
        writer.commit_run(run)


def test_commit_run_memory_is_flat_in_part_records(local_backend):
    """Peak Python memory of commit_run does not grow with the size of the part records it commits."""
    writer = _writer(local_backend)
    peaks = {}
    for n_parts, info_items in ((4, 10), (40, 400)):
        run = _begin(writer, tag=f"n{n_parts}")
        _write_parts(writer, run, order=range(n_parts), info_items=info_items)
        tracemalloc.start()
        try:
            writer.commit_run(run)
            peaks[n_parts] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    # 40 records of ~20 KiB each = ~0.8 MiB of JSON a schema-1 commit had to read and hold; schema 2 holds ids
    assert peaks[40] < 256 * 1024, peaks
    assert peaks[40] < peaks[4] + 64 * 1024, peaks


def test_schema_1_markers_still_load_and_rebuild(local_backend):
    writer = _writer(local_backend)
    run = _begin(writer)
    recs = _write_parts(writer, run, order=(1, 0, 2))
    # a run committed by the previous version: every record embedded in _SUCCESS, no catalog entry yet
    v1 = {"schema_version": 1, "metadata": run.metadata, "records": [recs[i] for i in (0, 1, 2)]}
    rdir = writer.store.path(run.rel)
    with open(f"{rdir}/{layout.RUN_MARKER}", "w") as f:
        json.dump(v1, f)
    loader = local_backend.loader("exp")
    assert loader.rebuild_catalog() == 1
    res = loader.query()
    assert res[0]["n_parts"] == 3 and res[0]["n_keys"] == 2
    cache, _ = res.load()
    assert cache["ids"][:, 0].tolist() == [p for p in range(3) for _ in range(ROWS[p])]
    assert [r["part_id"] for r in read_marker(writer.store, rdir)["records"]] == [0, 1, 2]
    res.update_run_experiment(-1, "moved")
    cache2, _ = local_backend.loader("moved").query().load()
    assert torch.equal(cache2["x"], cache["x"])


def test_moved_schema_2_run_keeps_its_records(backend):
    writer = _writer(backend)
    run = _begin(writer)
    _write_parts(writer, run)
    writer.commit_run(run)
    res = backend.loader("exp").query()
    before, _ = res.load()
    res.update_run_experiment(-1, "moved")
    assert len(backend.loader("exp").query()) == 0
    moved = backend.loader("moved").query()
    after, meta = moved.load()
    assert meta["experiment_name"] == "moved"
    assert torch.equal(after["x"], before["x"]) and torch.equal(after["ids"], before["ids"])
    assert backend.loader("moved").rebuild_catalog() == 1
    assert backend.loader("moved").query()[0]["n_parts"] == 4


def test_missing_or_foreign_record_is_a_clear_error(local_backend):
    import os

    writer = _writer(local_backend)
    run = _begin(writer)
    _write_parts(writer, run, order=(0, 1))
    writer.commit_run(run)
    rdir = writer.store.path(run.rel)
    entry = local_backend.loader("exp").query()[0]
    os.replace(f"{rdir}/{layout.record_name(1)}", f"{rdir}/records/elsewhere.json")
    with pytest.raises(StorageError, match="record of part 1 is missing"):
        runs.load_run(writer.store, entry)
    os.replace(f"{rdir}/{layout.record_name(0)}", f"{rdir}/{layout.record_name(1)}")  # part 0's body as part 1
    with pytest.raises(StorageError, match="record of part 0 is missing"):
        list(runs.iter_parts(writer.store, entry))
    with open(f"{rdir}/{layout.record_name(0)}", "wb") as f:
        f.write(open(f"{rdir}/{layout.record_name(1)}", "rb").read())
    with pytest.raises(StorageError, match="does not describe part 1"):
        runs.load_run(writer.store, entry)


def test_unknown_schema_version_is_refused(local_backend):
    writer = _writer(local_backend)
    run = _begin(writer)
    _write_parts(writer, run, order=(0,))
    writer.commit_run(run)
    rdir = run_dir(writer.store, writer.catalog.entries("exp")[0])
    with open(f"{rdir}/{layout.RUN_MARKER}", "w") as f:
        json.dump({"schema_version": 99, "metadata": run.metadata}, f)
    with pytest.raises(StorageError, match="schema_version 99"):
        local_backend.loader("exp").query().load()


def test_schema_3_runs_are_refused_by_readers_of_2_and_schema_2_runs_still_read(local_backend, monkeypatch):
    """Schema 3 part records may split a part by rows (streamed parts). A reader that knows only 1 and 2 would keep
    the last row range of such a part, so new runs must carry 3 and such a reader must refuse them; a marker
    written as schema 2 (before streaming) still loads."""
    from easyroutine_dist.storage import markers

    writer = _writer(local_backend)
    run = _begin(writer)
    _write_parts(writer, run)
    writer.commit_run(run)
    rdir = writer.store.path(run.rel)
    assert read_manifest(writer.store, rdir)["schema_version"] == 3
    with monkeypatch.context() as m:  # a reader from before streaming
        m.setattr(markers, "READABLE_SCHEMA_VERSIONS", (1, 2))
        with pytest.raises(StorageError, match="schema_version 3"):
            read_manifest(writer.store, rdir)
    marker_path = f"{rdir}/{layout.RUN_MARKER}"
    old = json.loads(writer.store.fs.cat_file(marker_path))
    old["schema_version"] = 2
    writer.store.fs.pipe_file(marker_path, json.dumps(old).encode())
    cache, _ = local_backend.loader("exp").query().load()
    expected = torch.cat([_part(pid, ROWS[pid])[0]["x"] for pid in sorted(ROWS)])  # built here, not read back
    assert torch.equal(cache["x"], expected)
