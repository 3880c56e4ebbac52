"""Per-feature statistics of a cache's tensors over real slots only, merged exactly across batches and parts.

For every floating-point tensor key, :func:`cache_statistics` keeps float64 accumulators: the sample count, the
per-feature mean and sum of squared deviations (``m2``), the per-feature min and max, and the sum of the samples'
L2 norms. What counts as a sample depends on the key's slot layout (:mod:`easyroutine_dist.slots`):

* keys on the ``"pos"`` axis (``[rows, P, *features]``): every *real* slot (``valid_mask`` True); the padding of
  variable-width groups (``"all"``, ranges) is never counted;
* keys on the attention-pattern axes (``[rows, R, C, *features]``): every real (row, column) cell;
* every other tensor (``[rows, *features]``, or any key of a cache without a slot layout): every row.

Integer and bool tensors (token ids, masks) get no statistics. Accumulators merge with the pairwise formula of
Chan, Golub and LeVeque (``delta = mean_b - mean_a``; ``m2 = m2_a + m2_b + delta^2 * n_a * n_b / n``), which is
exact in any grouping and stable for large means, so per-part statistics merged at run commit equal the statistics of
the whole run. ``var`` is the population variance ``m2 / count`` (``torch.var(x, dim=0, correction=0)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .errors import StorageError
from .slots import LAYOUT_KEY, MASK_KEYS, PATTERN_COL_VALID_KEY, PATTERN_ROW_VALID_KEY, POS, VALID_KEY, SlotLayout

#: samples converted to float64 at once (bounds the extra memory of one accumulation step: 8 bytes each)
CHUNK_ELEMENTS = 1 << 24
_AXIS_MASKS = {POS: VALID_KEY, "pattern_rows": PATTERN_ROW_VALID_KEY, "pattern_cols": PATTERN_COL_VALID_KEY}
_FIELDS = ("count", "mean", "m2", "min", "max", "norm_sum")
ROW = "row"  # what a key without position axes counts

__all__ = ["Moments", "cache_statistics", "merge_statistics", "statistics_to_tensors", "statistics_from_tensors",
           "sample_mask", "ROW"]


@dataclass
class Moments:
    """float64 accumulators of samples ``[n, *features]``: count, mean / m2 / min / max ``[*features]``, norm sum."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    norm_sum: float

    @classmethod
    def of(cls, x: torch.Tensor) -> Optional["Moments"]:
        """Statistics of ``x`` ``[n, *features]`` (any float dtype), in chunks of rows; None when ``n == 0``."""
        if x.shape[0] == 0:
            return None
        per = max(1, x[0].numel())
        step = max(1, CHUNK_ELEMENTS // per)
        out: Optional[Moments] = None
        for i in range(0, x.shape[0], step):
            xs = x[i:i + step].detach().to(device="cpu", dtype=torch.float64)
            mean = xs.mean(0)
            one = cls(int(xs.shape[0]), mean, (xs - mean).square().sum(0), xs.amin(0), xs.amax(0),
                      float(xs.reshape(xs.shape[0], -1).norm(dim=1).sum()))
            out = one if out is None else out.merge(one)
        return out

    def merge(self, other: Optional["Moments"]) -> "Moments":
        """The statistics of both sample sets (Chan et al.'s parallel update)."""
        if other is None or other.count == 0:
            return self
        if self.count == 0:
            return other
        if tuple(self.mean.shape) != tuple(other.mean.shape):
            raise StorageError(f"cannot merge statistics of features {tuple(self.mean.shape)} and "
                               f"{tuple(other.mean.shape)}; the parts of a run must have the same feature shapes.")
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta.square() * (self.count * other.count / n)
        return Moments(n, mean, m2, torch.minimum(self.min, other.min), torch.maximum(self.max, other.max),
                       self.norm_sum + other.norm_sum)

    def summary(self) -> dict[str, Any]:
        """``{"count": int, "mean", "var" (population), "min", "max": float64 [*features], "norm_mean": float}``."""
        return {"count": int(self.count), "mean": self.mean.clone(), "var": self.m2 / self.count,
                "norm_mean": float(self.norm_sum / self.count), "min": self.min.clone(), "max": self.max.clone()}


def _layout_of(info: dict[str, Any]) -> Optional[SlotLayout]:
    raw = info.get(LAYOUT_KEY)
    return None if raw is None else SlotLayout.from_json(raw)


def sample_mask(tensors: dict[str, torch.Tensor], axes: tuple[str, ...], x: torch.Tensor) -> Optional[torch.Tensor]:
    """Real-slot mask ``[rows, *x.shape[1:1+len(axes)]]`` of a key ``x`` carrying ``axes`` on dims ``1..n`` (None
    when it has no position axis). An axis whose validity mask is not in ``tensors`` counts every slot as real."""
    if not axes:
        return None
    rows = int(x.shape[0])
    mask = torch.ones(rows, dtype=torch.bool)
    for i, axis in enumerate(axes, start=1):
        m = tensors.get(_AXIS_MASKS.get(axis, ""))
        width = int(x.shape[i])
        if m is None:
            m = torch.ones(rows, width, dtype=torch.bool)
        if tuple(m.shape) != (rows, width):
            raise StorageError(f"a tensor of shape {tuple(x.shape)} does not match the validity mask of axis "
                               f"{axis!r} {tuple(m.shape)}; the cache's slot layout is inconsistent.")
        mask = mask.unsqueeze(-1) & m.to(torch.bool).reshape(rows, *([1] * (i - 1)), width)
    return mask


def _key_moments(x: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[Moments]:
    """Statistics of ``x``'s samples: the cells where ``mask`` is True (every row when ``mask`` is None)."""
    if mask is None:
        return Moments.of(x)
    per_row = max(1, x[0].numel()) if x.shape[0] else 1
    step = max(1, CHUNK_ELEMENTS // per_row)
    out: Optional[Moments] = None
    for i in range(0, x.shape[0], step):  # bounded copies: the real slots of a block of rows at a time
        got = Moments.of(x[i:i + step][mask[i:i + step]])
        out = got if out is None else out.merge(got)
    return out


def cache_statistics(data: Any) -> dict[str, tuple[str, Moments]]:
    """``{key: (what a sample is, Moments)}`` for every floating tensor of ``data`` over its real slots.

    ``data``: an ActivationCache, or ``(tensors, info)`` as stored (``info`` may hold ``slot_layout``). The sample
    kind is ``",".join(axes)`` of the key's slot layout (``"pos"``, ``"pattern_rows,pattern_cols"``) or ``"row"``.
    Keys with no sample (every slot padding) are left out.
    """
    if isinstance(data, tuple):
        tensors, info = data
    else:
        tensors = {k: data[k] for k in data.tensor_keys()}
        info = {k: data[k] for k in data.keys() if k not in tensors}
    layout = _layout_of(info)
    out: dict[str, tuple[str, Moments]] = {}
    for key, x in tensors.items():
        if key in MASK_KEYS or not (x.is_floating_point() and x.dim() >= 1):
            continue
        axes = layout.keys.get(key, ()) if layout is not None else ()
        got = _key_moments(x, sample_mask(tensors, tuple(axes), x))
        if got is not None:
            out[key] = (",".join(axes) or ROW, got)
    return out


def merge_statistics(a: dict[str, tuple[str, Moments]],
                     b: dict[str, tuple[str, Moments]]) -> dict[str, tuple[str, Moments]]:
    """Key-wise merge of two ``cache_statistics`` results (a key in only one side keeps its statistics)."""
    out = dict(a)
    for key, (kind, m) in b.items():
        if key in out:
            if out[key][0] != kind:
                raise StorageError(f"statistics of {key!r} count {out[key][0]!r} samples in one part and {kind!r} "
                                   "in another; the parts of a run must have the same slot layout keys.")
            out[key] = (kind, out[key][1].merge(m))
        else:
            out[key] = (kind, m)
    return out


def statistics_to_tensors(stats: dict[str, tuple[str, Moments]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Storage form: tensors ``"<key>/<field>"`` (float64; ``count`` int64 ``[1]``) and ``{key: sample kind}``."""
    tensors: dict[str, torch.Tensor] = {}
    for key, (_, m) in stats.items():
        tensors[f"{key}/count"] = torch.tensor([m.count], dtype=torch.int64)
        tensors[f"{key}/norm_sum"] = torch.tensor([m.norm_sum], dtype=torch.float64)
        for name in ("mean", "m2", "min", "max"):
            tensors[f"{key}/{name}"] = getattr(m, name).to(torch.float64).contiguous()
    return tensors, {key: kind for key, (kind, _) in stats.items()}


def statistics_from_tensors(tensors: dict[str, torch.Tensor], kinds: dict[str, str],
                            where: str) -> dict[str, tuple[str, Moments]]:
    """Inverse of :func:`statistics_to_tensors`; StorageError naming ``where`` when a field is missing."""
    out: dict[str, tuple[str, Moments]] = {}
    for key, kind in kinds.items():
        missing = [f for f in _FIELDS if f"{key}/{f}" not in tensors]
        if missing:
            raise StorageError(f"statistics {where}: key {key!r} lacks {missing}; the file is damaged, re-save it.")
        t = {f: tensors[f"{key}/{f}"] for f in _FIELDS}
        out[key] = (str(kind), Moments(int(t["count"].reshape(-1)[0]), t["mean"].to(torch.float64),
                                       t["m2"].to(torch.float64), t["min"].to(torch.float64),
                                       t["max"].to(torch.float64), float(t["norm_sum"].reshape(-1)[0])))
    return out
