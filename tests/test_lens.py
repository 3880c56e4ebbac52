"""LogitLens on every registry architecture against the model's logits and hand computations from HF modules."""

from __future__ import annotations

import json

import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.errors import ConfigError
from easyroutine_dist.interpretability.tools import LogitLens, lens_table, plot_lens_heatmap
from easyroutine_dist.positions import resolve_positions
from tests.models import ARCHS, VOCAB, hooked, random_batch

BATCH = random_batch(batch=3, seq=7, seed=1)
VALID = resolve_positions(["all"], BATCH["attention_mask"], None).valid
CFG = ExtractionConfig(extract_resid_out=True, extract_resid_mid=False, extract_last_layernorm=True,
                       extract_head_out=True, attn_heads=[{"layer": 1, "head": 0}, {"layer": 1, "head": 3}])


def _run(arch):
    model = hooked(arch)
    return model, model.forward(BATCH, ["all"], extraction_config=CFG), LogitLens.from_model(model)


def _hand_lens(model, act, norm=True):
    """final_norm(act) @ W_U (+ soft-cap) using the HF modules themselves (without the norm if ``norm`` is False)."""
    hf = model.hf_model
    final = hf.get_submodule(model.spec.final_norm)
    with torch.no_grad():
        logits = hf.get_output_embeddings()(final(act) if norm else act)
    cap = getattr(hf.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _hand_final_stats(model, act, last_in):
    """easyroutine's mode by hand: the final norm with the statistics of cache['last_layernorm']."""
    hf = model.hf_model
    norm = hf.get_submodule(model.spec.final_norm)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")
    w = norm.weight.detach() + (1.0 if model.spec.norm_offset else 0.0)
    if model.spec.norm_kind == "rms":
        y = act / torch.sqrt(last_in.pow(2).mean(-1, keepdim=True) + eps) * w
    else:
        mu = last_in.mean(-1, keepdim=True)
        var = last_in.var(-1, unbiased=False, keepdim=True)
        y = (act - mu) / torch.sqrt(var + eps) * w + norm.bias.detach()
    logits = y @ hf.get_output_embeddings().weight.detach().t()
    cap = getattr(hf.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@pytest.mark.parametrize("arch", ARCHS)
def test_lens_matches_model_and_hand_computation(arch):
    model, cache, lens = _run(arch)
    L = model.model_config.num_hidden_layers
    last = lens.compute(cache, f"resid_out_{L - 1}")[f"logit_lens_resid_out_{L - 1}"]
    torch.testing.assert_close(last[VALID], cache["logits"][VALID], atol=1e-5, rtol=1e-5)
    mid = lens.compute(cache, "resid_out_0")["logit_lens_resid_out_0"]
    torch.testing.assert_close(mid, _hand_lens(model, cache["resid_out_0"]), atol=1e-5, rtol=1e-5)
    assert not mid.requires_grad and mid.shape == (3, 7, VOCAB)
    probs = lens.compute(cache, "resid_out_{i}", apply_softmax=True)
    assert sorted(probs) == [f"logit_lens_resid_out_{i}" for i in range(L)]
    for i in range(L):
        torch.testing.assert_close(probs[f"logit_lens_resid_out_{i}"],
                                   _hand_lens(model, cache[f"resid_out_{i}"]).softmax(-1), atol=1e-6, rtol=1e-5)
    # easyroutine-compatible option: the final layer's statistics for every layer
    compat = lens.compute(cache, "resid_out_0", norm_stats="last_layernorm")["logit_lens_resid_out_0"]
    torch.testing.assert_close(compat, _hand_final_stats(model, cache["resid_out_0"], cache["last_layernorm"]),
                               atol=1e-4, rtol=1e-4)
    # heads: pattern with two placeholders
    heads = lens.compute(cache, "head_out_L{i}H{j}", apply_norm=False)
    assert list(heads) == ["logit_lens_head_out_L1H0", "logit_lens_head_out_L1H3"]
    for h in (0, 3):  # no norm: the head's output through the unembedding (and soft-cap) alone
        torch.testing.assert_close(heads[f"logit_lens_head_out_L1H{h}"],
                                   _hand_lens(model, cache[f"head_out_L1H{h}"], norm=False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "llama"])
def test_logit_diff_and_accuracy_against_hand_computation(arch):
    model, cache, lens = _run(arch)
    full = lens.compute(cache, "resid_out_1")["logit_lens_resid_out_1"]  # [3, 7, V]
    pairs = [(5, 9), (11, 3), (40, 41)]
    diff = lens.compute(cache, "resid_out_1", token_directions=pairs)["logit_lens_resid_out_1"]
    hand = torch.stack([full[i, :, a] - full[i, :, b] for i, (a, b) in enumerate(pairs)])
    torch.testing.assert_close(diff, hand, atol=1e-5, rtol=1e-5)
    single = lens.logit_diff(cache, "resid_out_1", [7, 8, 9])["logit_lens_resid_out_1"]
    torch.testing.assert_close(single, torch.stack([full[i, :, t] for i, t in enumerate([7, 8, 9])]))
    probs = full.softmax(-1)
    pdiff = lens.compute(cache, "resid_out_1", token_directions=pairs, apply_softmax=True)["logit_lens_resid_out_1"]
    torch.testing.assert_close(pdiff, torch.stack([probs[i, :, a] - probs[i, :, b] for i, (a, b) in enumerate(pairs)]))
    acc = lens.compute(cache, "resid_out_1", token_directions=pairs, metric="accuracy")["logit_lens_resid_out_1"]
    wins = torch.stack([full[i, :, a] > full[i, :, b] for i, (a, b) in enumerate(pairs)])
    assert acc.dim() == 0
    torch.testing.assert_close(acc, wins[VALID].float().mean())
    top = full.argmax(-1)
    targets = [int(top[0, -1]), int(top[1, -1]), 0]
    acc1 = lens.accuracy(cache, "resid_out_1", targets)["logit_lens_resid_out_1"]
    hits = torch.stack([top[i] == t for i, t in enumerate(targets)])
    torch.testing.assert_close(acc1, hits[VALID].float().mean())


def test_topk_and_chunking_match_full_softmax():
    model, cache, lens = _run("gemma2")
    full = lens.compute(cache, "resid_out_{i}", apply_softmax=True)
    small = LogitLens.from_model(model, chunk_positions=2, chunk_vocab=7)
    for name, probs in full.items():
        key = name.removeprefix("logit_lens_")
        torch.testing.assert_close(small.compute(cache, key, apply_softmax=True)[name], probs)
        res = small.topk(cache, key, k=4)
        ref = probs.topk(4, dim=-1)
        torch.testing.assert_close(res[f"{name}_topk_probs"], ref.values)
        # padded slots are all-zero activations (all logits tie), so compare ids at real tokens only
        torch.testing.assert_close(res[f"{name}_topk_ids"][VALID], ref.indices[VALID])
    one = small.topk(cache["resid_out_2"], "x", k=1)
    assert one["logit_lens_x_topk_ids"].shape == (3, 7, 1)
    hand = _hand_lens(model, cache["resid_out_2"])
    assert torch.equal(one["logit_lens_x_topk_ids"][..., 0][VALID], hand.argmax(-1)[VALID])


def test_save_load_without_model(tmp_path):
    model, cache, lens = _run("gemma3_text")
    ref = lens.compute(cache, "resid_out_{i}")
    for target in (str(tmp_path / "lens"), "memory://lens-test/lens"):
        lens.save(target)
        loaded = LogitLens.load(target)
        assert loaded.softcap == 5.0 and loaded.norm_offset == 1.0 and loaded.norm_kind == "rms"
        for k, v in loaded.compute(cache, "resid_out_{i}").items():
            torch.testing.assert_close(v, ref[k])
    meta = json.loads((tmp_path / "lens" / "lens.json").read_text())
    assert meta["model_config"]["model_type"] == "gemma3_text"
    with pytest.raises(ConfigError):
        LogitLens.load(str(tmp_path / "nothing"))


def test_constructor_forms_and_errors(monkeypatch):
    model, cache, lens = _run("gemma2")
    # the seed constructor with a weight tensor and the HF config
    direct = LogitLens(model.hf_model.lm_head.weight, model.get_last_layernorm(), "m", model.hf_model.config)
    torch.testing.assert_close(direct.compute(cache, "resid_out_1")["logit_lens_resid_out_1"],
                               lens.compute(cache, "resid_out_1")["logit_lens_resid_out_1"])
    assert direct.W_U.data_ptr() == model.hf_model.lm_head.weight.data_ptr()  # referenced, not copied
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        LogitLens(model.hf_model.lm_head, model.get_last_layernorm(), "m", model.model_config)
    with pytest.raises(ConfigError):
        lens.compute(cache, "resid_post_{i}")
    with pytest.raises(ConfigError):
        lens.compute(cache, "resid_out_1", token_directions=[1, 2])
    with pytest.raises(ConfigError):
        lens.compute({"resid_out_1": cache["resid_out_1"]}, "resid_out_1", norm_stats="last_layernorm")
    from easyroutine_dist import hooked_model

    monkeypatch.setattr(hooked_model.HookedModel, "from_pretrained", classmethod(lambda cls, name, **kw: model))
    assert LogitLens.from_model_name("anything").vocab_size == VOCAB


def test_no_graph_with_gradient_inputs():
    model = hooked("llama")
    cache = model.forward(BATCH, ["last"], extraction_config=ExtractionConfig(extract_resid_out=True,
                                                                             keep_gradient=True))
    assert cache["resid_out_1"].requires_grad
    out = LogitLens.from_model(model).compute(cache, "resid_out_1")["logit_lens_resid_out_1"]
    assert not out.requires_grad and out.grad_fn is None


class _Tok:
    """A character-level stand-in tokenizer for tiny models."""

    def __call__(self, text, return_tensors="pt"):
        ids = torch.tensor([[3 + (ord(c) % (VOCAB - 3)) for c in text]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def encode(self, text, add_special_tokens=False):
        return self(text)["input_ids"][0].tolist()

    def decode(self, ids):
        return "".join(f"<{int(i)}>" for i in ids)


def test_table_heatmap_and_example(tmp_path):
    model, cache, lens = _run("qwen2")
    rows = lens_table(lens, cache, "resid_out_{i}", k=3, example=1, tokenizer=_Tok())
    assert len(rows) == 3 * 7 and [r["layer"] for r in rows] == [i for i in range(3) for _ in range(7)]
    for r in rows:  # each row: the top 3 of the hand-computed lens of example 1 at that slot, decoded
        want = _hand_lens(model, cache[f"resid_out_{r['layer']}"][1, r["position"]]).softmax(-1).topk(3)
        assert r["probs"] == pytest.approx(want.values.tolist(), rel=1e-5, abs=1e-7)
        if VALID[1, r["position"]]:  # a padded slot is all zeros: its logits tie, so its ids are arbitrary
            assert r["ids"] == want.indices.tolist()
        assert r["tokens"] == [_Tok().decode([i]) for i in r["ids"]]
    assert lens_table(lens, cache, "resid_out_{i}", k=2, as_rich=True).row_count == 3 * 7
    png = plot_lens_heatmap(lens, cache, tmp_path / "h" / "lens.png", tokenizer=_Tok())
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "logit_lens_plot", Path(__file__).resolve().parents[1] / "examples" / "logit_lens_plot.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    logit_lens_report = example.logit_lens_report

    model.hf_tokenizer = _Tok()
    try:
        report = logit_lens_report(model, prompt="abcd", target=" x", path=str(tmp_path / "ex.png"), k=5)
    finally:
        model.hf_tokenizer = None
    assert set(report) >= {"table", "png", "first_layer_in_topk", "top_token", "model_top_token"}
    ids = _Tok()("abcd")["input_ids"]
    with torch.no_grad():
        out = model.hf_model(input_ids=ids, output_hidden_states=True)
    assert report["model_top_token"] == _Tok().decode([int(out.logits[0, -1].argmax())])  # HF's own top-1
    assert report["top_token"] == report["model_top_token"]
    target = _Tok().encode(" x")[0]
    L = model.model_config.num_hidden_layers
    lens_at_last = [_hand_lens(model, out.hidden_states[i + 1][0, -1]) for i in range(L - 1)] + [out.logits[0, -1]]
    first = next((i for i, lg in enumerate(lens_at_last) if target in lg.topk(5).indices.tolist()), None)
    assert report["first_layer_in_topk"] == first
    assert open(report["png"], "rb").read(4) == b"\x89PNG"
