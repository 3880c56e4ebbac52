"""What the logit lens is made of: cache-key patterns, the final norm without the model, and readers of a
model's config and (possibly offloaded) parameters."""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

import torch

from .errors import ConfigError


def match_keys(keys: Sequence[str], target_key: str) -> list[str]:
    """Keys of ``keys`` matching ``target_key``: a literal key, or a pattern whose ``{...}`` placeholders match
    integers (``"resid_out_{i}"``, ``"head_out_L{i}H{j}"``), sorted numerically."""
    if "{" not in target_key:
        if target_key not in keys:
            raise ConfigError(f"logit lens: key {target_key!r} is not in the activations; extract it first "
                              f"(available: {sorted(k for k in keys)[:8]}...).")
        return [target_key]
    pattern = re.sub(r"\\\{[^}]*\\\}", r"(\\d+)", re.escape(target_key))
    rx = re.compile(f"^{pattern}$")
    found = [k for k in keys if rx.match(k)]
    if not found:
        raise ConfigError(f"logit lens: no activation key matches the pattern {target_key!r}; extract those "
                          "activations (e.g. ExtractionConfig(extract_resid_out=True)) or fix the pattern.")
    return sorted(found, key=lambda s: [int(x) for x in re.findall(r"\d+", s)])


def final_norm(x: torch.Tensor, kind: str, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               offset: float = 0.0, stats_from: torch.Tensor | None = None) -> torch.Tensor:
    """The final norm in float32: ``[..., d] -> [..., d]``.

    kind: "rms" (``x / sqrt(mean(x^2) + eps)``) or "layernorm" (``(x - mean) / sqrt(var + eps)``); then
    ``* (weight + offset) + bias``. stats_from ``[..., d]``: take the statistics from this tensor instead of ``x``
    (the easyroutine-compatible mode).
    """
    x = x.float()
    src = x if stats_from is None else stats_from.float()
    if kind == "rms":
        y = x * torch.rsqrt(src.pow(2).mean(-1, keepdim=True) + eps)
    elif kind == "layernorm":
        mean = src.mean(-1, keepdim=True)
        var = (src - mean).pow(2).mean(-1, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + eps)
    else:
        raise ConfigError(f"norm kind {kind!r} is unknown; use 'rms' or 'layernorm'.")
    if weight is not None:
        y = y * (weight.float() + offset)
    if bias is not None:
        y = y + bias.float()
    return y


def _config_get(cfg: Any, name: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _config_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        raw = dict(cfg)
    elif hasattr(cfg, "to_dict"):
        raw = cfg.to_dict()
    else:
        raw = dict(vars(cfg))
    return json.loads(json.dumps(raw, default=str))


def _read_param(module: Any, name: str) -> torch.Tensor | None:
    """A module parameter as a detached tensor; offloaded (meta) weights are brought to CPU once."""
    if module is None:
        return None
    p = getattr(module, name, None)
    if p is None:
        return None
    if p.device.type == "meta":
        from accelerate.utils import align_module_device

        with align_module_device(module, torch.device("cpu")):
            return getattr(module, name).detach().to("cpu").clone()
    return p.detach()
