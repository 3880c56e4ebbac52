"""Resolve cache keys to hook sites: which module, before or after it runs, which columns of which tensor.

A Site reads (and, for interventions, writes) one tensor at one hook point. Fused projections (GPT-2's c_attn,
GPT-NeoX's query_key_value, Phi-3's qkv_proj) are handled by selecting columns, so per-head keys are column ranges of
the same tensor; under GQA a query head h reads kv group ``h // (n_heads // n_kv_heads)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .architectures import ArchSpec, ModelShape
from .errors import ConfigError

Arg = Literal["hidden", "out0", "weights"]

_LAYER_KEY = re.compile(r"^(resid_in|resid_mid|resid_out|resid_in_post_layernorm|attn_in|attn_out|mlp_out)_(\d+)$")
_QKV_KEY = re.compile(r"^(queries|keys|values)_L(\d+)$")
_HEAD_KEY = re.compile(r"^(head_queries|head_keys|head_values|head_out|pattern)_L(\d+)H(\d+)$")
_PROJECTED_KEY = re.compile(r"^projected_(query|key|value)_L(\d+)H(\d+)$")


@dataclass(frozen=True)
class Site:
    """One tensor at one hook point.

    module: full module path in the HF model. when: "pre" (the module's input) or "out" (its output).
    arg: "hidden" = first positional or ``hidden_states`` kwarg; "out0" = the output or its first element;
        "weights" = the second output element (attention weights ``[batch, heads, q, k]``).
    cols: columns of the last dim that make up this key (None = all). layer/head: for error messages and heads.
    """

    module: str
    when: Literal["pre", "out"]
    arg: Arg
    cols: tuple[int, int] | torch.Tensor | None = None
    layer: int = -1
    head: int | None = None
    kind: str = ""


def _qkv_cols(spec: ArchSpec, shape: ModelShape, which: str) -> tuple[str, tuple[int, int] | torch.Tensor | None]:
    """Module path (relative to a layer) and columns of the raw q/k/v projection output."""
    H, KV, hd = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    if spec.qkv_layout == "separate":
        return {"queries": spec.q_proj, "keys": spec.k_proj, "values": spec.v_proj}[which], None
    part = ("queries", "keys", "values").index(which)
    if spec.qkv_layout == "gpt2":
        return spec.qkv_proj, (part * H * hd, (part + 1) * H * hd)
    if spec.qkv_layout == "phi3":
        starts = (0, H * hd, H * hd + KV * hd, H * hd + 2 * KV * hd)
        return spec.qkv_proj, (starts[part], starts[part + 1])
    # neox: per head [q_h | k_h | v_h], each head_dim wide
    cols = torch.arange(H)[:, None] * 3 * hd + part * hd + torch.arange(hd)[None, :]
    return spec.qkv_proj, cols.reshape(-1)


def _sub_cols(cols: tuple[int, int] | torch.Tensor | None, start: int, stop: int) -> tuple[int, int] | torch.Tensor:
    if cols is None:
        return (start, stop)
    if isinstance(cols, tuple):
        return (cols[0] + start, cols[0] + stop)
    return cols[start:stop]


def resolve(key: str, spec: ArchSpec, shape: ModelShape) -> Site:
    """The Site of a cache key such as ``resid_out_3``, ``head_values_L2H5`` or ``pattern_L0H1``."""
    L = shape.num_hidden_layers

    def layer_path(i: int, rel: str | None = None) -> str:
        if not 0 <= i < L:
            raise ConfigError(f"{key!r}: layer {i} is out of range; the model has layers 0..{L - 1}.")
        return f"{spec.layers}.{i}" + (f".{rel}" if rel else "")

    if key in ("input_embeddings", "embed"):
        return Site(layer_path(0), "pre", "hidden", layer=0, kind="input_embeddings")
    if key == "last_layernorm":
        return Site(spec.final_norm, "pre", "hidden", kind="last_layernorm")
    m = _LAYER_KEY.match(key)
    if m:
        kind, i = m.group(1), int(m.group(2))
        if kind == "resid_mid" and spec.mid is None:
            raise ConfigError(
                f"{key!r}: this model uses a parallel residual (attention and MLP read the same input), so there "
                "is no residual between them. Use resid_in, attn_out and mlp_out instead."
            )
        where = {
            "resid_in": (None, "pre", "hidden"), "resid_out": (None, "out", "out0"),
            "resid_mid": (spec.mid, "pre", "hidden"), "attn_in": (spec.attn, "pre", "hidden"),
            "resid_in_post_layernorm": (spec.input_norm, "out", "out0") if spec.input_norm
            else (spec.attn, "pre", "hidden"),
            "attn_out": (spec.attn_out, "out", "out0"), "mlp_out": (spec.mlp_out, "out", "out0"),
        }[kind]
        return Site(layer_path(i, where[0]), where[1], where[2], layer=i, kind=kind)
    m = _QKV_KEY.match(key)
    if m:
        which, i = m.group(1), int(m.group(2))
        rel, cols = _qkv_cols(spec, shape, which)
        return Site(layer_path(i, rel), "out", "out0", cols, layer=i, kind=which)
    m = _HEAD_KEY.match(key) or _PROJECTED_KEY.match(key)
    if m:
        kind, i, h = m.group(1), int(m.group(2)), int(m.group(3))
        H, KV, hd = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
        if not 0 <= h < H:
            raise ConfigError(f"{key!r}: head {h} is out of range; layer {i} has heads 0..{H - 1}.")
        if kind == "pattern":
            return Site(layer_path(i, spec.attn), "out", "weights", layer=i, head=h, kind="pattern")
        if kind == "head_out":
            return Site(layer_path(i, spec.o_proj), "pre", "hidden", (h * hd, (h + 1) * hd), i, h, "head_out")
        which = {"head_queries": "queries", "query": "queries", "head_keys": "keys", "key": "keys",
                 "head_values": "values", "value": "values"}[kind]
        rel, cols = _qkv_cols(spec, shape, which)
        g = h if which == "queries" else h // (H // KV)
        kind_name = f"projected_{which}" if key.startswith("projected_") else f"head_{which}"
        return Site(layer_path(i, rel), "out", "out0", _sub_cols(cols, g * hd, (g + 1) * hd), i, h, kind_name)
    raise ConfigError(
        f"unknown activation key {key!r}. Known forms: input_embeddings, resid_in_{{i}}, resid_mid_{{i}}, "
        "resid_out_{i}, resid_in_post_layernorm_{i}, attn_in_{i}, attn_out_{i}, mlp_out_{i}, "
        "queries_L{i}/keys_L{i}/values_L{i}, head_queries_L{i}H{h}/head_keys_.../head_values_..., head_out_L{i}H{h}, "
        "projected_value_L{i}H{h} (and key/query), pattern_L{i}H{h}, last_layernorm."
    )


def take_cols(t: torch.Tensor, cols: tuple[int, int] | torch.Tensor | None) -> torch.Tensor:
    """``t[..., cols]`` for a Site's columns."""
    if cols is None:
        return t
    if isinstance(cols, tuple):
        return t[..., cols[0]:cols[1]]
    return t.index_select(-1, cols.to(t.device))


def pick(args: tuple, kwargs: dict[str, Any], output: Any, arg: Arg) -> torch.Tensor:
    """The tensor a Site refers to, from a hook's (args, kwargs, output)."""
    if arg == "hidden":
        return args[0] if args else kwargs["hidden_states"]
    if arg == "out0":
        return output[0] if isinstance(output, tuple) else output
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if weights is None:
        raise ConfigError("attention weights were not returned; patterns need eager attention for that call.")
    return weights
