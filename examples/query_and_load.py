"""Find saved runs again and load only what you need: query by tag and by custom metadata keys, print the
QueryResult, load a subset of the keys, iterate a run part by part.

    python examples/query_and_load.py --base-dir ./runs                        # SmolLM2, local folder
    AWS_ENDPOINT_URL=http://127.0.0.1:9000 python examples/query_and_load.py --base-dir s3://bucket/acts

It first saves two small runs with examples/local_extraction.py (tags ``"batch-0"``/``"batch-1"``, custom key
``{"batch": i}``) so that there is something to find; ``main(model=..., base_dir=...)`` takes a HookedModel.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Any, Optional, Sequence

EXPERIMENT = "query-example"
KEYS = ["resid_out_0", "logits"]


def _local_extraction() -> Any:
    """examples/local_extraction.py as a module (examples/ is not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "local_extraction.py")
    spec = importlib.util.spec_from_file_location("local_extraction_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(model: Any = None, base_dir: Any = "./runs", storage_options: Optional[dict] = None,
         tokenizer: Any = None, experiment: str = EXPERIMENT, keys: Sequence[str] = KEYS) -> dict[str, Any]:
    """Save two runs, then query and load them.

    Returns ``{"saved": [local_extraction results], "by_tag": QueryResult, "by_custom": QueryResult,
    "loaded": ActivationCache with only ``keys``, "metadata": its run's metadata, "parts": [per-part caches]}``.
    """
    from easyroutine_dist.cache import ActivationCache
    from easyroutine_dist.storage.api import ActivationLoader

    local = _local_extraction()
    if model is None or isinstance(model, str):
        model = local.load_model(model or "smollm2")
    prompts = local.PROMPTS
    saved = [local.main(model, base_dir, storage_options, tokenizer=tokenizer, prompts=prompts[i::2],
                        experiment=experiment, tag=f"batch-{i}", other_metadata={"batch": i}) for i in range(2)]

    loader = ActivationLoader(base_dir, experiment_name=experiment, storage_options=storage_options)
    everything = loader.query()
    print(f"experiment {experiment!r} holds {len(everything)} run(s):")
    print(everything)

    by_tag = loader.query(tag="batch-1")
    print("query(tag='batch-1'):")
    print(by_tag)
    by_custom = loader.query(custom_keys={"batch": 0, "example": "local_extraction"}, model_name=model.model_name)
    print("query(custom_keys={'batch': 0, ...}):")
    print(by_custom)

    cache, meta = by_custom.load(-1, keys=list(keys))  # on S3 only the byte ranges of these tensors are read
    tensors = {k: tuple(cache[k].shape) for k in cache.keys() if hasattr(cache[k], "shape")}
    print(f"loaded run {meta['run_id']} (tag {meta['tag']!r}, other_metadata {meta['other_metadata']}): {tensors}")

    parts: list[ActivationCache] = []
    for i, part in enumerate(by_tag.iter_parts(-1, keys=list(keys))):
        print(f"  part {i}: {part[keys[0]].shape[0]} row(s), keys {sorted(k for k in part.keys() if k in keys)}")
        parts.append(part)
    print(f"paths: {by_tag.get_paths()}")
    return {"saved": saved, "by_tag": by_tag, "by_custom": by_custom, "loaded": cache, "metadata": meta,
            "parts": parts}


def _cli(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-dir", default="./runs", help="local folder or s3://bucket/prefix")
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a folder or a hub id")
    args = p.parse_args(argv)
    return main(args.model, args.base_dir)


if __name__ == "__main__":
    _cli()
