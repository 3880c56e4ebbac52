"""Tiny random models, built in code from HF configs, one per registry architecture (and one per architecture
outside the registry that is accepted by inference and the load-time oracles: INFERRED_ARCHS)."""

from __future__ import annotations

import contextlib
import functools

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96
ARCHS = ["gpt2", "gpt_neox", "gpt_neox_sequential", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
         "gemma3_text", "phi3", "olmo2"]
#: not in the registry: their ArchSpec is inferred from the module tree and accepted by proof (issue 12)
INFERRED_ARCHS = ["olmo", "granite", "starcoder2", "cohere", "helium", "phi"]


def tiny_config(arch: str):
    """A 3-layer config with 4 query heads; GQA (2 kv heads) wherever the architecture supports it."""
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_layer=3, n_embd=32, n_head=4, n_positions=64,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    common = dict(vocab_size=VOCAB, num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, **ids)
    if arch.startswith("gpt_neox"):
        return AutoConfig.for_model("gpt_neox", **common, use_parallel_residual=(arch == "gpt_neox"),
                                    rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0)
    common["num_key_value_heads"] = 2
    extra: dict = {}
    if arch == "granite":  # logits divided by logits_scaling; residual branches unscaled (residual_multiplier=1)
        extra.update(logits_scaling=4.0, embedding_multiplier=2.0, attention_multiplier=0.3)
    if arch == "cohere":  # parallel residual, LayerNorm without bias, logits multiplied by logit_scale
        extra["logit_scale"] = 0.5
    if arch == "starcoder2":
        extra.update(residual_dropout=0.0, embedding_dropout=0.0)
    if arch == "phi":  # parallel residual, final_layernorm, o_proj named dense, lm_head with a bias
        extra.update(resid_pdrop=0.0, embd_pdrop=0.0)
    if arch in ("qwen3", "gemma", "gemma2", "gemma3_text", "helium"):
        extra["head_dim"] = 8
    if arch in ("gemma2", "gemma3_text"):
        extra.update(sliding_window=4, query_pre_attn_scalar=8)
    if arch == "gemma2":
        extra.update(final_logit_softcapping=5.0, attn_logit_softcapping=20.0)
    if arch == "gemma3_text":
        extra.update(final_logit_softcapping=5.0, layer_types=["sliding_attention", "full_attention",
                                                                "sliding_attention"])
    if arch == "qwen2":
        extra["use_sliding_window"] = False
    return AutoConfig.for_model(arch, **common, **extra)


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str, seed: int = 0):
    """A deterministic random model in eval mode, float32; norm weights randomised so that norms matter."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hooked(arch: str, seed: int = 0):
    from easyroutine_dist.interpretability import HookedModel

    return HookedModel(tiny_model(arch, seed), None, model_name=f"tiny-{arch}")


def random_batch(batch: int = 3, seq: int = 7, seed: int = 1, padding_side: str = "left", lengths=None):
    """``input_ids``/``attention_mask`` with rows of different lengths, padded on ``padding_side``."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [seq - (i % 3) for i in range(batch)]
    ids = torch.zeros(batch, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        toks = torch.randint(3, VOCAB, (n,), generator=g)
        sl = slice(ids.shape[1] - n, None) if padding_side == "left" else slice(0, n)
        ids[r, sl] = toks
        mask[r, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


def unpadded_rows(batch):
    """Each row's real tokens as its own ``[1, n]`` input."""
    return [{"input_ids": ids[m.bool()][None], "attention_mask": torch.ones(1, int(m.sum()), dtype=torch.long)}
            for ids, m in zip(batch["input_ids"], batch["attention_mask"])]


@contextlib.contextmanager
def eager(model):
    """Run ``model`` with eager attention (which returns weights) inside the block; restore it after."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def hook_snapshot(model):
    """Every module's forward (pre-)hook ids. transformers keeps permanent output-capturing hooks of its own,
    so hook hygiene is checked by comparing snapshots, not by expecting none."""
    return {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()}
