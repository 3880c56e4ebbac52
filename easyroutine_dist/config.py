"""ExtractionConfig: which activations to extract. Field names are easyroutine's."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError

AttnPatternAvg = Literal["mean", "sum", "baseline_ratio", "none"]


@dataclass
class ExtractionConfig:
    """What ``HookedModel.forward`` extracts. Every boolean defaults to False except ``save_logits``.

    Unknown field names are refused (``ExtractionConfig(extract_resid_outt=True)`` raises ConfigError).
    """

    extract_embed: bool = False
    extract_resid_in: bool = False
    extract_resid_mid: bool = False
    extract_resid_out: bool = False
    extract_resid_in_post_layernorm: bool = False
    extract_attn_pattern: bool = False
    extract_head_values_projected: bool = False
    extract_head_keys_projected: bool = False
    extract_head_queries_projected: bool = False
    extract_head_keys: bool = False
    extract_head_values: bool = False
    extract_head_queries: bool = False
    extract_values: bool = False
    extract_keys: bool = False
    extract_queries: bool = False
    extract_head_out: bool = False
    extract_attn_out: bool = False
    extract_attn_in: bool = False
    extract_mlp_out: bool = False
    extract_last_layernorm: bool = False
    save_input_ids: bool = False
    avg: bool = False
    avg_over_example: bool = False
    attn_heads: Any = "all"
    attn_pattern_avg: AttnPatternAvg = "none"
    attn_pattern_row_positions: Any = None
    save_logits: bool = True
    keep_gradient: bool = False

    def __post_init__(self) -> None:
        if self.attn_pattern_avg not in ("mean", "sum", "baseline_ratio", "none"):
            raise ConfigError(
                f"ExtractionConfig.attn_pattern_avg={self.attn_pattern_avg!r}: must be one of "
                "'mean', 'sum', 'baseline_ratio', 'none'."
            )
        if self.attn_heads != "all":
            if not isinstance(self.attn_heads, (list, tuple)) or not all(
                isinstance(h, dict) and set(h) == {"layer", "head"} for h in self.attn_heads
            ):
                raise ConfigError(
                    "ExtractionConfig.attn_heads must be 'all' or a list of {'layer': int, 'head': int} dicts, "
                    f"got {self.attn_heads!r}."
                )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExtractionConfig":
        """Build from ``to_dict()`` output; unknown keys raise ConfigError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"ExtractionConfig has no field(s) {unknown}; valid fields are {sorted(names)}."
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of every field (tuples become lists)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(out["attn_heads"], (list, tuple)):
            out["attn_heads"] = [dict(h) for h in out["attn_heads"]]
        return out

    def is_not_empty(self) -> bool:
        return any(v is True for k, v in self.to_dict().items() if k.startswith("extract_"))


def _refuse_unknown_kwargs(init):  # keeps the dataclass signature while naming bad fields clearly
    def wrapped(self, *args, **kwargs):
        names = {f.name for f in dataclasses.fields(ExtractionConfig)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(
                f"ExtractionConfig has no field(s) {unknown}. Valid fields: {sorted(names)}. "
                "Check the spelling against the easyroutine ExtractionConfig documentation."
            )
        init(self, *args, **kwargs)

    wrapped.__signature__ = inspect.signature(init)
    return wrapped


ExtractionConfig.__init__ = _refuse_unknown_kwargs(ExtractionConfig.__init__)  # type: ignore[method-assign]
