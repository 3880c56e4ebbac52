"""Tests of easyroutine_dist.positions: the target_token_positions language, per row, padding-aware."""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from easyroutine_dist.errors import PositionError
from easyroutine_dist.positions import (
    ResolvedPositions,
    resolve_positions,
    spec_key,
    validate_specs,
)

PAD_VALUE = -100


def make_mask(lengths: list[int], side: str, extra: int = 0) -> torch.Tensor:
    """[batch, max(lengths) + extra] mask with real tokens right- or left-aligned."""
    seq = max(lengths) + extra
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for r, n in enumerate(lengths):
        if side == "left":
            mask[r, seq - n:] = 1
        else:
            mask[r, :n] = 1
    return mask


def position_values(mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq] tensor whose value is the position within the real tokens, PAD_VALUE on padding."""
    vals = torch.full(mask.shape, PAD_VALUE, dtype=torch.long)
    for r in range(mask.shape[0]):
        idx = mask[r].nonzero().flatten()
        vals[r, idx] = torch.arange(len(idx))
    return vals


def gathered(res: ResolvedPositions, mask: torch.Tensor) -> list[dict[str, list[int]]]:
    """Per row: spec key -> values gathered at the valid slots of that spec."""
    g = torch.gather(position_values(mask), 1, res.index)
    out = []
    for r in range(mask.shape[0]):
        out.append({k: [int(g[r, s]) for s in slots if bool(res.valid[r, s])]
                    for k, slots in res.mapping_index.items()})
    return out


def oracle(spec: Any, n: int, pivots: list[int] | None) -> list[int] | None:
    """Straightforward per-row answer via list slicing on list(range(n)); None = must raise."""
    r = list(range(n))
    if spec == "last":
        spec = -1
    elif spec == "first":
        spec = 0
    elif spec in ("all", "all-text"):
        spec = (None, None)
    elif isinstance(spec, str) and spec.startswith("last-"):
        k = int(spec[5:])
        if k < 1:
            return None
        spec = -k
    if isinstance(spec, int):
        return [r[spec]] if -n <= spec < n else None
    if isinstance(spec, tuple):
        return r[spec[0]:spec[1]] or None
    if isinstance(spec, str) and spec.startswith("inputs-partition-"):
        if pivots is None or any(b <= a for a, b in zip(pivots, pivots[1:])) or any(p < 0 or p > n for p in pivots):
            return None
        k = int(spec.rsplit("-", 1)[1])
        bounds = [0, *pivots, n]
        if k >= len(bounds) - 1:
            return None
        return r[bounds[k]:bounds[k + 1]] or None
    raise AssertionError(f"oracle does not know {spec!r}")


# ---------------------------------------------------------------- every spec form, by hand

MASK = make_mask([3, 5, 4], "left")   # rows of 3, 5 and 4 real tokens, left-padded


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("last", [[2], [4], [3]]),
        ("last-1", [[2], [4], [3]]),
        ("last-2", [[1], [3], [2]]),
        ("last-3", [[0], [2], [1]]),
        ("first", [[0], [0], [0]]),
        ("all", [[0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 3]]),
        ("all-text", [[0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 3]]),
        (0, [[0], [0], [0]]),
        (2, [[2], [2], [2]]),
        (-1, [[2], [4], [3]]),
        (-3, [[0], [2], [1]]),
        ((0, 2), [[0, 1], [0, 1], [0, 1]]),
        ((1, -1), [[1], [1, 2, 3], [1, 2]]),
        ((0, -2), [[0], [0, 1, 2], [0, 1]]),
        ((2, None), [[2], [2, 3, 4], [2, 3]]),
        ((None, 2), [[0, 1], [0, 1], [0, 1]]),
        ((-2, None), [[1, 2], [3, 4], [2, 3]]),
        ([1, 3], [[1, 2], [1, 2], [1, 2]]),
    ],
)
def test_spec_forms(spec: Any, expected: list[list[int]]) -> None:
    res = resolve_positions([spec], MASK)
    assert res.token_dict[spec_key(spec)] == expected
    assert [g[spec_key(spec)] for g in gathered(res, MASK)] == expected


def test_partitions_flat_and_per_row() -> None:
    res = resolve_positions(["inputs-partition-0", "inputs-partition-1", "inputs-partition-2"], MASK, [1, 2])
    assert res.token_dict == {
        "inputs-partition-0": [[0], [0], [0]],
        "inputs-partition-1": [[1], [1], [1]],
        "inputs-partition-2": [[2], [2, 3, 4], [2, 3]],
    }
    res = resolve_positions(["inputs-partition-1"], MASK, [[2], [1], [3]])
    assert res.token_dict["inputs-partition-1"] == [[2], [1, 2, 3, 4], [3]]
    assert [g["inputs-partition-1"] for g in gathered(res, MASK)] == [[2], [1, 2, 3, 4], [3]]
    res = resolve_positions(["inputs-partition-0"], MASK, [])  # no pivots: one partition = all
    assert res.token_dict["inputs-partition-0"] == [[0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 3]]


def test_mapping_index_valid_and_padded_slots() -> None:
    res = resolve_positions(["last", "all", (0, 2), -2], MASK)
    assert res.mapping_index == {"last": [0], "all": [1, 2, 3, 4, 5], "(0, 2)": [6, 7], "-2": [8]}
    assert res.index.shape == res.valid.shape == (3, 9)
    assert res.index.dtype == torch.long and res.valid.dtype == torch.bool
    assert res.valid[:, 1:6].tolist() == [[True] * 3 + [False] * 2, [True] * 5, [True] * 4 + [False]]
    assert bool(res.valid[:, [0, 6, 7, 8]].all())
    # every slot, padded or not, points at a real token of its row
    assert bool(torch.gather(MASK, 1, res.index).bool().all())


def test_bool_mask_and_middle_block() -> None:
    mask = torch.tensor([[False, True, True, True, False]])
    res = resolve_positions(["first", "last", "all"], mask)
    assert res.index.tolist() == [[1, 3, 1, 2, 3]]
    assert res.token_dict["all"] == [[0, 1, 2]]


# ---------------------------------------------------------------- padding invariance

SPECS: list[Any] = ["last", "last-2", "last-3", "first", "all", -2, 1, (1, -1), (0, None), "inputs-partition-1",
                    "random-text-2", "random-inputs-partition-0-2"]


def test_left_right_and_unpadded_agree() -> None:
    lengths = [4, 7, 5, 6]
    pivots = [[2], [3], [2], [4]]
    results = {side: resolve_positions(SPECS, make_mask(lengths, side, extra=2), pivots, seed=3)
               for side in ("left", "right")}
    assert results["left"].token_dict == results["right"].token_dict
    assert torch.equal(results["left"].valid, results["right"].valid)
    assert gathered(results["left"], make_mask(lengths, "left", 2)) == gathered(results["right"], make_mask(lengths, "right", 2))
    # each row run alone (no padding); random specs are seeded by row index, so compare non-random ones
    for r, n in enumerate(lengths):
        fixed = [s for s in SPECS if not str(s).startswith("random")]
        alone = resolve_positions(fixed, torch.ones(1, n, dtype=torch.long), pivots[r])
        for k, rows in alone.token_dict.items():
            assert results["left"].token_dict[k][r] == rows[0]
    # left padding shifts absolute indices by the padding width
    left = results["left"]
    assert int(left.index[0, 0]) == 8  # seq 9: the row of 4 occupies 5..8


# ---------------------------------------------------------------- random specs

def test_random_specs_properties() -> None:
    lengths = [6, 9, 3]
    mask = make_mask(lengths, "left", extra=1)
    specs = ["random-text", "random-text-3", "random-inputs-partition-1", "random-inputs-partition-1-2"]
    res = resolve_positions(specs, mask, [[2], [4], [1]], seed=7)
    assert res.token_dict == resolve_positions(specs, mask, [[2], [4], [1]], seed=7).token_dict
    assert [len(x) for x in res.token_dict["random-text"]] == [1, 1, 1]
    bounds = {0: (2, 6), 1: (4, 9), 2: (1, 3)}
    for r, n in enumerate(lengths):
        t3 = res.token_dict["random-text-3"][r]
        assert t3 == sorted(set(t3)) and len(t3) == 3 and all(0 <= p < n for p in t3)
        for key, count in (("random-inputs-partition-1", 1), ("random-inputs-partition-1-2", 2)):
            sel = res.token_dict[key][r]
            assert len(sel) == count == len(set(sel)) and all(bounds[r][0] <= p < bounds[r][1] for p in sel)
    assert bool(res.valid.all())
    assert all(v >= 0 for g in gathered(res, mask) for vals in g.values() for v in vals)  # never padding


def test_random_seed_matters_and_is_documented_generator() -> None:
    mask = torch.ones(4, 30, dtype=torch.long)
    a = resolve_positions(["random-text-4"], mask, seed=0).token_dict["random-text-4"]
    b = resolve_positions(["random-text-4"], mask, seed=1).token_dict["random-text-4"]
    assert a != b
    assert len({tuple(x) for x in a}) > 1  # rows are seeded differently
    for r in range(4):
        g = torch.Generator().manual_seed(zlib.crc32(f"0:{r}:random-text-4".encode()))
        assert a[r] == sorted(torch.randperm(30, generator=g)[:4].tolist())
    # the row is the dataset row: a batch that starts at dataset row 10 seeds its row r with 10 + r
    c = resolve_positions(["random-text-4"], mask, seed=0, row_offset=10).token_dict["random-text-4"]
    for r in range(4):
        g = torch.Generator().manual_seed(zlib.crc32(f"0:{10 + r}:random-text-4".encode()))
        assert c[r] == sorted(torch.randperm(30, generator=g)[:4].tolist())


def test_random_full_sample_is_everything() -> None:
    res = resolve_positions(["random-text-5"], make_mask([5, 5], "right", 3))
    assert res.token_dict["random-text-5"] == [[0, 1, 2, 3, 4]] * 2


# ---------------------------------------------------------------- property test against the oracle

spec_strategy = st.one_of(
    st.sampled_from(["last", "first", "all", "all-text", "inputs-partition-0", "inputs-partition-1",
                     "inputs-partition-2", "inputs-partition-3"]),
    st.integers(1, 9).map(lambda k: f"last-{k}"),
    st.integers(-9, 9),
    st.tuples(st.one_of(st.none(), st.integers(-9, 9)), st.one_of(st.none(), st.integers(-9, 9))),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    side=st.sampled_from(["left", "right"]),
    extra=st.integers(0, 2),
    specs=st.lists(spec_strategy, min_size=1, max_size=5, unique_by=spec_key),
    flat_pivots=st.lists(st.integers(0, 9), max_size=3),
    per_row=st.booleans(),
)
def test_matches_oracle(lengths: list[int], side: str, extra: int, specs: list[Any],
                        flat_pivots: list[int], per_row: bool) -> None:
    pivots: Any = [sorted({p % (n + 1) for p in flat_pivots}) for n in lengths] if per_row else flat_pivots
    row_pivots = pivots if per_row else [flat_pivots] * len(lengths)
    uses_partition = any(isinstance(s, str) and s.startswith("inputs-") for s in specs)
    expected = {spec_key(s): [oracle(s, n, row_pivots[r]) for r, n in enumerate(lengths)] for s in specs}
    mask = make_mask(lengths, side, extra)
    if any(v is None for rows in expected.values() for v in rows):
        with pytest.raises(PositionError):
            resolve_positions(specs, mask, pivots)
        return
    if not uses_partition:  # the pivots are unused and must not matter
        pivots = None
    res = resolve_positions(specs, mask, pivots)
    assert res.token_dict == expected
    other = resolve_positions(specs, make_mask(lengths, "right" if side == "left" else "left", extra), pivots)
    assert other.token_dict == expected
    assert gathered(res, mask) == [{k: v[r] for k, v in expected.items()} for r in range(len(lengths))]
    assert bool(torch.gather(mask, 1, res.index).bool().all())
    widths = {k: max(len(v) for v in rows) for k, rows in expected.items()}
    assert {k: len(v) for k, v in res.mapping_index.items()} == widths
    assert res.index.shape == (len(lengths), sum(widths.values()))


# ---------------------------------------------------------------- spec keys and syntax

@pytest.mark.parametrize(
    "spec, key",
    [("last", "last"), ("last-2", "last-2"), ("last-02", "last-2"), (3, "3"), (-1, "-1"), ((0, 4), "(0, 4)"),
     ([0, 4], "(0, 4)"), ((2, None), "(2, None)"), ((None, -3), "(None, -3)"), ("random-text", "random-text"),
     ("random-text-3", "random-text-3"), ("inputs-partition-2", "inputs-partition-2"),
     ("random-inputs-partition-1", "random-inputs-partition-1"),
     ("random-inputs-partition-1-4", "random-inputs-partition-1-4"), ("all-text", "all-text")],
)
def test_spec_key(spec: Any, key: str) -> None:
    assert spec_key(spec) == key


def test_validate_specs_normalises() -> None:
    assert validate_specs(["last", [1, -1], 2, "last-03", (None, 2)]) == ["last", (1, -1), 2, "last-3", (None, 2)]


@pytest.mark.parametrize(
    "specs, needle",
    [
        (["lats"], "unknown spec string"),
        (["last-x"], "unknown spec string"),
        (["last-0"], "k must be >= 1"),
        (["last-"], "unknown spec string"),
        (["LAST"], "unknown spec string"),
        (["3"], "unknown spec string"),
        ([(1, 2, 3)], "exactly 2 entries"),
        ([(1.0, 2)], "must be int or None"),
        ([("a", 2)], "must be int or None"),
        ([1.5], "unsupported spec type"),
        ([True], "unsupported spec type"),
        ([None], "unsupported spec type"),
        ([{"last"}], "unsupported spec type"),
        ([], "empty"),
        ("last", "must be a list"),
        ((0, 4), "must be a list"),
        (3, "must be a list"),
        (["random-text-0"], "at least one"),
        (["random-inputs-partition-0-0"], "at least one"),
        (["last", "last"], "twice"),
        ([(0, 4), [0, 4]], "twice"),
    ],
)
def test_malformed_specs(specs: Any, needle: str) -> None:
    with pytest.raises(PositionError, match=needle) as e:
        validate_specs(specs)
    assert "Fix:" in str(e.value)
    with pytest.raises(PositionError, match=needle):
        resolve_positions(specs, torch.ones(1, 4))


# ---------------------------------------------------------------- per-row resolution errors

@pytest.mark.parametrize(
    "specs, pivots, needles",
    [
        ([3], None, ["spec 3", "row 0", "length 3", "out of range"]),
        ([-4], None, ["spec -4", "row 0", "length 3"]),
        (["last-4"], None, ["last-4", "row 0", "length 3"]),
        ([4], None, ["spec 4", "row 0"]),
        ([(5, 7)], None, ["(5, 7)", "row 0", "zero positions"]),
        ([(3, None)], None, ["(3, None)", "row 0", "zero positions"]),
        ([(2, 1)], None, ["(2, 1)", "row 0", "zero positions"]),
        ([(0, -3)], None, ["(0, -3)", "row 0", "zero positions"]),
        (["inputs-partition-1"], None, ["inputs-partition-1", "row 0", "does not exist"]),
        (["random-inputs-partition-0-4"], None, ["row 0", "only 3"]),
        (["inputs-partition-2"], [1], ["inputs-partition-2", "row 0", "does not exist"]),
        (["inputs-partition-1"], [3], ["inputs-partition-1", "row 0", "zero positions"]),
        (["inputs-partition-0"], [2, 1], ["row 0", "strictly increasing"]),
        (["inputs-partition-0"], [1, 1], ["row 0", "strictly increasing"]),
        (["inputs-partition-0"], [4], ["row 0", "within [0, 3]"]),
        (["inputs-partition-0"], [-1], ["row 0", "within"]),
        (["inputs-partition-0"], [[1], [1], [1]], ["2 rows", "3 lists"]),
        (["inputs-partition-0"], [[1], [6]], ["row 1", "within [0, 5]"]),
        (["inputs-partition-0"], [1.5], ["must be ints"]),
        (["inputs-partition-0"], "1", ["must be a list"]),
        (["random-text-4"], None, ["random-text-4", "row 0", "only 3"]),
        (["random-inputs-partition-1-3"], [1], ["row 0", "only 2"]),
    ],
)
def test_row_errors(specs: list[Any], pivots: Any, needles: list[str]) -> None:
    mask = make_mask([3, 5], "left", extra=1)   # row 0: 3 real tokens, row 1: 5
    with pytest.raises(PositionError) as e:
        resolve_positions(specs, mask, pivots)
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, msg
    assert "Fix:" in msg


def test_range_empty_only_in_short_row_names_that_row() -> None:
    mask = make_mask([5, 2], "right")
    with pytest.raises(PositionError, match="batch row 1"):
        resolve_positions([(2, 4)], mask)
    with pytest.raises(PositionError, match="batch row 1.*length 2"):
        resolve_positions(["last-3"], mask)


@pytest.mark.parametrize(
    "mask, needle",
    [
        (torch.tensor([[1, 1, 0], [0, 0, 0]]), "row 1.*no real tokens"),
        (torch.tensor([[1, 2, 1]]), "0 \\(padding\\) or 1"),
        (torch.ones(3), "2-D"),
        (torch.ones(1, 2, 3), "2-D"),
        (torch.ones(0, 3), "empty shape"),
        ([[1, 1]], "2-D"),
    ],
)
def test_bad_masks(mask: Any, needle: str) -> None:
    with pytest.raises(PositionError, match=needle):
        resolve_positions(["last"], mask)


def test_bad_seed() -> None:
    with pytest.raises(PositionError, match="seed"):
        resolve_positions(["random-text"], torch.ones(1, 3), seed=1.5)  # type: ignore[arg-type]


def test_partition_without_pivots_is_the_whole_prompt() -> None:
    """easyroutine: with no pivot_positions, "inputs-partition-0" is every real token of the row."""
    res = resolve_positions(["inputs-partition-0"], make_mask([3, 5], "left", extra=1))
    assert res.token_dict["inputs-partition-0"] == [[0, 1, 2], [0, 1, 2, 3, 4]]
