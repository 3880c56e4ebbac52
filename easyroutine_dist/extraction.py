"""Turn an ExtractionConfig into hooks, run them, and post-process what they captured.

Every hook gathers the target positions first (``[batch, seq, d] -> [batch, P, d]``), so the cost of extraction
is proportional to what is asked for, not to the sequence length.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import align_module_device

from .architectures import ArchSpec, ModelShape
from .config import ExtractionConfig
from .errors import ConfigError
from .sites import Site, pick, resolve, take_cols
from .slots import PATTERN_COL_VALID_KEY, PATTERN_ROW_VALID_KEY, POS, VALID_KEY, SlotLayout, mapping_of

_MASK_OF = {POS: VALID_KEY, "pattern_rows": PATTERN_ROW_VALID_KEY, "pattern_cols": PATTERN_COL_VALID_KEY}

_PER_LAYER = {
    "extract_resid_in": "resid_in_{i}", "extract_resid_mid": "resid_mid_{i}", "extract_resid_out": "resid_out_{i}",
    "extract_resid_in_post_layernorm": "resid_in_post_layernorm_{i}", "extract_attn_in": "attn_in_{i}",
    "extract_attn_out": "attn_out_{i}", "extract_mlp_out": "mlp_out_{i}", "extract_values": "values_L{i}",
    "extract_keys": "keys_L{i}", "extract_queries": "queries_L{i}",
}
_PER_HEAD = {
    "extract_head_values": "head_values_L{i}H{h}", "extract_head_keys": "head_keys_L{i}H{h}",
    "extract_head_queries": "head_queries_L{i}H{h}", "extract_head_out": "head_out_L{i}H{h}",
    "extract_head_values_projected": "projected_value_L{i}H{h}",
    "extract_head_keys_projected": "projected_key_L{i}H{h}",
    "extract_head_queries_projected": "projected_query_L{i}H{h}", "extract_attn_pattern": "pattern_L{i}H{h}",
}


def requested_keys(cfg: ExtractionConfig, shape: ModelShape) -> list[str]:
    """Every activation key ``cfg`` asks for, in a stable order."""
    L, H = shape.num_hidden_layers, shape.num_attention_heads
    keys: list[str] = []
    if cfg.extract_embed:
        keys.append("input_embeddings")
    if cfg.attn_heads == "all":
        heads = [(i, h) for i in range(L) for h in range(H)]
    else:
        heads = [(int(d["layer"]), int(d["head"])) for d in cfg.attn_heads]
    for i in range(L):
        keys += [tpl.format(i=i) for flag, tpl in _PER_LAYER.items() if getattr(cfg, flag)]
    for flag, tpl in _PER_HEAD.items():
        if getattr(cfg, flag):
            keys += [tpl.format(i=i, h=h) for i, h in heads]
    if cfg.extract_last_layernorm:
        keys.append("last_layernorm")
    return keys


@dataclass
class Gathered:
    """Positions of one forward: ``index``/``valid`` are ``[batch, P]``; rows/cols index patterns.

    Built on the host before the forward. Each device a hook runs on gets one copy of the indices per batch (the
    first hook there makes it), and whether any slot is padding is known on the host, so no hook synchronises with
    the device.
    """

    index: torch.Tensor
    valid: torch.Tensor
    row_index: torch.Tensor
    row_valid: torch.Tensor

    def __post_init__(self) -> None:
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self.all_valid = bool(self.valid.all())
        self.rows_all_valid = bool(self.row_valid.all())

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(index, valid, row_index, row_valid)`` on ``device`` (copied once per device per batch)."""
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = tuple(t.to(device, non_blocking=True) for t in
                                     (self.index, self.valid, self.row_index, self.row_valid))
        return self._on[device]  # type: ignore[return-value]

    def take(self, t: torch.Tensor, rows: bool = False) -> torch.Tensor:
        """``[batch, seq, ...] -> [batch, P, ...]`` at the target positions; invalid slots are zero."""
        index, valid, row_index, row_valid = self.on(t.device)
        if rows:
            index, valid = row_index, row_valid
        out = t[torch.arange(t.shape[0], device=t.device)[:, None], index]
        return self.zero_padding(out, valid, self.rows_all_valid if rows else self.all_valid)

    @staticmethod
    def zero_padding(out: torch.Tensor, valid: torch.Tensor, all_valid: bool) -> torch.Tensor:
        """Zero the padded slots of ``out`` ``[batch, P, ...]`` (``valid`` ``[batch, P]`` on its device)."""
        if all_valid:
            return out
        return out * valid.reshape(*valid.shape, *([1] * (out.dim() - 2))).to(out.dtype)

    def take_pattern(self, w: torch.Tensor) -> torch.Tensor:
        """``[batch, heads, q, k] -> [batch, heads, P_rows, P]`` (rows: row positions, columns: target positions)."""
        index, valid, row_index, row_valid = self.on(w.device)
        b, n_heads = w.shape[:2]
        rows = row_index[:, None, :, None].expand(b, n_heads, -1, w.shape[-1])
        w = w.gather(2, rows)
        cols = index[:, None, None, :].expand(b, n_heads, w.shape[2], -1)
        w = w.gather(3, cols)
        if self.all_valid and self.rows_all_valid:
            return w
        mask = row_valid[:, None, :, None] & valid[:, None, None, :]
        return w * mask.to(w.dtype)


def to_host(out: dict[str, Any]) -> dict[str, Any]:
    """Move every device tensor of ``out`` to the host at once: ``non_blocking`` copies into pinned memory, then one
    stream synchronisation (a no-op for CPU tensors)."""
    moved, sync = {}, False
    for k, v in out.items():
        if isinstance(v, torch.Tensor) and v.device.type != "cpu":
            host = torch.empty(v.shape, dtype=v.dtype, pin_memory=v.device.type == "cuda")
            moved[k] = host.copy_(v, non_blocking=True)
            sync = sync or v.device.type == "cuda"
        else:
            moved[k] = v
    if sync:
        torch.cuda.synchronize()
    return moved


def _o_proj_weight(module: torch.nn.Module, conv1d: bool) -> torch.Tensor:
    """W_o as ``[d_model, n_heads * head_dim]`` (GPT-2's Conv1D stores the transpose)."""
    w = module.weight
    return w.t() if conv1d else w


class Extractor:
    """Registers the hooks for one forward and collects ``{key: tensor}`` into ``self.out``."""

    def __init__(self, model: torch.nn.Module, spec: ArchSpec, shape: ModelShape, sites: list[tuple[str, Site]],
                 gathered: Gathered, detach: bool) -> None:
        self.model, self.spec, self.shape = model, spec, shape
        self.gathered, self.detach = gathered, detach
        self.out: dict[str, torch.Tensor] = {}
        self.sites: dict[tuple[str, str], list[tuple[str, Site]]] = defaultdict(list)
        for key, site in sites:  # keys sharing a hook point share one hook and one gather
            self.sites[(site.module, site.when)].append((key, site))

    def _store(self, key: str, value: torch.Tensor) -> None:
        """Keep ``value`` on its device: moving per hook would synchronise; ``to_host`` moves all after the forward."""
        self.out[key] = value.detach() if self.detach else value

    def _handle(self, module: torch.nn.Module, items: list[tuple[str, Site]], args: tuple, kwargs: dict,
                output: Any) -> Any:
        """Capture every key of one hook point; returns replacement (args, kwargs) only for keep_gradient."""
        replacement = None
        gathered_cache: dict[str, torch.Tensor] = {}
        for key, site in items:
            if site.arg == "weights":
                w = pick(args, kwargs, output, "weights")
                if "w" not in gathered_cache:
                    gathered_cache["w"] = self.gathered.take_pattern(w)
                self._store(key, gathered_cache["w"][:, site.head])
                continue
            if site.kind == "input_embeddings" and not self.detach:
                replacement = self._embeddings_with_grad(key, args, kwargs)
                continue
            if "t" not in gathered_cache:
                gathered_cache["t"] = self.gathered.take(pick(args, kwargs, output, site.arg))
            value = take_cols(gathered_cache["t"], site.cols)
            if site.kind == "head_out" or site.kind.startswith("projected_"):
                value = self._through_o_proj(value, site)
            self._store(key, value)
        return replacement

    def _embeddings_with_grad(self, key: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """keep_gradient: put the gathered embeddings back into the stream so that they are upstream of the
        logits and ``cache["input_embeddings"].grad`` is filled by ``backward()``. Slots of variable-length
        groups that are not valid repeat a real position instead of being zeroed."""
        h = pick(args, kwargs, None, "hidden")
        index = self.gathered.on(h.device)[0]
        rows = torch.arange(h.shape[0], device=h.device)[:, None].expand_as(index)
        g = h[rows, index]
        self.out[key] = g
        h = h.index_put((rows, index), g)
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    def _through_o_proj(self, x: torch.Tensor, site: Site) -> torch.Tensor:
        """Head h's ``[b, P, head_dim]`` times its slice of W_o: ``[b, P, d_model]`` (no bias)."""
        hd = self.shape.head_dim
        o_proj = self.model.get_submodule(f"{self.spec.layers}.{site.layer}.{self.spec.o_proj}")
        # offloaded modules keep their weights on `meta` outside their own forward
        with align_module_device(o_proj, x.device):
            w = _o_proj_weight(o_proj, self.spec.conv1d)[:, site.head * hd:(site.head + 1) * hd]
            return x.to(w.dtype) @ w.t()

    def register(self, stack: ExitStack) -> None:
        """Register every hook; ``stack`` removes them on any exit path."""
        for (path, when), items in self.sites.items():
            module = self.model.get_submodule(path)

            def hook(mod, args, kwargs, output=None, _items=items):  # noqa: ANN001
                return self._handle(mod, _items, args, kwargs, output)

            if when == "pre":
                handle = module.register_forward_pre_hook(
                    lambda mod, args, kwargs, _h=hook: _h(mod, args, kwargs), with_kwargs=True)
            else:
                handle = module.register_forward_hook(lambda *a, _h=hook: _h(*a) and None, with_kwargs=True)
            stack.callback(handle.remove)


def _slot_weight(key: str, v: torch.Tensor, layout: SlotLayout, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """1.0 on real slots, 0.0 on padded ones, shaped to broadcast against ``v`` ``[batch, slots..., ...]``."""
    axes = layout.keys.get(key, ())
    w = torch.ones(v.shape[0], *([1] * (v.dim() - 1)), dtype=torch.float32, device=v.device)
    for dim, axis in enumerate(axes, start=1):
        m = masks[_MASK_OF[axis]].to(v.device, torch.float32)
        shape = [v.shape[0]] + [1] * (v.dim() - 1)
        shape[dim] = m.shape[1]
        w = w * m.reshape(shape)
    return w


def example_sums(out: dict[str, Any], layout: SlotLayout,
                 masks: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per key, the float64 sum over the batch of real slots ``[1, ...]`` and how many rows were real there."""
    sums = {}
    for key, v in out.items():
        if not isinstance(v, torch.Tensor) or v.dim() < 1 or key in masks:
            continue
        w = _slot_weight(key, v, layout, masks).double()
        sums[key] = ((v.double() * w).sum(0, keepdim=True), w.sum(0, keepdim=True))
    return sums


def reduce_positions(out: dict[str, Any], cfg: ExtractionConfig, layout: SlotLayout,
                     masks: dict[str, torch.Tensor]) -> None:
    """Apply ``avg`` (mean over the real slots of each position group: P -> n_groups) and ``avg_over_example``
    (mean over the rows that are real at each slot: batch -> 1), in place on ``out``, ``layout`` and ``masks``."""
    if cfg.avg:
        groups = mapping_of(layout.axes[POS])
        valid = masks[VALID_KEY]
        for key, v in out.items():
            if layout.keys.get(key) != (POS,) or key in masks:
                continue
            parts = []
            for slots in groups.values():
                m = valid[:, slots].to(v.device, v.dtype).reshape(v.shape[0], len(slots), *([1] * (v.dim() - 2)))
                parts.append((v[:, slots] * m).sum(1) / m.sum(1).clamp(min=1))
            out[key] = torch.stack(parts, dim=1)
        masks[VALID_KEY] = torch.stack([valid[:, slots].any(1) for slots in groups.values()], dim=1)
        layout.axes[POS] = [(name, 1) for name, _ in layout.axes[POS]]
    if cfg.avg_over_example:
        for key, (total, count) in example_sums(out, layout, masks).items():
            v = out[key]
            mean = total / count.clamp(min=1)
            out[key] = mean.to(v.dtype) if v.is_floating_point() else v[:1]
        for name, m in masks.items():
            masks[name] = m.any(0, keepdim=True)


def reduce_patterns(out: dict[str, Any], cfg: ExtractionConfig, row_groups: dict[str, list[int]],
                    col_groups: dict[str, list[int]], row_abs: torch.Tensor, row_valid: torch.Tensor,
                    col_valid: torch.Tensor) -> None:
    """``attn_pattern_avg``: reduce each pattern ``[b, P_rows, P]`` over (row group, column group) blocks, over
    real (row, column) slot pairs only.

    "mean"/"sum" give ``[b, G_rows, G_cols]``; "baseline_ratio" divides the block mean by the mean a uniform causal
    attention (``1 / (q + 1)`` at real-token position q) would give over the same block's real rows.
    """
    if cfg.attn_pattern_avg == "none":
        return
    for key in [k for k in out if k.startswith("pattern_")]:
        w = out[key]
        rv, cv = row_valid.to(w.device, w.dtype), col_valid.to(w.device, w.dtype)
        blocks = []
        for rs in row_groups.values():
            row = []
            for cs in col_groups.values():
                m = rv[:, rs][:, :, None] * cv[:, cs][:, None, :]
                total = (w[:, rs][:, :, cs] * m).sum((1, 2))
                if cfg.attn_pattern_avg == "sum":
                    row.append(total)
                    continue
                mean = total / m.sum((1, 2)).clamp(min=1)
                if cfg.attn_pattern_avg == "baseline_ratio":
                    r = rv[:, rs]
                    base = ((1.0 / (row_abs[:, rs].to(w.device, w.dtype) + 1)) * r).sum(1) / r.sum(1).clamp(min=1)
                    mean = mean / base
                row.append(mean)
            blocks.append(torch.stack(row, dim=1))
        out[key] = torch.stack(blocks, dim=1)


def check_config(cfg: ExtractionConfig, spec: ArchSpec, shape: ModelShape) -> list[tuple[str, Site]]:
    """Every requested key with its Site, resolved once (ConfigError on the first bad one, before any forward)."""
    if not isinstance(cfg, ExtractionConfig):
        raise ConfigError(f"extraction_config must be an ExtractionConfig, got {type(cfg).__name__}.")
    return [(key, resolve(key, spec, shape)) for key in requested_keys(cfg, shape)]


