"""A worker's partition as a pipeline: forward a batch, lens it, hand it to the shard writer, forward the next.

``stream_part`` runs ``HookedModel.extract_cache`` with an ``on_batch`` callback: each batch's cache is moved into
the part's slot layout, reduced by the logit lens when asked, and handed to a :class:`~..storage.streaming.PartStream`,
whose thread writes it as shards of the part while the next batch runs. ``put`` blocks when the batches waiting for
storage would exceed ``max_inflight_bytes`` (backpressure), so a worker holds at most that much of a partition, not
the whole partition. The record is returned after the last shard; the caller commits it (``RunWriter.commit_part``).

One slot layout per part, decided before the first forward. Variable-width position groups (``"all"``, ranges) are
as wide as a batch's longest selection, so two batches of a part can place a group at different slots. A part's
shards are concatenated by readers with no relayout, so every batch is moved (``slots.relayout``) into the part's
layout: each group as wide as its widest batch, computed up front from the tokens and masks alone with the
forward's own ``resolve_positions`` (:func:`part_widths`). ``finish_layout`` checks, after the last batch, that
the batches' own layouts merge into exactly that layout; a mismatch fails the part (nothing is committed).
"""

from __future__ import annotations

from typing import Any, Optional

from ..cache import ActivationCache
from ..errors import ConfigError
from ..positions import resolve_positions, validate_specs
from ..slots import LAYOUT_KEY, PATTERN_AXES, POS, SlotLayout, mapping_of, relayout
from .lensing import apply_lens, needed_keys

Widths = dict[str, dict[str, int]]

__all__ = ["part_widths", "PartLayout", "lens_batch", "stream_part"]


def part_widths(model: Any, batches: list[dict[str, Any]], target_token_positions: list, cfg: Any,
                seed: int = 0, row_offset: int = 0) -> Widths:
    """``{axis: {group: width}}``: each position group's width over every batch of a part (its widest batch), on
    each slot axis a forward of ``cfg`` produces (``"pos"``, and the pattern axes). Only masks are read."""
    specs = validate_specs(list(target_token_positions))
    row_specs = (validate_specs(list(cfg.attn_pattern_row_positions))
                 if getattr(cfg, "attn_pattern_row_positions", None) is not None else None)
    cols: dict[str, int] = {}
    rows: dict[str, int] = {}
    offset = int(row_offset)
    for batch in batches:
        _, mask = model._prepare({k: batch[k] for k in ("input_ids", "attention_mask") if k in batch})
        pivots = batch.get("pivot_positions")
        for out, sp in ((cols, specs), (rows, row_specs)):
            if sp is None:
                continue
            res = resolve_positions(sp, mask, pivots, seed=seed, row_offset=offset)
            for g, slots in res.mapping_index.items():
                out[g] = max(out.get(g, 0), len(slots))
        offset += int(mask.shape[0])
    return {POS: {g: 1 for g in cols} if getattr(cfg, "avg", False) else dict(cols),
            PATTERN_AXES[0]: dict(rows) if row_specs is not None else dict(cols), PATTERN_AXES[1]: dict(cols)}


class PartLayout:
    """Moves each batch's cache into the part's layout and keeps what the part's record info needs."""

    def __init__(self, widths: Widths) -> None:
        self.widths = widths
        self.seen: Optional[SlotLayout] = None  # the batches' own layouts, merged (what a concatenation gives)
        self.target: Optional[SlotLayout] = None
        self.token_dict: dict[str, list] = {}

    def conform(self, cache: ActivationCache) -> ActivationCache:
        """``cache`` (one batch, in place) with every position axis in the part's layout; padded slots 0/False."""
        token_dict = cache.get("token_dict")
        if isinstance(token_dict, dict):
            for g, sel in token_dict.items():
                self.token_dict.setdefault(g, []).extend(sel)
        src = cache.layout()
        if src is None:
            return cache
        self.seen = src if self.seen is None else self.seen.merge(src)
        dst = SlotLayout({a: [(g, self.widths.get(a, {}).get(g, w)) for g, w in groups]
                          for a, groups in src.axes.items()}, dict(src.keys))
        for a, groups in src.axes.items():
            for (g, w), (_, wd) in zip(groups, dst.axes[a]):
                if w > wd:
                    raise ConfigError(f"position group {g!r} is {w} slots wide in a batch but the part's layout, "
                                      f"computed before the forward, gives it {wd}; this is a bug, please report it.")
        for k in cache.tensor_keys():
            cache[k] = relayout(cache[k], k, src, dst)
        cache[LAYOUT_KEY] = dst.to_json()
        if POS in dst.axes:
            cache["mapping_index"] = mapping_of(dst.axes[POS])
        self.target = dst if self.target is None else self.target
        return cache

    def check(self) -> None:
        """The part's layout is exactly the merge of its batches' layouts (as concatenating them would give)."""
        if self.seen is not None and self.target is not None and self.seen.axes != self.target.axes:
            raise ConfigError(f"the part's slot layout {self.target.axes} differs from its batches' merged layout "
                              f"{self.seen.axes}; this is a bug, please report it.")


def lens_batch(lens: Any, cache: ActivationCache, lens_cfg: dict[str, Any],
               directions: Optional[list[Any]]) -> ActivationCache:
    """Apply the logit lens to one batch's cache ``{key: [rows, P, d]}`` (in place): add its outputs ``[rows, P, k]``
    on the activations' position axis, and drop the activations it read unless ``keep_activations``."""
    lensed = apply_lens(lens, cache, lens_cfg, directions)
    if not lens_cfg["keep_activations"]:
        for k in needed_keys(lens_cfg, cache.tensor_keys()):
            del cache[k]
    for k, v in lensed.items():
        cache[k] = v
    lay = cache.layout()
    if lay is not None:
        lay.add_keys(list(lensed))
        cache[LAYOUT_KEY] = lay.restrict(cache.tensor_keys()).to_json()
    return cache


def stream_part(model: Any, stream: Any, batches: list[dict[str, Any]], target_token_positions: list, cfg: Any, *,
                interventions: Optional[list] = None, position_seed: int = 0, row_offset: int = 0,
                lens: Any = None, lens_cfg: Optional[dict[str, Any]] = None,
                directions: Optional[list[Any]] = None) -> dict[str, Any]:
    """Forward ``batches`` (rows ``row_offset...`` of the dataset) and hand each batch to ``stream`` (a PartStream)
    in the part's layout as it completes; return the part's record info (``mapping_index``, ``token_dict``,
    ``slot_layout``, ``metadata``) once the last batch is handed over. ``finish`` is the caller's."""
    averaged = bool(getattr(cfg, "avg_over_example", False))  # one [1, ...] mean per part: nothing to stream
    shaper = PartLayout(part_widths(model, batches, target_token_positions, cfg, position_seed, row_offset))
    done: list[Any] = [0, {}]  # rows handed over, the last batch's info

    def on_batch(cache: ActivationCache) -> None:
        rows = next((int(cache[k].shape[0]) for k in cache.tensor_keys() if cache[k].dim() > 0), 0)
        shaper.conform(cache)
        if lens_cfg is not None:
            d = None if directions is None else list(directions[done[0]:done[0] + rows])
            lens_batch(lens, cache, lens_cfg, d)
        done[0] += rows
        tensors, info = cache.to_flat()
        done[1] = info
        stream.put(tensors, info)

    result = model.extract_cache(batches, target_token_positions, extraction_config=cfg,
                                 interventions=interventions, position_seed=position_seed, row_offset=row_offset,
                                 on_batch=None if averaged else on_batch)
    meta = dict(result.get("metadata") or {})
    for k in ("n_examples", "n_batches"):  # per-part counts would be wrong for the whole run
        meta.pop(k, None)
    if averaged:
        result["metadata"] = meta
        if lens_cfg is not None:
            lens_batch(lens, result, lens_cfg, directions)
        tensors, info = result.to_flat()
        stream.put(tensors, info)
        return info
    shaper.check()
    last = done[1]
    info = {k: last[k] for k in ("mapping_index",) if k in last}
    if shaper.token_dict:
        info["token_dict"] = shaper.token_dict
    if LAYOUT_KEY in last:  # the part's layout, with the lens' keys when a lens ran: the same for every batch
        info[LAYOUT_KEY] = last[LAYOUT_KEY]
    info["metadata"] = meta
    return info
