"""What the self-check costs (issue 12): once per run (per worker), on a sample of the first batch.

Random Llama (~100M parameters: 12 layers, d 768, GQA 12/4 heads, vocab 32k), float32, batch 8 x 128 with half the
rows left-padded, ``resid_out`` of every layer at ``"last"``. Measures process CPU time (both threads; less
disturbed than wall time by other processes on a shared machine), median of ``--repeats`` interleaved runs:
* one batch forward (``HookedModel.forward``), the unit of a run's cost;
* ``run_self_check`` on that batch alone (its three forwards over at most 2 x 64 tokens, plus the lens);
* ``extract_cache`` over ``--batches`` batches with ``self_check="off"`` and ``"error"``: the run's overhead.
Also the load-time proof of an inferred entry (``infer_arch.prove``) on the same model under another model_type.

Run: .venv/bin/python benchmarks/bench_selfcheck.py [--batches 8] [--repeats 5] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from easyroutine_dist.interpretability import ExtractionConfig, HookedModel
from easyroutine_dist import selfcheck
from easyroutine_dist.selfcheck import run_self_check


def _once(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=selfcheck.MAX_TOKENS, help="tokens per sampled row")
    args = ap.parse_args()
    selfcheck.MAX_TOKENS = args.max_tokens
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                               num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                               max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    hm = HookedModel(model, None, "bench-llama-100m")
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(3, 32000, (8, 128), generator=g)
        mask = torch.ones_like(ids)
        mask[::2, :17] = 0  # half the rows left-padded
        batches.append({"input_ids": ids, "attention_mask": mask})
    ec = ExtractionConfig(extract_resid_out=True)

    def forward():
        hm.forward(batches[0], ["last"], extraction_config=ec)

    def check():
        assert run_self_check(hm, batches[0], ec)["passed"]

    def run(mode):
        return lambda: hm.extract_cache(batches, ["last"], extraction_config=ec, self_check=mode)

    forward(), check()  # warm-up
    f, c, off, on = [], [], [], []
    for i in range(args.repeats):  # interleaved, so machine noise hits all alike
        f.append(_once(forward))
        c.append(_once(check))
        if i < max(1, args.repeats // 2):
            off.append(_once(run("off")))
            on.append(_once(run("error")))
    fm, cm, offm, onm = (statistics.median(x) for x in (f, c, off, on))
    print(f"one batch forward (8 x 128): {fm * 1e3:.0f} ms CPU")
    print(f"self-check of that batch: {cm * 1e3:.0f} ms CPU = {cm / fm:.2f} batch forwards")
    print(f"run of {args.batches} batches: off {offm:.2f} s, error {onm:.2f} s CPU (measured difference "
          f"{(onm / offm - 1) * 100:.1f}%; expected from the two lines above {cm / (args.batches * fm) * 100:.1f}%)")
    from easyroutine_dist import infer_arch

    model.config.model_type = "bench_llama_unregistered"
    t = statistics.median(_once(lambda: HookedModel(model, None, "bench")) for _ in range(args.repeats))
    model.config.model_type = "llama"
    print(f"load-time proof of an inferred entry (inference + oracles on {infer_arch.SAMPLE_TOKENS} tokens): "
          f"{t * 1e3:.0f} ms CPU")


if __name__ == "__main__":
    main()
