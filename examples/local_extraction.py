"""Single-process extraction: a padded batch of prompts through a HookedModel, ``extract_cache`` over a generator,
saved with ActivationSaver (local folder or S3).

    python examples/local_extraction.py --base-dir ./runs                     # the embedded SmolLM2 (offline)
    python examples/local_extraction.py --base-dir ./runs --model gpt2        # any registry model, local or hub
    AWS_ENDPOINT_URL=http://127.0.0.1:9000 python examples/local_extraction.py --base-dir s3://bucket/acts

No Ray here: everything runs in this process. ``main(model=..., base_dir=...)`` takes an already built HookedModel
(and a tokenizer, when the model has none), so it runs on any model, including tiny random test models.
"""

from __future__ import annotations

import argparse
from typing import Any, Iterator, Optional, Sequence

PROMPTS = [
    "The capital of France is",
    "One, two, three, four,",
    "The opposite of hot is",
    "Water is made of hydrogen and",
    "The sun rises in the",
    "Monday, Tuesday,",
]
POSITIONS = ["first", "last"]
EXPERIMENT = "local-example"


def load_model(name: str = "smollm2") -> Any:
    """A HookedModel by name: ``"smollm2"`` (the embedded GGUF model, no network), a folder or a hub id."""
    from easyroutine_dist.hooked_model import HookedModel
    from easyroutine_dist.models import resolve_model

    path, kwargs = resolve_model(name)
    return HookedModel.from_pretrained(path, **kwargs)


def padded_batches(tokenizer: Any, prompts: Sequence[str], batch_size: int) -> Iterator[dict[str, Any]]:
    """A generator of left-padded ``{"input_ids", "attention_mask"}`` batches (padding side does not change the
    numbers: positions are resolved against each row's real tokens)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True)
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def extract(model: Any, tokenizer: Any = None, prompts: Sequence[str] = PROMPTS, batch_size: int = 2,
            positions: Sequence[Any] = POSITIONS) -> Any:
    """``extract_cache`` of ``prompts`` (residual stream and MLP outputs of every layer, plus logits)."""
    from easyroutine_dist.config import ExtractionConfig

    tok = tokenizer if tokenizer is not None else model.get_tokenizer()
    if tok is None:
        raise SystemExit("this model has no tokenizer; pass tokenizer=...")
    config = ExtractionConfig(extract_resid_out=True, extract_mlp_out=True, save_logits=True)
    return model.extract_cache(padded_batches(tok, prompts, batch_size), list(positions), extraction_config=config)


def main(model: Any = None, base_dir: Any = "./runs", storage_options: Optional[dict] = None,
         tokenizer: Any = None, prompts: Sequence[str] = PROMPTS, batch_size: int = 2,
         experiment: str = EXPERIMENT, tag: str = "local", other_metadata: Optional[dict] = None) -> dict[str, Any]:
    """Extract ``prompts`` with ``model`` (a HookedModel, a model name, or None = SmolLM2) and save the cache.

    Returns ``{"cache", "path" (where the run was saved), "run_id", "shapes" ({key: shape}), "experiment", "tag"}``.
    """
    from easyroutine_dist.storage.api import ActivationSaver

    if model is None or isinstance(model, str):
        model = load_model(model or "smollm2")
    prompts = list(prompts)
    cache = extract(model, tokenizer, prompts, batch_size)
    print(f"model {model.model_name}: {len(prompts)} prompts in batches of {batch_size}, positions {POSITIONS}")
    print(f"mapping_index {cache['mapping_index']}")
    shapes = {k: tuple(v.shape) for k, v in cache.items() if hasattr(v, "shape")}
    for key, shape in shapes.items():
        print(f"  {key:<14} {shape}")

    saver = ActivationSaver(base_dir, experiment_name=experiment, storage_options=storage_options)
    meta = {"example": "local_extraction", "n_prompts": len(prompts), **(other_metadata or {})}
    path = saver.save_cache(cache, other_metadata=meta, tag=tag)
    run_id = str(path).rstrip("/").rsplit("/", 1)[-1]
    print(f"saved run {run_id} at {path}")
    return {"cache": cache, "path": path, "run_id": run_id, "shapes": shapes, "experiment": experiment, "tag": tag}


def _cli(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-dir", default="./runs", help="local folder or s3://bucket/prefix")
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a folder or a hub id")
    p.add_argument("--batch-size", type=int, default=2)
    args = p.parse_args(argv)
    return main(args.model, args.base_dir, batch_size=args.batch_size)


if __name__ == "__main__":
    _cli()
