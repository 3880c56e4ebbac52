"""An ArchSpec for a causal LM whose ``model_type`` is not in the registry: inferred from the module tree and the
config, and accepted only by proof (the load-time oracles below), never on trust.

Inference rules (the standard HF decoder layout; docs/provenance.md lists them with examples):

1. layers: the one ``nn.ModuleList`` of ``config.num_hidden_layers`` modules that each have an attention child
   (``self_attn``, ``attention`` or ``attn``).
2. embed / unembed: the modules HF itself returns from ``get_input_embeddings()`` / ``get_output_embeddings()``.
3. final norm: the child of the layers' parent named ``norm``, ``final_layernorm``, ``final_layer_norm``, ``ln_f``
   or ``norm_f``.
4. attention: ``q_proj``/``k_proj``/``v_proj`` (or one fused ``qkv_proj`` with ``[q | k | v]`` columns) and an
   output projection ``o_proj``, ``dense`` or ``out_proj``; MLP: ``mlp``, ``feed_forward`` or ``block_sparse_moe``.
5. residual wiring, from the norms a layer has: ``input_layernorm`` + ``post_attention_layernorm``: pre-norm,
   sequential (Llama); plus ``pre_feedforward_layernorm`` + ``post_feedforward_layernorm``: sandwich (Gemma-2);
   ``post_attention_layernorm`` + ``post_feedforward_layernorm`` without an input norm: post-norm (OLMo-2);
   ``input_layernorm`` alone: parallel residual (Cohere, Phi).
6. the final norm's formula (RMSNorm or LayerNorm; weight ``w`` or ``1 + w``): measured by feeding the module a
   probe when its weights are loaded, else guessed from its class name.
7. logit scaling the config declares: ``logit_scale`` (logits multiplied), ``logits_scaling`` (divided),
   ``final_logit_softcapping`` (``cap * tanh(logits / cap)``).

Proof (:func:`prove`, run by HookedModel on an inferred spec before it is usable): on a short sample, every
layer's ``resid_out`` equals HF's hidden state, the embedding equals ``hidden_states[0]``, ``resid_in + attn_out +
mlp_out == resid_out`` (and ``resid_in + attn_out == resid_mid``) in every layer, and the lens on the last layer
equals the model's logits (with the scaling and soft-capping above). Any mismatch refuses the model with an error
listing what did not match and the ``register()`` call to write instead.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from .architectures import ArchSpec
from .errors import UnsupportedArchitectureError

logger = logging.getLogger(__name__)

_ATTN = ("self_attn", "attention", "attn")
_MLP = ("mlp", "feed_forward", "block_sparse_moe")
_O_PROJ = ("o_proj", "dense", "out_proj")
_FINAL_NORM = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")
_EPS_ATTRS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon")
_LOGIT_SCALES = (("logit_scale", "mul"), ("logits_scaling", "div"))
SAMPLE_TOKENS = 8


def _child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that is a submodule of ``module``."""
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def _name_of(tree: nn.Module, target: Any) -> str | None:
    if target is None:
        return None
    return next((n for n, m in tree.named_modules() if m is target), None)


def _meta_model(config: Any) -> nn.Module:
    """The model's module tree on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot see the tree
        raise UnsupportedArchitectureError(
            f"model_type {getattr(config, 'model_type', None)!r} is not in the registry and transformers cannot "
            f"build its module tree to infer an entry ({type(exc).__name__}: {exc}). "
            + _how_to_register(getattr(config, "model_type", None), {})) from None


def _wiring(layer: nn.Module, attn: str, mlp: str) -> dict[str, Any] | None:
    """Residual wiring from the norms a decoder layer has (rule 5); None when it matches no known layout."""
    has = {n for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                       "post_feedforward_layernorm") if isinstance(getattr(layer, n, None), nn.Module)}
    if has == {"input_layernorm", "post_attention_layernorm"}:
        return dict(input_norm="input_layernorm", attn_out=attn, mlp_out=mlp, mid="post_attention_layernorm")
    if has == {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm"}:
        return dict(input_norm="input_layernorm", attn_out="post_attention_layernorm",
                    mlp_out="post_feedforward_layernorm", mid="pre_feedforward_layernorm")
    if has == {"post_attention_layernorm", "post_feedforward_layernorm"}:
        return dict(input_norm=None, attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
                    mid=mlp)
    if has == {"input_layernorm"}:
        return dict(input_norm="input_layernorm", attn_out=attn, mlp_out=mlp, mid=None)
    return None


def _find(tree: nn.Module, config: Any) -> tuple[dict[str, Any], list[str]]:
    """ArchSpec fields found in ``tree`` (rules 1-5, 7) and what could not be found."""
    found: dict[str, Any] = {}
    missing: list[str] = []
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    lists = [n for n, m in tree.named_modules()
             if isinstance(m, nn.ModuleList) and n_layers and len(m) == n_layers and len(m) and _child(m[0], _ATTN)]
    if len(lists) != 1:
        missing.append(f"one list of {n_layers} decoder layers with a {'/'.join(_ATTN)} child "
                       f"(found {lists or 'none'})")
        return found, missing
    found["layers"] = layers = lists[0]
    layer = tree.get_submodule(layers)[0]
    embed = _name_of(tree, tree.get_input_embeddings() if hasattr(tree, "get_input_embeddings") else None)
    unembed = _name_of(tree, tree.get_output_embeddings() if hasattr(tree, "get_output_embeddings") else None)
    if embed is None:
        missing.append("the input embedding (get_input_embeddings())")
    if unembed is None:
        missing.append("the unembedding (get_output_embeddings())")
    found.update({k: v for k, v in (("embed", embed), ("unembed", unembed)) if v is not None})
    parent = layers.rsplit(".", 1)[0] if "." in layers else ""
    norm = _child(tree.get_submodule(parent), _FINAL_NORM)
    if norm is None:
        missing.append(f"a final norm next to the layers ({parent or 'top level'}.{{{','.join(_FINAL_NORM)}}})")
    if norm is not None:
        found["final_norm"] = f"{parent}.{norm}" if parent else norm
    attn = _child(layer, _ATTN)
    attn_mod = getattr(layer, attn)
    found["attn"] = attn
    if all(isinstance(getattr(attn_mod, p, None), nn.Module) for p in ("q_proj", "k_proj", "v_proj")):
        found.update(qkv_layout="separate", q_proj=f"{attn}.q_proj", k_proj=f"{attn}.k_proj", v_proj=f"{attn}.v_proj")
    elif isinstance(getattr(attn_mod, "qkv_proj", None), nn.Module):
        found.update(qkv_layout="phi3", qkv_proj=f"{attn}.qkv_proj")
    else:
        missing.append(f"q_proj/k_proj/v_proj (or a fused qkv_proj) in {layers}.0.{attn}")
    o_proj = _child(attn_mod, _O_PROJ)
    if o_proj is None:
        missing.append(f"an output projection ({'/'.join(_O_PROJ)}) in {layers}.0.{attn}")
    if o_proj is not None:
        found["o_proj"] = f"{attn}.{o_proj}"
    mlp = _child(layer, _MLP)
    if mlp is None:
        missing.append(f"an MLP ({'/'.join(_MLP)}) in {layers}.0")
        return found, missing
    wiring = _wiring(layer, attn, mlp)
    if wiring is None:
        names = [n for n, m in layer.named_children() if "norm" in n.lower() or n.lower().startswith("ln")]
        missing.append(f"a known residual wiring: {layers}.0 has the norms {names} (rule 5 lists the known sets)")
    else:
        found.update(wiring)
    if norm is not None:
        found.update(_norm_guess(tree.get_submodule(found["final_norm"])))
    found["norm_eps_attr"] = next((a for a in _EPS_ATTRS if getattr(config, a, None) is not None), "rms_norm_eps")
    if getattr(config, "final_logit_softcapping", None) is not None:
        found["softcap_attr"] = "final_logit_softcapping"
    for attr, op in _LOGIT_SCALES:
        if getattr(config, attr, None) is not None:
            found.update(logit_scale_attr=attr, logit_scale_op=op)
            break
    return found, missing


def _norm_guess(module: nn.Module) -> dict[str, Any]:
    """Rule 6 without weights: the formula from the class (``LayerNorm`` or a name containing it: layernorm)."""
    name = type(module).__name__.lower()
    kind = "layernorm" if isinstance(module, nn.LayerNorm) or ("layernorm" in name and "rms" not in name) else "rms"
    return {"norm_kind": kind, "norm_offset": 0.0}


def _norm_eps(module: nn.Module, config: Any, attr: str) -> float:
    for a in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(module, a, None)
        if isinstance(v, (int, float)):
            return float(v)
    v = getattr(config, attr, None)
    return float(v) if v is not None else 1e-5


@torch.no_grad()
def _probe_norm(module: nn.Module, eps: float, hidden: int, dtype: torch.dtype) -> dict[str, Any] | None:
    """Rule 6 with weights: feed the module ``x [4, hidden]`` (non-zero mean) and keep the formula whose output
    matches; None when none does or the weights are not loaded here (offloaded to meta)."""
    from .lens_ops import final_norm

    params = list(module.parameters())
    if any(p.device.type == "meta" for p in params):
        return None
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params else dtype
    x = (torch.randn(4, hidden, generator=torch.Generator().manual_seed(0)) * 2 + 1).to(dtype)
    y = module(x.to(device)).float().cpu()
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    w = None if w is None else w.detach().float().cpu()
    b = None if b is None else b.detach().float().cpu()
    best: tuple[float, str, float] | None = None
    for kind in ("rms", "layernorm"):
        for offset in ((0.0, 1.0) if w is not None else (0.0,)):
            err = float((final_norm(x.float(), kind, w, b, eps, offset) - y).abs().max())
            if best is None or err < best[0]:
                best = (err, kind, offset)
    from .selfcheck import tolerance

    if best is None or not best[0] <= tolerance(dtype, float(y.abs().max())):
        return None
    return {"norm_kind": best[1], "norm_offset": best[2]}


def infer_spec(config: Any, model: nn.Module | None = None) -> ArchSpec:
    """An ``inferred=True`` ArchSpec from ``model``'s module tree (or one built on the meta device from ``config``).

    With ``model``'s weights loaded, the final norm's formula is measured (rule 6). Raises
    UnsupportedArchitectureError listing what is not in the standard layout. The spec still has to pass
    :func:`prove` before anything uses it (HookedModel does that at load time).
    """
    model_type = getattr(config, "model_type", None)
    tree = model if model is not None else _meta_model(config)
    found, missing = _find(tree, config)
    if missing:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not in the registry, and its module tree is not the standard decoder "
            f"layout an entry can be inferred from: missing {'; '.join(missing)}. "
            + _how_to_register(model_type, found))
    if model is not None:
        norm = tree.get_submodule(found["final_norm"])
        eps = _norm_eps(norm, config, found["norm_eps_attr"])
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
        probed = _probe_norm(norm, eps, int(hidden), next(tree.parameters()).dtype)
        if probed is None and not any(p.device.type == "meta" for p in norm.parameters()):
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} is not in the registry, and its final norm {found['final_norm']} "
                f"({type(norm).__name__}) computes neither RMSNorm nor LayerNorm (with weight w or 1 + w) on a probe, "
                "so the logit lens could not reproduce it. " + _how_to_register(model_type, found))
        found.update(probed or {})
    return ArchSpec(**found, inferred=True)


# ---------------------------------------------------------------------------------------------- proof
@torch.no_grad()
def oracles(model: Any) -> list[tuple[str, float, float]]:
    """The load-time oracles on ``model`` (a HookedModel) over one row of ``SAMPLE_TOKENS`` random tokens:
    ``[(check, max |diff|, tolerance), ...]``. Reference values come from plain HF (``hidden_states``, logits)."""
    from .config import ExtractionConfig
    from .lens import LogitLens
    from .selfcheck import tolerance

    spec, shape = model.spec, model.model_config
    L = shape.num_hidden_layers
    n = min(SAMPLE_TOKENS, int(getattr(model.hf_model.config, "max_position_embeddings", None) or SAMPLE_TOKENS))
    ids = torch.randint(0, shape.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    cfg = ExtractionConfig(extract_resid_in=True, extract_resid_out=True, extract_attn_out=True,
                           extract_mlp_out=True, extract_resid_mid=spec.mid is not None, save_logits=True)
    cache = model.forward({"input_ids": ids, "attention_mask": mask}, ["all"], extraction_config=cfg)
    dev = model.device
    out = model.hf_model(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True,
                         use_cache=False)
    hs = [h[0].float().cpu() for h in out.hidden_states]
    logits = out.logits[0].float().cpu()
    dtype = next(model.hf_model.parameters()).dtype
    act = {k: cache[k][0].float().cpu() for k in cache.tensor_keys() if k.startswith(("resid_", "attn_", "mlp_"))}
    checks: list[tuple[str, float, float]] = []

    def add(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        diff = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
        checks.append((name, diff, tolerance(dtype, float(want.abs().max()))))

    add("resid_in_0 vs HF hidden_states[0] (embedding)", act["resid_in_0"], hs[0])
    for i in range(L - 1):
        add(f"resid_out_{i} vs HF hidden_states[{i + 1}]", act[f"resid_out_{i}"], hs[i + 1])
    last = act[f"resid_out_{L - 1}"]
    normed = model.get_last_layernorm()(cache[f"resid_out_{L - 1}"])[0].float().cpu()
    # transformers 5 final-norms the last hidden state; older releases did not
    best = min(((normed, "final norm(resid_out_{0})"), (last, "resid_out_{0}")),
               key=lambda c: float((c[0] - hs[L]).abs().max()) if c[0].shape == hs[L].shape else float("inf"))
    add(f"{best[1].format(L - 1)} vs HF hidden_states[{L}]", best[0], hs[L])
    for i in range(L):
        add(f"layer {i}: resid_in + attn_out + mlp_out vs resid_out",
            act[f"resid_in_{i}"] + act[f"attn_out_{i}"] + act[f"mlp_out_{i}"], act[f"resid_out_{i}"])
        if spec.mid is not None:
            add(f"layer {i}: resid_in + attn_out vs resid_mid", act[f"resid_in_{i}"] + act[f"attn_out_{i}"],
                act[f"resid_mid_{i}"])
    lens = LogitLens.from_model(model)
    add(f"logit lens of resid_out_{L - 1} vs HF logits", lens.logits(cache[f"resid_out_{L - 1}"])[0].float().cpu(),
        logits)
    return checks


def prove(model: Any) -> None:
    """Accept ``model.spec`` (inferred) only if every oracle passes; else raise UnsupportedArchitectureError naming
    each failed check with its numbers and the ``register()`` call to write instead."""
    checks = oracles(model)
    failed = [(name, d, t) for name, d, t in checks if not d <= t]
    model_type = model.hf_model.config.model_type
    if failed:
        lines = "\n".join(f"  - {name}: max |diff| {d:.3g} > tolerance {t:.3g}" for name, d, t in failed)
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not in the registry; the entry inferred from its module tree failed "
            f"{len(failed)} of {len(checks)} load-time oracles:\n{lines}\nThe model computes something this entry "
            "does not describe (e.g. scaled residual branches, a different norm), or the entry is wrong. "
            + _how_to_register(model_type, _spec_fields(model.spec)))
    logger.info("model_type %r is not in the registry; the entry inferred from its module tree passed all %d "
                "load-time oracles: %s", model_type, len(checks), _snippet(model_type, _spec_fields(model.spec)))


# ---------------------------------------------------------------------------------------------- messages
def _spec_fields(spec: ArchSpec) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in fields(spec) if f.name not in ("inferred", "refuse")}


def _snippet(model_type: Any, found: dict[str, Any]) -> str:
    """``register("<type>", ArchSpec(...))`` with what was found, and ``<...>`` where something is missing."""
    required = ("layers", "embed", "final_norm", "attn", "o_proj", "input_norm", "attn_out", "mlp_out", "mid")
    defaults = {f.name: f.default for f in fields(ArchSpec)}
    parts = [f"{k}={found.get(k, '<' + k + '>')!r}" for k in required]
    parts += [f"{k}={v!r}" for k, v in found.items() if k not in required and k in defaults and v != defaults[k]]
    return f"register({model_type!r}, ArchSpec({', '.join(parts)}))"


def _how_to_register(model_type: Any, found: dict[str, Any]) -> str:
    return ("Register an entry that describes it (module paths relative to the model, or to one decoder layer): "
            "from easyroutine_dist.architectures import ArchSpec, register; " + _snippet(model_type, found) +
            " (see docs/provenance.md, 'Architectures outside the registry').")
