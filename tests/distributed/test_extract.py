"""Distributed runs load like single-process runs and equal them; dataset forms; S3; the example."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver

from ..oracle import check_rows, hf_row
from .conftest import CONFIG, POSITIONS, reference

pytestmark = pytest.mark.slow


def _check_equal(cache, ref, keys=("resid_out_0", "resid_out_2", "logits")):
    for k in keys:
        assert cache[k].shape == ref[k].shape, k
        assert torch.allclose(cache[k], ref[k], atol=1e-5, rtol=1e-4), k
    assert cache["token_dict"] == ref["token_dict"]


def test_run_equals_single_process_and_iterates_by_part(extractor, hooked_ref, texts, tmp_path):
    saver = ActivationSaver(tmp_path, experiment_name="dist")
    res = extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=5, tag="t1",
                            other_metadata={"who": "test"})
    assert (res.n_rows, res.n_partitions, res.recomputed, res.skipped) == (23, 5, 5, 0)
    q = ActivationLoader(tmp_path, experiment_name="dist").query(tag="t1", custom_keys={"who": "test"})
    assert len(q) == 1 and q[0]["run_id"] == res.run_id
    cache, meta = q.load()
    _check_equal(cache, reference(hooked_ref, texts))
    assert meta["model_name"] == hooked_ref.model_name and meta["distributed"]["dataset"]["n_rows"] == 23
    parts = list(q.iter_parts())
    assert [p["resid_out_1"].shape[0] for p in parts] == [5, 5, 5, 5, 3]
    # the same query by extraction config and positions as for single-process runs
    assert len(ActivationLoader(tmp_path, "dist").query(extraction_config=CONFIG,
                                                         target_token_positions=POSITIONS)) == 1


def test_hf_dataset_text_iterable_and_token_batches(extractor, hooked_ref, texts, tmp_path):
    datasets = pytest.importorskip("datasets")
    from easyroutine_dist.distributed import tokenize_batches

    ref = reference(hooked_ref, texts)
    saver = ActivationSaver(tmp_path, experiment_name="forms")
    batches = tokenize_batches(hooked_ref.hf_tokenizer, texts, 4)
    for i, data in enumerate([datasets.Dataset.from_dict({"prompt": texts}), iter(texts), batches]):
        res = extractor.extract(data, POSITIONS, CONFIG, saver, batch_size=3, partition_size=8,
                                text_column="prompt", tag=f"form{i}")
        assert res.n_rows == 23
        cache, _ = ActivationLoader(tmp_path, "forms").query(tag=f"form{i}").load()
        _check_equal(cache, ref)


@pytest.mark.s3
def test_run_on_s3(extractor, hooked_ref, texts, s3_bucket_url, s3_storage_options, s3_public_options):
    # the workers take their credentials from their environment; the driver sends the endpoint only
    saver = ActivationSaver(f"{s3_bucket_url}/acts", experiment_name="s3run", storage_options=s3_public_options)
    res = extractor.extract(texts[:11], POSITIONS, CONFIG, saver, batch_size=4, partition_size=4)
    assert res.url.startswith("s3://") and res.n_partitions == 3
    loader = ActivationLoader(f"{s3_bucket_url}/acts", experiment_name="s3run", storage_options=s3_storage_options)
    cache, _ = loader.query().load()
    _check_equal(cache, reference(hooked_ref, texts[:11]))
    # credentials never reach storage
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options)
    for path in fs.find(s3_bucket_url.replace("s3://", "")):
        if path.endswith(".json") or path.endswith("_SUCCESS"):
            assert s3_storage_options["secret"].encode() not in fs.cat_file(path)


def _example_rows(mod, folder: Path, n: int):
    """The example's tiny model (rebuilt by its own seeded save_tiny_model) as a plain HF model, and its ``n``
    prompts (the example's seeded recipe) tokenised alone: (model, token id lists)."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    mod.save_tiny_model(str(folder))
    tok = AutoTokenizer.from_pretrained(folder)
    rng = random.Random(0)
    prompts = ["".join(rng.choice(mod.CHARS[:27]) for _ in range(rng.randint(5, 30))) for _ in range(n)]
    return AutoModelForCausalLM.from_pretrained(folder).eval(), [tok(p)["input_ids"] for p in prompts]


def _check_example_run(cache, model, rows, lens_k=None) -> None:
    """Every row's "last" slot equals the prompt alone through plain HF: resid_out_0/1 (if loaded), the final-normed
    resid_out_2, and the top-``lens_k`` ids of the logit lens (final norm + lm_head; the logits at the last layer)."""
    check_rows(cache, rows, ["last"], model, layers=[i for i in (0, 1) if f"resid_out_{i}" in cache.keys()])
    slot = cache["mapping_index"]["last"][0]
    for r, ids in enumerate(rows):
        hidden, logits = hf_row(model, ids)
        with torch.no_grad():
            torch.testing.assert_close(model.model.norm(cache["resid_out_2"][r, slot]), hidden[3][-1],
                                       atol=1e-5, rtol=1e-4)
            for i in range(3 if lens_k else 0):
                lens = logits[-1] if i == 2 else model.lm_head(model.model.norm(hidden[i + 1][-1]))
                want = lens.softmax(-1).topk(lens_k).indices.tolist()
                assert cache[f"logit_lens_resid_out_{i}_topk_ids"][r, slot].tolist() == want, (i, r)


def test_example_main(ray_cluster, tmp_path):
    path = Path(__file__).resolve().parents[2] / "examples" / "distributed_extraction.py"
    spec = importlib.util.spec_from_file_location("distributed_extraction_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--base-dir", str(tmp_path / "acts"), "--num-prompts", "12", "--num-workers", "1",
                    "--partition-size", "4"])
    assert out["n_rows"] == 12 and out["n_partitions"] == 3
    assert os.path.exists(out["url"])
    # what it saved is the example's model run on each prompt alone, and its lens is that model's lens
    model, rows = _example_rows(mod, tmp_path / "model", 12)
    loader = ActivationLoader(tmp_path / "acts", experiment_name="distributed-example")
    cache, _ = loader.query(tag="example").load(out["run_id"])
    _check_example_run(cache, model, rows, lens_k=5)
    post, _ = loader.query(tag="example-lens").load(out["lens_run_id"])  # post-hoc, top 3: the same ranking
    for key in (f"logit_lens_resid_out_{i}_topk_ids" for i in range(3)):
        assert torch.equal(post[key], cache[key][..., :3]), key


@pytest.mark.parametrize("form", ["module:function", "callable"])
def test_model_factory_in_workers(ray_cluster, hooked_ref, texts, tmp_path, form):
    from easyroutine_dist.distributed import DistributedExtractor

    from .tiny import tiny_hooked

    source = "tests.distributed.tiny:tiny_hooked" if form == "module:function" else tiny_hooked
    saver = ActivationSaver(tmp_path, experiment_name="factory")
    with DistributedExtractor(source, num_workers=1) as ex:
        res = ex.extract(texts[:7], POSITIONS, CONFIG, saver, batch_size=4, partition_size=4)
    assert res.model_name == "tiny-llama-factory" and res.n_partitions == 2
    cache, meta = ActivationLoader(tmp_path, "factory").query(model_name="tiny-llama-factory").load()
    _check_equal(cache, reference(hooked_ref, texts[:7]))


@pytest.mark.s3
def test_example_main_on_s3(ray_cluster, s3_endpoint, s3_bucket_url, monkeypatch, tmp_path):
    """The example as a user runs it against S3: endpoint and credentials from the AWS_* environment."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    path = Path(__file__).resolve().parents[2] / "examples" / "distributed_extraction.py"
    spec = importlib.util.spec_from_file_location("distributed_extraction_example_s3", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--base-dir", f"{s3_bucket_url}/acts", "--num-prompts", "8", "--num-workers", "1",
                    "--partition-size", "4"])
    assert out["url"].startswith(s3_bucket_url) and out["n_rows"] == 8 and out["n_partitions"] == 2
    loader = ActivationLoader(f"{s3_bucket_url}/acts", experiment_name="distributed-example")
    cache, _ = loader.query(tag="example").load(out["run_id"], keys=["resid_out_2"])
    assert cache["resid_out_2"].shape[0] == 8
    model, rows = _example_rows(mod, tmp_path / "model", 8)
    _check_example_run(cache, model, rows)
