"""Storage test fixtures: one ``backend`` fixture parametrised over local disk, memory:// and s3:// (moto)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import torch



@pytest.fixture(autouse=True)
def _catalog_only(monkeypatch):
    """Storage tests test the catalog in storage: no query provider (e.g. a Ray index left by other tests)."""
    from easyroutine_dist.storage import providers

    monkeypatch.setattr(providers, "_PROVIDERS", {})

class Backend:
    def __init__(self, name: str, url: str, options: dict[str, Any] | None) -> None:
        self.name, self.url, self.options = name, url, options

    def saver(self, experiment: str = "default", **kw: Any):
        from easyroutine_dist.interpretability.activation_saver import ActivationSaver

        return ActivationSaver(self.url, experiment, storage_options=self.options, **kw)

    def loader(self, experiment: str = "default"):
        from easyroutine_dist.interpretability.activation_saver import ActivationLoader

        return ActivationLoader(self.url, experiment, storage_options=self.options)


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request, tmp_path) -> Backend:
    if request.param == "local":
        return Backend("local", str(tmp_path / "acts"), None)
    if request.param == "memory":
        return Backend("memory", f"memory://t-{uuid.uuid4().hex}", None)
    url = request.getfixturevalue("s3_bucket_url")
    return Backend("s3", url + "/acts", request.getfixturevalue("s3_storage_options"))


@pytest.fixture
def local_backend(tmp_path) -> Backend:
    return Backend("local", str(tmp_path / "acts"), None)


def make_cache(batch: int = 2, seed: int = 0):
    from easyroutine_dist.cache import ActivationCache

    g = torch.Generator().manual_seed(seed)
    c = ActivationCache()
    c["resid_out_0"] = torch.randn(batch, 3, 8, generator=g)
    c["resid_out_1"] = torch.randn(batch, 3, 8, generator=g).to(torch.bfloat16)
    c["input_ids"] = torch.randint(0, 100, (batch, 3), generator=g)
    c["mask"] = torch.rand(batch, 3, generator=g) > 0.5
    c["mapping_index"] = {"last": [2]}
    return c
