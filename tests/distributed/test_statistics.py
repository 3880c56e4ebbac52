"""extract(..., statistics=True): statistics computed on the workers, merged at the run commit, equal to plain
torch over the loaded run's real slots; a resume cannot switch statistics on or off."""

from __future__ import annotations

import os

import pytest
import torch

from easyroutine_dist.errors import ConfigError, DistributedError
from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver
from easyroutine_dist.storage.stats import RUN_JSON

from .conftest import CONFIG

pytestmark = pytest.mark.slow
POSITIONS = ["all", "last"]  # "all" is as wide as each part's longest row: parts pad differently


def _check(stats, cache, keys=("resid_out_0", "resid_out_2", "logits")):
    vm = cache["valid_mask"]
    assert not vm.all()  # padding exists, and must not be counted
    for k in keys:
        x = cache[k][vm].double()
        assert stats[k]["count"] == x.shape[0]
        torch.testing.assert_close(stats[k]["mean"], x.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats[k]["var"], x.var(0, correction=0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats[k]["min"], x.amin(0), rtol=0, atol=0)
        torch.testing.assert_close(stats[k]["max"], x.amax(0), rtol=0, atol=0)
        assert stats[k]["norm_mean"] == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-6)


def test_statistics_on_the_workers_equal_torch_over_the_run(extractor, texts, tmp_path):
    saver = ActivationSaver(tmp_path, experiment_name="stats")
    res = extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=3, partition_size=5, statistics=True)
    assert res.n_partitions == 5
    assert os.path.exists(os.path.join(res.url, RUN_JSON))  # merged at the run commit
    q = ActivationLoader(tmp_path, "stats").query()
    cache, meta = q.load()
    assert meta["statistics"] is True
    _check(q.statistics(), cache)
    widths = [p["valid_mask"].shape[1] for p in q.iter_parts()]
    assert len(set(widths)) > 1  # the parts really had different widths of "all"


def test_a_resume_keeps_the_statistics_setting(extractor, texts, tmp_path):
    from easyroutine_dist.distributed import new_run_id

    saver = ActivationSaver(tmp_path, experiment_name="resume-stats")
    run_id = new_run_id()
    with pytest.raises(DistributedError, match="resume=True"):
        extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=5, run_id=run_id,
                          statistics=True, _stop_after_parts=2)
    with pytest.raises(ConfigError, match="statistics"):  # parts without statistics would be mixed in
        extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=5, run_id=run_id,
                          resume=True)
    res = extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=5, run_id=run_id,
                            resume=True, statistics=True)
    assert res.resumed and res.skipped >= 2
    q = ActivationLoader(tmp_path, "resume-stats").query()
    _check(q.statistics(), q.load()[0])
