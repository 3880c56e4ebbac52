"""How a worker places its model on the GPUs Ray gives it (no GPU here: torch.cuda is stubbed)."""

import pytest
import torch

from easyroutine_dist.distributed.models import _gpu_kwargs
from easyroutine_dist.errors import DistributedError


def _fake_cuda(monkeypatch, n, free=20 * 2**30):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free, 2 * free))


def test_cpu_workers_keep_the_callers_kwargs():
    assert _gpu_kwargs({"dtype": "bfloat16"}, 0) == {"dtype": "bfloat16"}


def test_one_gpu_puts_the_whole_model_on_it(monkeypatch):
    _fake_cuda(monkeypatch, 1)
    assert _gpu_kwargs({"dtype": "bfloat16"}, 1) == {"dtype": "bfloat16", "device_map": {"": 0}}


def test_two_gpus_shard_balanced_over_exactly_those_with_headroom(monkeypatch):
    _fake_cuda(monkeypatch, 2, free=10 * 2**30)
    out = _gpu_kwargs({}, 2)
    assert out["device_map"] == "balanced"
    assert out["max_memory"] == {0: int(10 * 2**30 * 0.9), 1: int(10 * 2**30 * 0.9)}  # no CPU entry: no offload


def test_an_explicit_device_map_wins(monkeypatch):
    _fake_cuda(monkeypatch, 2)
    assert _gpu_kwargs({"device_map": "auto"}, 2) == {"device_map": "auto"}


def test_gpus_assigned_but_none_visible_is_a_clear_error(monkeypatch):
    _fake_cuda(monkeypatch, 0)
    with pytest.raises(DistributedError, match="torch sees no CUDA device"):
        _gpu_kwargs({}, 1)
