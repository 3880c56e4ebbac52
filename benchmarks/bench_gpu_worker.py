"""GPU check: tokens/s of one ExtractionWorker vs a plain HF forward of the same model (target ratio >= 0.9).

A Mistral-7B-shaped model (32 layers, d=4096, GQA 32/8, vocab 32000) with random bf16 weights, built directly on
the GPU (no download). Both sides run the same pre-tokenised batches ``[8, 512]``; the worker extracts
``resid_out`` of every layer at the last position and writes shards to local disk, the plain side only runs
``model(input_ids, attention_mask)``. Without CUDA it prints a SKIP line and exits 0.

    python benchmarks/bench_gpu_worker.py [--batches 16] [--batch 8] [--seq 512] [--layers 32]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))



def _scratch(prefix: str) -> str:
    """A temporary folder removed when the benchmark exits."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path

def build_model(layers: int = 32, **_: object):
    """Factory for the worker (``"benchmarks.bench_gpu_worker:build_model"``): random Mistral-7B shape, bf16, cuda."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from easyroutine_dist.hooked_model import HookedModel

    cfg = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    return HookedModel(model.eval(), None, model_name="random-mistral-7b-shape")


def batches(n: int, b: int, seq: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, 32000, (b, seq), generator=g),
             "attention_mask": torch.ones(b, seq, dtype=torch.long)} for _ in range(n)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layers", type=int, default=32)
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("SKIP: no CUDA device; this benchmark needs one GPU (e.g. an H100).")
        return {"skipped": True}
    data = batches(args.batches, args.batch, args.seq)
    tokens = args.batches * args.batch * args.seq

    hooked = build_model(args.layers)
    with torch.no_grad():
        for bt in data[:2]:  # warm-up
            hooked.hf_model(input_ids=bt["input_ids"].cuda(), attention_mask=bt["attention_mask"].cuda(),
                            use_cache=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for bt in data:
            hooked.hf_model(input_ids=bt["input_ids"].cuda(), attention_mask=bt["attention_mask"].cuda(),
                            use_cache=False)
        torch.cuda.synchronize()
        plain_s = time.perf_counter() - t0
    del hooked
    torch.cuda.empty_cache()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from easyroutine_dist.config import ExtractionConfig
    from easyroutine_dist.distributed import DistributedExtractor
    from easyroutine_dist.storage.api import ActivationSaver

    ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    cfg = ExtractionConfig(extract_resid_out=True, save_logits=False)
    saver = ActivationSaver(_scratch(prefix="bench-gpu-"), experiment_name="gpu")
    with DistributedExtractor("benchmarks.bench_gpu_worker:build_model", num_workers=1, num_gpus_per_worker=1,
                              model_kwargs={"layers": args.layers}) as ex:
        info = ex.workers_info()[0]
        ex.extract(data[:2], ["last"], cfg, saver, batch_size=args.batch, partition_size=args.batch)  # warm-up
        run = ex.extract(data, ["last"], cfg, saver, batch_size=args.batch, partition_size=args.batch * 4)
    ray.shutdown()
    out = {"device": torch.cuda.get_device_name(0), "tokens": tokens, "plain_tokens_per_s": round(tokens / plain_s),
           "worker_tokens_per_s": round(tokens / run.seconds), "ratio": round(plain_s / run.seconds, 3),
           "worker_device": info["device"], "partitions": run.n_partitions}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
