"""Partition planning and model-source checks (no Ray cluster needed)."""

from __future__ import annotations

import pytest
import torch

from easyroutine_dist.distributed.lensing import check_lens_config
from easyroutine_dist.distributed.partitions import plan_dataset
from easyroutine_dist.errors import ConfigError


def test_partitions_are_deterministic_row_ranges():
    texts = [f"p{i}" for i in range(11)]
    plan = plan_dataset(texts, 4)
    parts = list(plan.partitions())
    assert [(p.part_id, p.row_start, p.row_stop) for p in parts] == [(0, 0, 4), (1, 4, 8), (2, 8, 11)]
    assert [t for p in parts for t in p.texts] == texts
    assert [(p.part_id, p.row_start) for p in plan_dataset(iter(texts), 4).partitions()] == [(0, 0), (1, 4), (2, 8)]
    assert plan.n_partitions == 3 and plan.describe()["n_rows"] == 11


def test_token_batches_group_whole_batches_and_directions_follow_rows():
    batches = [{"input_ids": torch.ones(3, 5, dtype=torch.long), "attention_mask": torch.ones(3, 5)} for _ in range(4)]
    parts = list(plan_dataset(batches, 5).partitions(token_directions=list(range(12))))
    assert [(p.row_start, p.row_stop, len(p.batches)) for p in parts] == [(0, 6, 2), (6, 12, 2)]
    assert parts[1].token_directions == [6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("data,size,match", [([], 4, "empty"), (iter([]), 4, "empty"), (["a"], 0, "partition_size"),
                                             (["a", 3], 4, "mixes"), ("abc", 4, "list of strings"),
                                             ([["x"] * 2], 4, "mixes|list")])
def test_bad_datasets_are_refused(data, size, match):
    with pytest.raises(ConfigError, match=match):
        plan_dataset(data, size)


def test_lens_config_checks_everything_at_once():
    with pytest.raises(ConfigError) as err:
        check_lens_config({"target_key": "", "top_k": 0, "metric": "x"})
    assert "target_key" in str(err.value) and "top_k" in str(err.value) and "metric" in str(err.value)
    assert check_lens_config({"target_key": "resid_out_{i}"})["top_k"] == 5
