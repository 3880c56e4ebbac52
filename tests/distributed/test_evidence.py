"""Issue 12 in distributed runs: provenance (dataset fingerprint over the part fingerprints), a self-check in every
worker stored per part and, worst over workers, in the run; a broken architecture entry writes no shard."""

from __future__ import annotations

import dataclasses
import os

import pytest

from easyroutine_dist.errors import DistributedError
from easyroutine_dist.provenance import collect
from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver

from .conftest import CONFIG, POSITIONS

pytestmark = pytest.mark.slow


def broken_norm_model(**_: object):
    """Worker factory: the tiny llama with a deliberately broken entry (final norm = layer 0's input norm)."""
    from easyroutine_dist.hooked_model import HookedModel
    from tests.distributed.tiny import char_tokenizer
    from tests.models import tiny_model

    hm = HookedModel(tiny_model("llama"), char_tokenizer(), model_name="tiny-broken-norm")
    hm.spec = dataclasses.replace(hm.spec, final_norm="model.layers.0.input_layernorm")
    return hm


def _records(saver, res):
    run = saver.writer.open_run(res.experiment, res.model_name, res.run_id)
    return saver.writer.committed_parts(run)


def test_run_metadata_has_provenance_and_the_workers_self_check(extractor, hooked_ref, texts, tmp_path):
    saver = ActivationSaver(tmp_path, "ev")
    res = extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=5, tag="a")
    edited = texts[:7] + [texts[7] + "z"] + texts[8:]
    res2 = extractor.extract(edited, POSITIONS, CONFIG, saver, batch_size=4, partition_size=5, tag="b")
    res3 = extractor.extract(list(texts), POSITIONS, CONFIG, saver, batch_size=4, partition_size=5, tag="c",
                             self_check="off")
    loader = ActivationLoader(tmp_path, "ev")
    (_, m1), (_, m2), (_, m3) = (loader.query(tag=t).load() for t in "abc")
    # the workers loaded the same folder as the single-process model: same model and tokenizer fingerprints
    ref = collect(hooked_ref)
    for key in ("model_fingerprint", "model_fingerprint_kind", "tokenizer_fingerprint", "torch", "transformers"):
        assert m1["provenance"][key] == ref[key], key
    fp1, fp2, fp3 = (m["provenance"]["dataset_fingerprint"] for m in (m1, m2, m3))
    assert fp1 and fp1 == fp3 != fp2  # one prompt differs in run b
    assert [r["tag"] for r in loader.query(provenance={"dataset_fingerprint": fp1})] == ["a", "c"]
    # every part record holds its worker's check; the run holds the worst over them
    checks = [rec["self_check"] for rec in _records(saver, res).values()]
    assert len(checks) == res.n_partitions and all(c["passed"] for c in checks)
    worst = m1["self_check"]
    assert worst["passed"] is True
    for key in ("logits_max_abs_diff", "lens_max_abs_diff", "padding_max_abs_diff"):
        assert worst[key] == max(c[key] for c in checks) <= worst["tolerance"]
    assert m3["self_check"] is None and all("self_check" not in r for r in _records(saver, res3).values())
    assert res2.n_partitions == res.n_partitions


def test_broken_entry_is_caught_in_the_workers_before_any_shard(ray_cluster, texts, tmp_path):
    from easyroutine_dist.distributed import DistributedExtractor

    ex = DistributedExtractor("tests.distributed.test_evidence:broken_norm_model", num_workers=1)
    try:
        saver = ActivationSaver(tmp_path / "err", "ev")
        with pytest.raises(DistributedError, match=r"lens_max_abs_diff .* > tolerance"):
            ex.extract(texts[:8], POSITIONS, CONFIG, saver, batch_size=4, partition_size=4)
        files = [f for _, _, fs in os.walk(tmp_path / "err") for f in fs]
        assert not any(f.endswith(".safetensors") for f in files) and "_SUCCESS" not in files
        # "warn": written, and flagged in the run and in each part
        warned = ActivationSaver(tmp_path / "warn", "ev")
        res = ex.extract(texts[:8], POSITIONS, CONFIG, warned, batch_size=4, partition_size=4, self_check="warn")
        _, meta = ActivationLoader(tmp_path / "warn", "ev").query().load()
        assert meta["self_check"]["passed"] is False
        assert meta["self_check"]["lens_max_abs_diff"] > meta["self_check"]["tolerance"]
        assert [r["self_check"]["passed"] for r in _records(warned, res).values()] == [False, False]
    finally:
        ex.shutdown()


def test_resumed_run_keeps_the_checks_of_earlier_attempts(extractor, texts, tmp_path):
    from easyroutine_dist.distributed import new_run_id

    saver = ActivationSaver(tmp_path, "ev")
    run_id = new_run_id()
    with pytest.raises(DistributedError, match="stopped after"):
        extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=5, run_id=run_id,
                          _stop_after_parts=2)
    res = extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=5, run_id=run_id,
                            resume=True)
    assert res.resumed and res.skipped >= 2
    records = _records(saver, res)
    assert len(records) == 5 and all(r["self_check"]["passed"] for r in records.values())
    _, meta = ActivationLoader(tmp_path, "ev").query().load()
    assert meta["self_check"]["lens_max_abs_diff"] == max(r["self_check"]["lens_max_abs_diff"]
                                                          for r in records.values())
    assert meta["provenance"]["dataset_fingerprint"].startswith("sha256:")
