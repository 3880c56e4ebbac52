"""ActivationCache: a dict-like container of activations. It holds no model and does no analysis.

Tensors are stored as ``[batch, positions, ...]``. Concatenation is lazy: ``cat`` appends chunks to a list and
the first read joins them with one ``torch.cat``, so concatenating n batches costs O(n), not O(n^2).
Caches made by ``HookedModel.forward`` carry a slot layout (see :mod:`easyroutine_dist.slots`): concatenation moves
each chunk's position groups to one merged layout, so variable-width groups never shift other groups' slots.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Iterator

import torch

from .errors import ConfigError
from .slots import LAYOUT_KEY, POS, SlotLayout, mapping_of, relayout

#: keys that describe the cache rather than hold per-example activations
INFO_KEYS = ("mapping_index", "token_dict", "metadata", LAYOUT_KEY)


def _pad_to(t: torch.Tensor, shape: tuple[int, ...], fill: float | bool = 0) -> torch.Tensor:
    """Pad ``t`` at the end of every non-batch dim up to ``shape`` (same rank)."""
    if tuple(t.shape[1:]) == tuple(shape):
        return t
    out = torch.full((t.shape[0], *shape), fill, dtype=t.dtype, device=t.device)
    out[(slice(None), *[slice(0, s) for s in t.shape[1:]])] = t
    return out


def _cat_tensors(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate on dim 0; chunks whose later dims differ (e.g. ``"all"`` positions) are end-padded with 0."""
    if len(chunks) == 1:
        return chunks[0]
    if any(c.dim() != chunks[0].dim() for c in chunks) or chunks[0].dim() == 0:
        raise ConfigError(
            "ActivationCache.cat: tensors of different rank (or scalars) cannot be concatenated on the batch "
            "axis; keep such values out of caches you concatenate, or register an aggregation for their prefix."
        )
    shape = tuple(max(c.shape[d] for c in chunks) for d in range(1, chunks[0].dim()))
    fill = False if chunks[0].dtype == torch.bool else 0
    return torch.cat([_pad_to(c, shape, fill) for c in chunks], dim=0)


def _merge_info(key: str, mine: Any, other: Any) -> Any:
    """How the non-tensor entries combine when two caches are concatenated along the batch."""
    if key == "token_dict" and isinstance(mine, dict) and isinstance(other, dict):
        return {k: list(mine.get(k, [])) + list(other.get(k, [])) for k in {**mine, **other}}
    if isinstance(mine, list) and isinstance(other, list):
        return mine + other
    return mine


class ActivationCache:
    """Dict-like store of activations ``{key: Tensor[batch, positions, ...] | info}``."""

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        #: pending concatenation: key -> [(chunk, the chunk's slot layout or None)]
        self._chunks: dict[str, list[tuple[Any, SlotLayout | None]]] = {}
        self._aggregations: dict[str, Callable[[list[Any]], Any]] = {}
        self._info: dict[str, Any] = {}

    # ------------------------------------------------------------------ dict protocol
    def _materialise(self, key: str) -> None:
        chunks = self._chunks.pop(key, None)
        if chunks is None:
            return
        agg = self._aggregation_for(key)
        if agg:
            self._data[key] = agg([c for c, _ in chunks])
            return
        dst = self.layout()
        moved = [relayout(c, key, lay, dst) if lay is not None and dst is not None else c for c, lay in chunks]
        self._data[key] = _cat_tensors(moved)

    def layout(self) -> SlotLayout | None:
        """This cache's slot layout (None for caches not made by ``HookedModel.forward``)."""
        raw = self._data.get(LAYOUT_KEY)
        return None if raw is None else SlotLayout.from_json(raw)

    def _aggregation_for(self, key: str) -> Callable[[list[Any]], Any] | None:
        for prefix, fn in self._aggregations.items():
            if key.startswith(prefix):
                return fn
        return None

    def __getitem__(self, key: str) -> Any:
        self._materialise(key)
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._chunks.pop(key, None)
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        self._chunks.pop(key, None)
        del self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        parts = []
        for k in self._data:
            v = self[k]
            parts.append(f"{k}: {tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else f"{k}: {type(v).__name__}")
        return "ActivationCache(\n  " + ",\n  ".join(parts) + "\n)"

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def keys(self) -> list[str]:
        return list(self._data)

    def values(self) -> list[Any]:
        return [self[k] for k in self._data]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self[k]) for k in self._data]

    def update(self, other: "ActivationCache | dict[str, Any]") -> None:
        for k, v in other.items():
            self[k] = v

    def __add__(self, other: "ActivationCache") -> "ActivationCache":
        out = self.copy()
        out.cat(other)
        return out

    def copy(self) -> "ActivationCache":
        """Shallow copy: the same tensors, a new container."""
        out = ActivationCache()
        for k in self._data:
            out._data[k] = self[k]
        out._aggregations = dict(self._aggregations)
        out._info = dict(self._info)
        return out

    # ------------------------------------------------------------------ easyroutine API
    def register_aggregation(self, prefix: str, fn: Callable[[list[Any]], Any]) -> None:
        """Use ``fn(list_of_values)`` instead of ``torch.cat`` when concatenating keys starting with ``prefix``."""
        self._aggregations[prefix] = fn

    def cat(self, other: "ActivationCache") -> None:
        """Append ``other``'s examples (batch axis) to this cache, in place. Amortised O(size of other)."""
        if not isinstance(other, ActivationCache):
            raise ConfigError(f"ActivationCache.cat expects an ActivationCache, got {type(other).__name__}.")
        if not self._data:
            for k in other._data:
                self._data[k] = other[k]
            self._aggregations.update(other._aggregations)
            return
        mine, theirs = self.layout(), other.layout()
        merged = mine.merge(theirs) if mine is not None and theirs is not None else None
        if merged is None:
            ma, mb = self._data.get("mapping_index"), other._data.get("mapping_index")
            if isinstance(ma, dict) and isinstance(mb, dict) and ma != mb:
                raise ConfigError(
                    f"ActivationCache.cat: the position layouts differ (mapping_index {ma} vs {mb}) and at least one "
                    f"cache has no '{LAYOUT_KEY}' saying where each group's slots are (it was built by hand or saved "
                    "by an older version), so rows cannot be aligned. Extract both with HookedModel.forward, or "
                    "keep them as separate caches (QueryResult.iter_parts).")
        for key in other._data:
            if key == LAYOUT_KEY or (key == "mapping_index" and merged is not None):
                continue
            value = other[key]
            if key not in self._data:
                self._data[key] = value
                continue
            if isinstance(value, torch.Tensor) or self._aggregation_for(key):
                chunks = self._chunks.setdefault(key, [])
                if not chunks:
                    chunks.append((self._data[key], mine))
                chunks.append((value, theirs))
            else:
                self._data[key] = _merge_info(key, self._data[key], value)
        if merged is not None:
            self._data[LAYOUT_KEY] = merged.to_json()
            if POS in merged.axes:
                self._data["mapping_index"] = mapping_of(merged.axes[POS])

    @classmethod
    def concat(cls, caches: Iterable["ActivationCache"]) -> "ActivationCache":
        """Concatenate many caches along the batch axis in one pass."""
        out = cls()
        for c in caches:
            out.cat(c)
        for k in list(out._chunks):
            out._materialise(k)
        return out

    def add_with_info(self, key: str, value: Any, info: Any) -> None:
        """Store ``value`` under ``key`` and remember ``info`` about it (see ``info(key)``)."""
        self[key] = value
        self._info[key] = info

    def info(self, key: str) -> Any:
        return self._info.get(key)

    def add_metadata(self, **metadata: Any) -> None:
        """Merge keyword arguments into ``cache["metadata"]``."""
        meta = dict(self.get("metadata") or {})
        meta.update(metadata)
        self["metadata"] = meta

    def map_to_dict(self, key: str) -> dict[str, torch.Tensor]:
        """Split ``cache[key]`` ``[batch, positions, ...]`` into ``{position request: [batch, n, ...]}``."""
        value = self[key]
        mapping = self.get("mapping_index")
        if not isinstance(mapping, dict):
            raise ConfigError("map_to_dict needs cache['mapping_index']; extract with HookedModel.forward.")
        return {spec: value[:, idx] for spec, idx in mapping.items()}

    def to(self, device: str | torch.device) -> "ActivationCache":
        for k in list(self._data):
            v = self[k]
            if isinstance(v, torch.Tensor):
                self._data[k] = v.to(device)
        return self

    def cpu(self) -> "ActivationCache":
        return self.to("cpu")

    def memory_size(self) -> int:
        """Bytes held by the tensors in this cache."""
        return sum(v.numel() * v.element_size() for v in self.values() if isinstance(v, torch.Tensor))

    def tensor_keys(self) -> list[str]:
        return [k for k in self._data if isinstance(self[k], torch.Tensor)]

    # ------------------------------------------------------------------ storage form
    def to_flat(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Split into ``({key: contiguous cpu tensor}, JSON-serialisable info)`` for storage.

        Raises ConfigError naming the key when a non-tensor value is not JSON-serialisable.
        """
        tensors: dict[str, torch.Tensor] = {}
        info: dict[str, Any] = {}
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                tensors[k] = v.detach().to("cpu").contiguous()
            else:
                try:
                    json.dumps(v)
                except (TypeError, ValueError) as exc:
                    raise ConfigError(
                        f"cache[{k!r}] is a {type(v).__name__} that is not JSON-serialisable ({exc}); store tensors "
                        "as torch.Tensor and everything else as plain lists, dicts, strings and numbers."
                    ) from None
                info[k] = v
        return tensors, info

    @classmethod
    def from_flat(cls, tensors: dict[str, torch.Tensor], info: dict[str, Any] | None = None) -> "ActivationCache":
        """Inverse of ``to_flat``."""
        out = cls()
        for k, v in tensors.items():
            out[k] = v
        for k, v in (info or {}).items():
            out[k] = v
        return out
