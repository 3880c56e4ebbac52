"""Issue 8 item 8 (storage): a read error is never "no such run"; rebuild() racing a commit or a removal keeps the
catalog equal to the run markers; a durable store fsyncs the directories it renames into."""

from __future__ import annotations

import collections
import logging
import os

import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.errors import StorageError

TAGS = ["a", "b", "c"]


def _save(saver, tag: str) -> None:
    saver.save({"x": torch.full((2, 3), float(len(tag)))}, "org/m", ["last"], None, ExtractionConfig(), tag=tag)


def _saved(backend, tags=TAGS):
    saver = backend.saver()
    for t in tags:
        _save(saver, t)
    return saver


def _failing_reads(monkeypatch, store, should_fail) -> collections.Counter:
    """Make ``store.fs.cat_file(path)`` raise like a throttled S3 (503) whenever ``should_fail(path, n)``, where
    ``n`` counts earlier reads of that path. Returns the per-path read counter."""
    real = store.fs.cat_file
    seen: collections.Counter = collections.Counter()

    def cat_file(path, *a, **kw):
        n = seen[path]
        seen[path] += 1
        if should_fail(path, n):
            raise OSError(5, "503 Service Unavailable: Please reduce your request rate (SlowDown)")
        return real(path, *a, **kw)

    monkeypatch.setattr(store.fs, "cat_file", cat_file)
    return seen


def _entry_read(path: str) -> bool:
    return "/_catalog/" in path and "/_snapshots/" not in path


def test_transient_read_errors_are_retried(backend, monkeypatch):
    _saved(backend)
    loader = backend.loader()
    seen = _failing_reads(monkeypatch, loader.store, lambda p, n: _entry_read(p) and n < 2)
    assert [e["tag"] for e in loader.query()] == TAGS
    assert sorted(n for p, n in seen.items() if _entry_read(p)) == [3, 3, 3]  # two failures, then a read


def test_an_entry_that_cannot_be_read_comes_from_its_run_marker(backend, monkeypatch, caplog):
    _saved(backend)
    loader = backend.loader()
    _failing_reads(monkeypatch, loader.store, lambda p, n: _entry_read(p))
    caplog.set_level(logging.WARNING)
    res = loader.query()
    assert [e["tag"] for e in res] == TAGS
    assert [e["model_name"] for e in res] == ["org/m"] * 3 and all(e["n_parts"] == 1 for e in res)
    for e in res:
        assert any(f"{e['run_id']}.json" in r.getMessage() and "run marker" in r.getMessage()
                   for r in caplog.records if r.levelno == logging.WARNING)
    monkeypatch.undo()
    assert torch.equal(res.load(-1)[0]["x"], torch.full((2, 3), 1.0))


def test_an_entry_and_marker_that_cannot_be_read_raise(backend, monkeypatch):
    _saved(backend)
    loader = backend.loader()
    _failing_reads(monkeypatch, loader.store, lambda p, n: _entry_read(p) or p.endswith("/_SUCCESS"))
    with pytest.raises(StorageError, match="cannot be read"):
        loader.query()  # never a silently shorter result


def test_rebuild_racing_a_commit_keeps_the_new_entry(backend, monkeypatch):
    _saved(backend, ["before"])
    loader = backend.loader()
    other = backend.saver()
    real_glob = loader.store.fs.glob
    calls = []

    def glob_then_commit(pattern, *a, **kw):
        found = real_glob(pattern, *a, **kw)
        if not calls:  # the rebuild's scan is done: another process commits a run now
            calls.append(pattern)
            _save(other, "during")
        return found

    monkeypatch.setattr(loader.store.fs, "glob", glob_then_commit)
    assert loader.rebuild_catalog() == 1  # the scan saw one run
    assert calls
    monkeypatch.undo()
    assert sorted(e["tag"] for e in backend.loader().query()) == ["before", "during"]
    assert backend.loader().rebuild_catalog() == 2


def test_rebuild_racing_a_removal_does_not_bring_the_entry_back(backend, monkeypatch):
    _saved(backend, ["keep", "gone"])
    loader = backend.loader()
    real_add = loader.catalog.add
    removed = []

    def remove_then_add(entry):
        if entry["tag"] == "gone" and not removed:  # removed by another process after the scan read its marker
            backend.loader().query(tag="gone").remove(-1)
            removed.append(entry["run_id"])
        return real_add(entry)

    monkeypatch.setattr(loader.catalog, "add", remove_then_add)
    assert loader.rebuild_catalog() == 1
    assert removed
    monkeypatch.undo()
    assert [e["tag"] for e in backend.loader().query()] == ["keep"]


def test_rebuild_still_drops_entries_without_a_marker(backend):
    saver = _saved(backend, ["real"])
    entry = dict(backend.loader().query()[-1], run_id="2024-01-01_00-00-00-000000_0badc0de", tag="stale")
    saver.writer.catalog.add(entry)  # an entry whose run does not exist
    assert sorted(e["tag"] for e in backend.loader().query()) == ["real", "stale"]
    assert backend.loader().rebuild_catalog() == 1
    assert [e["tag"] for e in backend.loader().query()] == ["real"]


def test_durable_store_fsyncs_each_directory_after_the_rename(local_backend, monkeypatch):
    saver = local_backend.saver()
    saver.store.durable = True
    synced: list[tuple[str, list[str]]] = []
    real_fsync = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((path, sorted(os.listdir(path)) if os.path.isdir(path) else []))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    _save(saver, "durable")
    monkeypatch.undo()
    (entry,) = local_backend.loader().query()
    rdir = os.path.join(local_backend.url, "default", "org--m", entry["run_id"])
    dirs = {p: names for p, names in synced if names}

    def synced_with(directory: str, name_prefix: str) -> bool:  # fsynced while it listed the published name
        return any(p == directory and any(n.startswith(name_prefix) and ".tmp-" not in n for n in names)
                   for p, names in synced)

    assert synced_with(f"{rdir}/shards", "part-00000-0000-")
    assert synced_with(f"{rdir}/records", "part-00000.json")
    assert synced_with(rdir, "metadata.json") and synced_with(rdir, "_SUCCESS")
    assert synced_with(os.path.join(local_backend.url, "_catalog", "default"), f"{entry['run_id']}.json")
    assert synced_with(os.path.dirname(rdir), entry["run_id"])  # the new run directory itself
    assert dirs

    synced.clear()
    plain = local_backend.saver()  # durable=False (the default): no fsync at all
    monkeypatch.setattr(os, "fsync", fsync)
    _save(plain, "plain")
    assert synced == []

