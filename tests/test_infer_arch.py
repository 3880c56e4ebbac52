"""Issue 12 item 3: a causal LM outside the registry is accepted only by proof.

Expected values come from outside the code under test: the registry's hand-written entries, HF's own hidden states
and logits (each row run alone), and models whose computation is known to fall outside an ArchSpec."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from easyroutine_dist import architectures, infer_arch
from easyroutine_dist.architectures import REGISTRY, spec_for
from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.errors import UnsupportedArchitectureError
from easyroutine_dist.hooked_model import HookedModel
from easyroutine_dist.lens import LogitLens

from .models import ARCHS, INFERRED_ARCHS, VOCAB, random_batch, tiny_config, tiny_model, unpadded_rows
from .oracle import check_rows

STANDARD = [a for a in ARCHS if not a.startswith(("gpt2", "gpt_neox"))]
PATHS = ("layers", "embed", "final_norm", "attn", "o_proj", "input_norm", "attn_out", "mlp_out", "mid", "qkv_layout",
         "q_proj", "k_proj", "v_proj", "qkv_proj", "unembed", "norm_kind", "norm_offset", "softcap_attr")


@pytest.mark.parametrize("arch", STANDARD)
def test_inference_reproduces_the_registry_entry(arch):
    """On every registry architecture with the standard layout, the entry inferred from the module tree (and the
    final norm measured on its weights) is the hand-written one, and it passes the load-time oracles."""
    model = tiny_model(arch)
    want = spec_for(model.config)
    got = infer_arch.infer_spec(model.config, model)
    assert got.inferred and not want.inferred
    assert {f: getattr(got, f) for f in PATHS} == {f: getattr(want, f) for f in PATHS}
    meta = infer_arch.infer_spec(model.config)  # tree only, on the meta device: same module paths
    assert {f: getattr(meta, f) for f in PATHS[:15]} == {f: getattr(want, f) for f in PATHS[:15]}
    hm = HookedModel(model)
    hm.spec = got
    infer_arch.prove(hm)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_non_standard_registry_trees_are_not_inferred_but_their_entries_pass_the_oracles(arch):
    model = tiny_model(arch)
    with pytest.raises(UnsupportedArchitectureError, match=r"q_proj/k_proj/v_proj.*register\("):
        infer_arch.infer_spec(model.config, model)
    checks = infer_arch.oracles(HookedModel(model))  # the oracles hold on the hand-written entries
    assert checks and all(d <= t for _, d, t in checks), checks


@pytest.mark.parametrize("arch", INFERRED_ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_architectures_outside_the_registry_match_hf(arch, side):
    """olmo, granite (logits_scaling, embedding_multiplier), starcoder2, cohere (parallel, logit_scale), helium and
    phi (parallel, lm_head bias) load through inference; padded extraction equals each row run alone through HF."""
    assert arch not in REGISTRY
    model = tiny_model(arch)
    hm = HookedModel(model)
    assert hm.spec.inferred
    batch = random_batch(padding_side=side)
    cfg = ExtractionConfig(extract_resid_out=True, save_logits=True)
    cache = hm.forward(batch, ["all", "last"], extraction_config=cfg)
    rows = [r["input_ids"][0].tolist() for r in unpadded_rows(batch)]
    check_rows(cache, rows, ["all", "last"], model, [0, 1])
    # the lens on the last layer is the model's logits, scaling and all (HF's logits of each row alone)
    lens = LogitLens.from_model(hm)
    for r, ids in enumerate(rows):
        alone = hm.forward({"input_ids": torch.tensor([ids])}, ["all"], extraction_config=cfg)
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0]
        torch.testing.assert_close(lens.logits(alone["resid_out_2"])[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,attr,value", [("granite", "logits_scaling", 4.0), ("cohere", "logit_scale", 0.5)])
def test_declared_logit_scaling_is_applied_and_needed(arch, attr, value, monkeypatch):
    hm = HookedModel(tiny_model(arch))
    assert (hm.spec.logit_scale_attr, getattr(hm.model_config, "model_type")) == (attr, arch)
    lens = LogitLens.from_model(hm)
    assert lens.logit_scale == pytest.approx(1 / value if attr == "logits_scaling" else value)
    # an entry that misses the scaling is refused by the lens oracle
    monkeypatch.setattr(infer_arch, "_LOGIT_SCALES", ())
    with pytest.raises(UnsupportedArchitectureError, match=r"logit lens of resid_out_2 vs HF logits"):
        HookedModel(tiny_model(arch))


def test_scaled_residual_branches_are_refused_with_the_mismatches_and_a_register_call():
    """Granite with residual_multiplier != 1 adds 0.5 * attn_out to the residual: no ArchSpec describes it."""
    cfg = tiny_config("granite")
    cfg.residual_multiplier = 0.5
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(UnsupportedArchitectureError) as err:
        HookedModel(model)
    msg = str(err.value)
    for text in ("'granite' is not in the registry", "layer 0: resid_in + attn_out + mlp_out vs resid_out",
                 "tolerance", "from easyroutine_dist.architectures import ArchSpec, register",
                 "register('granite', ArchSpec(layers='model.layers'"):
        assert text in msg, (text, msg)
    assert "resid_out_0 vs HF hidden_states[1]" not in msg  # the residual stream itself is hooked right


def test_wrong_final_norm_formula_is_refused(monkeypatch):
    """If the probe of the final norm picked the wrong formula, the lens oracle refuses the entry."""
    monkeypatch.setattr(infer_arch, "_probe_norm", lambda *a, **k: {"norm_kind": "rms", "norm_offset": 1.0})
    with pytest.raises(UnsupportedArchitectureError, match=r"(?s)logit lens of resid_out_2 vs HF logits.*register\("):
        HookedModel(tiny_model("olmo"))


def test_non_standard_tree_is_refused_from_the_config_alone():
    """No weights needed: spec_for(config) builds the tree on the meta device and names what is missing."""
    cfg = AutoConfig.for_model("gpt_bigcode", vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4, n_positions=64)
    with pytest.raises(UnsupportedArchitectureError) as err:
        spec_for(cfg)
    msg = str(err.value)
    assert "q_proj/k_proj/v_proj" in msg and "['ln_1', 'ln_2']" in msg
    assert "register('gpt_bigcode', ArchSpec(layers='transformer.h', embed='transformer.wte'" in msg


def test_registered_entry_takes_precedence_over_inference():
    model = tiny_model("llama", seed=3)
    model.config.model_type = "my_llama_12"
    try:
        assert HookedModel(model).spec.inferred  # accepted by proof
        architectures.register("my_llama_12", dataclasses.replace(REGISTRY["llama"]))
        assert not HookedModel(model).spec.inferred
    finally:
        REGISTRY.pop("my_llama_12", None)
        model.config.model_type = "llama"


def test_from_pretrained_of_an_inferred_architecture(tmp_path):
    tiny_model("starcoder2").save_pretrained(tmp_path / "m")
    hm = HookedModel.from_pretrained(str(tmp_path / "m"))
    assert hm.spec.inferred and hm.spec.norm_kind == "layernorm"
