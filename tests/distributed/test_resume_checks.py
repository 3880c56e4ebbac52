"""A resume must do the same work as the run it continues: same inputs in every committed part (content
fingerprints in the part records), same model loading and tokenizer kwargs; a mismatch is refused before anything
is recomputed, naming the first differing part or setting."""

from __future__ import annotations

import os

import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.distributed.partitions import (PartitionSpec, fingerprint_batches, fingerprint_texts,
                                                     plan_dataset)
from easyroutine_dist.distributed.resume import check_committed_parts, first_difference
from easyroutine_dist.errors import ConfigError, DistributedError
from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver

POSITIONS = ["last"]
CONFIG = ExtractionConfig(extract_resid_out=True)


# ---------------------------------------------------------------------------------------------- no Ray
def test_fingerprints_identify_content():
    assert fingerprint_texts(["ab", "c"]) == fingerprint_texts(["ab", "c"])
    assert len({fingerprint_texts(t) for t in (["ab", "c"], ["a", "bc"], ["abc"], ["ab", "c "], ["c", "ab"])}) == 5
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    fp = fingerprint_batches([{"input_ids": ids, "attention_mask": mask}])
    assert fp == fingerprint_batches([{"input_ids": ids.int(), "attention_mask": mask.float()}])  # same numbers
    changed = ids.clone()
    changed[1, 2] = 10
    assert fp != fingerprint_batches([{"input_ids": changed, "attention_mask": mask}])
    assert fp != fingerprint_batches([{"input_ids": ids[:1], "attention_mask": mask[:1]},  # other batch boundaries
                                      {"input_ids": ids[1:], "attention_mask": mask[1:]}])
    assert fp != fingerprint_batches([{"input_ids": ids}])


def test_every_partition_carries_its_fingerprint():
    texts = [f"p{i}" for i in range(7)]
    for data in (texts, iter(texts)):
        assert [p.fingerprint for p in plan_dataset(data, 3).partitions()] == [
            fingerprint_texts(texts[0:3]), fingerprint_texts(texts[3:6]), fingerprint_texts(texts[6:7])]


def _parts(texts, size=2):
    return (PartitionSpec(i, a, min(a + size, len(texts)), texts=texts[a:a + size],
                          fingerprint=fingerprint_texts(texts[a:a + size]))
            for i, a in enumerate(range(0, len(texts), size)))


def test_committed_parts_are_checked_before_anything_is_yielded():
    texts = [f"t{i}" for i in range(10)]
    stored = {0: fingerprint_texts(texts[0:2]), 3: fingerprint_texts(texts[6:8])}
    out = list(check_committed_parts("r", _parts(texts), stored))
    assert [p.part_id for p in out] == [0, 1, 2, 3, 4]
    assert out[1].texts == texts[2:4] and out[0].texts is None  # committed parts travel without their inputs
    changed = texts[:7] + ["other"] + texts[8:]
    pulled = []

    def watched():
        for p in _parts(changed):
            pulled.append(p.part_id)
            yield p

    with pytest.raises(ConfigError, match=r"part 3 \(rows 6\.\.7\)"):
        check_committed_parts("r", watched(), stored)  # eager: raises before the caller gets any part
    assert pulled == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="part 3 is committed but this dataset ends"):
        check_committed_parts("r", _parts(texts[:5]), stored)
    with pytest.raises(ConfigError, match="part 0 has no content fingerprint"):
        check_committed_parts("r", _parts(texts), {0: None})


def test_first_difference_names_the_setting():
    have = {"distributed": {"model_loading": {"kwargs": {"dtype": "float32"}}, "batch_size": 4}}
    want = {"distributed": {"model_loading": {"kwargs": {"dtype": "bfloat16"}}, "batch_size": 4}}
    assert first_difference(want, have) == ("distributed.model_loading.kwargs.dtype", "bfloat16", "float32")
    assert first_difference(have, have) is None
    assert first_difference({"a": {"b": 1}}, {"a": {}}) == ("a.b", 1, None)


# ---------------------------------------------------------------------------------------------- with Ray
def _interrupted(extractor, data, saver, **kw):
    """An interrupted run (the driver 'dies' after 2 partitions): its id and committed part ids."""
    from easyroutine_dist.distributed import new_run_id

    run_id = new_run_id()
    with pytest.raises(DistributedError, match="resume=True"):
        extractor.extract(data, POSITIONS, CONFIG, saver, batch_size=2, partition_size=3, run_id=run_id,
                          _stop_after_parts=2, **kw)
    run_dir = saver.writer.open_run(saver.experiment_name, extractor.workers_info()[0]["model_name"], run_id).url
    committed = sorted(int(n[5:10]) for n in os.listdir(os.path.join(run_dir, "records")) if n.endswith(".json"))
    assert committed and len(committed) < 8
    return run_id, run_dir, committed


def _files(run_dir):
    return {(sub, name, os.stat(os.path.join(run_dir, sub, name)).st_mtime_ns)
            for sub in ("shards", "records") if os.path.isdir(os.path.join(run_dir, sub))
            for name in os.listdir(os.path.join(run_dir, sub))}


def _row_oracle(hooked, text):
    """resid_out_0 at the last token of ``text`` run alone through the HF model (no padding, no library code)."""
    ids = torch.tensor([[hooked.hf_tokenizer.convert_tokens_to_ids(c) for c in text]])
    with torch.no_grad():
        return hooked.hf_model(input_ids=ids, output_hidden_states=True).hidden_states[1][0, -1]


@pytest.mark.slow
def test_resume_refuses_other_prompts_and_settings_then_resumes_the_same(extractor, hooked_ref, texts, tmp_path):
    saver = ActivationSaver(tmp_path, experiment_name="fp")
    run_id, run_dir, committed = _interrupted(extractor, texts, saver)
    before = _files(run_dir)
    c = committed[-1]
    changed = list(texts)
    changed[c * 3 + 1] = changed[c * 3 + 1] + "x"  # one prompt of a committed partition
    with pytest.raises(ConfigError, match=rf"part {c} \(rows {c * 3}\.\.{c * 3 + 2}\)"):
        extractor.extract(changed, POSITIONS, CONFIG, saver, batch_size=2, partition_size=3, run_id=run_id,
                          resume=True)
    with pytest.raises(ConfigError, match=r"distributed\.tokenizer_kwargs\.add_special_tokens"):
        extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=2, partition_size=3, run_id=run_id,
                          resume=True, tokenizer_kwargs={"add_special_tokens": False})
    assert _files(run_dir) == before  # nothing was recomputed nor written by the refused attempts
    res = extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=2, partition_size=3, run_id=run_id,
                            resume=True)
    assert res.resumed and res.skipped == len(committed) and res.recomputed == 8 - len(committed)
    cache, _ = ActivationLoader(tmp_path, "fp").query().load(run_id)
    assert cache["resid_out_0"].shape[:2] == (len(texts), 1)
    for i, text in enumerate(texts):
        assert torch.allclose(cache["resid_out_0"][i, 0], _row_oracle(hooked_ref, text), atol=1e-5), i
    with pytest.raises(ConfigError, match=rf"part {c} "):  # a committed run is not handed out for other data
        extractor.extract(changed, POSITIONS, CONFIG, saver, batch_size=2, partition_size=3, run_id=run_id,
                          resume=True)


@pytest.mark.slow
def test_resume_refuses_an_iterable_of_other_content(extractor, texts, tmp_path):
    saver = ActivationSaver(tmp_path, experiment_name="fp-iter")
    run_id, run_dir, committed = _interrupted(extractor, iter(texts), saver)
    before = _files(run_dir)
    other = list(texts)
    other[committed[0] * 3] = "zz" + other[committed[0] * 3]
    with pytest.raises(ConfigError, match=rf"part {committed[0]} "):
        extractor.extract(iter(other), POSITIONS, CONFIG, saver, batch_size=2, partition_size=3, run_id=run_id,
                          resume=True)
    with pytest.raises(ConfigError, match=rf"part {committed[-1]} is committed but this dataset ends"):
        extractor.extract(iter(texts[:committed[-1] * 3]), POSITIONS, CONFIG, saver, batch_size=2, partition_size=3,
                          run_id=run_id, resume=True)
    assert _files(run_dir) == before
    res = extractor.extract(iter(texts), POSITIONS, CONFIG, saver, batch_size=2, partition_size=3, run_id=run_id,
                            resume=True)
    assert res.n_rows == len(texts) and res.skipped == len(committed)


@pytest.mark.slow
def test_resume_refuses_other_model_loading_kwargs(ray_cluster, extractor, model_dir, texts, tmp_path):
    from easyroutine_dist.distributed import DistributedExtractor

    saver = ActivationSaver(tmp_path, experiment_name="fp-dtype")
    run_id, run_dir, _ = _interrupted(extractor, texts, saver)  # loaded with no kwargs (the checkpoint's dtype)
    before = _files(run_dir)
    with DistributedExtractor(model_dir, num_workers=1, model_kwargs={"dtype": "bfloat16"}) as other:
        with pytest.raises(ConfigError, match=r"distributed\.model_loading\.kwargs\.dtype .*'bfloat16'"):
            other.extract(texts, POSITIONS, CONFIG, saver, batch_size=2, partition_size=3, run_id=run_id,
                          resume=True)
    assert _files(run_dir) == before
