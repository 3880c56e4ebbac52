"""ActivationCache: the dict protocol, lazy linear-time cat, storage form."""

import subprocess

import pytest
import torch

from easyroutine_dist.cache import ActivationCache
from easyroutine_dist.errors import ConfigError


def _cache(rows: int, seed: int, positions: int = 2) -> ActivationCache:
    g = torch.Generator().manual_seed(seed)
    c = ActivationCache()
    c["resid_out_0"] = torch.randn(rows, positions, 4, generator=g)
    c["token_dict"] = {"last": [[positions]] * rows}
    c["mapping_index"] = {"last": list(range(positions))}
    return c


def test_dict_protocol():
    c = _cache(2, 0)
    assert "resid_out_0" in c and c.get("nope", 7) == 7 and len(c) == 3
    assert set(c.keys()) == {"resid_out_0", "token_dict", "mapping_index"}
    del c["token_dict"]
    assert "token_dict" not in c
    c.update({"x": torch.ones(2, 1)})
    assert dict(c.items())["x"].shape == (2, 1)
    assert c.nbytes() == 2 * 2 * 4 * 4 + 2 * 4 and c.memory_size() == "72.00 B"


def test_cat_concatenates_on_the_batch_axis_and_merges_info():
    a, b = _cache(2, 0), _cache(3, 1)
    expected = torch.cat([a["resid_out_0"], b["resid_out_0"]])
    a.cat(b)
    assert torch.equal(a["resid_out_0"], expected)
    assert len(a["token_dict"]["last"]) == 5
    c = _cache(1, 0) + _cache(1, 1)
    assert c["resid_out_0"].shape[0] == 2


def test_cat_moves_each_group_to_its_merged_slots():
    """Two caches laid out as {"all": w, "last": 1} with w = 2 and 3: "last" lands after the widest "all"."""
    from easyroutine_dist.slots import SlotLayout

    def part(width: int, value: float) -> ActivationCache:
        c = ActivationCache()
        c["x"] = torch.cat([torch.full((1, width, 2), value), torch.full((1, 1, 2), -value)], dim=1)
        c["valid_mask"] = torch.ones(1, width + 1, dtype=torch.bool)
        c["mapping_index"] = {"all": list(range(width)), "last": [width]}
        c["slot_layout"] = SlotLayout({"pos": [("all", width), ("last", 1)]},
                                      {"x": ("pos",), "valid_mask": ("pos",)}).to_json()
        return c

    a = part(2, 1.0)
    a.cat(part(3, 2.0))
    assert a["mapping_index"] == {"all": [0, 1, 2], "last": [3]}
    assert a["x"][:, :, 0].tolist() == [[1.0, 1.0, 0.0, -1.0], [2.0, 2.0, 2.0, -2.0]]
    assert a["valid_mask"].tolist() == [[True, True, False, True], [True] * 4]


def test_cat_is_linear_in_the_number_of_batches():
    """Lazy chunks: n cats join once, so 4x the batches copy 4x the bytes (not 16x)."""
    def copies(n):
        calls = []
        orig = torch.cat

        def counting(tensors, *a, **k):
            calls.append(sum(t.numel() for t in tensors))
            return orig(tensors, *a, **k)

        torch.cat = counting
        try:
            out = ActivationCache()
            for i in range(n):
                out.cat(_cache(1, i))
            out["resid_out_0"]
        finally:
            torch.cat = orig
        return sum(calls)

    assert copies(400) == 4 * copies(100)


def test_register_aggregation_gets_old_and_new():
    """easyroutine's contract: fn(old, new), old None when the cache starts empty."""
    a, b = _cache(1, 0), _cache(1, 1)
    a["score"], b["score"] = torch.tensor([1.0]), torch.tensor([3.0])
    seen = []

    def keep_max(old, new):
        seen.append((None if old is None else old.tolist(), new.tolist()))
        return new if old is None else torch.maximum(old, new)

    a.register_aggregation("score", keep_max)
    a.cat(b)
    assert torch.equal(a["score"], torch.tensor([3.0])) and seen == [([1.0], [3.0])]
    empty = ActivationCache()
    empty.register_aggregation("score", keep_max)
    empty.cat(b)
    assert seen[-1] == (None, [3.0])


def test_cat_refuses_different_keys_and_keeps_values_like_easyroutine():
    a, b = _cache(1, 0), _cache(1, 1)
    b["extra"] = torch.ones(1)
    with pytest.raises(ValueError, match="extra"):
        a.cat(b)
    x, y = ActivationCache(), ActivationCache()
    x["l"], y["l"] = [1, 2], [3]
    x["t"], y["t"] = (1, 2), (3, 4)
    x["odd"], y["odd"] = torch.ones(2, 3), torch.ones(2, 2)  # cannot be concatenated: kept, not padded
    x.cat(y)
    assert x["l"] == [1, 2, 3] and x["t"] == [(1, 2), (3, 4)]
    assert isinstance(x["odd"], list) and [t.shape[1] for t in x["odd"]] == [3, 2]


def test_deferred_mode_pickling_and_memory_report(tmp_path):
    a, b = _cache(2, 0), _cache(3, 1)
    want = torch.cat([a["resid_out_0"], b["resid_out_0"]])
    a.register_aggregation("token_dict", lambda old, new: new if old is None else old)  # a lambda: not picklable
    with a.deferred_mode():
        a.cat(b)
        assert a["resid_out_0"].shape[0] == 2  # queued only
    assert torch.equal(a["resid_out_0"], want)
    torch.save(a, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt")  # weights_only=True, the default
    assert torch.equal(back["resid_out_0"], want)
    tree = a.memory_tree(print_tree=False, grouped_tree=True)
    assert tree["resid_out"] == "160.00 B (1 items)"  # 5 rows x 2 positions x 4 floats of 4 bytes
    assert a.memory_size("resid_out_0") == "160.00 B" and ActivationCache.memory_size(_cache(50, 0)) == "1.60 KB"


def test_flat_round_trip_and_map_to_dict():
    c = _cache(2, 0)
    c["metadata"] = {"model_name": "m", "positions": ["last", [0, 2]]}
    tensors, info = c.to_flat()
    assert set(tensors) == {"resid_out_0"} and info["metadata"]["model_name"] == "m"
    back = ActivationCache.from_flat(tensors, info)
    assert torch.equal(back["resid_out_0"], c["resid_out_0"]) and back["metadata"] == c["metadata"]
    assert back.map_to_dict("resid_out_0")["last"].shape == (2, 2, 4)
    groups = ActivationCache()
    groups["x"] = torch.arange(2 * 3).reshape(2, 3)  # [batch 2, P 3]: row 0 -> 0 1 2, row 1 -> 3 4 5
    groups["mapping_index"] = {"last": [0], "all": [1, 2]}
    split = groups.map_to_dict("x")
    assert split["last"].tolist() == [[0], [3]] and split["all"].tolist() == [[1, 2], [4, 5]]
    c["bad"] = object()
    with pytest.raises(ConfigError, match="bad"):
        c.to_flat()


def test_ci_runs_the_readme_test_command():
    """.ci/run extracts its command from README.md; both must name pytest and the setup script."""
    readme = open("README.md").read().splitlines()
    assert readme[3].startswith("bash scripts/setup.sh && .venv/bin/easyroutine-dist demo")
    assert readme[4].startswith("bash scripts/setup.sh && .venv/bin/python -m pytest")
    out = subprocess.run(["bash", "-c", "grep -m1 -E '^bash scripts/setup.sh && .*pytest' README.md"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == readme[4].strip()
    assert "README.md" in open(".ci/run").read()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.int64, torch.float16])
def test_cat_rows_equals_torch_cat(dtype):
    """The memcpy path of cat_rows (large CPU chunks) gives torch.cat's result, empty chunks included; chunks it
    cannot copy bytewise (mixed dtypes, a non-contiguous view) go through torch.cat's promotion rules."""
    from easyroutine_dist.cache import cat_rows

    g = torch.Generator().manual_seed(0)
    chunks = [(torch.randn(n, 64, 33, generator=g) * 5).to(dtype) for n in (300, 0, 400, 1)]  # > 1 MiB in all
    assert sum(c.nbytes for c in chunks) >= 1 << 20
    assert torch.equal(cat_rows(chunks), torch.cat(chunks))
    mixed = [torch.ones(300, 64, 33), torch.ones(300, 64, 33, dtype=torch.float64).transpose(1, 2).transpose(1, 2)]
    assert cat_rows(mixed).dtype == torch.cat(mixed).dtype == torch.float64
    view = torch.arange(600 * 64 * 33, dtype=torch.float32).reshape(33, 64, 600).permute(2, 1, 0)
    assert torch.equal(cat_rows([view, view]), torch.cat([view, view]))
