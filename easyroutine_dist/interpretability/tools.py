"""Interpretability tools: LogitLens (see easyroutine_dist/lens.py), a top-k table and a heatmap of the lens."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..errors import ConfigError
from ..lens import LogitLens, final_norm, match_keys

__all__ = ["LogitLens", "final_norm", "lens_table", "lens_topk_grid", "match_keys", "plot_lens_heatmap"]


def _layer_of(key: str) -> int:
    nums = re.findall(r"\d+", key)
    return int(nums[0]) if nums else -1


def _decode(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]


def lens_topk_grid(lens: LogitLens, activations: Any, target_key: str = "resid_out_{i}", k: int = 5,
                   example: int = 0, apply_norm: bool = True) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Keys (sorted by layer), top-k ids ``[n_keys, P, k]`` and probabilities ``[n_keys, P, k]`` for one example."""
    keys = match_keys(list(activations.keys()), target_key)
    ids, probs = [], []
    for key in keys:
        act = activations[key]
        if not 0 <= example < act.shape[0]:
            raise ConfigError(f"example={example} is out of range; {key!r} has {act.shape[0]} examples.")
        res = lens.topk(act[example:example + 1], key, k=k, apply_norm=apply_norm)
        ids.append(res[f"logit_lens_{key}_topk_ids"][0])
        probs.append(res[f"logit_lens_{key}_topk_probs"][0])
    return keys, torch.stack(ids), torch.stack(probs)


def lens_table(lens: LogitLens, activations: Any, target_key: str = "resid_out_{i}", k: int = 5,
               example: int = 0, tokenizer: Any = None, apply_norm: bool = True, as_rich: bool = False) -> Any:
    """Top-k lens tokens per layer and position of one example.

    Returns a list of dicts ``{"key", "layer", "position", "ids", "tokens", "probs"}`` (one per key and slot of
    the position axis, in layer order), or a ``rich.table.Table`` if ``as_rich``. ``tokenizer`` defaults to the
    lens's (set by ``LogitLens.from_model``); without one, token ids are shown.
    """
    tokenizer = tokenizer if tokenizer is not None else lens.tokenizer
    keys, ids, probs = lens_topk_grid(lens, activations, target_key, k, example, apply_norm)
    rows = []
    for key, kid, kprob in zip(keys, ids, probs):
        for pos in range(kid.shape[0]):
            rows.append({"key": key, "layer": _layer_of(key), "position": pos,
                         "ids": [int(i) for i in kid[pos]], "tokens": _decode(tokenizer, kid[pos].tolist()),
                         "probs": [float(p) for p in kprob[pos]]})
    if not as_rich:
        return rows
    from rich.table import Table

    table = Table(title=f"logit lens of {target_key} ({lens.model_name}), example {example}")
    for col in ("key", "pos", *[f"top{j + 1}" for j in range(k)]):
        table.add_column(col)
    for r in rows:
        table.add_row(r["key"], str(r["position"]),
                      *[f"{t!r} {p:.3f}" for t, p in zip(r["tokens"], r["probs"])])
    return table


def plot_lens_heatmap(lens: LogitLens, activations: Any, path: str | Path, target_key: str = "resid_out_{i}",
                      example: int = 0, tokenizer: Any = None, position_labels: Optional[Sequence[str]] = None,
                      title: Optional[str] = None, apply_norm: bool = True) -> str:
    """Write a PNG heatmap (rows: keys/layers, columns: positions; colour: top-1 probability, text: top-1 token)
    of one example to ``path`` (parent folders created) and return ``path``. Uses the Agg canvas only."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tokenizer = tokenizer if tokenizer is not None else lens.tokenizer
    keys, ids, probs = lens_topk_grid(lens, activations, target_key, 1, example, apply_norm)
    top_p = probs[..., 0].float().cpu().numpy()
    n_keys, n_pos = top_p.shape
    if position_labels is not None and len(position_labels) != n_pos:
        raise ConfigError(f"position_labels has {len(position_labels)} entries but there are {n_pos} positions.")
    fig = Figure(figsize=(max(4.0, 1.1 * n_pos + 2), max(3.0, 0.35 * n_keys + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(top_p, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, origin="lower")
    for i in range(n_keys):
        for j in range(n_pos):
            tok = _decode(tokenizer, [int(ids[i, j, 0])])[0].replace("\n", "\\n")[:10]
            ax.text(j, i, tok, ha="center", va="center", fontsize=7,
                    color="black" if top_p[i, j] > 0.6 else "white")
    ax.set_yticks(range(n_keys), keys, fontsize=7)
    ax.set_xticks(range(n_pos), list(position_labels) if position_labels is not None else range(n_pos),
                  fontsize=7, rotation=45)
    ax.set_xlabel("position")
    ax.set_ylabel("activation")
    ax.set_title(title or f"logit lens top-1 token and probability ({lens.model_name})", fontsize=9)
    fig.colorbar(im, ax=ax, label="top-1 probability")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110)
    return str(path)
