"""Issue 12 item 1: provenance fingerprints in every saved run, stable across loads, sensitive to what they claim
to identify (one weight file's size, the tokenizer's padding side, one prompt), and queryable."""

from __future__ import annotations

import json
import os
import platform
import shutil
from importlib import metadata

import numpy as np
import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.distributed.partitions import fingerprint_batches, tokenize_batches
from easyroutine_dist.hooked_model import HookedModel
from easyroutine_dist.provenance import (collect, dataset_fingerprint, gguf_header_end, model_fingerprint,
                                         tokenizer_fingerprint)
from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver
from easyroutine_dist.storage.query import nested_match

from .distributed.tiny import prompts, save_tiny_model
from .models import ARCHS, INFERRED_ARCHS, random_batch, tiny_model

CFG = ExtractionConfig(extract_resid_out=True)
FIELDS = {"package_version", "python", "torch", "transformers", "accelerate", "model_fingerprint",
          "model_fingerprint_kind", "tokenizer_fingerprint", "dataset_fingerprint", "dtype", "device_map",
          "attn_implementation"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("prov") / "tiny")


def test_two_loads_agree_and_each_fingerprint_follows_its_input(folder, tmp_path):
    a, b = HookedModel.from_pretrained(folder), HookedModel.from_pretrained(folder)
    pa, pb = collect(a), collect(b)
    assert set(pa) == FIELDS and pa == pb and pa["model_fingerprint_kind"] == "files"
    assert pa["model_fingerprint"].startswith("sha256:") and pa["tokenizer_fingerprint"].startswith("sha256:")
    # versions, dtype, placement and attention as the libraries themselves report them
    assert pa["python"] == platform.python_version() and pa["torch"] == metadata.version("torch")
    assert pa["transformers"] == metadata.version("transformers")
    assert pa["accelerate"] == metadata.version("accelerate")
    assert (pa["dtype"], pa["device_map"]) == ("float32", "cpu")
    assert pa["attn_implementation"] == a.hf_model.config._attn_implementation
    # one weight file one byte longer (config.json untouched): another model fingerprint
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    weights = next(f for f in os.listdir(changed) if f.endswith(".safetensors"))
    with open(changed / weights, "ab") as f:
        f.write(b"\0")
    assert model_fingerprint(changed)["model_fingerprint"] != pa["model_fingerprint"]
    assert model_fingerprint(folder) == {k: pa[k] for k in ("model_fingerprint", "model_fingerprint_kind")}
    # the tokenizer's padding side
    tok = a.hf_tokenizer
    side = tok.padding_side
    tok.padding_side = "right" if side == "left" else "left"
    assert tokenizer_fingerprint(tok) != pa["tokenizer_fingerprint"]
    tok.padding_side = side
    assert tokenizer_fingerprint(tok) == pa["tokenizer_fingerprint"]


def test_dataset_fingerprint_follows_one_prompt(folder):
    hm = HookedModel.from_pretrained(folder)
    texts = prompts(7)

    def run(ts):
        batches = tokenize_batches(hm.hf_tokenizer, ts, 3)
        out = hm.extract_cache(batches, ["last"], extraction_config=CFG)
        return out["metadata"]["provenance"]["dataset_fingerprint"], batches

    first, batches = run(texts)
    again, _ = run(list(texts))
    edited, _ = run(texts[:4] + [texts[4] + "x"] + texts[5:])
    assert first == again != edited
    # over the part fingerprint of the distributed runs (one part made of these batches)
    assert first == dataset_fingerprint([fingerprint_batches(batches)])


@pytest.mark.parametrize("arch", ARCHS + INFERRED_ARCHS)
def test_every_architecture_gets_provenance_in_saved_runs(arch, tmp_path):
    hm = HookedModel(tiny_model(arch), None, model_name=f"tiny-{arch}")
    batch = random_batch()
    saver = ActivationSaver(tmp_path, "exp")
    saver.save(hm.forward(batch, ["last"], extraction_config=CFG), hm, ["last"], None, CFG, inputs=batch,
               self_check="error")
    saver.save_cache(hm.extract_cache([batch], ["last"], extraction_config=CFG, self_check="warn"))
    runs = ActivationLoader(tmp_path, "exp").query()
    provs = [r["provenance"] for r in runs]
    assert all(set(p) == FIELDS for p in provs)
    assert provs[0]["model_fingerprint_kind"] == "memory" and provs[0]["tokenizer_fingerprint"] is None
    assert provs[0] == provs[1]  # the same model on the same batch, through save and through save_cache
    assert [r["self_check"]["passed"] for r in runs] == [True, True]


def test_query_by_provenance(folder, tmp_path):
    hm = HookedModel.from_pretrained(folder)
    batches = tokenize_batches(hm.hf_tokenizer, prompts(4), 2)
    saver = ActivationSaver(tmp_path, "exp")
    saver.save_cache(hm.extract_cache(batches, ["last"], extraction_config=CFG), tag="a")
    saver.save(torch.zeros(2, 3), "some-model", ["last"], None, CFG, tag="b")  # no model object: versions only
    loader = ActivationLoader(tmp_path, "exp")
    fp = collect(hm)["model_fingerprint"]
    assert [r["tag"] for r in loader.query(provenance={"model_fingerprint": fp})] == ["a"]
    assert [r["tag"] for r in loader.query(provenance={"model_fingerprint": None})] == ["b"]
    assert len(loader.query(provenance={"torch": metadata.version("torch")})) == 2
    assert len(loader.query(provenance={"model_fingerprint": fp, "dtype": "bfloat16"})) == 0
    assert nested_match({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1}})
    assert not nested_match({"a": {"b": 1}}, {"a": {"b": 1, "c": None}}) and not nested_match({"a": 1}, {"a": {}})


def _write_gguf(path, name: str, first: float = 0.0) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", name)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bc"])
    w.add_uint32("llama.block_count", 2)
    w.add_tensor("t0", np.arange(8, dtype=np.float32) + first)
    w.add_tensor("t1", np.ones((2, 3), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_fingerprint_is_the_header(tmp_path):
    import gguf

    _write_gguf(tmp_path / "m.gguf", "tiny")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    end = gguf_header_end(str(tmp_path / "m.gguf"))
    assert end <= reader.data_offset < end + reader.alignment  # the gguf package's own parse, up to alignment
    fp = model_fingerprint(tmp_path, {"gguf_file": "m.gguf"})
    assert fp["model_fingerprint_kind"] == "gguf"
    (tmp_path / "same").mkdir()
    _write_gguf(tmp_path / "same" / "m.gguf", "tiny", first=5.0)  # other tensor values, same header
    assert model_fingerprint(tmp_path / "same", {"gguf_file": "m.gguf"}) == fp
    (tmp_path / "other").mkdir()
    _write_gguf(tmp_path / "other" / "m.gguf", "tinY")  # one metadata character
    other = model_fingerprint(tmp_path / "other", {"gguf_file": "m.gguf"})
    assert other["model_fingerprint"] != fp["model_fingerprint"]


def test_hub_fingerprint_is_the_snapshot_commit(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--tiny"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps({"model_type": "llama"}))
    got = model_fingerprint("org/tiny", {"cache_dir": str(tmp_path)})
    assert got == {"model_fingerprint": f"hub:org/tiny@{commit}", "model_fingerprint_kind": "hub"}
    assert model_fingerprint("org/absent", {"cache_dir": str(tmp_path)})["model_fingerprint"] is None
