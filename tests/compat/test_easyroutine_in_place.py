"""Runs in easyroutine 1.1.5's layout, read where they are (issue 14): queried next to our own runs, loaded
through torch's weights-only loader, removed and moved as easyroutine did. The folders are written here with
plain torch.save and json, as easyroutine's ActivationSaver laid them out (write_run), and easyroutine's classes
are played by the stand-ins of test_import_easyroutine (the `er` fixture)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from easyroutine_dist.cache import ActivationCache
from easyroutine_dist.compat import ValueWithInfo
from easyroutine_dist.errors import MetadataError, StorageError, UnsafeArchiveError
from easyroutine_dist.interpretability.activation_saver import ActivationLoader, ActivationSaver, QueryResult
from easyroutine_dist.storage.import_easyroutine import import_easyroutine
from easyroutine_dist.storage.legacy_runs import EasyroutineRun
from tests.compat.test_import_easyroutine import _RunsShell, er, write_run  # noqa: F401 (er: a fixture)


@pytest.fixture
def base(tmp_path, er):
    """A base_dir holding three easyroutine runs of "exp" (written out of time order) and one of "other"."""
    root = tmp_path / "acts"
    g = torch.Generator().manual_seed(1)
    data = {"t": torch.randn(2, 3, generator=g), "d": torch.randn(4, generator=g),
            "c": torch.rand(2, 1, 6, generator=g), "p": torch.rand(1, 3, 3, generator=g)}
    cache = er.ActivationCache()
    cache.cache.update({"resid_out_0": data["c"], "avg_pattern_L0H0": er.ValueWithInfo(data["p"], "all rows"),
                        "metadata": {"extraction_config": er.ExtractionConfig(extract_resid_out=True)}})
    write_run(root, "exp", "org/model", "2024-03-02 09:00:00", cache, tag="cache", batch=2)
    write_run(root, "exp", "org/model", "2024-03-01 09:00:00", data["t"], tag="first", batch=1)
    write_run(root, "exp", "org/model", "2024-03-01 10:00:00", {"d": data["d"], "n": 3}, tag="dict", batch=1)
    write_run(root, "other", "m", "2024-03-01 11:00:00", torch.zeros(1), tag="elsewhere")
    return root, data


def folder(root: Path, experiment: str, model: str, save_time: str) -> Path:
    return root / experiment / model / save_time.replace(":", "_").replace(" ", "_")


def test_query_lists_them_as_easyroutine_tuples_in_time_folder_order(base):
    root, _ = base
    found = ActivationLoader(root, "exp").query()
    assert all(isinstance(r, EasyroutineRun) for r in found)
    exp, model_dir, run_dir, meta = found[0]  # easyroutine's tuple unpacks
    assert (exp, model_dir, run_dir) == ("exp", root / "exp" / "org_model",
                                         folder(root, "exp", "org_model", "2024-03-01 09:00:00"))
    assert meta == json.loads((run_dir / "metadata.json").read_text())
    assert [r.run_dir.name for r in found] == ["2024-03-01_09_00_00", "2024-03-01_10_00_00", "2024-03-02_09_00_00"]
    text = str(found)
    assert "0 - Experiment: exp, Model: org_model, Time Folder: 2024-03-01_09_00_00" in text
    assert "  Tag: first" in text
    everywhere = ActivationLoader(root, "exp").query(experiment_name="*")
    assert [r.metadata["tag"] for r in everywhere] == ["first", "dict", "elsewhere", "cache"]


def test_filters_are_those_of_our_runs(base):
    root, _ = base
    loader = ActivationLoader(root, "exp")

    def tags(**kw):
        return [r.metadata["tag"] for r in loader.query(**kw)]

    assert tags(tag="dict") == ["dict"]
    assert tags(custom_keys={"batch": 1}) == ["first", "dict"]
    assert tags(custom_keys={"batch": 1}, tag="first") == ["first"]
    assert tags(model_name="org/model") == ["first", "dict", "cache"]
    assert tags(model_name="someone/else") == []
    assert tags(target_token_positions=("last",)) == ["first", "dict", "cache"]  # a tuple matches the saved list
    assert tags(target_token_positions=[0]) == []
    assert tags(extraction_config={"extract_resid_out": True}) == ["first", "dict", "cache"]
    assert tags(save_time="2024-03-01 10:00:00") == ["dict"]
    assert tags(experiment_name="other") == ["elsewhere"]


def test_load_by_index_folder_name_and_save_time(base):
    root, data = base
    found = ActivationLoader(root, "exp").query()
    got, meta = found.load(0)
    assert torch.equal(got, data["t"]) and meta["tag"] == "first" and meta["save_time"] == "2024-03-01 09:00:00"
    got, meta = found.load("2024-03-01_10_00_00")
    assert set(got) == {"d", "n"} and torch.equal(got["d"], data["d"]) and got["n"] == 3 and meta["tag"] == "dict"
    got, _ = found.load("2024-03-02 09:00:00")  # easyroutine's save_time selects too
    assert isinstance(got, ActivationCache) and sorted(got.keys()) == ["avg_pattern_L0H0", "metadata", "resid_out_0"]
    assert torch.equal(got["resid_out_0"], data["c"])
    assert isinstance(got["avg_pattern_L0H0"], ValueWithInfo) and got["avg_pattern_L0H0"].info() == "all rows"
    assert torch.equal(got["avg_pattern_L0H0"].value(), data["p"])
    assert got["metadata"]["extraction_config"] == {"extract_resid_out": True, "attn_heads": "all", "extra": {}}
    got, _ = found.load()  # -1: the latest time folder
    assert isinstance(got, ActivationCache)
    with pytest.raises(StorageError, match="2099"):
        found.load("2099-01-01_00_00_00")


def test_load_reads_through_the_weights_only_loader(base, monkeypatch):
    root, data = base
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    got, _ = ActivationLoader(root, "exp").query(tag="first").load()
    assert torch.equal(got, data["t"]) and calls == [True]


def test_a_malicious_pickle_in_place_is_refused_and_never_run(base, tmp_path):
    root, _ = base
    marker = tmp_path / "pwned"
    write_run(root, "exp", "org/model", "2024-03-03 00:00:00", {"x": _RunsShell(marker)}, tag="bad")
    found = ActivationLoader(root, "exp").query(tag="bad")
    assert len(found) == 1
    with pytest.raises(UnsafeArchiveError, match="system"):
        found.load()
    assert not marker.exists()


def test_a_raw_easyroutine_tuple_appended_by_hand_works(base):
    root, data = base
    result = QueryResult()
    run = folder(root, "exp", "org_model", "2024-03-01 09:00:00")
    result.results.append(("exp", str(run.parent), str(run), {}))
    assert "Time Folder: 2024-03-01_09_00_00" in str(result)
    assert result.get_paths() == [str(run)]
    got, meta = result.load("2024-03-01_09_00_00")
    assert torch.equal(got, data["t"]) and meta["tag"] == "first"


def test_remove_deletes_the_run_and_nothing_else(base):
    root, _ = base
    found = ActivationLoader(root, "exp").query()
    gone = found[1].run_dir
    found.remove("2024-03-01_10_00_00")
    assert not gone.exists() and gone.parent.is_dir()
    assert [r.run_dir.name for r in found] == ["2024-03-01_09_00_00", "2024-03-02_09_00_00"]
    assert [r.run_dir.name for r in ActivationLoader(root, "exp").query()] == ["2024-03-01_09_00_00",
                                                                              "2024-03-02_09_00_00"]


def test_remove_refuses_a_folder_with_other_files(base):
    root, _ = base
    found = ActivationLoader(root, "exp").query(tag="first")
    (found[0].run_dir / "notes.txt").write_text("mine")
    before = sorted(p.name for p in found[0].run_dir.iterdir())
    with pytest.raises(StorageError, match="notes.txt"):
        found.remove(0)
    assert sorted(p.name for p in found[0].run_dir.iterdir()) == before


def test_update_run_experiment_moves_the_folder_and_rewrites_its_metadata(base):
    root, data = base
    found = ActivationLoader(root, "exp").query(tag="dict")
    src = found[0].run_dir
    before = json.loads((src / "metadata.json").read_text())
    found.update_run_experiment(0, "moved")
    target = root / "moved" / "org_model" / src.name
    assert not src.exists() and sorted(p.name for p in target.iterdir()) == ["metadata.json", "tensor.pt"]
    after = json.loads((target / "metadata.json").read_text())
    assert after == {**before, "experiment_name": "moved"}
    assert found[0] == ("moved", target.parent, target, after)
    again = ActivationLoader(root, "moved").query()
    got, _ = again.load()
    assert torch.equal(got["d"], data["d"]) and [r.metadata["tag"] for r in again] == ["dict"]
    assert [r.metadata["tag"] for r in ActivationLoader(root, "exp").query()] == ["first", "cache"]


def test_update_run_experiment_refuses_unsafe_names_and_existing_targets(base):
    root, _ = base
    found = ActivationLoader(root, "exp").query(tag="first")
    src = found[0].run_dir
    with pytest.raises(MetadataError):
        found.update_run_experiment(0, "../escape")
    taken = root / "taken" / "org_model" / src.name
    taken.mkdir(parents=True)
    with pytest.raises(StorageError, match="already exists"):
        found.update_run_experiment(0, "taken")
    assert sorted(p.name for p in src.iterdir()) == ["metadata.json", "tensor.pt"] and not any(taken.iterdir())
    assert json.loads((src / "metadata.json").read_text())["experiment_name"] == "exp"


def test_our_runs_and_theirs_side_by_side(base):
    root, data = base
    saver = ActivationSaver(root, "exp")
    mine = torch.arange(6.0).reshape(2, 3)
    where = saver.save(mine, "org/model", ["last"], None, {}, tag="native", other_metadata={"batch": 1})
    # an uncommitted run of ours (no _SUCCESS) holding a stray tensor.pt is still never taken for easyroutine's
    pending = root / "exp" / "org--model" / "2024-03-01_09-30-00-000000_0123abcd"
    pending.mkdir(parents=True)
    (pending / "metadata.json").write_text(json.dumps({"schema_version": 2, "tag": "pending"}))
    torch.save(torch.ones(1), pending / "tensor.pt")
    found = ActivationLoader(root, "exp").query(custom_keys={"batch": 1})
    assert [type(r).__name__ for r in found] == ["EasyroutineRun", "EasyroutineRun", "dict"]  # by time: ours is now
    assert found[-1]["tag"] == "native" and torch.equal(found.load(-1)[0], mine)
    assert torch.equal(found.load(0)[0], data["t"])
    text = str(found)
    assert "native" in text and "Time Folder: 2024-03-01_10_00_00" in text
    assert Path(where).name not in [r.run_dir.name for r in found if isinstance(r, tuple)]
    with pytest.raises(StorageError, match="import-easyroutine"):
        found.statistics(0)


def test_an_imported_run_hides_the_folder_it_came_from(base):
    root, _ = base
    import_easyroutine(root)
    found = ActivationLoader(root, "exp").query()
    assert [type(r) for r in found] == [dict, dict, dict]
    assert sorted(r["tag"] for r in found) == ["cache", "dict", "first"]


def test_symlinked_folders_are_not_listed(base, tmp_path):
    root, _ = base
    outside = tmp_path / "outside" / "2024-01-01_00_00_00"
    shutil.copytree(folder(root, "exp", "org_model", "2024-03-01 09:00:00"), outside)
    os.symlink(outside, root / "exp" / "org_model" / "2024-01-01_00_00_00")
    names = [r.run_dir.name for r in ActivationLoader(root, "exp").query()]
    assert "2024-01-01_00_00_00" not in names and len(names) == 3


def test_object_stores_list_only_our_runs():
    loader = ActivationLoader("memory://er-in-place-test", "exp")
    ActivationSaver("memory://er-in-place-test", "exp").save(torch.ones(2), "m", ["last"], None, {}, tag="x")
    assert [type(r) for r in loader.query()] == [dict]
