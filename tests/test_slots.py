"""The slot layout: variable-width position groups in any order, over batches and parts of any length, padded on
either side, keep every real slot equal to the row run alone through HF (tests/oracle.py) and mark padding."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from easyroutine_dist.cache import ActivationCache
from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver
from easyroutine_dist.storage.runs import RunWriter

from .models import VOCAB, eager, hooked, tiny_model
from .oracle import check_rows, hf_row, pad, spec_name

CFG = ExtractionConfig(extract_resid_out=True, save_logits=True)
LAYERS = [0, 1]  # the tiny models have 3 layers; HF's last hidden state is final-normed
FIXED = ["last", "first", "last-2", 1, -2, "random-text-2"]
VARIABLE = ["all", (0, -1), (1, None), (None, 2), (-3, None)]
MIN_LEN = 3  # every spec above selects at least one real token in rows this long

specs_st = st.lists(st.sampled_from(FIXED + VARIABLE), min_size=1, max_size=5, unique_by=spec_name).filter(
    lambda s: any(x in VARIABLE for x in s))
rows_st = st.lists(st.lists(st.integers(3, VOCAB - 1), min_size=MIN_LEN, max_size=9), min_size=2, max_size=7)


def _batches(rows, cuts, sides):
    bounds = sorted({0, len(rows), *[c % len(rows) for c in cuts]})
    return [pad(rows[a:b], sides[i % len(sides)]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=specs_st, rows=rows_st, cuts=st.lists(st.integers(0, 20), max_size=4),
       sides=st.lists(st.sampled_from(["left", "right"]), min_size=1, max_size=3),
       part_cuts=st.lists(st.integers(0, 20), max_size=3))
def test_every_real_slot_equals_the_row_alone(specs, rows, cuts, sides, part_cuts, tmp_path_factory):
    hm, model = hooked("llama"), tiny_model("llama")
    batches = _batches(rows, cuts, sides)
    cache = hm.extract_cache(batches, specs, extraction_config=CFG)
    check_rows(cache, rows, specs, model, LAYERS)

    # the same rows saved as several parts of one run (each part its own extract_cache), then loaded
    writer = RunWriter(tmp_path_factory.mktemp("parts"))
    run = writer.begin_run("prop", hm.model_name, {"target_token_positions": [spec_name(s) for s in specs]})
    bounds = sorted({0, len(batches), *[c % len(batches) for c in part_cuts]})
    offset = 0
    for pid, (a, b) in enumerate(zip(bounds, bounds[1:])):
        part = hm.extract_cache(batches[a:b], specs, extraction_config=CFG, row_offset=offset)
        offset += sum(int(x["input_ids"].shape[0]) for x in batches[a:b])
        writer.commit_part(run, writer.write_part(run, pid, part))
    writer.commit_run(run)
    loaded, _ = ActivationLoader(writer.store.root, "prop").query().load()
    check_rows(loaded, rows, specs, model, LAYERS)
    # random draws depend on the dataset row, not on where batches or parts were cut
    for spec in specs:
        assert loaded["token_dict"][spec_name(spec)] == cache["token_dict"][spec_name(spec)]
    # a partial load keeps the validity mask and the layout
    part_only, _ = ActivationLoader(writer.store.root, "prop").query().load(keys=["resid_out_0"])
    assert torch.equal(part_only["valid_mask"], cache["valid_mask"])
    torch.testing.assert_close(part_only["resid_out_0"], cache["resid_out_0"])


def test_last_after_all_is_read_at_the_right_slot_across_batches():
    """The review's case: batches of lengths 7 and 5 with ["all", "last"]: "last" must not overlap "all"."""
    hm, model = hooked("llama"), tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 6, 5, 4)]
    cache = hm.extract_cache([pad(rows[:2], "left"), pad(rows[2:], "right")], ["all", "last"], extraction_config=CFG)
    assert cache["mapping_index"] == {"all": list(range(7)), "last": [7]}
    check_rows(cache, rows, ["all", "last"], model, LAYERS)


def test_avg_over_example_averages_real_slots_only():
    hm, model = hooked("llama"), tiny_model("llama")
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 3, 4, 5)]
    cfg = ExtractionConfig(extract_resid_out=True, avg_over_example=True)
    hidden = [hf_row(model, r)[0][1] for r in rows]  # resid_out_0 of each row alone, [n, d]
    # plain mean over the rows that have each "all" slot (slot j exists in rows longer than j)
    want = torch.stack([torch.stack([h[j] for h in hidden if len(h) > j]).mean(0) for j in range(6)])
    one = hm.forward(pad(rows[:2], "left"), ["all"], extraction_config=cfg)
    want_one = torch.stack([torch.stack([h[j] for h in hidden[:2] if len(h) > j]).mean(0) for j in range(6)])
    torch.testing.assert_close(one["resid_out_0"][0], want_one, atol=1e-5, rtol=1e-4)
    many = hm.extract_cache([pad(rows[:2], "left"), pad(rows[2:], "right")], ["all"], extraction_config=cfg)
    assert many["resid_out_0"].shape[0] == 1
    torch.testing.assert_close(many["resid_out_0"][0], want, atol=1e-5, rtol=1e-4)
    assert many["valid_mask"].tolist() == [[True] * 6]


def test_avg_over_groups_with_unequal_lengths():
    hm, model = hooked("llama"), tiny_model("llama")
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 3)]
    cache = hm.forward(pad(rows, "right"), ["last", "all"],
                       extraction_config=ExtractionConfig(extract_resid_out=True, avg=True))
    for r, ids in enumerate(rows):
        h = hf_row(model, ids)[0][1]
        torch.testing.assert_close(cache["resid_out_0"][r, 0], h[-1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache["resid_out_0"][r, 1], h.mean(0), atol=1e-5, rtol=1e-4)


def test_random_positions_differ_across_batches_and_follow_the_dataset_row():
    hm = hooked("llama")
    rows = [[5 + i] * 8 for i in range(12)]  # equal lengths: a per-batch seed would repeat the draw
    cache = hm.extract_cache([pad(rows[i:i + 3], "left") for i in range(0, 12, 3)], ["random-text-3"],
                             extraction_config=CFG, position_seed=11)
    draws = cache["token_dict"]["random-text-3"]
    assert len({tuple(d) for d in draws}) > 6, draws
    # rows 6..11 alone, told where they are in the dataset, draw the same positions
    tail = hm.extract_cache([pad(rows[6:], "right")], ["random-text-3"], extraction_config=CFG,
                            position_seed=11, row_offset=6)
    assert tail["token_dict"]["random-text-3"] == draws[6:]
    other = hm.extract_cache([pad(rows, "left")], ["random-text-3"], extraction_config=CFG, position_seed=12)
    assert other["token_dict"]["random-text-3"] != draws
    assert cache["metadata"]["position_seed"] == 11


def test_cat_of_hand_built_caches_with_different_layouts_is_refused():
    a, b = ActivationCache(), ActivationCache()
    a["x"], a["mapping_index"] = torch.ones(1, 2, 3), {"all": [0, 1]}
    b["x"], b["mapping_index"] = torch.ones(1, 4, 3), {"all": [0, 1, 2, 3]}
    try:
        a.cat(b)
    except Exception as exc:  # noqa: BLE001
        assert "slot_layout" in str(exc) and "iter_parts" in str(exc)
    else:
        raise AssertionError("concatenating caches whose groups cannot be aligned must fail")


def test_patterns_concatenate_on_both_axes(tmp_path):
    hm = hooked("llama")
    g = torch.Generator().manual_seed(6)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 3, 7)]
    cfg = ExtractionConfig(extract_attn_pattern=True, attn_heads=[{"layer": 1, "head": 2}])
    cache = hm.extract_cache([pad(rows[:2], "left"), pad(rows[2:], "right")], ["all", "last"],
                             extraction_config=cfg)
    for r, ids in enumerate(rows):
        with eager(tiny_model("llama")) as m, torch.no_grad():
            weights = m(input_ids=torch.tensor([ids]), output_attentions=True).attentions[1][0, 2]
        n = len(ids)
        pos = list(range(n)) + [n - 1]
        alone = weights[pos][:, pos]
        slots = list(range(n)) + [7]
        torch.testing.assert_close(cache["pattern_L1H2"][r][slots][:, slots], alone, atol=1e-6, rtol=1e-5)
        pad_slots = list(range(n, 7))
        assert torch.count_nonzero(cache["pattern_L1H2"][r][pad_slots]) == 0
        assert cache["valid_mask_pattern_rows"][r].tolist() == [j < n for j in range(7)] + [True]


def test_old_multi_part_run_with_different_layouts_is_refused_but_iterable(tmp_path):
    """Runs written before slot_layout: parts whose groups differ cannot be aligned, so load() refuses them."""
    import pytest

    from easyroutine_dist.errors import StorageError

    writer = RunWriter(tmp_path)
    run = writer.begin_run("old", "m", {})
    for pid, width in enumerate((2, 4)):
        writer.commit_part(run, writer.write_part(run, pid, ({"x": torch.ones(1, width + 1, 3)},
                                                             {"mapping_index": {"all": list(range(width)),
                                                                                "last": [width]}})))
    writer.commit_run(run)
    q = ActivationLoader(tmp_path, "old").query()
    with pytest.raises(StorageError, match="cannot be joined"):
        q.load()
    assert [p["x"].shape[1] for p in q.iter_parts()] == [3, 5]
