"""easyroutine_dist.statistics: float64 moments over real slots, merged exactly (checked against plain torch)."""

from __future__ import annotations

import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.distributed import tokenize_batches
from easyroutine_dist.statistics import Moments, cache_statistics, merge_statistics

from .distributed.tiny import char_tokenizer, prompts
from .models import hooked


def _torch_stats(x: torch.Tensor) -> dict:
    """The expected statistics of samples ``x`` ``[n, *features]``, with plain torch in float64."""
    x = x.double()
    return {"count": x.shape[0], "mean": x.mean(0), "var": x.var(0, correction=0), "min": x.amin(0),
            "max": x.amax(0), "norm_mean": float(x.reshape(x.shape[0], -1).norm(dim=1).mean())}


def _check(summary: dict, x: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    want = _torch_stats(x)
    assert summary["count"] == want["count"]
    for f in ("mean", "var", "min", "max"):
        assert summary[f].dtype == torch.float64
        torch.testing.assert_close(summary[f], want[f], rtol=rtol, atol=atol, msg=f)
    assert summary["norm_mean"] == pytest.approx(want["norm_mean"], rel=1e-9)


def test_merge_of_uneven_chunks_equals_the_whole_even_with_a_large_offset():
    g = torch.Generator().manual_seed(0)
    x = (1e6 + torch.randn(1001, 5, generator=g, dtype=torch.float64)).float()  # var ~1 around a mean of 1e6
    acc = None
    for lo, hi in ((0, 1), (1, 400), (400, 401), (401, 1001)):
        got = Moments.of(x[lo:hi])
        acc = got if acc is None else acc.merge(got)
    want = _torch_stats(x)
    torch.testing.assert_close(acc.summary()["var"], want["var"], rtol=1e-9, atol=0)
    torch.testing.assert_close(acc.summary()["mean"], want["mean"], rtol=1e-12, atol=0)
    # merging in another grouping gives the same numbers
    other = Moments.of(x[:700]).merge(Moments.of(x[700:]))
    torch.testing.assert_close(other.summary()["var"], acc.summary()["var"], rtol=1e-9, atol=0)
    assert Moments.of(x[:0]) is None


def test_chunked_accumulation_matches_one_pass(monkeypatch):
    from easyroutine_dist import statistics

    x = torch.randn(50, 3, 4)
    whole = Moments.of(x).summary()
    monkeypatch.setattr(statistics, "CHUNK_ELEMENTS", 25)  # 2 rows of 12 features per chunk
    chunked = Moments.of(x).summary()
    for f in ("mean", "var", "min", "max"):
        torch.testing.assert_close(chunked[f], whole[f], rtol=1e-12, atol=1e-12)
    _check(chunked, x)


CONFIG = ExtractionConfig(extract_resid_out=True, extract_attn_pattern=True, save_logits=True, save_input_ids=True)


@pytest.fixture(scope="module")
def cache():
    """A cache with a variable-width group ("all": padded per batch) and a fixed one, plus attention patterns."""
    return hooked("llama").extract_cache(tokenize_batches(char_tokenizer(), prompts(9), 4), ["all", "last"],
                                         extraction_config=CONFIG)


def test_cache_statistics_count_real_slots_only(cache):
    vm = cache["valid_mask"]
    assert not vm.all()  # the test needs padding
    stats = cache_statistics(cache)
    for key in ("resid_out_0", "resid_out_2", "logits"):
        kind, m = stats[key]
        assert kind == "pos"
        _check(m.summary(), cache[key][vm])
        # padding included would change the mean: the statistics really exclude it
        assert not torch.allclose(m.summary()["mean"], cache[key].reshape(-1, cache[key].shape[-1]).double().mean(0))
    assert "valid_mask" not in stats and "input_ids" not in stats  # masks and integer tensors have none


def test_pattern_keys_count_real_cells(cache):
    rows, cols = cache["valid_mask_pattern_rows"], cache["valid_mask_pattern_cols"]
    cells = rows[:, :, None] & cols[:, None, :]
    kind, m = cache_statistics(cache)["pattern_L1H2"]
    assert kind == "pattern_rows,pattern_cols"
    _check(m.summary(), cache["pattern_L1H2"][cells])


def test_keys_without_position_axis_count_rows(cache):
    c = cache.copy()
    c["probe_target"] = torch.randn(c["valid_mask"].shape[0], 3)  # a user value, not in the slot layout
    kind, m = cache_statistics(c)["probe_target"]
    assert kind == "row"
    _check(m.summary(), c["probe_target"])


def test_merge_statistics_of_two_caches_equals_their_concatenation(cache):
    from easyroutine_dist.cache import ActivationCache

    model = hooked("llama")
    other = model.extract_cache(tokenize_batches(char_tokenizer(), prompts(5, seed=3), 5), ["all", "last"],
                                extraction_config=CONFIG)
    merged = merge_statistics(cache_statistics(cache), cache_statistics(other))
    both = ActivationCache.concat([cache, other])  # one layout: each real slot keeps its value
    _check(merged["resid_out_1"][1].summary(), both["resid_out_1"][both["valid_mask"]])
