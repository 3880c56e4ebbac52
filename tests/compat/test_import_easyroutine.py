"""Importing archives written in easyroutine 1.1.5's layout (issue 14 item 5). The archives are built here with
plain torch.save, and easyroutine's classes are played by stand-ins registered under easyroutine's module paths,
so the pickles name exactly the globals easyroutine's would."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from easyroutine_dist.cache import ActivationCache
from easyroutine_dist.errors import UnsafeArchiveError
from easyroutine_dist.interpretability.activation_saver import ActivationLoader, ActivationSaver
from easyroutine_dist.storage.import_easyroutine import import_easyroutine

MODULES = ["easyroutine", "easyroutine.interpretability", "easyroutine.interpretability.activation_cache",
           "easyroutine.interpretability.interventions", "easyroutine.interpretability.hooked_model"]


@pytest.fixture
def er(monkeypatch):
    """Stand-ins for easyroutine's pickled classes, importable under easyroutine's names while the test runs."""
    mods = {}
    for name in MODULES:
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])

    class ActivationCache:  # the attributes easyroutine's cache pickles (its __getstate__ drops the aggregators)
        def __init__(self):
            self.cache = {}
            self.valid_keys = (re.compile(r"resid_out_\d+"), re.compile(r"pattern_L\dH\d+"))
            self.aggregation_strategies = {"mapping_index": len}
            self.deferred_cache = False

        def __getstate__(self):
            state = dict(self.__dict__)
            state.pop("aggregation_strategies")
            return state

    class ValueWithInfo:
        __slots__ = ("_value", "_info")

        def __init__(self, value, info):
            self._value, self._info = value, info

    @dataclass
    class Intervention:
        type: str
        activation: str
        token_positions: list
        patching_values: object = None
        multiplication_value: float = 0.0
        apply_softmax: bool = False

    @dataclass
    class ExtractionConfig:
        extract_resid_out: bool = False
        attn_heads: object = "all"
        extra: dict = field(default_factory=dict)

    placed = {"activation_cache": (ActivationCache, ValueWithInfo), "interventions": (Intervention,),
              "hooked_model": (ExtractionConfig,)}
    for short, classes in placed.items():
        mod = mods[f"easyroutine.interpretability.{short}"]
        for cls in classes:
            cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
            setattr(mod, cls.__name__, cls)
    return types.SimpleNamespace(ActivationCache=ActivationCache, ValueWithInfo=ValueWithInfo,
                                 Intervention=Intervention, ExtractionConfig=ExtractionConfig)


def write_run(archive: Path, experiment: str, model: str, save_time: str, obj, tag=None, **custom) -> Path:
    """One run the way easyroutine 1.1.5's ActivationSaver.save lays it out."""
    folder = archive / experiment / model.replace("/", "_") / save_time.replace(":", "_").replace(" ", "_")
    folder.mkdir(parents=True)
    torch.save(obj, folder / "tensor.pt")
    meta = {"tag": tag, "save_time": save_time, "experiment_name": experiment, "model_name": model,
            "target_token_positions": ["last"], "interventions": None,
            "extraction_config": {"extract_resid_out": True}, **custom}
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def archive(tmp_path, er):
    root = tmp_path / "er_runs"
    g = torch.Generator().manual_seed(0)
    data = {"bare": torch.randn(3, 4, generator=g), "resid": torch.randn(2, 1, 8, generator=g).to(torch.bfloat16),
            "pattern": torch.rand(2, 5, 5, generator=g), "ragged": [torch.ones(2, 3), torch.zeros(2, 2)]}
    write_run(root, "exp", "org/model", "2024-05-01 10:00:00", data["bare"], tag="bare", batch=0)
    write_run(root, "exp", "org/model", "2024-05-01 11:00:00", {"x": data["resid"], "note": "hi"}, tag="dict")
    cache = er.ActivationCache()
    cache.cache.update({
        "resid_out_0": data["resid"], "mapping_index": {"last": [0]}, "token_dict": {"last": [[4], [2]]},
        "avg_pattern_L0H1": er.ValueWithInfo(data["pattern"], "rows: all"), "incompatible": data["ragged"],
        "metadata": {"model_name": "org/model", "target_token_positions": [(0, 2), "last"],
                     "extraction_config": er.ExtractionConfig(extract_resid_out=True),
                     "interventions": [er.Intervention("columns", "pattern_L1H2", ["last"], "ablation"),
                                       er.Intervention("full", "resid_out_0", [0], torch.ones(1, 8))]}})
    write_run(root, "exp", "org/model", "2024-05-01 12:00:00", cache, tag="cache", batch=1)
    write_run(root, "other exp", "m", "2024-06-01 09:30:00", torch.ones(1), tag="elsewhere")
    return root, data


def test_import_makes_every_run_queryable_with_its_data(archive):
    root, data = archive
    before = snapshot(root)
    report = import_easyroutine(root)
    assert sorted(rel for rel, _ in report.imported) == [
        "exp/org_model/2024-05-01_10_00_00", "exp/org_model/2024-05-01_11_00_00",
        "exp/org_model/2024-05-01_12_00_00", "other exp/m/2024-06-01_09_30_00"]
    assert report.skipped == []
    assert all(before[k] == v for k, v in snapshot(root).items() if k in before)  # sources untouched
    loader = ActivationLoader(root, "exp")
    got, meta = loader.query(tag="bare").load()
    assert isinstance(got, torch.Tensor) and torch.equal(got, data["bare"])
    assert meta["model_name"] == "org/model" and meta["batch"] == 0 and meta["other_metadata"] == {"batch": 0}
    assert meta["save_time"] == "2024-05-01_10-00-00" and meta["interventions"] is None
    assert meta["target_token_positions"] == ["last"] and meta["extraction_config"] == {"extract_resid_out": True}
    src = root / "exp/org_model/2024-05-01_10_00_00/tensor.pt"
    assert meta["imported_from"] == {"format": "easyroutine-1.1.5", "path": "exp/org_model/2024-05-01_10_00_00",
                                     "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
                                     "save_time": "2024-05-01 10:00:00", "experiment_name": "exp"}
    got, _ = loader.query(tag="dict").load()
    assert isinstance(got, dict) and got["note"] == "hi"
    assert got["x"].dtype == torch.bfloat16 and torch.equal(got["x"], data["resid"])
    assert [e["tag"] for e in loader.query(custom_keys={"batch": 1})] == ["cache"]
    assert [e["tag"] for e in ActivationLoader(root, "other exp").query(model_name="m")] == ["elsewhere"]


def test_an_easyroutine_cache_becomes_an_activation_cache(archive):
    root, data = archive
    import_easyroutine(root)
    got, meta = ActivationLoader(root, "exp").query(tag="cache").load()
    assert isinstance(got, ActivationCache) and meta["saved_as"] == "cache"
    assert torch.equal(got["resid_out_0"], data["resid"]) and got["resid_out_0"].dtype == torch.bfloat16
    assert got["mapping_index"] == {"last": [0]} and got["token_dict"] == {"last": [[4], [2]]}
    assert torch.equal(got["avg_pattern_L0H1"], data["pattern"])  # ValueWithInfo: the value, its note aside
    assert got["value_info"] == {"avg_pattern_L0H1": "rows: all"}
    assert got["split_keys"] == {"incompatible": ["incompatible.0", "incompatible.1"]}
    assert torch.equal(got["incompatible.0"], data["ragged"][0]) and torch.equal(got["incompatible.1"], data["ragged"][1])
    inner = got["metadata"]
    assert inner["target_token_positions"] == [[0, 2], "last"]
    assert inner["extraction_config"] == {"extract_resid_out": True, "attn_heads": "all", "extra": {}}
    ablation, patch = inner["interventions"]
    assert ablation == {"type": "columns", "activation": "pattern_L1H2", "token_positions": ["last"],
                        "patching_values": "ablation", "multiplication_value": 0.0, "apply_softmax": False}
    ones = torch.ones(1, 8).numpy().tobytes()  # tensors in metadata are described, not stored
    assert patch["patching_values"] == {"tensor_shape": [1, 8], "dtype": "torch.float32",
                                        "sha256": hashlib.sha256(ones).hexdigest()}


def test_importing_again_skips_what_was_imported(archive):
    root, _ = archive
    first = import_easyroutine(root)
    again = import_easyroutine(root)
    assert again.imported == [] and sorted(r for r, _ in again.skipped) == sorted(r for r, _ in first.imported)
    assert all(why == "already imported" for _, why in again.skipped)
    assert len(ActivationLoader(root, "exp").query()) == 3


def test_import_into_another_base_dir(archive, tmp_path):
    root, data = archive
    report = import_easyroutine(root, tmp_path / "converted")
    assert all(str(where).startswith(str(tmp_path / "converted")) for _, where in report.imported)
    assert not (root / "_catalog").exists()
    got, _ = ActivationLoader(tmp_path / "converted", "exp").query(tag="bare").load()
    assert torch.equal(got, data["bare"])


def test_incomplete_runs_are_skipped_and_our_own_runs_ignored(archive):
    root, _ = archive
    lone = root / "exp" / "org_model" / "2024-05-02_00_00_00"
    lone.mkdir()
    (lone / "metadata.json").write_text(json.dumps({"tag": "no tensor", "model_name": "org/model"}))
    ActivationSaver(root, "exp").save(torch.ones(1), "org/model", ["last"], None, {}, tag="native")
    report = import_easyroutine(root)
    assert ("exp/org_model/2024-05-02_00_00_00", "no tensor.pt: not a complete easyroutine run") in report.skipped
    assert len(report.imported) == 4 and len(report.skipped) == 1
    assert sorted(e["tag"] for e in ActivationLoader(root, "exp").query()) == ["bare", "cache", "dict", "native"]


class _RunsShell:
    """Unpickling this calls os.system: the classic malicious pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_is_refused_named_and_never_run(archive, tmp_path):
    root, _ = archive
    marker = tmp_path / "pwned"
    bad = write_run(root, "exp", "org/model", "2024-05-03 00:00:00", {"x": torch.ones(1), "y": _RunsShell(marker)})
    before = snapshot(root)
    with pytest.raises(UnsafeArchiveError) as err:
        import_easyroutine(root)
    assert str(bad / "tensor.pt") in str(err.value) and "system" in str(err.value)
    assert "nothing was imported" in str(err.value)
    assert not marker.exists()
    assert snapshot(root) == before  # nothing written, not even the good runs


def test_an_allowlisted_name_cannot_be_used_to_call_with_arguments(archive, er, tmp_path):
    root, _ = archive
    marker = tmp_path / "called"

    class Sneaky:  # pickles as a call easyroutine.ActivationCache("touch ...") instead of NEWOBJ + state
        def __reduce__(self):
            return er.ActivationCache, (f"touch {marker}",)

    for old in root.iterdir():  # only the crafted run in this archive
        shutil.rmtree(old)
    bad = write_run(root, "exp", "m", "2024-05-03 00:00:00", Sneaky())
    with pytest.raises(UnsafeArchiveError) as err:
        import_easyroutine(root)
    assert str(bad / "tensor.pt") in str(err.value) and not marker.exists()
    found = ActivationLoader(root, "exp").query()
    assert [e for e in found if isinstance(e, dict)] == []  # nothing imported: the run is only seen in place
    with pytest.raises(UnsafeArchiveError):  # and loading it in place is refused by the same loader
        found.load(0)
    assert not marker.exists()


def test_a_plain_pickle_file_is_refused(archive):
    root, _ = archive
    folder = root / "exp" / "org_model" / "2024-05-04_00_00_00"
    folder.mkdir()
    (folder / "tensor.pt").write_bytes(pickle.dumps({"a": 1}))
    (folder / "metadata.json").write_text(json.dumps({"model_name": "org/model", "save_time": "x"}))
    with pytest.raises(UnsafeArchiveError, match="not a torch.save checkpoint") as err:
        import_easyroutine(root)
    assert str(folder / "tensor.pt") in str(err.value)


@pytest.mark.parametrize("text,word", [("{not json", "not valid JSON"), ('["a list"]', "not a JSON object"),
                                       ('{"model_name": "../../etc"}', "path traversal")])
def test_bad_metadata_is_refused_before_anything_is_written(archive, text, word):
    root, _ = archive
    folder = root / "exp" / "org_model" / "2024-05-05_00_00_00"
    folder.mkdir()
    torch.save(torch.ones(1), folder / "tensor.pt")
    (folder / "metadata.json").write_text(text)
    with pytest.raises(UnsafeArchiveError, match=word) as err:
        import_easyroutine(root)
    assert str(folder / "metadata.json") in str(err.value) and not (root / "_catalog").exists()


def test_not_a_folder(tmp_path):
    with pytest.raises(UnsafeArchiveError, match="not a folder"):
        import_easyroutine(tmp_path / "missing")


def test_cli_imports_and_refuses(archive, tmp_path):
    from easyroutine_dist.cli import app

    root, _ = archive
    out = CliRunner().invoke(app, ["import-easyroutine", str(root)])
    assert out.exit_code == 0, out.output
    assert "4 run(s) imported" in out.output and "exp/org_model/2024-05-01_10_00_00" in out.output
    assert len(ActivationLoader(root, "exp").query()) == 3
    marker = tmp_path / "cli-pwned"
    write_run(root, "exp", "org/model", "2024-05-06 00:00:00", _RunsShell(marker))
    out = CliRunner().invoke(app, ["import-easyroutine", str(root), "--base-dir", str(tmp_path / "elsewhere")])
    assert out.exit_code == 2 and "2024-05-06_00_00_00" in out.output and "refused" in out.output  # input refused
    assert not marker.exists() and not (tmp_path / "elsewhere").exists()
