"""The remote logit lens, inline and post-hoc, equals LogitLens on a single-process cache."""

from __future__ import annotations

import pytest
import torch

from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver

from .conftest import CONFIG, POSITIONS, reference

pytestmark = pytest.mark.slow


def _lens_ref(hooked, cache, directions):
    from easyroutine_dist.lens import LogitLens

    lens = LogitLens.from_model(hooked)
    top = lens.topk(cache, "resid_out_{i}", k=3)
    diff = lens.compute(cache, "resid_out_{i}", token_directions=directions, metric="logit_diff")
    acc = lens.compute(cache, "resid_out_{i}", token_directions=directions, metric="accuracy")
    return top, diff, acc


def test_inline_and_post_hoc_lens(extractor, hooked_ref, texts, tmp_path):
    directions = [(4 + i % 5, 10 + i % 3) for i in range(len(texts))]
    lens_cfg = {"target_key": "resid_out_{i}", "top_k": 3, "token_directions": directions, "metric": "accuracy"}
    saver = ActivationSaver(tmp_path, experiment_name="lens")
    plain = extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=6, tag="plain")
    inline = extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=6, tag="inline",
                               logit_lens=lens_cfg)
    ref = reference(hooked_ref, texts)
    top, diff, acc = _lens_ref(hooked_ref, ref, directions)
    loader = ActivationLoader(tmp_path, "lens")
    cache, meta = loader.query(tag="inline").load()
    assert meta["logit_lens"]["token_directions"]["count"] == len(texts)
    for key in ("resid_out_0", "resid_out_1", "resid_out_2"):
        ids, probs = cache[f"logit_lens_{key}_topk_ids"], cache[f"logit_lens_{key}_topk_probs"]
        assert ids.shape == (len(texts), 2, 3)
        assert torch.equal(ids, top[f"logit_lens_{key}_topk_ids"])
        assert torch.allclose(probs, top[f"logit_lens_{key}_topk_probs"], atol=1e-5)
        assert torch.allclose(cache[f"logit_lens_{key}_logit_diff"], diff[f"logit_lens_{key}"], atol=1e-4)
        assert torch.isclose(cache[f"logit_lens_{key}_correct"].mean(), acc[f"logit_lens_{key}"], atol=1e-6)

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
