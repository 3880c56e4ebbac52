"""Shard checksums (issue 9 item 3): crc32c by default, sha256 selectable; both catch a corrupted byte in full and
partial loads, records name their algorithm, and runs written before the algorithm was recorded (sha256) load.

Expected digests come from google_crc32c / hashlib applied to the tensors' bytes, not from the code under test.
"""

from __future__ import annotations

import hashlib
import json
import struct

import google_crc32c
import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.errors import CorruptShardError, StorageError

ALGOS = ["crc32c", "sha256"]


def _expected(algo: str, t: torch.Tensor) -> str:
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{google_crc32c.value(raw):08x}" if algo == "crc32c" else hashlib.sha256(raw).hexdigest()


def _files(saver, suffix: str) -> list[str]:
    return sorted(p for p in saver.store.fs.find(saver.store.root) if p.endswith(suffix) and "/records/" in p
                  or (suffix == ".safetensors" and p.endswith(suffix)))


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    # 256 KiB and 1 KiB tensors: the large one takes the zero-copy path, the small one the plain one
    return {"a": torch.randn(256, 256), "b": torch.randn(256), "c": torch.arange(7)}


def _tensor_span(blob: bytes, key: str) -> tuple[int, int]:
    (n,) = struct.unpack("<Q", blob[:8])
    b, e = json.loads(blob[8:8 + n])[key]["data_offsets"]
    return 8 + n + b, 8 + n + e


@pytest.mark.parametrize("algo", ALGOS)
def test_record_names_the_algorithm_and_digests_match(backend, algo):
    saver = backend.saver(checksum=algo)
    tensors = _tensors()
    saver.save(tensors, "m", ["last"], None, ExtractionConfig())
    (rec_path,) = _files(saver, ".json")
    record = json.loads(saver.store.fs.cat_file(rec_path))
    assert record["checksum"] == algo
    (shard,) = record["shards"]
    assert shard["checksum"] == algo and algo in shard and f"header_{algo}" in shard
    for k, t in tensors.items():
        assert shard["tensors"][k] == _expected(algo, t), k
    data, _ = backend.loader().query().load(-1)
    for k, t in tensors.items():
        assert torch.equal(data[k], t)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("where", ["a", "b", "header"])
def test_a_corrupted_byte_is_caught(backend, algo, where):
    saver = backend.saver(checksum=algo)
    saver.save(_tensors(), "m", ["last"], None, ExtractionConfig())
    (shard,) = _files(saver, ".safetensors")
    blob = bytearray(saver.store.fs.cat_file(shard))
    if where == "header":
        pos = bytes(blob).index(b'"format":"pt"') + len('"format":"p')
        blob[pos] = ord("u")  # the JSON still parses and the tensors' offsets are unchanged: only the digest tells
    else:
        lo, hi = _tensor_span(bytes(blob), where)
        blob[(lo + hi) // 2] ^= 0x01  # one bit of one byte
    saver.store.fs.pipe_file(shard, bytes(blob))
    res = backend.loader().query()
    name = shard.rsplit("/", 1)[-1]
    with pytest.raises(CorruptShardError, match=name):
        res.load(-1)  # full load
    damaged = ["a", "b", "c"] if where == "header" else [where]
    for key in damaged:
        with pytest.raises(CorruptShardError, match=name):
            res.load(-1, keys=[key])  # partial load: verifies the bytes it read
    if where != "header":  # a partial load of untouched tensors reads and verifies only those: it succeeds
        other = [k for k in ("a", "b", "c") if k != where]
        data, _ = res.load(-1, keys=other)
        for k in other:
            assert torch.equal(data[k], _tensors()[k])


@pytest.mark.parametrize("algo", ALGOS)
def test_reads_without_a_copy_match_safetensors_and_still_catch_corruption(backend, algo):
    """``read_shard(copy=False)`` (the streaming reader's path: tensors view the fetched bytes) gives what
    safetensors itself reads from the same file, and a flipped bit is still caught."""
    from safetensors.torch import load as st_load

    from easyroutine_dist.storage.shards import read_shard

    saver = backend.saver(checksum=algo)
    saver.save(_tensors(), "m", ["last"], None, ExtractionConfig())
    (rec_path,) = _files(saver, ".json")
    (record,) = json.loads(saver.store.fs.cat_file(rec_path))["shards"]
    (shard,) = _files(saver, ".safetensors")
    blob = saver.store.fs.cat_file(shard)
    expected = st_load(blob)
    got = read_shard(saver.store, shard, record, copy=False)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    damaged = bytearray(blob)
    lo, hi = _tensor_span(blob, "a")
    damaged[(lo + hi) // 2] ^= 0x01
    saver.store.fs.pipe_file(shard, bytes(damaged))
    with pytest.raises(CorruptShardError, match=shard.rsplit("/", 1)[-1]):
        read_shard(saver.store, shard, record, copy=False)


def _strip_algorithm(saver) -> None:
    """Rewrite the run's part records as runs saved before the algorithm was recorded: no ``checksum`` field."""
    for path in _files(saver, ".json"):
        rec = json.loads(saver.store.fs.cat_file(path))
        rec.pop("checksum")
        for sh in rec["shards"]:
            assert sh.pop("checksum") == "sha256"
        saver.store.fs.pipe_file(path, json.dumps(rec, sort_keys=True).encode())


def test_old_sha256_runs_load_and_verify(backend):
    saver = backend.saver(checksum="sha256")
    tensors = _tensors()
    saver.save(tensors, "m", ["last"], None, ExtractionConfig())
    _strip_algorithm(saver)
    res = backend.loader().query()
    data, _ = res.load(-1)
    for k, t in tensors.items():
        assert torch.equal(data[k], t)
    part, _ = res.load(-1, keys=["b"])
    assert torch.equal(part["b"], tensors["b"])
    (shard,) = _files(saver, ".safetensors")
    blob = bytearray(saver.store.fs.cat_file(shard))
    lo, hi = _tensor_span(bytes(blob), "a")
    blob[lo + 3] ^= 0x80
    saver.store.fs.pipe_file(shard, bytes(blob))
    with pytest.raises(CorruptShardError):
        backend.loader().query().load(-1)
    with pytest.raises(CorruptShardError):
        backend.loader().query().load(-1, keys=["a"])


def test_default_is_crc32c(local_backend):
    saver = local_backend.saver()
    saver.save({"x": torch.ones(4)}, "m", ["last"], None, ExtractionConfig())
    (rec_path,) = _files(saver, ".json")
    rec = json.loads(saver.store.fs.cat_file(rec_path))
    assert rec["checksum"] == "crc32c" and rec["shards"][0]["checksum"] == "crc32c"
    assert rec["shards"][0]["tensors"]["x"] == f"{google_crc32c.value(torch.ones(4).numpy().tobytes()):08x}"


def test_unknown_checksum_refused_before_writing(local_backend, tmp_path):
    with pytest.raises(StorageError, match="crc32c"):
        local_backend.saver(checksum="md5")
    assert not (tmp_path / "acts").exists()


def test_a_view_of_fetched_bytes_keeps_them_alive():
    """The bytes a no-copy read views stay alive exactly as long as a tensor views them."""
    import gc
    import sys

    from easyroutine_dist.storage.shards import _alias

    data = bytes(range(256)) * 64
    base = sys.getrefcount(data)
    t = torch.frombuffer(_alias(data), dtype=torch.uint8)
    gc.collect()
    assert sys.getrefcount(data) == base + 1  # held through the tensor only
    assert torch.equal(t[:256], torch.arange(256, dtype=torch.uint8))
    del t
    gc.collect()
    assert sys.getrefcount(data) == base
