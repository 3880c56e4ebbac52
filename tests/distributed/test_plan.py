"""``DistributedExtractor.plan``: a dry run that starts no worker and writes nothing, whose rows, partitions,
shards, keys and shapes are those of the real run, and whose bytes are within 5% of what the real run writes."""

from __future__ import annotations

import os

import pytest

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.interpretability.activation_saver import ActivationLoader, ActivationSaver

pytestmark = pytest.mark.slow

CASES = {
    "all+last": (["all", "last"], ExtractionConfig(extract_resid_out=True, save_input_ids=True), None, 8),
    "lens": (["all"], ExtractionConfig(extract_resid_out=True, save_logits=False),
             {"target_key": "resid_out_{i}", "top_k": 3, "keep_activations": False}, 6),
}


def _files(folder: str) -> dict[str, int]:
    """Every file of a folder (relative path -> bytes), counted by walking it."""
    out = {}
    for d, _, names in os.walk(folder):
        for n in names:
            out[os.path.relpath(os.path.join(d, n), folder)] = os.path.getsize(os.path.join(d, n))
    return out


def _header_len(path: str) -> int:
    """The JSON header length of a safetensors file (its first 8 bytes, little-endian)."""
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_matches_the_run(extractor, texts, tmp_path, case):
    positions, config, lens, partition_size = CASES[case]
    saver = ActivationSaver(tmp_path / "runs", "plan")
    workers = list(extractor.workers)
    plan = extractor.plan(texts, positions, config, saver, batch_size=4, partition_size=partition_size,
                          logit_lens=lens)
    assert extractor.workers == workers  # no worker was started (nor stopped)
    assert not (tmp_path / "runs").exists()  # nothing was written

    run = extractor.extract(texts, positions, config, saver, batch_size=4, partition_size=partition_size,
                            logit_lens=lens)
    files = _files(run.url)
    shards = [f for f in files if f.startswith("shards" + os.sep)]
    written = sum(files.values())
    assert plan.rows == run.n_rows == len(texts) and plan.partitions == run.n_partitions
    assert plan.shards == len(shards)
    assert abs(plan.bytes - written) <= 0.05 * written, (plan.bytes, written)
    data = sum(files[s] - 8 - _header_len(os.path.join(run.url, s)) for s in shards)  # shard bytes less headers
    assert abs(plan.tensor_bytes - data) <= 0.05 * data, (plan.tensor_bytes, data)
    assert plan.requests >= len(shards) + run.n_partitions + 2
    assert plan.estimated_seconds > 0 and plan.peak_host_bytes > 0 and plan.assumptions

    cache, _ = ActivationLoader.from_saver(saver).query().load(run.run_id)
    stored = [k for k in cache.tensor_keys()]
    assert sorted(plan.keys) == sorted(stored)
    for key in stored:  # per row: the loaded run's shape (position axes as wide as its widest part)
        assert plan.keys[key]["shape_per_row"] == list(cache[key].shape[1:]), key
        assert plan.keys[key]["dtype"] == str(cache[key].dtype).replace("torch.", ""), key


def test_plan_names_the_row_a_position_does_not_fit(extractor, texts, tmp_path):
    from easyroutine_dist.errors import PositionError

    saver = ActivationSaver(tmp_path / "runs", "plan")
    short = min(range(len(texts)), key=lambda i: len(texts[i]))
    with pytest.raises(PositionError, match=f"dataset row {short} "):
        extractor.plan(texts, [len(texts[short])], ExtractionConfig(extract_resid_out=True), saver,
                       batch_size=4, partition_size=8)
    assert not (tmp_path / "runs").exists()
