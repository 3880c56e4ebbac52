"""examples/local_extraction.py and examples/query_and_load.py run end to end on tiny models, locally and on S3,
and what they save, find and load is what was extracted."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from easyroutine_dist.storage.api import ActivationLoader

from .distributed.tiny import char_tokenizer
from .models import hooked

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def local_example():
    return _load("local_extraction")


@pytest.fixture(scope="module")
def query_example():
    return _load("query_and_load")


def _check_local(mod, model, out, printed, base_dir, storage_options=None):
    n = len(mod.PROMPTS)
    layers = model.model_config.num_hidden_layers
    d = model.model_config.hidden_size
    expected = {**{f"resid_out_{i}": (n, 2, d) for i in range(layers)},
                **{f"mlp_out_{i}": (n, 2, d) for i in range(layers)}, "logits": (n, 2, 96), "valid_mask": (n, 2)}
    assert out["shapes"] == expected
    assert bool(out["cache"]["valid_mask"].all())  # "first" and "last" name a real token in every row
    for key, shape in expected.items():  # every shape is printed
        assert f"{key:<14} {shape}" in printed
    assert f"saved run {out['run_id']} at {out['path']}" in printed
    # padded batches give what each prompt gives alone through plain HF (first and last real token)
    tok = char_tokenizer()
    for row in range(n):
        ids = tok([mod.PROMPTS[row]], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hf = model.hf_model(input_ids=ids, output_hidden_states=True)
            normed = model.get_last_layernorm()(out["cache"][f"resid_out_{layers - 1}"][row])
        at = [0, ids.shape[1] - 1]
        for i in range(layers - 1):
            torch.testing.assert_close(out["cache"][f"resid_out_{i}"][row], hf.hidden_states[i + 1][0, at],
                                       atol=1e-5, rtol=1e-4, msg=f"resid_out_{i} row {row}")
        torch.testing.assert_close(normed, hf.hidden_states[layers][0, at], atol=1e-5, rtol=1e-4)  # v5: final-normed
        torch.testing.assert_close(out["cache"]["logits"][row], hf.logits[0, at], atol=1e-5, rtol=1e-4)
    # the saved run loads back equal, found by its tag and custom keys
    q = ActivationLoader(base_dir, mod.EXPERIMENT, storage_options=storage_options).query(
        tag="local", custom_keys={"example": "local_extraction", "n_prompts": n})
    assert [e["run_id"] for e in q] == [out["run_id"]]
    cache, meta = q.load()
    assert meta["model_name"] == model.model_name and meta["target_token_positions"] == ["first", "last"]
    for k in expected:
        assert torch.equal(cache[k], out["cache"][k]), k
    assert cache["token_dict"] == out["cache"]["token_dict"]


def _config():
    from easyroutine_dist.config import ExtractionConfig

    return ExtractionConfig(extract_resid_out=True, extract_mlp_out=True, save_logits=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_local_extraction_example(local_example, arch, tmp_path, capsys):
    model = hooked(arch)
    out = local_example.main(model, tmp_path, tokenizer=char_tokenizer())
    assert str(out["path"]).startswith(str(tmp_path))  # a Path on local disk
    _check_local(local_example, model, out, capsys.readouterr().out, tmp_path)


@pytest.mark.s3
def test_local_extraction_example_on_s3(local_example, s3_bucket_url, s3_storage_options, capsys):
    model = hooked("llama")
    base = f"{s3_bucket_url}/acts"
    out = local_example.main(model, base, s3_storage_options, tokenizer=char_tokenizer())
    assert str(out["path"]).startswith(f"{base}/{local_example.EXPERIMENT}/")
    _check_local(local_example, model, out, capsys.readouterr().out, base, s3_storage_options)


def _check_query(mod, out, printed):
    first, second = out["saved"]
    assert [e["run_id"] for e in out["by_tag"]] == [second["run_id"]]
    assert [e["run_id"] for e in out["by_custom"]] == [first["run_id"]]
    assert out["metadata"]["run_id"] == first["run_id"] and out["metadata"]["other_metadata"]["batch"] == 0
    # only the requested tensors (and the slot validity mask that goes with them) were loaded, and they equal what
    # was extracted
    tensors = sorted(k for k in out["loaded"].keys() if isinstance(out["loaded"][k], torch.Tensor))
    assert tensors == sorted([*mod.KEYS, "valid_mask"])
    for k in [*mod.KEYS, "valid_mask"]:
        assert torch.equal(out["loaded"][k], first["cache"][k]), k
    # parts of the tag query's run concatenate to that run
    assert out["parts"]
    for k in mod.KEYS:
        assert torch.equal(torch.cat([p[k] for p in out["parts"]]), second["cache"][k]), k
    # the printed QueryResults name both runs and their tags
    assert "QueryResult(2 runs)" in printed and printed.count("QueryResult(1 runs)") == 2
    for run in (first, second):
        assert run["run_id"] in printed
    assert "batch-0" in printed and "batch-1" in printed
    assert f"loaded run {first['run_id']}" in printed


def test_query_and_load_example(query_example, tmp_path, capsys):
    out = query_example.main(hooked("llama"), tmp_path, tokenizer=char_tokenizer())
    _check_query(query_example, out, capsys.readouterr().out)
    assert all(p.startswith(str(tmp_path)) for p in out["by_tag"].get_paths())


@pytest.mark.s3
def test_query_and_load_example_on_s3(query_example, s3_bucket_url, s3_storage_options, capsys):
    out = query_example.main(hooked("llama"), f"{s3_bucket_url}/acts", s3_storage_options,
                             tokenizer=char_tokenizer())
    _check_query(query_example, out, capsys.readouterr().out)
    assert out["by_tag"].get_paths()[0].startswith(f"{s3_bucket_url}/acts/")


def test_train_probe_from_archive_example(tmp_path, capsys):
    mod = _load("train_probe_from_archive")
    out = mod.main(hooked("llama"), tmp_path, tokenizer=char_tokenizer(), epochs=4)
    printed = capsys.readouterr().out
    losses = out["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]  # the probe learns
    # every epoch went over every real token of the stored run once (counted from the loaded run's valid_mask)
    cache, _ = out["query"].load()
    n_tokens = int(cache["valid_mask"].sum())
    assert printed.count(f"over {n_tokens} tokens") == 4
    assert out["query"].statistics()[out["key"]]["count"] == n_tokens
