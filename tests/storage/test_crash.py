"""Crash simulation: an exception injected at each write step leaves no half run visible and nothing damaged."""

from __future__ import annotations

import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.storage import catalog as catalog_mod
from easyroutine_dist.storage import runs, shards


class Boom(RuntimeError):
    pass


def _save(saver, value: float, tag: str):
    return saver.save({"x": torch.full((2, 4), value)}, "m", ["last"], None, ExtractionConfig(), tag=tag)


@pytest.mark.parametrize("step", ["shard", "part_marker", "run_marker"])
def test_crash_before_marker_leaves_nothing_visible(backend, monkeypatch, step):
    saver = backend.saver()
    _save(saver, 1.0, "good")
    if step == "shard":
        def crashing(store, path, tensors, *args, **kw):
            raise Boom("disk died mid-shard")

        monkeypatch.setattr(runs, "write_shard", crashing)
    else:
        real_create = runs.create_exclusive
        name = "records/" if step == "part_marker" else "_SUCCESS"

        def crashing(store, path, data):
            if name in path:
                raise Boom("killed before the marker")
            return real_create(store, path, data)

        monkeypatch.setattr(runs, "create_exclusive", crashing)
    with pytest.raises(Boom):
        _save(saver, 2.0, "crashed")
    monkeypatch.undo()
    for loader in (backend.loader(), backend.loader()):
        res = loader.query()
        assert [e["tag"] for e in res] == ["good"]
        assert torch.equal(res.load(-1)[0]["x"], torch.full((2, 4), 1.0))
    assert backend.loader().rebuild_catalog() == 1  # the scan agrees: the crashed run is not a run
    assert [e["tag"] for e in backend.loader().query()] == ["good"]
    _save(saver, 3.0, "after")  # later saves and queries still work
    assert [e["tag"] for e in backend.loader().query()] == ["good", "after"]


def test_crash_between_marker_and_catalog_is_repaired_by_rebuild(local_backend, monkeypatch):
    saver = local_backend.saver()

    def crashing(self, entry):
        raise Boom("killed after the run marker")

    monkeypatch.setattr(catalog_mod.Catalog, "add", crashing)
    with pytest.raises(Boom):
        _save(saver, 5.0, "committed")
    monkeypatch.undo()
    assert len(local_backend.loader().query()) == 0  # committed but not yet indexed: never half-visible
    assert local_backend.loader().rebuild_catalog() == 1
    res = local_backend.loader().query(tag="committed")
    assert torch.equal(res.load(-1)[0]["x"], torch.full((2, 4), 5.0))


def test_local_shard_write_is_atomic(local_backend, monkeypatch):
    """A crash while streaming a shard leaves no file under the final name."""
    saver = local_backend.saver()

    def crash_after_bytes(store, f):
        f.flush()
        raise Boom("crash after the bytes, before the rename")

    monkeypatch.setattr(shards, "sync", crash_after_bytes)
    with pytest.raises(Boom):
        saver.save({"a": torch.ones(4), "b": torch.ones(4)}, "m", ["last"], None, ExtractionConfig())
    monkeypatch.undo()
    import glob

    assert glob.glob(f"{local_backend.url}/**/*.safetensors", recursive=True) == []
    assert len(local_backend.loader().query()) == 0
