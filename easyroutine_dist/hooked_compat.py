"""The parts of easyroutine's HookedModel surface that are about its calling conventions, not about extraction:
construction from a ``HookedModelConfig``, ``device()`` as a call, string tokens, and the multimodal/module-wrapper
switches that have no meaning for text-only HF models here (no-ops). See docs/compat.md."""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError

#: easyroutine's attention implementation names -> transformers' (its "custom_eager" wrapper gives eager numbers)
ATTN_ALIASES = {"custom_eager": "eager"}


class DeviceName(str):
    """A device name that works both ways: as the ``model.device`` value torch accepts (``t.to(model.device)``) and
    called, ``model.device()``, as easyroutine spells it, returning a ``torch.device``."""

    def __call__(self) -> torch.device:
        return torch.device(str(self))

    @property
    def type(self) -> str:
        return torch.device(str(self)).type

    @property
    def index(self) -> int | None:
        return torch.device(str(self)).index


def hf_load_kwargs(device_map: Any = None, dtype: Any = None, attn_implementation: str | None = None,
                   **rest: Any) -> dict[str, Any]:
    """``from_pretrained`` keywords -> transformers v5's: ``dtype`` names become torch dtypes and easyroutine's
    attention aliases are mapped (``HookedModel.from_pretrained`` has already turned ``torch_dtype`` into ``dtype``
    and kept ``batch_size`` on the model)."""
    out = dict(rest)
    if device_map is not None:
        out["device_map"] = device_map
    if dtype is not None:
        out["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if attn_implementation is not None:
        out["attn_implementation"] = ATTN_ALIASES.get(attn_implementation, attn_implementation)
    return out


class EasyroutineMembers:
    """Members easyroutine code calls on a HookedModel; mixed into :class:`HookedModel`."""

    hf_tokenizer: Any

    def to_string_tokens(self, tokens: Any) -> list[str] | list[list[str]]:
        """Each token id as its string: ``[seq]`` or ``[1, seq]`` -> ``[str]``, ``[batch, seq]`` -> one list per row."""
        ids = torch.as_tensor(tokens)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() == 2:
            return [self.to_string_tokens(row) for row in ids]  # type: ignore[misc]
        if self.hf_tokenizer is None:
            return [str(int(i)) for i in ids]
        return [self.hf_tokenizer.decode([int(i)]) for i in ids]

    def is_multimodal(self) -> bool:
        """Text-only causal LMs here."""
        return False

    def use_language_model_only(self) -> None:
        """No-op: every model here is a language model."""

    def set_custom_modules(self) -> None:
        """No-op: easyroutine swaps attention modules for wrappers; hooks here read HF's own modules."""

    def restore_original_modules(self) -> None:
        """No-op (see ``set_custom_modules``)."""


def logit_gradient(embeddings: torch.Tensor | None, logits: torch.Tensor, mask: torch.Tensor,
                   vocabulary_index: Any) -> torch.Tensor:
    """d logit[row, last real token, vocabulary_index] / d input embeddings, ``[batch, P, d]`` like the gathered
    embeddings (each row's objective depends on its own embeddings only, so one backward of the sum serves all).
    ``logits`` ``[batch, seq, vocab]``; ``mask`` ``[batch, seq]``."""
    if embeddings is None or not embeddings.requires_grad:
        raise ConfigError("vocabulary_index asks for the gradient of that token's logit with respect to the input "
                          "embeddings (input_embeddings_gradients); it needs ExtractionConfig(extract_embed=True, "
                          "keep_gradient=True).")
    b = logits.shape[0]
    vocab = torch.as_tensor(vocabulary_index, device=logits.device).reshape(-1)
    if vocab.numel() not in (1, b):
        raise ConfigError(f"vocabulary_index has {vocab.numel()} entries for {b} rows; give one token id, or one per "
                          "row.")
    last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(-1).to(logits.device)
    target = logits[torch.arange(b, device=logits.device), last, vocab.expand(b)].sum()
    (grad,) = torch.autograd.grad(target, embeddings, retain_graph=True)
    return grad.detach()


def rename_avg_patterns(values: dict[str, Any], layout: Any = None) -> dict[str, Any]:
    """easyroutine's names for example-averaged patterns: ``pattern_L{l}H{h}`` -> ``avg_pattern_L{l}H{h}`` (in the
    slot layout too)."""
    out = {}
    for key, value in values.items():
        new = f"avg_{key}" if key.startswith("pattern_L") else key
        out[new] = value
        if layout is not None and new != key and key in layout.keys:
            layout.keys[new] = layout.keys.pop(key)
    return out


def running_mean(old: Any, new: torch.Tensor, batch_idx: int) -> Any:
    """Mean over batches ``0..batch_idx`` given the mean of the first ``batch_idx`` (``old``) and this batch's."""
    if not isinstance(old, torch.Tensor):
        return new
    try:
        return (old.to(new.device, new.dtype) * batch_idx + new) / (batch_idx + 1)
    except RuntimeError:  # shapes that do not broadcast: a new layout, start over
        return new
