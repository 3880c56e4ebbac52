"""A local base_dir with workers on several nodes (issue 15 item 2): a worker whose node does not see the driver's
folder refuses the partition with a clear error and writes nothing."""

from __future__ import annotations

import time

import pytest

from easyroutine_dist.distributed import placement
from easyroutine_dist.distributed.placement import check_shared_run_dir
from easyroutine_dist.errors import ConfigError
from easyroutine_dist.storage.runs import RunHandle, RunWriter


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_local_run_dir_seen_passes_unseen_refused(tmp_path):
    writer = RunWriter(tmp_path / "driver")
    run = writer.begin_run("exp", "m", {"tag": None})
    check_shared_run_dir(writer.store, run, wait_s=0)  # the driver's folder: the metadata is there

    # another node's view of "the same" path: a folder where the driver's metadata.json never appears
    other = RunWriter(tmp_path / "other-node")
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        check_shared_run_dir(other.store, run, wait_s=1.0)
    assert time.monotonic() - t0 >= 1.0  # it waited for a slow shared filesystem first
    msg = str(err.value)
    for needle in (run.run_id, "metadata.json", "does not share", "every node mounts", "s3://", "wrote nothing",
                   str(tmp_path / "other-node")):
        assert needle in msg, needle
    assert _files(tmp_path / "other-node") == []


def test_late_metadata_on_a_slow_shared_filesystem_is_waited_for(tmp_path, monkeypatch):
    writer = RunWriter(tmp_path)
    run = RunHandle("2026-01-02_03-04-05-000006_0123abcd", "exp", "m", "", {})
    rdir = tmp_path / run.rel
    calls = []
    real_sleep = time.sleep

    def sleep(s):  # the file shows up on the second look, as on NFS after its attribute cache expires
        calls.append(s)
        if len(calls) == 1:
            rdir.mkdir(parents=True)
            (rdir / "metadata.json").write_text("{}")
        real_sleep(0)

    monkeypatch.setattr(placement.time, "sleep", sleep)
    check_shared_run_dir(writer.store, run, wait_s=30)
    assert len(calls) == 1


def test_object_storage_is_not_checked():
    writer = RunWriter("memory://placement-test")
    run = RunHandle("2026-01-02_03-04-05-000006_0123abcd", "exp", "m", "", {})
    check_shared_run_dir(writer.store, run, wait_s=0)  # no metadata anywhere, and no error: not a local path


@pytest.mark.slow
def test_worker_on_a_node_without_the_folder_writes_nothing(model_dir, texts, tmp_path, monkeypatch):
    """The worker code itself (in this process): a partition of a run whose folder it cannot see is refused
    before anything is computed or written."""
    from easyroutine_dist.distributed import ExtractionWorker, plan_dataset
    from easyroutine_dist.distributed.models import resolve_model_source

    monkeypatch.setattr(placement, "SHARED_WAIT_S", 0.5)
    driver = RunWriter(tmp_path / "driver")
    run = driver.begin_run("exp", "tiny", {"tag": None})
    worker = ExtractionWorker(resolve_model_source(model_dir), 0)
    part = next(iter(plan_dataset(texts[:4], 4).partitions()))
    job = {"run": run.to_dict(), "storage": {"base_dir": str(tmp_path / "node-b"), "storage_options": {}},
           "batch_size": 2, "target_token_positions": ["last"], "extraction_config": {"extract_resid_out": True},
           "logit_lens": None, "tokenizer_kwargs": None, "position_seed": 0, "statistics": False,
           "self_check": "off", "inject_failure": None}
    with pytest.raises(ConfigError, match="does not share with the driver"):
        worker.extract_part(job, part)
    assert not (tmp_path / "node-b").exists() or _files(tmp_path / "node-b") == []
    # the same worker with the driver's folder commits the part
    job["storage"]["base_dir"] = str(tmp_path / "driver")
    assert worker.extract_part(job, part)["skipped"] is False
    assert (tmp_path / "driver" / run.rel / "records").is_dir()


def test_a_local_base_dir_on_several_nodes_is_refused_before_anything_is_written(extractor, tmp_path, monkeypatch):
    """Issue 10 item 5: a local base_dir with a cluster of several alive nodes is refused up front (nothing written,
    no worker asked) unless the user declares it shared; object storage and one-node clusters pass."""
    from easyroutine_dist.config import ExtractionConfig
    from easyroutine_dist.interpretability.activation_saver import ActivationSaver

    monkeypatch.setattr(placement, "alive_nodes", lambda: 2)  # Ray's view of a two-node cluster
    saver = ActivationSaver(tmp_path / "local", "exp")
    with pytest.raises(ConfigError) as err:
        extractor.extract(["a b c"], ["last"], ExtractionConfig(extract_resid_out=True), saver)
    msg = str(err.value)
    for needle in ("2 nodes", "s3://", "shared_base_dir=True", "--shared-base-dir", "Nothing was written",
                   str(tmp_path / "local")):
        assert needle in msg, needle
    assert not (tmp_path / "local").exists() or _files(tmp_path / "local") == []

    placement.check_local_base_dir(saver.store, shared=True)  # declared shared: allowed
    placement.check_local_base_dir(RunWriter("memory://placement-nodes").store, shared=False)  # object storage
    monkeypatch.setattr(placement, "alive_nodes", lambda: 1)
    placement.check_local_base_dir(saver.store, shared=False)  # one node: nothing to share

