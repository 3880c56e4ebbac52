"""The slot layout: where each position group lives on the position axes of a cache, and which slots are real.

A forward resolves ``target_token_positions`` into groups concatenated on a position axis (``P``). Fixed-width
groups (``"last"``, an int, ``"random-text-3"``) have the same width in every batch; variable-width groups
(``"all"``, ranges, partitions) are as wide as the longest selection *of that batch*. Two batches, or two parts of
a run, can therefore place the same group at different slots. The layout makes that explicit, so concatenation is
exact instead of end-padding:

* ``cache["slot_layout"]`` (JSON, stored with every part) names the position axes and their groups in order,
  each with its width in this cache, and which tensor keys carry which axes on dims ``1..n``::

      {"axes": {"pos": [["last", 1], ["all", 7]]},
       "keys": {"pos": ["resid_out_0", "logits", "valid_mask"]}}

  Axis ``"pos"`` is the one ``mapping_index`` describes. Unreduced attention patterns ``[batch, rows, cols]`` use
  the axes ``"pattern_rows"`` and ``"pattern_cols"`` (key group ``"pattern_rows,pattern_cols"``).
* ``cache["valid_mask"]`` ``[batch, P]`` bool is True on real slots and False on the padding of a variable group
  (``valid_mask_pattern_rows`` / ``valid_mask_pattern_cols`` do the same for pattern axes). Padded slots hold zeros.

Concatenating caches (``ActivationCache.cat``, multi-part loads) merges the layouts (same groups in the same order,
each group as wide as its widest occurrence) and moves every chunk's group slots to the merged offsets, padding
with zeros (False for masks). Every batch of a cache and every part of a run thus end up in one layout, and each
real slot keeps its value. Keys the layout does not list (user values) are concatenated as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError

LAYOUT_KEY = "slot_layout"
VALID_KEY = "valid_mask"
PATTERN_ROW_VALID_KEY = "valid_mask_pattern_rows"
PATTERN_COL_VALID_KEY = "valid_mask_pattern_cols"
MASK_KEYS = (VALID_KEY, PATTERN_ROW_VALID_KEY, PATTERN_COL_VALID_KEY)
POS = "pos"
PATTERN_AXES = ("pattern_rows", "pattern_cols")

Groups = list[tuple[str, int]]

__all__ = ["LAYOUT_KEY", "MASK_KEYS", "VALID_KEY", "PATTERN_ROW_VALID_KEY", "PATTERN_COL_VALID_KEY", "POS", "PATTERN_AXES",
           "SlotLayout", "groups_of", "mapping_of", "relayout"]


def groups_of(mapping: dict[str, list[int]]) -> Groups:
    """``mapping_index`` (group -> contiguous slots) as ``[(group, width), ...]`` in slot order."""
    items = sorted(mapping.items(), key=lambda kv: kv[1][0] if kv[1] else -1)
    offset = 0
    for name, slots in items:
        if list(slots) != list(range(offset, offset + len(slots))):
            raise ConfigError(f"mapping_index group {name!r} has slots {slots}, not the contiguous run starting at "
                              f"{offset}; build caches with HookedModel.forward.")
        offset += len(slots)
    return [(name, len(slots)) for name, slots in items]


def mapping_of(groups: Groups) -> dict[str, list[int]]:
    """``[(group, width), ...]`` -> ``mapping_index`` ``{group: [slots]}``."""
    out, offset = {}, 0
    for name, width in groups:
        out[name] = list(range(offset, offset + width))
        offset += width
    return out


def _merge_groups(axis: str, a: Groups, b: Groups) -> Groups:
    if [n for n, _ in a] != [n for n, _ in b]:
        raise ConfigError(f"cannot concatenate caches with different position groups on axis {axis!r}: "
                          f"{[n for n, _ in a]} vs {[n for n, _ in b]}; extract every batch with the same "
                          "target_token_positions.")
    return [(n, max(wa, wb)) for (n, wa), (_, wb) in zip(a, b)]


@dataclass
class SlotLayout:
    """Position axes (name -> groups with widths) and the tensor keys carrying them (on dims 1..n, in order)."""

    axes: dict[str, Groups] = field(default_factory=dict)
    keys: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        by_axes: dict[str, list[str]] = {}
        for key, axes in self.keys.items():
            by_axes.setdefault(",".join(axes), []).append(key)
        return {"axes": {a: [[n, int(w)] for n, w in g] for a, g in self.axes.items()}, "keys": by_axes}

    @classmethod
    def from_json(cls, d: Any) -> "SlotLayout":
        if not isinstance(d, dict) or not isinstance(d.get("axes"), dict) or not isinstance(d.get("keys"), dict):
            raise ConfigError(f"{LAYOUT_KEY} must be {{'axes': {{...}}, 'keys': {{...}}}}, got {d!r:.200}.")
        axes = {str(a): [(str(n), int(w)) for n, w in g] for a, g in d["axes"].items()}
        keys = {str(k): tuple(axs.split(",")) for axs, ks in d["keys"].items() for k in ks}
        for k, axs in keys.items():
            missing = [a for a in axs if a not in axes]
            if missing:
                raise ConfigError(f"{LAYOUT_KEY}: key {k!r} uses undeclared axes {missing}.")
        return cls(axes, keys)

    def add_keys(self, keys: list[str], axes: tuple[str, ...] = (POS,)) -> None:
        """Declare that ``keys`` carry ``axes`` on dims ``1..len(axes)``."""
        for k in keys:
            self.keys[k] = tuple(axes)

    def restrict(self, keys: list[str]) -> "SlotLayout":
        """The same axes, listing only those of ``keys`` it lists (after keys were removed from a cache)."""
        return SlotLayout(dict(self.axes), {k: a for k, a in self.keys.items() if k in set(keys)})

    def merge(self, other: "SlotLayout") -> "SlotLayout":
        """The layout both fit in: same groups per axis, each as wide as its widest occurrence."""
        axes = dict(self.axes)
        for a, g in other.axes.items():
            axes[a] = _merge_groups(a, axes[a], g) if a in axes else list(g)
        keys = dict(self.keys)
        for k, axs in other.keys.items():
            if k in keys and keys[k] != axs:
                raise ConfigError(f"cannot concatenate: key {k!r} has position axes {keys[k]} in one cache and "
                                  f"{axs} in the other.")
            keys[k] = axs
        return SlotLayout(axes, keys)

    def width(self, axis: str) -> int:
        return sum(w for _, w in self.axes[axis])


def _move_axis(t: torch.Tensor, dim: int, src: Groups, dst: Groups, fill: Any) -> torch.Tensor:
    if src == dst:
        return t
    if t.shape[dim] != sum(w for _, w in src):
        raise ConfigError(f"a tensor with {t.shape[dim]} slots on dim {dim} does not match its slot layout "
                          f"{src} ({sum(w for _, w in src)} slots); the cache was modified inconsistently.")
    shape = list(t.shape)
    shape[dim] = sum(w for _, w in dst)
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    s_off = d_off = 0
    for (name, ws), (_, wd) in zip(src, dst):
        out.narrow(dim, d_off, ws).copy_(t.narrow(dim, s_off, ws))
        s_off, d_off = s_off + ws, d_off + wd
    return out


def relayout(t: torch.Tensor, key: str, src: SlotLayout, dst: SlotLayout) -> torch.Tensor:
    """Move ``t`` (the value of ``key`` laid out by ``src``) into layout ``dst``; padded slots get 0/False."""
    axes = src.keys.get(key)
    if not axes:
        return t
    fill = False if t.dtype == torch.bool else 0
    for dim, axis in enumerate(axes, start=1):
        t = _move_axis(t, dim, src.axes[axis], dst.axes[axis], fill)
    return t
