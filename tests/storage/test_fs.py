"""Object-store reads: what requests they cost (storage/fs.py)."""

from __future__ import annotations

import pytest
import torch

from easyroutine_dist.interpretability.activation_saver import ActivationLoader, ActivationSaver
from easyroutine_dist.storage.runs import read_marker, run_dir


@pytest.fixture
def s3_calls(monkeypatch):
    """Every S3 API call s3fs makes, by operation name, and every size lookup (``_info``)."""
    import s3fs

    calls: list[str] = []
    real_call, real_info = s3fs.S3FileSystem._call_s3, s3fs.S3FileSystem._info

    async def call_s3(self, method, *a, **k):
        calls.append(getattr(method, "__name__", str(method)))
        return await real_call(self, method, *a, **k)

    async def info(self, *a, **k):
        calls.append("info")
        return await real_info(self, *a, **k)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", call_s3)
    monkeypatch.setattr(s3fs.S3FileSystem, "_info", info)
    return calls


def test_s3_whole_shard_and_json_reads_are_one_request_each(s3_bucket_url, s3_storage_options, s3_calls):
    url = s3_bucket_url + "/acts"
    saver = ActivationSaver(url, "e", storage_options=s3_storage_options)
    w = saver.writer
    run = w.begin_run("e", "m", {})
    want = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for i, x in enumerate(want):
        w.commit_part(run, w.write_part(run, i, {"x": x, "y": x.sum(-1)}))
    w.commit_run(run)
    q = ActivationLoader(url, "e", storage_options=s3_storage_options).query()
    n_shards = sum(len(r["shards"]) for r in read_marker(q.store, run_dir(q.store, q[-1]))["records"])
    s3_calls.clear()
    cache, _ = q.load(-1)
    assert torch.equal(cache["x"], torch.cat(want))  # what was written, read back
    # whole shards (their size is recorded) and whole JSON objects: one GET each, never a size lookup first
    assert "info" not in s3_calls and "head_object" not in s3_calls, s3_calls
    assert s3_calls.count("get_object") >= n_shards
    s3_calls.clear()
    batches = list(q.torch_dataset(keys=["x", "y"], batch_size=5, shuffle=False))
    assert torch.equal(torch.cat([b["x"] for b in batches]), torch.cat(want))
    assert "info" not in s3_calls and "head_object" not in s3_calls, s3_calls
