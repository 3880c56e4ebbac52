"""Two drivers resuming one run: the one that commits second returns the committed run instead of failing."""

from __future__ import annotations

import torch

from easyroutine_dist.distributed.extractor import DistributedExtractor
from easyroutine_dist.storage.api import ActivationLoader
from easyroutine_dist.storage.runs import RunWriter


def test_second_driver_to_commit_returns_the_run(tmp_path):
    writer = RunWriter(tmp_path)
    run = writer.begin_run("two", "m", {})
    parts = [torch.full((2, 3), float(i)) for i in range(3)]
    for pid, x in enumerate(parts):
        writer.commit_part(run, writer.write_part(run, pid, {"x": x}))
    first = DistributedExtractor._commit(None, writer, run, 3, 6)  # driver A publishes
    second = DistributedExtractor._commit(None, RunWriter(tmp_path), run, 3, 6)  # driver B finds it published
    assert first == second == run.url
    cache, _ = ActivationLoader(tmp_path, "two").query().load()
    assert torch.equal(cache["x"], torch.cat(parts))
