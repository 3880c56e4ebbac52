"""Issue 9 item 2 on the worker side (no cluster: the worker runs in this process): a partition is streamed.

* A streamed multi-batch part (batches of 3 rows, shards split further by ``max_shard_bytes``, left padding, the
  variable-width group ``"all"`` of a different width in every batch) loads equal to each row run alone through
  plain HF (``tests.oracle.check_rows``), and its statistics equal plain torch over the real slots.
* A writer-thread error fails the part: no record, this attempt's shards removed; the retried attempt commits.
* A crash mid-part (shards written, no record, nothing cleaned up) is resumed by a new attempt; the crashed
  attempt's shards are orphans, never read.
On the previous main a part was one whole-partition write: its shards had no row ranges, so these fail there.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

pytest.importorskip("ray")

from easyroutine_dist.config import ExtractionConfig  # noqa: E402
from easyroutine_dist.distributed.job import ExtractionJob, StorageSpec  # noqa: E402
from easyroutine_dist.distributed.partitions import PartitionSpec  # noqa: E402
from easyroutine_dist.errors import StorageError  # noqa: E402
from easyroutine_dist.storage.runs import RunWriter, load_run, run_dir  # noqa: E402

from ..oracle import check_rows  # noqa: E402
from .tiny import prompts  # noqa: E402

EXP, MODEL = "stream", "tiny"
SPECS = ["all", "last"]
CONFIG = ExtractionConfig(extract_resid_out=True, save_logits=True)


@pytest.fixture(scope="module")
def worker(model_dir):
    from easyroutine_dist.distributed.models import resolve_model_source
    from easyroutine_dist.distributed.worker import ExtractionWorker

    return ExtractionWorker(resolve_model_source(model_dir))


def _texts() -> list[str]:
    texts = prompts(17, seed=3)
    texts[4] = "a much longer prompt than the others, to widen 'all'"  # batch 1 ("all" widest there only)
    return texts


def _job(writer: RunWriter, run, tmp_path) -> ExtractionJob:
    return ExtractionJob(run=run, storage=StorageSpec(base_dir=str(tmp_path), max_shard_bytes=3000), batch_size=3,
                         target_token_positions=SPECS, extraction_config=CONFIG.to_dict(), statistics=True)


def _parts(texts: list[str]) -> list[PartitionSpec]:
    return [PartitionSpec(0, 0, 10, texts=texts[:10]), PartitionSpec(1, 10, len(texts), texts=texts[10:])]


def _load(writer: RunWriter, run):
    writer.commit_run(run, statistics=any("statistics" in r for r in writer.committed_parts(run).values()))
    entry = {"experiment_name": EXP, "model_name": MODEL, "run_id": run.run_id}
    return load_run(writer.store, entry)[0], entry


def test_streamed_part_equals_each_row_alone(worker, tmp_path):
    texts = _texts()
    writer = RunWriter(str(tmp_path))
    run = writer.begin_run(EXP, MODEL, {})
    job = _job(writer, run, tmp_path)
    for part in _parts(texts):
        res = worker.extract_part(job, part)
        assert not res["skipped"] and res["rows"] == part.rows
    rec = writer.committed_parts(run)[0]
    spans = sorted({tuple(sh["rows"]) for sh in rec["shards"] if "rows" in sh})
    assert spans == [(0, 3), (3, 6), (6, 9), (9, 10)]  # one row range per batch, written as the batches completed
    assert len([sh for sh in rec["shards"] if "rows" in sh]) > len(spans)  # batches split further by size
    cache, entry = _load(writer, run)
    tok = worker.model.hf_tokenizer
    rows = [tok(t)["input_ids"] for t in texts]
    widths = [max(len(r) for r in rows[i:i + 3]) for i in range(0, 10, 3)]
    assert len(set(widths)) > 1  # "all" really has a different width in different batches of part 0
    n_layers = worker.model.model_config.num_hidden_layers
    check_rows(cache, rows, SPECS, worker.model.hf_model, list(range(n_layers - 1)))

    from easyroutine_dist.storage.reader import RunDataset

    streamed = list(RunDataset(writer.store, entry, keys=["resid_out_0"], batch_size=64, shuffle=False))
    assert len(streamed) == 1 and torch.equal(streamed[0]["resid_out_0"], cache["resid_out_0"])  # the reader too

    from easyroutine_dist.storage.stats import run_statistics

    stats = run_statistics(writer.store, entry)
    x = cache["resid_out_0"][cache["valid_mask"]].double()  # plain torch over the real slots
    torch.testing.assert_close(stats["resid_out_0"]["mean"], x.mean(0))
    torch.testing.assert_close(stats["resid_out_0"]["var"], x.var(0, unbiased=False), rtol=1e-6, atol=1e-9)
    assert stats["resid_out_0"]["count"] == int(cache["valid_mask"].sum())


def _files(tmp_path) -> set[str]:
    return {os.path.join(d, n) for d, _, ns in os.walk(tmp_path) for n in ns if "shards" in d}


def test_writer_error_fails_the_part_cleanly_and_the_retry_commits(worker, tmp_path, monkeypatch):
    import easyroutine_dist.storage.streaming as streaming

    texts = _texts()
    writer = RunWriter(str(tmp_path))
    run = writer.begin_run(EXP, MODEL, {})
    job = _job(writer, run, tmp_path)
    real, calls = streaming.write_shard, []

    def failing(store, path, tensors, checksum):
        calls.append(path)
        if len(calls) == 3:
            raise StorageError("injected: the store refused a shard")
        return real(store, path, tensors, checksum)

    monkeypatch.setattr(streaming, "write_shard", failing)
    part = _parts(texts)[0]
    with pytest.raises(StorageError, match="injected"):
        worker.extract_part(job, part)
    assert writer.committed_part_ids(run) == []  # no record
    assert _files(tmp_path) == set()  # the failed attempt's shards were removed
    monkeypatch.setattr(streaming, "write_shard", real)
    for p in _parts(texts):  # the re-queued attempt (and the other part)
        assert not worker.extract_part(job, p)["skipped"]
    cache, _ = _load(writer, run)
    rows = [worker.model.hf_tokenizer(t)["input_ids"] for t in texts]
    check_rows(cache, rows, SPECS, worker.model.hf_model, [0])


def test_resume_after_a_crash_mid_part(worker, tmp_path, monkeypatch):
    import easyroutine_dist.distributed.pipeline as pipeline
    from easyroutine_dist.storage.streaming import PartStream
    from easyroutine_dist.storage.verify import scan_run

    texts = _texts()
    writer = RunWriter(str(tmp_path))
    run = writer.begin_run(EXP, MODEL, {})
    job = _job(writer, run, tmp_path)

    class Crash(BaseException):
        pass

    real_lens, seen = pipeline.PartLayout.conform, []

    def crash_on_third_batch(self, cache):
        seen.append(1)
        if len(seen) == 3:
            raise Crash()
        return real_lens(self, cache)

    monkeypatch.setattr(pipeline.PartLayout, "conform", crash_on_third_batch)
    monkeypatch.setattr(PartStream, "abort", lambda self: self._close())  # a killed process cleans nothing up
    with pytest.raises(Crash):
        worker.extract_part(job, _parts(texts)[0])
    monkeypatch.undo()
    left = _files(tmp_path)
    assert left and writer.committed_part_ids(run) == []  # two batches' shards written, no record
    for p in _parts(texts):  # the resumed run
        assert not worker.extract_part(job, p)["skipped"]
    assert worker.extract_part(job, _parts(texts)[0])["skipped"]  # exactly once: a committed part is not redone
    cache, entry = _load(writer, run)
    rows = [worker.model.hf_tokenizer(t)["input_ids"] for t in texts]
    check_rows(cache, rows, SPECS, worker.model.hf_model, [0])
    rec = writer.committed_parts(run)[0]
    assert not {os.path.basename(f) for f in left} & {sh["file"] for sh in rec["shards"]}
    scan = scan_run(writer.store, run_dir(writer.store, entry))  # the crashed attempt's files: listed orphans
    assert {os.path.basename(f) for f in left} <= {n.rsplit("/", 1)[-1] for n in scan.orphans}


def test_a_part_averaged_over_examples_is_written_once(worker, tmp_path):
    """``avg_over_example``: one ``[1, P, d]`` mean per part, equal to the mean over its rows run alone in HF."""
    from ..oracle import hf_row

    texts = _texts()[:7]
    writer = RunWriter(str(tmp_path))
    run = writer.begin_run(EXP, MODEL, {})
    cfg = ExtractionConfig(extract_resid_out=True, avg_over_example=True)
    job = dataclasses.replace(_job(writer, run, tmp_path), target_token_positions=["last"],
                              extraction_config=cfg.to_dict(), statistics=False)
    assert not worker.extract_part(job, PartitionSpec(0, 0, 7, texts=texts))["skipped"]
    rec = writer.committed_parts(run)[0]
    assert [sh["rows"] for sh in rec["shards"]] == [[0, 1]]
    cache, _ = _load(writer, run)
    rows = [worker.model.hf_tokenizer(t)["input_ids"] for t in texts]
    want = torch.stack([hf_row(worker.model.hf_model, ids)[0][1][-1] for ids in rows]).mean(0)
    torch.testing.assert_close(cache["resid_out_0"][0, 0], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cfg", [
    ExtractionConfig(extract_resid_out=True, extract_attn_pattern=True),
    ExtractionConfig(extract_resid_out=True, extract_attn_pattern=True, attn_pattern_row_positions=["last", "all"]),
    ExtractionConfig(extract_resid_out=True, avg=True)], ids=["patterns", "pattern-rows", "avg"])
def test_streamed_part_equals_the_single_process_cache(worker, tmp_path, cfg):
    """Both pattern axes variable-width per batch, and group means: the streamed part is the single-process
    ``extract_cache`` of the same rows (itself checked against plain HF in tests/test_extraction.py), every key,
    the slot layout and the mapping."""
    from easyroutine_dist.tokenization import tokenize_batches

    texts = _texts()[:7]
    writer = RunWriter(str(tmp_path))
    run = writer.begin_run(EXP, MODEL, {})
    job = dataclasses.replace(_job(writer, run, tmp_path), extraction_config=cfg.to_dict(), statistics=False)
    worker.extract_part(job, PartitionSpec(0, 0, 7, texts=texts))
    got, _ = _load(writer, run)
    ref = worker.model.extract_cache(tokenize_batches(worker.model.hf_tokenizer, texts, 3), SPECS,
                                     extraction_config=cfg)
    assert sorted(ref.tensor_keys()) == sorted(got.tensor_keys())
    for k in ref.tensor_keys():
        assert ref[k].shape == got[k].shape, k
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5, msg=k)
    assert got["slot_layout"] == ref["slot_layout"] and got["mapping_index"] == ref["mapping_index"]
