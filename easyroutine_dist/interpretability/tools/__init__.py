"""Interpretability tools: LogitLens (see easyroutine_dist/lens.py), a top-k table and a heatmap of the lens."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ...errors import ConfigError
from ...lens import LogitLens, final_norm, match_keys

__all__ = ["LogitLens", "final_norm", "lens_table", "lens_topk_grid", "match_keys", "plot_lens_heatmap",
           "stored_topk_grid", "visible_token"]

Grid = tuple[list[str], torch.Tensor, torch.Tensor]


def _layer_of(key: str) -> int:
    nums = re.findall(r"\d+", key)
    return int(nums[0]) if nums else -1


_ESCAPES = {" ": "\u2423", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def visible_token(token: str, limit: int = 10) -> str:
    """A token as a heatmap cell shows it: spaces as ``␣``, newlines/tabs as ``\\n``/``\\t``, other invisible
    characters as ``\\uXXXX`` escapes, the empty string as ``∅``; at most ``limit`` characters (``…`` after)."""
    import unicodedata

    out = []
    for ch in token:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cn"):
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    text = "".join(out) or "\u2205"
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


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


def stored_topk_grid(cache: Any, target_key: str = "resid_out_{i}", example: int = 0,
                     positions: Optional[Sequence[int]] = None) -> Grid:
    """The same grid as ``lens_topk_grid``, read from lens results stored in a run by the distributed workers
    (``logit_lens_<key>_topk_ids`` / ``_topk_probs`` ``[rows, P, k]``): keys by layer, ids and probs
    ``[n_keys, P, k]`` of one example, optionally only the given slots of the position axis."""
    suffix = "_topk_ids"
    stored = [k[len("logit_lens_"):-len(suffix)] for k in cache.keys()
              if k.startswith("logit_lens_") and k.endswith(suffix)]
    keys = match_keys(stored, target_key)
    if not keys:
        raise ConfigError(f"no stored lens results match {target_key!r}; run the extraction with "
                          "logit_lens={'target_key': ..., 'top_k': k} (stored: "
                          f"{sorted(stored) or 'none'}).")
    ids = torch.stack([cache[f"logit_lens_{k}_topk_ids"][example] for k in keys])
    probs = torch.stack([cache[f"logit_lens_{k}_topk_probs"][example] for k in keys])
    if positions is not None:
        ids, probs = ids[:, list(positions)], probs[:, list(positions)]
    return keys, ids, probs


def lens_table(lens: Optional[LogitLens], activations: Any, target_key: str = "resid_out_{i}", k: int = 5,
               example: int = 0, tokenizer: Any = None, apply_norm: bool = True, as_rich: bool = False,
               grid: Optional[Grid] = None) -> Any:
    """Top-k lens tokens per layer and position of one example.

    Returns a list of dicts ``{"key", "layer", "position", "ids", "tokens", "probs"}`` (one per key and slot of
    the position axis, in layer order), or a ``rich.table.Table`` if ``as_rich``. ``tokenizer`` defaults to the
    lens's (set by ``LogitLens.from_model``); without one, token ids are shown. ``grid`` (e.g. from
    ``stored_topk_grid``) replaces the computation, and then ``lens`` may be None.
    """
    if tokenizer is None and lens is not None:
        tokenizer = lens.tokenizer
    keys, ids, probs = grid if grid is not None else lens_topk_grid(lens, activations, target_key, k, example,
                                                                    apply_norm)
    rows = []
    for key, kid, kprob in zip(keys, ids, probs):
        for pos in range(kid.shape[0]):
            rows.append({"key": key, "layer": _layer_of(key), "position": pos,
                         "ids": [int(i) for i in kid[pos]], "tokens": _decode(tokenizer, kid[pos].tolist()),
                         "probs": [float(p) for p in kprob[pos]]})
    if not as_rich:
        return rows
    from rich.table import Table

    name = lens.model_name if lens is not None else "stored"
    table = Table(title=f"logit lens of {target_key} ({name}), example {example}")
    for col in ("key", "pos", *[f"top{j + 1}" for j in range(ids.shape[-1])]):
        table.add_column(col)
    for r in rows:
        table.add_row(r["key"], str(r["position"]),
                      *[f"{t!r} {p:.3f}" for t, p in zip(r["tokens"], r["probs"])])
    return table


def plot_lens_heatmap(lens: Optional[LogitLens], activations: Any, path: str | Path,
                      target_key: str = "resid_out_{i}", example: int = 0, tokenizer: Any = None,
                      position_labels: Optional[Sequence[str]] = None, title: Optional[str] = None,
                      apply_norm: bool = True, grid: Optional[Grid] = None) -> str:
    """Write a PNG heatmap (rows: keys/layers, columns: positions; colour: top-1 probability, text: top-1 token)
    of one example to ``path`` (parent folders created) and return ``path``. Uses the Agg canvas only.
    ``grid`` (e.g. from ``stored_topk_grid``) replaces the computation, and then ``lens`` may be None."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if tokenizer is None and lens is not None:
        tokenizer = lens.tokenizer
    keys, ids, probs = grid if grid is not None else lens_topk_grid(lens, activations, target_key, 1, example,
                                                                    apply_norm)
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
            tok = visible_token(_decode(tokenizer, [int(ids[i, j, 0])])[0])
            ax.text(j, i, tok, ha="center", va="center", fontsize=7,
                    color="black" if top_p[i, j] > 0.6 else "white")
    ax.set_yticks(range(n_keys), keys, fontsize=7)
    labels = [visible_token(str(x), 16) for x in position_labels] if position_labels is not None else range(n_pos)
    ax.set_xticks(range(n_pos), labels,
                  fontsize=7, rotation=45)
    ax.set_xlabel("position")
    ax.set_ylabel("activation")
    name = lens.model_name if lens is not None else "stored run"
    ax.set_title(title or f"logit lens top-1 token and probability ({name})", fontsize=9)
    fig.colorbar(im, ax=ax, label="top-1 probability")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110)
    return str(path)
