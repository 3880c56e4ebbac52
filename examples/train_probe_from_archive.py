"""Train a linear probe from a stored activation archive: extract a small run (with statistics), then stream its real
token slots through ``QueryResult.torch_dataset`` and a DataLoader with 2 workers, normalised with the stored
statistics. Prints the probe's loss, which goes down.

    python examples/train_probe_from_archive.py --base-dir ./runs           # the embedded SmolLM2 (offline)
    AWS_ENDPOINT_URL=http://127.0.0.1:9000 python examples/train_probe_from_archive.py --base-dir s3://bucket/acts

The probe tells, from the residual stream of one layer at every token, whether the prompt talks about animals
(label 1) or numbers (label 0); the label is a per-row tensor saved with the cache, which the token dataset repeats
for each token of its row. ``main(model=..., tokenizer=...)`` runs on any HookedModel, tiny test models included.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

PROMPTS = [
    ("The cat sleeps on the warm mat", 1),
    ("Seven plus five makes twelve", 0),
    ("A dog barks at the mail carrier", 1),
    ("Twenty divided by four is five", 0),
    ("The horse runs across the field", 1),
    ("Three times three equals nine", 0),
    ("An owl hunts mice at night", 1),
    ("One hundred minus one is ninety-nine", 0),
    ("The rabbit hides in its burrow", 1),
    ("Eight and eight add up to sixteen", 0),
    ("A whale sings deep in the ocean", 1),
    ("Half of fifty is twenty-five", 0),
]
EXPERIMENT = "probe-example"


def load_model(name: str = "smollm2") -> Any:
    """A HookedModel by name: ``"smollm2"`` (the embedded GGUF model, no network), a folder or a hub id."""
    from easyroutine_dist.hooked_model import HookedModel
    from easyroutine_dist.models import resolve_model

    path, kwargs = resolve_model(name)
    return HookedModel.from_pretrained(path, **kwargs)


def padded_batches(tokenizer: Any, texts: Sequence[str], batch_size: int) -> Any:
    """Left-padded ``{"input_ids", "attention_mask"}`` batches of ``texts``."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True)
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def build_archive(model: Any, base_dir: Any, storage_options: Optional[dict] = None, tokenizer: Any = None,
                  prompts: Sequence[tuple[str, int]] = PROMPTS, batch_size: int = 4) -> Any:
    """Extract ``resid_out`` of every layer at every token (``"all"``), add the labels, save the cache with
    statistics; return the QueryResult holding the new run."""
    import torch

    from easyroutine_dist.config import ExtractionConfig
    from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver

    tok = tokenizer if tokenizer is not None else model.get_tokenizer()
    texts, labels = [t for t, _ in prompts], [y for _, y in prompts]
    cache = model.extract_cache(padded_batches(tok, texts, batch_size), ["all"],
                                extraction_config=ExtractionConfig(extract_resid_out=True))
    cache["label"] = torch.tensor(labels, dtype=torch.int64)  # per row: no position axis, no statistics
    saver = ActivationSaver(base_dir, experiment_name=EXPERIMENT, storage_options=storage_options)
    path = saver.save_cache(cache, other_metadata={"example": "train_probe"}, tag="probe", statistics=True)
    print(f"saved {len(texts)} prompts, {int(cache['valid_mask'].sum())} real tokens at {path}")
    run_id = str(path).rstrip("/").rsplit("/", 1)[-1]
    return ActivationLoader(base_dir, EXPERIMENT, storage_options=storage_options).query(save_time=run_id)


def train_probe(q: Any, key: str, epochs: int = 6, workers: int = 2, batch_size: int = 16,
                lr: float = 0.02) -> tuple[Any, list[float]]:
    """Logistic-regression probe on ``key`` over every real token of the run; returns (probe, mean loss per
    epoch)."""
    import torch
    from torch.utils.data import DataLoader

    ds = q.torch_dataset(keys=[key, "label"], unit="tokens", batch_size=batch_size, shuffle=True, seed=0,
                         shuffle_buffer=256, normalize="mean_std")
    d = q.statistics()[key]["mean"].shape[-1]
    torch.manual_seed(0)
    probe = torch.nn.Linear(d, 1)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    losses = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)  # a new shuffle, the same one on every run
        total, n = 0.0, 0
        for batch in DataLoader(ds, batch_size=None, num_workers=workers):
            y = batch["label"].float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(batch[key]).squeeze(-1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(y), n + len(y)
        losses.append(total / n)
        print(f"epoch {epoch}: loss {losses[-1]:.4f} over {n} tokens")
    return probe, losses


def main(model: Any = None, base_dir: Any = "./runs", storage_options: Optional[dict] = None, tokenizer: Any = None,
         epochs: int = 6, workers: int = 2, layer: Optional[int] = None) -> dict[str, Any]:
    """Build the archive with ``model`` (a HookedModel, a name, or None = SmolLM2) and train the probe on the
    middle layer (or ``layer``). Returns ``{"query", "key", "probe", "losses"}``."""
    if model is None or isinstance(model, str):
        model = load_model(model or "smollm2")
    q = build_archive(model, base_dir, storage_options, tokenizer)
    key = f"resid_out_{model.model_config.num_hidden_layers // 2 if layer is None else layer}"
    stats = q.statistics()[key]
    print(f"{key}: {stats['count']} real tokens, mean L2 norm {stats['norm_mean']:.2f}")
    probe, losses = train_probe(q, key, epochs=epochs, workers=workers)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return {"query": q, "key": key, "probe": probe, "losses": losses}


def _cli(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-dir", default="./runs", help="local folder or s3://bucket/prefix")
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a folder or a hub id")
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args(argv)
    return main(args.model, args.base_dir, epochs=args.epochs)


if __name__ == "__main__":
    _cli()
