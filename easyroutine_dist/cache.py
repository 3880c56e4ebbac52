"""ActivationCache: a dict-like container of activations. It holds no model and does no analysis.

Tensors are stored as ``[batch, positions, ...]``. Concatenation is lazy: ``cat`` appends chunks to a list and
the first read joins them with one ``torch.cat``, so concatenating n batches costs O(n), not O(n^2).
Caches made by ``HookedModel.forward`` carry a slot layout (see :mod:`easyroutine_dist.slots`): concatenation moves
each chunk's position groups to one merged layout, so variable-width groups never shift other groups' slots.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from typing import Any, Callable, Iterable, Iterator

import torch

from .errors import ConfigError
from .slots import LAYOUT_KEY, POS, SlotLayout, mapping_of, relayout

logger = logging.getLogger(__name__)

#: keys that describe the cache rather than hold per-example activations
INFO_KEYS = ("mapping_index", "token_dict", "metadata", LAYOUT_KEY)


def _cat_tensors(key: str, chunks: list[torch.Tensor]) -> Any:
    """Concatenate on dim 0. Scalars are stacked; chunks whose later dims differ and that no slot layout aligns are
    kept as a list (easyroutine's fallback) with a warning, never padded: padding would invent values."""
    if len(chunks) == 1:
        return chunks[0]
    if all(c.dim() == 0 for c in chunks):
        return torch.stack(chunks)
    if any(c.dim() != chunks[0].dim() or c.shape[1:] != chunks[0].shape[1:] for c in chunks):
        logger.warning("ActivationCache.cat: %r has chunks of shapes %s that cannot be concatenated on the batch axis; "
                       "keeping them as a list", key, sorted({tuple(c.shape) for c in chunks}))
        return list(chunks)
    return cat_rows(chunks)


def cat_rows(chunks: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(chunks, dim=0)`` (chunks ``[n_i, ...]`` -> ``[sum n_i, ...]``). Large CPU chunks of one dtype are
    copied byte for byte into one preallocated tensor by a plain memcpy: torch's parallel copy kernels run many
    times slower when the other cores are busy (a loaded node, DataLoader workers), and a concatenation is memory
    bound, so threads do not speed it up anyway."""
    first = chunks[0]
    plain = all(c.device.type == "cpu" and c.dtype == first.dtype and c.is_contiguous() and not c.requires_grad
                and c.shape[1:] == first.shape[1:] for c in chunks)
    if not plain or sum(c.nbytes for c in chunks) < (1 << 20):
        return torch.cat(chunks, dim=0)
    out = torch.empty((sum(c.shape[0] for c in chunks), *first.shape[1:]), dtype=first.dtype)
    dst = out.reshape(-1).view(torch.uint8).numpy()
    at = 0
    for c in chunks:
        if c.nbytes:
            dst[at:at + c.nbytes] = c.reshape(-1).view(torch.uint8).numpy()
            at += c.nbytes
    return out


def _merge_values(key: str, old: Any, new: Any) -> Any:
    """How two non-tensor values (or a tensor and a non-tensor) of one key combine when caches are concatenated:
    ours for the info keys, easyroutine's default aggregation for everything else."""
    from .compat import ValueWithInfo

    if key == "token_dict" and isinstance(old, dict) and isinstance(new, dict):
        return {k: list(old.get(k, [])) + list(new.get(k, [])) for k in {**old, **new}}
    if key in ("mapping_index", "metadata", LAYOUT_KEY):
        return old
    if isinstance(old, ValueWithInfo) and isinstance(new, ValueWithInfo):
        inner = _cat_tensors(key, [old.value(), new.value()]) if isinstance(old.value(), torch.Tensor) and \
            isinstance(new.value(), torch.Tensor) else _merge_values(key, old.value(), new.value())
        return ValueWithInfo(inner, old.info())
    if isinstance(old, list):
        return old + (new if isinstance(new, list) else [new])
    if isinstance(old, tuple):
        return [old] + new if isinstance(new, list) else [old, new]
    try:
        return old + new
    except Exception:  # noqa: BLE001 - easyroutine's fallback: keep both
        return [old, new]


def _nbytes(value: Any) -> int:
    """Bytes held by the tensors in ``value`` (a tensor, or lists/tuples/dicts/ValueWithInfo of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    inner = getattr(type(value), "value", None)
    return _nbytes(value.value()) if callable(inner) else 0


def _human(n: float) -> str:
    """``4000`` -> ``"4.00 KB"`` (decimal units, as easyroutine prints them)."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


_GROUP_RE = re.compile(r"^(pattern_L\d+)H\d+$|^(.*?)_(?:L?\d+)(?:H\d+)?$")


def _group_of(key: str) -> str:
    """``resid_out_3`` -> ``resid_out``; ``pattern_L0H1`` -> ``pattern_L0``; other keys stay themselves."""
    m = _GROUP_RE.match(key)
    if not m:
        return key
    return m.group(1) or m.group(2)


class ActivationCache:
    """Dict-like store of activations ``{key: Tensor[batch, positions, ...] | info}``."""

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        #: pending concatenation: key -> [(chunk, the chunk's slot layout or None)]
        self._chunks: dict[str, list[tuple[Any, SlotLayout | None]]] = {}
        self._aggregations: dict[str, Callable[[Any, Any], Any]] = {}
        self._info: dict[str, Any] = {}
        self._deferred: list[ActivationCache] | None = None

    # ------------------------------------------------------------------ dict protocol
    def _materialise(self, key: str) -> None:
        chunks = self._chunks.pop(key, None)
        if chunks is None:
            return
        dst = self.layout()
        moved = [relayout(c, key, lay, dst) if lay is not None and dst is not None else c for c, lay in chunks]
        self._data[key] = _cat_tensors(key, moved)

    def layout(self) -> SlotLayout | None:
        """This cache's slot layout (None for caches not made by ``HookedModel.forward``)."""
        raw = self._data.get(LAYOUT_KEY)
        return None if raw is None else SlotLayout.from_json(raw)

    def _aggregation_for(self, key: str) -> Callable[[Any, Any], Any] | None:
        for prefix, fn in self._aggregations.items():
            if key.startswith(prefix):
                return fn
        return None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle state: the values and per-key info. Registered aggregations are functions (often lambdas), so
        they are not pickled; register them again after loading."""
        return {"data": {k: self[k] for k in self._data}, "info": dict(self._info)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self._data.update(state.get("data", {}))
        self._info.update(state.get("info", {}))

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
    def register_aggregation(self, prefix: str, fn: Callable[[Any, Any], Any]) -> None:
        """When concatenating, combine values of keys starting with ``prefix`` as ``fn(old, new)`` (easyroutine's
        contract; ``old`` is None when this cache is empty) instead of the default."""
        self._aggregations[prefix] = fn

    def remove_aggregation(self, prefix: str) -> None:
        self._aggregations.pop(prefix, None)

    @contextlib.contextmanager
    def deferred_mode(self) -> Iterator["ActivationCache"]:
        """Inside the block ``cat`` only queues caches; they are concatenated when the block exits."""
        before, self._deferred = self._deferred, []
        try:
            yield self
            queued, self._deferred = self._deferred, before
            for other in queued:
                self.cat(other)
        finally:
            self._deferred = before

    def cat(self, other: "ActivationCache") -> None:
        """Append ``other``'s examples (batch axis) to this cache, in place. Amortised O(size of other).

        Both caches must hold the same keys (ValueError naming the difference). Tensors are concatenated lazily and
        moved to the merged slot layout; registered aggregations get ``fn(old, new)``; other values combine as in
        easyroutine (lists extend, tuples gather into a list, ValueWithInfo aggregates its value).
        """
        if not isinstance(other, ActivationCache):
            raise TypeError(f"ActivationCache.cat expects an ActivationCache, got {type(other).__name__}.")
        if self._deferred is not None:
            self._deferred.append(other)
            return
        if not self._data:
            for k in other._data:
                agg = self._aggregation_for(k)
                self._data[k] = agg(None, other[k]) if agg else other[k]
            for prefix, fn in other._aggregations.items():
                self._aggregations.setdefault(prefix, fn)
            return
        mine_keys, their_keys = set(self._data), set(other._data)
        if mine_keys != their_keys:
            raise ConfigError(
                f"ActivationCache.cat: the caches hold different keys (only in this one: "
                f"{sorted(mine_keys - their_keys)}, only in the other: {sorted(their_keys - mine_keys)}); rows would "
                "misalign. Extract every batch with the same config, or delete the extra keys first.")
        mine, theirs = self.layout(), other.layout()
        merged = mine.merge(theirs) if mine is not None and theirs is not None else None
        if merged is None:
            ma, mb = self._data.get("mapping_index"), other._data.get("mapping_index")
            if isinstance(ma, dict) and isinstance(mb, dict) and ma != mb and not self._aggregation_for("mapping_index"):
                raise ConfigError(
                    f"ActivationCache.cat: the position layouts differ (mapping_index {ma} vs {mb}) and at least one "
                    f"cache has no '{LAYOUT_KEY}' saying where each group's slots are (it was built by hand or saved "
                    "by an older version), so rows cannot be aligned. Extract both with HookedModel.forward, or "
                    "keep them as separate caches (QueryResult.iter_parts).")
        for key in other._data:
            if key == LAYOUT_KEY or (key == "mapping_index" and merged is not None):
                continue
            value = other[key]
            agg = self._aggregation_for(key)
            if agg is not None:
                self._data[key] = agg(self[key], value)
            elif isinstance(value, torch.Tensor) and isinstance(self._data[key], torch.Tensor):
                chunks = self._chunks.setdefault(key, [])
                if not chunks:
                    chunks.append((self._data[key], mine))
                chunks.append((value, theirs))
            else:
                self._data[key] = _merge_values(key, self[key], value)
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

    def nbytes(self) -> int:
        """Bytes held by the tensors in this cache (nested lists/dicts/ValueWithInfo included)."""
        return sum(_nbytes(v) for v in self.values())

    def memory_size(self, key: str | None = None) -> str:
        """Size of one key's tensors, or of the whole cache, as easyroutine prints it (``"4.00 KB"``)."""
        return _human(_nbytes(self[key]) if key is not None else self.nbytes())

    def memory_tree(self, print_tree: bool = True, grouped_tree: bool = False) -> dict[str, str]:
        """``{key: size}``, or with ``grouped_tree`` one entry per key family (``resid_out``, ``pattern_L0``...)
        as ``"size (n items)"``; printed as a table unless ``print_tree=False``."""
        if not grouped_tree:
            tree = {k: _human(_nbytes(v)) for k, v in self.items()}
        else:
            sizes: dict[str, list[int]] = {}
            for k, v in self.items():
                sizes.setdefault(_group_of(k) if isinstance(v, torch.Tensor) else k, []).append(_nbytes(v))
            tree = {g: f"{_human(sum(b))} ({len(b)} items)" for g, b in sizes.items()}
        if print_tree:
            width = max((len(k) for k in tree), default=0)
            print("\n".join(f"{k:<{width}}  {v}" for k, v in tree.items()))
        return tree

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


torch.serialization.add_safe_globals([ActivationCache])  # torch.load(weights_only=True) of a saved cache works
