"""Apply Interventions (ablation, patching, steering) with forward hooks; called by HookedModel.forward/generate.

Sites come from ``sites.resolve``, so an intervention on a key edits exactly the tensor extraction reads for that
key: residual-style keys the whole hidden vector, per-head keys only the head's columns (fused q/k/v layouts
included; ``head_keys``/``head_values`` under GQA edit the head's kv group, which all query heads of the group
read). Positions use the extraction position language, resolved per row against the attention mask; only valid
slots are edited, so padding is never touched.

Order: intervention hooks are registered before extraction hooks, so extracting the key an intervention edits
returns the edited value. Exception: a ``head_out`` patch or steering is applied to ``o_proj``'s output (a
d_model vector cannot be written into one head's input), so the extracted ``head_out_L{i}H{h}`` (computed from
``o_proj``'s input) still shows the head's own value while ``attn_out``/``resid_*`` see the patched contribution.

Attention-pattern interventions (``pattern_L{i}H{h}``: "columns", "rows", "grid", and ``*_pre_softmax``) run
the attention of that layer through a registered attention function (``easyroutine_dist_edit``) that computes the
eager attention and edits the scores (pre-softmax) or the probabilities (post-softmax, rows renormalised to sum 1
when ``apply_softmax``) of that head only. Only that layer's attention module sees a copy of the config naming
the function; the model runs in eager attention for the call. Edits touch only entries the attention mask allows.

Prompt-only: during ``generate`` with a KV cache the hooks act on the prompt pass (whose length matches the
mask) and leave the later one-token steps alone.
"""

from __future__ import annotations

import copy
import weakref
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import ConfigError
from .intervention_spec import Intervention
from .positions import resolve_positions, validate_specs
from .sites import Site, pick, resolve

ATTN_FN_NAME = "easyroutine_dist_edit"
_PATTERN_TYPES = ("columns", "rows", "grid", "columns_pre_softmax", "rows_pre_softmax", "grid_pre_softmax")
_EDITS: "weakref.WeakKeyDictionary[torch.nn.Module, list[_PatternEdit]]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------- validation
def _site_width(site: Site, model: Any) -> int:
    """Width of the last dim an intervention on ``site`` reads/writes."""
    shape = model.model_config
    if site.kind == "head_out":
        return shape.hidden_size
    if isinstance(site.cols, tuple):
        return site.cols[1] - site.cols[0]
    if isinstance(site.cols, torch.Tensor):
        return int(site.cols.numel())
    return shape.hidden_size


def _grid_specs(iv: Intervention) -> tuple[list, list]:
    tp = iv.token_positions
    if not (isinstance(tp, (tuple, list)) and len(tp) == 2 and all(isinstance(p, (list, tuple)) for p in tp)):
        raise ConfigError(f"{iv.activation!r} type {iv.type!r}: token_positions must be a pair (row specs, "
                          "column specs), e.g. (['last'], [0, 1]).")
    return list(tp[0]), list(tp[1])


def _pattern_axes(iv: Intervention) -> tuple[list, list]:
    """(query-row specs, key-column specs) of a pattern intervention."""
    base = iv.type.removesuffix("_pre_softmax")
    if base == "grid":
        return _grid_specs(iv)
    if base == "columns":
        return ["all"], list(iv.token_positions)
    return list(iv.token_positions), ["all"]


def validate_interventions(interventions: list, model: Any) -> None:
    """Raise ConfigError/PositionError for any bad intervention before the model runs (unknown key, layer or head
    out of range, wrong type for the key, bad patching value or width, malformed positions)."""
    if not isinstance(interventions, (list, tuple)):
        raise ConfigError("interventions must be a list of Intervention objects.")
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise ConfigError(f"interventions must hold Intervention objects, got {type(iv).__name__}; build them "
                              "with easyroutine_dist.interpretability.Intervention(type=..., activation=..., ...).")
        site = resolve(iv.activation, model.spec, model.model_config)
        name = f"Intervention on {iv.activation!r}"
        if site.kind.startswith("projected_"):
            raise ConfigError(f"{name}: projected_* keys are read-only (derived through W_o); intervene on "
                              "head_values_L{i}H{h} or head_out_L{i}H{h} instead.")
        pv = iv.patching_values
        if isinstance(pv, str) and pv not in ("ablation", "steering"):
            raise ConfigError(f"{name}: patching_values={pv!r}; use None/'ablation', 'steering' or a tensor.")
        if pv is not None and not isinstance(pv, (str, torch.Tensor)):
            raise ConfigError(f"{name}: patching_values must be None, 'ablation', 'steering' or a torch.Tensor, "
                              f"got {type(pv).__name__}.")
        if not isinstance(iv.multiplication_value, (int, float)):
            raise ConfigError(f"{name}: multiplication_value must be a number.")
        if site.kind == "pattern":
            if iv.type not in _PATTERN_TYPES:
                raise ConfigError(f"{name}: type {iv.type!r} does not apply to attention patterns; use one of "
                                  f"{_PATTERN_TYPES}.")
            if pv == "steering":
                raise ConfigError(f"{name}: steering adds a vector and is not defined on attention patterns; use "
                                  "'ablation' or a tensor of pattern values.")
            if bool(getattr(model.hf_model.config, "reorder_and_upcast_attn", False)):
                raise ConfigError(f"{name}: GPT-2 with reorder_and_upcast_attn=True bypasses the attention "
                                  "interface; load the model with reorder_and_upcast_attn=False.")
            rows, cols = _pattern_axes(iv)
            validate_specs(rows), validate_specs(cols)
            continue
        if iv.type != "full":
            raise ConfigError(f"{name}: type {iv.type!r} applies only to pattern_L{{i}}H{{h}}; use type='full'.")
        validate_specs(list(iv.token_positions))
        width = _site_width(site, model)
        vec = iv.steering_vector if pv == "steering" else pv
        if pv == "steering" and not isinstance(vec, torch.Tensor):
            raise ConfigError(f"{name}: patching_values='steering' needs steering_vector=<tensor [{width}]>.")
        if isinstance(vec, torch.Tensor) and (vec.dim() not in (1, 2, 3) or vec.shape[-1] != width):
            raise ConfigError(f"{name}: the {'steering vector' if pv == 'steering' else 'patch'} has shape "
                              f"{tuple(vec.shape)}; it must be [{width}], [n_positions, {width}] or "
                              f"[batch, n_positions, {width}].")


# ---------------------------------------------------------------------------------------------- full edits
@dataclass
class _Slots:
    """The valid (row, seq) pairs of one intervention, flattened row-major: ``b``/``s`` are ``[n]`` long."""

    b: torch.Tensor
    s: torch.Tensor
    valid: torch.Tensor  # [batch, P] bool
    seq: int


def _slots(specs: list, mask: torch.Tensor, pivots: Any) -> _Slots:
    res = resolve_positions(validate_specs(list(specs)), mask, pivots)
    b, p = res.valid.nonzero(as_tuple=True)
    return _Slots(b, res.index[b, p], res.valid, mask.shape[1])


def _expand_values(v: torch.Tensor, slots: _Slots, width_name: str, name: str) -> torch.Tensor:
    """``[w]`` / ``[P, w]`` / ``[batch or 1, P, w]`` -> ``[n_valid, w]`` in slot order."""
    batch, P = slots.valid.shape
    if v.dim() == 1:
        v = v.expand(batch, P, -1)
    elif v.dim() == 2:
        if v.shape[0] != P:
            raise ConfigError(f"{name}: {width_name} has {v.shape[0]} positions but token_positions select {P}.")
        v = v.expand(batch, -1, -1)
    else:
        if v.shape[1] != P or v.shape[0] not in (1, batch):
            raise ConfigError(f"{name}: {width_name} has shape {tuple(v.shape)} but the intervention needs "
                              f"[{batch} (or 1), {P}, {v.shape[-1]}] (batch, positions selected, width).")
        v = v.expand(batch, -1, -1)
    return v[slots.valid]


def _edit_rows(t: torch.Tensor, slots: _Slots, cols: Any, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
               ) -> torch.Tensor:
    """A copy of ``t [batch, seq, W]`` whose valid slots (columns ``cols``) are replaced by ``op(sub, idx)``."""
    b, s = slots.b.to(t.device), slots.s.to(t.device)
    out = t.clone()
    sel = out[b, s]
    if cols is None:
        sel = op(sel)
    elif isinstance(cols, tuple):
        sel[:, cols[0]:cols[1]] = op(sel[:, cols[0]:cols[1]])
    else:
        c = cols.to(t.device)
        sel[:, c] = op(sel[:, c])
    out[b, s] = sel
    return out


def _make_op(iv: Intervention, slots: _Slots, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    pv = iv.patching_values
    if pv is None or pv == "ablation":
        m = float(iv.multiplication_value)
        return lambda x: x * m
    if pv == "steering":
        vec = _expand_values(iv.steering_vector, slots, "steering_vector", name)
        return lambda x: x + vec.to(x.device, x.dtype)
    vals = _expand_values(pv, slots, "patching_values", name)
    return lambda x: vals.to(x.device, x.dtype).expand_as(x).clone()


def _replace(args: tuple, kwargs: dict, output: Any, arg: str, new: torch.Tensor) -> Any:
    if arg == "hidden":
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


def _register_full(stack: ExitStack, model: Any, iv: Intervention, mask: torch.Tensor, pivots: Any) -> None:
    site = resolve(iv.activation, model.spec, model.model_config)
    name = f"Intervention on {iv.activation!r}"
    slots = _slots(iv.token_positions, mask, pivots)
    module = model.hf_model.get_submodule(site.module)
    batch = mask.shape[0]
    if site.kind == "head_out" and iv.patching_values is not None and not (
            isinstance(iv.patching_values, str) and iv.patching_values == "ablation"):
        _register_head_out_add(stack, model, iv, site, slots, module, name)
        return
    op = _make_op(iv, slots, name)

    def applies(t: torch.Tensor) -> bool:
        return t.dim() == 3 and t.shape[0] == batch and t.shape[1] == slots.seq

    if site.when == "pre":
        def pre_hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            t = pick(args, kwargs, None, "hidden")
            if not applies(t):
                return None
            return _replace(args, kwargs, None, "hidden", _edit_rows(t, slots, site.cols, op))

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def hook(mod: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            t = pick(args, kwargs, output, "out0")
            if not applies(t):
                return None
            return _replace(args, kwargs, output, "out0", _edit_rows(t, slots, site.cols, op))

        handle = module.register_forward_hook(hook, with_kwargs=True)
    stack.callback(handle.remove)


def _register_head_out_add(stack: ExitStack, model: Any, iv: Intervention, site: Site, slots: _Slots,
                           module: torch.nn.Module, name: str) -> None:
    """head_out patch (``out += patch - head_out``) or steering (``out += vector``) on o_proj's output."""
    from accelerate.utils import align_module_device

    steer = iv.patching_values == "steering"
    vals = _expand_values(iv.steering_vector if steer else iv.patching_values, slots,
                          "steering_vector" if steer else "patching_values", name)
    batch = slots.valid.shape[0]

    def hook(mod: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        out = pick(args, kwargs, output, "out0")
        if out.dim() != 3 or out.shape[0] != batch or out.shape[1] != slots.seq:
            return None
        b, s = slots.b.to(out.device), slots.s.to(out.device)
        delta = vals.to(out.device, out.dtype)
        if not steer:
            x = pick(args, kwargs, None, "hidden")[b, s, site.cols[0]:site.cols[1]]
            with align_module_device(mod, out.device):
                w = mod.weight.t() if model.spec.conv1d else mod.weight
                own = x.to(w.dtype) @ w[:, site.cols[0]:site.cols[1]].t()
            delta = delta - own.to(out.dtype)
        new = out.clone()
        new[b, s] = new[b, s] + delta
        return _replace(args, kwargs, output, "out0", new)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    stack.callback(handle.remove)


# ---------------------------------------------------------------------------------------------- patterns
@dataclass
class _PatternEdit:
    head: int
    b: torch.Tensor  # [n] rows of the batch
    q: torch.Tensor  # [n] query positions (absolute in the padded seq)
    k: torch.Tensor  # [n] key positions
    values: torch.Tensor | None  # [n] replacement values, or None (multiply)
    mult: float
    pre_softmax: bool
    renormalise: bool
    seq: int


def _pattern_edit(iv: Intervention, site: Site, mask: torch.Tensor, pivots: Any) -> _PatternEdit:
    rows_spec, cols_spec = _pattern_axes(iv)
    rows = resolve_positions(validate_specs(rows_spec), mask, pivots)
    cols = resolve_positions(validate_specs(cols_spec), mask, pivots)
    pair_valid = rows.valid[:, :, None] & cols.valid[:, None, :]  # [b, Pr, Pc]
    bi, ri, ci = pair_valid.nonzero(as_tuple=True)
    values = None
    pv = iv.patching_values
    if isinstance(pv, torch.Tensor):
        batch, Pr, Pc = pair_valid.shape
        v = pv
        if v.dim() == 2:
            v = v[None]
        if v.dim() != 3 or v.shape[1:] != (Pr, Pc) or v.shape[0] not in (1, batch):
            raise ConfigError(f"Intervention on {iv.activation!r}: the pattern patch has shape {tuple(pv.shape)}; "
                              f"it must be [{Pr}, {Pc}] or [{batch} (or 1), {Pr}, {Pc}] (rows x columns selected).")
        values = v.expand(batch, -1, -1)[bi, ri, ci].float()
    return _PatternEdit(site.head, bi, rows.index[bi, ri], cols.index[bi, ci], values, float(iv.multiplication_value),
                        iv.type.endswith("_pre_softmax"), bool(iv.apply_softmax), mask.shape[1])


def _allowed(attention_mask: torch.Tensor | None, b: int, q: int, k: int, device: torch.device) -> torch.Tensor:
    """``[b, q, k]`` bool: entries the attention mask lets through."""
    if attention_mask is None:
        return torch.ones(q, k, dtype=torch.bool, device=device).tril(k - q).expand(b, q, k)
    m = attention_mask[:, 0, :, :k] if attention_mask.dim() == 4 else attention_mask[..., :k]
    if m.dtype == torch.bool:
        return m.expand(b, q, k)
    return (m > torch.finfo(m.dtype).min / 2).expand(b, q, k)


def _apply_edits(w: torch.Tensor, edits: list[_PatternEdit], allowed: torch.Tensor, pre: bool) -> torch.Tensor:
    """Edit ``w [b, heads, q, k]`` (scores or probabilities) at the edits' entries the mask allows."""
    for e in edits:
        if e.pre_softmax != pre:
            continue
        b, q, k = e.b.to(w.device), e.q.to(w.device), e.k.to(w.device)
        ok = allowed[b, q, k]
        b, q, k = b[ok], q[ok], k[ok]
        head = w[:, e.head].clone()
        if e.values is None:
            head[b, q, k] = head[b, q, k] * e.mult
        else:
            head[b, q, k] = e.values.to(w.device)[ok].to(head.dtype)
        if not pre and e.renormalise:
            rows = torch.zeros(head.shape[:2], dtype=torch.bool, device=w.device)
            rows[b, q] = True
            sums = head.sum(-1, keepdim=True).clamp(min=torch.finfo(head.dtype).tiny)
            head = torch.where(rows[..., None], head / sums, head)
        w = w.clone()
        w[:, e.head] = head
    return w


def edited_eager_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with the pattern edits registered for ``module``.

    query ``[b, H, q, hd]``, key/value ``[b, KV, k, hd]`` (repeated to H for GQA), mask ``[b, 1, q, k]``
    additive or bool. Returns ``(output [b, q, H, hd], weights [b, H, q, k])`` like HF's eager functions.
    """
    if kwargs.get("s_aux") is not None:
        raise ConfigError("pattern interventions do not support attention sinks (s_aux).")
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        m = attention_mask[:, :, :, : key.shape[-2]]
        scores = scores + m if m.dtype != torch.bool else scores.masked_fill(~m, torch.finfo(scores.dtype).min)
    edits = [e for e in _EDITS.get(module, []) if e.seq == scores.shape[-2]]
    allowed = None
    if edits:
        allowed = _allowed(attention_mask, scores.shape[0], scores.shape[-2], scores.shape[-1], scores.device)
        scores = _apply_edits(scores, edits, allowed, pre=True)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if edits:
        weights = _apply_edits(weights, edits, allowed, pre=False)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _ensure_registered() -> None:
    from transformers import AttentionInterface

    if ATTN_FN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_FN_NAME, edited_eager_attention)


def _register_patterns(stack: ExitStack, model: Any, ivs: list[Intervention], mask: torch.Tensor,
                       pivots: Any) -> None:
    _ensure_registered()
    if model.hf_model.config._attn_implementation != "eager":
        stack.enter_context(model._attention(True))
    by_module: dict[str, list[_PatternEdit]] = {}
    for iv in ivs:
        site = resolve(iv.activation, model.spec, model.model_config)
        by_module.setdefault(site.module, []).append(_pattern_edit(iv, site, mask, pivots))
    for path, edits in by_module.items():
        module = model.hf_model.get_submodule(path)
        original = module.config
        patched = copy.copy(original)
        patched._attn_implementation_internal = ATTN_FN_NAME
        module.config = patched
        _EDITS[module] = edits

        def restore(mod: torch.nn.Module = module, cfg: Any = original) -> None:
            mod.config = cfg
            _EDITS.pop(mod, None)

        stack.callback(restore)


# ---------------------------------------------------------------------------------------------- entry point
def register_intervention_hooks(stack: ExitStack, model: Any, interventions: list[Intervention],
                                mask: torch.Tensor, pivot_positions: Any) -> None:
    """Register every intervention's hooks on ``model`` for one forward; ``stack`` removes them on exit.

    mask: the attention mask ``[batch, seq]`` the forward uses (positions are resolved against it).
    Shape mismatches (patch positions or batch) raise ConfigError here, before the model runs.
    """
    mask = torch.as_tensor(mask).long().cpu()
    patterns = []
    for iv in interventions:
        if resolve(iv.activation, model.spec, model.model_config).kind == "pattern":
            patterns.append(iv)
        else:
            _register_full(stack, model, iv, mask, pivot_positions)
    if patterns:
        _register_patterns(stack, model, patterns, mask, pivot_positions)
