"""The data path of one forward: hooks never synchronise with the device, and no [batch, seq, vocab] tensor is made
unless logits are asked for (then only at the target positions)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from easyroutine_dist.config import ExtractionConfig

from .models import hooked, random_batch, tiny_model

def _inside_a_module_call(frame) -> bool:
    """True while ``frame`` runs under an ``nn.Module.__call__`` (a forward, or a hook the forward calls)."""
    while frame is not None:
        if frame.f_code.co_filename.replace("\\", "/").endswith("torch/nn/modules/module.py"):
            return True
        frame = frame.f_back
    return False


def _spy_syncs(monkeypatch) -> list[str]:
    """Record every call that would make the host wait for a GPU (.item, bool(), .tolist, .cpu, a blocking
    .to('cpu'), .numpy) made by any function of extraction.py while the model runs (its hooks, whatever their
    names); host code before and after the forward is not recorded."""
    calls: list[str] = []

    def spy(name, orig):
        def wrapper(self, *a, **k):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.endswith("extraction.py") and _inside_a_module_call(frame):
                to_cpu = (a and str(a[0]) == "cpu") or str(k.get("device")) == "cpu"
                if name != "to" or (to_cpu and not k.get("non_blocking")):
                    calls.append(f"{name} in {frame.f_code.co_name}")
            return orig(self, *a, **k)
        return wrapper

    for name in ("item", "__bool__", "tolist", "cpu", "to", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    return calls


CFG = ExtractionConfig(extract_resid_out=True, extract_head_out=True, extract_attn_pattern=True,
                       extract_values=True, save_logits=True)


def test_hooks_never_synchronise_with_the_device(monkeypatch):
    hm = hooked("llama")
    batch = random_batch(3, 7, seed=2, padding_side="left", lengths=[7, 4, 5])
    calls = _spy_syncs(monkeypatch)
    cache = hm.forward(batch, ["all", "last"], extraction_config=CFG, move_to_cpu=True)
    monkeypatch.undo()
    assert calls == []
    assert cache["resid_out_0"].shape[:2] == (3, 8) and not cache["valid_mask"].all()


def test_the_sync_spy_sees_a_sync_in_any_hook_function(monkeypatch):
    """Positive control for the test above: a hook-path helper of extraction.py (here a stand-in for
    Gathered.take compiled under extraction.py's file name, under a name no list knows) that calls .item() is
    recorded, so an empty record means no sync, not a blind spy."""
    from easyroutine_dist import extraction

    src = "def helper_not_listed(self, t, rows=False):\n    t.sum().item()\n    return _take(self, t, rows)\n"
    ns = {"_take": extraction.Gathered.take}
    exec(compile(src, extraction.__file__, "exec"), ns)  # noqa: S102 - the stand-in's frames are extraction.py's
    monkeypatch.setattr(extraction.Gathered, "take", ns["helper_not_listed"])
    calls = _spy_syncs(monkeypatch)
    hooked("llama").forward(random_batch(3, 7, seed=2), ["last"], extraction_config=CFG)
    monkeypatch.undo()
    assert "item in helper_not_listed" in calls


def test_logits_only_at_target_positions_equal_hf():
    hm, model = hooked("gemma2"), tiny_model("gemma2")  # soft-capped logits
    batch = random_batch(3, 7, seed=3, padding_side="right", lengths=[7, 4, 5])
    cache = hm.forward(batch, ["last", (0, 2)], extraction_config=ExtractionConfig(save_logits=True))
    with torch.no_grad():
        full = model(**batch).logits
    for r, n in enumerate([7, 4, 5]):
        torch.testing.assert_close(cache["logits"][r], full[r, [n - 1, 0, 1]], atol=1e-5, rtol=1e-4)


def test_peak_memory_stays_far_below_the_full_logits():
    """A 131k-vocabulary model at batch 4 x 1024: the full logits would be 2 GiB (float32); a forward that saves
    resid_out (no logits) and one that saves the logits of "last" both stay under a tenth of that."""
    code = textwrap.dedent('''
        import resource, torch
        from transformers import LlamaConfig, AutoModelForCausalLM
        from easyroutine_dist.config import ExtractionConfig
        from easyroutine_dist.hooked_model import HookedModel
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=131072, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
        hm = HookedModel(AutoModelForCausalLM.from_config(cfg).eval(), None, model_name="big-vocab")
        ids = torch.randint(0, 131072, (4, 1024))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for save in (False, True):
            c = hm.forward({"input_ids": ids}, ["last"],
                           extraction_config=ExtractionConfig(extract_resid_out=True, save_logits=save))
        assert c["logits"].shape == (4, 1, 131072)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    grown = int(out.stdout.strip().splitlines()[-1])
    full_logits = 4 * 1024 * 131072 * 4
    assert grown < full_logits / 10, f"peak RSS grew by {grown / 2**20:.0f} MiB during the forwards"
