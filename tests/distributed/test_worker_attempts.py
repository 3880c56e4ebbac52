"""Issue 8 items 4, 5, 8 on the worker side (no cluster: the worker's methods run in this process).

* A second attempt at a partition (re-queued while the first still runs) returns ``skipped=True`` whether the
  first commits before its write or between its write and its commit, and the committed bytes stay the first's.
* ``lens_part`` never uses a shard name from a record as a path unless it is a valid shard name.
* The job's storage (``StorageSpec``) carries ``durable`` and a worker's writer honours it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("ray")

from easyroutine_dist.errors import StorageError  # noqa: E402
from easyroutine_dist.storage.runs import RunWriter, load_run  # noqa: E402

EXP, MODEL = "w", "org/m"


def _worker():
    from easyroutine_dist.distributed.worker import ExtractionWorker

    w = ExtractionWorker.__new__(ExtractionWorker)  # no model: only the storage side is exercised
    w._writers, w._lens, w.parts_done = {}, None, 0
    return w


def _data(value: float):
    return {"x": torch.full((2, 4), value), "ids": torch.arange(2) + int(value)}, {"note": f"v{value}"}


def _job(writer: RunWriter, run):
    from easyroutine_dist.distributed.job import StorageSpec, WorkerJob

    return WorkerJob(run=run, storage=StorageSpec(base_dir=writer.store.root))


def _load(writer: RunWriter, run):
    writer.commit_run(run)
    return load_run(writer.store, {"experiment_name": EXP, "model_name": MODEL, "run_id": run.run_id})[0]


def test_second_attempt_after_the_first_committed_is_skipped(tmp_path):
    writer = RunWriter(str(tmp_path))
    run = writer.begin_run(EXP, MODEL, {})
    writer.commit_part(run, writer.write_part(run, 0, _data(1.0)))  # the first attempt, done
    res = _worker()._finish(_job(writer, run), writer, run, 0, _data(2.0), 0.0, 2)  # the re-queued one reaches the write
    assert res["skipped"] is True and res["part_id"] == 0
    assert torch.equal(_load(writer, run)["x"], torch.full((2, 4), 1.0))


def test_second_attempt_losing_the_commit_race_is_skipped(tmp_path, monkeypatch):
    from easyroutine_dist.distributed.worker import ExtractionWorker

    writer = RunWriter(str(tmp_path))
    run = writer.begin_run(EXP, MODEL, {})
    first = writer.write_part(run, 0, _data(1.0))

    def first_commits_now(job, part_id):  # between this attempt's shards and its record: the worst moment
        assert writer.commit_part(run, first) is True

    monkeypatch.setattr(ExtractionWorker, "_maybe_fail", staticmethod(first_commits_now))
    res = _worker()._finish(_job(writer, run), writer, run, 0, _data(2.0), 0.0, 2)
    assert res["skipped"] is True
    cache = _load(writer, run)
    assert torch.equal(cache["x"], torch.full((2, 4), 1.0)) and cache["note"] == "v1.0"


@pytest.mark.parametrize("bad", ["../../../../../victim.safetensors", "../../x", "part-00000-0000.safetensors/.."])
def test_lens_part_refuses_a_shard_name_that_is_not_one(tmp_path, monkeypatch, bad):
    from easyroutine_dist.storage import shards

    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"must not be read")
    writer = RunWriter(str(tmp_path / "acts"))
    src = writer.begin_run(EXP, MODEL, {})
    rec = writer.write_part(src, 0, ({"resid_out_0": torch.ones(2, 1, 4)}, {}))
    writer.commit_part(src, rec)
    rec["shards"][0]["file"] = bad
    dst = writer.begin_run(EXP, MODEL, {})
    read = []
    monkeypatch.setattr(shards, "read_shard", lambda *a, **k: read.append(a) or {})
    job = {"storage": {"base_dir": str(tmp_path / "acts")}, "run": dst.to_dict(),
           "logit_lens": {"target_key": "resid_out_{i}", "norm_stats": "own"}}
    source = {"storage": {"base_dir": str(tmp_path / "acts")}, "run_dir": writer.store.path(src.rel),
              "run_id": src.run_id}
    with pytest.raises(StorageError, match="not allowed"):
        _worker().lens_part(job, source, rec, None)
    assert read == []
    assert victim.read_bytes() == b"must not be read"


def test_durable_storage_reaches_the_workers_writer(tmp_path):
    from easyroutine_dist.distributed.extractor import DistributedExtractor
    from easyroutine_dist.storage.api import ActivationSaver

    saver = ActivationSaver(tmp_path, EXP)
    ex = DistributedExtractor.__new__(DistributedExtractor)
    ex.ship_credentials = False
    assert DistributedExtractor._storage(ex, saver).durable is False
    saver.store.durable = True
    storage = DistributedExtractor._storage(ex, saver)
    assert storage.durable is True
    assert _worker()._writer(storage).store.durable is True
    assert _worker()._writer(dataclasses.replace(storage, durable=False)).store.durable is False
