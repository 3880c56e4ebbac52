"""Attention masks with holes (0s between 1s; easyroutine's test_tools feeds random 0/1 masks): positions index a
row's real tokens (where the mask is 1) in order, and a row with holes gives what its real tokens give alone through
plain HF (tests/oracle.py). Masks without holes resolve as before: index = the row's first real index + position."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.positions import resolve_positions

from .models import VOCAB, hooked, tiny_model
from .oracle import check_rows, pad, spec_name, spec_positions
from .test_positions import make_mask

SPECS = ["last", "first", "last-2", 1, -2, "all", (0, -1), (1, None), (None, 2), (-3, None)]
MIN_REAL = 3  # every spec above selects at least one real token in rows this long
LAYERS = [0, 1]


def _row_bits(width: int):
    return st.lists(st.integers(0, 1), min_size=width, max_size=width).filter(lambda b: sum(b) >= MIN_REAL)


masks_st = st.integers(MIN_REAL, 12).flatmap(lambda w: st.lists(_row_bits(w), min_size=1, max_size=5))
specs_st = st.lists(st.sampled_from(SPECS), min_size=1, max_size=4, unique_by=spec_name)


def _check(res, bits: list[list[int]], specs: list) -> None:
    for r, row in enumerate(bits):
        real = [i for i, b in enumerate(row) if b]
        for spec in specs:
            slots = res.mapping_index[spec_name(spec)]
            want = spec_positions(spec, len(real))  # plain Python indexing over the real tokens
            assert res.token_dict[spec_name(spec)][r] == want, (spec, r)
            k = len(want)
            assert res.index[r, slots[:k]].tolist() == [real[p] for p in want], (spec, r, row)
            assert res.valid[r, slots[:k]].all() and not res.valid[r, slots[k:]].any()


@settings(max_examples=150, deadline=None)
@given(bits=masks_st, specs=specs_st)
def test_positions_are_the_real_tokens_in_order(bits, specs):
    _check(resolve_positions(specs, torch.tensor(bits)), bits, specs)


@pytest.mark.parametrize("side", ["left", "right"])
def test_masks_without_holes_resolve_as_before(side):
    lengths = [5, 3, 7, 4]
    width = 8
    mask = make_mask(lengths, side, extra=width - max(lengths))
    res = resolve_positions(SPECS, mask)
    for r, n in enumerate(lengths):
        start = width - n if side == "left" else 0
        for spec in SPECS:
            slots = res.mapping_index[spec_name(spec)]
            want = spec_positions(spec, n)
            assert res.index[r, slots[:len(want)]].tolist() == [start + p for p in want]
            assert res.index[r, slots[len(want):]].tolist() == [start + want[0]] * (len(slots) - len(want))


def holed(rows: list[list[int]], seed: int, extra: int = 4) -> dict[str, torch.Tensor]:
    """Each row's tokens scattered, in order, among filler tokens (arbitrary ids, masked out)."""
    g = torch.Generator().manual_seed(seed)
    width = max(len(r) for r in rows) + extra
    ids = torch.randint(3, VOCAB, (len(rows), width), generator=g)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        where = sorted(torch.randperm(width, generator=g)[:len(r)].tolist())
        ids[i, where] = torch.tensor(r)
        mask[i, where] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _has_holes(mask: torch.Tensor) -> bool:
    """Whether every row has a 0 between its first and last 1."""
    real = [row.nonzero().flatten().tolist() for row in mask]
    return all(r[-1] - r[0] + 1 > len(r) for r in real)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_rows_with_holes_equal_their_real_tokens_alone(arch):
    hm, model = hooked(arch), tiny_model(arch)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 3, 5, 4)]
    batches = [holed(rows[:2], seed=1), holed(rows[2:], seed=2)]
    assert all(_has_holes(b["attention_mask"]) for b in batches)
    specs = ["all", "last", "first", (1, None)]
    cache = hm.extract_cache(batches, specs, extraction_config=ExtractionConfig(extract_resid_out=True,
                                                                                 save_logits=True))
    check_rows(cache, rows, specs, model, LAYERS)


@pytest.mark.parametrize("avg", ["none", "baseline_ratio"])
def test_patterns_of_rows_with_holes_equal_those_of_the_padded_rows(avg):
    """Patterns (and the baseline_ratio reduction, which needs each row's position within its prompt) of a batch
    with holes equal those of the same rows left-padded, which test_hooked_model checks against HF."""
    hm = hooked("llama")
    g = torch.Generator().manual_seed(6)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 4, 5)]
    batch = holed(rows, seed=3)
    assert _has_holes(batch["attention_mask"])
    cfg = ExtractionConfig(extract_attn_pattern=True, attn_heads=[{"layer": 1, "head": 2}], attn_pattern_avg=avg)
    specs = ["first", (1, None), "last"]
    got = hm.forward(batch, specs, extraction_config=cfg)
    want = hm.forward(pad(rows, "left"), specs, extraction_config=cfg)
    torch.testing.assert_close(got["pattern_L1H2"], want["pattern_L1H2"], rtol=1e-5, atol=1e-6)
