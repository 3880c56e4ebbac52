"""ActivationSaver / ActivationLoader / QueryResult used the way easyroutine scripts use them (issue 14 item 4)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from easyroutine_dist.cache import ActivationCache
from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.errors import MetadataError
from easyroutine_dist.interpretability.activation_saver import ActivationLoader, ActivationSaver, QueryResult
from easyroutine_dist.storage import RunWriter


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_base_dir_is_a_path_locally_and_exp_name_is_experiment_name(tmp_path):
    saver = ActivationSaver(tmp_path, "exp")
    loader = ActivationLoader(str(tmp_path), "exp")
    assert saver.base_dir == tmp_path and isinstance(saver.base_dir, Path)
    assert loader.base_dir == tmp_path and isinstance(loader.base_dir, Path)
    assert saver.exp_name == "exp" == loader.exp_name
    copy = ActivationLoader.from_saver(saver)
    assert (copy.base_dir, copy.exp_name) == (saver.base_dir, saver.exp_name)
    saver.exp_name = "other"  # easyroutine scripts set it; same checks as the constructor
    assert saver.experiment_name == "other"
    with pytest.raises(MetadataError):
        saver.exp_name = "../escape"


def test_remote_base_dir_stays_a_url():
    saver = ActivationSaver("memory://compat-url", "e")
    assert saver.base_dir == "memory:///compat-url"
    where = saver.save(torch.ones(1), "m", ["last"], None, ExtractionConfig())
    assert isinstance(where, str) and where.startswith("memory:///compat-url/e/m/")


def test_save_returns_the_run_folder_with_easyroutine_metadata(tmp_path):
    saver = ActivationSaver(tmp_path, "test_experiment")
    where = saver.save(torch.tensor([4, 5, 6]), "org/test_model", [1, 2], None,
                       ExtractionConfig(extract_resid_out=True), {"additional_metadata": "test_value"})
    assert isinstance(where, Path) and where.is_dir() and where.parent.parent.parent == tmp_path
    meta = json.loads((where / "metadata.json").read_text())
    assert meta["experiment_name"] == "test_experiment" and meta["model_name"] == "org/test_model"
    assert meta["target_token_positions"] == [1, 2] and meta["tag"] is None and "save_time" in meta
    assert meta["interventions"] is None  # stored as given, not as []
    assert meta["additional_metadata"] == "test_value"  # where easyroutine puts custom keys
    assert meta["other_metadata"] == {"additional_metadata": "test_value"}
    assert meta["extraction_config"]["extract_resid_out"] is True
    (entry,) = ActivationLoader(tmp_path, "test_experiment").query(custom_keys={"additional_metadata": "test_value"})
    assert entry["additional_metadata"] == "test_value"


def test_custom_keys_never_shadow_library_keys(tmp_path):
    saver = ActivationSaver(tmp_path, "e")
    where = saver.save(torch.ones(1), "m", ["last"], None, ExtractionConfig(),
                       {"tag": "from-custom", "run_id": "x", "n_rows": 99, "mine": 1}, tag="real")
    meta = json.loads((where / "metadata.json").read_text())
    assert meta["tag"] == "real" and meta["run_id"] == where.name and meta["mine"] == 1
    assert "n_rows" not in meta and meta["other_metadata"]["tag"] == "from-custom"
    (entry,) = ActivationLoader(tmp_path, "e").query(tag="real")
    assert entry["n_rows"] == 1 and entry["other_metadata"]["n_rows"] == 99


def test_model_name_from_an_easyroutine_style_model_object(tmp_path):
    class Config:
        model_name = "org/tiny"

    class EasyroutineLikeModel:  # easyroutine's HookedModel keeps the name at .config.model_name
        config = Config()

    ActivationSaver(tmp_path, "e").save(torch.ones(1), EasyroutineLikeModel(), ["last"], None, ExtractionConfig())
    (entry,) = ActivationLoader(tmp_path, "e").query(model_name="org/tiny")
    assert entry["model_name"] == "org/tiny"


def test_save_cache_keeps_interventions_none(tmp_path):
    cache = ActivationCache()
    cache["resid_out_0"] = torch.ones(1, 1, 2)
    cache["metadata"] = {"model_name": "m", "target_token_positions": ["last"], "interventions": None,
                         "extraction_config": {"extract_resid_out": True}}
    where = ActivationSaver(tmp_path, "e").save_cache(cache, {"k": 1})
    meta = json.loads((where / "metadata.json").read_text())
    assert meta["interventions"] is None and meta["k"] == 1


@pytest.mark.parametrize("cls", [ActivationSaver, ActivationLoader])
def test_from_env_without_the_variable_is_a_value_error(cls, monkeypatch, tmp_path):
    monkeypatch.delenv("ACTIVATION_BASE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="ACTIVATION_BASE_DIR"):
        cls.from_env("e")
    assert not list(tmp_path.iterdir())  # nothing created
    monkeypatch.setenv("ACTIVATION_BASE_DIR", str(tmp_path / "acts"))
    assert cls.from_env("e").base_dir == tmp_path / "acts"


def test_load_gives_back_what_was_saved(tmp_path):
    saver = ActivationSaver(tmp_path, "e")
    bare = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    saver.save(bare, "m", ["last"], None, ExtractionConfig(), tag="tensor")
    saver.save({"x": torch.ones(2, 1), "note": "hi"}, "m", ["last"], None, ExtractionConfig(), tag="dict")
    cache = ActivationCache()
    cache["resid_out_0"] = torch.full((2, 1, 3), 7.0)
    saver.save(cache, "m", ["last"], None, ExtractionConfig(), tag="cache")
    loader = ActivationLoader(tmp_path, "e")
    got, meta = loader.query(tag="tensor").load()
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16 and torch.equal(got, bare)
    assert meta["saved_as"] == "tensor"
    got, _ = loader.query(tag="dict").load()
    assert isinstance(got, dict) and set(got) == {"x", "note"}
    assert torch.equal(got["x"], torch.ones(2, 1)) and got["note"] == "hi"
    got, _ = loader.query(tag="cache").load()
    assert isinstance(got, ActivationCache) and torch.equal(got["resid_out_0"], torch.full((2, 1, 3), 7.0))
    limited, _ = loader.query(tag="tensor").load(keys=["activations"])  # a key subset is always a cache
    assert isinstance(limited, ActivationCache) and torch.equal(limited["activations"], bare)


def test_runs_without_saved_as_still_load_as_caches(tmp_path):
    saver = ActivationSaver(tmp_path, "e")
    writer = RunWriter(saver.store)  # how distributed runs and runs from earlier versions are written
    run = writer.begin_run("e", "m", {"tag": "old"})
    record = writer.write_part(run, 0, {"activations": torch.ones(2)})
    writer.commit_part(run, record)
    writer.commit_run(run, [record])
    got, _ = ActivationLoader(tmp_path, "e").query(tag="old").load()
    assert isinstance(got, ActivationCache) and torch.equal(got["activations"], torch.ones(2))


def test_empty_results_load_none_and_print_nothing(tmp_path):
    assert QueryResult().load() == (None, None) and str(QueryResult()) == "" and len(QueryResult()) == 0
    empty = ActivationLoader(tmp_path, "nothing").query(tag="none", verbose=True)  # verbose: accepted
    assert empty.load() == (None, None) and empty.load("2024-01-01") == (None, None)


def test_rename_experiment_leaves_no_empty_folders(tmp_path):
    saver = ActivationSaver(tmp_path, "old")
    saver.save(torch.ones(1), "org/a", ["last"], None, ExtractionConfig(), tag="a")
    saver.save(torch.zeros(1), "b", ["last"], None, ExtractionConfig(), tag="b")
    saver.rename_experiment("new")
    assert saver.exp_name == "new"
    assert not (tmp_path / "old").exists() and not (tmp_path / "_catalog" / "old").exists()
    for folder in tmp_path.rglob("*"):
        assert not folder.is_dir() or any(folder.iterdir()), f"empty folder left: {folder}"
    loader = ActivationLoader(tmp_path, "new")
    assert torch.equal(loader.query(tag="a").load()[0], torch.ones(1))
    for run_folder in (tmp_path / "new").glob("*/*"):
        assert json.loads((run_folder / "metadata.json").read_text())["experiment_name"] == "new"
    assert len(ActivationLoader(tmp_path, "old").query()) == 0


def test_rename_keeps_folders_that_still_hold_an_uncommitted_run(tmp_path):
    saver = ActivationSaver(tmp_path, "old")
    saver.save(torch.ones(1), "m", ["last"], None, ExtractionConfig())
    pending = RunWriter(saver.store).begin_run("old", "m", {"tag": "in-progress"})  # never committed
    saver.rename_experiment("new")
    pending_folder = tmp_path / "old" / "m" / pending.run_id
    assert (pending_folder / "metadata.json").exists()  # nothing uncommitted is deleted
    assert len(ActivationLoader(tmp_path, "new").query()) == 1


def test_save_object_to_path_is_refused_and_writes_nothing(tmp_path):
    saver = ActivationSaver(tmp_path, "e")
    target = tmp_path / "experiment" / "model"
    with pytest.raises(MetadataError, match="pickle"):
        saver.save_object_to_path(torch.tensor([1, 2, 3]), {"key": "value"}, target)
    assert not target.exists() and not os.listdir(tmp_path)
