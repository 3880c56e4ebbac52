"""HookedModel as easyroutine builds and calls it (issue 14 item 2), checked against plain HF."""

from __future__ import annotations

import pytest
import torch

from easyroutine_dist.interpretability.hooked_model import ExtractionConfig, HookedModel, HookedModelConfig

from ..distributed.tiny import save_tiny_model
from ..models import eager, random_batch, tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(folder) -> HookedModel:
    return HookedModel(HookedModelConfig(model_name=folder, device_map="auto", torch_dtype=torch.float32,
                                         attn_implementation="custom_eager", batch_size=2))


def test_built_from_a_config_like_easyroutine(model):
    assert model.hf_model.config._attn_implementation == "eager"  # custom_eager gives eager numbers
    assert model.batch_size == 2 and model.hf_model.dtype == torch.float32
    assert model.device() == torch.device("cpu") and model.device.type == "cpu"
    assert torch.ones(1).to(model.device).device.type == "cpu"  # still usable where torch wants a device
    assert model.model_config.num_key_value_groups == 2  # 4 query heads over 2 kv heads
    assert model.is_multimodal() is False
    model.use_language_model_only(), model.set_custom_modules(), model.restore_original_modules()
    ids = model.hf_tokenizer(["abc d"], return_tensors="pt")["input_ids"]
    assert model.to_string_tokens(ids) == ["a", "b", "c", " ", "d"]
    batch = random_batch(2, 6, seed=1, padding_side="left", lengths=[6, 4])
    cache = model.forward(batch, ["last"], extraction_config=ExtractionConfig(extract_resid_out=True))
    with torch.no_grad():
        hs = tiny_model("llama")(**batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cache["resid_out_0"][:, 0], hs[1][:, -1], atol=1e-5, rtol=1e-4)


def test_input_embedding_gradients_equal_autograd_through_hf(model):
    hf = tiny_model("llama")
    rows = [[5, 9, 11, 4, 7], [6, 3, 8, 12, 2]]
    batches = [{"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
                "vocabulary_index": v} for r, v in zip(rows, (17, 23))]
    cache = model.extract_cache(batches, ["last", 1], extraction_config=ExtractionConfig(
        extract_embed=True, keep_gradient=True, save_logits=False), dict_token_index=torch.tensor([0, 1]))
    assert cache["input_embeddings_gradients"].shape == cache["input_embeddings"].shape
    for r, (ids, v) in enumerate(zip(rows, (17, 23))):
        emb = hf.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
        hf(inputs_embeds=emb).logits[0, -1, v].backward()
        want = emb.grad[0, [4, 1]]
        torch.testing.assert_close(cache["input_embeddings_gradients"][r], want, atol=1e-5, rtol=1e-4)
        assert want.abs().sum() > 0
    with pytest.raises(ValueError, match="keep_gradient"):
        model.forward(batches[0], ["last"], vocabulary_index=3)


def test_avg_over_example_patterns_use_easyroutine_names(model):
    batch = random_batch(2, 5, seed=2, padding_side="left", lengths=[5, 5])
    cfg = ExtractionConfig(extract_attn_pattern=True, attn_heads=[{"layer": 1, "head": 3}], avg_over_example=True)
    cache = model.extract_cache([{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}],
                                ["all"], extraction_config=cfg)
    with eager(tiny_model("llama")) as hf, torch.no_grad():
        weights = hf(**batch, output_attentions=True).attentions[1][:, 3]
    assert "pattern_L1H3" not in cache and cache["avg_pattern_L1H3"].shape == (1, 5, 5)
    torch.testing.assert_close(cache["avg_pattern_L1H3"][0], weights.mean(0), atol=1e-6, rtol=1e-5)


def test_partition_without_pivots_and_external_running_mean(model):
    batch = random_batch(1, 6, seed=3, padding_side="left", lengths=[6])
    cache = model.forward(batch, ["inputs-partition-0"], extraction_config=ExtractionConfig(extract_resid_out=True))
    assert cache["resid_out_0"].shape[:2] == (1, 6)
    cfg = ExtractionConfig(extract_resid_out=True, avg_over_example=True, save_logits=False)
    from easyroutine_dist.interpretability.activation_cache import ActivationCache

    external = ActivationCache()
    outs = []
    for i, b in enumerate([random_batch(2, 4, seed=s, lengths=[4, 4]) for s in (4, 5)]):
        outs.append(model.forward(b, ["last"], extraction_config=cfg)["resid_out_0"])
        model.forward(b, ["last"], extraction_config=cfg, external_cache=external, batch_idx=i)
    torch.testing.assert_close(external["resid_out_0"], (outs[0] + outs[1]) / 2)
