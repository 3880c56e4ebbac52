"""Issue 9 item 7: what travels from the driver to the workers is a small frozen dataclass, and tokenisation has
one home (``easyroutine_dist.tokenization``) that the core, the CLI and the workers share.

On the previous main the job was a dict and ``tokenize_batches`` lived in ``distributed.partitions``: these fail
there (no ``distributed.job`` nor ``tokenization`` module)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

ray = pytest.importorskip("ray")

from easyroutine_dist.distributed.job import ExtractionJob, LensJob, LensSource, StorageSpec  # noqa: E402
from easyroutine_dist.errors import ConfigError  # noqa: E402
from easyroutine_dist.storage.runs import RunWriter  # noqa: E402


def _job(tmp_path) -> ExtractionJob:
    run = RunWriter(str(tmp_path)).begin_run("e", "m", {"tag": None})
    storage = StorageSpec(base_dir=str(tmp_path), storage_options={"endpoint_url": "http://127.0.0.1:9"},
                          max_shard_bytes=1 << 20, checksum="sha256", max_inflight_bytes=1 << 24)
    return ExtractionJob(run=run, storage=storage, target_token_positions=["last", "all"],
                         extraction_config={"extract_resid_out": True}, batch_size=4, statistics=True)


def test_a_job_is_frozen_typed_data_that_ray_serialises(tmp_path):
    job = _job(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.batch_size = 8  # type: ignore[misc]
    for dumps, loads in ((pickle.dumps, pickle.loads), (ray.cloudpickle.dumps, ray.cloudpickle.loads)):
        back = loads(dumps(job))
        assert back == job and back.run.rel == job.run.rel and back.storage.max_inflight_bytes == 1 << 24
    assert "storage_options" not in repr(job.storage)  # options (even public ones) stay out of logs
    fields = {f.name: f.type for f in dataclasses.fields(ExtractionJob)}
    assert {"run", "storage", "target_token_positions", "extraction_config", "batch_size", "interventions",
            "logit_lens", "tokenizer_kwargs", "position_seed", "statistics", "self_check"} <= set(fields)
    lens = LensJob(run=job.run, storage=job.storage, logit_lens={"target_key": "resid_out_{i}"})
    src = LensSource(storage=StorageSpec(base_dir=str(tmp_path)), run_dir="x", run_id=job.run.run_id)
    assert pickle.loads(pickle.dumps((lens, src))) == (lens, src)


def test_the_dict_form_is_accepted_and_checked(tmp_path):
    job = _job(tmp_path)
    d = {"run": job.run.to_dict(), "storage": dataclasses.asdict(job.storage), "batch_size": 4,
         "target_token_positions": ["last", "all"], "extraction_config": {"extract_resid_out": True},
         "statistics": True}
    assert ExtractionJob.coerce(d) == job
    assert ExtractionJob.coerce(job) is job
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['batchsize'\]"):
        ExtractionJob.coerce({**d, "batchsize": 4})
    with pytest.raises(ConfigError, match="the job's storage"):
        StorageSpec.coerce("s3://bucket")


def test_tokenisation_has_one_home():
    from easyroutine_dist import tokenization
    from easyroutine_dist.distributed import partitions, plan, preflight, tokenize_batches, worker

    assert tokenize_batches is tokenization.tokenize_batches
    assert partitions.tokenize_batches is tokenization.tokenize_batches  # re-exported, not a copy
    assert preflight.tokenize_batches is tokenization.tokenize_batches
    assert preflight.load_tokenizer is tokenization.load_tokenizer
    assert worker.tokenize_batches is tokenization.tokenize_batches
    import inspect

    for mod in (partitions, preflight, plan, worker):  # nobody tokenises texts on their own
        assert "tokenizer(list(" not in inspect.getsource(mod) and "padding_side = " not in inspect.getsource(mod)
