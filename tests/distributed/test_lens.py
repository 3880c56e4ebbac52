"""The remote logit lens, inline and post-hoc, equals LogitLens on a single-process cache."""

from __future__ import annotations

import pytest
import torch

from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver

from ..models import tiny_model
from ..oracle import hf_row
from .conftest import CONFIG, POSITIONS

pytestmark = pytest.mark.slow


def _hand_lens(texts, tokenizer) -> list[list[torch.Tensor]]:
    """Per row, per layer i: the lens logits ``[2, vocab]`` at POSITIONS ("last", -2) of the row alone through plain
    HF: final norm + lm_head on hidden_states[i + 1]; the model's own logits for the last layer."""
    model = tiny_model("llama")
    out = []
    for text in texts:
        hidden, logits = hf_row(model, tokenizer(text)["input_ids"])
        at = [len(logits) - 1, len(logits) - 2]
        with torch.no_grad():
            out.append([model.lm_head(model.model.norm(hidden[i + 1][at])) for i in range(2)] + [logits[at]])
    return out


def test_inline_and_post_hoc_lens(extractor, hooked_ref, texts, tmp_path):
    directions = [(4 + i % 5, 10 + i % 3) for i in range(len(texts))]
    lens_cfg = {"target_key": "resid_out_{i}", "top_k": 3, "token_directions": directions, "metric": "accuracy"}
    saver = ActivationSaver(tmp_path, experiment_name="lens")
    plain = extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=6, tag="plain")
    inline = extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=6, tag="inline",
                               logit_lens=lens_cfg)
    hand = _hand_lens(texts, hooked_ref.hf_tokenizer)
    loader = ActivationLoader(tmp_path, "lens")
    cache, meta = loader.query(tag="inline").load()
    assert meta["logit_lens"]["token_directions"]["count"] == len(texts)
    slots = [cache["mapping_index"][k][0] for k in ("last", "-2")]
    for i in range(3):
        key = f"resid_out_{i}"
        ids, probs = cache[f"logit_lens_{key}_topk_ids"], cache[f"logit_lens_{key}_topk_probs"]
        assert ids.shape == (len(texts), 2, 3)
        for r, (a, b) in enumerate(directions):
            lens = hand[r][i]  # [2, vocab] at "last", -2
            top = lens.softmax(-1).topk(3)
            assert torch.equal(ids[r, slots], top.indices), (key, r)
            torch.testing.assert_close(probs[r, slots], top.values, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(cache[f"logit_lens_{key}_logit_diff"][r, slots].float(),
                                       lens[:, a] - lens[:, b], atol=1e-4, rtol=1e-4)
            assert cache[f"logit_lens_{key}_correct"][r, slots].tolist() == (lens[:, a] > lens[:, b]).tolist()

    # post-hoc over the stored plain run: a new run, linked to its source, with the same lens outputs
    source = loader.query(tag="plain")
    post = extractor.logit_lens(source, saver, logit_lens=dict(lens_cfg, keep_activations=False), tag="post")
    assert post.n_rows == len(texts) and post.n_partitions == inline.n_partitions
    pcache, pmeta = loader.query(tag="post").load()
    assert pmeta["source_run"]["run_id"] == plain.run_id
    assert "resid_out_0" not in pcache.keys()
    for k in [k for k in cache.keys() if k.startswith("logit_lens_")]:
        assert torch.allclose(pcache[k].float(), cache[k].float(), atol=1e-5), k
    assert pcache["token_dict"] == cache["token_dict"]


def test_lens_config_refused_before_work(extractor, texts, tmp_path):
    from easyroutine_dist.errors import ConfigError

    saver = ActivationSaver(tmp_path, experiment_name="lensbad")
    with pytest.raises(ConfigError, match="top_k"):
        extractor.extract(texts, POSITIONS, CONFIG, saver, logit_lens={"target_key": "resid_out_{i}", "top_k": 0})
    with pytest.raises(ConfigError, match="unknown option"):
        extractor.extract(texts, POSITIONS, CONFIG, saver, logit_lens={"target_key": "x", "topk": 3})
    with pytest.raises(ConfigError, match="token_directions"):
        extractor.extract(texts, POSITIONS, CONFIG, saver,
                          logit_lens={"target_key": "resid_out_{i}", "token_directions": [1, 2]})
    assert ActivationLoader(tmp_path, "lensbad").query().results == []
