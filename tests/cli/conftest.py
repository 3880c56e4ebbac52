"""CLI tests without a cluster: runs saved with ActivationSaver on local disk or the local S3 endpoint."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner


@pytest.fixture(autouse=True)
def _catalog_only(monkeypatch):
    """Queries read the catalog in storage, not a Ray index another test module may have left running."""
    from easyroutine_dist.storage import providers

    monkeypatch.setattr(providers, "_PROVIDERS", {})


def invoke(*args, **kw):
    """Run the CLI in-process: the result has exit_code, stdout, stderr, output."""
    from easyroutine_dist.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def tensors(rows: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"resid_out_0": torch.randn(rows, 2, 64, generator=g), "resid_out_1": torch.randn(rows, 2, 64, generator=g)}


def save_run(base, experiment: str, model: str = "org/model", tag: str | None = None, seed: int = 0,
             storage_options=None, max_shard_bytes=None, other_metadata=None) -> str:
    """Save one run with ActivationSaver; return its run id."""
    from easyroutine_dist.config import ExtractionConfig
    from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver

    saver = ActivationSaver(str(base), experiment, storage_options=storage_options, max_shard_bytes=max_shard_bytes)
    saver.save(tensors(seed=seed), model, ["last"], None, ExtractionConfig(extract_resid_out=True), tag=tag,
               other_metadata=other_metadata)
    return ActivationLoader.from_saver(saver).query()[-1]["run_id"]
