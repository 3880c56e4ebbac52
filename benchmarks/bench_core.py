"""HookedModel overhead vs a plain HF forward, in the same process (issue 2).

1. ~100M-parameter random Llama, batch 8 x 128: forward extracting resid_out at every layer for "last" vs
   ``hf_model(input_ids, attention_mask)`` under no_grad. Target ratio <= 1.05.
2. extract_cache over 100 vs 1000 batches (tiny model): time ratio should be close to 10 (linear).

Run: .venv/bin/python benchmarks/bench_core.py
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from easyroutine_dist.interpretability import ExtractionConfig, HookedModel


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def forward_overhead(repeats: int = 7) -> None:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                               num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                               max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    hm = HookedModel(model, None, "bench-llama-100m")
    ids = torch.randint(0, 32000, (8, 128))
    mask = torch.ones_like(ids)
    mask[::2, :17] = 0  # half the rows left-padded
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    extraction = ExtractionConfig(extract_resid_out=True)

    def plain():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)

    def hooked():
        hm.forward({"input_ids": ids, "attention_mask": mask}, ["last"], extraction_config=extraction)

    # interleave so that machine noise hits both alike
    base, ours = [], []
    for _ in range(repeats):
        base.append(timed(plain, 1))
        ours.append(timed(hooked, 1))
    b, o = statistics.median(base), statistics.median(ours)
    print(f"forward, {n_params:.0f}M params, batch 8x128, resid_out x {cfg.num_hidden_layers} layers at 'last': "
          f"plain HF {b * 1e3:.0f} ms, HookedModel {o * 1e3:.0f} ms, ratio {o / b:.3f}")


def extract_cache_linearity() -> None:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    hm = HookedModel(AutoModelForCausalLM.from_config(cfg).eval(), None, "tiny")
    batch = {"input_ids": torch.randint(1, 128, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    extraction = ExtractionConfig(extract_resid_out=True, save_logits=False)

    def run(n):
        t = time.perf_counter()
        hm.extract_cache((batch for _ in range(n)), ["last", "all"], extraction_config=extraction)
        return time.perf_counter() - t

    run(20)
    t100 = min(run(100) for _ in range(3))
    t1000 = min(run(1000) for _ in range(2))
    print(f"extract_cache: 100 batches {t100:.2f} s, 1000 batches {t1000:.2f} s, ratio {t1000 / t100:.2f} "
          "(linear = 10)")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    forward_overhead()
    extract_cache_linearity()
