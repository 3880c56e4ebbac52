"""Interventions against oracles built in this file with plain torch hooks on the HF modules (not our code)."""

from __future__ import annotations

import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.errors import ConfigError, PositionError
from easyroutine_dist.interpretability import Intervention
from tests.models import ARCHS, eager, hook_snapshot, hooked, random_batch

H, HD, D = 4, 8, 32  # tiny models: 4 query heads of width 8, d_model 32


# ------------------------------------------------------------------ oracle plumbing (independent of the package)
def _layers(hf):
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        try:
            return hf.get_submodule(path)
        except AttributeError:
            continue
    raise AssertionError("unknown layout")


def _attn(layer):
    for name in ("self_attn", "attn", "attention"):
        if hasattr(layer, name):
            return getattr(layer, name)
    raise AssertionError("no attention module")


def _o_proj(layer):
    a = _attn(layer)
    for name in ("o_proj", "c_proj", "dense"):
        if hasattr(a, name):
            return getattr(a, name)
    raise AssertionError("no o_proj")


def _head_dim(hf):
    return getattr(hf.config, "head_dim", None) or D // H


def _n_kv(hf):
    return getattr(hf.config, "num_key_value_heads", None) or H


def _v_site(hf, layer, h):
    """(module, column index tensor) of the value vector kv-group of query head h, laid out by hand."""
    a = _attn(layer)
    hd, kv = _head_dim(hf), _n_kv(hf)
    g = h // (H // kv)
    mt = hf.config.model_type
    if mt == "gpt2":
        return a.c_attn, torch.arange(2 * H * hd + g * hd, 2 * H * hd + (g + 1) * hd)
    if mt == "gpt_neox":
        return a.query_key_value, torch.arange(g * 3 * hd + 2 * hd, g * 3 * hd + 3 * hd)
    if mt == "phi3":
        start = H * hd + kv * hd + g * hd
        return a.qkv_proj, torch.arange(start, start + hd)
    return a.v_proj, torch.arange(g * hd, (g + 1) * hd)


def _spans(batch):
    m = batch["attention_mask"]
    return m.argmax(-1).tolist(), m.sum(-1).tolist()


def _oracle(model, batch, hooks):
    """Logits ``[b, seq, V]`` of the HF model with ``hooks`` = [(module, "pre"|"out", fn)] registered."""
    hf = model.hf_model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    handles = []
    for mod, when, fn in hooks:
        if when == "pre":
            handles.append(mod.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            handles.append(mod.register_forward_hook(fn, with_kwargs=True))
    try:
        with torch.no_grad():
            return hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                      use_cache=False).logits
    finally:
        for hd in handles:
            hd.remove()


def _first(t):
    return t[0] if isinstance(t, tuple) else t


def _with_first(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _pre_edit(fn):
    """A pre-hook that edits the first tensor input (positional or hidden_states=)."""
    def hook(mod, args, kwargs):
        if args:
            return (fn(args[0].clone()), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"].clone())}
    return hook


def _out_edit(fn):
    def hook(mod, args, kwargs, output):
        return _with_first(output, fn(_first(output).clone()))
    return hook


def _compare(cache_logits, oracle_logits, batch, atol=2e-5):
    """Our logits at ["all"] (slot j of row r = real token j) against the oracle's at the same tokens."""
    starts, lens = _spans(batch)
    for r, (s, n) in enumerate(zip(starts, lens)):
        torch.testing.assert_close(cache_logits[r, :n], oracle_logits[r, s:s + n], atol=atol, rtol=1e-4)


def _ours(model, batch, ivs, cfg=None):
    return model.forward(batch, ["all"], interventions=ivs, extraction_config=cfg or ExtractionConfig())


BATCH = random_batch(batch=3, seq=7, seed=1)
OTHER = random_batch(batch=3, seq=7, seed=5)  # same lengths, other tokens
RIGHT = random_batch(batch=3, seq=7, seed=2, padding_side="right")


# ------------------------------------------------------------------ residual-style keys
@pytest.mark.parametrize("arch", ARCHS)
def test_zero_residual_matches_oracle(arch):
    model = hooked(arch)
    for batch in (BATCH, RIGHT):
        starts, lens = _spans(batch)

        def zero_last(t):
            for r, (s, n) in enumerate(zip(starts, lens)):
                t[r, s + n - 1] = 0
            return t

        oracle = _oracle(model, batch, [(_layers(model.hf_model)[1], "out", _out_edit(zero_last))])
        ours = _ours(model, batch, [Intervention("full", "resid_out_1", ["last"], "ablation")],
                     ExtractionConfig(extract_resid_out=True))
        _compare(ours["logits"], oracle, batch)
        # documented order: extraction of the edited key sees the edited value
        assert ours["resid_out_1"][torch.arange(3), torch.tensor(lens) - 1].abs().max() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_from_second_prompt_matches_oracle(arch):
    model = hooked(arch)
    layer0 = _layers(model.hf_model)[0]
    starts, lens = _spans(BATCH)
    captured = {}

    def grab(mod, args, kwargs, output):
        captured["x"] = _first(output).detach().clone()

    _oracle(model, OTHER, [(layer0, "out", grab)])

    def patch_last(t):
        for r, (s, n) in enumerate(zip(starts, lens)):
            t[r, s + n - 1] = captured["x"][r, s + n - 1]
        return t

    oracle = _oracle(model, BATCH, [(layer0, "out", _out_edit(patch_last))])
    source = model.forward(OTHER, ["last"], extraction_config=ExtractionConfig(extract_resid_out=True))
    ours = _ours(model, BATCH, [Intervention("full", "resid_out_0", ["last"], source["resid_out_0"])])
    _compare(ours["logits"], oracle, BATCH)


@pytest.mark.parametrize("arch", ARCHS)
def test_steering_vector_matches_oracle(arch):
    model = hooked(arch)
    vec = torch.randn(D, generator=torch.Generator().manual_seed(3))
    starts, _ = _spans(BATCH)

    def add(t):
        for r, s in enumerate(starts):
            t[r, s + 1:s + 3] += vec
        return t

    oracle = _oracle(model, BATCH, [(_layers(model.hf_model)[2], "pre", _pre_edit(add))])
    iv = Intervention("full", "resid_in_2", [(1, 3)], "steering", steering_vector=vec)
    _compare(_ours(model, BATCH, [iv])["logits"], oracle, BATCH)


# ------------------------------------------------------------------ heads
@pytest.mark.parametrize("arch", ARCHS)
def test_ablating_one_head_changes_only_that_head(arch):
    model = hooked(arch)
    hd = _head_dim(model.hf_model)
    starts, lens = _spans(BATCH)

    def zero_head(t):
        for r, (s, n) in enumerate(zip(starts, lens)):
            t[r, s:s + n, 2 * hd:3 * hd] = 0
        return t

    oracle = _oracle(model, BATCH, [(_o_proj(_layers(model.hf_model)[1]), "pre", _pre_edit(zero_head))])
    cfg = ExtractionConfig(extract_head_out=True, attn_heads=[{"layer": 1, "head": h} for h in range(H)])
    clean = _ours(model, BATCH, None, cfg)
    ours = _ours(model, BATCH, [Intervention("full", "head_out_L1H2", ["all"], "ablation")], cfg)
    _compare(ours["logits"], oracle, BATCH)
    for h in (0, 1, 3):
        torch.testing.assert_close(ours[f"head_out_L1H{h}"], clean[f"head_out_L1H{h}"])
    assert ours["head_out_L1H2"].abs().max() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_head_values_honour_head_index_and_gqa(arch):
    model = hooked(arch)
    module, cols = _v_site(model.hf_model, _layers(model.hf_model)[1], 3)

    def half(t):
        t[..., cols] *= 0.5  # every real position (padding is masked out of attention anyway)
        return t

    oracle = _oracle(model, BATCH, [(module, "out", _out_edit(half))])
    iv = Intervention("full", "head_values_L1H3", ["all"], "ablation", multiplication_value=0.5)
    _compare(_ours(model, BATCH, [iv])["logits"], oracle, BATCH)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "phi3", "gemma2"])
def test_head_out_patch_and_steering(arch):
    model = hooked(arch)
    hd = _head_dim(model.hf_model)
    o_proj = _o_proj(_layers(model.hf_model)[1])
    captured = {}

    def grab(mod, args, kwargs):
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    _oracle(model, OTHER, [(o_proj, "pre", grab)])
    starts, lens = _spans(BATCH)

    def patch(t):
        for r, (s, n) in enumerate(zip(starts, lens)):
            t[r, s:s + n, 0:hd] = captured["x"][r, s:s + n, 0:hd]
        return t

    oracle = _oracle(model, BATCH, [(o_proj, "pre", _pre_edit(patch))])
    src = model.forward(OTHER, ["all"], extraction_config=ExtractionConfig(
        extract_head_out=True, attn_heads=[{"layer": 1, "head": 0}]))
    ours = _ours(model, BATCH, [Intervention("full", "head_out_L1H0", ["all"], src["head_out_L1H0"])])
    _compare(ours["logits"], oracle, BATCH, atol=1e-4)

    vec = torch.randn(D, generator=torch.Generator().manual_seed(4))

    def steer(t):
        for r, (s, n) in enumerate(zip(starts, lens)):
            t[r, s + n - 1] += vec
        return t

    oracle = _oracle(model, BATCH, [(o_proj, "out", _out_edit(steer))])
    ours = _ours(model, BATCH, [Intervention("full", "head_out_L1H0", ["last"], "steering", steering_vector=vec)])
    _compare(ours["logits"], oracle, BATCH)


# ------------------------------------------------------------------ attention patterns
def _capture_pattern_inputs(model, batch, layer_idx, h):
    """Eager attention weights of ``layer_idx`` and the value vectors of head ``h`` ``[b, seq, hd]``."""
    hf = model.hf_model
    layer = _layers(hf)[layer_idx]
    v_mod, cols = _v_site(hf, layer, h)
    got = {}

    def grab_w(mod, args, kwargs, output):
        got["w"] = output[1].detach().clone()

    def grab_v(mod, args, kwargs, output):
        got["v"] = _first(output)[..., cols].detach().clone()

    with eager(hf):
        _oracle(model, batch, [(_attn(layer), "out", grab_w), (v_mod, "out", grab_v)])
    return got["w"], got["v"]


@pytest.mark.parametrize("arch", ARCHS)
def test_pattern_columns_ablation_with_renormalisation_matches_oracle(arch):
    model = hooked(arch)
    hd, h = _head_dim(model.hf_model), 1
    w, v = _capture_pattern_inputs(model, BATCH, 1, h)
    p = w[:, h].clone()  # [b, q, k]
    starts, lens = _spans(BATCH)
    for r, (s, n) in enumerate(zip(starts, lens)):
        k = s + 1  # real token 1 of the row
        for q in range(k, s + n):  # causal: queries before it cannot attend to it
            p[r, q, k] = 0
            p[r, q] /= p[r, q].sum()
    head_out = p @ v  # [b, q, hd]

    def replace(t):
        t[..., h * hd:(h + 1) * hd] = head_out
        return t

    oracle = _oracle(model, BATCH, [(_o_proj(_layers(model.hf_model)[1]), "pre", _pre_edit(replace))])
    impl = model.hf_model.config._attn_implementation
    iv = Intervention("columns", f"pattern_L1H{h}", [1], "ablation", apply_softmax=True)
    ours = _ours(model, BATCH, [iv], ExtractionConfig(extract_attn_pattern=True,
                                                      attn_heads=[{"layer": 1, "head": h}]))
    _compare(ours["logits"], oracle, BATCH)
    # extraction after the intervention sees the edited pattern: column 1 zero, rows still sum to 1
    pat = ours[f"pattern_L1H{h}"]
    assert pat[:, :, 1].abs().max() == 0
    for r, n in enumerate(lens):
        torch.testing.assert_close(pat[r, :n, :n].sum(-1), torch.ones(n))
    assert model.hf_model.config._attn_implementation == impl
    assert _attn(_layers(model.hf_model)[1]).config is model.hf_model.config


def _renormalised_pattern_oracle(model, batch, layer, h, edit_row):
    """Logits of the HF model whose head ``h`` of ``layer`` reads the eager pattern edited by ``edit_row(p_r, s, n)``
    (in place, on row r's ``[q, k]`` probabilities, real tokens at s..s+n-1)."""
    hd = _head_dim(model.hf_model)
    w, v = _capture_pattern_inputs(model, batch, layer, h)
    p = w[:, h].clone()
    for r, (s, n) in enumerate(zip(*_spans(batch))):
        edit_row(p[r], s, n)
    head_out = p @ v

    def replace(t):
        t[..., h * hd:(h + 1) * hd] = head_out
        return t

    return _oracle(model, batch, [(_o_proj(_layers(model.hf_model)[layer]), "pre", _pre_edit(replace))])


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_pre_softmax_minus_inf_equals_post_softmax_zero_with_renorm(arch):
    model = hooked(arch)
    pre = Intervention("grid_pre_softmax", "pattern_L2H3", (["last"], [0, 2]), torch.full((1, 2), -1e9))
    post = Intervention("grid", "pattern_L2H3", (["last"], [0, 2]), "ablation", apply_softmax=True)

    def zero_0_and_2_of_last(p, s, n):  # the last real query row: keys at real tokens 0 and 2 zeroed, renormalised
        q = s + n - 1
        p[q, [s, s + 2]] = 0
        p[q] /= p[q].sum()

    oracle = _renormalised_pattern_oracle(model, BATCH, 2, 3, zero_0_and_2_of_last)
    a = _ours(model, BATCH, [pre])["logits"]
    b = _ours(model, BATCH, [post])["logits"]
    _compare(b, oracle, BATCH)
    _compare(a, oracle, BATCH)
    assert (a - _ours(model, BATCH, None)["logits"]).abs().max() > 1e-4


def test_pattern_rows_scaling_and_patch_tensor():
    model = hooked("llama")
    cfg = ExtractionConfig(extract_attn_pattern=True, attn_heads=[{"layer": 0, "head": 2}])
    hf_pattern = _capture_pattern_inputs(model, BATCH, 0, 2)[0][:, 2]  # HF eager weights [b, q, k]

    def halve_last_row(p, s, n):
        p[s + n - 1] *= 0.5

    ours = _ours(model, BATCH, [Intervention("rows", "pattern_L0H2", ["last"], "ablation", multiplication_value=0.5)],
                 cfg)
    _compare(ours["logits"], _renormalised_pattern_oracle(model, BATCH, 0, 2, halve_last_row), BATCH)
    starts, lens = _spans(BATCH)
    for r, (s, n) in enumerate(zip(starts, lens)):  # the extracted pattern is the edited one
        real = hf_pattern[r, s:s + n, s:s + n]
        torch.testing.assert_close(ours["pattern_L0H2"][r, n - 1, :n], real[n - 1] * 0.5, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours["pattern_L0H2"][r, :n - 1, :n], real[:n - 1], rtol=1e-5, atol=1e-6)
    # a tensor patch replaces the selected entries (rows x columns of the grid), nothing renormalised
    patch = torch.tensor([[0.25, 0.75]])

    def set_last_row(p, s, n):
        p[s + n - 1, s], p[s + n - 1, s + n - 1] = 0.25, 0.75

    out = _ours(model, BATCH, [Intervention("grid", "pattern_L0H2", (["last"], [0, "last"]), patch)], cfg)
    _compare(out["logits"], _renormalised_pattern_oracle(model, BATCH, 0, 2, set_last_row), BATCH)
    for r, n in enumerate(lens):
        torch.testing.assert_close(out["pattern_L0H2"][r, n - 1, [0, n - 1]], patch[0])


# ------------------------------------------------------------------ validation, persistence, generation
@pytest.mark.parametrize("iv, exc", [
    (Intervention("full", "resid_outt_1", ["last"]), ConfigError),
    (Intervention("full", "head_out_L0H9", ["last"]), ConfigError),
    (Intervention("full", "resid_out_7", ["last"]), ConfigError),
    (Intervention("full", "resid_out_1", ["last"], torch.zeros(D + 1)), ConfigError),
    (Intervention("full", "head_values_L0H1", ["last"], torch.zeros(D)), ConfigError),
    (Intervention("full", "resid_out_1", ["last"], torch.zeros(2, D)), ConfigError),
    (Intervention("full", "resid_out_1", ["last"], torch.zeros(5, 1, D)), ConfigError),
    (Intervention("columns", "resid_out_1", ["last"]), ConfigError),
    (Intervention("full", "pattern_L0H0", ["last"]), ConfigError),
    (Intervention("full", "resid_out_1", ["last"], "steering"), ConfigError),
    (Intervention("columns", "pattern_L0H0", ["last"], "steering", steering_vector=torch.zeros(D)), ConfigError),
    (Intervention("grid", "pattern_L0H0", ["last"]), ConfigError),
    (Intervention("grid", "pattern_L0H0", (["last"], [0]), torch.zeros(2, 2)), ConfigError),
    (Intervention("full", "projected_value_L0H0", ["last"]), ConfigError),
    (Intervention("full", "resid_out_1", ["last-0"]), PositionError),
])
def test_bad_interventions_fail_before_running(iv, exc):
    model = hooked("llama")

    before = hook_snapshot(model.hf_model)
    calls = []
    handle = model.hf_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(exc):
            model.forward(BATCH, ["all"], interventions=[iv])
    finally:
        handle.remove()
    assert calls == []
    assert hook_snapshot(model.hf_model) == before


def test_register_and_clean_interventions():
    model = hooked("qwen2")
    mlp0 = _layers(model.hf_model)[0].mlp
    starts, lens = _spans(BATCH)

    def zero_real(t):
        for r, (s, n) in enumerate(zip(starts, lens)):
            t[r, s:s + n] = 0
        return t

    ablated = _oracle(model, BATCH, [(mlp0, "out", _out_edit(zero_real))])
    plain = _oracle(model, BATCH, [])
    assert (ablated - plain).abs().max() > 1e-3  # the oracle's edit matters
    iv = Intervention("full", "mlp_out_0", ["all"], "ablation")
    _compare(_ours(model, BATCH, [iv])["logits"], ablated, BATCH)
    model.register_interventions([iv])
    try:
        _compare(_ours(model, BATCH, None)["logits"], ablated, BATCH)  # registered: applied without being passed
    finally:
        model.clean_interventions()
    _compare(_ours(model, BATCH, None)["logits"], plain, BATCH)  # cleaned: the plain model again


def test_generate_with_pattern_and_steering_interventions():
    """Greedy generation with interventions equals HF generate with the same edits made by hand-written hooks on
    the prompt pass (interventions are prompt-only, see interventions.py), and differs from plain generation."""
    model = hooked("llama")
    hf, hd, h = model.hf_model, _head_dim(model.hf_model), 0
    vec = torch.linspace(-2.0, 2.0, D)
    starts, lens = _spans(BATCH)
    seq = BATCH["input_ids"].shape[1]
    # column 0 (each row's first real token) of layer 0 head 0 zeroed for every query, rows renormalised;
    # the first query row then sums to 0 and stays 0
    w, v = _capture_pattern_inputs(model, BATCH, 0, h)
    p = w[:, h].clone()
    for r, (s, n) in enumerate(zip(starts, lens)):
        p[r, s:s + n, s] = 0
        sums = p[r, s:s + n].sum(-1, keepdim=True)
        p[r, s:s + n] = torch.where(sums > 0, p[r, s:s + n] / sums.clamp(min=1e-30), p[r, s:s + n])
    head_out = p @ v

    def prompt_pass(fn):
        return lambda t: fn(t) if t.shape[1] == seq else t

    def replace_head(t):
        t[..., h * hd:(h + 1) * hd] = head_out
        return t

    def steer_last(t):
        for r, (s, n) in enumerate(zip(starts, lens)):
            t[r, s + n - 1] += vec
        return t

    layers = _layers(hf)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    handles = [_o_proj(layers[0]).register_forward_pre_hook(_pre_edit(prompt_pass(replace_head)), with_kwargs=True),
               layers[0].register_forward_hook(_out_edit(prompt_pass(steer_last)), with_kwargs=True)]
    try:
        with eager(hf), torch.no_grad():
            oracle = hf.generate(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"], **kw)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        plain = hf.generate(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"], **kw)
    ivs = [Intervention("columns", "pattern_L0H0", [0], "ablation", apply_softmax=True),
           Intervention("full", "resid_out_0", ["last"], "steering", steering_vector=vec)]
    out = model.generate(BATCH, interventions=ivs, **kw)
    assert len(out.logits) == len(oracle.logits) == 4
    for step, (got, want, base) in enumerate(zip(out.logits, oracle.logits, plain.logits)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"step {step}")
        assert (got - base).abs().max() > 1e-2, f"step {step}: the interventions changed nothing"
    assert torch.equal(out.sequences, oracle.sequences) and not torch.equal(out.sequences, plain.sequences)
    assert model.hf_model.config._attn_implementation == "sdpa"
