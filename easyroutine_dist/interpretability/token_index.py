"""easyroutine's ``interpretability.token_index`` import path: ``TokenIndex`` answers "which positions does this
spec select" for one prompt, through the same resolver HookedModel uses (easyroutine_dist.positions)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import torch

from ..errors import ConfigError
from ..positions import resolve_positions, spec_key, validate_specs

__all__ = ["TokenIndex", "resolve_positions", "spec_key", "validate_specs"]


class TokenIndex:
    """Positions selected by ``target_token_positions`` specs in one unpadded prompt.

    ``pivot_positions`` split the prompt into ``inputs-partition-K`` segments (``[0, p1)``, ``[p1, p2)`` ...).
    ``pivot_tokens`` (splitting at given token strings) and image specs are not supported (docs/compat.md).
    """

    def __init__(self, model_name: str, pivot_positions: Optional[Sequence[int]] = None,
                 pivot_tokens: Optional[Sequence[str]] = None) -> None:
        if pivot_tokens:
            raise ConfigError("TokenIndex(pivot_tokens=...) is not supported; pass pivot_positions (the indices "
                              "where each new inputs-partition starts) instead.")
        self.model_name = model_name
        self.pivot_positions = sorted(int(p) for p in pivot_positions) if pivot_positions else []

    def get_token_index(self, tokens: list, string_tokens: Sequence[str],
                        return_type: Literal["list", "dict", "all"] = "list") -> Any:
        """Positions (0 = first token of ``string_tokens``) selected by each spec in ``tokens``.

        ``"list"``: every selected position, specs in order; ``"dict"``: ``{spec: [positions]}``; ``"all"``: both.
        """
        if not isinstance(tokens, list):
            raise ConfigError(f"tokens must be a list of specs (e.g. ['last', 0, (1, 3)]), got {type(tokens).__name__}.")
        if return_type not in ("list", "dict", "all"):
            raise ConfigError(f"return_type={return_type!r}: must be 'list', 'dict' or 'all'.")
        mask = torch.ones(1, len(string_tokens), dtype=torch.long)
        resolved = resolve_positions(tokens, mask, self.pivot_positions or None)
        by_spec = {spec: list(resolved.token_dict[spec_key(spec)][0]) for spec in tokens}
        flat = [p for spec in tokens for p in by_spec[spec]]
        if return_type == "list":
            return flat
        return by_spec if return_type == "dict" else (flat, by_spec)
