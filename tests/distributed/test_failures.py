"""Failure model: a worker killed mid-run, the index actor killed, the driver killed (resume), bad input."""

from __future__ import annotations

import os
import time

import pytest
import torch

from easyroutine_dist.errors import ConfigError, DistributedError, StorageError
from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver

from .conftest import CONFIG, POSITIONS, reference

pytestmark = pytest.mark.slow


def test_worker_killed_mid_run_partition_redone(extractor, hooked_ref, texts, tmp_path):
    marker = tmp_path / "failed-once"
    saver = ActivationSaver(tmp_path / "acts", experiment_name="kill")
    res = extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=5,
                            _inject_failure={"part_id": 2, "marker": str(marker)})
    assert marker.exists()  # a worker process really died (os._exit) after writing part 2's shards
    assert res.retried >= 1 and res.n_partitions == 5 and res.n_rows == len(texts)
    cache, _ = ActivationLoader(tmp_path / "acts", "kill").query().load()
    ref = reference(hooked_ref, texts)
    assert cache["resid_out_2"].shape[0] == len(texts)  # every row exactly once, in order
    assert torch.allclose(cache["resid_out_2"], ref["resid_out_2"], atol=1e-5)
    assert cache["token_dict"] == ref["token_dict"]
    # the restarted worker keeps serving
    assert len(extractor.workers_info()) == 2


def test_index_actor_killed_comes_back(extractor, texts, tmp_path):
    import ray

    from easyroutine_dist.distributed import get_index, index_reachable
    from easyroutine_dist.distributed import index as _index
    from easyroutine_dist.storage import providers

    saver = ActivationSaver(tmp_path, experiment_name="idx")
    for i in range(2):
        extractor.extract(texts[:6], POSITIONS, CONFIG, saver, batch_size=3, partition_size=3, tag=f"r{i}")
    assert index_reachable()
    loader = ActivationLoader(tmp_path, "idx")
    before = [e["run_id"] for e in loader.query()]
    index = get_index(create=False)
    assert ray.get(index.status.remote())["registered"] >= 2
    pid = ray.get(index.status.remote())["pid"]
    ray.kill(index, no_restart=False)
    after = [e["run_id"] for e in loader.query()]  # waits for the restart (or falls back to the catalog)
    assert after == before and len(after) == 2
    deadline = time.monotonic() + 60  # a query waits ~QUERY_TIMEOUT_S (2 s); the restart may take longer
    while (from_index := _index._query_provider(saver.store, "idx")) is None and time.monotonic() < deadline:
        time.sleep(0.5)  # the restarted actor itself answers, once it is up
    assert from_index is not None and [e["run_id"] for e in from_index] == before
    status = ray.get(get_index(create=False).status.remote())
    assert status["pid"] != pid and str(tmp_path) in status["roots"]  # a new process, rebuilt from storage
    # without the provider (no Ray), the catalog in storage gives the same answer
    provider = providers._PROVIDERS.pop("ray-metadata-index")
    try:
        assert [e["run_id"] for e in ActivationLoader(tmp_path, "idx").query()] == before
    finally:
        providers.register_query_provider("ray-metadata-index", provider)


def _committed_files(run_dir):
    out = {}
    for sub in ("shards", "records"):
        d = os.path.join(run_dir, sub)
        for name in os.listdir(d):
            st = os.stat(os.path.join(d, name))
            out[f"{sub}/{name}"] = (st.st_mtime_ns, st.st_ino)
    return out


def test_driver_killed_resume_recomputes_only_missing_parts(extractor, hooked_ref, texts, tmp_path):
    from easyroutine_dist.distributed import new_run_id

    saver = ActivationSaver(tmp_path, experiment_name="resume")
    run_id = new_run_id()
    with pytest.raises(DistributedError, match="resume=True"):
        extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=3, run_id=run_id,
                          _stop_after_parts=2)
    assert ActivationLoader(tmp_path, "resume").query().results == []  # nothing published
    run_dir = saver.writer.open_run("resume", hooked_ref.model_name, run_id).url
    committed = sorted(int(n[5:10]) for n in os.listdir(os.path.join(run_dir, "records")))
    assert 2 <= len(committed) < 8
    before = {k: v for k, v in _committed_files(run_dir).items()
              if any(k.startswith(f"{s}/part-{i:05d}") for i in committed for s in ("shards", "records"))}
    time.sleep(0.01)
    with pytest.raises(ConfigError, match="differ"):  # resuming with other settings is refused
        extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=4, run_id=run_id,
                          resume=True)
    res = extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=3, run_id=run_id,
                            resume=True)
    assert res.resumed and res.run_id == run_id and res.n_partitions == 8
    assert res.skipped == len(committed) and res.recomputed == 8 - len(committed)
    after = _committed_files(run_dir)
    assert all(after[k] == v for k, v in before.items())  # committed shards and records were not rewritten
    cache, _ = ActivationLoader(tmp_path, "resume").query().load()
    ref = reference(hooked_ref, texts)
    assert torch.allclose(cache["resid_out_1"], ref["resid_out_1"], atol=1e-5)
    assert cache["token_dict"] == ref["token_dict"]
    again = extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=3, run_id=run_id,
                              resume=True)  # already committed: nothing to do
    assert again.recomputed == 0 and again.skipped == 8


def test_bad_input_fails_fast_before_any_model_load(ray_cluster, model_dir, texts, tmp_path):
    from easyroutine_dist.distributed import DistributedExtractor

    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="unknown model"):
        DistributedExtractor(str(tmp_path / "no-such-model"), num_workers=1)
    with pytest.raises(ConfigError, match="cannot import"):
        DistributedExtractor("no_such_module_xyz:build", num_workers=1)
    with pytest.raises(ConfigError, match="GPUs"):
        DistributedExtractor(model_dir, num_workers=2, num_gpus_per_worker=1)
    with pytest.raises(ConfigError, match="num_workers"):
        DistributedExtractor(model_dir, num_workers=0)
    ex = DistributedExtractor(model_dir, num_workers=1)
    saver = ActivationSaver(tmp_path / "acts", experiment_name="bad")
    with pytest.raises(ConfigError, match="empty"):
        ex.extract([], POSITIONS, CONFIG, saver)
    with pytest.raises(ConfigError, match="empty"):
        ex.extract(iter([]), POSITIONS, CONFIG, saver)
    with pytest.raises(ConfigError, match="partition_size"):
        ex.extract(texts, POSITIONS, CONFIG, saver, partition_size=0)
    with pytest.raises(ConfigError, match="batch_size"):
        ex.extract(texts, POSITIONS, CONFIG, saver, batch_size=0)
    with pytest.raises(ConfigError, match="run_id"):
        ex.extract(texts, POSITIONS, CONFIG, saver, resume=True)
    bad_s3 = ActivationSaver("s3://no-such-bucket/x", experiment_name="bad", storage_options={
        "anon": True, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}})
    with pytest.raises(StorageError):
        ex.extract(texts, POSITIONS, CONFIG, bad_s3)
    assert ex.workers == []  # no worker was started, so no model was loaded
    assert time.perf_counter() - t0 < 60
