"""Tokenisation, in one place for the core, the CLI and the workers.

* :func:`tokenize_batches`: prompts -> left-padded ``input_ids``/``attention_mask`` batches, exactly as every
  worker tokenises a partition. The single-process reference of a distributed run is
  ``hooked.extract_cache(tokenize_batches(hooked.hf_tokenizer, texts, batch_size), ...)``.
* :func:`load_tokenizer`: the tokenizer a pretrained model source's workers will use, without loading weights
  (the driver's and the CLI's checks of positions on a sample of the dataset).

No Ray here.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .errors import ConfigError

__all__ = ["tokenize_batches", "load_tokenizer"]


def tokenize_batches(tokenizer: Any, texts: Sequence[str], batch_size: int,
                     tokenizer_kwargs: Optional[dict[str, Any]] = None) -> list[dict[str, torch.Tensor]]:
    """Tokenise ``texts`` in batches of ``batch_size`` with left padding.

    Returns ``[{"input_ids": [b, seq], "attention_mask": [b, seq]}, ...]``. The single-process reference of a
    distributed run is ``hooked.extract_cache(tokenize_batches(tok, texts, batch_size), ...)``.
    """
    if tokenizer is None:
        raise ConfigError("the model has no tokenizer, so text prompts cannot be tokenised; load a model with a "
                          "tokenizer, or pass pre-tokenised batches (dicts with input_ids/attention_mask).")
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    kw = {"padding": True, "return_tensors": "pt", **(tokenizer_kwargs or {})}
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), **kw)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def load_tokenizer(source: Any) -> Optional[Any]:
    """The tokenizer workers will use, for a ``"pretrained"`` model source (``distributed.models.ModelSource``;
    about a second); None for factories, whose tokenizer exists only once the factory has built the model."""
    if source.kind != "pretrained":
        return None
    from transformers import AutoTokenizer

    from .models import source_kwargs

    try:
        return AutoTokenizer.from_pretrained(source.name, **source_kwargs(source.kwargs))
    except (OSError, ValueError, TypeError):
        return None  # a weights-only folder: the workers will say so
