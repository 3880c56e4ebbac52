"""Per-architecture knowledge, as data: one ArchSpec per HF ``model_type``.

Module paths are relative to the HF model (``layers``, ``final_norm``, ``unembed``, ``embed``) or to one decoder
layer (everything else). Adding an architecture means adding one entry with ``register`` and one tiny config to the
test matrix. A model whose config uses a feature the entry does not handle is refused with
UnsupportedArchitectureError instead of being silently mis-hooked; a ``model_type`` that is not here gets an entry
inferred from its module tree (``infer_arch``), accepted only by proof (the load-time oracles), else refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from .errors import UnsupportedArchitectureError

QKVLayout = Literal["separate", "gpt2", "neox", "phi3"]


@dataclass(frozen=True)
class ArchSpec:
    """Where each activation lives in one architecture.

    qkv_layout: "separate" (q_proj/k_proj/v_proj), "gpt2" (fused Conv1D ``[q|k|v]``), "neox" (fused Linear, per head
        ``[q_h|k_h|v_h]``), "phi3" (fused Linear ``[q|k|v]`` with GQA sizes).
    attn_out: module whose output (first element if a tuple) is exactly the term the block adds to the residual.
    mlp_out: same for the MLP branch.
    input_norm: the pre-attention norm (None for post-norm blocks, whose attention reads the raw residual).
    mid: module whose first input is the residual between the attention and MLP branches (None: parallel residual).
    norm_kind / norm_offset / norm_eps_attr: how the final norm computes, for a lens saved without the model
        (Gemma's RMSNorm multiplies by ``1 + w``: offset 1.0).
    """

    layers: str
    embed: str
    final_norm: str
    attn: str
    o_proj: str
    input_norm: str | None
    attn_out: str
    mlp_out: str
    mid: str | None
    qkv_layout: QKVLayout = "separate"
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    qkv_proj: str | None = None
    unembed: str = "lm_head"
    norm_kind: Literal["rms", "layernorm"] = "rms"
    norm_offset: float = 0.0
    norm_eps_attr: str = "rms_norm_eps"
    conv1d: bool = False
    softcap_attr: str | None = None
    # (config attribute, predicate on its value, why it is refused)
    refuse: tuple[tuple[str, Callable[[Any], bool], str], ...] = field(default=())
    # final logits = lm_head(norm(x)) * config.<logit_scale_attr> ("mul", Cohere) or / it ("div", Granite)
    logit_scale_attr: str | None = None
    logit_scale_op: Literal["mul", "div"] = "mul"
    # True: inferred from the module tree (infer_arch), accepted only once the load-time oracles pass
    inferred: bool = False


_LLAMA_LIKE = dict(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    attn="self_attn",
    o_proj="self_attn.o_proj",
    input_norm="input_layernorm",
    attn_out="self_attn",
    mlp_out="mlp",
    mid="post_attention_layernorm",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
)
# Gemma-2/3: the attention and MLP outputs pass through their own norms before joining the residual
_SANDWICH = {**_LLAMA_LIKE, "attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm",
             "mid": "pre_feedforward_layernorm", "norm_offset": 1.0}


def _truthy(v: Any) -> bool:
    return bool(v)


REGISTRY: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f", attn="attn",
        o_proj="attn.c_proj", input_norm="ln_1", attn_out="attn", mlp_out="mlp", mid="ln_2",
        qkv_layout="gpt2", qkv_proj="attn.c_attn", norm_kind="layernorm", norm_eps_attr="layer_norm_epsilon",
        conv1d=True,
        refuse=(("add_cross_attention", _truthy, "cross-attention blocks are not hooked"),),
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
        attn="attention", o_proj="attention.dense", input_norm="input_layernorm", attn_out="attention",
        mlp_out="mlp", mid="post_attention_layernorm", qkv_layout="neox", qkv_proj="attention.query_key_value",
        norm_kind="layernorm", norm_eps_attr="layer_norm_eps",
    ),
    "llama": ArchSpec(**_LLAMA_LIKE),
    "mistral": ArchSpec(**_LLAMA_LIKE),
    "qwen2": ArchSpec(**_LLAMA_LIKE),
    "qwen3": ArchSpec(**_LLAMA_LIKE),
    "gemma": ArchSpec(**{**_LLAMA_LIKE, "norm_offset": 1.0}),
    "gemma2": ArchSpec(**_SANDWICH, softcap_attr="final_logit_softcapping"),
    "gemma3_text": ArchSpec(**_SANDWICH, softcap_attr="final_logit_softcapping"),
    "phi3": ArchSpec(**{**_LLAMA_LIKE, "qkv_layout": "phi3", "qkv_proj": "self_attn.qkv_proj",
                        "q_proj": None, "k_proj": None, "v_proj": None}),
    # OLMo-2 is post-norm: the branch outputs are normed, then added; the MLP reads the raw residual
    "olmo2": ArchSpec(**{**_LLAMA_LIKE, "attn_out": "post_attention_layernorm",
                         "mlp_out": "post_feedforward_layernorm", "mid": "mlp", "input_norm": None}),
}


def register(model_type: str, spec: ArchSpec, clobber: bool = False) -> None:
    """Add ``spec`` for HF ``config.model_type == model_type``; refuses to replace an entry unless ``clobber``."""
    if model_type in REGISTRY and not clobber:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is already registered; pass clobber=True to replace it."
        )
    if not isinstance(spec, ArchSpec):
        raise UnsupportedArchitectureError(f"register({model_type!r}, spec): spec must be an ArchSpec.")
    REGISTRY[model_type] = spec


def spec_for(config: Any, model: Any = None) -> ArchSpec:
    """The ArchSpec for an HF config, with the config-dependent parts resolved (e.g. NeoX parallel residual).

    A ``model_type`` outside the registry is inferred from the module tree (``model``, or one built on the meta
    device from ``config``) when it has the standard layout; such a spec has ``inferred=True`` and HookedModel
    accepts it only after the load-time oracles pass (``infer_arch.prove``). Otherwise UnsupportedArchitectureError.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        from .infer_arch import infer_spec

        return infer_spec(config, model)
    spec = REGISTRY[model_type]
    for attr, bad, why in spec.refuse:
        if bad(getattr(config, attr, None)):
            raise UnsupportedArchitectureError(
                f"{model_type} config has {attr}={getattr(config, attr)!r}: {why}. Use a config without it, or "
                "register an ArchSpec that handles it."
            )
    if model_type == "gpt_neox" and getattr(config, "use_parallel_residual", True):
        spec = dataclasses.replace(spec, mid=None)
    return spec


@dataclass(frozen=True)
class ModelShape:
    """The config numbers every part of the library needs, under one set of names."""

    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_size: int
    head_dim: int
    vocab_size: int
    model_type: str

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
        n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or hidden // n_heads
        return cls(int(n_layers), int(n_heads), int(n_kv), int(hidden), int(head_dim), int(config.vocab_size),
                   str(config.model_type))

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per key/value head (GQA): query head h reads kv head ``h // num_key_value_groups``."""
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
