"""The index actor sees what other processes do to storage: new, moved and removed runs (S3 and local)."""

from __future__ import annotations

import pytest
import ray
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.distributed import get_index
from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver


def _save(base, options, experiment, tag):
    ActivationSaver(base, experiment, storage_options=options).save(
        torch.ones(2, 1, 3), "m", ["last"], None, ExtractionConfig(extract_resid_out=True), tag=tag)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_index_follows_moves_and_removals(ray_cluster, backend, tmp_path, request):
    if backend == "s3":
        # no secrets: the index reads storage with its own environment's credentials (a loader holding its own
        # keys reads the catalog itself instead)
        base, options = f"{request.getfixturevalue('s3_bucket_url')}/acts", request.getfixturevalue("s3_public_options")
    else:
        base, options = str(tmp_path / "acts"), None
    get_index()  # started (normally by the first distributed run): queries now go through it
    loader = lambda exp: ActivationLoader(base, exp, storage_options=options)  # noqa: E731
    _save(base, options, "a", "t0")
    _save(base, options, "a", "t1")
    assert [e["tag"] for e in loader("a").query()] == ["t0", "t1"]  # the index lists this root; no "b" yet
    loader("a").query(tag="t0").update_run_experiment(0, "b")
    assert [e["tag"] for e in loader("a").query()] == ["t1"]
    assert [e["tag"] for e in loader("b").query()] == ["t0"]
    loader("a").query().remove(0)
    assert len(loader("a").query()) == 0
    roots = ray.get(get_index().status.remote())["roots"]
    assert any(r.rstrip("/").endswith("acts") for r in roots), roots  # the answers came through the index
