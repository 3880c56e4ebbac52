"""Oracles the code under test does not compute: each row run alone through plain HF, and the position specs
re-implemented here with plain Python slicing over a row's real tokens."""

from __future__ import annotations

import re

import torch


def spec_positions(spec, n: int) -> list[int] | None:
    """Positions (0 = first real token) that a non-random spec selects in a row of ``n`` real tokens; None for
    random specs (their draw is checked by its properties instead)."""
    idx = list(range(n))
    if spec == "last":
        return [n - 1]
    if spec == "first":
        return [0]
    if spec in ("all", "all-text"):
        return idx
    if isinstance(spec, int):
        return [idx[spec]]
    if isinstance(spec, tuple):
        return idx[spec[0]:spec[1]]
    m = re.fullmatch(r"last-(\d+)", str(spec))
    if m:
        return [idx[-int(m.group(1))]]
    if str(spec).startswith("random"):
        return None
    raise AssertionError(f"oracle does not know spec {spec!r}")


def spec_name(spec) -> str:
    """The group name a spec is stored under (``(0, None)`` -> ``"(0, None)"``)."""
    return f"({spec[0]}, {spec[1]})" if isinstance(spec, tuple) else str(spec)


@torch.no_grad()
def hf_row(model, ids: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Plain HF forward of one unpadded row: (hidden states ``[n, d]`` per entry, logits ``[n, vocab]``)."""
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    return [h[0] for h in out.hidden_states], out.logits[0]


def check_rows(cache, rows: list[list[int]], specs: list, model, layers: list[int], atol: float = 1e-5) -> None:
    """Every real slot of every row equals that row run alone through HF; every padded slot is marked invalid and
    holds zeros. ``resid_out_{i}`` for i in ``layers`` is checked against ``hidden_states[i + 1]`` (so i must not be
    the last layer, whose HF hidden state is final-normed), ``logits`` against HF logits."""
    mapping, valid = cache["mapping_index"], cache["valid_mask"]
    assert valid.shape[0] == len(rows) and valid.dtype == torch.bool
    for r, ids in enumerate(rows):
        hidden, logits = hf_row(model, ids)
        n = len(ids)
        for spec in specs:
            slots = mapping[spec_name(spec)]
            want = spec_positions(spec, n)
            got_pos = cache["token_dict"][spec_name(spec)][r]
            if want is None:  # random: distinct, sorted, real positions
                assert got_pos == sorted(set(got_pos)) and all(0 <= p < n for p in got_pos), (spec, got_pos)
                want = got_pos
            assert got_pos == want, (spec, r, got_pos, want)
            k = len(want)
            assert valid[r, slots[:k]].all() and not valid[r, slots[k:]].any(), (spec, r, valid[r, slots])
            for i in layers:
                act = cache[f"resid_out_{i}"][r, slots]
                torch.testing.assert_close(act[:k], hidden[i + 1][want], atol=atol, rtol=1e-4,
                                           msg=f"resid_out_{i} row {r} spec {spec!r}")
                assert torch.count_nonzero(act[k:]) == 0
            if "logits" in cache:
                torch.testing.assert_close(cache["logits"][r, slots[:k]], logits[want], atol=atol, rtol=1e-4,
                                           msg=f"logits row {r} spec {spec!r}")


def pad(rows: list[list[int]], side: str, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` ``[batch, seq]`` of ``rows`` padded on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), None) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}
