"""Traversal, bad metadata, credentials not persisted, corruption detection, no pickle."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.errors import CorruptShardError, MetadataError


@pytest.mark.parametrize("name", ["../evil", "..", "a/b", "/abs", "", ".hidden", "_catalog", "x/../../y"])
def test_experiment_traversal_refused(local_backend, name):
    with pytest.raises(MetadataError):
        local_backend.saver(name)


@pytest.mark.parametrize("model", ["../../evil", "a/../../b", "..", "x\\..\\..\\y"])
def test_model_traversal_refused(local_backend, tmp_path, model):
    saver = local_backend.saver()
    with pytest.raises(MetadataError):
        saver.save(torch.ones(1), model, ["last"], None, ExtractionConfig())
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))
    assert not pathlib.Path(local_backend.url).exists() or not list(pathlib.Path(local_backend.url).rglob("*.json"))


def test_tag_cannot_escape(local_backend, tmp_path):
    saver = local_backend.saver()
    saver.save(torch.ones(1), "m", ["last"], None, ExtractionConfig(), tag="../../../escaped")
    inside = {p.resolve() for p in pathlib.Path(local_backend.url).rglob("*")}
    everything = {p.resolve() for p in tmp_path.rglob("*")}
    assert everything - inside == {pathlib.Path(local_backend.url).resolve()}
    assert local_backend.loader().query(tag="../../../escaped").load(-1)[0].tolist() == [1.0]
    with pytest.raises(MetadataError):
        saver.save(torch.ones(1), "m", ["last"], None, ExtractionConfig(), tag="bad\nnewline")


@pytest.mark.parametrize("bad", [{"obj": object()}, {"t": torch.ones(1)}, {"nan": float("nan")}, {"s": {1, 2}},
                                 {(1, 2): "tuple key"}])
def test_bad_metadata_refused_before_any_write(backend, bad):
    saver = backend.saver()
    with pytest.raises(MetadataError):
        saver.save(torch.ones(1), "m", ["last"], None, ExtractionConfig(), other_metadata=bad)
    fs = saver.store.fs
    assert not fs.exists(saver.store.root) or fs.find(saver.store.root) == []
    saver.save(torch.ones(1), "m", ["last"], None, ExtractionConfig())  # later saves and queries unaffected
    assert len(backend.loader().query()) == 1


def test_bad_cache_info_refused_before_any_write(local_backend):
    saver = local_backend.saver()
    with pytest.raises(MetadataError):
        saver.save({"x": torch.ones(1), "weird": object()}, "m", ["last"], None, ExtractionConfig())
    assert not os.path.exists(local_backend.url) or not list(pathlib.Path(local_backend.url).rglob("*"))


def test_credentials_never_persisted(s3_bucket_url, s3_storage_options, s3_endpoint):
    from easyroutine_dist.interpretability.activation_saver import ActivationLoader, ActivationSaver

    opts = dict(s3_storage_options)
    saver = ActivationSaver(s3_bucket_url + "/root", "e", storage_options=opts)
    saver.save(torch.ones(2), "m", ["last"], None, ExtractionConfig(), {"a": 1}, tag="t")
    res = ActivationLoader(s3_bucket_url + "/root", "e", storage_options=opts).query()
    res.load(-1)
    fs = saver.store.fs
    files = fs.find(s3_bucket_url[5:])
    assert files
    for f in files:
        blob = fs.cat_file(f)
        for secret in (opts["key"], opts["secret"], s3_endpoint):
            assert secret.encode() not in blob, f


def _shard_files(backend_or_saver):
    store = backend_or_saver.store
    return [p for p in store.fs.find(store.root) if p.endswith(".safetensors")]


@pytest.mark.parametrize("damage", ["flip", "truncate", "grow"])
def test_corrupted_shard_is_a_clear_error(backend, damage):
    saver = backend.saver()
    a = torch.randn(16, 16)
    saver.save({"a": a, "b": torch.randn(16)}, "m", ["last"], None, ExtractionConfig())
    (shard,) = _shard_files(saver)
    data = bytearray(saver.store.fs.cat_file(shard))
    if damage == "flip":
        data[-5] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:  # bytes appended: a whole-shard read asks for its recorded size plus one byte, so it sees them
        data += b"\0" * 7
    saver.store.fs.pipe_file(shard, bytes(data))
    res = backend.loader().query()
    name = shard.rsplit("/", 1)[-1]
    with pytest.raises(CorruptShardError, match=name):
        res.load(-1)
    if damage == "grow":  # a read of some keys by byte ranges gets exactly their recorded, checked bytes
        part, _ = res.load(-1, keys=["a"])
        assert torch.equal(part["a"], a)
        return
    with pytest.raises(CorruptShardError, match=name):
        res.load(-1, keys=["b"] if damage == "flip" else ["a"])


def test_no_pickle_on_save_or_load(local_backend, monkeypatch):
    import pickle

    def forbidden(*a, **k):
        raise AssertionError("pickle/torch.load used")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "dump"), (pickle, "dumps"),
                      (torch, "load"), (torch, "save")):
        monkeypatch.setattr(mod, name, forbidden)
    local_backend.saver().save({"x": torch.ones(2, dtype=torch.bfloat16)}, "m", ["last"], None, ExtractionConfig())
    data, _ = local_backend.loader().query().load(-1)
    assert data["x"].dtype == torch.bfloat16
    from safetensors.torch import load_file

    monkeypatch.undo()
    (shard,) = pathlib.Path(local_backend.url).rglob("*.safetensors")
    assert torch.equal(load_file(str(shard))["x"], torch.ones(2, dtype=torch.bfloat16))  # standard safetensors
