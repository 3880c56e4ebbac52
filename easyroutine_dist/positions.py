"""The ``target_token_positions`` language, resolved per batch row against the attention mask.

Every position is an index into a row's REAL tokens (the unpadded prompt, 0 = its first real
token), so left padding, right padding and no padding give the same answer as running each
prompt alone. The attention mask ``[batch, seq]`` (1 = real token) says where the real tokens
are: a row's real tokens are the indices where its mask is 1, in order. They usually form one
block (left or right padding), but need not: with holes (0s between 1s), ``"last"`` is the last
index whose mask is 1, ``"first"`` the first, a slice takes the real tokens in order, skipping
the holes, and so on. ``HookedModel`` gives real tokens the position ids ``cumsum(mask) - 1``, so
a row with holes gives what its real tokens alone give (tests/test_positions_holes.py).

Specs (one list, groups concatenated in request order on the position axis ``P``):

* ``"last"``: the last real token.
* ``"last-k"`` (k >= 1): the k-th token counted from the end, i.e. Python index ``-k`` over the
  row's real tokens, so ``"last-1" == "last"`` and ``"last-2"`` is the second to last. This
  follows easyroutine (``easyroutine/interpretability/token_index.py``, ``get_token_dict``:
  ``"last": [-1], "last-2": [-2], "last-4": [-4]``, documented as "second to last", "fourth to
  last"); easyroutine only knows k in {2, 4} (its "last-3" fails), here any k >= 1 works.
  ``"last-0"`` is refused: under that rule it would mean index 0, the *first* token.
* ``"first"``: the first real token.
* ``"all"``, ``"all-text"``: every real token (identical for text-only models).
* ``int`` (negative allowed): Python indexing over the row's real tokens.
* ``(start, end)`` tuple/list, entries int or None: Python slice ``real[start:end]``, so
  ``(a, -k)`` and ``(2, None)`` work (easyroutine used ``range(start, end)``, which breaks both).
* ``"inputs-partition-K"``: the K-th segment after splitting the row's real tokens at that row's
  pivots: pivots ``[p1, p2]`` give ``[0, p1)``, ``[p1, p2)``, ``[p2, len)`` (as easyroutine); without
  ``pivot_positions`` there is one partition, the whole prompt.
* ``"random-text"`` / ``"random-text-N"``: N (default 1) distinct random real positions, sorted.
* ``"random-inputs-partition-K"`` / ``"random-inputs-partition-K-N"``: same within partition K.

Random specs draw ``torch.randperm`` from a ``torch.Generator`` seeded with
``crc32(f"{seed}:{row}:{spec_key}")`` where ``row = row_offset + r`` is the row's GLOBAL index in the
dataset (``r`` its index in the batch): deterministic given (seed, global row, the row's real length,
spec), independent of padding side, of batch and partition boundaries and of the other rows. So
equal-length rows of different batches get different draws, and a distributed run and a
single-process run of the same data with the same seed pick the same positions. Padding is never
sampled.

Strictness: a spec that selects zero positions in any row, an int out of range for a row, a
malformed spec, duplicate specs, a non-binary mask or an all-zero mask row raise
:class:`PositionError` naming the spec, the row, the rule and the fix.
"""

from __future__ import annotations

import operator
import re
import zlib
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch

from easyroutine_dist.errors import PositionError

Spec = Union[str, int, tuple[Union[int, None], Union[int, None]]]

__all__ = ["ResolvedPositions", "Spec", "spec_key", "validate_specs", "resolve_positions"]

_HELP = (
    'valid specs are "last", "last-k" (k >= 1), "first", "all", "all-text", an int, a (start, end) '
    'pair of ints/None, "inputs-partition-K", "random-text", "random-text-N", '
    '"random-inputs-partition-K" and "random-inputs-partition-K-N"'
)
_LAST_RE = re.compile(r"last-(\d+)")
_RANDOM_TEXT_RE = re.compile(r"random-text(?:-(\d+))?")
_PARTITION_RE = re.compile(r"inputs-partition-(\d+)")
_RANDOM_PARTITION_RE = re.compile(r"random-inputs-partition-(\d+)(?:-(\d+))?")


@dataclass(frozen=True)
class ResolvedPositions:
    """Positions of a spec list resolved for one batch.

    Attributes:
        index: ``[batch, P]`` long, absolute indices into the padded seq axis; safe to gather
            with (padded slots point at a real token of the row).
        valid: ``[batch, P]`` bool, False in the padded slots of a variable-length group.
        mapping_index: spec key -> its slots on the ``P`` axis.
        token_dict: spec key -> per row, the positions within the unpadded prompt (valid only).
    """

    index: torch.Tensor
    valid: torch.Tensor
    mapping_index: dict[str, list[int]]
    token_dict: dict[str, list[list[int]]]


@dataclass(frozen=True)
class _Parsed:
    """One normalised spec. kind: "int" (a = index), "range" (a:b slice), "partition" (a = K),
    "random_text" (b = N) or "random_partition" (a = K, b = N)."""

    value: Spec
    key: str
    kind: str
    a: int | None = None
    b: int | None = None


def _fail(spec: str, rule: str, fix: str, row: int | None = None) -> PositionError:
    where = f" in batch row {row}" if row is not None else ""
    return PositionError(f"target_token_positions spec {spec}{where}: {rule}. Fix: {fix}.")


def _as_int(x: Any) -> int | None:
    """``x`` as a Python int if it is an integer (not bool/str/float), else None."""
    if isinstance(x, (bool, str, float)):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _parse(spec: Any) -> _Parsed:
    shown = repr(spec)
    if isinstance(spec, str):
        if spec == "last":
            return _Parsed(spec, spec, "int", -1)
        if spec == "first":
            return _Parsed(spec, spec, "int", 0)
        if spec in ("all", "all-text"):
            return _Parsed(spec, spec, "range", None, None)
        m = _LAST_RE.fullmatch(spec)
        if m:
            k = int(m.group(1))
            if k == 0:
                raise _fail(shown, '"last-k" means Python index -k (easyroutine), so k must be >= 1',
                            'use "last" (== "last-1") for the last token or "first" for index 0')
            return _Parsed(f"last-{k}", f"last-{k}", "int", -k)
        m = _RANDOM_TEXT_RE.fullmatch(spec)
        if m:
            n = 1 if m.group(1) is None else int(m.group(1))
            if n == 0:
                raise _fail(shown, "a random spec must sample at least one position",
                            'use "random-text" or "random-text-N" with N >= 1')
            key = "random-text" if m.group(1) is None else f"random-text-{n}"
            return _Parsed(key, key, "random_text", None, n)
        m = _PARTITION_RE.fullmatch(spec)
        if m:
            k = int(m.group(1))
            return _Parsed(f"inputs-partition-{k}", f"inputs-partition-{k}", "partition", k)
        m = _RANDOM_PARTITION_RE.fullmatch(spec)
        if m:
            k = int(m.group(1))
            n = 1 if m.group(2) is None else int(m.group(2))
            if n == 0:
                raise _fail(shown, "a random spec must sample at least one position",
                            'use "random-inputs-partition-K-N" with N >= 1')
            key = f"random-inputs-partition-{k}" + ("" if m.group(2) is None else f"-{n}")
            return _Parsed(key, key, "random_partition", k, n)
        raise _fail(shown, "unknown spec string", _HELP)
    i = _as_int(spec)
    if i is not None:
        return _Parsed(i, str(i), "int", i)
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise _fail(shown, f"a range must have exactly 2 entries (start, end), got {len(spec)}",
                        "pass (start, end) with Python slice semantics; steps are not supported")
        ends: list[int | None] = []
        for e in spec:
            v = None if e is None else _as_int(e)
            if e is not None and v is None:
                raise _fail(shown, f"range bounds must be int or None, got {type(e).__name__}",
                            "pass integer (or None) bounds, e.g. (0, 4) or (2, None)")
            ends.append(v)
        value = (ends[0], ends[1])
        return _Parsed(value, f"({ends[0]}, {ends[1]})", "range", ends[0], ends[1])
    raise _fail(shown, f"unsupported spec type {type(spec).__name__}", _HELP)


def _parse_all(specs: Any) -> list[_Parsed]:
    if isinstance(specs, (str, tuple)) or _as_int(specs) is not None or not isinstance(specs, Sequence):
        raise _fail(repr(specs), "target_token_positions must be a list of specs",
                    f"wrap it in a list, e.g. [{specs!r}]")
    if len(specs) == 0:
        raise _fail("[]", "the spec list is empty", 'request at least one spec, e.g. ["last"]')
    parsed = [_parse(s) for s in specs]
    seen: set[str] = set()
    for p in parsed:
        if p.key in seen:
            raise _fail(p.key, "the spec is requested twice (keys must be unique)",
                        "remove the duplicate from the list")
        seen.add(p.key)
    return parsed


def spec_key(spec: Any) -> str:
    """Stable string key of one spec: ``"last"``, ``"last-2"``, ``"3"``, ``"(0, 4)"``, ``"(2, None)"``."""
    return _parse(spec).key


def validate_specs(specs: Any) -> list[Spec]:
    """Normalise and syntax-check a spec list (no mask needed); lists become tuples."""
    return [p.value for p in _parse_all(specs)]


def _real_tokens(attention_mask: torch.Tensor) -> list[list[int]]:
    """Absolute indices of each row's real tokens (where the mask is 1), in order. Mask: ``[batch, seq]``."""
    where = "attention_mask"
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise _fail(where, f"must be a 2-D tensor [batch, seq], got {got}", "pass the tokenizer's attention_mask")
    bsz, seq = attention_mask.shape
    if bsz == 0 or seq == 0:
        raise _fail(where, f"has an empty shape {(bsz, seq)}", "pass at least one row with one real token")
    m = attention_mask.detach().cpu()
    if not bool(((m == 0) | (m == 1)).all()):
        raise _fail(where, "values must be 0 (padding) or 1 (real token)", "pass a binary mask")
    m = m.to(torch.bool)
    lengths = m.sum(dim=1)
    zero = (lengths == 0).nonzero().flatten().tolist()
    if zero:
        raise _fail(where, "the row has no real tokens (all-zero mask)", "drop empty prompts", row=zero[0])
    cols = m.nonzero()[:, 1]  # row-major: each row's real indices, in order
    return [c.tolist() for c in torch.split(cols, lengths.tolist())]


def _row_pivots(pivot_positions: Any, lengths: list[int], key: str) -> list[list[int]]:
    """Per-row pivots, validated: strictly increasing ints within ``[0, row length]``."""
    if pivot_positions is None:  # no pivots: one partition, the whole prompt (as easyroutine)
        return [[] for _ in lengths]
    if isinstance(pivot_positions, torch.Tensor):
        pivot_positions = pivot_positions.tolist()
    if not isinstance(pivot_positions, (list, tuple)):
        raise _fail(key, f"pivot_positions must be a list, got {type(pivot_positions).__name__}",
                    "pass a list of ints or a list of lists of ints")
    per_row = len(pivot_positions) > 0 and all(isinstance(p, (list, tuple)) for p in pivot_positions)
    if per_row and len(pivot_positions) != len(lengths):
        raise _fail(key, f"pivot_positions has {len(pivot_positions)} lists for {len(lengths)} rows",
                    "pass one pivot list per batch row, or one flat list for all rows")
    out: list[list[int]] = []
    for r, n in enumerate(lengths):
        raw = pivot_positions[r] if per_row else pivot_positions
        piv = [_as_int(p) for p in raw]
        if any(p is None for p in piv):
            raise _fail(key, f"pivots must be ints, got {list(raw)!r}", "pass integer pivots", row=r)
        ok = [p for p in piv if p is not None]
        if any(b <= a for a, b in zip(ok, ok[1:])) or any(p < 0 or p > n for p in ok):
            raise _fail(key, f"pivots {ok} must be strictly increasing and within [0, {n}] "
                        f"(the row's real-token length)", "fix the pivots for this row", row=r)
        out.append(ok)
    return out


def _sample(pool: list[int], n: int, p: _Parsed, row: int, seed: int, global_row: int) -> list[int]:
    if n > len(pool):
        raise _fail(p.key, f"asks for {n} random positions but only {len(pool)} are available",
                    "ask for fewer positions", row=row)
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{global_row}:{p.key}".encode()))
    perm = torch.randperm(len(pool), generator=g)[:n].tolist()
    return sorted(pool[i] for i in perm)


def _select(p: _Parsed, row: int, n: int, pivots: list[list[int]] | None, seed: int, row_offset: int = 0) -> list[int]:
    """Positions (within the row's ``n`` real tokens) selected by ``p`` for one row."""
    if p.kind == "int":
        i = p.a if p.a is not None else 0
        if not -n <= i < n:
            raise _fail(p.key, f"index {i} is out of range for a row of length {n} "
                        f"(valid: {-n}..{n - 1})", "use an index inside every row, or a range", row=row)
        return [i % n]
    if p.kind in ("range", "random_text"):
        sel = list(range(n))[slice(p.a, p.b)] if p.kind == "range" else list(range(n))
    else:
        if pivots is None:  # unreachable via resolve_positions, kept for direct callers
            raise _fail(p.key, "partition specs need pivot_positions", "pass pivot_positions", row=row)
        bounds = [0, *pivots[row], n]
        k = p.a if p.a is not None else 0
        if k >= len(bounds) - 1:
            raise _fail(p.key, f"partition {k} does not exist: pivots {pivots[row]} give "
                        f"{len(bounds) - 1} partitions", "use a smaller K or add pivots", row=row)
        sel = list(range(bounds[k], bounds[k + 1]))
    if not sel:
        raise _fail(p.key, f"selects zero positions in a row of length {n}",
                    "choose a spec that selects at least one real token in every row", row=row)
    if p.kind.startswith("random"):
        return _sample(sel, p.b if p.b is not None else 1, p, row, seed, row_offset + row)
    return sel


def resolve_positions(
    specs: Any,
    attention_mask: torch.Tensor,
    pivot_positions: list[list[int]] | list[int] | None = None,
    seed: int = 0,
    row_offset: int = 0,
) -> ResolvedPositions:
    """Resolve ``specs`` for every row of ``attention_mask`` ``[batch, seq]`` (1 = real token).

    Returns index/valid tensors ``[batch, P]`` on the mask's device, where ``P`` is the sum of
    the group widths; fixed-size groups have the same width in every row, variable-size groups
    ("all", ranges, partitions) are padded to the batch's longest selection with ``valid=False``.
    ``row_offset``: the global dataset index of the batch's first row (seeds random specs, see above).
    """
    parsed = _parse_all(specs)
    if _as_int(seed) is None:
        raise _fail("seed", f"must be an int, got {seed!r}", "pass an integer seed")
    if _as_int(row_offset) is None or int(row_offset) < 0:
        raise _fail("row_offset", f"must be an int >= 0, got {row_offset!r}", "pass the batch's first dataset row")
    real = _real_tokens(attention_mask)
    lengths = [len(r) for r in real]
    pivots = None
    for p in parsed:
        if p.kind in ("partition", "random_partition"):
            pivots = _row_pivots(pivot_positions, lengths, p.key)
            break
    index_rows: list[list[int]] = [[] for _ in lengths]
    valid_rows: list[list[bool]] = [[] for _ in lengths]
    mapping: dict[str, list[int]] = {}
    token_dict: dict[str, list[list[int]]] = {}
    offset = 0
    for p in parsed:
        sel = [_select(p, r, n, pivots, int(seed), int(row_offset)) for r, n in enumerate(lengths)]
        width = max(len(s) for s in sel)
        for r, s in enumerate(sel):
            pad = width - len(s)
            index_rows[r].extend([real[r][j] for j in s] + [real[r][s[0]]] * pad)
            valid_rows[r].extend([True] * len(s) + [False] * pad)
        mapping[p.key] = list(range(offset, offset + width))
        token_dict[p.key] = sel
        offset += width
    dev = attention_mask.device
    return ResolvedPositions(
        index=torch.tensor(index_rows, dtype=torch.long, device=dev),
        valid=torch.tensor(valid_rows, dtype=torch.bool, device=dev),
        mapping_index=mapping,
        token_dict=token_dict,
    )
