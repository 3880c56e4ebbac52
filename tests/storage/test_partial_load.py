"""Loading some keys reads only the safetensors header and the needed byte ranges (local, memory, S3)."""

from __future__ import annotations

import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.storage.fs import shard_store


def test_partial_load_reads_only_ranges(backend):
    saver = backend.saver()
    big = {f"k{i}": torch.randn(64, 256) for i in range(8)}  # 64 KiB each, one shard
    big["small"] = torch.arange(10)
    saver.save(big, "m", ["last"], None, ExtractionConfig())
    res = backend.loader().query()
    fs = shard_store(res.store).fs  # the client shard bytes are fetched through
    calls: list[tuple[str, object, object]] = []
    real = fs.cat_file

    def counting(path, *args, start=None, end=None, **kw):
        calls.append((path, start, end))
        return real(path, *args, start=start, end=end, **kw)

    fs.cat_file = counting
    try:
        data, _ = res.load(-1, keys=["k3", "small"])
    finally:
        del fs.cat_file
    assert set(data.keys()) == {"k3", "small"}
    assert torch.equal(data["k3"], big["k3"]) and torch.equal(data["small"], big["small"])
    shard_reads = [c for c in calls if c[0].endswith(".safetensors")]
    assert shard_reads and all(s is not None and e is not None for _, s, e in shard_reads)  # never a whole object
    read = sum(e - s for _, s, e in shard_reads)
    total = sum(v.numel() * v.element_size() for v in big.values())
    assert read < 64 * 256 * 4 + 4096 < total  # header + k3 + small, nothing else


def test_full_load_reads_whole_shard_once(local_backend):
    saver = local_backend.saver()
    saver.save({"a": torch.ones(3), "b": torch.zeros(3)}, "m", ["last"], None, ExtractionConfig())
    res = local_backend.loader().query()
    fs = shard_store(res.store).fs  # the client shard bytes are fetched through
    calls = []
    real = fs.cat_file

    def counting(path, *args, **kw):
        calls.append((path, kw.get("start"), kw.get("end")))
        return real(path, *args, **kw)

    fs.cat_file = counting
    try:
        data, _ = res.load(-1)
    finally:
        del fs.cat_file
    shard_reads = [c for c in calls if c[0].endswith(".safetensors")]
    assert len(shard_reads) == 1 and shard_reads[0][1:] == (None, None)  # one whole read, sha256-checked
    assert torch.equal(data["a"], torch.ones(3))
