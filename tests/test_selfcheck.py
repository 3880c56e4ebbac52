"""Issue 12 item 2: the self-check passes on every architecture and catches what it claims to catch: a wrong
architecture entry (final norm), hooks that change the output, and padding read as text; ``"error"`` writes nothing.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from easyroutine_dist import extraction
from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.errors import ConfigError
from easyroutine_dist.hooked_model import HookedModel
from easyroutine_dist.selfcheck import (KEYS, MAX_TOKENS, SelfCheckError, check_mode, run_self_check, sample,
                                        tolerance, worst)
from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver

from .models import ARCHS, INFERRED_ARCHS, random_batch, tiny_model

CFG = ExtractionConfig(extract_resid_out=True, save_logits=True)


def _broken_norm(arch: str = "llama") -> HookedModel:
    """A deliberately broken architecture entry: the final norm points at layer 0's input norm."""
    hm = HookedModel(tiny_model(arch))
    hm.spec = dataclasses.replace(hm.spec, final_norm="model.layers.0.input_layernorm")
    return hm


def _files(root) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


@pytest.mark.parametrize("arch", ARCHS + INFERRED_ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_self_check_passes_on_every_architecture(arch, side):
    hm = HookedModel(tiny_model(arch))
    cfg = ExtractionConfig(extract_resid_out=True, extract_attn_pattern=arch == "llama", save_logits=True)
    res = run_self_check(hm, random_batch(padding_side=side), cfg)
    assert set(res) == {*KEYS, "tolerance", "passed"}
    assert res["passed"] and res["tolerance"] >= tolerance(torch.float32, 0.0) == 1e-4
    assert all(0 <= res[k] <= res["tolerance"] for k in KEYS), res


def test_sample_is_two_rows_of_the_batch_one_of_them_padded():
    batch = random_batch(batch=4, seq=9, lengths=[9, 4, 7, 6], padding_side="left")
    ids, mask, short = sample(batch)
    real = [row[m.bool()] for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    assert torch.equal(ids[0], real[0]) and mask[0].all()  # the longest row, unpadded
    assert torch.equal(short, real[1]) and mask[1].tolist() == [0] * 5 + [1] * 4  # the shortest, left-padded
    assert torch.equal(ids[1, 5:], real[1])
    # equal lengths: the padded row is a prefix; long rows are cut to MAX_TOKENS; right padding kept
    long = {"input_ids": torch.arange(3, 3 + 2 * 100).reshape(2, 100) % 90 + 3, "attention_mask": torch.ones(2, 100)}
    ids, mask, short = sample(long)
    assert ids.shape == (2, MAX_TOKENS) and len(short) == MAX_TOKENS // 2
    assert torch.equal(short, long["input_ids"][1, :MAX_TOKENS // 2])  # row 1's prefix, left-padded by default
    assert mask[1].tolist() == [0] * (MAX_TOKENS // 2) + [1] * (MAX_TOKENS // 2)
    right = random_batch(batch=3, lengths=[5, 3, 0], padding_side="right")  # an empty row does not count
    ids, mask, _ = sample(right)
    assert mask[1].tolist() == [1, 1, 1, 0, 0]


def test_broken_final_norm_is_caught_before_anything_is_written(tmp_path):
    hm = _broken_norm()
    batch = random_batch()
    with pytest.raises(SelfCheckError, match=r"lens_max_abs_diff \(logit lens of the last layer vs the model's "
                                             r"logits\) = [0-9.e+-]+ > tolerance"):
        hm.extract_cache([batch], ["last"], extraction_config=CFG, self_check="error")
    cache = HookedModel(tiny_model("llama")).forward(batch, ["last"], extraction_config=CFG)
    saver = ActivationSaver(tmp_path, "exp")
    with pytest.raises(SelfCheckError, match="lens_max_abs_diff"):
        saver.save(cache, hm, ["last"], None, CFG, self_check="error", inputs=batch)
    assert not any(f.endswith(".safetensors") for f in _files(tmp_path))
    assert len(ActivationLoader(tmp_path, "exp").query()) == 0
    # "warn" writes and flags the run; the other two checks still pass
    saver.save(cache, hm, ["last"], None, CFG, self_check="warn", inputs=batch)
    _, meta = ActivationLoader(tmp_path, "exp").query().load()
    check = meta["self_check"]
    assert check["passed"] is False and check["lens_max_abs_diff"] > check["tolerance"]
    assert check["logits_max_abs_diff"] <= check["tolerance"] and check["padding_max_abs_diff"] <= check["tolerance"]


def test_a_hook_that_changes_the_output_is_caught(monkeypatch):
    handle = extraction.Extractor._handle

    def leaky(self, module, items, args, kwargs, output=None):  # a buggy hook: edits the layer output in place
        out = handle(self, module, items, args, kwargs, output)
        if output is not None:
            (output[0] if isinstance(output, tuple) else output).mul_(1.5)
        return out

    monkeypatch.setattr(extraction.Extractor, "_handle", leaky)
    res = run_self_check(HookedModel(tiny_model("llama")), random_batch(), CFG)
    assert not res["passed"] and res["logits_max_abs_diff"] > res["tolerance"]


def test_padding_read_as_text_is_caught():
    class NoMask(HookedModel):  # a padding bug: the attention mask is dropped
        def _prepare(self, inputs):
            ids, mask = super()._prepare(inputs)
            return ids, torch.ones_like(mask)

    res = run_self_check(NoMask(tiny_model("llama")), random_batch(padding_side="left"), CFG)
    assert not res["passed"]  # the padded row has more "real" slots than the row alone, or other values
    assert res["padding_max_abs_diff"] is None or res["padding_max_abs_diff"] > res["tolerance"]
    assert res["logits_max_abs_diff"] is None or res["logits_max_abs_diff"] > res["tolerance"]


def test_a_model_that_ignores_the_attention_mask_fails_only_the_padding_check():
    from transformers import AutoModelForCausalLM

    from .models import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    forward = model.forward
    # pads read as text at shifted positions (transformers 5 reads position-id resets as packed sequences)
    model.forward = lambda *a, attention_mask=None, position_ids=None, **k: forward(*a, **k)
    res = run_self_check(HookedModel(model), random_batch(padding_side="left"), CFG)
    assert res["logits_max_abs_diff"] == 0.0 and res["lens_max_abs_diff"] <= res["tolerance"]
    assert not res["passed"] and res["padding_max_abs_diff"] > 100 * res["tolerance"]


def test_extract_cache_modes_and_metadata():
    hm = HookedModel(tiny_model("llama"))
    batches = [random_batch(seed=s) for s in (1, 2)]
    gen = (b for b in batches)  # generators work: the first batch is checked as it goes by
    out = hm.extract_cache(gen, ["last"], extraction_config=CFG, self_check="error")
    assert out["metadata"]["self_check"]["passed"] is True
    assert out["metadata"]["n_batches"] == 2 and out["logits"].shape[0] == 6
    off = hm.extract_cache(batches, ["last"], extraction_config=CFG)
    assert off["metadata"]["self_check"] is None
    torch.testing.assert_close(off["logits"], out["logits"], rtol=0, atol=0)  # the check changes no result
    with pytest.raises(ConfigError, match="'error'.*'warn'.*'off'"):
        hm.extract_cache(batches, ["last"], extraction_config=CFG, self_check="strict")


def test_save_cache_stores_and_enforces_the_recorded_check(tmp_path):
    saver = ActivationSaver(tmp_path, "exp")
    good = HookedModel(tiny_model("llama")).extract_cache([random_batch()], ["last"], extraction_config=CFG,
                                                          self_check="error")
    saver.save_cache(good, self_check="error")
    flagged = _broken_norm().extract_cache([random_batch()], ["last"], extraction_config=CFG, self_check="warn")
    with pytest.raises(SelfCheckError, match="lens_max_abs_diff"):
        saver.save_cache(flagged, self_check="error")
    unchecked = HookedModel(tiny_model("llama")).extract_cache([random_batch()], ["last"], extraction_config=CFG)
    with pytest.raises(ConfigError, match="has no self-check"):
        saver.save_cache(unchecked, self_check="error")
    saver.save_cache(flagged)  # "off": stored as recorded
    runs = ActivationLoader(tmp_path, "exp").query()
    assert [r["self_check"]["passed"] for r in runs] == [True, False]


def test_worst_and_modes():
    a = {"logits_max_abs_diff": 0.0, "lens_max_abs_diff": 2e-5, "padding_max_abs_diff": 1e-6, "tolerance": 1e-4,
         "passed": True}
    b = {"logits_max_abs_diff": 1e-6, "lens_max_abs_diff": 3.0, "padding_max_abs_diff": None, "tolerance": 2e-4,
         "passed": False}
    assert worst([a, None, b]) == {"logits_max_abs_diff": 1e-6, "lens_max_abs_diff": 3.0,
                                   "padding_max_abs_diff": None, "tolerance": 2e-4, "passed": False}
    assert worst([a, a]) == a and worst([None]) is None
    assert [check_mode(m) for m in ("error", "warn", "off")] == ["error", "warn", "off"]
    with pytest.raises(ConfigError):
        check_mode(True)
