"""Distributed activation extraction with Ray: extract, load like any run, lens it on the workers.

    python examples/distributed_extraction.py --base-dir /tmp/acts                     # tiny random model
    python examples/distributed_extraction.py --model HuggingFaceTB/SmolLM2-135M --base-dir /tmp/acts
    AWS_ENDPOINT_URL=http://127.0.0.1:9000 python examples/distributed_extraction.py --base-dir s3://bucket/acts

``--model tiny`` (default) saves a 3-layer random llama with a character tokenizer to a temporary folder, so the
example runs offline in seconds. S3 credentials come from the usual AWS_* environment variables.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from typing import Any, Optional, Sequence

CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"


def save_tiny_model(folder: str) -> str:
    """A 3-layer random llama (vocab 96) and a one-token-per-character tokenizer, saved with save_pretrained."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=96, num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the example; returns the DistributedRun as a dict (plus the lens run's id)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-dir", required=True, help="local folder or s3://bucket/prefix")
    p.add_argument("--model", default="tiny", help="'tiny' or a folder / hub id (e.g. HuggingFaceTB/SmolLM2-135M)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--num-gpus-per-worker", type=float, default=0)
    p.add_argument("--partition-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ray-address", default=None, help="a running cluster; default: start/reuse a local one")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    with tempfile.TemporaryDirectory(prefix="tiny-llama-") as scratch:
        model = save_tiny_model(scratch) if args.model == "tiny" else args.model
        return _run(args, model)


def _run(args: argparse.Namespace, model: str) -> dict[str, Any]:
    from easyroutine_dist.config import ExtractionConfig
    from easyroutine_dist.distributed import DistributedExtractor
    from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver

    rng = random.Random(0)
    prompts = ["".join(rng.choice(CHARS[:27]) for _ in range(rng.randint(5, 30))) for _ in range(args.num_prompts)]
    # no credentials in storage_options: the driver and every Ray node read theirs from their own environment
    # (AWS_* variables, instance role, profile); the endpoint comes from AWS_ENDPOINT_URL
    saver = ActivationSaver(args.base_dir, experiment_name="distributed-example")
    config = ExtractionConfig(extract_resid_out=True, save_logits=False)
    with DistributedExtractor(model, num_workers=args.num_workers, num_gpus_per_worker=args.num_gpus_per_worker,
                              ray_address=args.ray_address) as ex:
        run = ex.extract(prompts, ["last"], config, saver, batch_size=args.batch_size,
                         partition_size=args.partition_size, tag="example",
                         logit_lens={"target_key": "resid_out_{i}", "top_k": 5})
        print(f"run {run.run_id}: {run.n_rows} rows in {run.n_partitions} partitions, {run.seconds:.1f}s -> {run.url}")
        runs = ActivationLoader(args.base_dir, experiment_name="distributed-example").query(tag="example")
        for i, part in enumerate(runs.iter_parts(run.run_id, keys=["logit_lens_resid_out_2_topk_ids"])):
            if i == 0:
                print("part 0, last layer top-5 token ids of row 0:", part["logit_lens_resid_out_2_topk_ids"][0, -1].tolist())
        cache, meta = runs.load(run.run_id, keys=["resid_out_2"])
        print("loaded resid_out_2", tuple(cache["resid_out_2"].shape), "model", meta["model_name"])
        post = ex.logit_lens(runs, saver, logit_lens={"target_key": "resid_out_{i}", "top_k": 3,
                                                      "keep_activations": False}, tag="example-lens")
        print(f"post-hoc lens run {post.run_id} (source {run.run_id})")
    return {**run.to_dict(), "lens_run_id": post.run_id}


if __name__ == "__main__":
    main()
