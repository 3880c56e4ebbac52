"""HookedModel against oracles we did not write: HF hidden states, HF attention weights, module weights."""

from __future__ import annotations

import pytest
import torch

from easyroutine_dist.errors import ConfigError, PositionError, UnsupportedArchitectureError
from easyroutine_dist.interpretability import ExtractionConfig, HookedModel
from easyroutine_dist.positions import spec_key as _key
from tests.models import ARCHS, VOCAB, eager, hook_snapshot, hooked, random_batch, tiny_model, unpadded_rows

ALL_CFG = ExtractionConfig(
    extract_embed=True, extract_resid_in=True, extract_resid_out=True, extract_attn_out=True,
    extract_mlp_out=True, extract_attn_in=True, extract_resid_in_post_layernorm=True, extract_values=True,
    extract_keys=True, extract_queries=True, extract_head_values=True, extract_head_keys=True,
    extract_head_queries=True, extract_head_out=True, extract_head_values_projected=True,
    extract_last_layernorm=True, save_input_ids=True,
)


def _hf_eager(model, **kw):
    with eager(model), torch.no_grad():
        return model(**kw)


def _hf_hidden(model, batch):
    """Plain HF forward of a padded batch (position ids counted over real tokens): its output with hidden states."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                     output_hidden_states=True, use_cache=False)


def _last_real(batch):
    """Index ``[batch]`` of each row's last real token in the padded sequence."""
    mask = batch["attention_mask"]
    return mask.argmax(-1) + mask.sum(-1) - 1


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_stream_matches_hf_hidden_states(arch):
    hm = hooked(arch)
    x = {"input_ids": torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))}
    cache = hm.forward(x, ["all"], extraction_config=ALL_CFG)
    with torch.no_grad():
        out = hm.hf_model(**x, output_hidden_states=True)
    L = hm.model_config.num_hidden_layers
    for i in range(L):
        torch.testing.assert_close(cache[f"resid_in_{i}"], out.hidden_states[i], rtol=0, atol=0)
        if i < L - 1:
            torch.testing.assert_close(cache[f"resid_out_{i}"], out.hidden_states[i + 1], rtol=0, atol=0)
    # transformers v5: the last hidden state is already final-normed; resid_out is the input of that norm
    with torch.no_grad():
        normed = hm.get_last_layernorm()(cache[f"resid_out_{L - 1}"])
    torch.testing.assert_close(normed, out.hidden_states[L], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache["last_layernorm"], cache[f"resid_out_{L - 1}"])
    torch.testing.assert_close(cache["logits"], out.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache["input_embeddings"], out.hidden_states[0], rtol=0, atol=0)
    assert torch.equal(cache["input_ids"], x["input_ids"])


@pytest.mark.parametrize("arch", ARCHS)
def test_branch_outputs_sum_to_the_residual(arch):
    hm = hooked(arch)
    cfg = ExtractionConfig(extract_resid_in=True, extract_resid_out=True, extract_attn_out=True,
                           extract_mlp_out=True, extract_resid_mid=hm.spec.mid is not None)
    cache = hm.forward(random_batch(), ["all"], extraction_config=cfg)
    for i in range(hm.model_config.num_hidden_layers):
        total = cache[f"resid_in_{i}"] + cache[f"attn_out_{i}"] + cache[f"mlp_out_{i}"]
        torch.testing.assert_close(total, cache[f"resid_out_{i}"], rtol=1e-5, atol=1e-5)
        if hm.spec.mid is not None:
            torch.testing.assert_close(cache[f"resid_mid_{i}"], cache[f"resid_in_{i}"] + cache[f"attn_out_{i}"],
                                       rtol=1e-6, atol=1e-6)


def test_parallel_residual_has_no_resid_mid():
    with pytest.raises(ConfigError, match="parallel residual"):
        hooked("gpt_neox").forward(random_batch(), ["last"], extraction_config=ExtractionConfig(extract_resid_mid=True))


def _qkv_oracle(hm, layer, attn_in):
    """q, k, v ``[b, s, heads*hd]`` recomputed from the projection weights with plain torch."""
    blk = hm.hf_model.get_submodule(f"{hm.spec.layers}.{layer}")
    H, KV, hd = hm.model_config.num_attention_heads, hm.model_config.num_key_value_heads, hm.model_config.head_dim
    if hm.spec.qkv_layout == "separate":
        return [torch.nn.functional.linear(attn_in, m.weight, m.bias) for m in
                (blk.get_submodule(hm.spec.q_proj), blk.get_submodule(hm.spec.k_proj), blk.get_submodule(hm.spec.v_proj))]
    fused = blk.get_submodule(hm.spec.qkv_proj)
    if hm.spec.qkv_layout == "gpt2":  # Conv1D: x @ W + b, W [in, out]
        return list((attn_in @ fused.weight + fused.bias).split(H * hd, dim=-1))
    qkv = torch.nn.functional.linear(attn_in, fused.weight, fused.bias)
    if hm.spec.qkv_layout == "phi3":
        return list(qkv.split([H * hd, KV * hd, KV * hd], dim=-1))
    per_head = qkv.view(*qkv.shape[:-1], H, 3, hd)  # neox: per head [q|k|v]
    return [per_head[..., j, :].reshape(*qkv.shape[:-1], H * hd) for j in range(3)]


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_match_weights_and_attention(arch):
    """values/keys/queries from the weights; GQA head->group mapping; head_out == (pattern @ V_g) W_o[h]."""
    hm = hooked(arch)
    x = {"input_ids": torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))}
    cfg = ExtractionConfig(extract_attn_in=True, extract_values=True, extract_keys=True, extract_queries=True,
                           extract_head_values=True, extract_head_keys=True, extract_head_queries=True,
                           extract_head_out=True, extract_attn_out=True, extract_head_values_projected=True)
    cache = hm.forward(x, ["all"], extraction_config=cfg)
    hf = _hf_eager(hm.hf_model, **x, output_attentions=True)
    H, KV, hd = hm.model_config.num_attention_heads, hm.model_config.num_key_value_heads, hm.model_config.head_dim
    group = H // KV
    for i in range(hm.model_config.num_hidden_layers):
        with torch.no_grad():
            q, k, v = _qkv_oracle(hm, i, cache[f"attn_in_{i}"])
        torch.testing.assert_close(cache[f"queries_L{i}"], q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache[f"keys_L{i}"], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache[f"values_L{i}"], v, rtol=1e-5, atol=1e-5)
        o_proj = hm.hf_model.get_submodule(f"{hm.spec.layers}.{i}.{hm.spec.o_proj}")
        w_o = o_proj.weight.t() if hm.spec.conv1d else o_proj.weight  # [d, H*hd]
        total = torch.zeros_like(cache[f"head_out_L{i}H0"])
        for h in range(H):
            g = h // group
            torch.testing.assert_close(cache[f"head_queries_L{i}H{h}"], q[..., h * hd:(h + 1) * hd])
            torch.testing.assert_close(cache[f"head_values_L{i}H{h}"], v[..., g * hd:(g + 1) * hd],
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache[f"head_keys_L{i}H{h}"], k[..., g * hd:(g + 1) * hd],
                                       rtol=1e-5, atol=1e-5)
            z = hf.attentions[i][:, h] @ v[..., g * hd:(g + 1) * hd]  # [b, s, hd]
            oracle = z @ w_o[:, h * hd:(h + 1) * hd].t()
            torch.testing.assert_close(cache[f"head_out_L{i}H{h}"], oracle, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cache[f"projected_value_L{i}H{h}"],
                                       v[..., g * hd:(g + 1) * hd] @ w_o[:, h * hd:(h + 1) * hd].t(),
                                       rtol=1e-4, atol=1e-5)
            total = total + cache[f"head_out_L{i}H{h}"]
        if o_proj.bias is not None:
            total = total + o_proj.bias
        if hm.spec.attn_out == hm.spec.attn:  # the o_proj output is added to the residual as is
            torch.testing.assert_close(total, cache[f"attn_out_{i}"], rtol=1e-4, atol=1e-5)
        else:  # Gemma-2/3, OLMo-2: the branch norm is applied to the sum of the heads
            norm = hm.hf_model.get_submodule(f"{hm.spec.layers}.{i}.{hm.spec.attn_out}")
            with torch.no_grad():
                torch.testing.assert_close(norm(total), cache[f"attn_out_{i}"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_patterns_equal_hf_attention_weights_and_keep_fast_attention(arch):
    hm = hooked(arch)
    batch = random_batch(2, 6, seed=4, padding_side="left", lengths=[6, 6])
    cache = hm.forward(batch, ["all"], extraction_config=ExtractionConfig(extract_attn_pattern=True))
    hf = _hf_eager(hm.hf_model, **batch, output_attentions=True)
    for i in range(hm.model_config.num_hidden_layers):
        for h in range(hm.model_config.num_attention_heads):
            torch.testing.assert_close(cache[f"pattern_L{i}H{h}"], hf.attentions[i][:, h], rtol=1e-5, atol=1e-6)
    assert hm.hf_model.config._attn_implementation == tiny_model(arch).config._attn_implementation
    assert hm.hf_model.config._attn_implementation != "eager" or arch in ("gemma2", "gemma3_text")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_same_numbers_as_each_prompt_alone(arch, side):
    hm = hooked(arch)
    batch = random_batch(3, 7, seed=5, padding_side=side, lengths=[7, 4, 5])
    cfg = ExtractionConfig(extract_resid_out=True, extract_head_out=True, extract_values=True,
                           extract_attn_pattern=True, extract_mlp_out=True)
    positions = ["first", "last", "last-2", (1, -1), 2]
    cache = hm.forward(batch, positions, extraction_config=cfg)
    for r, alone in enumerate(unpadded_rows(batch)):
        single = hm.forward(alone, positions, extraction_config=cfg)
        assert single["token_dict"] == {k: [v[r]] for k, v in cache["token_dict"].items()}
        # variable-length groups are padded to the longest row, so compare slot by slot
        mine = [s for spec in positions for s in cache["mapping_index"][_key(spec)][:len(single["mapping_index"][_key(spec)])]]
        theirs = [s for spec in positions for s in single["mapping_index"][_key(spec)]]
        for key in single.tensor_keys():
            got = cache[key][r:r + 1, mine]
            got = got[:, :, mine] if key.startswith("pattern_") else got
            torch.testing.assert_close(got, single[key][:, theirs], rtol=1e-4, atol=1e-5, msg=f"{arch} {side} {key} row {r}")


def test_all_positions_with_different_lengths_are_zero_padded():
    hm = hooked("llama")
    batch = random_batch(2, 5, seed=6, padding_side="left", lengths=[5, 3])
    cache = hm.forward(batch, ["all"], extraction_config=ExtractionConfig(extract_resid_out=True))
    assert cache["resid_out_0"].shape[:2] == (2, 5)
    assert cache["token_dict"]["all"] == [[0, 1, 2, 3, 4], [0, 1, 2]]
    assert torch.count_nonzero(cache["resid_out_0"][1, 3:]) == 0
    alone = hm.forward(unpadded_rows(batch)[1], ["all"], extraction_config=ExtractionConfig(extract_resid_out=True))
    torch.testing.assert_close(cache["resid_out_0"][1, :3], alone["resid_out_0"][0], rtol=1e-5, atol=1e-5)


def test_hooks_are_removed_after_an_error_inside_the_forward():
    hm = hooked("llama")
    layer = hm.hf_model.model.layers[1]

    def boom(*_a, **_k):
        raise RuntimeError("injected")

    before = hook_snapshot(hm.hf_model)
    handle = layer.mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="injected"):
        hm.forward(random_batch(), ["last"], extraction_config=ALL_CFG)
    handle.remove()
    assert hook_snapshot(hm.hf_model) == before
    assert hm.hf_model.config._attn_implementation == "sdpa"
    batch = random_batch()
    cache = hm.forward(batch, ["last"], extraction_config=ExtractionConfig(extract_resid_out=True))
    hf = _hf_hidden(hm.hf_model, batch).hidden_states[1]  # nothing left over alters the numbers
    torch.testing.assert_close(cache["resid_out_0"][:, 0], hf[torch.arange(3), _last_real(batch)], rtol=0, atol=0)


def test_eager_switch_is_undone_after_an_error():
    hm = hooked("llama")
    with pytest.raises(ConfigError, match="outside"):
        hm.forward({"input_ids": torch.full((1, 3), VOCAB + 5)}, ["last"])

    def boom(*_a, **_k):
        raise RuntimeError("injected")

    handle = hm.hf_model.model.layers[2].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            hm.forward(random_batch(), ["last"], extraction_config=ExtractionConfig(extract_attn_pattern=True))
    finally:
        handle.remove()
    assert hm.hf_model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("bad, err, match", [
    (dict(target_token_positions=["lats"]), PositionError, "lats"),
    (dict(target_token_positions=[9]), PositionError, "row"),
    (dict(inputs={"input_ids": torch.zeros(0, 0, dtype=torch.long)}), ConfigError, "empty"),
    (dict(inputs={"input_ids": torch.tensor([[5, 6, 0], [5, 6, 7]])}), ConfigError, "attention_mask"),
    (dict(extraction_config="resid"), ConfigError, "ExtractionConfig"),
])
def test_bad_input_is_refused_before_the_forward(bad, err, match):
    hm = hooked("llama")
    hm.hf_tokenizer = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 2})()
    calls = []
    handle = hm.hf_model.register_forward_pre_hook(lambda *a: calls.append(1))
    kwargs = dict(inputs=random_batch(2, 4), target_token_positions=["last"],
                  extraction_config=ExtractionConfig(extract_resid_out=True))
    kwargs.update(bad)
    try:
        with pytest.raises(err, match=match):
            hm.forward(**kwargs)
    finally:
        handle.remove()
        hm.hf_tokenizer = None
    assert calls == []


def test_unknown_config_field_and_unknown_architecture_are_refused():
    with pytest.raises(ConfigError, match="extract_resid_outt"):
        ExtractionConfig(extract_resid_outt=True)
    from transformers import AutoConfig, AutoModelForCausalLM

    # outside the registry and not the standard layout (fused c_attn, ln_1/ln_2): refused, not inferred (issue 12)
    cfg = AutoConfig.for_model("gpt_bigcode", vocab_size=32, n_layer=1, n_embd=16, n_head=2, n_positions=32,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with pytest.raises(UnsupportedArchitectureError, match="register"):
        HookedModel(AutoModelForCausalLM.from_config(cfg))
    gpt2 = tiny_model("gpt2")
    gpt2.config.add_cross_attention = True
    try:
        with pytest.raises(UnsupportedArchitectureError, match="add_cross_attention"):
            HookedModel(gpt2)
    finally:
        gpt2.config.add_cross_attention = False


def test_registering_a_new_architecture():
    from easyroutine_dist import architectures

    model = tiny_model("llama", seed=7)
    model.config.model_type = "my_llama"
    try:
        assert HookedModel(model).spec.inferred  # unknown type, standard layout: accepted by proof (issue 12)
        architectures.register("my_llama", architectures.REGISTRY["llama"])
        assert not HookedModel(model).spec.inferred  # a registered entry is used as written
        with pytest.raises(UnsupportedArchitectureError, match="already registered"):
            architectures.register("my_llama", architectures.REGISTRY["llama"])
        batch = random_batch()
        cache = HookedModel(model).forward(batch, ["last"], extraction_config=ExtractionConfig(extract_resid_out=True))
        hidden = _hf_hidden(model, batch).hidden_states
        last = _last_real(batch)
        for i in range(2):  # the registered spec hooks the right modules: HF's own hidden states
            torch.testing.assert_close(cache[f"resid_out_{i}"][:, 0], hidden[i + 1][torch.arange(3), last],
                                       rtol=0, atol=0)
        with torch.no_grad():
            normed = model.model.norm(cache["resid_out_2"][:, 0])
        torch.testing.assert_close(normed, hidden[3][torch.arange(3), last], rtol=1e-6, atol=1e-6)
    finally:
        architectures.REGISTRY.pop("my_llama", None)
        model.config.model_type = "llama"


def test_keep_gradient_on_input_embeddings():
    """The gradient kept on input_embeddings equals the gradient of the same loss through HF's inputs_embeds."""
    hm = hooked("llama")
    batch = random_batch()
    cache = hm.forward(batch, ["last"], extraction_config=ExtractionConfig(extract_embed=True, keep_gradient=True))
    cache["logits"][..., 5].sum().backward()
    hm.hf_model.zero_grad(set_to_none=True)
    mask, last = batch["attention_mask"], _last_real(batch)
    emb = hm.hf_model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    out = hm.hf_model(inputs_embeds=emb, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    out.logits[torch.arange(3), last, 5].sum().backward()
    hm.hf_model.zero_grad(set_to_none=True)
    want = emb.grad[torch.arange(3), last]
    assert want.abs().sum() > 0
    torch.testing.assert_close(cache["input_embeddings"].grad[:, 0], want, rtol=1e-5, atol=1e-7)


def test_avg_and_avg_over_example():
    hm = hooked("qwen2")
    batch = random_batch(3, 6, seed=8, padding_side="right", lengths=[6, 6, 6])
    full = hm.forward(batch, ["last", (0, 3)], extraction_config=ExtractionConfig(extract_resid_out=True))
    avg = hm.forward(batch, ["last", (0, 3)], extraction_config=ExtractionConfig(extract_resid_out=True, avg=True))
    torch.testing.assert_close(avg["resid_out_1"][:, 1], full["resid_out_1"][:, 1:4].mean(1))
    torch.testing.assert_close(avg["resid_out_1"][:, 0], full["resid_out_1"][:, 0])
    ex = hm.forward(batch, ["last"], extraction_config=ExtractionConfig(extract_resid_out=True, avg_over_example=True))
    torch.testing.assert_close(ex["resid_out_1"], full["resid_out_1"][:, :1].mean(0, keepdim=True))


def test_pattern_averaging_over_position_groups():
    hm = hooked("llama")
    batch = random_batch(1, 6, seed=9, lengths=[6])
    cfg = dict(extract_attn_pattern=True, attn_heads=[{"layer": 1, "head": 2}])
    full = hm.forward(batch, ["first", (1, 4)], extraction_config=ExtractionConfig(**cfg))
    mean = hm.forward(batch, ["first", (1, 4)], extraction_config=ExtractionConfig(**cfg, attn_pattern_avg="mean"))
    assert list(full.keys())[:1] == ["pattern_L1H2"]
    p = _hf_eager(hm.hf_model, **batch, output_attentions=True).attentions[1][:, 2]  # HF's own [1, q, k]
    assert mean["pattern_L1H2"].shape == (1, 2, 2)
    torch.testing.assert_close(mean["pattern_L1H2"][0, 0, 0], p[0, 0, 0])
    torch.testing.assert_close(mean["pattern_L1H2"][0, 0, 1], p[0, 0, 1:4].mean())
    torch.testing.assert_close(mean["pattern_L1H2"][0, 1, 0], p[0, 1:4, 0].mean())
    torch.testing.assert_close(mean["pattern_L1H2"][0, 1, 1], p[0, 1:4, 1:4].mean())


def test_extract_cache_over_a_generator_equals_the_forwards():
    hm = hooked("gpt2")
    batches = [random_batch(2, 5, seed=s, padding_side="left") for s in range(3)]
    for s, b in enumerate(batches):
        b["pivot_positions"] = [[2], [1]]
        b["labels"] = torch.tensor([s, s + 10])
    cfg = ExtractionConfig(extract_resid_out=True)
    cache = hm.extract_cache((b for b in batches), ["last", "inputs-partition-0"], extraction_config=cfg,
                             batch_saver=lambda b: {"labels": b["labels"]})
    row = 0
    for b in batches:  # each batch's HF hidden states at the tokens each group names (partition 0: before the pivot)
        hidden = _hf_hidden(hm.hf_model, b).hidden_states[2]
        starts, lengths = b["attention_mask"].argmax(-1).tolist(), b["attention_mask"].sum(-1).tolist()
        for r, (s, n, (pivot,)) in enumerate(zip(starts, lengths, b["pivot_positions"])):
            for group, positions in (("last", [n - 1]), ("inputs-partition-0", list(range(pivot)))):
                assert cache["token_dict"][group][row] == positions
                slots = cache["mapping_index"][group][:len(positions)]
                torch.testing.assert_close(cache["resid_out_1"][row, slots], hidden[r, [s + p for p in positions]],
                                           rtol=1e-5, atol=1e-5, msg=f"{group} row {row}")
            row += 1
    assert row == 6
    assert cache["labels"].tolist() == [0, 10, 1, 11, 2, 12]
    assert cache["metadata"]["n_examples"] == 6 and cache["metadata"]["model_name"] == "tiny-gpt2"
    assert cache["metadata"]["extraction_config"]["extract_resid_out"] is True
    assert len(cache["token_dict"]["last"]) == 6


def test_offloaded_model_gives_identical_activations(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    from transformers import AutoModelForCausalLM

    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map,
                                                     offload_folder=str(tmp_path / "off"))
    assert offloaded.model.layers[1].self_attn.o_proj.weight.device.type == "meta"
    cfg = ExtractionConfig(extract_resid_out=True, extract_head_out=True, extract_head_values_projected=True)
    a = HookedModel(model).forward(random_batch(), ["last", "first"], extraction_config=cfg)
    b = HookedModel(offloaded).forward(random_batch(), ["last", "first"], extraction_config=cfg)
    for key in a.tensor_keys():
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_head_and_last_layernorm_are_the_models_own(arch):
    hm = hooked(arch)
    assert hm.get_lm_head() is hm.hf_model.get_output_embeddings()
    assert hm.get_last_layernorm() is hm.hf_model.base_model.get_submodule(hm.spec.final_norm.split(".", 1)[1])


def test_from_pretrained_passes_device_map_and_dtype_through(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    tiny_model("qwen2").save_pretrained(tmp_path / "m")
    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    hm = HookedModel.from_pretrained(str(tmp_path / "m"), device_map="auto", dtype="bfloat16",
                                     max_memory={"cpu": "2GiB"}, attn_implementation="eager")
    assert seen["device_map"] == "auto" and seen["dtype"] == torch.bfloat16
    assert seen["max_memory"]["cpu"] in ("2GiB", 2 * 1024**3)  # transformers normalises it in place
    assert hm.hf_model.dtype == torch.bfloat16 and hm.model_config.num_key_value_heads == 2
    assert hm.hf_model.config._attn_implementation == "eager"
    batch = random_batch()
    ref = hooked("qwen2").forward(batch, ["last"], extraction_config=ExtractionConfig(extract_resid_out=True))
    got = hm.forward(batch, ["last"], extraction_config=ExtractionConfig(extract_resid_out=True))
    assert got["resid_out_1"].dtype == torch.bfloat16
    # the loaded bf16 model's own hidden states, read by plain HF
    bf16 = _hf_hidden(hm.hf_model, batch).hidden_states[2][torch.arange(3), _last_real(batch)]
    torch.testing.assert_close(got["resid_out_1"][:, 0], bf16, rtol=0, atol=0)
    # and the same weights as the float32 model: bf16 rounding only (a relative error bound zeros cannot meet)
    err = (got["resid_out_2"].float() - ref["resid_out_2"]).norm() / ref["resid_out_2"].norm()
    assert err < 0.03, err


def test_from_pretrained_refuses_unknown_architecture_before_loading_weights(tmp_path):
    from transformers import AutoConfig

    # not in the registry, and its module tree (built on the meta device) is not the standard layout
    AutoConfig.for_model("gpt_bigcode", vocab_size=32, n_layer=1, n_embd=16, n_head=2,
                         n_positions=32).save_pretrained(tmp_path / "moe")
    with pytest.raises(UnsupportedArchitectureError, match="gpt_bigcode"):
        HookedModel.from_pretrained(str(tmp_path / "moe"))  # no weights in the folder: would fail later otherwise


def test_extract_cache_accepts_a_dataloader():
    from torch.utils.data import DataLoader

    hm = hooked("llama")
    batches = [random_batch(2, 5, seed=s) for s in range(3)]
    loader = DataLoader(batches, batch_size=None)
    cache = hm.extract_cache(loader, ["last"], extraction_config=ExtractionConfig(extract_resid_out=True))
    assert cache["resid_out_0"].shape == (6, 1, 32) and cache["metadata"]["n_batches"] == 3
    want = torch.cat([_hf_hidden(hm.hf_model, b).hidden_states[1][torch.arange(2), _last_real(b)] for b in batches])
    torch.testing.assert_close(cache["resid_out_0"][:, 0], want, rtol=1e-5, atol=1e-6)


def test_predict_and_generate():
    hm = hooked("llama")
    hm.hf_tokenizer = type("Tok", (), {"decode": staticmethod(lambda ids: f"<{ids[0]}>"), "pad_token_id": 0,
                                       "eos_token_id": 2})()
    try:
        x = {"input_ids": torch.tensor([[5, 6, 7]])}
        probs = hm.predict(k=3, inputs=x)
        with torch.no_grad():
            logits = hm.hf_model(**x).logits[0, -1].softmax(-1)
        top = logits.topk(3)
        assert list(probs) == [f"<{int(i)}>" for i in top.indices]
        assert list(probs.values()) == pytest.approx(top.values.tolist(), rel=1e-5)
        out = hm.generate(x, max_new_tokens=3, do_sample=False)
        greedy = x["input_ids"]
        with torch.no_grad():
            for _ in range(3):  # greedy decoding by hand: argmax of HF's logits, no cache
                greedy = torch.cat([greedy, hm.hf_model(input_ids=greedy).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out, greedy) and int(out[0, 3]) == int(top.indices[0])
    finally:
        hm.hf_tokenizer = None
