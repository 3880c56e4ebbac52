"""One contract suite, run against local disk, memory:// and s3:// (moto server on 127.0.0.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.errors import StorageError
from easyroutine_dist.storage import RunWriter

from .conftest import make_cache


def _same(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a.keys():
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype, k
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_roundtrip_preserves_dtypes_and_info(backend):
    saver = backend.saver("exp")
    cache = make_cache()
    path = saver.save(cache, "org/model", ["last"], None, ExtractionConfig(extract_resid_out=True),
                      {"batch_id": 3}, tag="t")
    assert isinstance(path, Path if backend.name == "local" else str) and "exp" in str(path)
    res = backend.loader("exp").query()
    assert len(res) == 1
    loaded, meta = res.load(-1)
    _same(loaded, cache)
    assert loaded["resid_out_1"].dtype == torch.bfloat16
    assert meta["model_name"] == "org/model" and meta["tag"] == "t" and meta["other_metadata"] == {"batch_id": 3}
    assert res.get_paths()[0].rstrip("/").endswith(meta["run_id"])


def test_tensor_and_dict_inputs(backend):
    saver = backend.saver()
    saver.save(torch.arange(6.0).reshape(2, 3), None, ["last"], None, ExtractionConfig())
    saver.save({"x": torch.ones(2), "note": "hi"}, "m", ["last"], None, ExtractionConfig())
    res = backend.loader().query()
    a, _ = res.load(0)
    b, _ = res.load(1)
    assert isinstance(a, torch.Tensor) and torch.equal(a, torch.arange(6.0).reshape(2, 3))  # what was saved
    assert isinstance(b, dict) and torch.equal(b["x"], torch.ones(2)) and b["note"] == "hi"


def test_save_cache_uses_cache_metadata(backend):
    cache = make_cache()
    cache["metadata"] = {"model_name": "gpt2", "target_token_positions": [(0, 2)],
                         "extraction_config": ExtractionConfig(extract_resid_out=True).to_dict(),
                         "interventions": [], "pivot_positions": [1]}
    path = backend.saver().save_cache(cache, {"k": 1}, tag="ds")
    assert isinstance(path, Path if backend.name == "local" else str)
    res = backend.loader().query(model_name="gpt2", target_token_positions=[(0, 2)], pivot_positions=[1],
                                 extraction_config=ExtractionConfig(extract_resid_out=True), tag="ds")
    assert len(res) == 1
    loaded, meta = res.load(-1)
    assert loaded["metadata"]["model_name"] == "gpt2"
    assert meta["other_metadata"] == {"k": 1}


def test_same_second_saves_do_not_collide(backend):
    saver = backend.saver()
    paths = {saver.save(torch.full((1,), float(i)), "m", ["last"], None, ExtractionConfig()) for i in range(5)}
    assert len(paths) == 5
    res = backend.loader().query()
    assert sorted(float(res.load(i)[0][0]) for i in range(5)) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_load_by_time_folder_and_run_id(backend):
    saver = backend.saver()
    saver.save(torch.ones(1), "m", ["last"], None, ExtractionConfig())
    res = backend.loader().query()
    entry = res[0]
    assert torch.equal(res.load(entry["run_id"])[0], torch.ones(1))
    assert torch.equal(res.load(entry["save_time"])[0], torch.ones(1))
    with pytest.raises(StorageError):
        res.load("1999-01-01_00-00-00")


def test_remove_and_update_experiment(backend):
    saver = backend.saver("a")
    for i in range(3):
        saver.save(torch.full((1,), float(i)), "m", ["last"], None, ExtractionConfig(), tag=f"t{i}")
    res = backend.loader("a").query()
    res.remove(-1)
    assert [e["tag"] for e in backend.loader("a").query()] == ["t0", "t1"]
    res = backend.loader("a").query()
    res.update_run_experiment(0, "b")
    assert [e["tag"] for e in backend.loader("a").query()] == ["t1"]
    moved = backend.loader("b").query()
    assert [e["tag"] for e in moved] == ["t0"]
    data, meta = moved.load(-1)
    assert meta["experiment_name"] == "b" and float(data[0]) == 0.0
    saver.rename_experiment("c")
    assert len(backend.loader("a").query()) == 0
    assert [e["tag"] for e in backend.loader("c").query()] == ["t1"]
    assert saver.experiment_name == "c"


def test_two_phase_multi_part_run(backend):
    saver = backend.saver("dist")
    writer = RunWriter(saver.store, max_shard_bytes=100)
    run = writer.begin_run("dist", "org/m", {"tag": "big", "other_metadata": {}})
    records = []
    for part in (2, 0, 1):  # written out of order, loaded in part order
        rec = writer.write_part(run, part, {"x": torch.full((2, 30), float(part)), "y": torch.arange(2) + 10 * part})
        assert len(rec["shards"]) >= 2  # the 100-byte limit splits the part
        json.dumps(rec)
        assert writer.commit_part(run, rec)
        records.append(rec)
    assert sorted(writer.committed_parts(run)) == [0, 1, 2]
    assert len(backend.loader("dist").query()) == 0  # not visible before the run marker
    writer.commit_run(run, records)
    res = backend.loader("dist").query(tag="big")
    data, _ = res.load(-1)
    assert data["x"][:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert data["y"].tolist() == [0, 1, 10, 11, 20, 21]
    parts = list(res.iter_parts(-1, keys=["y"]))
    assert [p["y"].tolist() for p in parts] == [[0, 1], [10, 11], [20, 21]] and "x" not in parts[0]
    with pytest.raises(StorageError):
        writer.write_part(run, 1, {"x": torch.zeros(1)})  # committed parts are never rewritten
    with pytest.raises(StorageError):
        writer.commit_run(run, records)


def test_catalog_rebuild_matches_scan(backend):
    saver = backend.saver("e1")
    for i in range(3):
        saver.save(torch.ones(1), "m", ["last"], None, ExtractionConfig(), tag=str(i))
    loader = backend.loader("e1")
    fs = saver.store.fs
    fs.rm(saver.store.path("_catalog"), recursive=True)
    assert len(backend.loader("e1").query()) == 0
    assert loader.rebuild_catalog() == 3
    assert sorted(e["tag"] for e in backend.loader("e1").query()) == ["0", "1", "2"]


def test_query_all_experiments(backend):
    backend.saver("x").save(torch.ones(1), "m", ["last"], None, ExtractionConfig())
    backend.saver("y").save(torch.ones(1), "m", ["last"], None, ExtractionConfig())
    assert len(backend.loader("x").query(experiment_name="*")) == 2
    assert len(backend.loader("x").query(experiment_name="y")) == 1


def test_model_object_and_config_summary(backend):
    class Cfg:
        def __init__(self) -> None:
            self.num_hidden_layers = 2
            self.torch_dtype = torch.float16  # not JSON: dropped from the summary
            self.hidden_size = 8

    class FakeModel:
        model_name = "org/fake"
        model_config = Cfg()

    backend.saver().save(torch.ones(1), FakeModel(), ["last"], None, ExtractionConfig())
    _, meta = backend.loader().query(model_name="org/fake").load(-1)
    assert meta["model_config"] == {"num_hidden_layers": 2, "hidden_size": 8}


def test_from_env_s3(monkeypatch, s3_bucket_url, s3_endpoint):
    from easyroutine_dist.interpretability.activation_saver import ActivationLoader, ActivationSaver

    monkeypatch.setenv("ACTIVATION_BASE_DIR", s3_bucket_url + "/envroot")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # credentials: AWS_* variables set by the fixture
    saver = ActivationSaver.from_env("envexp")
    saver.save(torch.ones(3), "m", ["last"], None, ExtractionConfig(), tag="env")
    res = ActivationLoader.from_env("envexp").query(tag="env")
    assert torch.equal(res.load(-1)[0], torch.ones(3))
    assert res.get_paths()[0].startswith(s3_bucket_url + "/envroot/envexp/")
    monkeypatch.delenv("ACTIVATION_BASE_DIR")
    with pytest.raises(ValueError, match="ACTIVATION_BASE_DIR"):  # as easyroutine raises
        ActivationSaver.from_env()


def test_file_url(tmp_path):
    from easyroutine_dist.interpretability.activation_saver import ActivationLoader, ActivationSaver

    ActivationSaver(f"file://{tmp_path}/f", "e").save(torch.ones(1), "m", ["last"], None, ExtractionConfig())
    assert len(ActivationLoader(str(tmp_path / "f"), "e").query()) == 1


def test_catalog_entries_count_rows_parts_and_keys(backend):
    saver = backend.saver("counts")
    saver.save({"a": torch.ones(3, 1, 2), "b": torch.zeros(3, 1)}, "m", ["last"], None, ExtractionConfig(), tag="c")
    (entry,) = list(backend.loader("counts").query(tag="c"))
    assert (entry["n_rows"], entry["n_parts"], entry["n_keys"]) == (3, 1, 2)
    writer = RunWriter(saver.store)
    run = writer.begin_run("counts", "m", {"tag": "two"})
    for part in (0, 1):
        writer.commit_part(run, writer.write_part(run, part, {"x": torch.ones(4, 1)}))
    writer.commit_run(run, n_rows=8)
    (entry,) = list(backend.loader("counts").query(tag="two"))
    assert (entry["n_rows"], entry["n_parts"]) == (8, 2)


def test_save_cache_refuses_a_cache_without_provenance(backend):
    from easyroutine_dist.cache import ActivationCache
    from easyroutine_dist.errors import MetadataError

    cache = ActivationCache()
    cache["resid_out_0"] = torch.ones(1, 1, 2)
    saver = backend.saver("noprov")
    with pytest.raises(MetadataError, match="use save\\("):
        saver.save_cache(cache, tag="x")
    assert len(backend.loader("noprov").query()) == 0
    assert not saver.store.fs.exists(saver.store.path("noprov"))  # nothing written
