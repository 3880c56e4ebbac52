"""One local Ray cluster per pytest session, a tiny saved model, and a 2-worker extractor reused across tests."""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray")

from easyroutine_dist.config import ExtractionConfig  # noqa: E402
from easyroutine_dist.distributed import tokenize_batches  # noqa: E402

from .tiny import prompts, save_tiny_model  # noqa: E402
from tests.s3_fixtures import NODE_AWS_ENV  # noqa: E402

POSITIONS = ["last", -2]
CONFIG = ExtractionConfig(extract_resid_out=True, save_logits=True)


@pytest.fixture(scope="session")
def ray_cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        # the nodes' own S3 credentials (the local endpoint's test keys) come from the environment Ray's processes
        # inherit, as on a real cluster; they are never in the runtime_env nor in any call's storage_options
        saved = {k: os.environ.get(k) for k in NODE_AWS_ENV}
        os.environ.update(NODE_AWS_ENV)
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": repo, "HF_HUB_OFFLINE": "1",
                                               "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}})
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def extractor(ray_cluster, model_dir):
    from easyroutine_dist.distributed import DistributedExtractor

    ex = DistributedExtractor(model_dir, num_workers=2, num_cpus_per_worker=1)
    yield ex
    ex.shutdown()


@pytest.fixture(scope="session")
def hooked_ref(model_dir):
    """The same model, in the driver, for single-process references."""
    from easyroutine_dist.hooked_model import HookedModel

    return HookedModel.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return prompts(23)


def reference(hooked, texts, batch_size=4, positions=POSITIONS, config=CONFIG):
    """The oracle of a distributed run, computed without our extraction code: each prompt run alone through the
    plain HF model (its own tokenizer, no padding), ``resid_out_{i}`` read by a plain torch forward hook on decoder
    layer i, ``logits`` from HF's output, at the positions the fixed-width specs name (Python indexing over the
    prompt's tokens). Returns ``{key: [rows, P, ...]}`` plus ``token_dict``. ``batch_size`` is ignored: the oracle
    has no batches."""
    import torch

    from ..oracle import spec_name, spec_positions

    model, tok = hooked.hf_model, hooked.hf_tokenizer
    layers = model.model.layers
    grabbed: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: grabbed.__setitem__(
        i, (out[0] if isinstance(out, tuple) else out).detach())) for i, layer in enumerate(layers)]
    out: dict = {f"resid_out_{i}": [] for i in range(len(layers))}
    if config.save_logits:
        out["logits"] = []
    token_dict: dict = {spec_name(s): [] for s in positions}
    try:
        for text in texts:
            ids = tok(text)["input_ids"]
            pos = []
            for s in positions:
                p = spec_positions(s, len(ids))
                assert p is not None and len(p) == 1, f"the distributed oracle takes fixed-width specs, got {s!r}"
                token_dict[spec_name(s)].append(p)
                pos += p
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            for i in range(len(layers)):
                out[f"resid_out_{i}"].append(grabbed[i][0, pos])
            if config.save_logits:
                out["logits"].append(logits[pos])
    finally:
        for h in handles:
            h.remove()
    ref = {k: torch.stack(v) for k, v in out.items()}
    ref["token_dict"] = token_dict
    return ref
