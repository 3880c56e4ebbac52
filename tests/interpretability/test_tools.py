"""The lens heatmap shows whitespace tokens visibly: a cell or a position label is never blank."""

from __future__ import annotations

import pytest
import torch

from easyroutine_dist.interpretability.tools import plot_lens_heatmap, visible_token


class CharTokenizer:
    """Token id i decodes to VOCAB[i] (whitespace, an escape character, an empty token, a word)."""

    VOCAB = [" ", "\n", "\t", "", " Paris", "\u200b", "x"]

    def decode(self, ids):
        return "".join(self.VOCAB[int(i)] for i in ids)


@pytest.mark.parametrize("token, shown", [
    (" ", "\u2423"), (" Paris", "\u2423Paris"), ("\n", "\\n"), ("\t", "\\t"), ("\r\n", "\\r\\n"), ("", "\u2205"),
    ("\u200b", "\\u200b"), ("x", "x"), ("a-very-long-token", "a-very-lo\u2026"),
])
def test_visible_token(token, shown):
    assert visible_token(token) == shown


def test_heatmap_cells_and_labels_show_whitespace(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    drawn = {}
    real_savefig = Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn["fig"] = fig
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    n = len(CharTokenizer.VOCAB)
    ids = torch.arange(n).reshape(1, n, 1)  # one key, one position per token of the vocabulary
    grid = (["resid_out_0"], ids, torch.full((1, n, 1), 0.5))
    labels = list(CharTokenizer.VOCAB)
    path = plot_lens_heatmap(None, None, tmp_path / "lens.png", tokenizer=CharTokenizer(), grid=grid,
                             position_labels=labels)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    ax = drawn["fig"].axes[0]
    cells = [t.get_text() for t in ax.texts]
    assert cells == ["\u2423", "\\n", "\\t", "\u2205", "\u2423Paris", "\\u200b", "x"]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == cells and all(t.strip() for t in ticks)
